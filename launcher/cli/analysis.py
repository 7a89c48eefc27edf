"""Reading finished runs: `qhm-launch plot` (the paper's figure layout) and `qhm-launch report`.

Runs whose recipes differ only by seed form one curve: the mean with a min-max band, as the paper's
figures show. Curves are labelled in words by what differs between them ("increasing 8→64, ×2 every 3
epochs"); the first factor that differs sets the colour, the second the line style. For throughput and
time metrics the world size is part of a curve's identity: a 1-process and a 2-process run are never one
band. With ``--metric min_grad_norm`` a second panel shows the Theorem 2 terms of each curve's schedule
at the same epochs, beside the measurement.
"""
from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

import numpy as np
import yaml

import qhm

from launcher import data as data_mod
from launcher import keys
from launcher import config as recipe_mod
from launcher.run.folder import RunFolder
from launcher.errors import UserError

LABELS = {"test_acc": "test accuracy", "grad_norm": "‖∇f(x)‖, full training-set gradient norm",
          "min_grad_norm": "min over epochs of ‖∇f(x)‖", "train_loss": "training loss", "test_loss": "test loss",
          "train_acc": "training accuracy", "val_acc": "validation accuracy", "val_loss": "validation loss",
          "lr": "learning rate", "beta": "β (momentum)", "gamma": "γ (immediate discount)",
          "batch": "global batch size (samples)", "samples_per_s": "throughput (samples/s)",
          "wall_time": "training time (s)", "noise_scale": "gradient noise scale B_simple (samples)",
          "minibatch_grad_norm": "‖mini-batch gradient‖", "train_ppl": "training perplexity",
          "test_ppl": "test perplexity", "val_ppl": "validation perplexity", "tokens_per_s": "throughput (tokens/s)"}
METRICS = tuple(LABELS)
TIMING = ("samples_per_s", "tokens_per_s", "wall_time")     # metrics whose curves never mix world sizes
LOG_SCALE = ("grad_norm", "min_grad_norm", "train_loss", "test_loss", "val_loss", "noise_scale", "minibatch_grad_norm",
             "train_ppl", "test_ppl", "val_ppl")
XS = ("epoch", "step", "samples", "tokens")
LINE_STYLES = ("-", "--", ":", "-.")
ROWS = ("epochs", "steps")
# what never changes a plotted metric: a curve's runs may differ in these (and only these, and the seed)
IGNORED = ("seed", "name", "output", "tracking", "checkpoint", "signals", "slurm")
IGNORED_KEYS = ("eval.batch_size", "distributed.nproc_per_node", "distributed.max_micro_batch")


def load_runs(run_dirs: list) -> list[dict]:
    """The runs (sweep folders expanded) that have metrics; the others are listed in one line on
    stderr, since a sweep in progress leaves some without any yet (and one whose recipe.yaml does not
    read is left out the same way, unless it is all there is: then its one-line error)."""
    from launcher.cli.status import run_folders
    loaded, unreadable = [], []
    left_out = {"without metrics yet": [], "without a recipe.yaml": [], "whose recipe.yaml does not read": []}
    for d in run_folders(run_dirs):
        folder = RunFolder(d)
        if not folder.recipe.exists():
            left_out["without a recipe.yaml"].append(str(d))
        elif not folder.metric_rows():
            left_out["without metrics yet"].append(str(d))
        else:
            try:
                loaded.append(load_run(d))
            except UserError as exc:   # one bad folder among many: named, and the rest read on
                if not unreadable:
                    unreadable.append(exc)
                left_out["whose recipe.yaml does not read"].append(str(d))
    if not loaded and unreadable:      # nothing else to read: what is wrong with it, in one line
        raise unreadable[0]
    for why, runs in left_out.items():
        if runs:
            print(f"qhm-launch: left out {len(runs)} run(s) {why}: {', '.join(runs)}", file=sys.stderr)
    if not loaded:
        raise UserError(f"runs: none of {', '.join(map(str, run_dirs))} has a recipe.yaml and metrics; allowed: run "
                        "folders that trained (see qhm-launch status)")
    return loaded


def read_recipe(folder: RunFolder) -> dict:
    """A run folder's recipe.yaml as a mapping, or one line saying what is wrong with it."""
    try:
        text = folder.recipe.read_text()
        recipe = yaml.safe_load(text)
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        what = getattr(exc, "strerror", None) or type(exc).__name__
        raise UserError(f"run: {str(folder.recipe)!r} cannot be read ({what}); allowed: the recipe.yaml a run "
                        "wrote") from None
    if not isinstance(recipe, dict):
        raise UserError(f"run: {str(folder.recipe)!r} holds {type(recipe).__name__}, not a recipe; allowed: the "
                        "recipe.yaml a run wrote")
    return recipe


def load_run(run_dir: Path) -> dict:
    folder = RunFolder(run_dir)
    missing = [p.name for p in (folder.metrics, folder.recipe) if not p.exists()]
    if missing:
        raise UserError(f"run: {str(run_dir)!r} has no {' and no '.join(missing)}; allowed: run folders")
    return {"dir": folder.path, "rows": folder.metric_rows(), "mid_epoch_rows": folder.mid_epoch_rows(),
            "step_rows": folder.step_rows(), "recipe": read_recipe(folder),
            "complete": folder.read_json(folder.complete)}


def _identity(run: dict, metric: str | None = None) -> dict:
    """The recipe without what does not change a plotted metric (seed, names, tracking, checkpoints,
    process layout, evaluation batch size). Evaluation settings that do (grad_norm_mode, every_epochs,
    full_grad_norm) keep runs in separate curves; for a throughput or time metric, so does the world size
    the run trained on."""
    leaves = keys.flatten(run["recipe"])
    out = {k: v for k, v in leaves.items() if k.split(".")[0] not in IGNORED and k not in IGNORED_KEYS}
    if metric in TIMING:
        out["world_size"] = world_size(run)
    return out


def world_size(run: dict) -> int | None:
    """The processes the run last trained on (its newest row that says)."""
    return next((r["world_size"] for r in reversed(run["rows"]) if r.get("world_size")), None)


BATCH_KEYS = ("schedule.batch.", "schedule.interval")
WORDS = {"schedule.lr.max": "peak learning rate {}", "schedule.lr.kind": "{} learning rate",
         "schedule.lr.min": "final learning rate {}", "schedule.beta.max": "β {}", "schedule.gamma.max": "γ {}",
         "schedule.beta.kind": "{} β", "schedule.gamma.kind": "{} γ", "optimizer.name": "{}", "model": "{}",
         "precision": "{}", "world_size": "world size {}", "epochs": "{} epochs", "eval.grad_norm_mode": "grad norm {}",
         "optimizer.weight_decay": "weight decay {}", "distributed.engine": "{}"}


def describe_batch(identity: dict) -> str:
    """The batch schedule in words (each kind's own: launcher/config/batch_kinds.py)."""
    from launcher.config import batch_kinds
    return batch_kinds.describe(identity)


def _factors(differing: list[str]) -> list[list[str]]:
    """What differs between curves as factors: the batch schedule's keys together, every other key alone."""
    batch = [k for k in differing if k.startswith(BATCH_KEYS)]
    return ([batch] if batch else []) + [[k] for k in differing if k not in batch]


def _words(factor: list[str], identity: dict) -> str:
    if factor[0].startswith(BATCH_KEYS):
        return describe_batch(identity)
    key, value = factor[0], identity.get(factor[0])
    return WORDS[key].format(value) if key in WORDS else f"{key.removeprefix('schedule.')} {value}"


def group(runs: list[dict], metric: str | None = None) -> list[dict]:
    """Curves: runs that differ only by seed, in first-seen order, each labelled in words by what differs;
    ``factors`` holds each differing factor's words (the plot's colour and line style)."""
    groups: dict[str, dict] = {}
    for run in runs:
        identity = _identity(run, metric)
        key = json.dumps(identity, sort_keys=True, default=str)
        groups.setdefault(key, {"identity": identity, "runs": []})["runs"].append(run)
    curves = list(groups.values())
    differing = sorted(k for k in set().union(*(c["identity"] for c in curves))
                       if len({json.dumps(c["identity"].get(k), default=str) for c in curves}) > 1)
    for c in curves:
        c["factors"] = [_words(f, c["identity"]) for f in _factors(differing)]
        c["label"] = "; ".join(c["factors"]) or c["runs"][0]["recipe"]["name"]
    kinds = list(dict.fromkeys(c["identity"].get("schedule.batch.kind") for c in curves))
    numeric = [k for k in differing if not k.startswith(BATCH_KEYS)
               and all(isinstance(c["identity"].get(k), (int, float, type(None))) for c in curves)]
    # batch kinds in the order first seen; within a kind by its (first) batch, then by numeric factors (the
    # LR), numbers as numbers: 8, 16, 128, not the run folders' 128, 16, 8; the rest stays as first seen
    return sorted(curves, key=lambda c: (kinds.index(c["identity"].get("schedule.batch.kind")),
                                         first_batch(c["identity"]),
                                         *(float(c["identity"].get(k) or 0) for k in numeric)))


def first_batch(identity: dict) -> float:
    """A curve's batch schedule's first batch (constant: its size)."""
    points = identity.get("schedule.batch.points") or []
    value = identity.get("schedule.batch.size") or identity.get("schedule.batch.initial") or (points[0][1] if points else 0)
    return float(value) if isinstance(value, (int, float)) else 0.0


def has_accuracy(runs: list[dict]) -> bool:
    """Whether any run's epoch rows carry an accuracy (a language model's never do)."""
    return any(r.get(k) is not None for run in runs for r in run["rows"] for k in ("test_acc", "train_acc", "val_acc"))


def default_metric(runs: list[dict]) -> str:
    """test_acc where the runs measure accuracy, else test_loss (a language model, a regression)."""
    return "test_acc" if has_accuracy(runs) else "test_loss"


def seed_words(curve: dict) -> str:
    seeds = sorted({r["recipe"].get("seed") for r in curve["runs"]}, key=lambda s: (s is None, s))
    return "1 seed" if len(seeds) == 1 else f"{len(seeds)} seeds: {', '.join(map(str, seeds))}"


def draw_batches(ax, curve: dict, x: str, colour: str) -> None:
    """A growing batch schedule's batch, each seed's, dotted over a curve (the noise scale it should
    track), at the end of each epoch as epoch rows are drawn; a constant batch draws nothing."""
    if curve["identity"].get("schedule.batch.kind", "constant") == "constant":
        return
    shift = 1 if x == "epoch" else 0
    for k, run in enumerate(curve["runs"]):
        rows = [r for r in run["rows"] if r.get("batch") and r.get(x) is not None]
        if len(rows) < 2 and x != "epoch":     # shorter than two epochs (a language model): its logged steps
            rows = [r for r in run["step_rows"] if r.get("batch") and r.get(x) is not None]
        ax.step([r[x] + shift for r in rows], [r["batch"] for r in rows], ":", where="pre",
                color=colour, label=f"its batch, each seed ({curve['label']})" if k == 0 else None)


def series(curve: dict, metric: str, x: str, rows: str = "epochs") -> tuple[np.ndarray, np.ndarray, np.ndarray,
                                                                           np.ndarray]:
    """(x, mean, min, max) over the curve's seeds, at the epochs (or logged steps) every seed has a
    value for. ``rows``: "epochs" (metrics.jsonl: with x step, samples or tokens, its evaluations inside
    epochs as well) or "steps" (steps.jsonl)."""
    key, table = ("epoch", "rows") if rows == "epochs" else ("step", "step_rows")
    if rows == "epochs" and x != "epoch":      # evaluations inside epochs too: a run may be one epoch long
        key = "step"
    per_run = [{r[key]: r for r in (run[table] + (run["mid_epoch_rows"] if key == "step" and rows == "epochs" else []))
                if r.get(metric) is not None and r.get(key) is not None and r.get(x) is not None}
               for run in curve["runs"]]
    points = sorted(set.intersection(*(set(p) for p in per_run))) if per_run else []
    values = np.array([[p[e][metric] for e in points] for p in per_run], dtype=float).reshape(len(per_run), -1)
    first = per_run[0]
    shift = 1 if (x == "epoch" and rows == "epochs") else 0          # epoch rows are drawn at their end
    xs = np.array([first[e][x] + shift for e in points], dtype=float)
    return xs, values.mean(axis=0), values.min(axis=0), values.max(axis=0)


def bound_terms(run: dict, x: str) -> tuple[np.ndarray, dict]:
    """Theorem 2's A_K, B_K, C_K at the end of every epoch the run trained, at the batches it used (in
    the units step, sample and token: over the steps its plan schedules)."""
    recipe = recipe_mod.from_dict(run["recipe"])
    n = data_mod.sizes(recipe.data)[0]
    if recipe.schedule.unit == "epoch" and recipe.duration()[0] == "epoch":
        table = qhm.epoch_table(recipe.schedule_spec(), n, [r.get("batch") or 1 for r in run["rows"]])
        seq = qhm.step_sequences(table)
    else:
        from launcher.train import planning
        planned = planning.plan(recipe, n, 1)
        seq = planned.steps.sequences(planned.schedule)
    t2 = qhm.theorem2(seq)
    ends = np.array([min(max(r.get("step", 1), 1), len(seq.lr)) - 1 for r in run["rows"]])
    xs = {"epoch": np.array([r["epoch"] + 1 for r in run["rows"]]), "step": ends + 1,
          "samples": np.array([r.get("samples", 0) for r in run["rows"]]),
          "tokens": np.array([r.get("tokens", 0) for r in run["rows"]])}[x]
    return np.asarray(xs, dtype=float), {"A_K": t2.A[ends], "B_K": t2.B[ends], "C_K": t2.C[ends]}


def plot(run_dirs: list, metric: str | None = None, x: str = "epoch", out: str = "plot.png",
         rows: str = "epochs") -> list[dict]:
    """Draw the figure (PNG or PDF, by the file name); returns what was drawn, per curve. ``rows``:
    "epochs" (metrics.jsonl) or "steps" (steps.jsonl, per-step metrics). ``metric`` None: test_acc where
    the runs have an accuracy, else test_loss. A curve without a value of the metric is not drawn (and
    has no legend entry); when no curve has one it is one line, not an empty figure."""
    if rows not in ROWS:
        raise UserError(f"--rows: {rows!r} is not valid; allowed: {' | '.join(ROWS)}")
    if metric is not None and metric not in METRICS:
        raise UserError(f"--metric: {metric!r} is not valid; allowed: {' | '.join(METRICS)}")
    if x not in XS:
        raise UserError(f"--x: {x!r} is not valid; allowed: {' | '.join(XS)}")
    check_out(out)
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from matplotlib.ticker import MaxNLocator
    plt.rcParams.update({"font.size": 10})

    runs = load_runs(run_dirs)
    metric = metric or default_metric(runs)
    if x == "tokens" and not any(r.get("tokens") is not None for run in runs for r in run["rows"] + run["step_rows"]):
        raise UserError("--x: 'tokens' is not valid for these runs: none counted tokens; allowed: epoch, step or "
                        "samples (or runs with data.tokens_per_sample, or token data)")
    curves = [c for c in group(runs, metric) if len(series(c, metric, x, rows)[0])]
    if not curves:
        carried = sorted(k for k in METRICS if any(r.get(k) is not None for run in runs
                                                   for r in run["rows" if rows == "epochs" else "step_rows"]))
        raise UserError(f"--metric: {metric!r} has no value in any run's {rows} rows; allowed: a metric they carry "
                        f"({', '.join(carried) or 'none'})" + (", or --rows steps" if rows == "epochs" else ""))
    with_bounds = metric == "min_grad_norm" and rows == "epochs"
    fig, axes = plt.subplots(1, 2 if with_bounds else 1, figsize=(12 if with_bounds else 7, 5), squeeze=False,
                             layout="constrained")
    ax = axes[0][0]
    drawn = []
    first = list(dict.fromkeys(c["factors"][0] if c["factors"] else "" for c in curves))
    second = list(dict.fromkeys(c["factors"][1] if len(c["factors"]) > 1 else "" for c in curves))
    seed_counts = set()
    for i, c in enumerate(curves):
        xs, mean, lo, hi = series(c, metric, x, rows)
        colour = f"C{first.index(c['factors'][0] if c['factors'] else '') % 10}" if len(first) > 1 else f"C{i % 10}"
        style = LINE_STYLES[second.index(c["factors"][1] if len(c["factors"]) > 1 else "") % len(LINE_STYLES)]
        seeds = len({r["recipe"].get("seed") for r in c["runs"]})           # distinct seeds, not runs
        seed_counts.add(seeds)
        legend = f"{c['label']} ({seed_words(c)})"
        ax.plot(xs, mean, style, color=colour, label=legend)
        ax.fill_between(xs, lo, hi, color=colour, alpha=0.2, linewidth=0)
        drawn.append({"label": c["label"], "legend": legend, "metric": metric,
                      "runs": [str(r["dir"]) for r in c["runs"]], "x": xs,
                      "mean": mean,
                      "min": lo, "max": hi})
        if metric == "noise_scale" and rows == "epochs":
            draw_batches(ax, c, x, colour)
        if with_bounds:
            bx, terms = bound_terms(c["runs"][0], x)
            for name, style in (("A_K", "-"), ("B_K", "--"), ("C_K", ":")):
                axes[0][1].plot(bx, terms[name], style, color=colour,
                                label=f"{name}: {c['label']}" if len(curves) < 4 or name == "B_K" else None)
            drawn[-1]["bounds"] = terms
    ax.set_xlabel({"epoch": "epoch", "step": "optimizer steps", "samples": "samples trained (SFO)",
                   "tokens": "tokens trained"}[x])
    if x == "epoch":
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel(LABELS[metric])
    if metric in LOG_SCALE and all(np.all(d["min"] > 0) for d in drawn):   # a value <= 0 cannot be log-scaled
        ax.set_yscale("log")
        low, high = min(float(d["min"].min()) for d in drawn), max(float(d["max"].max()) for d in drawn)
        if high < 20 * low:                    # less than a decade or so: plain numbers on the ticks
            from matplotlib.ticker import FormatStrFormatter
            ax.yaxis.set_major_formatter(FormatStrFormatter("%.3g"))
            ax.yaxis.set_minor_formatter(FormatStrFormatter("%.3g"))
    ax.grid(alpha=0.3)
    counts = "/".join(str(n) for n in sorted(seed_counts))
    ax.set_title(f"lines: mean over seeds; bands: min–max over {counts} seed{'s' if counts != '1' else ''}",
                 fontsize=9)
    fig.legend(*ax.get_legend_handles_labels(), loc="outside lower center", ncols=1 if len(curves) < 4 else 2,
               fontsize=8, frameon=False)          # below the axes: never over the curves
    if with_bounds:
        b = axes[0][1]
        b.set_yscale("log")
        b.set_xlabel(ax.get_xlabel())
        if x == "epoch":
            b.xaxis.set_major_locator(MaxNLocator(integer=True))
        b.set_title("Theorem 2 terms of each schedule (A_K solid, B_K dashed, C_K dotted)", fontsize=9)
        b.grid(alpha=0.3)
        b.legend(fontsize=7)
    save(fig, out)
    return drawn


def save(fig, out: str) -> None:
    """Write the figure (PNG or PDF by its name); an unwritable path is one line."""
    import matplotlib.pyplot as plt
    try:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out, dpi=130, bbox_inches="tight")
    except OSError as exc:
        raise UserError(f"--out: {str(out)!r} cannot be written ({exc.strerror or exc}); allowed: a file path in "
                        "a folder you can write to") from None
    finally:
        plt.close(fig)


def check_out(out: str) -> None:
    if not str(out).endswith((".png", ".pdf")):
        raise UserError(f"--out: {out!r} is not valid; allowed: a .png or .pdf file name")


def steady_throughput(run: dict, field: str | None = None) -> float | None:
    """Median samples/s (or ``field``, tokens_per_s) of the run's step rows after its first epoch
    (compilation, warm-up, the first data pass; a run of one epoch: after its first quarter), or of its
    epoch rows after the first where it logged no steps."""
    field = field or "samples_per_s"
    steps = [r for r in run["step_rows"] if r.get(field)]
    rows = [r for r in steps if r.get("epoch", 0) >= 1] or steps[len(steps) // 4:]
    rows = rows or [r for r in run["rows"][1:] if r.get(field)]
    return statistics.median(r[field] for r in rows) if rows else None


RANKS = ("best_val_acc", "best_test_acc", "final_test_acc", "final_min_grad_norm")


def report(run_dirs: list, rank: str | None = None) -> str:
    """One markdown row per run: final/best test (and validation) accuracy, final min grad norm, steps,
    SFO, wall time, processes and steady throughput (:func:`steady_throughput`); ``rank`` sorts the rows
    by a column, best first (a grid search ranks by best_val_acc, so it never picks hyper-parameters on the
    test set). Runs without an accuracy (language models) get loss columns instead: final train and test
    loss, the best test loss, the final test perplexity, and the tokens trained where counted."""
    runs = load_runs(run_dirs)
    if not has_accuracy(runs):
        return loss_report(runs, rank)
    if rank is not None and rank not in RANKS:
        raise UserError(f"--rank: {rank!r} is not valid; allowed: {' | '.join(RANKS)}")
    fmt = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
    best = lambda rows, k: max((r[k] for r in rows if r.get(k) is not None), default=None)  # noqa: E731
    entries = []
    for run in runs:
        rows, last = run["rows"], run["rows"][-1]
        entries.append({"name": run["recipe"]["name"] + ("" if run["complete"] else " (incomplete)"),
                        "epochs": len(rows), "final_test_acc": last.get("test_acc"),
                        "best_test_acc": best(rows, "test_acc"), "best_val_acc": best(rows, "val_acc"),
                        "final_min_grad_norm": last.get("min_grad_norm"), "step": last.get("step", "-"),
                        "samples": last.get("samples", "-"), "wall": last.get("wall_time"),
                        "rate": steady_throughput(run), "world": world_size(run) or "-"})
    if rank is not None:
        lower_is_better = rank == "final_min_grad_norm"
        entries.sort(key=lambda e: (e[rank] is None, e[rank] if lower_is_better else -(e[rank] or 0)))
    lines = ["| run | epochs | final test acc | best test acc | best val acc | final min grad norm | total steps | "
             "total SFO | wall time (s) | processes | samples/s |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for e in entries:
        lines.append(f"| {e['name']} | {e['epochs']} | {fmt(e['final_test_acc'], '.4f')} | "
                     f"{fmt(e['best_test_acc'], '.4f')} | {fmt(e['best_val_acc'], '.4f')} | "
                     f"{fmt(e['final_min_grad_norm'], '.4g')} | {e['step']} | {e['samples']} | {fmt(e['wall'], '.1f')} | "
                     f"{e['world']} | {fmt(e['rate'], ',.0f')} |")
    return "\n".join(lines)


LOSS_RANKS = ("best_test_loss", "final_test_loss", "final_train_loss")


def loss_report(runs: list[dict], rank: str | None) -> str:
    """:func:`report` for runs without an accuracy: losses and perplexity, lower is better (the final train
    loss is the last log window's, as the run's summary says it)."""
    from launcher.train.report import final_train_loss
    if rank is not None and rank not in LOSS_RANKS:
        raise UserError(f"--rank: {rank!r} is not valid for runs without an accuracy; allowed: {' | '.join(LOSS_RANKS)}")
    fmt = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
    entries = []
    for run in runs:
        rows, last = run["rows"], run["rows"][-1]
        evaluated = [r["test_loss"] for r in rows + run["mid_epoch_rows"] if r.get("test_loss") is not None]
        entries.append({"name": run["recipe"]["name"] + ("" if run["complete"] else " (incomplete)"),
                        "final_train_loss": final_train_loss(rows, run["step_rows"]),
                        "final_test_loss": last.get("test_loss"),
                        "best_test_loss": min(evaluated, default=None), "ppl": last.get("test_ppl"),
                        "step": last.get("step", "-"), "samples": last.get("samples", "-"),
                        "tokens": last.get("tokens"), "wall": last.get("wall_time"), "world": world_size(run) or "-",
                        "rate": steady_throughput(run, "tokens_per_s" if last.get("tokens") is not None else None)})
    if rank is not None:
        entries.sort(key=lambda e: (e[rank] is None, e[rank] or 0))
    tokens = any(e["tokens"] is not None for e in entries)
    per = "tokens/s" if tokens else "samples/s"
    lines = ["| run | final train loss | final test loss | best test loss | final test ppl | total steps | total SFO | "
             + ("total tokens | " if tokens else "") + f"wall time (s) | processes | {per} |",
             "|---|---|---|---|---|---|---|" + ("---|" if tokens else "") + "---|---|---|"]
    for e in entries:
        lines.append(f"| {e['name']} | {fmt(e['final_train_loss'], '.4f')} | {fmt(e['final_test_loss'], '.4f')} | "
                     f"{fmt(e['best_test_loss'], '.4f')} | {fmt(e['ppl'], '.3f')} | {e['step']} | {e['samples']} | "
                     + (f"{fmt(e['tokens'], ',')} | " if tokens else "")
                     + f"{fmt(e['wall'], '.1f')} | {e['world']} | {fmt(e['rate'], ',.0f')} |")
    return "\n".join(lines)
