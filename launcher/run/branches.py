"""Branch folders (``qhm-launch branch`` writes them) read back, and the critical batch size they
measure: Merrill et al. 2025's local-recovery criterion, with seeds.

At each position of a parent, the control is the branch at factor 1 (the parent's own batch). A factor's
gap is its loss minus the control's after the branch's length (each seed against the control of the same
seed: the same data order index), or with a tolerance written "2%" its loss over the control's minus 1.
With K seeds the gap has a ``level`` interval over seeds (Student's t, K - 1 degrees of freedom); a factor
*recovers* when the interval's upper end is within the tolerance EPS, *fails* when its lower end is past
it, and is *uncertain* otherwise (with one seed: the gap itself against EPS, no interval). The CBS is the
parent's batch times the largest factor that recovers with every smaller factor tried, and its interval
runs from there to the largest factor before the first that fails (the CBS is below that next one). Where
the largest factor tried recovers, the CBS is censored ("or more") and the answer names the factor to add.

The loss is the branch's final evaluation (``test_loss``: the validation set's, at its last step) or,
with loss "train", the mean ``train_loss`` of its step rows over the last tenth of its steps. Every
factor must be scored at the same position (branches end exactly at their length); a set whose factors
end apart, or a branch shorter than MIN_STEPS steps, is warned of by name.
"""
from __future__ import annotations

import json
import math
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
    return {"dir": path, "branch": read_branch(path), "rows": folder.metric_rows(),
            "mid_epoch_rows": folder.mid_epoch_rows(), "step_rows": folder.step_rows()}


def read_branch(path: Path) -> dict:
    """A branch folder's branch.json, checked: an object naming its parent (text), a branch step and
    factor (integers >= 0 and >= 1), a unit and a position in it. Raises ValueError saying what is wrong."""
    try:
        b = json.loads((Path(path) / "branch.json").read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"branch.json does not read as JSON ({type(exc).__name__})") from None
    if not isinstance(b, dict):
        raise ValueError(f"branch.json holds a {type(b).__name__}, not an object")
    integer = lambda v, low: isinstance(v, int) and not isinstance(v, bool) and v >= low  # noqa: E731
    problems = [key for key, ok in (("parent", isinstance(b.get("parent"), str)), ("at_step", integer(b.get("at_step"), 0)),
                                    ("factor", integer(b.get("factor"), 1)), ("seed", integer(b.get("seed", 0), 0)),
                                    ("unit", b.get("unit") in FIELDS),
                                    ("position", isinstance(b.get("position"), dict) and
                                     integer(b.get("position", {}).get(b.get("unit")), 0)))
                if not ok]
    if problems:
        raise ValueError(f"branch.json: {', '.join(f'{k}={b.get(k)!r}' for k in problems)} not valid")
    return b


DEFAULT_TOLERANCE = "2%"    # branch --cbs and schedule.batch.kind warmup_from alike
LEVEL = 0.9                 # the gaps' intervals over seeds
MIN_STEPS = 20              # a branch with fewer steps says little about the batch it trained at
FIELDS = {"step": "step", "sample": "samples", "token": "tokens"}   # a position's unit -> the rows' field


def parse_tolerance(text) -> tuple[float, bool]:
    """(EPS, relative?) from 0.01 or "2%" (None: the default, DEFAULT_TOLERANCE)."""
    text = DEFAULT_TOLERANCE if text is None else text
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


def gap_interval(gaps: list[float], level: float) -> tuple[float, float] | None:
    """The ``level`` interval of the mean gap over seeds (Student's t); None with one seed."""
    if len(gaps) < 2:
        return None
    from scipy.stats import t
    half = float(t.ppf(0.5 + level / 2, len(gaps) - 1)) * statistics.stdev(gaps) / len(gaps) ** 0.5
    mean = statistics.fmean(gaps)
    return mean - half, mean + half


def verdict(gap: float, interval: tuple | None, eps: float) -> str:
    """recovers | fails | uncertain, by the interval where there is one, else by the gap."""
    lo, hi = interval or (gap, gap)
    eps += 1e-12 * max(1.0, eps)            # a gap that is the tolerance but for rounding (1.56 / 1.5 - 1 vs 4%)
    return "recovers" if hi <= eps else "fails" if lo > eps else "uncertain"


def branch_batch(run: dict) -> int | None:
    """The parent's batch at the branch point: branch.json's, or (folders of an earlier version) the
    largest batch of the branch's rows over its factor."""
    b = run["branch"]
    if b.get("parent_batch"):
        return int(b["parent_batch"])
    batches = [r["batch"] for r in run["rows"] + run["step_rows"] if r.get("batch")]
    return max(batches) // int(b["factor"]) if batches else None


def measure(paths, tolerance=None, loss: str = "test", level: float = LEVEL) -> dict:
    """Per parent and position: every factor's losses per seed, its gap to the control with an interval,
    its verdict, and the CBS with its interval (the module docstring)."""
    if loss not in LOSSES:
        raise UserError(f"--loss: {loss!r} is not valid; allowed: {' | '.join(LOSSES)}")
    eps, relative = parse_tolerance(tolerance)
    found = folders(paths)
    if not found:
        raise UserError(f"--cbs: none of {', '.join(map(str, paths))} holds branches (branch.json); allowed: the "
                        "folders qhm-launch branch writes (<output>/<parent>.branches)")
    at: dict[tuple, dict] = {}
    warnings = []
    for path in found:
        try:
            run = load(path)
        except ValueError as exc:          # a folder that is no readable branch: named, and left out
            warnings.append(f"{path}: left out: {exc}")
            continue
        b = run["branch"]
        entry = at.setdefault((b["parent"], b["at_step"]), {"parent": b["parent"], "at_step": b["at_step"],
                                                            "position": b["position"], "unit": b["unit"],
                                                            "factors": {}, "parent_batch": None})
        entry["parent_batch"] = entry["parent_batch"] or branch_batch(run)
        last = (run["rows"] or [{}])[-1]
        steps = (last.get("step") or 0) - b["at_step"]
        if last and steps < MIN_STEPS:
            warnings.append(f"{path.name}: {steps} steps, fewer than {MIN_STEPS}: its loss says little about its batch "
                            "(a longer --for)")
        factor = entry["factors"].setdefault(int(b["factor"]), {"losses": {}, "runs": [], "ends": set()})
        value = final_loss(run, loss)
        if value is not None and not math.isfinite(value):
            warnings.append(f"{path.name}: its {loss} loss is {value}: left out")
            value = None
        factor["losses"][int(b.get("seed") or 0)] = value
        factor["runs"].append(str(path))
        factor["ends"].add(last.get(FIELDS[b["unit"]]))
    if not at:
        raise UserError(f"--cbs: none of the {len(found)} branch folder(s) reads ({warnings[0]}); allowed: the folders "
                        "qhm-launch branch writes, with their branch.json as written")
    rows = []
    for key in sorted(at):
        entry = at[key]
        control = entry["factors"].get(1)
        control_losses = {s: v for s, v in (control or {"losses": {}})["losses"].items() if v is not None}
        if not control_losses:
            raise UserError(f"--cbs: the branches of {entry['parent']} at global step {entry['at_step']} have no "
                            f"control (factor 1{' with a ' + loss + ' loss' if control else ''}); allowed: branches "
                            "with their control (qhm-launch branch runs factor 1 always: run it again)")
        ends = set().union(*(f["ends"] for f in entry["factors"].values()))
        if len(ends) > 1:
            warnings.append(f"{Path(entry['parent']).name} at step {entry['at_step']}: the factors end at different "
                            f"{FIELDS[entry['unit']]} ({', '.join(f'{e:,}' for e in sorted(e for e in ends if e is not None))}): "
                            "branches of an earlier version (run them again to compare at one position)")
        for _, v in sorted(entry["factors"].items()):
            gaps = [(v["losses"][s] / control_losses[s] - 1 if relative else v["losses"][s] - control_losses[s])
                    for s in sorted(v["losses"]) if v["losses"][s] is not None and s in control_losses]
            v["gap"] = statistics.fmean(gaps) if gaps else None
            v["interval"] = gap_interval(gaps, level) if gaps else None
            v["seeds"] = len(gaps)
            v["verdict"] = verdict(v["gap"], v["interval"], eps) if gaps else "missing"
            v["loss"] = statistics.fmean(x for x in v["losses"].values() if x is not None) if gaps else None
            v["ends"] = sorted(e for e in v["ends"] if e is not None)
        rows.append(_cbs_row(entry, control_losses))
    return {"loss": "test_loss" if loss == "test" else "train_loss (mean over the last tenth of each branch)",
            "tolerance": f"{eps * 100:g}% of the control's loss" if relative else f"{eps:g} of the control's loss",
            "level": level, "positions": rows, "warnings": warnings}


def _cbs_row(entry: dict, control_losses: dict) -> dict:
    """The CBS of one position from its factors' verdicts (the module docstring)."""
    tried = sorted(entry["factors"])
    verdicts = [entry["factors"][f]["verdict"] for f in tried]

    def largest_while(ok) -> int:
        best = 1
        for f, v in zip(tried, verdicts):
            if not ok(f, v):
                break
            best = f
        return best
    low = largest_while(lambda f, v: f == 1 or v == "recovers")
    high = largest_while(lambda f, v: f == 1 or v in ("recovers", "uncertain"))
    beyond = next((f for f in tried if f > high), None)         # the first factor that fails (or is missing)
    base = entry["parent_batch"]
    seeds = min(entry["factors"][f]["seeds"] for f in tried if entry["factors"][f]["seeds"]) if tried else 0
    censored = low == tried[-1] and low > 1                     # the CBS itself: at least this
    open_above = high == tried[-1] and high > 1                 # its interval: no factor tried bounds it
    row = {**entry, "control_loss": statistics.fmean(control_losses.values()), "largest_factor": low,
           "tried": tried, "censored": censored, "open_above": open_above, "seeds": seeds,
           "cbs": base * low if base else None,
           "cbs_interval": None if seeds < 2 or not base else [base * low, base * high],
           "below": base * beyond if base and beyond else None}
    if open_above:
        row["advice"] = (f"add factor {tried[-1] * 2} (--batch ...,{tried[-1] * 2}): the largest tried "
                         + ("recovered" if censored else "may recover"))
    elif seeds >= 2 and low < high:
        row["advice"] = "more seeds (--seeds) narrow it: some factors are within the tolerance's reach either way"
    elif seeds < 2:
        row["advice"] = "one seed: no interval (branch --seeds 3 or more gives one)"
    return row


def warmup_points(paths, tolerance=None, loss: str = "test") -> tuple[str, list[list[int]]]:
    """A piecewise batch schedule along the measured CBS: (the branches' unit, [[position, batch], ...]),
    the first at 0; batches never decrease (each the largest CBS measured at or before its position,
    averaged over seeds where several parents were branched). With seeds, a position's CBS is the batch
    that recovers at the stated confidence (its interval's lower end)."""
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
