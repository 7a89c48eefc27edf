"""The scaling study's figure (``qhm-launch scaling --out``): steps and samples to the target against
the batch size with the fitted trade-off, and each run's measured noise scale over training with its
batch drawn over it (does an increasing schedule track the critical batch size?)."""
from __future__ import annotations

import numpy as np

from launcher.cli import analysis


WORDS = {"samples": "samples (SFO)", "tokens": "tokens", "steps": "optimizer steps"}


def scaling_figure(runs: list[dict], result: dict, out: str, x: str = "samples") -> None:
    """``x``: what the second panel counts to the target and the noise scale is drawn over."""
    analysis.check_out(out)
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    plt.rcParams.update({"font.size": 10})
    fitted = "points" in result
    fig, axes = plt.subplots(1, 3 if fitted else 1, figsize=(16 if fitted else 7, 4.5), squeeze=False,
                             layout="constrained")
    axes = axes[0]
    if fitted:
        points = result["points"]
        b = np.array([p["batch"] for p in points], dtype=float)
        steps, sfo = np.array([p["steps"] for p in points]), np.array([p["sfo"] for p in points])
        grid = np.geomspace(b.min() / 1.5, b.max() * 1.5, 100)
        ax = axes[0]
        ax.loglog(b, steps, "o", color="C0", label="runs (mean over seeds)")
        ax.loglog(grid, steps[0] * b[0] / grid, ":", color="grey", label="perfect scaling (steps ∝ 1/batch)")
        if result["b_crit"] is not None:
            ax.loglog(grid, result["s_min"] * (1 + result["b_crit"] / grid), "-", color="C1",
                      label=f"fit: S_min {result['s_min']:,.3g}, B_crit {result['b_crit']:,.3g}")
            ax.axvline(result["b_crit"], color="C1", alpha=0.3, linewidth=1)
        ax.set(xlabel="global batch size (samples)", ylabel="optimizer steps to target",
               title=f"steps to {result['target']}")
        ax.legend(fontsize=8, loc="upper right")
        ax = axes[1]
        used = {"samples": sfo, "steps": steps, "tokens": np.array([p.get("tokens", np.nan) for p in points])}[x]
        ax.loglog(b, used, "o", color="C0", label="runs (mean over seeds)")
        per_sample = {"samples": 1.0, "steps": None, "tokens": float(np.nanmean(used / sfo))}[x]
        if result["b_crit"] is not None and per_sample:
            ax.loglog(grid, per_sample * result["e_min"] * (1 + grid / result["b_crit"]), "-", color="C1",
                      label=f"fit: E_min {per_sample * result['e_min']:,.3g} {x}")
        ax.set(xlabel="global batch size (samples)", ylabel=f"{WORDS[x]} to target", title=f"{WORDS[x]} to {result['target']}")
        ax.legend(fontsize=8, loc="upper left")
    noise_panel(axes[-1], runs, result.get("b_crit"), X_FIELD[x])
    for ax in axes:
        ax.grid(alpha=0.3, which="both")
    analysis.save(fig, out)


X_FIELD = {"samples": "samples", "tokens": "tokens", "steps": "step"}


def noise_points(run: dict, field: str) -> tuple[dict, str]:
    """{position: noise scale} of one run: its epoch rows where it trained two epochs or more, else (a run
    shorter than two epochs, as a language model's) its logged steps in about 20 windows, each window's
    B_simple the ratio of its mean tr(Σ) to its mean |G|² (a ratio of sums, as an epoch's is)."""
    epochs = {r[field]: r["noise_scale"] for r in run["rows"] if r.get("noise_scale") is not None
              and r.get(field) is not None and not r.get("mid_epoch")}
    if len(epochs) >= 2:
        return epochs, "per epoch"
    steps = [r for r in run["step_rows"] if r.get("grad_sq") is not None and r.get("trace_cov") is not None
             and r.get(field) is not None]
    size = max(1, len(steps) // 20)
    windows = [steps[i:i + size] for i in range(0, len(steps) - size + 1, size)]
    points = {w[-1][field]: sum(r["trace_cov"] for r in w) / sum(r["grad_sq"] for r in w)
              for w in windows if sum(r["grad_sq"] for r in w) > 0}
    return (points, "over logged steps") if points else (epochs, "per epoch")


def noise_panel(ax, runs: list[dict], b_crit: float | None, field: str = "samples") -> None:
    """Each curve's measured noise scale (solid; its seeds' mean) over training, and a growing schedule's
    batch over it (dotted, same colour, each seed): where the batch stays below the noise scale, a step is
    still mostly noise and a larger batch would not waste samples."""
    drawn, how = 0, set()
    for i, curve in enumerate(analysis.group(runs)):
        measured = [noise_points(run, field) for run in curve["runs"]]
        per_run = [points for points, _ in measured]
        x = sorted(set.intersection(*(set(p) for p in per_run)))      # positions every seed measured
        if not x:
            continue
        how.update(h for _, h in measured)
        colour = f"C{i % 10}"
        mean = np.mean([[p[k] for k in x] for p in per_run], axis=0)
        ax.plot(x, mean, "-", marker=".", color=colour, linewidth=1.2, label=curve["label"])
        analysis.draw_batches(ax, curve, field, colour)
        drawn += 1
    for i, curve in enumerate(analysis.group(runs)):       # where an estimate is no measurement: marked apart
        bounds = [(r[field], r["noise_scale_lower_bound"]) for run in curve["runs"] for r in run["rows"]
                  if r.get("noise_scale_lower_bound") is not None and r.get(field) is not None]
        if bounds:
            from launcher.train import noise
            bx, by = zip(*bounds)
            ax.plot(bx, by, "^", color=f"C{i % 10}", fillstyle="none", markersize=6, linestyle="none",
                    label=f"{curve['label']}: lower bound (B_simple >= n/{noise.TRUST_SHARE}, biased low)")
            drawn += 1
    if b_crit is not None:
        ax.axhline(b_crit, color="black", alpha=0.5, linewidth=1, linestyle=":", label="fitted B_crit")
    ax.set_yscale("log")
    ax.set(xlabel={"samples": "samples trained (SFO)", "tokens": "tokens trained", "step": "optimizer steps"}[field],
           ylabel="noise scale B_simple = tr(Σ)/|G|² (samples)",
           title="measured gradient noise scale" + (f", {' and '.join(sorted(how))}" if drawn else
                                                    " (no run measured it)"))
    if drawn or b_crit is not None:
        ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5), frameon=False)
