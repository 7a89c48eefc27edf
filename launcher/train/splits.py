"""Each epoch's global batch split into micro-batch x accumulation over the world (the stage table).

Any world size runs any schedule: a batch that divides over the world splits exactly (micro * accum *
world == global batch); one that does not gives ranks ceil or floor of batch/world samples, and a batch
smaller than the world leaves the last ranks without data (they join the gradient reduce with zeros).
The micro-batch grows with the global batch up to ``max_micro_batch``; past it accumulation grows.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import qhm

from launcher.errors import RecipeError
from launcher.config import Recipe


@dataclass(frozen=True)
class EpochSplit:
    epoch: int
    batch: int
    steps: int
    micro_batch: int
    accum: int
    world_size: int
    data_ranks: int          # ranks that carry samples of a full batch (all, unless batch < world size)
    lr: float
    beta: float
    gamma: float


def ceil_div(a: int, b: int) -> int:
    """ceil(a / b) for integers, exactly (no float)."""
    return -(-a // b)


def split_batch(batch: int, world: int, max_micro: int) -> tuple[int, int]:
    """(micro_batch, accum): this rank's share of a global batch cut into ``accum`` micro-batches of at
    most ``micro_batch`` <= ``max_micro`` samples.

    A batch that divides over the world splits exactly (micro * accum * world == batch, micro the
    largest divisor of batch/world within the cap: every micro-batch the same shape). Otherwise ranks
    carry ceil(batch/world) or floor(batch/world) samples (some none at all when the batch is smaller
    than the world): micro and accum cover the largest share, and a rank with less runs fewer or
    smaller micro-batches; the loss is normalised by the global batch either way, so the update is the
    same."""
    share = ceil_div(batch, world)
    if batch % world == 0:
        micro = max(d for d in range(1, min(share, max_micro) + 1) if share % d == 0)
        return micro, share // micro
    micro = min(share, max_micro)
    return micro, ceil_div(share, micro)


def split_epochs(recipe: Recipe, n: int, world_size: int, max_micro: int | None = None) -> list[EpochSplit]:
    """Every epoch's batch, steps, split over ``world_size`` ranks and hyper-parameters. A batch larger
    than the training set is refused (its epochs would not be the schedule's: one step over fewer
    samples), in one line naming the epoch."""
    table = qhm.epoch_table(recipe.schedule_spec(), n)
    too_big = [int(m) for m in table.epoch[table.batch > n]]
    if too_big:
        m = too_big[0]
        raise RecipeError(f"schedule.batch: the batch reaches {int(table.batch[m])} at epoch {m}, more than the "
                          f"{n} training samples; allowed: a schedule whose batch stays within the data (fewer "
                          "epochs, a smaller growth or a longer interval)")
    max_micro = max_micro or micro_cap(recipe)
    out, splits = [], {}
    for m in range(len(table.epoch)):
        b = int(table.batch[m])
        if b not in splits:
            splits[b] = split_batch(b, world_size, max_micro)
        micro, accum = splits[b]
        out.append(EpochSplit(epoch=m, batch=b, steps=int(table.steps[m]), micro_batch=micro, accum=accum,
                             world_size=world_size, data_ranks=min(world_size, b), lr=float(table.lr[m]),
                             beta=float(table.beta[m]), gamma=float(table.gamma[m])))
    return out


def micro_cap(recipe: Recipe) -> int:
    """The recipe's micro-batch cap; with "auto", the CPU cap (a run on GPUs probes each stage)."""
    cap = recipe.distributed.max_micro_batch
    return recipe.distributed.cpu_micro_batch if cap == "auto" else cap


@dataclass(frozen=True)
class Segment:
    """Epochs [first, last] of an elastic chain, on ``nodes`` nodes: one Slurm job."""
    first: int
    last: int
    nodes: int


def elastic_segments(recipe: Recipe, n: int, per_node: int, max_nodes: int) -> list[Segment]:
    """Cut the schedule where the nodes a stage can use well change: a stage of batch b gets the most
    nodes (up to ``max_nodes``) that still give every rank at least ``distributed.min_rank_batch``
    samples, and at least one. An adaptive batch is refused: its stages are decided at run time."""
    if recipe.schedule.batch.kind == "adaptive":
        raise RecipeError("--elastic: not valid with schedule.batch.kind adaptive (an elastic chain's segments follow "
                          "the batch, which is decided at run time); allowed: submit without --elastic, or a fixed "
                          "schedule (exponential)")
    table = qhm.epoch_table(recipe.schedule_spec(), n)
    floor = recipe.distributed.min_rank_batch
    segments: list[Segment] = []
    for m, b in enumerate(int(x) for x in table.batch):
        nodes = max(1, min(max_nodes, b // (floor * per_node)))
        if segments and segments[-1].nodes == nodes:
            segments[-1] = Segment(segments[-1].first, m, nodes)
        else:
            segments.append(Segment(m, m, nodes))
    return segments


def gpu_hours(epochs: list[EpochSplit], world_of, rate: float, floor: int) -> tuple[float, float]:
    """(GPU-hours, wall hours) of training ``epochs``, epoch m on ``world_of(m)`` GPUs, if a GPU processes
    ``rate`` samples/s and a rank with fewer than ``floor`` samples of a batch is no faster (an estimate:
    evaluation and communication left out)."""
    gpu = wall = 0.0
    for e in epochs:
        world = world_of(e.epoch)
        seconds = e.steps * max(ceil_div(e.batch, world), floor) / rate
        wall += seconds
        gpu += world * seconds
    return gpu / 3600, wall / 3600


def plan_json(epochs: list[EpochSplit], n: int) -> dict:
    return {"epochs": [asdict(e) for e in epochs], "total_steps": sum(e.steps for e in epochs),
            "total_samples": n * len(epochs), "n": n}


def stage_rows(epochs: list[EpochSplit]) -> list[dict]:
    """Consecutive epochs with the same batch split, for the human-readable table."""
    rows: list[dict] = []
    for e in epochs:
        if rows and rows[-1]["batch"] == e.batch:
            rows[-1]["last"] = e.epoch
            rows[-1]["steps_total"] += e.steps
            continue
        rows.append({"first": e.epoch, "last": e.epoch, "batch": e.batch, "steps": e.steps,
                     "steps_total": e.steps, "micro_batch": e.micro_batch, "accum": e.accum,
                     "world_size": e.world_size, "data_ranks": e.data_ranks})
    return rows


def idle_warnings(epochs: list[EpochSplit]) -> list[str]:
    """One line per stage that leaves most ranks without data."""
    return [f"warning: epochs {s['first']}-{s['last']}: batch {s['batch']} gives data to {s['data_ranks']} of "
            f"{s['world_size']} ranks; the others idle (a larger initial batch, or fewer ranks for this stage: "
            "submit --elastic)"
            for s in stage_rows(epochs) if s["data_ranks"] * 2 < s["world_size"]]


def format_table(epochs: list[EpochSplit], n: int) -> str:
    lines = [f"n = {n} training samples, {len(epochs)} epochs, {sum(e.steps for e in epochs)} optimizer steps, "
             f"{n * len(epochs)} samples (SFO)",
             f"{'epochs':>11} {'batch':>7} {'steps/ep':>8} {'micro':>6} {'accum':>6} {'world':>6} {'w/data':>6} "
             f"{'lr (first..last)':>22} {'beta':>13} {'gamma':>13}"]
    for s in stage_rows(epochs):
        first, last = epochs[s["first"]], epochs[s["last"]]
        lines.append(f"{s['first']:>5}-{s['last']:<5} {s['batch']:>7} {s['steps']:>8} {s['micro_batch']:>6} "
                     f"{s['accum']:>6} {s['world_size']:>6} {s['data_ranks']:>6} {first.lr:>10.4g}..{last.lr:<10.4g} "
                     f"{first.beta:>6.4g}..{last.beta:<5.4g} {first.gamma:>6.4g}..{last.gamma:<5.4g}")
    return "\n".join(lines + idle_warnings(epochs))
