"""Planning: each epoch's global batch split into micro-batch x accumulation x world size.

The split is exact (micro * accum * world == global batch). The micro-batch grows with the global batch
up to ``max_micro_batch``; past it the accumulation steps grow instead.
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path

import qhm

from .errors import RecipeError, UserError
from .recipe import Recipe


@dataclass(frozen=True)
class EpochPlan:
    epoch: int
    batch: int
    steps: int
    micro_batch: int
    accum: int
    world_size: int
    lr: float
    beta: float
    gamma: float


def split_batch(batch: int, world: int, max_micro: int) -> tuple[int, int]:
    """(micro_batch, accum) with micro * accum * world == batch and micro <= max_micro, micro largest."""
    if batch % world:
        raise ValueError(f"global batch {batch} is not divisible by world size {world}")
    per_rank = batch // world
    micro = max(d for d in range(1, min(per_rank, max_micro) + 1) if per_rank % d == 0)
    return micro, per_rank // micro


def _divisors(b: int) -> list[int]:
    return [d for d in range(1, b + 1) if b % d == 0]


def plan(recipe: Recipe, n: int, world_size: int) -> list[EpochPlan]:
    table = qhm.epoch_table(recipe.schedule_spec(), n)
    max_micro = recipe.distributed.max_micro_batch
    out, splits = [], {}
    for m in range(len(table.epoch)):
        b = int(table.batch[m])
        if b not in splits:
            try:
                splits[b] = split_batch(b, world_size, max_micro)
            except ValueError:
                stage_epochs = [int(e) for e in table.epoch[table.batch == b]]
                works = [d for d in _divisors(b) if d <= 1024]
                raise RecipeError(
                    f"schedule.batch: stage at epochs {stage_epochs[0]}-{stage_epochs[-1]} has global batch "
                    f"{b}, which cannot be split over world size {world_size}; allowed: a world size "
                    f"dividing every stage's batch (here {', '.join(map(str, works))}), or a larger "
                    f"initial batch") from None
        micro, accum = splits[b]
        out.append(EpochPlan(epoch=m, batch=b, steps=int(table.steps[m]), micro_batch=micro, accum=accum,
                             world_size=world_size, lr=float(table.lr[m]), beta=float(table.beta[m]),
                             gamma=float(table.gamma[m])))
    return out


def preflight(recipe: Recipe, world_size: int, check_data: bool = True) -> list[EpochPlan]:
    """What must hold before any worker starts: the output folder can be written, the data is there
    and every stage splits."""
    from . import data
    check_output(recipe)
    if check_data:
        data.check_available(recipe.data)
    return plan(recipe, data.sizes(recipe.data)[0], world_size)


def check_output(recipe: Recipe) -> None:
    """The run folder can be created and written: ``output`` (and the run folder) are folders, or do
    not exist yet under a writable one."""
    for path, key in ((recipe.run_dir, "name"), (Path(recipe.output), "output")):
        if path.exists() and not path.is_dir():
            raise UserError(f"{key}: {str(path)!r} is a file; allowed: a folder (or a path that does not exist yet)")
    probe = recipe.run_dir
    while not probe.exists():
        probe = probe.parent
    if not os.access(probe, os.W_OK | os.X_OK):
        raise UserError(f"output: {recipe.output!r} cannot be written ({str(probe)!r} is not writable); "
                        "allowed: a folder you can write to")


def plan_json(epochs: list[EpochPlan], n: int) -> dict:
    return {"epochs": [asdict(e) for e in epochs], "total_steps": sum(e.steps for e in epochs),
            "total_samples": n * len(epochs), "n": n}


def stages(epochs: list[EpochPlan]) -> list[dict]:
    """Consecutive epochs with the same batch split, for the human-readable table."""
    rows: list[dict] = []
    for e in epochs:
        if rows and rows[-1]["batch"] == e.batch:
            rows[-1]["last"] = e.epoch
            rows[-1]["steps_total"] += e.steps
            continue
        rows.append({"first": e.epoch, "last": e.epoch, "batch": e.batch, "steps": e.steps,
                     "steps_total": e.steps, "micro_batch": e.micro_batch, "accum": e.accum,
                     "world_size": e.world_size})
    return rows


def format_table(epochs: list[EpochPlan], n: int) -> str:
    lines = [f"n = {n} training samples, {len(epochs)} epochs, {sum(e.steps for e in epochs)} optimizer steps, "
             f"{n * len(epochs)} samples (SFO)",
             f"{'epochs':>11} {'batch':>7} {'steps/ep':>8} {'micro':>6} {'accum':>6} {'world':>6} "
             f"{'lr (first..last)':>22} {'beta':>13} {'gamma':>13}"]
    for s in stages(epochs):
        first, last = epochs[s["first"]], epochs[s["last"]]
        lines.append(f"{s['first']:>5}-{s['last']:<5} {s['batch']:>7} {s['steps']:>8} {s['micro_batch']:>6} "
                     f"{s['accum']:>6} {s['world_size']:>6} {first.lr:>10.4g}..{last.lr:<10.4g} "
                     f"{first.beta:>6.4g}..{last.beta:<5.4g} {first.gamma:>6.4g}..{last.gamma:<5.4g}")
    return "\n".join(lines)
