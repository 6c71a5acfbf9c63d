"""Fused top-k scoring: cost relative to one head, grouped vs dense (docs/ARCHITECTURE.md,
"Performance principles").

    python benchmarks/bench_scoring.py                 # 25k items, d = 128 and 256, 512 users
    python benchmarks/bench_scoring.py --quick         # smaller, for a smoke run
    python benchmarks/bench_scoring.py --device cuda
    python benchmarks/bench_scoring.py --threads 1     # steadier on a shared, busy machine
    python benchmarks/bench_scoring.py --ceiling 50000,500000 --users 1024   # users/s vs its ceiling

`--ceiling A,B`: `mhr eval`'s ranking (`mhr.ranking.inference.rank_split`: HSTU-1 forward, head queries,
history excluded, fused top-200 over the whole catalogue, batches of 256 users) of --users synthetic
users at A and B items, for a plain run (one head) and a head run (2×8 hierarchical temporal × item,
as bench_train.py), each timed beside its ceiling in this process: the bare backbone forward + a bare
[256, d] × [d, N] matmul + top-200 over the same batches, same threads (each part timed on its own,
interleaved with the real call). Prints users/s and the ratio (goal ≥ 0.5), and for head runs also
the same-work ceiling: forward + h̄ matmuls + top-200, h̄ the mean number of eligible heads per item —
the multiply-adds a head run cannot avoid without approximating.

Head layouts (eligibility only; the head queries are random):
  one head   the plain backbone: one head, every item eligible (the baseline, ratio 1)
  2x8 item×temporal  hierarchical: 2 temporal segments (all items) × 8 item categories; each item is in
                     1 or 2 categories (1.5 on average) → 3 eligible heads per item on average
  8x11 temporal×graph  8 temporal segments × 11 co-engagement communities; each item in exactly one
                       community → 8 eligible heads per item
Scorer: cosine with a temperature (as the models use). Every configuration runs in this process:
one warm-up, then the median of --repeats calls, each layout's calls interleaved with the
one-head baseline's (the ratio's denominator, timed beside it). Goal: grouped ratio ≤ 1.25 × eligible heads per item.
Peak memory: what one call adds to the peak resident set, measured in a fresh process (ru_maxrss
after the inputs are built vs after the call), or the CUDA allocator's peak on a GPU.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import statistics
import time

import numpy as np
import torch

from mhr.ranking.scoring import ScoringPlan, dense_fused_topk, grouped_fused_topk, plan_for


def cosine(q: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
    qn = torch.nn.functional.normalize(q, dim=-1)
    en = torch.nn.functional.normalize(items, dim=-1)
    return qn @ en.T / 0.05


def layouts(n_items: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    n = n_items + 1
    one = np.ones((1, n), dtype=bool)
    cats = np.zeros((8, n), dtype=bool)
    first = rng.integers(8, size=n)
    cats[first, np.arange(n)] = True
    second = (first + rng.integers(1, 8, size=n)) % 8
    two = rng.random(n) < 0.5
    cats[second[two], np.arange(n)[two]] = True
    item_temporal = np.concatenate([cats, cats])  # leaf (segment, category): Ω = the category
    comm = np.zeros((11, n), dtype=bool)
    comm[rng.integers(11, size=n), np.arange(n)] = True
    temporal_graph = np.concatenate([comm] * 8)
    out = {"one head": one, "2x8 item×temporal": item_temporal, "8x11 temporal×graph": temporal_graph}
    for e in out.values():
        e[:, 0] = False
    return out


def make_inputs(args, d: int, name: str, device: torch.device):
    """The same inputs in any process: (q, item vecs, eligibility, history mask)."""
    e = layouts(args.items, np.random.default_rng(0))[name]
    gen = torch.Generator().manual_seed(d * 1000 + e.shape[0])
    vecs = torch.randn(args.items + 1, d, generator=gen)
    q = torch.randn(args.users, e.shape[0], d, generator=gen)
    hist = torch.zeros(args.users, args.items + 1, dtype=torch.bool)  # ~50 history items per user
    hist.scatter_(1, torch.randint(1, args.items + 1, (args.users, 50), generator=gen), True)
    return q.to(device), vecs.to(device), torch.from_numpy(e).to(device), hist.to(device)


def call(method: str, args, q, vecs, elig_or_plan, hist):
    fn = grouped_fused_topk if method == "grouped" else dense_fused_topk
    return fn(q, vecs, cosine, elig_or_plan, None, hist, args.k, "max")


def _peak_child(method: str, args, d: int, name: str, out) -> None:
    import resource

    if args.threads:
        torch.set_num_threads(args.threads)
    q, vecs, elig, hist = make_inputs(args, d, name, torch.device("cpu"))
    arg = ScoringPlan(elig) if method == "grouped" else elig
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    call(method, args, q, vecs, arg, hist)
    out.put((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024)


def peak_memory(method: str, args, d: int, name: str, device: torch.device, q, vecs, arg, hist) -> int:
    """Bytes one call adds to the peak: CUDA allocator peak, or on CPU the rise of the
    high-water resident set in a fresh process (allocations freed earlier would hide it here)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        call(method, args, q, vecs, arg, hist)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    proc = ctx.Process(target=_peak_child, args=(method, args, d, name, out))
    proc.start()
    peak = out.get()
    proc.join()
    return peak


def timed(fns, repeats: int, device: torch.device) -> list[float]:
    """Median seconds of each function, calls interleaved so that a busy machine's drift hits all alike."""

    def once(fn) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    for fn in fns:
        once(fn)  # warm-up
    times = [[once(fn) for fn in fns] for _ in range(repeats)]
    return [statistics.median(col) for col in zip(*times, strict=True)]


def ceiling(args) -> None:
    """Users/s of the real ranking against the bare forward + matmul + top-k (see the docstring)."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from bench_train import make_priors, make_windows

    from mhr.models.heads import Compatibility, build_layout
    from mhr.models.multihead import backbone_config, build_model
    from mhr.ranking.inference import rank_split

    T, batch = 50, 256
    print(f"# ranking vs its ceiling: HSTU-1, {args.users} users, batches of {batch}, top-{args.k}, "
          f"{torch.get_num_threads()} threads; median of {args.repeats} after a warm-up")
    print("| items | run | heads (eligible per item h̄) | users/s | ceiling users/s | ratio | same-work ceiling "
          "users/s | ratio | goal |\n|---|---|---|---|---|---|---|---|---|")
    for n_items in (int(x) for x in args.ceiling.split(",")):
        w = make_windows(args.users, T, n_items)
        length = np.minimum((w["items"] != 0).sum(1), T).astype(np.int64)
        split = {"user": w["user"], "items": w["items"][:, :T], "ts": w["ts"][:, :T], "length": length,
                 "history_ptr": np.r_[0, np.cumsum(length)].astype(np.int64),
                 "history_items": np.concatenate([w["items"][i, :length[i]] for i in range(args.users)])}
        for run, priors in (("plain", ()), ("2x8 heads", make_priors(n_items))):
            layout = build_layout(priors, "hierarchical", False)
            torch.manual_seed(0)
            model = build_model("hstu", backbone_config("hstu", "1", n_items, T), layout, "cosine", 0.05).eval()
            compat = Compatibility(layout, n_items, [None])

            def real(model=model, compat=compat, split=split):
                rank_split(model, compat, split, args.k, batch_size=batch)

            states: list[torch.Tensor] = []  # the forward's last states, batch by batch
            scores = torch.empty(batch, n_items + 1)  # one batch's bare scores, reused

            @torch.no_grad()
            def forward(model=model, split=split, states=states):  # the bare backbone forward, last states kept
                states.clear()
                for s in range(0, args.users, batch):
                    items = torch.from_numpy(split["items"][s:s + batch])
                    h = model.backbone(items, torch.from_numpy(split["ts"][s:s + batch]))
                    states.append(h[torch.arange(len(items)), torch.from_numpy(split["length"][s:s + batch]) - 1])

            @torch.no_grad()
            def matmul(model=model, states=states, scores=scores):  # the bare [256, d] x [d, N] of every batch
                vecs = model.item_vectors()
                for h in states:
                    torch.mm(h, vecs.T, out=scores[: len(h)])

            def topk(states=states, scores=scores):  # the bare top-k over one batch's scores, once per batch
                for h in states:
                    torch.topk(scores[: len(h)], args.k, dim=1)

            forward()
            t_real, t_fwd, t_mm, t_top = timed([real, forward, matmul, topk], args.repeats, torch.device("cpu"))
            per_item = plan_for(compat.omega).mean_heads_per_item
            bare = t_fwd + t_mm + t_top
            same_work = t_fwd + per_item * t_mm + t_top  # as many multiply-adds as the heads need
            print(f"| {n_items:,} | {run} | {layout.n_heads} ({per_item:.1f}) | {args.users / t_real:.0f} | "
                  f"{args.users / bare:.0f} | **{bare / t_real:.2f}** | {args.users / same_work:.0f} | "
                  f"**{same_work / t_real:.2f}** | ≥ 0.5 |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--items", type=int, default=25_000)
    ap.add_argument("--users", type=int, default=512)
    ap.add_argument("--dims", default="128,256")
    ap.add_argument("--k", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--dense-repeats", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--quick", action="store_true", help="5k items, 128 users, d = 64")
    ap.add_argument("--ceiling", default=None, help="A,B: only the ranking's users/s against its ceiling")
    args = ap.parse_args()
    if args.quick:
        args.items, args.users, args.dims, args.repeats, args.dense_repeats = 5000, 128, "64", 3, 1
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.ceiling:
        ceiling(args)
        return
    print(
        f"# fused top-{args.k}: {args.items} items, {args.users} users, device {device}, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; median of {args.repeats} "
        f"(dense: {args.dense_repeats}) after a warm-up"
    )
    print(
        "| d | layout | heads | eligible heads/item | plan (ms) | grouped (ms) | grouped ratio | goal ≤ | "
        "dense (ms) | dense ratio | grouped peak MiB | dense peak MiB |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for d in (int(x) for x in args.dims.split(",")):
        q1, vecs1, elig1, hist1 = make_inputs(args, d, "one head", device)
        plan1 = ScoringPlan(elig1)

        def one_head(q1=q1, vecs1=vecs1, plan1=plan1, hist1=hist1):
            return call("grouped", args, q1, vecs1, plan1, hist1)

        for name in layouts(16, np.random.default_rng(0)):
            q, vecs, elig, hist = make_inputs(args, d, name, device)
            t0 = time.perf_counter()
            plan = ScoringPlan(elig)
            plan_ms = 1000 * (time.perf_counter() - t0)

            def grouped(q=q, vecs=vecs, plan=plan, hist=hist):
                return call("grouped", args, q, vecs, plan, hist)

            def dense(q=q, vecs=vecs, elig=elig, hist=hist):
                return call("dense", args, q, vecs, elig, hist)

            # the baseline is re-timed beside each layout: ratios compare calls made side by side
            base, t_grouped = timed([one_head, grouped], args.repeats, device)
            base_d, t_dense = timed([one_head, dense], args.dense_repeats, device)
            mem_g = peak_memory("grouped", args, d, name, device, q, vecs, plan, hist)
            mem_d = peak_memory("dense", args, d, name, device, q, vecs, elig, hist)
            heads_per_item = plan.mean_heads_per_item
            print(
                f"| {d} | {name} | {q.shape[1]} | {heads_per_item:.2f} | {plan_ms:.0f} | "
                f"{1000 * t_grouped:.1f} | {t_grouped / base:.2f} | {1.25 * heads_per_item:.2f} | "
                f"{1000 * t_dense:.1f} | {t_dense / base_d:.2f} | {mem_g / 2**20:.0f} | {mem_d / 2**20:.0f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
