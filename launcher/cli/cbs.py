"""``qhm-launch scaling BRANCHES... --cbs``: the critical batch size measured directly from branches
(``qhm-launch branch``), Merrill et al. 2025's local-recovery criterion (launcher/run/branches.py).

At each position of a parent, the control is the branch at factor 1 (the parent's own batch); a branch
at factor f "recovers" when its loss after the branch's length is within the tolerance of the
control's: loss_f <= loss_1 + EPS (absolute), or <= loss_1 (1 + EPS) with ``--tolerance 2%``. The CBS
there is the largest batch (parent's batch x f) that recovers; where none but the control does, it is
the parent's batch (the measurement says only that the CBS is below the next factor tried).

The loss is the branch's final evaluation (``test_loss``: the validation set's, at the branch's last
step) or, with ``--loss train``, the mean ``train_loss`` of its step rows over the last tenth of its
steps. Several parents that differ only by seed give one CBS per seed at each position: the table
shows each and the figure their mean with a min-max band, beside the parents' measured noise scale.
"""
from __future__ import annotations

import json
from pathlib import Path

from launcher.cli import analysis
from launcher.run import branches

def parent_runs(result: dict) -> list[dict]:
    parents = sorted({r["parent"] for r in result["positions"]})
    return [analysis.load_run(Path(p)) for p in parents if (Path(p) / "recipe.yaml").is_file()]


def table(result: dict) -> str:
    lines = [f"critical batch size by branches: the largest batch whose {result['loss']} after the branch is "
             f"within {result['tolerance']} (the control: factor 1, the parent's batch)", "",
             "| parent | position | parent batch | control loss | losses by factor | CBS |", "|---|---|---|---|---|---|"]
    for r in result["positions"]:
        (unit, value), = r["position"].items()
        by = ", ".join(f"x{f}: {'-' if v['loss'] is None else format(v['loss'], '.4f')}"
                       for f, v in sorted(r["factors"].items()))
        cbs = "-" if r["cbs"] is None else f"{r['cbs']:,}" + (" or more (the largest factor tried)" if r["censored"]
                                                                 and r["largest_factor"] > 1 else "")
        lines.append(f"| {Path(r['parent']).name} | {value:,} {unit}s | {r['parent_batch']} | {r['control_loss']:.4f} | "
                     f"{by} | {cbs} |")
    return "\n".join(lines)


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
    field = {"step": "step", "sample": "samples", "token": "tokens"}[unit]
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


def cbs(run_dirs: list, tolerance: str = "0.01", loss: str = "test", out: str | None = None,
        as_json: bool = False) -> str:
    if out is not None:
        analysis.check_out(out)
    result = branches.measure(run_dirs, tolerance, loss)
    if out is not None:
        figure(result, out)
    return json.dumps(result, indent=1) if as_json else table(result)
