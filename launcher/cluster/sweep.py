"""Sweeps: a grid of recipe overrides times seeds, each point a run with a name made of its values
(``sweep.yaml``: recipe, name, grid, seeds, set). Submitted as one Slurm job array
(:mod:`launcher.cluster.slurm`) or run here one after another (``--local``)."""
from __future__ import annotations

import hashlib
import itertools
import json
import re
import sys
from pathlib import Path

from launcher import config as recipe_mod
from launcher import env
from launcher.config import yamlfile
from launcher.errors import PREEMPTED, UserError


def load_spec(path: Path) -> dict:
    spec = yamlfile.load(path, "sweep")
    if not isinstance(spec, dict):
        raise UserError(f"sweep: {str(path)!r} must be a mapping with recipe, name, grid, seeds")
    allowed = {"recipe", "name", "grid", "seeds", "set"}
    for key in spec:
        if key not in allowed:
            raise UserError(f"sweep.{key}: unknown key; allowed keys here: {', '.join(sorted(allowed))}")
    for key in ("recipe", "name"):
        value = spec.get(key)
        if not isinstance(value, str) or not value or not value.isprintable() or (key == "name" and "/" in value):
            raise UserError(f"sweep.{key}: {value!r} is not valid; allowed: "
                            + ("a file path" if key == "recipe" else "a folder name without '/' or control characters"))
    grid = spec.get("grid") or {}
    if not isinstance(grid, dict) or not all(isinstance(v, list) and v for v in grid.values()):
        raise UserError(f"sweep.grid: {grid!r} is not valid; allowed: a mapping of KEY.PATH to non-empty lists")
    if not isinstance(spec.get("set") or {}, dict):
        raise UserError(f"sweep.set: {spec['set']!r} is not valid; allowed: a mapping of KEY.PATH to a value")
    seeds = spec.get("seeds", [None])
    if not isinstance(seeds, list) or not seeds:
        raise UserError(f"sweep.seeds: {seeds!r} is not valid; allowed: a non-empty list of integers")
    spec["seeds"] = seeds
    spec["recipe"] = str((Path(path).parent / spec["recipe"]).resolve())
    return spec


def point_name(sweep: str, keys: list[str], values: tuple) -> str:
    """A grid point's run name: the sweep's name and every grid key's value, short and filesystem-safe,
    e.g. ``qhm-grid_lr.max=0.05_beta.max=0.3``. It depends on the point's values alone, so adding values
    or keys to the grid never renames a point that was already there (a key's name stays in the name
    even while it has one value). Too long a name is cut and completed by a hash of the whole."""
    def short(key):
        return ".".join(key.split(".")[-2:])

    def fmt(value):
        if isinstance(value, dict):            # canonical whatever the file's key order: kind first
            rest = [f"{k}{fmt(v)}" for k, v in sorted(value.items()) if k != "kind"]
            return "-".join(([fmt(value["kind"])] if "kind" in value else []) + rest)
        if isinstance(value, list):
            return "-".join(fmt(v) for v in value)
        return str(value)
    label = "_".join(f"{short(k)}={fmt(v)}" for k, v in zip(keys, values))
    name = re.sub(r"[^A-Za-z0-9.=+_-]", "-", f"{sweep}_{label}" if label else sweep)
    if len(name) > 100:
        digest = hashlib.sha256(name.encode()).hexdigest()[:8]
        name = f"{name[:91]}~{digest}"
    return name


def grid_points(spec: dict, extra: list[str] = ()) -> list[dict]:
    """One entry per grid point and seed: its overrides (the sweep's ``set``, then ``extra``, e.g. from
    --set), its run name and its W&B group (the point's name: its seeds share it)."""
    keys = list(spec["grid"])
    points = []
    for i, values in enumerate(itertools.product(*(spec["grid"][k] for k in keys))):
        label = ",".join(f"{k}={v}" for k, v in zip(keys, values))
        group = point_name(spec["name"], keys, values)
        for seed in spec["seeds"]:
            overrides = [f"{k}={json.dumps(v)}" for k, v in zip(keys, values)]
            overrides += [f"{k}={json.dumps(v)}" for k, v in (spec.get("set") or {}).items()]
            overrides += list(extra)
            name = group
            if seed is not None:
                overrides.append(f"seed={seed}")
                name += f"_s{seed}"
            overrides += [f"name={name}", f"tracking.wandb.group={group}"]
            points.append({"index": len(points), "point": i, "seed": seed, "label": label, "name": name,
                           "overrides": overrides})
    return points


def stop_requested(signals: list[int], point: dict, points: list[dict]) -> int | None:
    """PREEMPTED, said in one line, where a preemption signal came in between points or as the point
    before finished (that point is complete: nothing is lost); None otherwise."""
    if not signals:
        return None
    import signal as signal_mod
    name = signal_mod.Signals(signals[0]).name
    print(f"qhm-launch: {name}: sweep stopped before point {point['index'] + 1}/{len(points)}; every point before it "
          f"is complete; run the same command to resume (exit {PREEMPTED})", flush=True)
    return PREEMPTED


def run_locally(points: list[dict], recipes: list, run_point) -> int:
    """Each point through `qhm-launch run` (which resumes or skips completed runs), in order, in this
    process: ``run_point(recipe path)`` is the CLI's own run command, so a point does not pay a Python
    start and a torch import of its own, and the checks of the user's factories are shared (their data,
    model and loss were already checked for every point). Each point still gets its own torchrun and
    process group: a failure or a kill in one cannot touch another. A preempted point (Ctrl-C, SIGTERM)
    stops the sweep; the same command resumes it there."""
    from launcher.cluster import supervise
    failed = []
    env.record_early_signals()       # between points a signal is recorded, never the process's death
    supervise.take_received()
    for p, r in zip(points, recipes):
        stopped = stop_requested(supervise.take_received(), p, points)
        if stopped is not None:
            return stopped
        print(f"[qhm-launch] sweep point {p['index'] + 1}/{len(points)}: {r.name} ({p['label']})", flush=True)
        try:
            rc = run_point(str(r.folder.write_recipe(recipe_mod.dump(r)))) if not r.folder.in_use() else 2
            if rc == 2 and r.folder.in_use():
                print(f"qhm-launch: error: {r.folder.path} is in use by another run; its files are left as they "
                      "are (allowed: run the sweep again when it has finished)", file=sys.stderr, flush=True)
        except UserError as exc:                # this point's folder, not the sweep: the others run on
            print(f"qhm-launch: error: {exc}", file=sys.stderr, flush=True)
            rc = 2
        if rc == PREEMPTED:
            print(f"qhm-launch: sweep stopped at point {p['index'] + 1}/{len(points)} ({r.name}), preempted with a "
                  f"checkpoint; run the same command to resume (exit {PREEMPTED})", flush=True)
            return PREEMPTED
        if rc != 0:
            failed.append(f"{r.name} (exit {rc})")
        env.record_early_signals()   # the run restored what it found; the sweep records again
    if failed:
        print(f"qhm-launch: {len(failed)} of {len(points)} runs failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    print(f"qhm-launch: {len(points)} runs done")
    return 0
