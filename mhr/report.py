"""`mhr report`: comparison tables (mean ± 95% CI over seeds) and PNG plots for a set of runs.

Runs are grouped by everything but the seed; each group's metrics come from the runs' evaluation
JSONs with the requested split and fusion. Plots: validation NDCG@10 over training (paper Fig. 2),
the comparison bars (Fig. 6 style), per-user-group bars (Fig. 3), scaling with context length and
size when the runs vary them (Fig. 4), and a 2-D projection of one user's history, targets and top
items coloured by the winning head.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mhr.cache import check_output, write_json
from mhr.errors import NotFoundError
from mhr.ranking.metrics import mean_ci
from mhr.report_html import write_html
from mhr.workspace import Dataset

HEADLINE = ("ndcg@10", "recall@10", "ndcg@50", "recall@50")
OBJECTIVES = ("steer", "boost", "calibrate")  # decoding-time objectives (`mhr.ranking.objectives`)
RERANKED = ("diversity", *OBJECTIVES)  # evaluations of a changed ranking: never the variant's headline


@dataclass
class RunGroup:
    label: str
    params: dict[str, Any]
    runs: list[str] = field(default_factory=list)
    evals: list[dict[str, Any]] = field(default_factory=list)
    logs: list[list[dict[str, Any]]] = field(default_factory=list)


def _group_label(params: dict[str, Any], varying: set[str]) -> str:
    """"temporal+item", "comirec interests=32 beta=1": a baseline decoder names itself first, then
    the settings that differ between groups (only those this group has)."""
    parts = []
    if params.get("decoder"):
        parts.append(params["decoder"])
    elif "priors" in varying or "decoder" in varying:
        parts.append("+".join(params.get("priors") or ()) or "base")
    for k in sorted(varying - {"priors", "decoder"}):
        if params.get(k) is not None:
            parts.append(f"{k}={params[k]}")
    return " ".join(parts) or "runs"


def _find_eval(run_dir: Path, split: str, fusion: str) -> dict[str, Any] | None:
    best = None
    for path in sorted((run_dir / "eval").glob("*.json"), key=lambda p: p.stat().st_mtime):
        try:
            data = json.loads(path.read_text())
        except ValueError:
            continue
        p = data.get("params", {})
        if data.get("split") == split and p.get("fusion") == fusion and not data.get("oracle") \
                and not any(p.get(k) for k in RERANKED):
            best = data
    return best


def _evals(run_dir: Path, split: str) -> list[dict[str, Any]]:
    out = []
    for path in sorted((run_dir / "eval").glob("*.json")):
        try:
            data = json.loads(path.read_text())
        except ValueError:
            continue
        if data.get("split") == split and "metrics" in data:
            out.append(data)
    return out


def frontier_points(dataset: Dataset, groups: list[RunGroup], split: str = "test") -> dict[str, list[tuple]]:
    """The accuracy-diversity frontier: per run group and fusion, (λ, NDCG@10, H@10) averaged over
    the group's seeds for every re-ranking strength λ evaluated (λ = 0: the plain ranking). Oracle
    evaluations are left out."""
    curves: dict[str, list[tuple]] = {}
    for g in groups:
        acc: dict[tuple[str, float], dict[str, tuple[float, float]]] = {}
        for run in g.runs:
            for ev in _evals(dataset.runs_dir / run, split):
                p = ev.get("params", {})
                ndcg, ent = _metric(ev, "ndcg@10"), _metric(ev, "H@10")
                if ev.get("oracle") or ndcg is None or ent is None or any(p.get(k) for k in OBJECTIVES):
                    continue
                # one point per run (evaluations differing only in, e.g., cut-offs agree here)
                acc.setdefault((p.get("fusion", "max"), float(p.get("diversity", 0.0))), {})[run] = (ndcg, ent)
        for (fusion, lam), by_run in sorted(acc.items()):
            vals = list(by_run.values())
            if len(vals) == len(g.runs):
                label = g.label if fusion == "max" else f"{g.label} · {fusion}"
                curves.setdefault(label, []).append(
                    (lam, float(np.mean([v[0] for v in vals])), float(np.mean([v[1] for v in vals]))))
    return {k: v for k, v in curves.items() if len(v) > 1}


def objective_points(dataset: Dataset, groups: list[RunGroup], split: str = "test"
                     ) -> dict[str, dict[str, list[tuple]]]:
    """NDCG@10 against each objective's own metric along its sweep, averaged over a group's seeds:
    {"steer" | "boost" | "calibrate": {curve: [(setting, NDCG@10, metric)]}} — steer: the group's share
    of the top 10 per target share; boost: its share per β; calibrate: C_KL@10 per λ. One curve per
    variant (and fusion) and steered/boosted group or calibrated prior; evaluations without objectives
    are left out (their metric is not the objective's)."""
    out: dict[str, dict[str, list[tuple]]] = {o: {} for o in OBJECTIVES}
    for g in groups:
        acc: dict[tuple, dict[str, tuple[float, float]]] = {}
        for run in g.runs:
            for ev in _evals(dataset.runs_dir / run, split):
                p, ndcg = ev.get("params", {}), _metric(ev, "ndcg@10")
                if ev.get("oracle") or ndcg is None or p.get("diversity"):
                    continue
                for kind, key, setting, x in _objective_cells(ev, p):
                    acc.setdefault((kind, p.get("fusion", "max"), key, setting), {})[run] = (ndcg, x)
        for (kind, fusion, key, setting), by_run in sorted(acc.items()):
            if len(by_run) == len(g.runs):
                label = (g.label if fusion == "max" else f"{g.label} · {fusion}") + f" · {key}"
                vals = list(by_run.values())
                out[kind].setdefault(label, []).append(
                    (setting, float(np.mean([v[0] for v in vals])), float(np.mean([v[1] for v in vals]))))
    return {o: {k: v for k, v in c.items() if len(v) > 1} for o, c in out.items() if any(len(v) > 1 for v in c.values())}


def _objective_cells(ev: dict[str, Any], p: dict[str, Any]) -> list[tuple[str, str, float, float]]:
    """(objective, curve key, setting, metric at 10) of one evaluation with one objective."""
    cells = []
    for kind in ("steer", "boost"):
        for text, at in (ev.get(kind) or {}).items() if len(p.get(kind) or []) == 1 else ():
            if "@10" in at:
                key, value = text.rsplit("=", 1)
                cells.append((kind, key, float(value), at["@10"]["share"]))
    if p.get("calibrate") and not p.get("steer") and (ev.get("c_kl") or {}).get("@10") is not None:
        cells.append(("calibrate", p["calibrate"], float(p.get("calibrate_lambda", 0.5)), ev["c_kl"]["@10"]))
    return cells if len(cells) == 1 else []


def plot_objectives(curves: dict[str, dict[str, list[tuple]]], path: Path) -> bool:
    """One panel per objective: NDCG@10 against its metric along the sweep, one curve per variant."""
    if not curves:
        return False
    plt = _plt()
    fig, axes = plt.subplots(1, len(curves), figsize=(6 * len(curves), 4.5), squeeze=False)
    xlabel = {"steer": "group's share of the top 10 (labels: target share)",
              "boost": "group's share of the top 10 (labels: β)", "calibrate": "C_KL@10 (labels: λ)"}
    for ax, (kind, by_label) in zip(axes[0], curves.items(), strict=True):
        for label, pts in by_label.items():
            pts = sorted(pts)
            ax.plot([q[2] for q in pts], [100 * q[1] for q in pts], marker="o", label=label)
            for setting, ndcg, x in pts:
                ax.annotate(f"{setting:g}", (x, 100 * ndcg), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set_xlabel(xlabel[kind])
        ax.set_ylabel("NDCG@10 (%)")
        ax.set_title(f"What --{kind} costs")
        ax.legend(fontsize=7)
    _save(fig, path)
    return True


def _save(fig, path: Path) -> None:
    """Write a figure as the report's PNGs are written, and free it."""
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    _plt().close(fig)


def plot_frontier(curves: dict[str, list[tuple]], path: Path) -> bool:
    """NDCG@10 against H@10 along the re-ranking strength, one curve per variant."""
    if not curves:
        return False
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for label, pts in curves.items():
        pts = sorted(pts)
        ax.plot([p[2] for p in pts], [100 * p[1] for p in pts], marker="o", label=label)
        for lam, ndcg, ent in pts:
            ax.annotate(f"{lam:g}", (ent, 100 * ndcg), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("category entropy H@10 (nats)")
    ax.set_ylabel("NDCG@10 (%)")
    ax.set_title("Accuracy-diversity frontier (labels: re-ranking λ)")
    ax.legend(fontsize=7)
    _save(fig, path)
    return True


def collect(dataset: Dataset, runs: list[str], split: str = "test", fusion: str = "max") -> list[RunGroup]:
    records = []
    for name in runs:
        run_dir = dataset.runs_dir / name
        if not (run_dir / "config.json").is_file():
            raise NotFoundError(f"no run {name!r} in {dataset.runs_dir}", hint="see `mhr status`")
        config = json.loads((run_dir / "config.json").read_text())
        ev = _find_eval(run_dir, split, fusion)
        if ev is None:
            raise NotFoundError(
                f"run {name!r} has no {split} evaluation with fusion {fusion}",
                hint=f"run `mhr eval {name} --split {split} --fusion {fusion}` first",
            )
        log = [json.loads(ln) for ln in (run_dir / "log.jsonl").read_text().splitlines() if ln]
        params = {k: v for k, v in config["params"].items() if k != "seed"}
        params["context"] = config["windows"]["params"].get("context")
        records.append((name, params, ev, log))
    # a setting varies when the runs that have it disagree (decoder-only settings are absent elsewhere)
    varying = {
        k for k in {k for _, p, _, _ in records for k in p}
        if len({json.dumps(p[k], sort_keys=True) for _, p, _, _ in records if k in p}) > 1
    }
    if len({p.get("decoder") for _, p, _, _ in records}) > 1:
        varying.add("decoder")
    groups: dict[str, RunGroup] = {}
    for name, params, ev, log in records:
        label = _group_label(params, varying)
        g = groups.setdefault(label, RunGroup(label, params))
        g.runs.append(name)
        g.evals.append(ev)
        g.logs.append(log)
    return list(groups.values())


def _metric(ev: dict[str, Any], name: str) -> float | None:
    h = ev["horizons"][-1]
    if name.startswith("H@"):
        return ev.get("entropy", {}).get(name)
    return ev["metrics"].get(f"{name}/h{h}")


def comparison_table(groups: list[RunGroup]) -> list[dict[str, Any]]:
    rows = []
    metrics = list(HEADLINE) + ["H@10"]
    for g in groups:
        row: dict[str, Any] = {"variant": g.label, "seeds": len(g.runs), "runs": g.runs}
        for m in metrics:
            vals = [v for v in (_metric(ev, m) for ev in g.evals) if v is not None]
            if vals:
                mean, half = mean_ci(np.array(vals))
                # one seed has no interval: report 0 half-width and say so through `seeds`
                half = float(half) if len(vals) > 1 and np.isfinite(half) else 0.0
                row[m] = {"mean": float(mean), "ci95": half, "values": vals}
        rows.append(row)
    return rows


def table_markdown(rows: list[dict[str, Any]]) -> str:
    metrics = [m for m in (*HEADLINE, "H@10") if any(m in r for r in rows)]
    head = "| variant | seeds | " + " | ".join(metrics) + " |"
    lines = [head, "|" + "---|" * (len(metrics) + 2)]
    for r in rows:
        cells = []
        for m in metrics:
            if m not in r:
                cells.append("—")
            elif r["seeds"] < 2:
                scale = 1 if m.startswith("H@") else 100
                cells.append(f"{scale * r[m]['mean']:.{3 if scale == 1 else 2}f}")
            elif m.startswith("H@"):
                cells.append(f"{r[m]['mean']:.3f} ± {r[m]['ci95']:.3f}")
            else:
                cells.append(f"{100 * r[m]['mean']:.2f} ± {100 * r[m]['ci95']:.2f}")
        lines.append(f"| {r['variant']} | {r['seeds']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_training(groups: list[RunGroup], path: Path) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4))
    for g in groups:
        for i, log in enumerate(g.logs):
            pts = [(e["step"], e["valid_ndcg@10"]) for e in log if "valid_ndcg@10" in e]
            if pts:
                x, y = zip(*pts, strict=True)
                ax.plot(x, np.array(y) * 100, label=g.label if i == 0 else None,
                        color=f"C{groups.index(g)}", alpha=0.8)
    ax.set_xlabel("training step")
    ax.set_ylabel("validation NDCG@10 (%)")
    ax.set_title("Validation NDCG@10 during training")
    ax.legend(fontsize=8)
    _save(fig, path)


def plot_bars(rows: list[dict[str, Any]], metric: str, path: Path, title: str) -> bool:
    rows = [r for r in rows if metric in r]
    if not rows:
        return False
    plt = _plt()
    fig, ax = plt.subplots(figsize=(max(5, 1.2 * len(rows)), 4))
    scale = 1 if metric.startswith("H@") else 100
    means = [r[metric]["mean"] * scale for r in rows]
    cis = [r[metric]["ci95"] * scale for r in rows]
    ax.bar(range(len(rows)), means, yerr=cis, capsize=4, color=[f"C{i}" for i in range(len(rows))])
    ax.set_xticks(range(len(rows)), [r["variant"] for r in rows], rotation=20, ha="right", fontsize=8)
    ax.set_ylabel(metric + ("" if scale == 1 else " (%)"))
    lo = min(m - c for m, c in zip(means, cis, strict=True))
    hi = max(m + c for m, c in zip(means, cis, strict=True))
    pad = max(1e-6, 0.15 * (hi - lo))
    ax.set_ylim(max(0, lo - pad * 3), hi + pad)
    ax.set_title(title)
    _save(fig, path)
    return True


def plot_user_groups(groups: list[RunGroup], path: Path) -> bool:
    per: dict[str, dict[str, list[float]]] = {}
    prior_name = None
    for g in groups:
        for ev in g.evals:
            for prior, gm in ev.get("user_groups", {}).items():
                prior_name = prior_name or prior
                if prior != prior_name:
                    continue
                for gname, m in gm.items():
                    val = next((v for k, v in m.items() if k.startswith("ndcg@10/")), None)
                    if val is not None:
                        per.setdefault(g.label, {}).setdefault(gname, []).append(val)
    if not per:
        return False
    plt = _plt()
    names = sorted({n for d in per.values() for n in d})
    fig, ax = plt.subplots(figsize=(max(6, len(names) * 0.9), 4))
    width = 0.8 / len(per)
    for i, (label, d) in enumerate(per.items()):
        vals = [100 * float(np.mean(d.get(n, [np.nan]))) for n in names]
        ax.bar(np.arange(len(names)) + i * width, vals, width, label=label)
    ax.set_xticks(np.arange(len(names)) + 0.4 - width / 2, names, rotation=20, ha="right", fontsize=8)
    ax.set_ylabel("NDCG@10 (%)")
    ax.set_title(f"NDCG@10 per user group ({prior_name})")
    ax.legend(fontsize=8)
    _save(fig, path)
    return True


def plot_projection(dataset: Dataset, run_name: str, path: Path, user: str | None = None) -> bool:
    """PCA of item vectors: one user's history, targets and top items coloured by winning head."""
    import torch

    from mhr.ranking.recommend import recommend
    from mhr.store import connect
    from mhr.training.runs import load_run

    run = load_run(dataset, run_name)
    con = connect(dataset.store_path, read_only=True)
    try:
        if user is None:
            user = con.execute(
                "SELECT u.raw_id FROM users u JOIN interactions x USING (user_id) GROUP BY u.user_id, u.raw_id "
                "ORDER BY count(*) DESC, u.user_id LIMIT 1").fetchone()[0]
        uid = con.execute("SELECT user_id FROM users WHERE raw_id = ?", [user]).fetchone()[0]
        hist = con.execute("SELECT item_id FROM interactions WHERE user_id = ? ORDER BY pos", [uid]).fetchnumpy()
    finally:
        con.close()
    tau = int(run.windows.params["horizon"])
    items = hist["item_id"].astype(np.int64)
    past, targets = items[:-tau], items[-tau:]
    recs, _ = recommend(run, dataset, user, top=20)
    with torch.no_grad():
        vecs = torch.nn.functional.normalize(run.model.item_vectors().float(), dim=-1).numpy()
    centred = vecs[1:] - vecs[1:].mean(0)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    xy = (vecs - vecs[1:].mean(0)) @ vt[:2].T
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 6))
    ax.scatter(xy[1:, 0], xy[1:, 1], s=2, c="lightgrey", label="catalogue")
    ax.scatter(xy[past, 0], xy[past, 1], s=12, c="black", marker="x", label="history")
    ax.scatter(xy[targets, 0], xy[targets, 1], s=60, facecolors="none", edgecolors="red", label="last τ items")
    heads = sorted({r.head or "fused" for r in recs})
    for i, h in enumerate(heads):
        pts = [r.item_id for r in recs if (r.head or "fused") == h]
        ax.scatter(xy[pts, 0], xy[pts, 1], s=30, color=f"C{i}", label=f"top-20 via {h}")
    ax.set_title(f"{run_name}: user {user} (PCA of item vectors)")
    ax.legend(fontsize=7, loc="best")
    _save(fig, path)
    return True


REPORT_FILES = ("table.md", "table.json", "training.png", "ndcg10.png", "entropy10.png", "user_groups.png",
                "frontier.png", "frontier.json", "projection.png", "index.md")


def build_report(dataset: Dataset, runs: list[str], out: Path, split: str = "test", fusion: str = "max",
                 title: str = "mhr report") -> Path:
    """Write table.md, table.json, PNGs and index.md into `out`; returns the index path."""
    check_output(out, folder=True)
    for name in REPORT_FILES:  # a FIFO or device under one of these names would be written through
        check_output(out / name)
    groups = collect(dataset, runs, split, fusion)
    rows = comparison_table(groups)
    out.mkdir(parents=True, exist_ok=True)
    table = table_markdown(rows)
    (out / "table.md").write_text(table)
    write_json(out / "table.json", rows, indent=1)
    figures = []
    plot_training(groups, out / "training.png")
    figures.append(("Validation NDCG@10 over training (Fig. 2)", "training.png"))
    if plot_bars(rows, "ndcg@10", out / "ndcg10.png", f"NDCG@10 ({split}, {fusion} fusion), mean ± 95% CI"):
        figures.append(("NDCG@10 by variant (Fig. 6 style)", "ndcg10.png"))
    if plot_bars(rows, "H@10", out / "entropy10.png", "Category entropy H@10 of the top 10"):
        figures.append(("Category entropy H@10 by variant", "entropy10.png"))
    if plot_user_groups(groups, out / "user_groups.png"):
        figures.append(("NDCG@10 per user group (Fig. 3)", "user_groups.png"))
    curves = frontier_points(dataset, groups, split)
    if plot_frontier(curves, out / "frontier.png"):
        write_json(out / "frontier.json", curves, indent=1)
        figures.append(("Accuracy-diversity frontier: NDCG@10 vs H@10 under greedy re-ranking", "frontier.png"))
    objective_curves = objective_points(dataset, groups, split)
    if plot_objectives(objective_curves, out / "objectives.png"):
        (out / "objectives.json").write_text(json.dumps(objective_curves, indent=1))
        figures.append(("Decoding-time objectives: NDCG@10 against each objective's metric", "objectives.png"))
    multi = next((g.runs[0] for g in groups if len(g.params.get("priors") or []) > 0), groups[0].runs[0])
    if plot_projection(dataset, multi, out / "projection.png"):
        figures.append((f"One user's history, targets and top items by winning head ({multi})", "projection.png"))
    lines = [f"# {title}", "", f"Dataset `{dataset.name}`, split `{split}`, fusion `{fusion}`; "
             "mean ± 95% CI (Student t) over seeds; metrics in %, at the full horizon.", "", table]
    for caption, fname in figures:
        lines += [f"## {caption}", "", f"![{caption}]({fname})", ""]
    index = out / "index.md"
    index.write_text("\n".join(lines))
    write_html(index)  # index.html: the same report as one self-contained page
    return index
