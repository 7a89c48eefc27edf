"""Branch folders (``qhm-launch branch`` writes them) read back, and the critical batch size they
measure: Merrill et al. 2025's local-recovery criterion.

At each position of a parent, the control is the branch at factor 1 (the parent's own batch); a branch
at factor f recovers when its loss after the branch's length is within the tolerance of the control's:
loss_f <= loss_1 + EPS (absolute), or <= loss_1 (1 + EPS) with a tolerance written "2%". The CBS there is
the largest batch (the parent's batch x f) that recovers; where only the control does, the parent's
batch (the measurement says only that the CBS is below the next factor tried); where the largest factor
tried recovers, a lower bound (``censored``).

The loss is the branch's final evaluation (``test_loss``: the validation set's, at its last step) or,
with loss "train", the mean ``train_loss`` of its step rows over the last tenth of its steps.
"""
from __future__ import annotations

import json
import statistics
from pathlib import Path

from launcher.errors import UserError
from launcher.run.folder import RunFolder

LOSSES = ("test", "train")


def folders(paths) -> list[Path]:
    """The branch folders among ``paths``: each that holds a branch.json, or those in it that do."""
    out = []
    for path in map(Path, paths):
        if (path / "branch.json").is_file():
            out.append(path)
        elif path.is_dir():
            out += sorted(p for p in path.iterdir() if (p / "branch.json").is_file())
    return out


def load(path: Path) -> dict:
    folder = RunFolder(path)
    return {"dir": path, "branch": json.loads((path / "branch.json").read_text()), "rows": folder.metric_rows(),
            "mid_epoch_rows": folder.mid_epoch_rows(), "step_rows": folder.step_rows()}


def parse_tolerance(text) -> tuple[float, bool]:
    """(EPS, relative?) from 0.01 or "2%"."""
    relative = str(text).strip().endswith("%")
    try:
        value = float(str(text).strip().rstrip("%"))
    except ValueError:
        value = -1.0
    if not value >= 0:
        raise UserError(f"--tolerance: {text!r} is not valid; allowed: a loss difference >= 0 (0.01), or a share "
                        "of the control's loss (2%)")
    return (value / 100 if relative else value), relative


def final_loss(run: dict, which: str) -> float | None:
    """The branch's loss after its length: its last evaluation's test_loss, or its steps' mean train_loss
    over the last tenth of them."""
    if which == "test":
        evaluated = sorted((r for r in run["rows"] + run["mid_epoch_rows"]
                            if r.get("test_loss") is not None and r.get("step") is not None), key=lambda r: r["step"])
        return evaluated[-1]["test_loss"] if evaluated else None
    steps = [r for r in run["step_rows"] if r.get("train_loss") is not None]
    if not steps:
        return None
    return statistics.fmean(r["train_loss"] for r in steps[-max(1, len(steps) // 10):])


def measure(paths, tolerance="0.01", loss: str = "test") -> dict:
    """Per parent and position: the control's and every factor's loss, and the CBS."""
    if loss not in LOSSES:
        raise UserError(f"--loss: {loss!r} is not valid; allowed: {' | '.join(LOSSES)}")
    eps, relative = parse_tolerance(tolerance)
    found = folders(paths)
    if not found:
        raise UserError(f"--cbs: none of {', '.join(map(str, paths))} holds branches (branch.json); allowed: the "
                        "folders qhm-launch branch writes (<output>/<parent>.branches)")
    at: dict[tuple, dict] = {}
    for path in found:
        run = load(path)
        b = run["branch"]
        batch = next((r["batch"] for r in reversed(run["rows"] + run["step_rows"]) if r.get("batch")), None)
        entry = at.setdefault((b["parent"], b["at_step"]), {"parent": b["parent"], "at_step": b["at_step"],
                                                            "position": b["position"], "unit": b["unit"],
                                                            "factors": {}})
        entry["factors"][int(b["factor"])] = {"loss": final_loss(run, loss), "batch": batch, "run": str(path)}
    rows = []
    for key in sorted(at):
        entry = at[key]
        control = entry["factors"].get(1)
        if control is None or control["loss"] is None:
            raise UserError(f"--cbs: the branches of {entry['parent']} at global step {entry['at_step']} have no "
                            f"control (factor 1{' with a ' + loss + ' loss' if control else ''}); allowed: branches "
                            "with their control (qhm-launch branch runs factor 1 always: run it again)")
        limit = control["loss"] * (1 + eps) if relative else control["loss"] + eps
        best = max(f for f, v in entry["factors"].items() if v["loss"] is not None and v["loss"] <= limit)
        base = control["batch"] // 1 if control["batch"] else None
        rows.append({**entry, "control_loss": control["loss"], "limit": limit, "parent_batch": base,
                     "cbs": base * best if base else None, "largest_factor": best, "tried": sorted(entry["factors"]),
                     "censored": best == max(entry["factors"]) and best > 1})
    return {"loss": "test_loss" if loss == "test" else "train_loss (mean over the last tenth of each branch)",
            "tolerance": f"{eps * 100:g}% of the control's loss" if relative else f"{eps:g} of the control's loss",
            "positions": rows}


def warmup_points(paths, tolerance="0.01", loss: str = "test") -> tuple[str, list[list[int]]]:
    """A piecewise batch schedule along the measured CBS: (the branches' unit, [[position, batch], ...]),
    the first at 0; batches never decrease (each the largest CBS measured at or before its position,
    averaged over seeds where several parents were branched)."""
    result = measure(paths, tolerance, loss)
    units = {r["unit"] for r in result["positions"]}
    if len(units) > 1:
        raise UserError(f"schedule.batch.branches: the branches count positions in {', '.join(sorted(units))}; "
                        "allowed: branches of one unit")
    unit = units.pop()
    by_position: dict[int, list[int]] = {}
    for r in result["positions"]:
        if r["cbs"] is not None:
            by_position.setdefault(r["position"][unit], []).append(r["cbs"])
    points, largest = [], 0
    for position in sorted(by_position):
        batch = max(largest, round(statistics.fmean(by_position[position])))
        if batch != largest:
            points.append([position, batch])
        largest = batch
    if not points:
        raise UserError("schedule.batch.branches: no branch measured a CBS; allowed: branch folders with losses")
    points[0][0] = 0
    return unit, points
