"""The HLLM backbone through the shared training loop, evaluation and reload."""

from __future__ import annotations

import dataclasses
import json
import math
import os

import pytest
import torch
from safetensors.torch import load_file

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from mhr.cache import stage_key  # noqa: E402
from mhr.errors import UsageError  # noqa: E402
from mhr.item_texts import item_texts, load_item_embeddings  # noqa: E402
from mhr.ranking.evaluate import EvalParams, evaluate  # noqa: E402
from mhr.store import connect  # noqa: E402
from mhr.training.params import TrainParams  # noqa: E402
from mhr.training.runs import load_run  # noqa: E402
from mhr.training.train import train  # noqa: E402
from mhr.windows import build_windows  # noqa: E402
from tests.helpers import interrupt_at_batch, make_dataset  # noqa: E402
from tests.test_hllm import save_tiny_encoder  # noqa: E402


@pytest.mark.slow
def test_hllm_trains_with_prior_heads_and_reloads(tmp_path):
    ds = make_dataset(tmp_path / "ws")
    build_windows(ds, context=12, horizon=4)
    p = TrainParams(backbone="hllm", size="tiny", priors=("item",), max_steps=4, batch_size=16,
                    eval_every=4, patience=0, text_cols=("title", "tags"), max_text_len=32)
    r = train(ds, p, name="h", show_progress=False)
    assert (ds.dir / "item_embeddings").is_dir()
    again = train(ds, p, name="h", show_progress=False)
    assert again.cached
    run = load_run(ds, "h")
    assert run.model.item_vectors().shape[0] == 31
    _, result, _ = evaluate(ds, "h", EvalParams(ks=(10,)))
    assert 0 <= result["metrics"]["ndcg@10/h4"] <= 1
    assert r.key != train(ds, TrainParams(priors=("item",), size="tiny", max_steps=1, batch_size=16),
                          name="other", show_progress=False).key


# ---------------------------------------------------------------------------------------------
# --train-item-llm: the item LLM fine-tuned end to end (a tiny random BERT built here)

FT = dict(backbone="hllm", size="tiny", priors=("item",), batch_size=8, eval_every=3, patience=0,
          text_cols=("title", "tags"), max_text_len=16, negatives=16, lr=3e-3, warmup_steps=1)
QUERY = "backbone.item_llm.encoder.layer.0.attention.self.query.weight"


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models gain nothing from threads, and lose much to them on a loaded 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def text_ds(tmp_path):
    """The tiny planted dataset, its windows, and a 1-layer random BERT over its item texts."""
    ds = make_dataset(tmp_path / "ws")
    build_windows(ds, context=12, horizon=4)
    con = connect(ds.store_path, read_only=True)
    try:
        texts = item_texts(con, ("title", "tags"))
    finally:
        con.close()
    return ds, save_tiny_encoder(tmp_path / "bert", texts)


def _log(run_dir) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "log.jsonl").read_text().splitlines()]


def test_train_item_llm_fine_tunes_the_encoder_and_reloads(text_ds):
    from transformers import BertModel

    ds, bert = text_ds
    original = BertModel.from_pretrained(bert).encoder.layer[0].attention.self.query.weight.detach()
    p = TrainParams(max_steps=3, item_llm=str(bert), train_item_llm=True, **FT)
    r = train(ds, p, name="ft", show_progress=False)
    log = _log(r.path)
    assert len(log) == 3 and all(math.isfinite(e["loss"]) for e in log)
    assert 0 <= log[-1]["valid_ndcg@10"] <= 1
    weights = load_file(r.path / "model.safetensors")
    assert not torch.allclose(weights[QUERY], original)  # the item LLM was trained
    assert weights["backbone.item_token_ids"].dtype == torch.int32
    assert not (ds.dir / "item_embeddings").exists()  # nothing cached: the encoder changes each step
    assert train(ds, p, name="ft", show_progress=False).cached

    run = load_run(ds, "ft")  # rebuilt from config.json (item_llm) + model.safetensors
    assert run.model.backbone.trains_item_llm and not run.model.training
    assert torch.equal(run.model.backbone.item_llm.encoder.layer[0].attention.self.query.weight, weights[QUERY])
    with torch.no_grad():
        vecs = run.model.item_vectors()
    assert vecs.shape[0] == 31 and torch.all(vecs[0] == 0) and vecs[1:].norm(dim=-1).min() > 0  # cold items too
    _, result, _ = evaluate(ds, "ft", EvalParams(ks=(10,)))
    assert 0 <= result["metrics"]["ndcg@10/h4"] <= 1

    # the frozen default: the same settings train no encoder, only read the cached table
    frozen = train(ds, TrainParams(max_steps=3, item_llm=str(bert), **FT), name="frozen", show_progress=False)
    fw = load_file(frozen.path / "model.safetensors")
    assert not any(k.startswith("backbone.item_llm.") for k in fw) and frozen.key != r.key
    key = json.loads((frozen.path / "config.json").read_text())["inputs"]["item_embeddings"]
    torch.testing.assert_close(fw["backbone.item_text_embeddings"], load_item_embeddings(ds, key))


def _token_run(root, monkeypatch, crash_at: int | None = None):
    """A 5-step --train-item-llm run with a learned [ITEM] token, killed during step `crash_at`
    (then resumed from its last checkpoint) or uninterrupted."""
    ds = make_dataset(root / "ws")
    build_windows(ds, context=12, horizon=4)
    con = connect(ds.store_path, read_only=True)
    bert = save_tiny_encoder(root / "bert", item_texts(con, ("title", "tags")))
    con.close()
    p = TrainParams(max_steps=5, item_llm=str(bert), train_item_llm=True, pooling="token", **{**FT, "eval_every": 2})
    if crash_at:
        interrupt_at_batch(monkeypatch, crash_at, lambda: train(ds, p, name="r", show_progress=False))
    return train(ds, p, name="r", resume=bool(crash_at), show_progress=False)


def test_train_item_llm_resume_is_bit_identical(tmp_path, monkeypatch):
    ref = _token_run(tmp_path / "ref", monkeypatch)
    resumed = _token_run(tmp_path / "crash", monkeypatch, crash_at=4)  # after the step-2 checkpoint
    a, b = (load_file(r.path / "checkpoint" / "model.safetensors") for r in (ref, resumed))
    assert a.keys() == b.keys() and "backbone.item_token" in a
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [e["loss"] for e in _log(ref.path)] == [e["loss"] for e in _log(resumed.path)]


def test_train_item_llm_refuses_full_softmax(text_ds, cli):
    ds, bert = text_ds
    p = TrainParams(max_steps=1, item_llm=str(bert), train_item_llm=True, **{**FT, "negatives": None})
    with pytest.raises(UsageError, match="needs sampled negatives") as e:
        train(ds, p, name="full", show_progress=False)
    assert "--negatives" in e.value.hint
    proc = cli("-d", ds.name, "train", "--backbone", "hllm", "--size", "tiny", "--train-item-llm",
               "--item-llm", str(bert), workspace=ds.dir.parent, check=False)
    assert proc.returncode == 2 and proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 2 and "needs sampled negatives" in lines[0] and "--negatives" in lines[1]


def test_frozen_default_key_is_unchanged_by_the_flag():
    p = TrainParams(backbone="hllm", size="tiny", priors=("item",), max_steps=4, batch_size=16, eval_every=4,
                    patience=0, text_cols=("title", "tags"), max_text_len=32)
    assert "train_item_llm" not in p.as_dict() and "train_item_llm" not in TrainParams(train_item_llm=True).as_dict()
    # computed before --train-item-llm existed: frozen HLLM runs keep their keys (and caches)
    inputs = {"windows": "w", "item_embeddings": "e", "prior:item": "k"}
    assert stage_key("train", p.as_dict(), inputs) == "5c36d3c9ede5c0cf86a27045352d7186f29d95bdf06af7b928dda96003fade6d"
    on = TrainParams(**{**dataclasses.asdict(p), "priors": p.priors, "text_cols": p.text_cols, "train_item_llm": True})
    assert on.as_dict()["train_item_llm"] is True
