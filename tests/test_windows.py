"""Windows: the split (docs/ARCHITECTURE.md, "Windows") on hand-checked users, against a loop
reference, cache and CLI."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import mhr.windows as mw
from mhr.errors import NotFoundError, StaleError, UsageError
from mhr.store import connect, new_store, set_meta
from mhr.windows import build_windows, horizon_targets, load_windows
from mhr.workspace import Workspace

EVENTS = ("view", "buy", None, "like")


def make_store(root, name="t", lengths=(12, 5, 6, 0, 20), seed=None, data="d1", n_items=40, events=EVENTS):
    """Users 1..len(lengths); user u's interaction at pos p: item (u*7 + p) % n_items + 1 (or random
    with `seed`), ts 1000*u + 10*p, event EVENTS[(u + p) % 4] (None = NULL)."""
    ds = Workspace(root).dataset(name)
    rng = np.random.default_rng(seed) if seed is not None else None
    users = np.arange(1, len(lengths) + 1)
    user = np.repeat(users, lengths).astype(np.int32)
    pos = np.concatenate([np.arange(n) for n in lengths]).astype(np.int32) if sum(lengths) else user
    if rng is not None:
        item = rng.integers(1, n_items + 1, len(user)).astype(np.int32)
    else:
        item = ((user * 7 + pos) % n_items + 1).astype(np.int32)
    inter = pa.table({"user_id": user, "item_id": item, "ts": (1000 * user + 10 * pos).astype(np.int64),
                      "event": pa.array([events[k % len(events)] for k in (user + pos) % 4], pa.string()), "pos": pos})
    ids = pa.table({"i": np.arange(1, n_items + 1, dtype=np.int32)})
    with new_store(ds.store_path) as con:
        con.register("ids", ids)
        con.register("inter", inter)
        con.execute("INSERT INTO items SELECT i, 'i' || i, 'Item ' || i, '', [], '{}' FROM ids")
        con.execute(f"INSERT INTO users SELECT u, 'u' || u, '{{}}' FROM range(1, {len(lengths) + 1}) r(u)")
        con.execute("INSERT INTO interactions SELECT user_id, item_id, ts, event, pos FROM inter")
        set_meta(con, data_key=data, source="tests", has_timestamps=True, name=name)
    return ds


def sequences(ds):
    con = connect(ds.store_path, read_only=True)
    try:
        rows = con.execute("SELECT user_id, item_id, ts, event FROM interactions ORDER BY user_id, pos").fetchall()
    finally:
        con.close()
    out: dict[int, list] = {}
    for u, i, t, e in rows:
        out.setdefault(u, []).append((i, t, e))
    return out


def reference_split(seqs, T, tau, H=None):
    """Loop reference: windows stepping back by T from the end of the training period until one
    reaches its start; valid/test rows of the last ≤ T interactions before the H (default τ) targets."""
    H = tau if H is None else H
    train, valid, test, short = [], [], [], 0
    for u in sorted(seqs):
        seq = seqs[u]
        m = len(seq) - 2 * H
        if m < 2:
            short += 1
            continue
        windows, e = [], m
        while True:
            s = max(0, e - T - tau)
            windows.append((u, seq[s:e]))
            if s == 0:
                break
            e -= T
        train += windows[::-1]
        for c, rows in ((m, valid), (m + H, test)):
            rows.append((u, seq[max(0, c - T):c], seq[c:c + H], seq[:c]))
    return train, valid, test, short


def check_against_reference(ds, wref):
    T, tau = wref.params["context"], wref.params["horizon"]
    vocab = wref.event_vocab
    code = {e: i for i, e in enumerate(vocab)}
    train, valid, test, short = reference_split(sequences(ds), T, tau, wref.holdout)
    assert wref.stats["n_users_too_short"] == short
    tr = wref.read_split("train")
    assert len(tr["user"]) == len(train) == wref.stats["n_train_windows"]
    for r, (u, seq) in enumerate(train):
        n = len(seq)
        assert tr["user"][r] == u and tr["length"][r] == n
        assert tr["items"][r, :n].tolist() == [x[0] for x in seq] and not tr["items"][r, n:].any()
        assert tr["ts"][r, :n].tolist() == [x[1] for x in seq]
        assert tr["events"][r, :n].tolist() == [code[x[2]] for x in seq]
    for name, rows in (("valid", valid), ("test", test)):
        sp = wref.read_split(name)
        assert len(sp["user"]) == len(rows)
        for r, (u, inp, tgt, hist) in enumerate(rows):
            n = len(inp)
            assert sp["user"][r] == u and sp["length"][r] == n
            assert sp["items"][r, :n].tolist() == [x[0] for x in inp] and not sp["items"][r, n:].any()
            assert sp["ts"][r, :n].tolist() == [x[1] for x in inp]
            assert sp["events"][r, :n].tolist() == [code[x[2]] for x in inp]
            assert sp["targets"][r].tolist() == [x[0] for x in tgt]
            assert sp["target_ts"][r].tolist() == [x[1] for x in tgt]
            assert sp["target_events"][r].tolist() == [code[x[2]] for x in tgt]
            got = sp["history_items"][sp["history_ptr"][r]:sp["history_ptr"][r + 1]]
            assert got.tolist() == [x[0] for x in hist]


def test_hand_checked_split(workspace):
    ds = make_store(workspace)
    key, path, cached = build_windows(ds, context=3, horizon=2)
    assert not cached and path == ds.windows_dir / key[:12]
    w = load_windows(ds)
    assert w.key == key and w.params == {"context": 3, "horizon": 2, "protocol": "paper", "format": 1}
    assert w.event_vocab == [None, "buy", "like", "view"]
    assert json.loads((path / "events.json").read_text()) == w.event_vocab
    # user 1: items at pos p are 8 + p; n = 12 → m = 8, windows [3, 8) and [0, 5) (overlap τ = 2)
    tr = w.read_split("train")
    u1 = tr["user"] == 1
    assert tr["items"][u1].tolist() == [[8, 9, 10, 11, 12], [11, 12, 13, 14, 15]]
    assert tr["items"].shape == (len(tr["user"]), 5) and tr["items"].dtype == np.int64
    assert tr["ts"][u1][1].tolist() == [1030, 1040, 1050, 1060, 1070]
    # events of user 1 at pos p: EVENTS[(1 + p) % 4] -> buy, NULL, like, view, buy …
    assert tr["events"][u1][0].tolist() == [1, 0, 2, 3, 1] and tr["events"].dtype == np.int16
    # user 3 has exactly 2τ + 2 = 6: one window of the 2 training items
    u3 = tr["user"] == 3
    assert tr["items"][u3].tolist() == [[22, 23, 0, 0, 0]] and tr["length"][u3].tolist() == [2]
    # user 5: n = 20, m = 16: windows end at 16, 13, 10, 7, 4 (the last starts at 0)
    assert tr["length"][tr["user"] == 5].tolist() == [4, 5, 5, 5, 5]
    assert tr["user"].tolist() == [1, 1, 3, 5, 5, 5, 5, 5]

    va, te = w.read_split("valid"), w.read_split("test")
    assert va["user"].tolist() == te["user"].tolist() == [1, 3, 5]
    assert va["items"][0].tolist() == [13, 14, 15] and va["targets"][0].tolist() == [16, 17]
    assert va["history_items"][va["history_ptr"][0]:va["history_ptr"][1]].tolist() == list(range(8, 16))
    assert te["items"][0].tolist() == [15, 16, 17] and te["targets"][0].tolist() == [18, 19]
    assert te["history_items"][te["history_ptr"][0]:te["history_ptr"][1]].tolist() == list(range(8, 18))
    assert te["target_ts"][0].tolist() == [1100, 1110]
    # user 3: valid context is only the 2 training items, right-padded
    assert va["items"][1].tolist() == [22, 23, 0] and va["length"][1] == 2
    assert te["items"][1].tolist() == [23, 24, 25] and te["targets"][1].tolist() == [26, 27]
    assert va["history_ptr"].tolist() == [0, 8, 10, 26] and va["history_items"].dtype == np.int64

    s = w.stats
    assert (s["n_users_train"], s["n_users_valid"], s["n_users_test"]) == (3, 3, 3)
    assert s["n_users_too_short"] == 1 and s["n_users_without_interactions"] == 1
    assert s["n_train_windows"] == 8 and s["max_item_id"] == 40 and s["n_store_users"] == 5
    # input positions per window: min(T, len - 1) → 3 per full window, 1 for user 3, 3 for user 5's [0, 4)
    assert s["n_train_positions"] == 2 * 3 + 1 + 5 * 3
    check_against_reference(ds, w)


def test_loo_protocol(workspace):
    ds = make_store(workspace)
    build_windows(ds, context=3, protocol="loo")
    w = load_windows(ds)
    assert w.params["horizon"] == 1 and w.params["protocol"] == "loo"
    assert w.stats["min_interactions"] == 4 and w.stats["n_users_too_short"] == 0
    va, te = w.read_split("valid"), w.read_split("test")
    assert va["user"].tolist() == [1, 2, 3, 5]
    assert va["targets"][0].tolist() == [18] and te["targets"][0].tolist() == [19]
    assert te["items"][0].tolist() == [16, 17, 18]
    tr = w.read_split("train")
    assert tr["items"][tr["user"] == 1].tolist() == [[8, 9, 10, 11], [11, 12, 13, 14], [14, 15, 16, 17]]
    check_against_reference(ds, w)
    with pytest.raises(UsageError, match="leave-one-out"):
        build_windows(ds, context=3, horizon=8, protocol="loo")
    with pytest.raises(UsageError, match="unknown protocol"):
        build_windows(ds, protocol="kfold")


@pytest.mark.parametrize(("T", "tau", "H"), [(1, 1, None), (4, 2, None), (5, 3, None), (2, 5, None),
                                             (4, 2, 5), (3, 1, 2)])
def test_random_store_matches_loop_reference(workspace, T, tau, H):
    ds = make_store(workspace, lengths=[int(n) for n in np.random.default_rng(T * 10 + tau).integers(0, 30, 25)],
                    seed=T + tau)
    build_windows(ds, context=T, horizon=tau, holdout=H)
    w = load_windows(ds)
    assert w.holdout == (H or tau) and w.stats["holdout"] == (H or tau)
    check_against_reference(ds, w)


def test_holdout_targets_and_training_windows(workspace):
    """--holdout H: valid/test targets are the H before the last H and the last H; the training
    windows keep horizon τ and never reach the last 2H interactions of any user."""
    ds = make_store(workspace, lengths=(12, 7, 8, 0, 20, 31), n_items=1000)  # items unique per user
    key, _, _ = build_windows(ds, context=3, horizon=2, holdout=3)
    w = load_windows(ds)
    assert w.params == {"context": 3, "horizon": 2, "holdout": 3, "protocol": "paper", "format": 1}
    assert w.stats["min_interactions"] == 8 and w.stats["n_users_too_short"] == 1  # user 2 (7 < 2H + 2)
    va, te = w.read_split("valid"), w.read_split("test")
    assert va["user"].tolist() == te["user"].tolist() == [1, 3, 5, 6]
    assert va["targets"].shape == te["targets"].shape == (4, 3)
    # user 1: item at pos p is 8 + p, n = 12 → m = 6: valid targets pos 6..8, test pos 9..11
    assert va["targets"][0].tolist() == [14, 15, 16] and te["targets"][0].tolist() == [17, 18, 19]
    assert va["items"][0].tolist() == [11, 12, 13] and te["items"][0].tolist() == [14, 15, 16]
    assert te["history_items"][te["history_ptr"][0]:te["history_ptr"][1]].tolist() == list(range(8, 17))
    tr = w.read_split("train")
    assert tr["items"].shape[1] == 3 + 2  # windows of T + τ, not T + H
    assert tr["items"][tr["user"] == 1].tolist() == [[8, 9, 10, 0, 0], [9, 10, 11, 12, 13]]
    seqs = sequences(ds)
    for u in np.unique(tr["user"]):
        held = {x[0] for x in seqs[u][-6:]}  # the last 2H
        seen = set(tr["items"][tr["user"] == u].ravel().tolist()) - {0}
        assert seen and not seen & held
        assert seen == {x[0] for x in seqs[u][:-6]}  # and the whole training period is used
    check_against_reference(ds, w)
    # H = τ is the plain split: same parameters, same key as without --holdout
    assert mw.window_params(3, 2, holdout=2) == mw.window_params(3, 2) == \
        {"context": 3, "horizon": 2, "protocol": "paper", "format": 1}
    k_plain, _, _ = build_windows(ds, context=3, horizon=2)
    assert build_windows(ds, context=3, horizon=2, holdout=2)[:1] == (k_plain,) and k_plain != key
    assert load_windows(ds, k_plain).holdout == 2


def test_holdout_errors(workspace, cli):
    ds = make_store(workspace)
    with pytest.raises(UsageError, match="shorter than the training horizon"):
        build_windows(ds, context=3, horizon=4, holdout=2)
    with pytest.raises(UsageError, match="loo holds out one"):
        build_windows(ds, context=3, protocol="loo", holdout=4)
    assert mw.window_params(3, protocol="loo", holdout=1)["horizon"] == 1
    with pytest.raises(Exception, match="--holdout 12 .2H targets"):
        build_windows(ds, context=3, horizon=2, holdout=12)
    bad = cli("--dataset", "t", "windows", "build", "--horizon", "4", "--holdout", "2", workspace=workspace,
              check=False)
    assert bad.returncode == 2 and not bad.stdout
    assert "--holdout 2 is shorter than the training horizon τ = 4" in bad.stderr
    assert len([line for line in bad.stderr.splitlines() if line.startswith("error")]) == 1
    out = cli("--dataset", "t", "windows", "build", "--context", "3", "--horizon", "1", "--holdout", "2",
              workspace=workspace)
    assert out.stdout.startswith("windows:") and "τ = 1, H = 2" in " ".join(out.stderr.split())


def test_windows_overlap_and_every_training_position_is_an_input(workspace):
    ds = make_store(workspace, lengths=(37, 50, 9), n_items=1000)  # items unique within a user
    T, tau = 6, 3
    build_windows(ds, context=T, horizon=tau)
    tr = load_windows(ds).read_split("train")
    seqs = sequences(ds)
    for u in (1, 2, 3):
        pos_of = {x[0]: p for p, x in enumerate(seqs[u])}
        m = len(seqs[u]) - 2 * tau
        rows = np.flatnonzero(tr["user"] == u)
        spans = [(pos_of[tr["items"][r, 0]], pos_of[tr["items"][r, 0]] + tr["length"][r]) for r in rows]
        assert spans[0][0] == 0 and spans[-1][1] == m  # from the start to the end of the training period
        assert all(2 <= e - s <= T + tau for s, e in spans)
        for (_, e1), (s2, e2) in zip(spans, spans[1:], strict=False):
            assert e2 - e1 == T and e1 - s2 == tau  # stepping back by T, overlapping by τ
        inputs = set()
        for s, e in spans:
            inputs |= set(range(s, s + min(T, e - s - 1)))
        assert set(range(m - tau)) <= inputs <= set(range(m - 1))


def test_horizon_targets_matches_loop():
    rng = np.random.default_rng(0)
    items = rng.integers(1, 50, (6, 9))
    for r, n in enumerate((9, 5, 1, 0, 7, 3)):
        items[r, n:] = 0
    for tau in (1, 3, 12):
        got = horizon_targets(items, tau)
        want = np.zeros((6, 9, tau), dtype=items.dtype)
        for w in range(6):
            for t in range(9):
                for j in range(tau):
                    if t + 1 + j < 9:
                        want[w, t, j] = items[w, t + 1 + j]
        assert got.shape == (6, 9, tau) and np.array_equal(got, want) and got.dtype == items.dtype
    ev = horizon_targets(items.astype(np.int16), 2)
    assert ev.dtype == np.int16 and np.array_equal(ev, horizon_targets(items, 2))


def test_parquet_is_byte_identical_and_row_groups_fixed(workspace, monkeypatch):
    monkeypatch.setattr(mw, "ROW_GROUP", 50)
    monkeypatch.setattr(mw, "_BATCH", 37)
    ds = make_store(workspace, lengths=[int(n) for n in np.random.default_rng(1).integers(5, 60, 60)], seed=1)
    key, path, _ = build_windows(ds, context=4, horizon=2)
    files = json.loads((path / "manifest.json").read_text())["files"]
    key2, _, cached = build_windows(ds, context=4, horizon=2, force=True)
    assert key2 == key and not cached
    again = json.loads((path / "manifest.json").read_text())["files"]
    assert {n: f["sha256"] for n, f in files.items()} == {n: f["sha256"] for n, f in again.items()}
    meta = pq.ParquetFile(path / "train.parquet").metadata
    sizes = [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]
    assert len(sizes) > 2 and set(sizes[:-1]) == {50} and 0 < sizes[-1] <= 50
    check_against_reference(ds, load_windows(ds))


def test_cache_keys_and_stale_windows(workspace):
    ds = make_store(workspace)
    k1, p1, c1 = build_windows(ds, context=3, horizon=2)
    mtime = (p1 / "train.parquet").stat().st_mtime_ns
    k1b, _, cached = build_windows(ds, context=3, horizon=2)
    assert cached and k1b == k1 and (p1 / "train.parquet").stat().st_mtime_ns == mtime
    k2, _, _ = build_windows(ds, context=4, horizon=2)
    k3, _, _ = build_windows(ds, context=3, protocol="loo")
    assert len({k1, k2, k3}) == 3
    assert load_windows(ds).key == k3  # latest
    assert load_windows(ds, f"windows:{k1[:12]}").key == k1 and load_windows(ds, k2[:8]).key == k2
    with pytest.raises(NotFoundError, match="no windows"):
        load_windows(ds, "windows:ffffffffffff")

    # a damaged file is never read as valid, and a rebuild repairs it
    with open(p1 / "test.parquet", "r+b") as f:
        f.seek(10)
        f.write(b"\x00\x01\x02")
    with pytest.raises(Exception, match="damaged"):
        load_windows(ds, k1)
    assert not build_windows(ds, context=3, horizon=2)[2]

    # the dataset changes: the same parameters give a new key, old windows are stale
    make_store(workspace, data="d2")
    with pytest.raises(StaleError, match="another version"):
        load_windows(ds, k1)
    with pytest.raises(StaleError, match="mhr windows build"):
        load_windows(ds)
    k4, _, cached = build_windows(ds, context=3, horizon=2)
    assert not cached and k4 != k1 and load_windows(ds).key == k4
    con = connect(ds.store_path, read_only=True)
    runs = con.execute("SELECT stage, key FROM stage_runs").fetchall()
    con.close()
    assert runs == [("windows", k4)]


def test_null_events_only(workspace, monkeypatch):
    ds = make_store(workspace, lengths=(8, 9), events=(None,))
    build_windows(ds, context=3, horizon=2)
    w = load_windows(ds)
    assert w.event_vocab == [None] and w.stats["n_events"] == 0
    assert not w.read_split("train")["events"].any() and not w.read_split("test")["target_events"].any()


def test_errors(workspace):
    ds = make_store(workspace)
    with pytest.raises(NotFoundError, match="mhr windows build"):
        load_windows(ds)
    with pytest.raises(UsageError):
        build_windows(ds, context=0)
    with pytest.raises(Exception, match="interactions the paper protocol needs"):
        build_windows(ds, horizon=20)


def test_cli_build_and_show(workspace, cli):
    make_store(workspace, name="t")
    out = cli("--dataset", "t", "windows", "build", "--context", "3", "--horizon", "2", workspace=workspace)
    ref = out.stdout.strip()
    assert ref.startswith("windows:") and len(ref) == len("windows:") + 12 and out.stdout.count("\n") == 1
    assert "too short" in out.stderr and "1 users have fewer than 6" in out.stderr
    again = cli("--dataset", "t", "windows", "build", "--context", "3", "--horizon", "2", workspace=workspace)
    assert again.stdout.strip() == ref and "cached" in again.stderr
    shown = json.loads(cli("--dataset", "t", "windows", "show", ref, "--json", workspace=workspace).stdout)
    assert shown["reference"] == ref and shown["current"] and shown["stats"]["n_train_windows"] == 8
    assert cli("windows", "show", workspace=workspace).stdout.strip() == ref  # the only dataset, latest
    bad = cli("windows", "build", "--protocol", "loo", "--horizon", "3", workspace=workspace, check=False)
    assert bad.returncode == 2 and "leave-one-out" in bad.stderr and not bad.stdout
