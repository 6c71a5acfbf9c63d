"""`mhr run stages/<recipe>.toml`: a whole experiment, every stage cached.

A recipe is a TOML file:

    [recipe]   name, dataset, seeds = [0, 1, 2]
    [data]     command = "fetch" | "import" | "synth", args = [...], options = {...}
    [[priors]] kind = "item", name = "item", ...any `mhr priors build` option...
    [windows]  context = 50, horizon = 8, protocol = "paper"
    [train]    defaults for every variant (any `TrainParams` field)
    [variants.NAME]  overrides per variant (TrainParams fields; `context`/`horizon` pick other windows)
    [variants.NAME.grid]  optional: lists of values, e.g. interests = [1, 2, 4, 8]; every combination
                     is trained with the first seed and the one with the best *validation* NDCG@10
                     is kept and trained with every seed (never selected on the test split). A
                     setting "@OTHER" takes the value selected for an earlier variant OTHER.
    [eval]     fusion = ["max"], split = "test", baseline = "VARIANT", horizons = [...], k = [...]
               fusion "router" is evaluated only for variants trained with `router = true`;
               oracle_group = ["PRIOR"] adds the labelled group-oracle evaluation of every run;
               diversity = [0.25, 0.5] adds re-ranked evaluations (the accuracy-diversity frontier)

Data, priors and windows run through the same command-line interface a user types (so a recipe is
exactly a script of documented commands); training, evaluation and the report call the library.
Each stage skips itself when its key is unchanged, so running a recipe twice does nothing new, and a
run interrupted in an earlier `mhr run` continues from its last checkpoint.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import json
import tomllib
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from mhr.console import err
from mhr.errors import InputError, UsageError
from mhr.workspace import Workspace

WINDOW_KEYS = ("context", "horizon", "protocol")


@dataclass
class RecipeResult:
    runs: list[str]
    evals: list[Path]
    report: Path | None


def load_recipe(path: Path) -> dict[str, Any]:
    try:
        recipe = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise InputError(f"no recipe at {path}", hint="recipes live in stages/, e.g. stages/quickstart.toml") from None
    except tomllib.TOMLDecodeError as e:
        raise InputError(f"{path}: not valid TOML ({e})", hint="fix the line named above") from None
    for section in ("recipe", "windows", "variants"):
        if section not in recipe:
            raise InputError(f"{path}: missing [{section}] section", hint="see stages/quickstart.toml for the layout")
    return recipe


def _flags(options: dict[str, Any]) -> list[str]:
    """{'min_size': 5, 'force': True, 'cols': ['a', 'b']} -> ['--min-size', '5', '--force', '--cols', 'a,b']."""
    out: list[str] = []
    for key, value in options.items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            out.append(flag)
        elif value is False or value is None:
            continue
        elif isinstance(value, list):
            out += [flag, ",".join(str(v) for v in value)]
        else:
            out += [flag, str(value)]
    return out


def _cli(workspace: Workspace, dataset: str, args: list[str]) -> str:
    """Run one `mhr` command in-process; returns what it printed on stdout (its reference)."""
    from mhr.cli import app

    buf = io.StringIO()
    full = ["--workspace", str(workspace.root), "--dataset", dataset, *args]
    err.print(f"[dim]$ mhr {' '.join(args)}[/]")
    with contextlib.redirect_stdout(buf):
        app(args=full, prog_name="mhr", standalone_mode=False)
    return buf.getvalue().strip()


def _resolve_refs(path: Path, variant: str, merged: dict[str, Any], chosen: dict[str, dict[str, Any]]) -> dict:
    """Replace "@OTHER" settings by the value selected for the earlier variant OTHER."""
    out = dict(merged)
    for key, value in merged.items():
        if isinstance(value, str) and value.startswith("@"):
            other = value[1:]
            if other not in chosen or key not in chosen[other]:
                raise InputError(f"{path}: variant {variant!r} setting {key} = {value!r} names no earlier "
                                 f"variant with that setting", hint="list the referenced variant first")
            out[key] = chosen[other][key]
    return out


def _grid_tag(point: dict[str, Any]) -> str:
    return "_".join(f"{k}{v}" for k, v in point.items()).replace("-", "m")


def _select_on_validation(path: Path, variant: str, merged: dict[str, Any], grid: dict[str, Any], run):
    """Train every grid point (first seed) and keep the best validation NDCG@10.
    Returns (settings with the chosen point, its tag, the record of every point)."""
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise InputError(f"{path}: [variants.{variant}.grid] {key} must be a non-empty list")
    points = [dict(zip(grid, combo, strict=True)) for combo in itertools.product(*grid.values())]
    scored = []
    for point in points:
        result = run({**merged, **point}, _grid_tag(point))
        scored.append({"settings": point, "valid_ndcg@10": result.best.get("valid_ndcg@10", float("nan"))})
    best = max(scored, key=lambda r: r["valid_ndcg@10"])
    err.print(f"selected on validation for {variant}: {best['settings']} "
              f"(valid NDCG@10 {best['valid_ndcg@10']:.4f} among {len(points)} settings)")
    record = {"grid": grid, "points": scored, "selected": best["settings"], "criterion": "valid_ndcg@10"}
    return {**merged, **best["settings"]}, _grid_tag(best["settings"]), record


def run_recipe(path: Path, workspace: Workspace, force: bool = False, only: list[str] | None = None,
               seeds: list[int] | None = None, device: str = "cpu") -> RecipeResult:
    from mhr.ranking.evaluate import EvalParams, evaluate
    from mhr.report import build_report
    from mhr.train import TrainParams, train

    recipe = load_recipe(path)
    meta = recipe["recipe"]
    name = meta.get("name", path.stem)
    dataset_name = meta["dataset"]
    seeds = seeds or list(meta.get("seeds", [0]))

    data = recipe.get("data")
    if data:
        command = data.get("command", "fetch")
        if command not in ("fetch", "import", "synth"):
            raise InputError(f"{path}: [data] command {command!r} is not fetch, import or synth")
        args = [str(a) for a in data.get("args", [])]
        if command == "import":  # paths in a recipe are relative to the recipe file
            args = [str((path.parent / a).resolve()) if (path.parent / a).exists() else a for a in args]
        _cli(workspace, dataset_name, ["data", command, *args, "--name", dataset_name,
                                       *_flags(data.get("options", {}))])
    for prior in recipe.get("priors", []):
        prior = dict(prior)
        kind = prior.pop("kind")
        _cli(workspace, dataset_name, ["priors", "build", "--kind", kind, *_flags(prior)])

    dataset = workspace.dataset(dataset_name).require()
    base_windows = dict(recipe["windows"])
    windows_refs: dict[tuple, str] = {}

    def windows_for(overrides: dict[str, Any]) -> str:
        wp = {**base_windows, **{k: overrides[k] for k in WINDOW_KEYS if k in overrides}}
        key = tuple(sorted(wp.items()))
        if key not in windows_refs:
            ref = _cli(workspace, dataset_name, ["windows", "build", *_flags(wp)])
            windows_refs[key] = ref.split(":", 1)[-1]
        return windows_refs[key]

    train_fields = {f.name for f in fields(TrainParams)}
    defaults = dict(recipe.get("train", {}))
    variants: dict[str, dict[str, Any]] = recipe["variants"]
    if only:
        unknown = set(only) - set(variants)
        if unknown:
            raise UsageError(f"no variants {sorted(unknown)} in {path}", hint=f"choose from {', '.join(variants)}")
        variants = {k: v for k, v in variants.items() if k in only}
    eval_cfg = dict(recipe.get("eval", {}))
    fusions = eval_cfg.pop("fusion", ["max"])
    fusions = [fusions] if isinstance(fusions, str) else list(fusions)
    baseline_variant = eval_cfg.pop("baseline", None)
    splits = eval_cfg.pop("split", "test")
    splits = [splits] if isinstance(splits, str) else list(splits)

    run_names: dict[tuple[str, int], str] = {}
    chosen: dict[str, dict[str, Any]] = {}  # variant -> its settings after grid selection
    selections: dict[str, Any] = {}

    def run_one(variant: str, merged: dict[str, Any], seed: int, run_name: str):
        values = {k: v for k, v in merged.items() if k in train_fields}
        values["priors"] = tuple(values.get("priors", ()))
        values["seed"] = seed
        # resume=True: a run interrupted in an earlier `mhr run` continues from its checkpoint
        result = train(dataset, TrainParams(**values), windows=windows_for(merged), name=run_name,
                       device=device, force=force, resume=not force)
        err.print(f"{'cached' if result.cached else 'trained'}: {run_name} "
                  f"(valid NDCG@10 {result.best.get('valid_ndcg@10', float('nan')):.4f})")
        return result

    for variant, overrides in variants.items():
        overrides = dict(overrides)
        grid = overrides.pop("grid", {})
        merged = _resolve_refs(path, variant, {**defaults, **overrides}, chosen)
        unknown = (set(merged) | set(grid)) - train_fields - set(WINDOW_KEYS)
        if unknown:
            raise InputError(f"{path}: variant {variant!r} has unknown settings {sorted(unknown)}",
                             hint=f"train settings are: {', '.join(sorted(train_fields))}")
        tag = ""
        if grid:
            def run_point(m: dict[str, Any], t: str, v: str = variant):
                return run_one(v, m, seeds[0], f"{name}-{v}-{t}-s{seeds[0]}")

            merged, tag, selections[variant] = _select_on_validation(path, variant, merged, grid, run_point)
        chosen[variant] = merged
        for seed in seeds:
            run_name = f"{name}-{variant}-{tag}-s{seed}" if tag else f"{name}-{variant}-s{seed}"
            run_one(variant, merged, seed, run_name)
            run_names[(variant, seed)] = run_name
    if selections:
        out_dir = dataset.reports_dir / name
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "selection.json").write_text(json.dumps(selections, indent=2))

    evals = []
    for (variant, seed), run_name in run_names.items():
        baseline = None
        if baseline_variant and baseline_variant != variant and (baseline_variant, seed) in run_names:
            baseline = run_names[(baseline_variant, seed)]
        routed = bool(chosen[variant].get("router"))
        extras = [{}] + [{"oracle_group": g} for g in eval_cfg.get("oracle_group", [])] + [
            {"diversity": float(lam)} for lam in eval_cfg.get("diversity", []) if lam]
        for split in splits:
            for fusion in fusions:
                if fusion == "router" and not routed:
                    continue  # routed fusion needs a run trained with a router
                for extra in extras:
                    params = EvalParams(
                        fusion=fusion, split=split, baseline=None if extra else baseline,
                        ks=tuple(eval_cfg.get("k", (5, 10, 50, 200))),
                        horizons=tuple(eval_cfg.get("horizons", ())), **extra,
                    )
                    out, _, cached = evaluate(dataset, run_name, params, force=force, device=device)
                    evals.append(out)
    report = None
    if run_names:
        report = build_report(dataset, list(run_names.values()), dataset.reports_dir / name,
                              split=splits[-1], fusion=fusions[0], title=meta.get("title", name))
    return RecipeResult(list(run_names.values()), evals, report)
