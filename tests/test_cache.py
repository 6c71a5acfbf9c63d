from pathlib import Path

import pytest

from mhr.cache import build_artifact, is_done, read_manifest, stage_key


def test_key_is_canonical_and_sensitive():
    a = stage_key("windows", {"T": 50, "tau": 8}, {"data": "k1"})
    assert a == stage_key("windows", {"tau": 8, "T": 50}, {"data": "k1"})
    assert a != stage_key("windows", {"T": 50, "tau": 4}, {"data": "k1"})
    assert a != stage_key("windows", {"T": 50, "tau": 8}, {"data": "k2"})
    assert a != stage_key("train", {"T": 50, "tau": 8}, {"data": "k1"})


def test_build_then_cached_then_force(tmp_path: Path):
    calls = []

    def build(d: Path):
        calls.append(d)
        (d / "x.txt").write_text("hello")

    final = tmp_path / "art"
    key, cached = build_artifact(final, "s", {"p": 1}, {}, build)
    assert not cached and is_done(final, key) and len(calls) == 1
    key2, cached = build_artifact(final, "s", {"p": 1}, {}, build)
    assert cached and key2 == key and len(calls) == 1
    _, cached = build_artifact(final, "s", {"p": 1}, {}, build, force=True)
    assert not cached and len(calls) == 2
    key3, cached = build_artifact(final, "s", {"p": 2}, {}, build)
    assert not cached and key3 != key


def test_crash_mid_write_leaves_previous_artifact_and_nothing_that_validates(tmp_path: Path):
    final = tmp_path / "art"
    key, _ = build_artifact(final, "s", {"p": 1}, {}, lambda d: (d / "x.txt").write_text("v1"))

    def crash(d: Path):
        (d / "x.txt").write_text("half")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        build_artifact(final, "s", {"p": 2}, {}, crash)
    assert (final / "x.txt").read_text() == "v1" and is_done(final, key)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    key2, cached = build_artifact(final, "s", {"p": 2}, {}, lambda d: (d / "x.txt").write_text("v2"))
    assert not cached and is_done(final, key2)


def test_corrupt_file_invalidates(tmp_path: Path):
    final = tmp_path / "art"
    key, _ = build_artifact(final, "s", {}, {}, lambda d: (d / "x.txt").write_text("abc"))
    (final / "x.txt").write_text("abd")
    assert read_manifest(final) is None and not is_done(final, key)
    (final / "manifest.json").write_text("{not json")
    assert read_manifest(final) is None
