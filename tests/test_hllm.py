"""HLLM backbone and the item-embedding stage: tiny random transformers models built
here, the bundled MiniLM for the offline default, no downloads."""

from __future__ import annotations

import json
import os
from contextlib import nullcontext
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import mhr.item_texts as item_texts_stage  # noqa: E402
import mhr.models.item_encoder as item_encoder  # noqa: E402
from mhr.cache import read_manifest, stage_key  # noqa: E402
from mhr.errors import NotFoundError, UsageError  # noqa: E402
from mhr.models.heads import Compatibility, PriorHeads, Scorer, build_layout  # noqa: E402
from mhr.models.hllm import HLLM, HLLMConfig, estimate_memory_bytes, estimate_params, hllm_config  # noqa: E402
from mhr.models.multihead import MultiHeadRecommender  # noqa: E402
from mhr.store import connect, new_store, set_meta  # noqa: E402
from mhr.training.loss import multihead_loss  # noqa: E402
from mhr.workspace import Workspace  # noqa: E402

THEMES = {
    "space": [
        "Telescope for observing planets", "Star chart of the night sky", "Astronomy book about galaxies",
        "Moon map poster", "Rocket model kit", "Planetarium star projector", "Binoculars for stargazing",
        "Mars rover model", "Solar system mobile", "Comet hunting guide",
    ],
    "cooking": [
        "Chef knife for the kitchen", "Cast iron frying pan", "Baking cookbook with bread recipes",
        "Pasta maker machine", "Spice rack with herbs", "Kitchen mixing bowls", "Chocolate cake recipe book",
        "Soup pot with lid", "Electric rice cooker", "Wooden cutting board",
    ],
    "garden": [
        "Garden hose", "Flower seeds for spring", "Pruning shears", "Lawn mower", "Compost bin",
        "Watering can", "Tomato plant seeds", "Garden gloves", "Wheelbarrow for the yard", "Plant fertilizer",
    ],
}
COLD = ("Astronomy guide to the stars and planets", "space")  # never interacted with: the last item


def make_store(root: Path, name: str = "text", n_users: int = 30, seq_len: int = 16, seed: int = 0):
    """Items of three themes (+ one cold space item, id N); each user stays inside one theme."""
    gen = torch.Generator().manual_seed(seed)
    items = [(t, theme) for theme, titles in THEMES.items() for t in titles] + [COLD]
    ds = Workspace(root).dataset(name)
    with new_store(ds.store_path) as con:
        for i, (title, theme) in enumerate(items, start=1):
            attrs = json.dumps({"brand": f"brand{i % 4}", "theme": theme})
            con.execute("INSERT INTO items VALUES (?, ?, ?, ?, ?, ?)", [i, f"r{i}", title, "", [theme], attrs])
        rows = []
        for u in range(n_users):
            con.execute("INSERT INTO users VALUES (?, ?, ?)", [u + 1, f"u{u}", "{}"])
            theme = u % 3
            for p in range(seq_len):
                item = theme * 10 + 1 + int(torch.randint(10, (1,), generator=gen))
                rows.append((u + 1, item, 1000 + p, None, p))
        con.executemany("INSERT INTO interactions VALUES (?, ?, ?, ?, ?)", rows)
        set_meta(con, data_key=stage_key("data", {"test": name, "seed": seed}, {}), source="tests",
                 has_timestamps=True, name=name)
    return ds


def save_tiny_encoder(path: Path, texts: list[str], hidden: int = 16) -> Path:
    """A 1-layer random BERT with a word-level tokenizer over the words of `texts`, saved at `path`."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

    split = pre_tokenizers.Whitespace()
    words = sorted({w.lower() for t in texts for w, _ in split.pre_tokenize_str(t)} - {":", ".", ";"})
    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", ":", ".", ";", *words])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = split
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]",
                                   cls_token="[CLS]", sep_token="[SEP]")
    torch.manual_seed(0)
    model = BertModel(BertConfig(vocab_size=len(vocab), hidden_size=hidden, num_hidden_layers=1,
                                 num_attention_heads=2, intermediate_size=2 * hidden, max_position_embeddings=64))
    model.save_pretrained(path)
    fast.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tiny_encoder(tmp_path_factory) -> Path:
    texts = [*sum(THEMES.values(), []), COLD[0], "title tags brand theme text", *THEMES]
    return save_tiny_encoder(tmp_path_factory.mktemp("tiny-bert"), texts)


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models gain nothing from threads, and lose much to them on a loaded 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def minilm():
    return item_encoder.load_encoder("minilm")


def tiny_model(n_items: int = 20, max_len: int = 8, item_dim: int = 16, seed: int = 0, **kw) -> HLLM:
    torch.manual_seed(seed)
    config = hllm_config("tiny", n_items, max_len, item_dim=item_dim, **kw)
    return HLLM(config, torch.randn(n_items + 1, item_dim))


# ---------------------------------------------------------------------------------------------
# item text and the embedding stage


def test_item_texts_reads_columns_and_attrs_fields(tmp_path):
    ds = make_store(tmp_path)
    con = connect(ds.store_path, read_only=True)
    try:
        texts = item_texts_stage.item_texts(con, ("title", "tags", "brand"))
        assert len(texts) == 31
        assert texts[0] == "title: Telescope for observing planets. tags: space. brand: brand1"
        assert item_texts_stage.item_texts(con, ("title",), max_chars=9)[0] == "title: Te"
        with pytest.raises(UsageError, match="nope") as e:
            item_texts_stage.item_texts(con, ("title", "nope"))
        assert "brand" in e.value.hint and "theme" in e.value.hint
    finally:
        con.close()


def test_embeddings_are_cached_and_reencoded_only_on_change(tmp_path, tiny_encoder, monkeypatch):
    ds = make_store(tmp_path)
    calls = []
    real = item_encoder.encode_texts
    monkeypatch.setattr(item_encoder, "encode_texts", lambda texts, *a, **k: calls.append(len(texts)) or real(texts, *a, **k))
    key, path = item_texts_stage.embed_items(ds, str(tiny_encoder), ("title", "tags"), max_text_len=32, batch_size=8)
    assert calls == [31] and path == ds.dir / "item_embeddings" / key[:12]
    table = item_texts_stage.load_item_embeddings(ds, key)
    assert table.shape == (32, 16) and torch.all(table[0] == 0) and table[1:].abs().sum(1).min() > 0
    manifest = read_manifest(path)
    assert manifest["key"] == key and manifest["n_items"] == 31 and manifest["params"]["model"]["dim"] == 16

    again, _ = item_texts_stage.embed_items(ds, str(tiny_encoder), ("title", "tags"), max_text_len=32, batch_size=8)
    assert again == key and calls == [31]  # cached: nothing re-encoded
    item_texts_stage.embed_items(ds, str(tiny_encoder), ("title", "tags"), max_text_len=32, force=True)
    assert calls == [31, 31]
    other, _ = item_texts_stage.embed_items(ds, str(tiny_encoder), ("title",), max_text_len=32)
    token, _ = item_texts_stage.embed_items(ds, str(tiny_encoder), ("title", "tags"), max_text_len=32, pooling="token")
    assert len({key, other, token}) == 3 and calls == [31, 31, 31, 31]
    t = item_texts_stage.load_item_embeddings(ds, token)
    assert t.shape == (32, 16) and torch.isfinite(t).all() and not torch.allclose(t, table)


def test_token_pooling_reads_the_appended_token_at_each_items_own_length(tiny_encoder):
    tokenizer, model = item_encoder.load_encoder(str(tiny_encoder))
    texts = ["garden hose", "telescope for observing planets in the night sky"]
    together = item_encoder.encode_texts(texts, tokenizer, model, pooling="token", batch_size=2)
    alone = torch.cat([item_encoder.encode_texts([t], tokenizer, model, pooling="token") for t in texts])
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-5)  # padding does not leak in


def test_missing_model_is_a_clear_error(tmp_path):
    ds = make_store(tmp_path)
    with pytest.raises(NotFoundError, match="no model at") as e:
        item_texts_stage.embed_items(ds, str(tmp_path / "no-such-model"))
    assert "bundled" in e.value.hint
    (tmp_path / "empty").mkdir()
    with pytest.raises(NotFoundError, match="config.json"):
        item_texts_stage.embed_items(ds, str(tmp_path / "empty"))
    with pytest.raises(NotFoundError, match="no user LLM"):
        HLLMConfig(n_items=5, max_len=4, user_llm=str(tmp_path / "no-such-model"))
    with pytest.raises(NotFoundError, match="no model at"):
        HLLM(HLLMConfig(n_items=5, max_len=4, item_llm=str(tmp_path / "no-such-model"), train_item_llm=True))


def test_bundled_minilm_loads_offline_with_384_dims(minilm):
    tokenizer, model = minilm
    vecs = item_encoder.encode_texts(["a telescope for stargazing", "astronomy binoculars", "a frying pan"],
                                  tokenizer, model)
    assert vecs.shape == (3, 384)
    v = torch.nn.functional.normalize(vecs, dim=-1)
    assert v[0] @ v[1] > v[0] @ v[2]


# ---------------------------------------------------------------------------------------------
# the backbone


def test_shapes_item_vectors_and_parameter_estimate():
    model = tiny_model()
    items = torch.tensor([[1, 2, 3, 0], [4, 0, 0, 0]])
    h = model(items, torch.zeros_like(items))
    assert h.shape == (2, 4, model.config.d)
    vecs = model.item_vectors()
    assert vecs.shape == (21, model.config.d) and torch.all(vecs[0] == 0)
    assert estimate_params(model.config) == sum(p.numel() for p in model.parameters())
    assert estimate_memory_bytes(model.config, 64, 50) > 16 * estimate_params(model.config)
    with pytest.raises(UsageError, match="max_len"):
        model(torch.ones(1, 9, dtype=torch.long), torch.zeros(1, 9, dtype=torch.long))
    with pytest.raises(UsageError, match="shape"):
        HLLM(model.config, torch.zeros(5, 16))


def test_causal_and_padding_invariant():
    model = tiny_model().eval()
    items = torch.tensor([[3, 7, 2, 9, 5, 0, 0, 0], [1, 2, 0, 0, 0, 0, 0, 0], [0] * 8])
    ts = torch.zeros_like(items)
    h = model(items, ts)
    assert torch.isfinite(h).all()  # even the all-padding row
    changed = items.clone()
    changed[0, 3] = 11
    h2 = model(changed, ts)
    torch.testing.assert_close(h2[0, :3], h[0, :3])
    assert not torch.allclose(h2[0, 3], h[0, 3])
    short = model(items[:, :5], ts[:, :5])  # less right padding
    torch.testing.assert_close(short[0, :5], h[0, :5], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(short[1, :2], h[1, :2], atol=1e-5, rtol=1e-5)


def test_gradients_reach_the_user_llm_and_adapter_not_the_frozen_table():
    model = tiny_model()
    items = torch.tensor([[1, 2, 3, 4], [5, 6, 0, 0]])
    h = model(items, torch.zeros_like(items))
    (h[:, :2] @ model.item_vectors().T).logsumexp(-1).sum().backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert all(g is not None and g.abs().sum() > 0 for n, g in grads.items()), [n for n, g in grads.items() if g is None]
    assert any(n.startswith("user_llm.layers.1.") for n in grads) and any(n.startswith("adapter.") for n in grads)
    assert not model.item_text_embeddings.requires_grad


def test_rebuilds_from_config_and_state_dict():
    model = tiny_model().eval()
    rebuilt = HLLM(HLLMConfig(**json.loads(json.dumps(model.config.__dict__))))
    rebuilt.load_state_dict(model.state_dict())
    rebuilt.eval()
    items = torch.tensor([[1, 5, 9, 0]])
    torch.testing.assert_close(rebuilt(items, items), model(items, items))
    torch.testing.assert_close(rebuilt.item_vectors(), model.item_vectors())


def test_user_llm_from_a_local_model_directory(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=24, intermediate_size=48, num_hidden_layers=1,
                                 num_attention_heads=2, max_position_embeddings=32)).save_pretrained(tmp_path / "u")
    config = HLLMConfig(n_items=10, max_len=6, item_dim=8, user_llm=str(tmp_path / "u"))
    assert config.d == 24
    model = HLLM(config, torch.randn(11, 8)).eval()
    items = torch.tensor([[1, 2, 3, 0, 0, 0]])
    h = model(items, items)
    assert h.shape == (1, 6, 24) and model.item_vectors().shape == (11, 24)
    assert estimate_params(config) == sum(p.numel() for p in model.parameters())
    changed = items.clone()
    changed[0, 2] = 7
    torch.testing.assert_close(model(changed, items)[0, :2], h[0, :2])


# ---------------------------------------------------------------------------------------------
# cold start, through the real heads, scorer and loss


def test_cold_item_gets_a_text_vector_and_ranks_for_textually_similar_users(tmp_path, minilm, monkeypatch):
    ds = make_store(tmp_path)
    monkeypatch.setattr(item_encoder, "load_encoder", lambda *a, **k: minilm)  # loaded once per module
    key, _ = item_texts_stage.embed_items(ds, "minilm", ("title",), max_text_len=32)
    table = item_texts_stage.load_item_embeddings(ds, key)
    n = table.shape[0] - 1
    con = connect(ds.store_path, read_only=True)
    seqs = con.execute("SELECT list(item_id ORDER BY pos) FROM interactions GROUP BY user_id ORDER BY user_id").fetchall()
    con.close()
    items = torch.tensor([s[0] for s in seqs])
    assert not (items == n).any()  # the cold item occurs in no training sequence

    torch.manual_seed(0)
    config = hllm_config("tiny", n, items.shape[1] - 1, item_dim=384, dropout=0.0)
    layout = build_layout((), "hierarchical")
    model = MultiHeadRecommender(HLLM(config, table), PriorHeads(config.d, layout), Scorer())
    compat = Compatibility(layout, n)
    inputs, targets = items[:, :-1], items[:, 1:].unsqueeze(-1)
    users = torch.arange(len(items))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(30):
        # the catalogue at training time has no cold item: scored and trained against items 1..n-1
        loss, _ = multihead_loss(model(inputs, inputs), model.item_vectors()[:n], model.scorer, targets,
                                 compat.targets(targets, None, users), compat.omega[:, :n])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        vecs = model.item_vectors()
        assert vecs[n].norm() > 0.1 * vecs[1:n].norm(dim=-1).mean()
        q = model.last_queries(inputs, inputs, torch.full((len(items),), inputs.shape[1]))[:, 0]
        scores = model.scorer(q, vecs)[:, 1:]  # [U, N]: item i at column i - 1
    rank = (scores > scores[:, n - 1 : n]).sum(1)  # 0 = best
    space = users % 3 == 0
    assert (rank[space] < 10).float().mean() >= 0.8, rank[space]  # in the top 10 of 31 for space users
    assert (rank[~space] >= 10).all(), rank[~space]  # and not for the others


# ---------------------------------------------------------------------------------------------
# the item LLM fine-tuned end to end (train_item_llm)

TEXTS = [*sum(THEMES.values(), []), COLD[0]]


def fine_tuned(encoder: Path, pooling: str = "mean", seed: int = 0) -> HLLM:
    """A fine-tunable HLLM over the 31 test items, every dropout off (so train mode is deterministic)."""
    torch.manual_seed(seed)
    config = hllm_config("tiny", len(TEXTS), 8, item_dim=16, item_llm=str(encoder), train_item_llm=True,
                         max_text_len=16, pooling=pooling, dropout=0.0)
    model = HLLM(config, item_texts=TEXTS)
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    return model


@pytest.mark.parametrize("pooling", ["mean", "token"])
def test_a_step_encodes_only_its_items_and_matches_the_full_reference(tiny_encoder, pooling):
    model = fine_tuned(tiny_encoder, pooling)
    assert estimate_params(model.config) == sum(p.numel() for p in model.parameters())
    assert model.item_llm.pooler is None and (pooling == "token") == hasattr(model, "item_token")
    items = torch.tensor([[1, 2, 3, 0], [5, 6, 2, 0]])
    needed = torch.tensor([0, 1, 2, 3, 5, 6, 9, 30])

    def loss_and_grads(step: bool):
        model.zero_grad()
        calls = []
        hook = model.item_llm.register_forward_hook(lambda m, a, k, out: calls.append(len(k.get("input_ids",
                                                    k.get("inputs_embeds")))), with_kwargs=True)
        with model.encoding(needed) if step else nullcontext():
            h = model(items, items)
            vecs = model.item_vectors()
        hook.remove()
        loss = (h[:, :3] @ vecs[needed[1:]].T).logsumexp(-1).sum()
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        return h.detach(), vecs.detach(), grads, calls

    h, vecs, grads, calls = loss_and_grads(step=True)
    assert calls == [7]  # the step's 7 items, once, for both the inputs and the item vectors
    assert torch.all(vecs[[4, 7, 8]] == 0) and vecs[needed[1:]].norm(dim=-1).min() > 0
    ref_h, ref_vecs, ref_grads, ref_calls = loss_and_grads(step=False)
    assert ref_calls == [5, 31]  # the reference: the batch's items, then the whole catalogue
    torch.testing.assert_close(h, ref_h)
    torch.testing.assert_close(vecs[needed], ref_vecs[needed])
    assert grads.keys() == ref_grads.keys() and any(n.startswith("item_llm.encoder.") for n in grads)
    for name, g in grads.items():
        torch.testing.assert_close(g, ref_grads[name], atol=1e-5, rtol=1e-4, msg=name)
    with pytest.raises(RuntimeError, match="not encoded"), model.encoding(torch.tensor([1, 2])):
        model(items, items)


def test_eval_encodes_the_catalogue_once_until_the_weights_change(tiny_encoder):
    model = fine_tuned(tiny_encoder)
    calls = []
    model.item_llm.register_forward_hook(lambda *a: calls.append(1))
    items = torch.tensor([[1, 2, 3, 0]])
    model.eval()
    with torch.no_grad():
        vecs, h = model.item_vectors(), model(items, items)
        again = model.item_vectors()
    assert len(calls) == 1 and torch.equal(vecs, again)  # 31 texts: one batch, reused by forward
    model.train()
    with torch.no_grad():
        model.eval()
        model.item_vectors()
    assert len(calls) == 2  # train() dropped the cache
    other = fine_tuned(tiny_encoder, seed=1).eval()
    with torch.no_grad():
        other.item_vectors()
        other.load_state_dict(model.state_dict())
        torch.testing.assert_close(other.item_vectors(), vecs)  # rebuilt from the state dict alone
        torch.testing.assert_close(other(items, items), h)


def test_fine_tuned_config_errors(tiny_encoder):
    with pytest.raises(UsageError, match="item LLM width 16 != item_dim=384"):
        HLLM(HLLMConfig(n_items=31, max_len=4, item_llm=str(tiny_encoder), train_item_llm=True))
    with pytest.raises(UsageError, match="30 item texts"):
        HLLM(HLLMConfig(n_items=31, max_len=4, item_dim=16, item_llm=str(tiny_encoder), train_item_llm=True),
             item_texts=TEXTS[:30])
    with pytest.raises(UsageError, match="pooling"):
        HLLMConfig(n_items=31, max_len=4, pooling="cls")
