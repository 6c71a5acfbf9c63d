"""Training-step cost: multi-head overhead, throughput + MFU, peak memory per step.

    python benchmarks/bench_train.py                         # HSTU sizes 1 and 2, batch 128, T = 50, CPU
    python benchmarks/bench_train.py --sizes 1 --steps 3     # quicker
    python benchmarks/bench_train.py --threads 1             # steadier on a shared, busy machine
    python benchmarks/bench_train.py --device cuda --bf16    # the same on a GPU, bf16 autocast
    python benchmarks/bench_train.py --catalogue 50000,500000 --batch 64 --sizes 1   # step vs catalogue

`--catalogue A,B`: the plain HSTU (one head), 256 sampled negatives per position (logQ; or per
`--negatives-per sequence|batch`), at A and B
items, with the dense item table + AdamW and with `--sparse-embeddings` (row-sparse table + LazyAdamW),
the four setups interleaved in this process: median step each, and the B/A ratio per optimizer
(goal ≤ 1.5).

What one step is: the real training step of `mhr.training.train` — a batch cut by `mhr.training.step.make_batch` from
synthetic training windows (T + τ items, τ = 8), `mhr.training.step.LossStep` (backbone → heads →
`Compatibility.targets` → full-softmax `multihead_loss` with the `TrainParams` defaults: in-group
negatives, frequency head weights, γ = 0.99), backward, gradient clipping at 1.0 and an AdamW step.

Synthetic catalogue: --items items (default 3,706, the size of MovieLens-1M's), hand-made priors:
  temporal  2 segments over τ = 8 (offsets 1-4 → "ST", 5-8 → "LT")
  item      8 groups; every item in one random group, half of them in a second one (≈ 1.5 each)
Layouts compared on the same backbone (same initial weights, same batches):
  one head  no priors: the plain backbone, one global head (the baseline, ratio 1)
  2x8       hierarchical temporal × item: 2 + 16 residual d×d adapters, 16 leaf heads — the step as
            `mhr train` runs it: leaf queries computed only where the loss reads them
  2x8 dense the reference: every head decoded at every position (what the training step did before)
Windows: --rows random users' windows, 3 in 4 full (T + τ items), the rest right-padded to a
random length in [T/2, T + τ); items uniform over the catalogue, timestamps minutes to days apart.

1. Multi-head overhead: median step time of each layout after --warmup steps, the two layouts
   taking turns step by step (order swapped each round) so load from other processes hits both
   alike; goal 2x8 / one head ≤ 1.3.
2. Throughput (sequences/s = batch / median step) and model FLOP utilisation: analytic model
   FLOPs per step / median step time / the fp32 (bf16 with --bf16) matmul peak measured in this
   run (best of repeated n×n torch.matmul, measured before and after the steps; the higher one).
   Model FLOPs (forward, multiply-add = 2 FLOPs; B batch, L = T, d model width, H·d_qk = H·d_v = d):
     backbone linears  n_layers · 2·B·L·(d·(2·H·d_v + 2·H·d_qk) + H·d_v·d)   (= 10·B·L·d² a layer)
     attention         n_layers · 2·B·H·L²·(d_qk + d_v)                       (= 4·B·L²·d, full L×L)
     head adapters     n_adapters · 2·B·L·d²   (2x8 dense: 18 adapters; one head: 0); 2x8: the 2
                       upper adapters at every position + one leaf adapter per query read (2·d² each)
     loss logits       Σ_k 2·Q_k·|Ω_k|·d + 2·P·d   (Q_k: distinct (b, t) queries with a positive
                       of head k in the batch, P: positives — counted on the actual batches)
   times 3 for forward + backward. Not counted: elementwise work (SiLU, LayerNorm, normalisation,
   logsumexp), embedding gathers, the AdamW update, and the loss's recomputation of checkpointed
   logit chunks in backward (hardware FLOPs, not model FLOPs).
3. Peak memory per step: each configuration in a fresh child process (same arguments); its peak
   resident set (VmHWM, i.e. ru_maxrss of this process alone — Linux hands a child its parent's
   ru_maxrss across fork + exec) after building model + batches and after 2 steps (the first
   allocates AdamW state): the peak and its rise. On a GPU: torch.cuda.max_memory_allocated over the 2 steps.
4. Breakdown (where the time goes): the same step split at detach points — backbone / heads /
   loss forward, then loss / heads / backbone backward, then clip + AdamW — each stage timed
   (identical gradients to the fused step); medians of --breakdown-steps, layouts interleaved.
   With --profile (or when a ratio misses its goal) torch.profiler on one 2x8 step of the
   smallest size: operators by self CPU time, with their costliest input shapes.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

import numpy as np
import torch

from mhr.models.heads import (
    Compatibility,
    SelectedQueries,
    build_layout,
    dot_scores,
    parameter_count,
    tree_levels,
)
from mhr.models.multihead import backbone_config, build_model
from mhr.priors.spec import PriorSpec
from mhr.training.loss import find_positives, multihead_loss
from mhr.training.optim import build_optimizer, clip_grad_norm
from mhr.training.params import TrainParams
from mhr.training.step import LossStep, make_batch

TAU = 8
GOAL_RATIO = 1.3
GOAL_MFU = 0.30
LAYOUTS = ("one head", "2x8", "2x8 dense")


# ---------------------------------------------------------------------------------------------
# synthetic inputs


def make_priors(n_items: int, seed: int = 0) -> tuple[PriorSpec, PriorSpec]:
    """(temporal 2 segments over τ = 8, item prior 8 groups with ≈ 1.5 groups per item)."""
    rng = np.random.default_rng(seed)
    temporal = PriorSpec("temporal", "temporal", "bench-temporal", ("ST", "LT"), {"horizon": TAU},
                         horizon_groups=np.array([0] * (TAU // 2) + [1] * (TAU - TAU // 2), dtype=np.int64))
    n = n_items + 1
    groups = np.zeros((8, n), dtype=bool)
    first = rng.integers(8, size=n)
    groups[first, np.arange(n)] = True
    second = (first + rng.integers(1, 8, size=n)) % 8
    two = rng.random(n) < 0.5
    groups[second[two], np.arange(n)[two]] = True
    groups[:, 0] = False
    item = PriorSpec("item", "item", "bench-item", tuple(f"cat{g}" for g in range(8)), {}, item_groups=groups)
    return temporal, item


def make_windows(n_rows: int, context: int, n_items: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Training windows as `mhr.windows` writes them (right-padded arrays, see the docstring)."""
    rng = np.random.default_rng(seed)
    width = context + TAU
    length = np.where(rng.random(n_rows) < 0.75, width, rng.integers(context // 2, width, size=n_rows))
    real = np.arange(width)[None, :] < length[:, None]
    items = np.where(real, rng.integers(1, n_items + 1, size=(n_rows, width)), 0).astype(np.int32)
    gaps = np.exp(rng.uniform(np.log(60), np.log(5 * 86400), size=(n_rows, width))).astype(np.int64)
    ts = np.where(real, 1_600_000_000 + np.cumsum(gaps, axis=1), 0).astype(np.int64)
    return {
        "user": np.arange(1, n_rows + 1, dtype=np.int32),
        "items": items,
        "ts": ts,
        "events": np.zeros((n_rows, width), dtype=np.int16),
    }


def make_batches(args, device) -> list[dict]:
    train = make_windows(args.rows, args.context, args.items)
    order = np.random.default_rng(1).permutation(args.rows)
    n = max(1, args.rows // args.batch)
    return [make_batch(train, order[i * args.batch : (i + 1) * args.batch], args.context, TAU, device) for i in range(n)]


# ---------------------------------------------------------------------------------------------
# one configuration: model + loss module + optimizer, as `mhr.training.train.train` builds them


def machine_line(device: str) -> str:
    """'torch X, device D (name), N torch threads of M CPUs': the head of every benchmark's report."""
    name = torch.cuda.get_device_name() if device.startswith("cuda") else (platform.processor() or platform.machine())
    return (f"torch {torch.__version__}, device {device} ({name}), {torch.get_num_threads()} torch threads of "
            f"{os.cpu_count()} CPUs")


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


class Setup:
    def __init__(self, size: str, layout_name: str, args, specs: tuple[PriorSpec, ...]) -> None:
        self.size, self.layout_name, self.device = size, layout_name, args.device
        priors = specs if layout_name.startswith("2x8") else ()
        self.params = TrainParams(size=size, priors=tuple(s.name for s in priors), batch_size=args.batch)
        self.config = backbone_config("hstu", size, args.items, args.context)
        self.layout = build_layout(priors, self.params.compose, self.params.global_head)
        torch.manual_seed(0)  # the same backbone initialisation for both layouts
        self.model = build_model("hstu", self.config, self.layout, self.params.score,
                                 self.params.temperature).to(args.device)
        self.model.train()
        self.compat = Compatibility(self.layout, args.items, [None]).to(args.device)
        self.gen = torch.Generator(device=args.device).manual_seed(1)
        # "2x8" is the training step as `mhr train` runs it (head queries computed only where the loss
        # reads them); "2x8 dense" the reference that decodes every head at every position
        self.selective = layout_name != "2x8 dense"
        self.loss_step = LossStep(self.model, self.compat, self.params, self.gen, self.compat.omega,
                                   selective=self.selective)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=self.params.lr,
                                     weight_decay=self.params.weight_decay)
        self.bf16 = args.bf16
        self.n_params = sum(p.numel() for p in self.model.parameters())
        self.head_params = parameter_count(self.layout, self.config.d)
        self.n_adapters = (sum(len(p) for p, _ in tree_levels(self.layout.leaves))
                           if self.layout.compose == "hierarchical" else len(self.layout.leaves))

    def autocast(self):
        if not self.bf16:
            return contextlib.nullcontext()
        return torch.autocast("cuda" if self.device.startswith("cuda") else "cpu", dtype=torch.bfloat16)

    def step(self, b: dict) -> None:
        """The training loop's step (mhr.training.train.train), minus logging and the scheduler."""
        with self.autocast():
            loss, _ = self.loss_step(b["items"], b["ts"], b["targets"], b["target_events"], b["users"])
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.params.clip)
        self.opt.step()

    def staged_step(self, b: dict) -> dict[str, float]:
        """The same step cut at detach points, each stage timed; the gradients are identical."""
        m, p, dev = self.model, self.params, self.device
        t: dict[str, float] = {}
        clock = [time.perf_counter()]

        def lap(name: str) -> None:
            sync(dev)
            now = time.perf_counter()
            t[name] = now - clock[0]
            clock[0] = now

        self.opt.zero_grad(set_to_none=True)
        sync(dev)
        clock[0] = time.perf_counter()
        with self.autocast():
            h = m.backbone(b["items"], b["ts"])
            lap("backbone fwd")
            hd = h.detach().requires_grad_()
            compat_t = self.compat.targets(b["targets"], b["target_events"], b["users"])
            items = m.scorer.prepare_items(m.item_vectors().float())
            if self.selective:  # the heads run inside the loss, only where it reads them
                q = None
                lap("heads fwd")
                qd = SelectedQueries(m.heads, hd.float(), m.scorer.prepare_queries)
            else:
                q = m.heads(hd)
                lap("heads fwd")
                qd = q.detach().requires_grad_()
            loss, _ = multihead_loss(qd if self.selective else m.scorer.prepare_queries(qd.float()), items,
                                     dot_scores, b["targets"], compat_t,
                                     self.loss_step.omega, gamma=p.gamma, head_weights=p.head_weights,
                                     negatives=p.negatives, negatives_from=p.negatives_from,
                                     global_ratio=p.global_ratio, generator=self.gen)
            if self.selective:
                loss = loss + qd.anchor()
            lap("loss fwd")
        loss.backward()
        lap("loss bwd")
        if q is not None:
            q.backward(qd.grad)
        lap("heads bwd")
        h.backward(hd.grad)
        lap("backbone bwd")
        torch.nn.utils.clip_grad_norm_(m.parameters(), p.clip)
        self.opt.step()
        lap("clip + AdamW")
        return t

    # ---- analytic model FLOPs (see the module docstring)

    def flops(self, b: dict) -> dict[str, float]:
        cfg = self.config
        B, L = b["items"].shape
        d, H, dq, dv = cfg.d, cfg.n_heads, cfg.attn_dim, cfg.linear_dim
        linear = cfg.n_layers * 2 * B * L * (d * (2 * H * dv + 2 * H * dq) + H * dv * d)
        attention = cfg.n_layers * 2 * B * H * L * L * (dq + dv)
        with torch.no_grad():
            compat_t = self.compat.targets(b["targets"], b["target_events"], b["users"])
            pos = find_positives(b["targets"], compat_t)
            n_heads = self.layout.n_heads
            qid = torch.unique(pos.k * (B * L) + pos.b * L + pos.t)
            q_per_head = torch.bincount(qid // (B * L), minlength=n_heads).double()
            omega = self.compat.omega.clone()
            omega[:, 0] = False
            cand = omega.sum(1).double()
            logits = float(2 * d * (q_per_head * cand).sum()) + 2 * d * len(pos)
        if self.selective and self.layout.leaves:
            # adapters above the leaves at every position, leaf adapters only at the queries read
            upper = self.n_adapters - len(self.layout.leaves)
            heads = 2 * d * d * (upper * B * L + float(q_per_head[: len(self.layout.leaves)].sum()))
        else:
            heads = self.n_adapters * 2 * B * L * d * d
        fwd = {"linear": linear, "attention": attention, "heads": heads, "logits": logits}
        return {k: 3.0 * v for k, v in fwd.items()}


# ---------------------------------------------------------------------------------------------
# measurements


def matmul_peak(device: str, dtype: torch.dtype, n: int, repeats: int) -> tuple[float, float]:
    """(best, median) FLOP/s of an n×n @ n×n matmul."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    sync(device)
    rates = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        sync(device)
        rates.append(2 * n**3 / (time.perf_counter() - t0))
    return max(rates), statistics.median(rates)


def time_pair(setups: list[Setup], batches: list[dict], warmup: int, steps: int, staged: bool = False):
    """Median seconds a step per setup (staged: per-stage medians); the setups take turns, the
    order swapped every round. Also the process's CPU-seconds per wall second while stepping."""
    times: dict[int, list] = {i: [] for i in range(len(setups))}
    w0, c0 = time.perf_counter(), time.process_time()
    for r in range(warmup + steps):
        b = batches[r % len(batches)]
        order = range(len(setups)) if r % 2 == 0 else reversed(range(len(setups)))
        for i in order:
            s = setups[i]
            sync(s.device)
            t0 = time.perf_counter()
            out = s.staged_step(b) if staged else s.step(b)
            sync(s.device)
            if r >= warmup:
                times[i].append(out if staged else time.perf_counter() - t0)
    share = (time.process_time() - c0) / (time.perf_counter() - w0)
    if staged:
        return [{k: statistics.median(x[k] for x in times[i]) for k in times[i][0]} for i in times], share
    return [statistics.median(times[i]) for i in times], share


class CatalogueSetup:
    """The plain backbone with 256 sampled negatives per position at one catalogue size, dense or
    sparse item table, as `mhr train` builds it."""

    def __init__(self, size: str, n_items: int, sparse: bool, args) -> None:
        self.n_items, self.sparse, self.device = n_items, sparse, args.device
        self.layout_name = f"{n_items:,} items, {'sparse' if sparse else 'dense'}"
        self.params = TrainParams(size=size, batch_size=args.batch, negatives=256, sparse_embeddings=sparse,
                                  negatives_per=args.negatives_per)
        config = backbone_config("hstu", size, n_items, args.context)
        layout = build_layout((), self.params.compose, self.params.global_head)
        torch.manual_seed(0)
        self.model = build_model("hstu", config, layout, self.params.score, self.params.temperature).to(args.device)
        self.model.train()
        compat = Compatibility(layout, n_items, [None]).to(args.device)
        self.gen = torch.Generator(device=args.device).manual_seed(1)
        self.loss_step = LossStep(self.model, compat, self.params, self.gen, compat.omega)
        self.opt = build_optimizer(self.model, self.params.lr, self.params.weight_decay, sparse)

    def step(self, b: dict) -> None:
        loss, _ = self.loss_step(b["items"], b["ts"], b["targets"], b["target_events"], b["users"])
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        clip_grad_norm(self.model.parameters(), self.params.clip)
        self.opt.step()


def catalogue_ratio(args) -> None:
    """Median step at each catalogue size, dense and sparse item table, all interleaved."""
    import copy

    sizes = [int(x) for x in args.catalogue.split(",")]
    size = args.sizes.split(",")[0]
    print(f"{machine_line(args.device)}; load average {os.getloadavg()[0]:.2f}")
    print(f"HSTU-{size}, one head, batch {args.batch} x T {args.context}, 256 negatives per {args.negatives_per} (logQ); "
          f"{args.warmup} warm-up + median of {args.steps} steps, setups interleaved")
    setups, batches = [], []
    for n in sizes:
        a = copy.copy(args)
        a.items = n
        for sparse in (False, True):
            setups.append(CatalogueSetup(size, n, sparse, a))
        batches.append(make_batches(a, args.device))
    times: dict[int, list[float]] = {i: [] for i in range(len(setups))}
    for r in range(args.warmup + args.steps):
        for i in (range(len(setups)) if r % 2 == 0 else reversed(range(len(setups)))):
            b = batches[i // 2][r % len(batches[i // 2])]
            t0 = time.perf_counter()
            setups[i].step(b)
            if r >= args.warmup:
                times[i].append(time.perf_counter() - t0)
    med = [statistics.median(times[i]) for i in times]
    print("\n| items | item table | step ms | seq/s |\n|---|---|---|---|")
    for s, t in zip(setups, med, strict=True):
        print(f"| {s.n_items:,} | {'sparse, LazyAdamW' if s.sparse else 'dense, AdamW'} | {1000 * t:.0f} | "
              f"{args.batch / t:.1f} |")
    for j, name in enumerate(("dense", "sparse")):
        print(f"{name}: step at {sizes[-1]:,} / at {sizes[0]:,} items = {med[2 * (len(sizes) - 1) + j] / med[j]:.2f} "
              f"(goal <= 1.5)")
    print(f"sparse / dense at {sizes[-1]:,} items: {med[-1] / med[-2]:.2f}; load average {os.getloadavg()[0]:.2f}; "
          f"peak RSS {peak_rss() / 2**30:.2f} GiB")


def peak_rss() -> int:
    """This process's peak resident set in bytes. VmHWM on Linux: ru_maxrss would do, but Linux
    carries the parent's ru_maxrss across fork + exec, so a child of this (large) benchmark
    process would report the parent's peak whenever its own is lower."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


def child_memory(args, size: str, layout_name: str) -> None:
    """Runs in a fresh process: peak memory of 2 training steps of one configuration (JSON line)."""
    specs = make_priors(args.items)
    batches = make_batches(args, args.device)
    s = Setup(size, layout_name, args, specs)
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        before = peak_rss()
    for i in range(2):
        s.step(batches[i % len(batches)])
    sync(args.device)
    if args.device.startswith("cuda"):
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = peak_rss()
    print(json.dumps({"before": before, "peak": peak, "rise": peak - before}))


def run_child(args, size: str, layout_name: str) -> dict | None:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", f"{size}:{layout_name}",
           "--batch", str(args.batch), "--context", str(args.context), "--items", str(args.items),
           "--rows", str(args.rows), "--threads", str(args.threads), "--device", args.device]
    if args.bf16:
        cmd.append("--bf16")
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        print(f"  memory child for size {size} {layout_name} failed:\n{out.stderr[-2000:]}", file=sys.stderr)
        return None
    return json.loads(out.stdout.strip().splitlines()[-1])


def profile_step(s: Setup, b: dict, rows: int = 15) -> None:
    """torch.profiler on one step: operators by self CPU time, each with its costliest input shapes."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if s.device.startswith("cuda") else [])
    with profile(activities=acts, record_shapes=True) as prof:
        s.step(b)
        sync(s.device)
    by_shape = [e for e in prof.key_averages(group_by_input_shape=True) if not e.key.startswith("autograd::")]
    gpu = s.device.startswith("cuda")
    cost = (lambda e: e.self_device_time_total) if gpu else (lambda e: e.self_cpu_time_total)  # noqa: E731
    total = sum(cost(e) for e in by_shape)
    ops: dict[str, list] = {}
    for e in by_shape:
        ops.setdefault(e.key, []).append(e)
    ranked = sorted(ops.items(), key=lambda kv: -sum(cost(e) for e in kv[1]))
    print(f"\ntorch.profiler, one step of HSTU size {s.size} {s.layout_name}: operators by self {'GPU' if gpu else 'CPU'} time "
          f"(total {total / 1e6:.1f} s; costliest input shapes of each)")
    print("| operator | calls | self ms | share | costliest shapes (calls, ms) |\n|---|---|---|---|---|")
    for name, group in ranked[:rows]:
        t = sum(cost(e) for e in group)
        group.sort(key=lambda e: -cost(e))
        top = "; ".join(
            f"{', '.join(str(x) for x in e.input_shapes if x)[:60] or '—'} ({e.count}, {cost(e) / 1000:.0f})"
            for e in group[:2])
        print(f"| {name} | {sum(e.count for e in group)} | {t / 1000:.0f} | {100 * t / total:.1f}% | {top} |")


def mib(x: float) -> str:
    return f"{x / 2**20:,.0f}"


def main() -> None:
    all_cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="1,2", help="HSTU sizes, comma-separated")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--context", type=int, default=50, help="T (input positions per window)")
    ap.add_argument("--items", type=int, default=3706, help="catalogue size")
    ap.add_argument("--rows", type=int, default=1024, help="synthetic training windows (batches cycle)")
    ap.add_argument("--steps", type=int, default=6, help="timed steps per configuration (median)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--breakdown-steps", type=int, default=2, help="0 = no per-stage breakdown")
    ap.add_argument("--threads", type=int, default=all_cores, help=f"torch threads (default all {all_cores} cores)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--bf16", action="store_true", help="bf16 autocast (as `mhr train` on a GPU)")
    ap.add_argument("--peak-size", type=int, default=0, help="matmul n for the peak (0: 2048 CPU, 8192 GPU)")
    ap.add_argument("--no-memory", action="store_true", help="skip the per-configuration memory children")
    ap.add_argument("--profile", action="store_true", help="torch.profiler table even when the goal is met")
    ap.add_argument("--catalogue", default=None, help="A,B: only the step at A vs B items, dense vs sparse table")
    ap.add_argument("--negatives-per", default="position", help="With --catalogue: the sampler's draw unit")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.rows = max(args.rows, args.batch)
    torch.set_num_threads(args.threads)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device visible to torch")
    if args.catalogue:
        catalogue_ratio(args)
        return
    if args.child:
        size, layout_name = args.child.split(":", 1)
        child_memory(args, size, layout_name)
        return

    sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    peak_n = args.peak_size or (8192 if args.device.startswith("cuda") else 2048)
    print(f"{machine_line(args.device)}, interop {torch.get_num_interop_threads()}, "
          f"{'bf16 autocast' if args.bf16 else 'fp32'}; load average {os.getloadavg()[0]:.2f}")
    print(f"batch {args.batch} x T {args.context}, τ {TAU}, {args.items:,} items, {args.rows} windows; "
          f"{args.warmup} warm-up + median of {args.steps} steps, layouts interleaved")

    peaks = [matmul_peak(args.device, dtype, peak_n, 10)]
    specs = make_priors(args.items)
    batches = make_batches(args, args.device)
    rows, stages = [], {}
    for size in sizes:
        setups = [Setup(size, name, args, specs) for name in LAYOUTS]
        seconds, share = time_pair(setups, batches, args.warmup, args.steps)
        used = [batches[r % len(batches)] for r in range(args.warmup, args.warmup + args.steps)]
        for s, sec in zip(setups, seconds, strict=True):
            fl = {k: statistics.mean(s.flops(b)[k] for b in used) for k in ("linear", "attention", "heads", "logits")}
            rows.append({"size": size, "layout": s.layout_name, "setup": s, "sec": sec, "ratio": sec / seconds[0],
                         "flops": fl, "share": share})
        if args.breakdown_steps:
            st, _ = time_pair(setups, batches, 0, args.breakdown_steps, staged=True)  # already warm
            stages[size] = st
        print(f"  size {size}: one head {1000 * seconds[0]:.0f} ms, 2x8 {1000 * seconds[1]:.0f} ms "
              f"(ratio {seconds[1] / seconds[0]:.2f}), 2x8 dense reference {1000 * seconds[2]:.0f} ms "
              f"(ratio {seconds[2] / seconds[0]:.2f}); {share:.2f} CPU-s per wall-s", flush=True)
        del setups
    peaks.append(matmul_peak(args.device, dtype, peak_n, 10))
    peak = max(p[0] for p in peaks)

    mem = {}
    if not args.no_memory:
        for r in rows:
            mem[(r["size"], r["layout"])] = run_child(args, r["size"], r["layout"])

    print(f"\nmatmul peak ({peak_n}×{peak_n} {str(dtype).replace('torch.', '')}): best {peak / 1e9:.1f} GFLOP/s "
          f"(medians {', '.join(f'{p[1] / 1e9:.1f}' for p in peaks)} GFLOP/s before / after the steps); "
          f"load average {os.getloadavg()[0]:.2f}")
    mem_head = "| peak RSS MiB | step rise MiB " if not args.device.startswith("cuda") else "| peak alloc MiB | step rise MiB "
    print("\n| HSTU size | layout | heads | params (heads) | step ms | ratio | goal | seq/s | model GFLOP/step "
          f"| GFLOP/s | MFU {mem_head}|")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        s, total = r["setup"], sum(r["flops"].values())
        m = mem.get((r["size"], r["layout"]))
        mcols = f"{mib(m['peak'])} | {mib(m['rise'])}" if m else "— | —"
        goal = f"≤ {GOAL_RATIO}" if r["layout"] == LAYOUTS[1] else "—"
        print(f"| {r['size']} | {r['layout']} | {s.layout.n_heads} | {s.n_params:,} ({s.head_params:,}) | "
              f"{1000 * r['sec']:.0f} | {r['ratio']:.2f} | {goal} | {args.batch / r['sec']:.1f} | "
              f"{total / 1e9:.1f} | {total / r['sec'] / 1e9:.1f} | {100 * total / r['sec'] / peak:.1f}% | {mcols} |")
    print("\nModel GFLOP per step (forward + backward) by part:")
    print("| HSTU size | layout | backbone linears | attention | head adapters | loss logits |\n|---|---|---|---|---|---|")
    for r in rows:
        f = r["flops"]
        print(f"| {r['size']} | {r['layout']} | {f['linear'] / 1e9:.1f} | {f['attention'] / 1e9:.1f} | "
              f"{f['heads'] / 1e9:.1f} | {f['logits'] / 1e9:.1f} |")
    if stages:
        names = list(next(iter(stages.values()))[0])
        print(f"\nWhere the time goes (ms, staged step, median of {args.breakdown_steps}):")
        print(f"| HSTU size | layout | {' | '.join(names)} | total |\n|" + "---|" * (len(names) + 3))
        for size, st in stages.items():
            for name, t in zip(LAYOUTS, st, strict=True):
                print(f"| {size} | {name} | {' | '.join(f'{1000 * t[k]:.0f}' for k in names)} | "
                      f"{1000 * sum(t.values()):.0f} |")
    missed = [r for r in rows if r["layout"] == LAYOUTS[1] and r["ratio"] > GOAL_RATIO]
    mfu2 = [r for r in rows if r["size"] == "2" and r["layout"] == LAYOUTS[0]]
    if mfu2:
        mfu = sum(mfu2[0]["flops"].values()) / mfu2[0]["sec"] / peak
        print(f"\nMFU of HSTU size 2 (one head) at batch {args.batch}, T {args.context}: {100 * mfu:.1f}% "
              f"(goal ≥ {100 * GOAL_MFU:.0f}%: {'met' if mfu >= GOAL_MFU else 'missed'})")
    print(f"multi-head overhead goal ≤ {GOAL_RATIO}: "
          + ("met" if not missed else "missed for size " + ", ".join(r["size"] for r in missed)))
    if missed or args.profile:
        # the smallest size: cheapest to profile, and the multi-head share is largest there
        s = Setup(sizes[0], LAYOUTS[1], args, specs)
        s.step(batches[0])
        profile_step(s, batches[1 % len(batches)])


if __name__ == "__main__":
    main()
