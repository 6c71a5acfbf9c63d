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
               diversity = [0.25, 0.5] adds re-ranked evaluations (the accuracy-diversity frontier);
               entropy_prior = "PRIOR" names the item prior H@K, diversity and the per-category
               breakdown count over (default: the run's item prior, else one named "item");
               steer = ["PRIOR:GROUP=SHARE", ...], boost = ["PRIOR:GROUP=BETA", ...] add one
               evaluation per entry, calibrate = "PRIOR" with calibrate_lambda = [0.2, 0.5, ...] one
               per λ (the frontiers of `mhr report`)

Every step calls the library function its command calls, and logs that command (`$ mhr …`, what a
user copies to run the step alone). Each stage skips itself when its key is unchanged, so running a
recipe twice does nothing new, and a run interrupted in an earlier `mhr run` continues from its last
checkpoint. Recipes running side by side on one dataset share it: a step that needs a lock another
live process holds (the dataset's write lock, a run's lock, the store) waits for it — a "waiting
for …" line, then a new try every second, for up to `wait` seconds — instead of failing; a cached
data or priors step needs no write lock at all.
"""

from __future__ import annotations

import dataclasses
import difflib
import itertools
import shlex
import tomllib
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from rich.markup import escape

from mhr.cache import wait_while_busy, write_json
from mhr.console import err
from mhr.errors import InputError, UsageError
from mhr.options import option_flags
from mhr.workspace import Dataset, Workspace

WINDOW_KEYS = ("context", "horizon", "protocol")
DATA_COMMANDS = ("fetch", "import", "synth")
FETCH_OPTIONS = ("route", "timeout", "force", "discard_priors")  # fetch()'s keyword options
IMPORT_OPTIONS = ("dedupe", "min_history", "force", "discard_priors")  # import_data()'s, beside ImportOptions
WAIT = 1800.0  # seconds a step waits for a lock another process holds
T = TypeVar("T")


@dataclass
class RecipeResult:
    runs: list[str]
    evals: list[Path]
    report: Path | None


def load_recipe(path: Path) -> dict[str, Any]:
    """The recipe at `path`, checked whole (`check_recipe`) before any step runs."""
    try:
        recipe = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"no recipe at {path}", hint="recipes live in stages/, e.g. stages/quickstart.toml") from None
    except UnicodeDecodeError as e:
        raise InputError(f"{path}: not UTF-8 text (byte {e.start}: {e.reason})",
                         hint="save the recipe as UTF-8 (TOML files are UTF-8)") from None
    except tomllib.TOMLDecodeError as e:
        raise InputError(f"{path}: not valid TOML ({e})", hint="fix the line named above") from None
    for section in ("recipe", "windows", "variants"):
        if section not in recipe:
            raise InputError(f"{path}: missing [{section}] section", hint="see stages/quickstart.toml for the layout")
    check_recipe(path, recipe)
    return recipe


# ---------------------------------------------------------------------------------------------
# what a recipe may say: every key and its type, derived from the parameters the steps take

SECTIONS = ("recipe", "data", "priors", "windows", "train", "variants", "eval")
RECIPE_KEYS: dict[str, Any] = {"name": str, "title": str, "dataset": str, "seeds": tuple[int, ...]}
DATA_KEYS: dict[str, Any] = {"command": str, "args": tuple[Any, ...], "options": dict}
# [eval] keys that are not one EvalParams field as such (the rest are: any new field is accepted)
EVAL_LISTS: dict[str, Any] = {"fusion": tuple[str, ...], "split": tuple[str, ...], "k": tuple[int, ...],
                              "oracle_group": tuple[str, ...], "diversity": tuple[float, ...],
                              # objective sweeps: one evaluation per entry (`_objective_extras`)
                              "steer": str | tuple[str, ...], "boost": str | tuple[str, ...],
                              "calibrate": str | tuple[str, ...], "calibrate_lambda": float | tuple[float, ...]}
EVAL_NOT_KEYS = ("ks",)  # spelt `k` in a recipe


def _hint_name(hint: Any) -> str:
    if typing.get_origin(hint) is tuple:
        inner = typing.get_args(hint)[0]
        plural = {int: "integers", float: "numbers", str: "strings", bool: "true/false values"}
        return f"a list of {plural.get(inner, 'values')}" if inner in plural else f"a list of ({_hint_name(inner)})"
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join(_hint_name(a) for a in typing.get_args(hint) if a is not type(None))
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false", dict: "a table",
            Path: "a path (string)"}.get(hint, "a value")


def _fits(value: Any, hint: Any) -> bool:
    """Whether the TOML `value` is of the type `hint` (a field's annotation) as it is given."""
    import math

    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return any(_fits(value, a) for a in typing.get_args(hint) if a is not type(None))
    if typing.get_origin(hint) is tuple:
        return isinstance(value, list) and all(_fits(v, typing.get_args(hint)[0]) for v in value)
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if hint in (str, Path):
        return isinstance(value, str)
    if hint is dict:
        return isinstance(value, dict)
    return True


def _check_table(path: Path, where: str, table: Any, allowed: dict[str, Any], what: str,
                 refs: bool = False, cast: bool = False) -> None:
    """Every key of `table` is one of `allowed` (key -> type) and its value of that type (or, with
    `refs`, an "@VARIANT" reference to an earlier variant's setting; with `cast`, text that the step
    reads as the command line would, such as "a,b" for a list)."""
    if not isinstance(table, dict):
        raise InputError(f"{path}: {where} must be a table", hint=f"write it as {where} with key = value lines")
    for key, value in table.items():
        if key not in allowed:
            close = difflib.get_close_matches(key, list(allowed), n=1)
            hint = (f"did you mean {close[0]!r}? " if close else "") + f"{what}: {', '.join(sorted(allowed))}"
            raise InputError(f"{path}: {where} has no key {key!r}", hint=hint)
        if _fits(value, allowed[key]) or (refs and isinstance(value, str) and value.startswith("@")):
            continue
        if not (cast and _castable(value, allowed[key])):
            raise InputError(f"{path}: {where} {key} = {value!r} is not {_hint_name(allowed[key])}",
                             hint=f"write {key} as {_hint_name(allowed[key])}")


def check_recipe(path: Path, recipe: dict[str, Any]) -> None:
    """Refuse, before anything runs, a recipe that would run something else than it says: an unknown
    section or key (with the nearest known one), a value of the wrong type, an empty seed or variant
    list, a baseline naming no variant. The keys come from the parameters each step takes."""
    unknown = sorted(set(recipe) - set(SECTIONS))
    if unknown:
        raise InputError(f"{path}: unknown section [{unknown[0]}]", hint=f"sections: {', '.join(SECTIONS)}")
    _check_table(path, "[recipe]", recipe["recipe"], RECIPE_KEYS, "[recipe] keys")
    if "dataset" not in recipe["recipe"]:
        raise InputError(f"{path}: [recipe] names no dataset", hint='add dataset = "NAME"')
    if "seeds" in recipe["recipe"] and not recipe["recipe"]["seeds"]:
        raise InputError(f"{path}: [recipe] seeds is empty", hint="list at least one seed, e.g. seeds = [0]")
    _check_data(path, recipe.get("data"))
    _check_priors(path, recipe.get("priors", []))
    _check_table(path, "[windows]", recipe["windows"], _windows_keys(), "mhr windows build options")
    train_keys = _train_keys()
    _check_table(path, "[train]", recipe.get("train", {}), train_keys, "TrainParams fields and windows keys")
    variants = recipe["variants"]
    if not isinstance(variants, dict):
        raise InputError(f"{path}: [variants] must hold [variants.NAME] tables", hint="e.g. [variants.base]")
    said = [f"[{s}]" for s in ("train", "eval") if s in recipe]
    if not variants and said:  # an empty [variants] alone is a data-and-priors recipe
        raise InputError(f"{path}: [variants] lists no variant, so the {' and '.join(said)} of this recipe "
                         "would never run", hint="add one, e.g. [variants.base] with priors = []")
    for name, overrides in variants.items():
        overrides = dict(overrides) if isinstance(overrides, dict) else overrides
        grid = overrides.pop("grid", {}) if isinstance(overrides, dict) else {}
        _check_table(path, f"[variants.{name}]", overrides, train_keys, "TrainParams fields and windows keys",
                     refs=True)
        lists = {k: tuple[v, ...] for k, v in train_keys.items()}
        _check_table(path, f"[variants.{name}.grid]", grid, lists, "lists of TrainParams values")
        empty = [k for k, v in grid.items() if not v]
        if empty:
            raise InputError(f"{path}: [variants.{name}.grid] {empty[0]} is an empty list",
                             hint="list the values to try, e.g. interests = [1, 2, 4]")
    _check_eval(path, recipe.get("eval", {}), variants)


def _castable(value: Any, hint: Any) -> bool:
    """Whether the step's `_cast` reads `value` as `hint` (text "a,b" as a list, "5" as a number)."""
    if isinstance(value, dict):
        return False
    try:
        _cast(value, hint)
    except (ValueError, TypeError):
        return False
    return True


def _check_data(path: Path, data: Any) -> None:
    if data is None:
        return
    _check_table(path, "[data]", data, DATA_KEYS, "[data] keys")
    command = data.get("command", "fetch")
    if command not in DATA_COMMANDS:
        raise InputError(f"{path}: [data] command {command!r} is not fetch, import or synth",
                         hint='command = "fetch", "import" or "synth"')
    options = data.get("options", {})
    names = _data_options(command)
    unknown = sorted(set(options) - set(names))
    if unknown:
        close = difflib.get_close_matches(unknown[0], names, n=1)
        raise InputError(f"{path}: [data] options has no key {unknown[0]!r} for mhr data {command}",
                         hint=(f"did you mean {close[0]!r}? " if close else "") + f"its options: {', '.join(names)}")


def _data_options(command: str) -> list[str]:
    """The option names each data command's library function takes (what `options = {…}` may hold)."""
    if command == "fetch":
        return list(FETCH_OPTIONS)
    if command == "import":
        from mhr.data.imports import ImportOptions

        return sorted([f.name for f in dataclasses.fields(ImportOptions)] + ["format", *IMPORT_OPTIONS])
    from mhr.data.synth import synth_store

    return sorted(n for n in typing.get_type_hints(synth_store) if n not in ("dataset", "return"))


def _check_priors(path: Path, priors: Any) -> None:
    from mhr.priors.build import FLAG_FIELDS
    from mhr.priors.kinds import KINDS

    if not isinstance(priors, list):
        raise InputError(f"{path}: priors must be [[priors]] tables", hint='write [[priors]] then kind = "item"')
    for i, prior in enumerate(priors, 1):
        where = f"[[priors]] #{i}"
        kind = prior.get("kind") if isinstance(prior, dict) else None
        if kind not in KINDS:
            raise InputError(f"{path}: {where} kind = {kind!r} is not a prior kind",
                             hint=f"kind = one of {', '.join(KINDS)}")
        cls = KINDS[kind].params
        hints = typing.get_type_hints(cls)
        flags = {v: k for k, v in FLAG_FIELDS.items()}
        allowed = {flags.get(f.name, f.name): hints[f.name] for f in dataclasses.fields(cls)}
        allowed |= {"kind": str, "name": str, "force": bool}
        _check_table(path, where, prior, allowed, f"options of kind {kind}", cast=True)


def _windows_keys() -> dict[str, Any]:
    from mhr.windows import WindowsParams

    hints = typing.get_type_hints(WindowsParams)
    return {f.name: hints[f.name] for f in dataclasses.fields(WindowsParams)}


def _train_keys() -> dict[str, Any]:
    """TrainParams fields (seed excepted: [recipe] seeds sets it) and the windows keys a variant may change."""
    from mhr.training.params import TrainParams

    hints = typing.get_type_hints(TrainParams)
    keys = {f.name: hints[f.name] for f in dataclasses.fields(TrainParams) if f.name != "seed"}
    windows = _windows_keys()
    return keys | {k: windows[k] for k in WINDOW_KEYS}


def _eval_keys() -> dict[str, Any]:
    """EvalParams fields (a field added to EvalParams is a recipe key at once), with the ones a recipe
    lists (several fusions, splits, diversities, oracle groups: one evaluation each) as lists."""
    from mhr.ranking.evaluate import EvalParams

    hints = typing.get_type_hints(EvalParams)
    keys = {f.name: hints[f.name] for f in dataclasses.fields(EvalParams) if f.name not in EVAL_NOT_KEYS}
    return keys | EVAL_LISTS


def _check_eval(path: Path, cfg: Any, variants: dict[str, Any]) -> None:
    cfg = dict(cfg) if isinstance(cfg, dict) else cfg
    for key in ("fusion", "split"):  # one value or a list
        if isinstance(cfg, dict) and isinstance(cfg.get(key), str):
            cfg[key] = [cfg[key]]
    _check_table(path, "[eval]", cfg, _eval_keys(), "EvalParams fields")
    for key in ("fusion", "split", "k"):
        if key in cfg and not cfg[key]:
            raise InputError(f"{path}: [eval] {key} is an empty list", hint=f"list at least one {key}, or leave it out")
    baseline = cfg.get("baseline")
    if baseline is not None and baseline not in variants:
        raise InputError(f"{path}: [eval] baseline = {baseline!r} names no variant",
                         hint=f"name one of: {', '.join(variants)}")


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


def _step(command: list[str], call: Callable[[], T], wait: float) -> T:
    """Log the command a user would type for this step, then do it (waiting out other writers)."""
    err.print(f"[dim]$ mhr {escape(shlex.join(command))}[/]", soft_wrap=True)  # one line, to copy whole
    return wait_while_busy(call, wait)


# ---------------------------------------------------------------------------------------------
# recipe values → library arguments


def _split_args(args: list[str]) -> tuple[list[str], dict[str, Any]]:
    """A command's words as (positional, options): `--x-y V` → x_y = V, a lone `--x` → x = True."""
    positional: list[str] = []
    options: dict[str, Any] = {}
    i = 0
    while i < len(args):
        word = args[i]
        if word.startswith("--"):
            key = word[2:].replace("-", "_")
            if i + 1 < len(args) and not args[i + 1].startswith("--"):
                options[key], i = args[i + 1], i + 2
                continue
            options[key] = True
        else:
            positional.append(word)
        i += 1
    return positional, options


def _cast(value: Any, hint: Any) -> Any:
    """A recipe value (a TOML value, or text from `args`) as the type `hint` a library function takes,
    the way the command line reads it: lists from comma-separated text, numbers from text."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):  # X | None
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    if value is None:
        return None
    if typing.get_origin(hint) is tuple:
        items = value if isinstance(value, list | tuple) else [v.strip() for v in str(value).split(",") if v.strip()]
        return tuple(_cast(v, typing.get_args(hint)[0]) for v in items)
    if hint is bool:
        return value if isinstance(value, bool) else str(value).lower() in ("1", "true", "yes")
    if hint in (int, float, str, Path):
        return hint(value)
    return value


def _typed(target: Any, options: dict[str, Any], names: typing.Iterable[str], what: str,
           strict: bool = True) -> dict[str, Any]:
    """`options` cast to the parameter types of `target` (a function or a dataclass), for the
    parameters `names`; another name is an InputError (or, not `strict`, passed on as it is)."""
    hints, names = typing.get_type_hints(target), set(names)
    unknown = sorted(set(options) - names)
    if unknown and strict:
        raise InputError(f"{what} has no option {', '.join('--' + k.replace('_', '-') for k in unknown)}",
                         hint=f"its options: {', '.join(sorted(names))}")
    return {k: _cast(v, hints[k]) if k in names else v for k, v in options.items()}


def _fetch(ds: Dataset, positional: list[str], options: dict[str, Any]) -> Any:
    from mhr.data.fetch import fetch

    kw = _typed(fetch, options, FETCH_OPTIONS, "mhr data fetch")
    return fetch(ds, *positional[:1], **kw)


def _import(ds: Dataset, positional: list[str], options: dict[str, Any]) -> Any:
    from mhr.data.imports import ImportOptions, import_data

    options = dict(options)
    fmt = options.pop("format", None)
    if not positional or fmt is None:
        raise InputError("a recipe's [data] import needs the input path in args and options = { format = … }",
                         hint='e.g. args = ["events.csv"], options = { format = "long" }')
    fields = [f.name for f in dataclasses.fields(ImportOptions)]
    opts = ImportOptions(**_typed(ImportOptions, {k: v for k, v in options.items() if k in fields}, fields, ""))
    kw = _typed(import_data, {k: v for k, v in options.items() if k not in fields},
                IMPORT_OPTIONS, "mhr data import")
    return import_data(ds, Path(positional[0]), str(fmt), opts, **kw)


def _synth(ds: Dataset, positional: list[str], options: dict[str, Any]) -> Any:
    from mhr.data.synth import synth_store

    names = [n for n in typing.get_type_hints(synth_store) if n not in ("dataset", "return")]
    return synth_store(ds, **_typed(synth_store, options, names, "mhr data synth"))


_DATA: dict[str, Callable[[Dataset, list[str], dict[str, Any]], Any]] = {
    "fetch": _fetch, "import": _import, "synth": _synth}


# ---------------------------------------------------------------------------------------------
# the steps


def _data_step(path: Path, workspace: Workspace, dataset_name: str, data: dict[str, Any], wait: float) -> None:
    """`mhr data fetch|import|synth …` into the recipe's dataset."""
    from mhr.data.show import log_result

    command = data.get("command", "fetch")
    if command not in DATA_COMMANDS:
        raise InputError(f"{path}: [data] command {command!r} is not fetch, import or synth")
    args = [str(a) for a in data.get("args", [])]
    if command == "import":  # paths in a recipe are relative to the recipe file
        args = [str((path.parent / a).resolve()) if (path.parent / a).exists() else a for a in args]
    options = dict(data.get("options", {}))
    positional, given = _split_args(args)
    ds = workspace.dataset(dataset_name)
    result = _step(["data", command, *args, "--name", dataset_name, *_flags(options)],
                   lambda: _DATA[command](ds, positional, {**given, **options}), wait)
    log_result(result)


def _prior_step(dataset: Dataset, prior: dict[str, Any], wait: float) -> None:
    """`mhr priors build --kind KIND …` (the command logged is generated from the parameters)."""
    from mhr.priors.build import FLAG_FIELDS, build_prior, log_result, make_params
    from mhr.priors.kinds import KINDS

    prior = dict(prior)
    kind = prior.pop("kind")
    name, force = prior.pop("name", None), bool(prior.pop("force", False))
    options = {FLAG_FIELDS.get(k, k): v for k, v in prior.items()}
    if kind in KINDS:  # an unknown kind, or an option of another kind: make_params says which
        cls = KINDS[kind].params
        options = _typed(cls, options, [f.name for f in dataclasses.fields(cls)], "", strict=False)
    params = make_params(kind, options)
    command = ["priors", "build", "--kind", kind, *(["--name", name] if name else []), *(["--force"] if force else []),
               *option_flags(params)]
    result = _step(command, lambda: build_prior(dataset, kind, params, name=name, force=force), wait)
    log_result(result)


def _windows_step(dataset: Dataset, settings: dict[str, Any], wait: float) -> str:
    """`mhr windows build …`; returns the windows' key."""
    from mhr.windows import WindowsParams, build_windows, log_build

    params = WindowsParams(**_typed(WindowsParams, settings, [f.name for f in dataclasses.fields(WindowsParams)],
                                    "mhr windows build"))
    key, _, cached = _step(["windows", "build", *option_flags(params)],
                           lambda: build_windows(dataset, **dataclasses.asdict(params)), wait)
    log_build(dataset, key, cached)
    return key


def _train_step(dataset: Dataset, params: Any, windows: str, run_name: str, device: str, force: bool,
                wait: float) -> Any:
    """`mhr train …` (an interrupted run continues from its checkpoint, as `--resume` would)."""
    from mhr.training.train import train

    extra = (["--device", device] if device != "cpu" else []) + (["--force"] if force else [])
    command = ["train", *option_flags(params), "--windows", f"windows:{windows[:12]}", "--name", run_name, *extra]
    result = _step(command, lambda: train(dataset, params, windows=windows, name=run_name, device=device,
                                          force=force, resume=not force), wait)
    err.print(f"{'cached' if result.cached else 'trained'}: {run_name} "
              f"(valid NDCG@10 {result.best.get('valid_ndcg@10', float('nan')):.4f})")
    return result


def _eval_step(dataset: Dataset, run_name: str, params: Any, device: str, force: bool, wait: float) -> Path:
    """`mhr eval RUN …`."""
    from mhr.ranking.evaluate import evaluate

    command = eval_command(run_name, params)
    command += (["--device", device] if device != "cpu" else []) + (["--force"] if force else [])
    out, _, _ = _step(command, lambda: evaluate(dataset, run_name, params, force=force, device=device), wait)
    return out


def eval_command(run_name: str, params: Any) -> list[str]:
    """`mhr eval RUN …` for `params` (an `EvalParams`): the flags of the fields that differ from their default."""
    from mhr.ranking.evaluate import EvalParams

    command = ["eval", run_name]
    for f in dataclasses.fields(EvalParams):
        value = getattr(params, f.name)
        if value == f.default:
            continue
        flag = "--k" if f.name == "ks" else "--" + f.name.replace("_", "-")
        if f.metadata.get("multiple"):  # a repeatable flag: --steer A --steer B
            command += [part for v in value for part in (flag, v)]
        elif isinstance(value, bool):
            command.append(flag)
        else:
            command += [flag, ",".join(map(str, value)) if isinstance(value, tuple) else str(value)]
    return command


def _report_step(dataset: Dataset, runs: list[str], out: Path, split: str, fusion: str, title: str,
                 wait: float) -> Path:
    """`mhr report RUN… --out DIR …`."""
    from mhr.report import build_report

    command = ["report", *runs, "--out", str(out), "--split", split, "--fusion", fusion, "--title", title]
    return _step(command, lambda: build_report(dataset, runs, out, split=split, fusion=fusion, title=title), wait)


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
               seeds: list[int] | None = None, device: str = "cpu", wait: float = WAIT) -> RecipeResult:
    recipe = load_recipe(path)
    meta = recipe["recipe"]
    name = meta.get("name", path.stem)
    dataset_name = meta["dataset"]
    seeds = seeds or list(meta.get("seeds", [0]))

    if recipe.get("data"):
        _data_step(path, workspace, dataset_name, recipe["data"], wait)
    dataset = workspace.dataset(dataset_name).require()
    for prior in recipe.get("priors", []):
        _prior_step(dataset, prior, wait)
    variants = _chosen_variants(path, recipe["variants"], only)
    run_names, chosen = _train_variants(path, recipe, name, dataset, variants, seeds, device, force, wait)
    evals = _evaluate_runs(recipe, dataset, run_names, chosen, device, force, wait)
    report = None
    if run_names:
        splits = _as_list(recipe.get("eval", {}).get("split", "test"))
        fusions = _as_list(recipe.get("eval", {}).get("fusion", ["max"]))
        report = _report_step(dataset, list(run_names.values()), dataset.reports_dir / name, splits[-1], fusions[0],
                              meta.get("title", name), wait)
    return RecipeResult(list(run_names.values()), evals, report)


def _as_list(value: Any) -> list:
    return [value] if isinstance(value, str) else list(value)


def _chosen_variants(path: Path, variants: dict[str, dict[str, Any]], only: list[str] | None) -> dict:
    if not only:
        return variants
    unknown = set(only) - set(variants)
    if unknown:
        raise UsageError(f"no variants {sorted(unknown)} in {path}", hint=f"choose from {', '.join(variants)}")
    return {k: v for k, v in variants.items() if k in only}


def _train_variants(path: Path, recipe: dict[str, Any], name: str, dataset: Dataset, variants: dict[str, Any],
                    seeds: list[int], device: str, force: bool, wait: float
                    ) -> tuple[dict[tuple[str, int], str], dict[str, dict[str, Any]]]:
    """Every variant × seed (grids selected on validation first); returns the run names by
    (variant, seed) and each variant's settings after selection."""
    from mhr.training.params import TrainParams

    base_windows = dict(recipe["windows"])
    windows_keys: dict[tuple, str] = {}

    def windows_for(overrides: dict[str, Any]) -> str:
        wp = {**base_windows, **{k: overrides[k] for k in WINDOW_KEYS if k in overrides}}
        key = tuple(sorted(wp.items()))
        if key not in windows_keys:
            windows_keys[key] = _windows_step(dataset, wp, wait)
        return windows_keys[key]

    train_fields = {f.name for f in dataclasses.fields(TrainParams)}
    defaults = dict(recipe.get("train", {}))

    def run_one(merged: dict[str, Any], seed: int, run_name: str):
        values = {k: v for k, v in merged.items() if k in train_fields}
        values["priors"] = tuple(values.get("priors", ()))
        values["seed"] = seed
        return _train_step(dataset, TrainParams(**values), windows_for(merged), run_name, device, force, wait)

    run_names: dict[tuple[str, int], str] = {}
    chosen: dict[str, dict[str, Any]] = {}  # variant -> its settings after grid selection
    selections: dict[str, Any] = {}
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
                return run_one(m, seeds[0], f"{name}-{v}-{t}-s{seeds[0]}")

            merged, tag, selections[variant] = _select_on_validation(path, variant, merged, grid, run_point)
        chosen[variant] = merged
        for seed in seeds:
            run_name = f"{name}-{variant}-{tag}-s{seed}" if tag else f"{name}-{variant}-s{seed}"
            run_one(merged, seed, run_name)
            run_names[(variant, seed)] = run_name
    if selections:
        out_dir = dataset.reports_dir / name
        out_dir.mkdir(parents=True, exist_ok=True)
        write_json(out_dir / "selection.json", selections, indent=2)
    return run_names, chosen


def _objective_extras(eval_cfg: dict[str, Any]) -> list[dict[str, Any]]:
    """[eval] steer = ["P:G=s", …] and boost = ["P:G=β", …]: one evaluation per entry; calibrate = "P"
    (or a list) with calibrate_lambda = [λ, …]: one per prior and λ (the sweep `mhr report` plots)."""
    out: list[dict[str, Any]] = [{"steer": (t,)} for t in _as_list(eval_cfg.get("steer", []))]
    out += [{"boost": (t,)} for t in _as_list(eval_cfg.get("boost", []))]
    lams = eval_cfg.get("calibrate_lambda", [0.5])
    for prior in _as_list(eval_cfg.get("calibrate", [])):
        out += [{"calibrate": prior, "calibrate_lambda": float(lam)} for lam in (lams if isinstance(lams, list) else [lams])]
    return out


def _evaluate_runs(recipe: dict[str, Any], dataset: Dataset, run_names: dict[tuple[str, int], str],
                   chosen: dict[str, dict[str, Any]], device: str, force: bool, wait: float) -> list[Path]:
    """Every run × split × fusion (+ the oracle and diversity extras the [eval] section asks for)."""
    from mhr.ranking.evaluate import EvalParams

    eval_cfg = dict(recipe.get("eval", {}))
    fusions = _as_list(eval_cfg.pop("fusion", ["max"]))
    baseline_variant = eval_cfg.pop("baseline", None)
    splits = _as_list(eval_cfg.pop("split", "test"))
    ks = tuple(eval_cfg.pop("k", (5, 10, 50, 200)))
    fields = [f.name for f in dataclasses.fields(EvalParams)]
    # every other EvalParams field as given (`_eval_keys`: a new field needs no change here)
    common = _typed(EvalParams, {k: v for k, v in eval_cfg.items() if k in fields and k not in EVAL_LISTS},
                    fields, "[eval]")
    evals = []
    for (variant, seed), run_name in run_names.items():
        baseline = None
        if baseline_variant and baseline_variant != variant and (baseline_variant, seed) in run_names:
            baseline = run_names[(baseline_variant, seed)]
        routed = bool(chosen[variant].get("router"))
        extras = [{}] + [{"oracle_group": g} for g in eval_cfg.get("oracle_group", [])] + [
            {"diversity": float(lam)} for lam in eval_cfg.get("diversity", []) if lam] + _objective_extras(eval_cfg)
        for split in splits:
            for fusion in fusions:
                if fusion == "router" and not routed:
                    continue  # routed fusion needs a run trained with a router
                for extra in extras:
                    params = EvalParams(**{**common, "fusion": fusion, "split": split, "ks": ks,
                                           "baseline": None if extra else baseline, **extra})
                    evals.append(_eval_step(dataset, run_name, params, device, force, wait))
    return evals
