"""Every committed recipe in stages/ parses, and each variant (and [train]) names only settings
`mhr run` knows — caught here instead of hours into a run (a TOML key like `gamma-0.9` written
without quotes is a nested table, not a variant)."""

from dataclasses import fields
from pathlib import Path

import pytest

from mhr.recipe import WINDOW_KEYS, load_recipe
from mhr.training.params import TrainParams

STAGES = sorted((Path(__file__).resolve().parents[1] / "stages").glob("*.toml"))
KNOWN = {f.name for f in fields(TrainParams)} | set(WINDOW_KEYS)


def test_there_are_recipes():
    assert len(STAGES) >= 10


@pytest.mark.parametrize("path", STAGES, ids=lambda p: p.stem)
def test_recipe_settings_are_known(path):
    recipe = load_recipe(path)
    assert set(recipe.get("train", {})) <= KNOWN, set(recipe["train"]) - KNOWN
    for name, variant in recipe["variants"].items():
        grid = variant.get("grid", {})
        unknown = (set(variant) - {"grid"} | set(grid)) - KNOWN
        assert not unknown, f"[variants.{name}] has unknown settings {sorted(unknown)}"
        assert all(not isinstance(v, dict) for k, v in variant.items() if k != "grid"), name
    assert path.read_text().startswith(f"# mhr run stages/{path.name}")


def test_eval_section_reaches_every_evaluation(monkeypatch):
    """[eval]'s settings reach each evaluation a recipe runs: routed fusion only for router runs,
    the oracle and diversity extras for every run, entropy_prior everywhere."""
    from mhr import recipe

    seen = []
    monkeypatch.setattr(recipe, "_eval_step", lambda ds, run, params, *rest: seen.append((run, params)) or Path(run))
    cfg = {"eval": {"fusion": ["max", "router"], "entropy_prior": "attr", "oracle_group": ["attr"],
                    "diversity": [0.0, 0.5], "k": [10]}}
    recipe._evaluate_runs(cfg, None, {("base", 0): "b", ("r", 0): "r"}, {"base": {}, "r": {"router": True}},
                          "cpu", False, 0.0)
    assert all(p.entropy_prior == "attr" and p.ks == (10,) for _, p in seen)
    assert sorted((run, p.fusion) for run, p in seen if not p.oracle_group and not p.diversity) == [
        ("b", "max"), ("r", "max"), ("r", "router")]
    assert sum(1 for _, p in seen if p.oracle_group == "attr") == 3
    assert sum(1 for _, p in seen if p.diversity == 0.5) == 3
    assert len(seen) == 9
