"""``qhm-launch scaling BRANCHES... --cbs``: the critical batch size measured directly from branches
(``qhm-launch branch``), Merrill et al. 2025's local-recovery criterion with seeds (launcher/run/branches.py
says how a factor recovers, fails or stays uncertain, and how the CBS and its interval follow).

The table gives per position each factor's gap to the control (mean over seeds, its interval), its
verdict and the position it was scored at, then the CBS with its interval and, where censored, the factor
to add. Several parents that differ only by seed give one CBS per parent at each position: the figure
shows their mean with a min-max band (and the seeds' interval where there is one), beside the parents'
measured noise scale. Batches are in samples, and in tokens too where the branches count tokens.
"""
from __future__ import annotations

import json
from pathlib import Path

from launcher.cli import analysis, scaling
from launcher.errors import UserError
from launcher.run import branches

def parent_runs(result: dict) -> list[dict]:
    parents = sorted({r["parent"] for r in result["positions"]})
    return [analysis.load_run(Path(p)) for p in parents if (Path(p) / "recipe.yaml").is_file()]


def _batch(value, tokens: int | None) -> str:
    """A batch in samples, with its tokens where counted."""
    return f"{value:,}" + (f" ({value * tokens:,} tokens)" if tokens else "")


def _gap(v: dict, relative: bool) -> str:
    if v["gap"] is None:
        return "-"
    fmt = (lambda x: f"{x * 100:+.2f}%") if relative else (lambda x: f"{x:+.4f}")
    text = fmt(v["gap"]) + (f" [{fmt(v['interval'][0])}, {fmt(v['interval'][1])}]" if v["interval"] else "")
    return f"{text} {v['verdict']}"


def table(result: dict, tokens: int | None = None) -> str:
    relative = "%" in result["tolerance"]
    level = f"{result['level']:.0%}"
    lines = [f"critical batch size by branches: the largest batch that, with every smaller factor tried, recovers "
             f"the control's {result['loss']} within {result['tolerance']} (the control: factor 1, the parent's "
             f"batch); gaps: mean over seeds [{level} interval], a factor recovers when the interval's upper end is "
             "within the tolerance", "",
             "| parent | position | parent batch | seeds | control loss | gap to the control by factor | scored at | CBS |",
             "|---|---|---|---|---|---|---|---|"]
    for r in result["positions"]:
        (unit, value), = r["position"].items()
        by = "; ".join(f"x{f}: {_gap(v, relative)}" for f, v in sorted(r["factors"].items()) if f > 1) or "-"
        ends = sorted({e for v in r["factors"].values() for e in v["ends"]})
        scored = ", ".join(f"{e:,}" for e in ends) + f" {branches.FIELDS[unit]}" if ends else "-"
        lines.append(f"| {Path(r['parent']).name} | {value:,} {unit}s | {r['parent_batch']} | {r['seeds']} | "
                     f"{r['control_loss']:.4f} | {by} | {scored} | {cbs_text(r, tokens)} |")
    notes = [f"- {Path(r['parent']).name} at {next(iter(r['position'].values())):,}: {r['advice']}"
             for r in result["positions"] if r.get("advice")]
    lines += ([""] + notes if notes else []) + ([""] + [f"warning: {w}" for w in result["warnings"]]
                                                if result["warnings"] else [])
    return "\n".join(lines)


def cbs_text(r: dict, tokens: int | None = None) -> str:
    """The CBS, its interval over seeds and what bounds it, as a person reads it."""
    if r["cbs"] is None:
        return "-"
    text = _batch(r["cbs"], tokens) + (" or more (the largest factor tried)" if r["censored"] else "")
    if r["cbs_interval"] and not r["censored"]:          # censored: the CBS is its own interval's lower end
        lo, hi = r["cbs_interval"]
        text += f"; interval {lo:,}–{hi:,}" + (" or more" if r["open_above"] else "")
    if r["below"] and not r["open_above"]:
        text += f"; below {r['below']:,}"
    return text


def figure(result: dict, out: str) -> None:
    """CBS over training (mean and min-max over the parents' seeds), the parents' noise scale beside it."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    rows = result["positions"]
    unit = rows[0]["unit"]
    by_position: dict[int, list] = {}
    for r in rows:
        by_position.setdefault(r["position"][unit], []).append(r["cbs"])
    xs = np.array(sorted(by_position), dtype=float)
    values = [[v for v in by_position[x] if v is not None] for x in sorted(by_position)]
    fig, ax = plt.subplots(figsize=(7, 4.5), layout="constrained")
    mean = np.array([np.mean(v) if v else np.nan for v in values])
    ax.plot(xs, mean, "o-", color="C0", label=f"CBS by branches ({len({r['parent'] for r in rows})} parent(s))")
    bound = [x for x in sorted(by_position) if all(r["censored"] for r in rows if r["position"][unit] == x)]
    if bound:                                  # the largest factor tried recovered: the CBS is at least this
        ax.plot(bound, [mean[sorted(by_position).index(x)] for x in bound], "^", color="C0", markersize=11,
                fillstyle="none", label="a lower bound (the largest factor tried recovered)")
    ax.fill_between(xs, [min(v) if v else np.nan for v in values], [max(v) if v else np.nan for v in values],
                    color="C0", alpha=0.2, linewidth=0)
    seeded = [(r["position"][unit], *r["cbs_interval"]) for r in rows if r["cbs_interval"]]
    if seeded:                                 # the CBS's interval over the branches' seeds
        x, lo, hi = zip(*seeded)
        ax.vlines(x, lo, hi, color="C0", linewidth=3, alpha=0.5,
                  label=f"interval over seeds ({result['level']:.0%} per factor)")
    field = branches.FIELDS[unit]
    for i, parent in enumerate(parent_runs(result)):
        points = [(r[field], r["noise_scale"]) for r in parent["step_rows"]
                  if r.get("noise_scale") is not None and r.get(field) is not None]
        if points:
            px, py = zip(*points)
            ax.plot(px, py, ":", color="C1", alpha=0.7, label="parent's noise scale B_simple" if i == 0 else None)
        batches = [(r[field], r["batch"]) for r in parent["step_rows"] if r.get(field) is not None and r.get("batch")]
        if batches:
            bx, by = zip(*batches)
            ax.step(bx, by, "-", where="post", color="grey", alpha=0.6, label="parent's batch" if i == 0 else None)
    ax.set_yscale("log")
    ax.set(xlabel={"step": "optimizer steps", "sample": "samples trained", "token": "tokens trained"}[unit],
           ylabel="batch size (samples)", title=f"critical batch size ({result['loss']}, tolerance {result['tolerance']})")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    analysis.save(fig, out)


def cbs(run_dirs: list, tolerance: str | None = None, loss: str = "test", out: str | None = None,
        as_json: bool = False, level: float = branches.LEVEL) -> str:
    if not 0 < level < 1:
        raise UserError(f"--confidence: {level!r} is not valid; allowed: a level between 0 and 1 (0.9)")
    if out is not None:
        analysis.check_out(out)
    result = branches.measure(run_dirs, tolerance, loss, level)
    if out is not None:
        figure(result, out)
    tokens = scaling.tokens_per_sample(parent_runs(result))
    if as_json:
        return json.dumps(result, indent=1, default=sorted)
    return table(result, tokens)

