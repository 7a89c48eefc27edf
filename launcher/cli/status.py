"""``qhm-launch status RUNS...``: where each run stands, from its folder alone.

done (complete.json) / running (its folder's lock is held here, or was touched by a run on another
host in the last ten minutes) / preempted (waiting for requeue: preempted.json) / failed (failed.json,
with its one line) / interrupted (checkpoints but no marker: killed; the same command resumes) /
not started. The epoch and global step reached come from the newest checkpoint's manifest, else from
metrics.jsonl. A sweep's folder (with points.json) stands for all of its points.
"""
from __future__ import annotations

import fcntl
import glob
import json
import os
import re
import socket
import time
from pathlib import Path

from launcher.errors import UserError, one_line
from launcher.run.folder import RunFolder, lock_owner

HEARTBEAT = 600           # seconds: a run on another host that logged this recently is running


def is_run_folder(path: Path) -> bool:
    """What ``run`` or ``submit`` made: a folder with the resolved recipe (or the lock, for the moment
    between taking it and writing the recipe)."""
    return (path / "recipe.yaml").is_file() or (path / ".lock").is_file()


def run_folders(paths: list) -> list[Path]:
    """Run folders: each path that is one, the points of a sweep folder (points.json), the branches of a
    ``<run>.branches`` folder (the run folders in it), or a local sweep's points (``sweep --local`` writes
    ``<output>/<name>_<point>`` folders and no ``<name>``).
    Anything else is a one-line error: "not started" is for a run that exists and has not started."""
    out = []
    for path in map(Path, paths):
        points = path / "points.json"
        if points.is_file():
            try:
                out += [Path(p["run_dir"]) for p in json.loads(points.read_text())]
            except (ValueError, KeyError, TypeError) as exc:
                raise UserError(f"runs: {str(points)!r} is not a sweep's list of points ({one_line(exc)})") from None
        elif is_run_folder(path):
            out.append(path)
        elif path.is_dir() and any(is_run_folder(p) for p in path.iterdir()):     # a branch study's folder
            out += sorted((p for p in path.iterdir() if is_run_folder(p)), key=natural_order)
        else:
            local = sorted((p for p in path.parent.glob(glob.escape(path.name) + "_*") if is_run_folder(p)), key=natural_order)
            if not local:
                raise UserError(f"runs: {str(path)!r} is not a run folder (no recipe.yaml), a sweep folder (no "
                                f"points.json) or a local sweep's name (no {path.name}_* run folders beside it); "
                                "allowed: <output>/<name> of a run or sweep")
            out += local
    return out


def natural_order(path: Path) -> list:
    """A folder name's sort key with its numbers as numbers: batch x2 before x16, point_9 before point_10."""
    return [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", path.name)]


def _lock_holder(folder: RunFolder) -> str | None:
    """'pid on host' of a live run holding the folder, or None."""
    if not folder.lock.exists():
        return None
    try:
        fd = os.open(folder.lock, os.O_RDONLY)
    except OSError:
        return None
    try:
        owner = lock_owner(fd)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            held = False
        except OSError:
            held = True
    finally:
        os.close(fd)
    if held:
        return f"pid {owner[0]} on {owner[1]}" if owner else "a live process"
    remote = owner is not None and owner[1] != socket.gethostname()
    if remote and time.time() - folder.lock.stat().st_mtime < HEARTBEAT:
        return f"pid {owner[0]} on {owner[1]}"
    return None


def _position(folder: RunFolder) -> tuple:
    """(epoch, global step) reached: the newest checkpoint's, else the last metrics row's, else the last
    step row's (a run killed before its first checkpoint and epoch row has trained all the same)."""
    latest = folder.checkpoints / "latest"
    try:
        manifest = json.loads((folder.checkpoints / latest.read_text().strip() / "manifest.json").read_text())
        position = manifest["position"]
        return position["epoch"], position["global_step"]
    except (OSError, ValueError, KeyError, TypeError):
        rows = folder.metric_rows()
        if rows:
            return rows[-1]["epoch"] + 1, rows[-1].get("step")
        steps = folder.step_rows()
        return (steps[-1].get("epoch"), steps[-1]["step"]) if steps else (None, None)


def run_status(path: Path) -> dict:
    folder = RunFolder(path)
    epoch, step = _position(folder)
    out = {"run": str(path), "state": "not started", "epoch": epoch, "step": step, "detail": ""}
    holder = _lock_holder(folder)
    complete, failed, preempted = (folder.read_json(p) for p in (folder.complete, folder.failed, folder.preempted))
    if holder:
        out.update(state="running", detail=holder)
    elif complete and folder.final_model.is_file():
        out.update(state="done", epoch=complete.get("epochs"), step=complete.get("global_step"))
    elif complete:
        out.update(state="interrupted", detail="complete.json without final_model.pt; the same command writes it")
    elif failed:
        out.update(state="failed", detail=failed.get("error", ""))
    elif preempted:
        out.update(state="preempted", detail="waiting for requeue (or run the same command)")
    elif step is not None:
        out.update(state="interrupted", detail="stopped without a marker (killed?); the same command resumes")
    return out


def table(paths: list) -> str:
    rows = [run_status(p) for p in run_folders(paths)]
    fmt = lambda v: "-" if v is None else str(v)  # noqa: E731
    lines = ["| run | state | epoch | step | detail |", "|---|---|---|---|---|"]
    lines += [f"| {r['run']} | {r['state']} | {fmt(r['epoch'])} | {fmt(r['step'])} | {r['detail']} |" for r in rows]
    counts = {}
    for r in rows:
        counts[r["state"]] = counts.get(r["state"], 0) + 1
    return "\n".join(lines + ["", ", ".join(f"{n} {state}" for state, n in counts.items())])
