"""Reading finished runs: `qhm-launch plot` (the paper's figure layout) and `qhm-launch report`.

Runs whose recipes differ only by seed form one curve: the mean with a min-max band, as the paper's
figures show. Curves are labelled by what differs between them. With ``--metric min_grad_norm`` a second
panel shows the Theorem 2 terms of each curve's schedule at the same epochs, beside the measurement.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import yaml

import qhm

from . import data as data_mod
from . import keys
from . import recipe as recipe_mod
from .runfolder import RunFolder
from .errors import UserError

METRICS = ("test_acc", "grad_norm", "min_grad_norm", "train_loss", "test_loss", "train_acc")
XS = ("epoch", "step", "samples")
# what never changes a plotted metric: a curve's runs may differ in these (and only these, and the seed)
IGNORED = ("seed", "name", "output", "tracking", "checkpoint", "signals")
IGNORED_KEYS = ("eval.batch_size", "distributed.nproc_per_node", "distributed.max_micro_batch")


def load_run(run_dir: Path) -> dict:
    folder = RunFolder(run_dir)
    if not folder.metrics.exists() or not folder.recipe.exists():
        raise UserError(f"run: {str(run_dir)!r} has no metrics.jsonl and recipe.yaml; allowed: run folders")
    recipe = yaml.safe_load(folder.recipe.read_text())
    return {"dir": folder.path, "rows": folder.metric_rows(), "recipe": recipe,
            "complete": folder.read_json(folder.complete)}


def _identity(recipe: dict) -> dict:
    """The recipe without what does not change a plotted metric (seed, names, tracking, checkpoints,
    process layout, evaluation batch size). Evaluation settings that do (grad_norm_mode, every_epochs,
    full_grad_norm) keep runs in separate curves."""
    leaves = keys.flatten(recipe)
    return {k: v for k, v in leaves.items() if k.split(".")[0] not in IGNORED and k not in IGNORED_KEYS}


def group(runs: list[dict]) -> list[dict]:
    """Curves: runs that differ only by seed, in first-seen order, each labelled by what differs."""
    groups: dict[str, dict] = {}
    for run in runs:
        key = json.dumps(_identity(run["recipe"]), sort_keys=True, default=str)
        groups.setdefault(key, {"identity": _identity(run["recipe"]), "runs": []})["runs"].append(run)
    curves = list(groups.values())
    differing = sorted(k for k in set().union(*(c["identity"] for c in curves))
                       if len({json.dumps(c["identity"].get(k), default=str) for c in curves}) > 1)
    for c in curves:
        parts = [f"{k.replace('schedule.', '')}={c['identity'].get(k)}" for k in differing
                 if c["identity"].get(k) is not None]
        c["label"] = ", ".join(parts) or c["runs"][0]["recipe"]["name"]
    return curves


def series(curve: dict, metric: str, x: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(x, mean, min, max) over the curve's seeds, on the epochs every seed has a value for."""
    per_run = [{r["epoch"]: r for r in run["rows"] if r.get(metric) is not None} for run in curve["runs"]]
    epochs = sorted(set.intersection(*(set(p) for p in per_run))) if per_run else []
    values = np.array([[p[e][metric] for e in epochs] for p in per_run], dtype=float).reshape(len(per_run), -1)
    first = per_run[0]
    xs = np.array([first[e][x] + (1 if x == "epoch" else 0) for e in epochs], dtype=float)
    return xs, values.mean(axis=0), values.min(axis=0), values.max(axis=0)


def bound_terms(recipe_dict: dict, x: str) -> tuple[np.ndarray, dict]:
    """Theorem 2's A_K, B_K, C_K at the end of every epoch of this recipe's schedule."""
    recipe = recipe_mod.from_dict(recipe_dict)
    n = data_mod.sizes(recipe.data)[0]
    table = qhm.epoch_table(recipe.schedule_spec(), n)
    t2 = qhm.theorem2(qhm.step_sequences(table))
    ends = np.cumsum(table.steps) - 1
    xs = {"epoch": table.epoch + 1, "step": ends + 1, "samples": (table.epoch + 1) * n}[x]
    return np.asarray(xs, dtype=float), {"A_K": t2.A[ends], "B_K": t2.B[ends], "C_K": t2.C[ends]}


def plot(run_dirs: list, metric: str = "test_acc", x: str = "epoch", out: str = "plot.png") -> list[dict]:
    """Draw the figure (PNG or PDF, by the file name); returns what was drawn, per curve."""
    if metric not in METRICS:
        raise UserError(f"--metric: {metric!r} is not valid; allowed: {' | '.join(METRICS)}")
    if x not in XS:
        raise UserError(f"--x: {x!r} is not valid; allowed: {' | '.join(XS)}")
    if not str(out).endswith((".png", ".pdf")):
        raise UserError(f"--out: {out!r} is not valid; allowed: a .png or .pdf file name")
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = group([load_run(d) for d in run_dirs])
    with_bounds = metric == "min_grad_norm"
    fig, axes = plt.subplots(1, 2 if with_bounds else 1, figsize=(12 if with_bounds else 7, 4.5), squeeze=False)
    ax = axes[0][0]
    drawn = []
    for i, c in enumerate(curves):
        xs, mean, lo, hi = series(c, metric, x)
        colour = f"C{i % 10}"
        ax.plot(xs, mean, color=colour, label=f"{c['label']} ({len(c['runs'])} seeds)")
        ax.fill_between(xs, lo, hi, color=colour, alpha=0.2, linewidth=0)
        drawn.append({"label": c["label"], "runs": [str(r["dir"]) for r in c["runs"]], "x": xs, "mean": mean,
                      "min": lo, "max": hi})
        if with_bounds:
            bx, terms = bound_terms(c["runs"][0]["recipe"], x)
            for name, style in (("A_K", "-"), ("B_K", "--"), ("C_K", ":")):
                axes[0][1].plot(bx, terms[name], style, color=colour,
                                label=f"{name}: {c['label']}" if len(curves) < 4 or name == "B_K" else None)
            drawn[-1]["bounds"] = terms
    ax.set_xlabel({"epoch": "epoch", "step": "optimizer step", "samples": "samples (SFO)"}[x])
    ax.set_ylabel(metric)
    if metric in ("grad_norm", "min_grad_norm", "train_loss", "test_loss"):
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    if with_bounds:
        b = axes[0][1]
        b.set_yscale("log")
        b.set_xlabel(ax.get_xlabel())
        b.set_title("Theorem 2 terms of each schedule (A_K solid, B_K dashed, C_K dotted)", fontsize=9)
        b.grid(alpha=0.3)
        b.legend(fontsize=6)
    fig.tight_layout()
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return drawn


def report(run_dirs: list) -> str:
    """One markdown row per run: final/best test accuracy, final min grad norm, steps, SFO, wall time."""
    lines = ["| run | epochs | final test acc | best test acc | final min grad norm | total steps | "
             "total SFO | wall time (s) |", "|---|---|---|---|---|---|---|---|"]
    fmt = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
    for d in run_dirs:
        run = load_run(d)
        rows = run["rows"]
        last = rows[-1] if rows else {}
        accs = [r["test_acc"] for r in rows if r.get("test_acc") is not None]
        done = "" if run["complete"] else " (incomplete)"
        lines.append(f"| {run['recipe']['name']}{done} | {len(rows)} | {fmt(last.get('test_acc'), '.4f')} | "
                     f"{fmt(max(accs) if accs else None, '.4f')} | {fmt(last.get('min_grad_norm'), '.4g')} | "
                     f"{last.get('step', '-')} | {last.get('samples', '-')} | {fmt(last.get('wall_time'), '.1f')} |")
    return "\n".join(lines)
