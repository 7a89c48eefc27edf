"""Reading finished runs: `qhm-launch plot` (the paper's figure layout) and `qhm-launch report`.

Runs whose recipes differ only by seed form one curve: the mean with a min-max band, as the paper's
figures show. Curves are labelled by what differs between them. With ``--metric min_grad_norm`` a second
panel shows the Theorem 2 terms of each curve's schedule at the same epochs, beside the measurement.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import yaml

import qhm

from launcher import data as data_mod
from launcher.config import keys
from launcher import config as recipe_mod
from launcher.run.folder import RunFolder
from launcher.errors import UserError

METRICS = ("test_acc", "grad_norm", "min_grad_norm", "train_loss", "test_loss", "train_acc", "val_acc", "val_loss",
           "lr", "beta", "gamma", "batch", "samples_per_s")
XS = ("epoch", "step", "samples")
ROWS = ("epochs", "steps")
# what never changes a plotted metric: a curve's runs may differ in these (and only these, and the seed)
IGNORED = ("seed", "name", "output", "tracking", "checkpoint", "signals")
IGNORED_KEYS = ("eval.batch_size", "distributed.nproc_per_node", "distributed.max_micro_batch")


def load_runs(run_dirs: list) -> list[dict]:
    """The runs (sweep folders expanded) that have metrics; the others are listed in one line on
    stderr, since a sweep in progress leaves some without any yet."""
    from launcher.cli.status import run_folders
    loaded, left_out = [], []
    for d in run_folders(run_dirs):
        folder = RunFolder(d)
        if folder.recipe.exists() and folder.metric_rows():
            loaded.append(load_run(d))
        else:
            left_out.append(str(d))
    if left_out:
        print(f"qhm-launch: left out {len(left_out)} run(s) without metrics yet: {', '.join(left_out)}",
              file=sys.stderr)
    if not loaded:
        raise UserError(f"runs: none of {', '.join(map(str, run_dirs))} has metrics yet; allowed: run folders "
                        "(see qhm-launch status)")
    return loaded


def load_run(run_dir: Path) -> dict:
    folder = RunFolder(run_dir)
    missing = [p.name for p in (folder.metrics, folder.recipe) if not p.exists()]
    if missing:
        raise UserError(f"run: {str(run_dir)!r} has no {' and no '.join(missing)}; allowed: run folders")
    recipe = yaml.safe_load(folder.recipe.read_text())
    return {"dir": folder.path, "rows": folder.metric_rows(), "step_rows": folder.step_rows(), "recipe": recipe,
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


def series(curve: dict, metric: str, x: str, rows: str = "epochs") -> tuple[np.ndarray, np.ndarray, np.ndarray,
                                                                           np.ndarray]:
    """(x, mean, min, max) over the curve's seeds, at the epochs (or logged steps) every seed has a
    value for. ``rows``: "epochs" (metrics.jsonl) or "steps" (steps.jsonl)."""
    key, table = ("epoch", "rows") if rows == "epochs" else ("step", "step_rows")
    per_run = [{r[key]: r for r in run[table] if r.get(metric) is not None} for run in curve["runs"]]
    points = sorted(set.intersection(*(set(p) for p in per_run))) if per_run else []
    values = np.array([[p[e][metric] for e in points] for p in per_run], dtype=float).reshape(len(per_run), -1)
    first = per_run[0]
    shift = 1 if (x == "epoch" and rows == "epochs") else 0          # epoch rows are drawn at their end
    xs = np.array([first[e][x] + shift for e in points], dtype=float)
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


def plot(run_dirs: list, metric: str = "test_acc", x: str = "epoch", out: str = "plot.png",
         rows: str = "epochs") -> list[dict]:
    """Draw the figure (PNG or PDF, by the file name); returns what was drawn, per curve. ``rows``:
    "epochs" (metrics.jsonl) or "steps" (steps.jsonl, per-step metrics)."""
    if rows not in ROWS:
        raise UserError(f"--rows: {rows!r} is not valid; allowed: {' | '.join(ROWS)}")
    if metric not in METRICS:
        raise UserError(f"--metric: {metric!r} is not valid; allowed: {' | '.join(METRICS)}")
    if x not in XS:
        raise UserError(f"--x: {x!r} is not valid; allowed: {' | '.join(XS)}")
    if not str(out).endswith((".png", ".pdf")):
        raise UserError(f"--out: {out!r} is not valid; allowed: a .png or .pdf file name")
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = group(load_runs(run_dirs))
    with_bounds = metric == "min_grad_norm" and rows == "epochs"
    fig, axes = plt.subplots(1, 2 if with_bounds else 1, figsize=(12 if with_bounds else 7, 4.5), squeeze=False)
    ax = axes[0][0]
    drawn = []
    for i, c in enumerate(curves):
        xs, mean, lo, hi = series(c, metric, x, rows)
        colour = f"C{i % 10}"
        seeds = len({r["recipe"].get("seed") for r in c["runs"]})           # distinct seeds, not runs
        legend = f"{c['label']} ({seeds} seed{'s' if seeds != 1 else ''})"
        ax.plot(xs, mean, color=colour, label=legend)
        ax.fill_between(xs, lo, hi, color=colour, alpha=0.2, linewidth=0)
        drawn.append({"label": c["label"], "legend": legend, "runs": [str(r["dir"]) for r in c["runs"]], "x": xs,
                      "mean": mean,
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
    try:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out, dpi=120)
    except OSError as exc:
        raise UserError(f"--out: {str(out)!r} cannot be written ({exc.strerror or exc}); allowed: a file path in "
                        "a folder you can write to") from None
    finally:
        plt.close(fig)
    return drawn


RANKS = ("best_val_acc", "best_test_acc", "final_test_acc", "final_min_grad_norm")


def report(run_dirs: list, rank: str | None = None) -> str:
    """One markdown row per run: final/best test (and validation) accuracy, final min grad norm, steps,
    SFO, wall time; ``rank`` sorts the rows by a column, best first (a grid search ranks by
    best_val_acc, so it never picks hyper-parameters on the test set)."""
    if rank is not None and rank not in RANKS:
        raise UserError(f"--rank: {rank!r} is not valid; allowed: {' | '.join(RANKS)}")
    fmt = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
    best = lambda rows, k: max((r[k] for r in rows if r.get(k) is not None), default=None)  # noqa: E731
    entries = []
    for run in load_runs(run_dirs):
        rows, last = run["rows"], run["rows"][-1]
        entries.append({"name": run["recipe"]["name"] + ("" if run["complete"] else " (incomplete)"),
                        "epochs": len(rows), "final_test_acc": last.get("test_acc"),
                        "best_test_acc": best(rows, "test_acc"), "best_val_acc": best(rows, "val_acc"),
                        "final_min_grad_norm": last.get("min_grad_norm"), "step": last.get("step", "-"),
                        "samples": last.get("samples", "-"), "wall": last.get("wall_time")})
    if rank is not None:
        lower_is_better = rank == "final_min_grad_norm"
        entries.sort(key=lambda e: (e[rank] is None, e[rank] if lower_is_better else -(e[rank] or 0)))
    lines = ["| run | epochs | final test acc | best test acc | best val acc | final min grad norm | total steps | "
             "total SFO | wall time (s) |", "|---|---|---|---|---|---|---|---|---|"]
    for e in entries:
        lines.append(f"| {e['name']} | {e['epochs']} | {fmt(e['final_test_acc'], '.4f')} | "
                     f"{fmt(e['best_test_acc'], '.4f')} | {fmt(e['best_val_acc'], '.4f')} | "
                     f"{fmt(e['final_min_grad_norm'], '.4g')} | {e['step']} | {e['samples']} | {fmt(e['wall'], '.1f')} |")
    return "\n".join(lines)
