"""Sampled-softmax training-step cost: full softmax vs each sampled mode.

    python benchmarks/bench_sampling.py --threads 1           # 12k items, n = 256 and 8,192, τ = 1
    python benchmarks/bench_sampling.py --quick               # 1 step, no warm-up (the fewest steps)
    python benchmarks/bench_sampling.py --modes batch,inbatch-logq --negatives 256   # a subset

Per-sequence and per-position draws at n = 8,192 take ≈ 100 s a step on a loaded 2-core CPU (see
benchmarks/README.md), so the default 1 + 5 rounds take ≈ 30 min there and --quick ≈ 10 min with
the memory children; --modes / --negatives / --no-memory cut it down.
    python benchmarks/bench_sampling.py --layouts one,groups  # also 8 item-group heads (in-group draws)
    python benchmarks/bench_sampling.py --tau 8               # the 8-step horizon of bench_train.py

What one step is: the real training step of `mhr.training.train` as `benchmarks/bench_train.py` times it
(its `Setup`: a batch cut by `mhr.training.step.make_batch`, `mhr.training.step.LossStep` → `multihead_loss`,
backward, clip 1.0, AdamW), HSTU size 1, batch 128, T = 50, with the `TrainParams` defaults except
the sampled-softmax fields: `negatives` (None = full softmax), `negatives_per`,
`in_batch_negatives`, `logq` (see `mhr.training.sampling`).

Horizon τ = 1 by default (next-item targets only, leave-one-out style: the large-catalogue use
case); --tau 8 gives bench_train.py's horizon (8 targets a position, 8× the positives).
Catalogue: --items items (default 12,000), bench_train.py's synthetic windows (3 in 4 full, items
uniform over the catalogue). Layouts (--layouts):
  one      the plain backbone, one global head: negatives drawn over the whole catalogue
  groups   bench_train.py's item prior alone, 8 groups (≈ 1.5 per item): 8 leaf heads, each
           drawing its negatives inside its group Ω_k (in-group sampling)
Modes (--modes), each at every n in --negatives (default 256 and 8,192):
  full           full softmax over each head's group (negatives=None), the baseline, ratio 1
  batch          one uniform draw per batch shared by every positive, uncorrected (the legacy sampler)
  batch-logq     the same with the logQ correction
  inbatch-logq   per batch + the batch's own targets as negatives + logQ (mixed negatives)
  sequence-logq  one draw per sequence + logQ
  position-logq  one draw per position + logQ (HSTU's reference sampler)

1. Step time: median of --steps steps after --warmup, all configurations of a layout taking turns
   step by step (order reversed every round: `bench_train.time_pair`), so load from other processes
   hits them alike; ratio = median step / the full softmax's median step in the same process.
   positions/s = input positions with at least one target per batch (mean over the batches used)
   / median step time.
2. Peak memory at the largest n (and the full softmax): each configuration in a fresh child
   process (--memory-jobs of them at a time: VmHWM is per process, so load does not matter); its
   VmHWM (`bench_train.peak_rss`) after building model + batches and after 2 steps, the peak and
   its rise. On a GPU: torch.cuda.max_memory_allocated over the 2 steps.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_train import Setup, machine_line, make_priors, make_windows, mib, peak_rss, sync, time_pair  # noqa: E402

from mhr.training.sampling import CHUNK_ELEMENTS  # noqa: E402
from mhr.training.step import make_batch  # noqa: E402

# mode -> the TrainParams fields it sets besides `negatives` (None: full softmax)
MODES: dict[str, dict | None] = {
    "full": None,
    "batch": {},
    "batch-logq": {"logq": True},
    "inbatch-logq": {"in_batch_negatives": True, "logq": True},
    "sequence-logq": {"negatives_per": "sequence", "logq": True},
    "position-logq": {"negatives_per": "position", "logq": True},
}
LAYOUTS = {"one": "one head", "groups": "8 item groups"}


def make_batches(args) -> list[dict]:
    """bench_train.py's windows, cut with horizon --tau (its windows hold T + 8 items)."""
    train = make_windows(args.rows, args.context, args.items)
    order = np.random.default_rng(1).permutation(args.rows)
    n = max(1, args.rows // args.batch)
    return [make_batch(train, order[i * args.batch : (i + 1) * args.batch], args.context, args.tau, args.device)
            for i in range(n)]


def make_setup(layout: str, mode: str, n: int | None, args) -> Setup:
    """bench_train.Setup (same initial weights for all), then the sampled-softmax fields set."""
    if layout == "groups":  # a "2x8…" name makes Setup use the given priors: the item prior alone
        s = Setup(args.size, "2x8", args, (make_priors(args.items)[1],))
    else:
        s = Setup(args.size, "one head", args, ())
    s.layout_name = LAYOUTS[layout]
    extra = MODES[mode]
    s.params = dataclasses.replace(s.params, negatives=None if extra is None else n, **(extra or {}))
    s.loss_step.params = s.params
    return s


def configurations(args) -> list[tuple[str, int | None]]:
    """(mode, n) pairs: the full softmax once, every sampled mode at every n."""
    out: list[tuple[str, int | None]] = []
    for mode in args.modes:
        out += [(mode, None)] if MODES[mode] is None else [(mode, n) for n in args.negatives]
    return out


def child_memory(args, spec: str) -> dict:
    """Runs in a fresh process: peak memory of 2 steps of one configuration (one JSON line)."""
    layout, mode, n = spec.split(":")
    batches = make_batches(args)
    s = make_setup(layout, mode, int(n) or None, args)
    cuda = args.device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated() if cuda else peak_rss()
    for i in range(2):
        s.step(batches[i % len(batches)])
    sync(args.device)
    peak = torch.cuda.max_memory_allocated() if cuda else peak_rss()
    out = {"before": before, "peak": peak, "rise": peak - before}
    print(json.dumps(out), flush=True)
    return out


def run_child(args, layout: str, mode: str, n: int | None) -> dict | None:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", f"{layout}:{mode}:{n or 0}",
           "--batch", str(args.batch), "--context", str(args.context), "--items", str(args.items),
           "--rows", str(args.rows), "--tau", str(args.tau), "--size", args.size,
           "--threads", str(args.threads), "--device", args.device]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        print(f"  memory child {layout} {mode} n={n} failed:\n{out.stderr[-2000:]}", file=sys.stderr)
        return None
    return json.loads(out.stdout.strip().splitlines()[-1])


def parse_args(argv: list[str] | None):
    all_cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--items", type=int, default=12_000, help="catalogue size")
    ap.add_argument("--negatives", default="256,8192", help="sampled negatives n, comma-separated")
    ap.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, of {', '.join(MODES)}")
    ap.add_argument("--layouts", default="one",
                    help="comma-separated: one (global head), groups (8 item groups)")
    ap.add_argument("--tau", type=int, default=1, help="horizon τ (targets per position), 1 to 8")
    ap.add_argument("--size", default="1", help="HSTU size")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--context", type=int, default=50, help="T (input positions per window)")
    ap.add_argument("--rows", type=int, default=1024, help="synthetic training windows (batches cycle)")
    ap.add_argument("--steps", type=int, default=5, help="timed steps per configuration (median)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=all_cores,
                    help=f"torch threads (default all {all_cores} cores)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--quick", action="store_true", help="1 timed step, no warm-up (the fewest steps)")
    ap.add_argument("--no-memory", action="store_true", help="skip the per-configuration memory children")
    ap.add_argument("--memory-jobs", type=int, default=2, help="memory children run at the same time")
    ap.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.negatives = [int(x) for x in args.negatives.split(",") if x.strip()]
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    args.layouts = [x.strip() for x in args.layouts.split(",") if x.strip()]
    bad = [m for m in args.modes if m not in MODES] + [x for x in args.layouts if x not in LAYOUTS]
    if bad:
        ap.error(f"unknown mode/layout {', '.join(bad)}; modes: {', '.join(MODES)}; "
                 f"layouts: {', '.join(LAYOUTS)}")
    if "full" not in args.modes:
        args.modes.insert(0, "full")  # the ratios' baseline
    if not 1 <= args.tau <= 8 or not args.negatives or min(args.negatives) < 1:
        ap.error("--tau must be in 1..8 and --negatives positive counts")
    if args.quick:
        args.steps, args.warmup = 1, 0
    args.rows = max(args.rows, args.batch)
    args.bf16 = False  # bench_train.Setup's autocast switch: fp32 here
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device visible to torch")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.child:
        return child_memory(args, args.child)
    start = time.perf_counter()

    print(f"{time.strftime('%Y-%m-%d %H:%M %Z')}: {machine_line(args.device)}; "
          f"load average {os.getloadavg()[0]:.2f}")
    print(f"HSTU size {args.size}, batch {args.batch} x T {args.context}, τ {args.tau}, "
          f"{args.items:,} items, {args.rows} windows; {args.warmup} warm-up + median of {args.steps} "
          "steps, configurations interleaved", flush=True)
    batches = make_batches(args)
    used = [batches[r % len(batches)] for r in range(args.warmup, args.warmup + args.steps)]
    positions = float(np.mean([int((b["targets"] > 0).any(-1).sum()) for b in used]))
    positives = float(np.mean([int((b["targets"] > 0).sum()) for b in used]))
    configs = configurations(args)
    rows = []
    for layout in args.layouts:
        setups = [make_setup(layout, mode, n, args) for mode, n in configs]
        seconds, share = time_pair(setups, batches, args.warmup, args.steps)
        full = seconds[0]
        for (mode, n), sec in zip(configs, seconds, strict=True):
            rows.append({"layout": layout, "mode": mode, "n": n, "step_ms": 1000 * sec, "ratio": sec / full,
                         "positions_per_s": positions / sec, "cpu_share": share})
        print(f"  {LAYOUTS[layout]}: full softmax {1000 * full:.0f} ms; {share:.2f} CPU-s per wall-s",
              flush=True)
        del setups

    if not args.no_memory:  # children at once (--memory-jobs): each reads its own VmHWM, load does not matter
        top = max(args.negatives)
        todo = [r for r in rows if r["n"] in (None, top)]
        with ThreadPoolExecutor(max_workers=max(1, args.memory_jobs)) as pool:
            found = list(pool.map(lambda r: run_child(args, r["layout"], r["mode"], r["n"]), todo))
        for r, m in zip(todo, found, strict=True):
            if m:
                r.update(peak_mib=m["peak"] / 2**20, rise_mib=m["rise"] / 2**20)

    kind = "alloc" if args.device.startswith("cuda") else "RSS"
    print(f"\n{time.perf_counter() - start:.0f} s in all; load average {os.getloadavg()[0]:.2f}; "
          f"{positions:,.0f} target positions and {positives:,.0f} positives per batch (mean)")
    print(f"\n| layout | mode | n | step ms | positions/s | ratio to full | peak {kind} MiB "
          "| step rise MiB |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        mem = "— | —"
        if "peak_mib" in r:
            mem = f"{mib(r['peak_mib'] * 2**20)} | {mib(r['rise_mib'] * 2**20)}"
        print(f"| {LAYOUTS[r['layout']]} | {r['mode']} | {r['n'] or '—'} | {r['step_ms']:,.0f} | "
              f"{r['positions_per_s']:,.0f} | {r['ratio']:.2f} | {mem} |")
    d = setup_width(args)
    chunks = ", ".join(f"n = {n:,}: {max(1, CHUNK_ELEMENTS // (n * d + n))} queries "
                       f"({max(1, CHUNK_ELEMENTS // (n * d + n)) * n * d * 4 / 2**20:.0f} MiB gathered)"
                       for n in args.negatives)
    print(f"\nper-sequence/per-position chunks (CHUNK_ELEMENTS = 2^{CHUNK_ELEMENTS.bit_length() - 1}, "
          f"d = {d}): {chunks}")
    result = {"args": {k: v for k, v in vars(args).items() if k != "child"}, "torch": torch.__version__,
              "positions_per_batch": positions, "positives_per_batch": positives, "rows": rows}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return result


def setup_width(args) -> int:
    from mhr.models.multihead import backbone_config

    return backbone_config("hstu", args.size, args.items, args.context).d


if __name__ == "__main__":
    main()
