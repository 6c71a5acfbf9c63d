"""`--sparse-embeddings`: the item table's gradient is row-sparse and `LazyAdamW` updates only the rows a
step touched — the same update as AdamW where every row is touched, none elsewhere; training with it
runs, keeps the table's gradient sparse, and resumes bit-identically under --deterministic."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from mhr.errors import UsageError
from mhr.training import optim
from mhr.training.optim import GatheredItems, LazyAdamW, clip_grad_norm
from mhr.training.params import TrainParams
from mhr.training.train import train
from mhr.windows import build_windows
from tests.helpers import interrupt_at_batch, make_dataset

TINY = dict(backbone="hstu", size="tiny", batch_size=16, eval_every=3, patience=0, lr=3e-3, warmup_steps=2)


def _loss(vecs, ids: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    return (vecs[ids] @ q).square().sum()


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_lazy_adamw_is_adamw_where_every_row_is_touched(weight_decay):
    torch.manual_seed(0)
    table, q = torch.randn(6, 4), torch.randn(4)
    dense = torch.nn.Parameter(table.clone())
    lazy = torch.nn.Parameter(table.clone())
    a = torch.optim.AdamW([dense], lr=0.1, weight_decay=weight_decay)
    b = LazyAdamW([lazy], lr=0.1, weight_decay=weight_decay)
    prep = torch.nn.functional.normalize
    for step in range(4):
        ids = torch.tensor([0, 1, 2, 3, 4, 5, 2, 2][: 8 - step % 2])  # every row, some twice
        a.zero_grad()
        b.zero_grad()
        _loss(prep(dense, dim=-1), ids, q).backward()
        _loss(GatheredItems(lazy, lambda x: prep(x, dim=-1)), ids, q).backward()
        assert lazy.grad.is_sparse
        torch.testing.assert_close(lazy.grad.to_dense(), dense.grad, rtol=1e-5, atol=1e-6)
        a.step()
        b.step()
        torch.testing.assert_close(lazy.data, dense.data, rtol=1e-4, atol=1e-5)


def test_untouched_rows_do_not_move_and_keep_their_moments():
    table = torch.nn.Parameter(torch.randn(5, 3))
    before = table.detach().clone()
    opt = LazyAdamW([table], lr=0.1, weight_decay=0.5)
    for _ in range(2):
        opt.zero_grad()
        _loss(GatheredItems(table, lambda x: x), torch.tensor([1, 3]), torch.ones(3)).backward()
        clip_grad_norm([table], 0.01)
        opt.step()
    moved = (table.detach() != before).any(dim=1)
    assert moved.tolist() == [False, True, False, True, False]
    assert not opt.state[table]["exp_avg"][[0, 2, 4]].any()


def test_clip_counts_sparse_gradients_once_coalesced():
    w = torch.nn.Parameter(torch.zeros(3, 2))
    w.grad = torch.sparse_coo_tensor(torch.tensor([[1, 1]]), torch.tensor([[3.0, 0.0], [1.0, 0.0]]), (3, 2),
                                     check_invariants=True)
    clip_grad_norm([w], 1.0)  # coalesced: row 1 = (4, 0), norm 4
    torch.testing.assert_close(w.grad.to_dense()[1], torch.tensor([1.0, 0.0]), rtol=1e-5, atol=1e-6)


def test_needs_a_sampled_softmax_over_an_item_table():
    with pytest.raises(UsageError, match="--sparse-embeddings"):
        TrainParams(sparse_embeddings=True).check()
    with pytest.raises(UsageError, match="--sparse-embeddings"):
        TrainParams(sparse_embeddings=True, negatives=8, decoder="comirec").check()
    TrainParams(sparse_embeddings=True, negatives=8).check()
    assert "sparse_embeddings" not in TrainParams().as_dict()  # earlier runs keep their key


def test_trains_with_a_sparse_table_and_resumes_bit_identically(tmp_path, monkeypatch):
    p = TrainParams(priors=("item", "temporal"), compose="multiplicative", max_steps=8, negatives=5,
                    sparse_embeddings=True, **TINY)
    seen = []
    real_step = LazyAdamW.step

    def spy(self, closure=None):
        seen.extend(q.grad.is_sparse for g in self.param_groups for q in g["params"]
                    if q.grad is not None and q.dim() == 2 and q.shape[0] == 31)  # the tiny dataset's 30 items + padding
        return real_step(self, closure)

    monkeypatch.setattr(optim.LazyAdamW, "step", spy)
    ref_ds = make_dataset(tmp_path / "ref")
    build_windows(ref_ds, context=12, horizon=4)
    ref = train(ref_ds, p, name="r", show_progress=False, deterministic=True)
    assert seen and all(seen)  # the item table's gradient stayed sparse through validation too
    ds = make_dataset(tmp_path / "crash")
    build_windows(ds, context=12, horizon=4)
    interrupt_at_batch(monkeypatch, 5, lambda: train(ds, p, name="r", show_progress=False, deterministic=True))
    resumed = train(ds, p, name="r", resume=True, show_progress=False, deterministic=True)
    for f in ("model.safetensors", "checkpoint/model.safetensors", "checkpoint/optimizer.safetensors"):
        a, b = load_file(ref.path / f), load_file(resumed.path / f)
        assert all(torch.equal(a[k], b[k]) for k in a if not k.startswith("__rng")), f
    losses = [[json.loads(x)["loss"] for x in (r.path / "log.jsonl").read_text().splitlines()] for r in (ref, resumed)]
    assert losses[0] == losses[1] and len(losses[0]) == 8
