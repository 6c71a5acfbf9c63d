"""The HLLM backbone through the shared training loop, evaluation and reload."""

from __future__ import annotations

import pytest

from mhr.evaluate import EvalParams, evaluate
from mhr.train import TrainParams, load_run, train
from mhr.windows import build_windows
from tests.helpers import make_dataset


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
