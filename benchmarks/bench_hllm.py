"""HLLM costs (issue 5): item-embedding throughput and one training step relative to HSTU size 1.

    python benchmarks/bench_hllm.py                  # 512 item texts, batch 64 x 50, 4,344 items
    python benchmarks/bench_hllm.py --quick          # 128 texts, fewer repeats (smoke run)
    python benchmarks/bench_hllm.py --device cuda
    python benchmarks/bench_hllm.py --threads 16     # torch.set_num_threads

1. Item embeddings: the bundled all-MiniLM-L6-v2 (`mhr.item_text.encode_texts`, mean pooling, the
   offline default) over real item texts, "title: … brand: … categories: … description: …", from
   ../shared/data/amazon-scientific when present (synthetic texts of similar length otherwise),
   at --max-text-len 64 and 256. items/s over all texts after one warm-up batch.
2. Training step: backbone forward + one global head + full-softmax `multihead_loss` + backward +
   AdamW step, on random windows of batch x seq_len over a catalogue of --items items, for HSTU
   size 1 and HLLM tiny / size 1 (frozen 384-d item embeddings, MLP adapter, Llama user decoder
   from scratch). All in this process: 2 warm-up steps, then the median of --repeats steps, the models taking turns
   step by step.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from mhr.heads import Compatibility, PriorHeads, Scorer, build_layout  # noqa: E402
from mhr.item_text import encode_texts, load_encoder  # noqa: E402
from mhr.loss import multihead_loss  # noqa: E402
from mhr.model import MultiHeadRecommender  # noqa: E402
from mhr.models import hllm, hstu  # noqa: E402

SCIENTIFIC = Path(__file__).resolve().parents[2] / "shared" / "data" / "amazon-scientific" / "Scientific.item.json"


def item_texts(n: int, path: Path = SCIENTIFIC) -> tuple[list[str], str]:
    if path.is_file():
        items = json.loads(path.read_text())
        texts = [
            ". ".join(f"{k}: {v[k]}" for k in ("title", "brand", "categories", "description") if v.get(k))
            for v in list(items.values())[:n]
        ]
        return texts, "amazon-scientific"
    words = "precision digital thermometer probe stainless steel laboratory sensor kit with case".split()
    g = torch.Generator().manual_seed(0)
    texts = [" ".join(words[int(i)] for i in torch.randint(len(words), (80,), generator=g)) for _ in range(n)]
    return texts, "synthetic"


def bench_embedding(texts: list[str], max_len: int, batch: int, device: str) -> tuple[float, float]:
    """(items per wall second, items per CPU second of this process)."""
    tokenizer, model = load_encoder("minilm", device)
    encode_texts(texts[:batch], tokenizer, model, max_len, "mean", batch)  # warm-up
    sync(device)
    t0, c0 = time.perf_counter(), time.process_time()
    encode_texts(texts, tokenizer, model, max_len, "mean", batch)
    sync(device)
    return len(texts) / (time.perf_counter() - t0), len(texts) / (time.process_time() - c0)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def training_step(backbone: torch.nn.Module, d: int, n_items: int, batch: int, seq: int, device: str):
    """(a closure running one full training step, trainable parameter count)."""
    layout = build_layout((), "hierarchical")
    model = MultiHeadRecommender(backbone, PriorHeads(d, layout), Scorer()).to(device)
    compat = Compatibility(layout, n_items).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(0)
    items = torch.randint(1, n_items + 1, (batch, seq + 1), generator=g)
    lengths = torch.randint(seq // 2, seq + 2, (batch,), generator=g)
    items[torch.arange(seq + 1) >= lengths.unsqueeze(1)] = 0  # right padding
    inputs, targets = items[:, :-1].to(device), items[:, 1:].unsqueeze(-1).to(device)
    ts = torch.arange(seq, device=device).expand(batch, seq) * 60
    users = torch.arange(batch, device=device)

    def step() -> None:
        loss, _ = multihead_loss(model(inputs, ts).float(), model.item_vectors().float(), model.scorer, targets,
                                 compat.targets(targets, None, users), compat.omega)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step, sum(p.numel() for p in model.parameters() if p.requires_grad)


def time_steps(steps: dict[str, object], repeats: int, device: str) -> dict[str, float]:
    """Median seconds a step; models take turns each round, so a change in machine load during
    the run hits them all alike."""
    times: dict[str, list[float]] = {name: [] for name in steps}
    for i in range(repeats + 2):
        for name, step in steps.items():
            sync(device)
            t0 = time.perf_counter()
            step()
            sync(device)
            if i >= 2:
                times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--texts", type=int, default=512)
    ap.add_argument("--texts-file", type=Path, default=SCIENTIFIC, help="an amazon-scientific Scientific.item.json")
    ap.add_argument("--embed-batch", type=int, default=64)
    ap.add_argument("--items", type=int, default=4344)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=50)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    ap.add_argument("--quick", action="store_true", help="128 texts, 3 repeats")
    args = ap.parse_args()
    if args.quick:
        args.texts, args.repeats = 128, 3
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, device {args.device}, {torch.get_num_threads()} threads")

    texts, source = item_texts(args.texts, args.texts_file)
    mean_chars = sum(map(len, texts)) / len(texts)
    print(f"\nItem embeddings: bundled all-MiniLM-L6-v2, mean pooling, {len(texts)} {source} texts "
          f"(mean {mean_chars:.0f} chars), batch {args.embed_batch}")
    print("| max_text_len | items/s | items per CPU-second |\n|---|---|---|")
    for max_len in (64, 256):
        wall, cpu = bench_embedding(texts, max_len, args.embed_batch, args.device)
        print(f"| {max_len} | {wall:,.1f} | {cpu:,.1f} |")

    n, b, L = args.items, args.batch, args.seq_len
    print(f"\nOne training step: batch {b} x {L}, {n:,} items, full softmax, global head, AdamW "
          f"(median of {args.repeats})")
    print("| backbone | d | trainable params | step ms | vs HSTU 1 |\n|---|---|---|---|---|")
    steps, dims, params = {}, {}, {}
    cfg = hstu.hstu_config("1", n, L)
    steps["HSTU size 1"], params["HSTU size 1"] = training_step(hstu.HSTU(cfg), cfg.d, n, b, L, args.device)
    dims["HSTU size 1"] = cfg.d
    for size in ("tiny", "1"):
        cfg = hllm.hllm_config(size, n, L)
        model = hllm.HLLM(cfg, torch.randn(n + 1, cfg.item_dim))
        name = f"HLLM {size}"
        steps[name], params[name] = training_step(model, cfg.d, n, b, L, args.device)
        dims[name] = cfg.d
    w0, c0 = time.perf_counter(), time.process_time()
    seconds = time_steps(steps, args.repeats, args.device)
    share = (time.process_time() - c0) / (time.perf_counter() - w0)
    base = seconds["HSTU size 1"]
    for name, t in seconds.items():
        print(f"| {name} | {dims[name]} | {params[name]:,} | {1000 * t:.1f} | {t / base:.2f}x |")
    print(f"(this process had {share:.2f} CPU-seconds per wall second while stepping: below the thread "
          "count means other load on the machine)")


if __name__ == "__main__":
    main()
