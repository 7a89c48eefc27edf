"""The scaling study's figure (``qhm-launch scaling --out``): steps and samples to the target against
the batch size with the fitted trade-off, and each run's measured noise scale over training with its
batch drawn over it (does an increasing schedule track the critical batch size?)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from launcher.cli import scaling as scaling_mod
from launcher.errors import UserError


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


def scaling_figure(runs: list[dict], result: dict, out: str) -> None:
    check_out(out)
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    plt.rcParams.update({"font.size": 10})
    fitted = "points" in result
    fig, axes = plt.subplots(1, 3 if fitted else 1, figsize=(15 if fitted else 6, 4.2), squeeze=False)
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
        ax.loglog(b, sfo, "o", color="C0", label="runs (mean over seeds)")
        if result["b_crit"] is not None:
            ax.loglog(grid, result["e_min"] * (1 + grid / result["b_crit"]), "-", color="C1",
                      label=f"fit: E_min {result['e_min']:,.3g} samples")
        ax.set(xlabel="global batch size (samples)", ylabel="samples (SFO) to target", title=f"SFO to {result['target']}")
        ax.legend(fontsize=8, loc="upper left")
    noise_panel(axes[-1], runs, result.get("b_crit"))
    for ax in axes:
        ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    save(fig, out)


def noise_panel(ax, runs: list[dict], b_crit: float | None) -> None:
    """Each run's measured noise scale (solid) over the samples it trained on; an increasing schedule's
    batch (dashed, same colour) over it."""
    drawn = 0
    for i, run in enumerate(runs):
        rows = [r for r in run["step_rows"] if r.get("noise_scale") is not None]
        if not rows:
            continue
        colour = f"C{i % 10}"
        constant = scaling_mod.constant_batch(run["recipe"])
        name = f"batch {constant}" if constant else f"{Path(str(run['dir'])).name} (increasing)"
        x = [r["samples"] for r in rows]
        ax.plot(x, [r["noise_scale"] for r in rows], "-", color=colour, linewidth=1, label=f"noise scale, {name}")
        if constant is None:
            ax.step([r["samples"] for r in run["step_rows"]], [r["batch"] for r in run["step_rows"]], "--",
                    where="post", color=colour, label=f"its batch, {name}")
        drawn += 1
    if b_crit is not None:
        ax.axhline(b_crit, color="C1", alpha=0.6, linewidth=1, label="fitted B_crit")
    ax.set_yscale("log")
    ax.set(xlabel="samples trained (SFO)", ylabel="B_simple = tr(Σ) / |G|² (samples)",
           title="measured gradient noise scale" + ("" if drawn else " (no run measured it)"))
    if drawn or b_crit is not None:
        ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))
