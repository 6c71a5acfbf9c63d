"""HLLM costs: item-embedding throughput, one training step relative to HSTU size 1, and
one --train-item-llm step relative to a frozen HLLM step.

    python benchmarks/bench_hllm.py                  # 512 item texts, batch 64 x 50, 4,344 items
    python benchmarks/bench_hllm.py --quick          # 128 texts, fewer repeats (smoke run)
    python benchmarks/bench_hllm.py --device cuda
    python benchmarks/bench_hllm.py --threads 16     # torch.set_num_threads
    python benchmarks/bench_hllm.py --only item-llm --text-len 32 --ft-batch 8 --ft-seq-len 20

1. Item embeddings: the bundled all-MiniLM-L6-v2 (`mhr.models.item_encoder.encode_texts`, mean pooling, the
   offline default) over real item texts, "title: … brand: … categories: … description: …", from
   ../shared/data/amazon-scientific when present (synthetic texts of similar length otherwise),
   at --max-text-len 64 and 256. items/s over all texts after one warm-up batch.
2. Training step: backbone forward + one global head + full-softmax `multihead_loss` + backward +
   AdamW step, on random windows of batch x seq_len over a catalogue of --items items, for HSTU
   size 1 and HLLM tiny / size 1 (frozen 384-d item embeddings, MLP adapter, Llama user decoder
   from scratch). All in this process: 2 warm-up steps, then the median of --repeats steps, the models taking turns
   step by step.
3. Fine-tuning the item LLM: one step of `mhr.training.step.LossStep` (the training loop's own loss step:
   HLLM tiny, one global head, --ft-negatives sampled negatives) + backward + AdamW, frozen item
   LLM (cached embeddings) vs `--train-item-llm` (the bundled MiniLM encoding the step's distinct
   items — inputs, next-item targets and negatives — with gradient, texts cut to --text-len
   tokens), at batch --ft-batch x --ft-seq-len over the first --ft-items texts. Timed as in 2.
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

from mhr.models import hllm, hstu  # noqa: E402
from mhr.models.heads import Compatibility, PriorHeads, Scorer, build_layout  # noqa: E402
from mhr.models.item_encoder import encode_texts, load_encoder  # noqa: E402
from mhr.models.multihead import MultiHeadRecommender  # noqa: E402
from mhr.training.loss import multihead_loss  # noqa: E402
from mhr.training.params import TrainParams  # noqa: E402
from mhr.training.step import LossStep  # noqa: E402

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


def loss_step(backbone: torch.nn.Module, n_items: int, batch: int, seq: int, negatives: int, device: str):
    """(a closure running one `LossStep` training step with sampled negatives, trainable parameter count,
    the distinct items of the batch's inputs and targets)."""
    layout = build_layout((), "hierarchical")
    model = MultiHeadRecommender(backbone, PriorHeads(backbone.config.d, layout), Scorer()).to(device)
    compat = Compatibility(layout, n_items).to(device)
    gen = torch.Generator(device=device).manual_seed(1)
    step_module = LossStep(model, compat, TrainParams(backbone="hllm", negatives=negatives), gen, compat.omega)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    g = torch.Generator().manual_seed(0)
    items = torch.randint(1, n_items + 1, (batch, seq + 1), generator=g)
    lengths = torch.randint(seq // 2, seq + 2, (batch,), generator=g)
    items[torch.arange(seq + 1) >= lengths.unsqueeze(1)] = 0
    inputs, targets = items[:, :-1].to(device), items[:, 1:].unsqueeze(-1).to(device)
    ts = torch.arange(seq, device=device).expand(batch, seq) * 60
    users = torch.arange(batch, device=device)
    model.train()

    def step() -> None:
        loss, _ = step_module(inputs, ts, targets, None, users)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    distinct = int((torch.unique(items) > 0).sum())
    return step, sum(p.numel() for p in model.parameters() if p.requires_grad), distinct


def bench_item_llm(args: argparse.Namespace) -> None:
    texts, source = item_texts(args.ft_items, args.texts_file)
    n, b, L, neg = len(texts), args.ft_batch, args.ft_seq_len, args.ft_negatives
    tokenizer, encoder = load_encoder("minilm", args.device)
    table = encode_texts(texts, tokenizer, encoder, args.text_len, "mean", 64)
    table = torch.cat([torch.zeros(1, table.shape[1]), table])
    steps, params = {}, {}
    torch.manual_seed(0)
    frozen = hllm.HLLM(hllm.hllm_config("tiny", n, L), table)
    steps["frozen item LLM"], params["frozen item LLM"], distinct = loss_step(frozen, n, b, L, neg, args.device)
    torch.manual_seed(0)
    tuned = hllm.HLLM(hllm.hllm_config("tiny", n, L, train_item_llm=True, max_text_len=args.text_len),
                      item_texts=texts)
    name = "--train-item-llm"
    steps[name], params[name], _ = loss_step(tuned, n, b, L, neg, args.device)
    encoded: list[int] = []
    tuned.item_llm.register_forward_hook(lambda m, a, k, out: encoded.append(len(out.last_hidden_state)),
                                         with_kwargs=True)
    print(f"\nOne HLLM tiny training step with {neg} sampled negatives: batch {b} x {L} over {n} {source} "
          f"items ({distinct} distinct in the batch), MiniLM texts cut to {args.text_len} tokens, "
          f"median of {args.repeats}")
    print("| item LLM | trainable params | step ms | vs frozen |\n|---|---|---|---|")
    w0, c0 = time.perf_counter(), time.process_time()
    seconds = time_steps(steps, args.repeats, args.device)
    share = (time.process_time() - c0) / (time.perf_counter() - w0)
    base = seconds["frozen item LLM"]
    for key, t in seconds.items():
        print(f"| {key} | {params[key]:,} | {1000 * t:.1f} | {t / base:.1f}x |")
    print(f"(--train-item-llm encoded {sum(encoded) / (args.repeats + 2):.0f} texts a step with gradient; "
          f"{share:.2f} CPU-seconds per wall second while stepping)")


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
    ap.add_argument("--only", choices=("embed", "steps", "item-llm"), help="run one part (default: all)")
    ap.add_argument("--text-len", type=int, default=32, help="item-llm: tokens per item text")
    ap.add_argument("--ft-items", type=int, default=512, help="item-llm: catalogue size (texts)")
    ap.add_argument("--ft-batch", type=int, default=8, help="item-llm: batch size")
    ap.add_argument("--ft-seq-len", type=int, default=20, help="item-llm: sequence length")
    ap.add_argument("--ft-negatives", type=int, default=64, help="item-llm: sampled negatives")
    args = ap.parse_args()
    if args.quick:
        args.texts, args.repeats = 128, 3
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, device {args.device}, {torch.get_num_threads()} threads")
    if args.only in (None, "embed"):
        bench_embeddings(args)
    if args.only in (None, "steps"):
        bench_steps(args)
    if args.only in (None, "item-llm"):
        bench_item_llm(args)


def bench_embeddings(args: argparse.Namespace) -> None:
    texts, source = item_texts(args.texts, args.texts_file)
    mean_chars = sum(map(len, texts)) / len(texts)
    print(f"\nItem embeddings: bundled all-MiniLM-L6-v2, mean pooling, {len(texts)} {source} texts "
          f"(mean {mean_chars:.0f} chars), batch {args.embed_batch}")
    print("| max_text_len | items/s | items per CPU-second |\n|---|---|---|")
    for max_len in (64, 256):
        wall, cpu = bench_embedding(texts, max_len, args.embed_batch, args.device)
        print(f"| {max_len} | {wall:,.1f} | {cpu:,.1f} |")


def bench_steps(args: argparse.Namespace) -> None:
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
