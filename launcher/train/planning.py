"""The stage table: the run's spans (steps of one epoch at one batch, :func:`qhm.plan_steps`), each
split into micro-batch x accumulation over the world.

In the epoch unit (the paper's) a stage is an epoch. In the units step, sample and token the batch may
change inside an epoch, so an epoch may hold several stages; each knows where it starts in the epoch's
permutation (``offset``), so global batch k covers [c_k, c_k + b_k), c_k the samples consumed before it.

Any world size runs any schedule: a batch that divides over the world splits exactly (micro * accum *
world == global batch); one that does not gives ranks ceil or floor of batch/world samples, and a batch
smaller than the world leaves the last ranks without data (they join the gradient reduce with zeros).
The micro-batch grows with the global batch up to ``max_micro_batch``; past it accumulation grows.
"""
from __future__ import annotations

import bisect
import dataclasses
from dataclasses import asdict, dataclass, field

import numpy as np

import qhm

from launcher.errors import RecipeError, schedule_error
from launcher.config import Recipe


@dataclass(frozen=True)
class Stage(qhm.Span):
    """A span of the run (steps [first, first + steps) of epoch ``epoch`` at global batch ``batch``,
    its first covering positions [offset, offset + batch) of the epoch's permutation), split as
    micro_batch x accum over world_size ranks. lr, beta, gamma: at its first step (the epoch unit: the
    epoch's)."""
    micro_batch: int = 1
    accum: int = 1
    world_size: int = 1
    data_ranks: int = 1      # ranks that carry samples of a full batch (all, unless batch < world size)
    lr: float = 0.0
    beta: float = 0.0
    gamma: float = 0.0
    lr_scale: float = 1.0    # a branch's learning-rate rule from its branch step on (1: the schedule's)


@dataclass
class Plan:
    """A run's stages, its step plan and the schedule they follow (with the run's length in its unit)."""
    stages: list[Stage]
    steps: qhm.StepPlan
    schedule: qhm.Schedule
    n: int
    world: int
    unit: str
    first_batch: int = 1          # b_0 of the learning rate's batch scaling
    _starts: list = field(default_factory=list, repr=False)

    def __post_init__(self):
        self._starts = [(s.epoch, s.first) for s in self.stages]

    @property
    def epochs(self) -> int:
        return self.steps.epochs

    @property
    def total_steps(self) -> int:
        return self.steps.total_steps

    @property
    def total_samples(self) -> int:
        return self.steps.total_samples

    @property
    def total_tokens(self) -> int | None:
        return self.steps.total_tokens

    def steps_in(self, epoch: int) -> int:
        """The steps of epoch ``epoch`` (the last epoch may stop early: train.steps/samples/tokens)."""
        index = bisect.bisect_left(self._starts, (epoch + 1, 0)) - 1
        return self.stages[index].end if index >= 0 and self.stages[index].holds(epoch) else 0

    def at(self, epoch: int, step: int) -> Stage:
        """The stage holding step ``step`` of epoch ``epoch``, as it is in that epoch (a stage that repeats
        over whole epochs: its epoch ``epoch``)."""
        return self._in_epoch(self.stages[bisect.bisect_right(self._starts, (epoch, step)) - 1], epoch)

    def end_of(self, epoch: int) -> tuple[int, int]:
        """(global step, samples) once epoch ``epoch``'s steps are done."""
        last = self.at(epoch, self.steps_in(epoch) - 1)
        return last.global_step + last.steps, last.samples + last.consumed(self.n)

    def stage_at(self, global_step: int) -> Stage:
        """The stage holding global step ``global_step``, in its epoch (the last stage's last epoch at or past
        the plan's end)."""
        s = self.stages[max(bisect.bisect_right([s.global_step for s in self.stages], global_step) - 1, 0)]
        return self._in_epoch(s, s.epoch + min(max(global_step - s.global_step, 0) // s.steps, s.repeat - 1))

    def _in_epoch(self, stage: Stage, epoch: int) -> Stage:
        """``stage`` in epoch ``epoch``, with lr, beta, gamma at that epoch's first step of it."""
        s = stage.in_epoch(epoch, self.n)
        if s is stage:
            return s
        lr, beta, gamma = (float(np.broadcast_to(v, (1,))[0]) for v in
                           _values_at(self.schedule, [s], self.unit, self.steps.tokens_per_sample, self.first_batch))
        return dataclasses.replace(s, lr=lr * s.lr_scale, beta=beta, gamma=gamma)


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


def batch_function(recipe: Recipe, decisions: list[int] | None = None):
    """(batch_at(u), next_change(u)) of the recipe's batch schedule in schedule.unit. An adaptive batch:
    ``decisions[k]`` for positions in [k E, (k+1) E), the last one beyond the decisions made so far."""
    if not recipe.schedule.batch.decided_during_run:
        spec = recipe.batch_spec()
        return spec, spec.next_change
    E, chosen = recipe.interval(), list(decisions or [recipe.schedule.batch.initial])

    def batch_at(u: int) -> int:
        return chosen[min(int(u) // E, len(chosen) - 1)]
    return batch_at, lambda u: (int(u) // E + 1) * E


def plan(recipe: Recipe, n: int, world_size: int, max_micro: int | None = None, decisions: list[int] | None = None,
         micro: dict | None = None) -> Plan:
    """Every stage's batch, steps, split over ``world_size`` ranks and hyper-parameters. A batch larger
    than the training set is refused (its epochs would not be the schedule's: one step over fewer
    samples), in one line naming where. ``decisions``: an adaptive batch's so far; ``micro``: batch ->
    the micro-batch cap a run chose for it (max_micro_batch auto, an out-of-memory halving)."""
    unit, tokens = recipe.schedule.unit, recipe.data.tokens_per_sample
    batch_at, next_change = batch_function(recipe, decisions)
    if unit == "epoch":
        check_epochs(recipe, n, int(batch_at(0)))
    try:
        steps = whole = qhm.plan_steps(batch_at, next_change, unit, n, recipe.duration(), tokens)
        b = recipe.branch
        if b.parent is not None:               # the parent's steps to at_step, then factor x its batch
            steps = qhm.plan_steps(batch_at, next_change, unit, n, branch_end(recipe, whole), tokens,
                                   branch=(b.at_step, b.factor))
    except qhm.BatchTooLarge as exc:
        raise RecipeError(f"schedule.batch: the batch reaches {exc.batch} at {exc.unit} {exc.position:,}, more than the "
                          f"{n} training samples; allowed: a schedule whose batch stays within the data (fewer epochs, "
                          "a smaller growth or a longer interval)") from None
    try:                  # a branch's schedules run over its parent's length, as the parent's did
        schedule = recipe.schedule_spec(epochs=whole.epochs, length=whole.length(unit))
    except qhm.ScheduleError as exc:
        raise schedule_error(exc) from None
    max_micro = max_micro or micro_cap(recipe)
    micro = micro or {}
    first_batch = int(batch_at(0))
    spans = steps.spans
    if unit == "epoch":        # each epoch's values, evaluated over all epochs at once as the paper's table is
        m = np.arange(steps.epochs)
        per_epoch = np.full(steps.epochs, first_batch, dtype=np.int64)
        for span in spans:
            per_epoch[span.epoch] = span.scheduled_batch or span.batch
        values = schedule.hyperparams(m, per_epoch, first_batch)
        at = [span.epoch for span in spans]
    else:
        values = _values_at(schedule, spans, unit, recipe.data.tokens_per_sample, first_batch)
        at = list(range(len(spans)))
    lr, beta, gamma = (np.broadcast_to(v, (len(at) if unit != "epoch" else steps.epochs,)) for v in values)
    splits: dict[int, tuple[int, int]] = {}
    stages = []
    branch = recipe.branch
    rule = qhm.schedules.BATCH_SCALINGS[branch.lr_rule] if branch.parent is not None else 0.0
    for i, span in zip(at, spans):
        scale = float(branch.factor) ** rule if rule and span.global_step >= branch.at_step else 1.0
        batch = span.batch
        if batch not in splits:
            splits[batch] = split_batch(batch, world_size, micro.get(batch, max_micro))
        mb, accum = splits[batch]
        stages.append(Stage(epoch=span.epoch, batch=batch, steps=span.steps, micro_batch=mb, accum=accum,
                            world_size=world_size, data_ranks=min(world_size, batch), lr=float(lr[i]) * scale,
                            beta=float(beta[i]), gamma=float(gamma[i]), first=span.first, offset=span.offset,
                            global_step=span.global_step, samples=span.samples, scheduled_batch=span.scheduled_batch,
                            repeat=span.repeat, lr_scale=scale))
    return Plan(stages, steps, schedule, n, world_size, unit, first_batch)


def check_epochs(recipe: Recipe, n: int, first_batch: int) -> None:
    """Schedules in epochs (the paper's table, one row per epoch): a length in steps, samples or tokens that
    means more epochs than MAX_EPOCHS of the ``n`` training samples is refused naming the key, before the
    plan evaluates them one by one. (In the other units whole epochs at one batch are one stage.)"""
    from launcher.config.schema import MAX_EPOCHS
    given = recipe.train.duration()
    if given is None:
        return
    unit, amount = recipe.duration()
    per_epoch = {"step": max(1, n // max(first_batch, 1)), "sample": n,
                 "token": n * (recipe.data.tokens_per_sample or 1)}[unit]
    if amount // per_epoch > MAX_EPOCHS:
        raise RecipeError(f"train.{given[0]}s: {given[1]!r} is not valid: about {amount // per_epoch:,} epochs of the "
                          f"{n:,} training samples; allowed: at most {MAX_EPOCHS:,} epochs' worth")


def branch_end(recipe: Recipe, parent: qhm.StepPlan) -> tuple[str, int]:
    """A branch's duration: branch.length after the parent's position at branch.at_step."""
    from launcher.config import units
    b = recipe.branch
    if b.at_step > parent.total_steps:
        raise RecipeError(f"branch.at_step: {b.at_step} is not valid; allowed: a step of the parent's plan (it has "
                          f"{parent.total_steps})")
    unit, length = units.parse("branch.length", b.length, recipe.schedule.unit if recipe.schedule.unit != "epoch"
                               else "step")
    at = parent.position_at(b.at_step)
    return unit, {"step": b.at_step, "sample": at["samples"], "token": at["tokens"]}[unit] + length


def branch_reorder(recipe: Recipe, p: Plan):
    """A branch's data order after its branch point (``branch.seed`` k > 0: the k-th other order of the
    samples left, :class:`launcher.data.order.Reorder`); None for seed 0 (the parent's order, bit for bit)
    and for a run that is no branch."""
    from launcher.data.order import Reorder
    b = recipe.branch
    if b.parent is None or not b.seed:
        return None
    if b.at_step >= p.total_steps:
        return Reorder(p.epochs, 0, b.seed)
    stage = p.stage_at(b.at_step)
    step = stage.first + (b.at_step - stage.global_step)
    return Reorder(stage.epoch, min(stage.start(step), p.n), b.seed)


def _values_at(schedule: qhm.Schedule, spans, unit: str, tokens_per_sample: int | None, first_batch: int) -> tuple:
    """(lr, beta, gamma) at each span's first step, at its scheduled batch (units step, sample, token)."""
    u = np.array([_position(s, unit, tokens_per_sample) for s in spans], dtype=np.int64)
    return schedule.hyperparams(u, np.array([s.scheduled_batch or s.batch for s in spans], dtype=np.int64),
                                first_batch)


def _position(span, unit: str, tokens_per_sample: int | None) -> int:
    """A span's first step's position in ``unit``."""
    return {"step": span.global_step, "sample": span.samples, "token": span.samples * (tokens_per_sample or 1)}[unit]


def split_epochs(recipe: Recipe, n: int, world_size: int, max_micro: int | None = None) -> list[Stage]:
    """The stages of :func:`plan` (in the epoch unit, one per epoch)."""
    return plan(recipe, n, world_size, max_micro).stages


def micro_cap(recipe: Recipe) -> int:
    """The recipe's micro-batch cap; with "auto", the CPU cap (a run on GPUs probes each stage)."""
    cap = recipe.distributed.max_micro_batch
    return recipe.distributed.cpu_micro_batch if cap == "auto" else cap


@dataclass(frozen=True)
class Segment:
    """Epochs [first, last] of an elastic chain (``by`` "step": global steps [first, last]), on ``nodes``
    nodes: one Slurm job."""
    first: int
    last: int
    nodes: int
    by: str = "epoch"


def elastic_segments(recipe: Recipe, n: int, per_node: int, max_nodes: int) -> list[Segment]:
    """Cut the schedule where the nodes a stage can use well change: a stage of batch b gets the most
    nodes (up to ``max_nodes``) that still give every rank at least ``distributed.min_rank_batch``
    samples, and at least one. In the epoch unit the cuts fall between epochs, in the others between
    global steps (the batch may change inside an epoch). An adaptive batch is refused: its stages are
    decided at run time."""
    if recipe.schedule.batch.decided_during_run:
        raise RecipeError("--elastic: not valid with schedule.batch.kind adaptive (an elastic chain's segments follow "
                          "the batch, which is decided at run time); allowed: submit without --elastic, or a fixed "
                          "schedule (exponential)")
    by = "epoch" if recipe.schedule.unit == "epoch" else "step"
    floor = recipe.distributed.min_rank_batch
    segments: list[Segment] = []
    for stage in plan(recipe, n, per_node).stages:
        nodes = max(1, min(max_nodes, stage.batch // (floor * per_node)))
        first, last = ((stage.epoch, stage.epoch) if by == "epoch" else
                       (stage.global_step, stage.global_step + stage.total_steps - 1))
        if segments and segments[-1].nodes == nodes:
            segments[-1] = Segment(segments[-1].first, last, nodes, by)
        else:
            segments.append(Segment(first, last, nodes, by))
    return segments


def gpu_hours(stages: list[Stage], world_of, rate: float, floor: int) -> tuple[float, float]:
    """(GPU-hours, wall hours) of training ``stages``, each on ``world_of(stage)`` GPUs, if a GPU processes
    ``rate`` samples/s and a rank with fewer than ``floor`` samples of a batch is no faster (an estimate:
    evaluation and communication left out)."""
    gpu = wall = 0.0
    for e in stages:
        world = world_of(e)
        seconds = e.total_steps * max(ceil_div(e.batch, world), floor) / rate
        wall += seconds
        gpu += world * seconds
    return gpu / 3600, wall / 3600


def plan_json(p: Plan) -> dict:
    """The plan as JSON: per epoch (the epoch unit) or per stage, with the totals."""
    rows = [asdict(s) for s in p.stages]
    for row in rows:                          # only a branch's partial last step has one
        if row["scheduled_batch"] is None:
            row.pop("scheduled_batch")
        if row["repeat"] == 1:                # only whole epochs at one batch in a row (units other than epoch)
            row.pop("repeat")
    if p.unit == "epoch":
        for row in rows:                      # an epoch is a stage: where it starts says nothing
            for key in ("first", "offset"):
                row.pop(key)
    out = {("epochs" if p.unit == "epoch" else "stages"): rows, "unit": p.unit, "total_steps": p.total_steps,
           "total_samples": p.total_samples, "n": p.n, "epochs_trained": p.epochs}
    if p.total_tokens is not None:
        out["total_tokens"] = p.total_tokens
        out["tokens_per_sample"] = p.steps.tokens_per_sample
    if p.schedule.batch_scaling != "none":
        out["batch_scaling"] = p.schedule.batch_scaling
    return out


def stage_rows(stages: list[Stage]) -> list[dict]:
    """Consecutive stages with the same batch split, for the human-readable table."""
    rows: list[dict] = []
    for e in stages:
        if rows and rows[-1]["batch"] == e.batch and rows[-1]["micro_batch"] == e.micro_batch:
            rows[-1]["last"] = e.epoch + e.repeat - 1
            rows[-1]["last_stage"] = e
            rows[-1]["steps_total"] += e.total_steps
            continue
        rows.append({"first": e.epoch, "last": e.epoch + e.repeat - 1, "batch": e.batch, "steps": e.steps,
                     "steps_total": e.total_steps, "micro_batch": e.micro_batch, "accum": e.accum,
                     "world_size": e.world_size, "data_ranks": e.data_ranks, "first_stage": e, "last_stage": e})
    return rows


def idle_warnings(stages: list[Stage], unit: str = "epoch") -> list[str]:
    """One line per stage that leaves most ranks without data, where it is in the run's unit (epochs, or
    global steps where the batch changes inside epochs)."""
    out = []
    for s in stage_rows(stages):
        if s["data_ranks"] * 2 >= s["world_size"]:
            continue
        first, last = s["first_stage"], s["last_stage"]
        where = (f"epochs {s['first']}-{s['last']}" if unit == "epoch" else
                 f"steps {first.global_step}-{last.global_step + last.total_steps - 1}")
        out.append(f"warning: {where}: batch {s['batch']} gives data to {s['data_ranks']} of {s['world_size']} ranks; "
                   "the others idle (a larger initial batch, or fewer ranks for this stage: submit --elastic)")
    return out


def zero_lr_warnings(stages: list[Stage], unit: str) -> list[str]:
    """One line where whole epochs train at learning rate 0 (the paper's cosine with min 0 at its last
    epoch, m = M - 1), naming the ways out."""
    if unit != "epoch":
        return []
    zero = [s.epoch for s in stages if s.lr == 0.0 and s.first == 0]
    if not zero:
        return []
    return [f"warning: epoch{'s' if len(zero) > 1 else ''} {', '.join(map(str, zero[:5]))} train{'' if len(zero) > 1 else 's'} "
            f"at learning rate 0 (its steps change nothing but the momentum buffer); allowed: schedule.lr.min > 0, or "
            "schedule.unit: step (the schedule then reaches its minimum at the run's last step)"]


def format_table(p: Plan, momentum: bool = True) -> str:
    """The plan for a person: per stage of equal split, in the epoch unit by epochs, otherwise by global
    steps with where each starts in samples (and tokens, with each batch's tokens). ``momentum`` False (the
    Adam family): no beta and gamma columns, which that optimizer does not read."""
    stages, n = p.stages, p.n
    tokens = p.steps.tokens_per_sample
    head = (f"n = {n} training samples, {p.epochs} epochs, {p.total_steps} optimizer steps, {p.total_samples} "
            "samples (SFO)" + (f", {p.total_tokens} tokens ({tokens} per sample)" if tokens else ""))
    if p.schedule.batch_scaling != "none":
        head += f"; lr x (batch / {stages[0].batch})^{'1' if p.schedule.batch_scaling == 'linear' else '1/2'}"
    if p.unit == "epoch":
        lines = [head, f"{'epochs':>11} {'batch':>7} {'steps/ep':>8} {'micro':>6} {'accum':>6} {'world':>6} "
                       f"{'w/data':>6} {'lr (first..last)':>22}" + (f" {'beta':>13} {'gamma':>13}" if momentum else "")]
        for s in stage_rows(stages):
            first, last = s["first_stage"], s["last_stage"]
            lines.append(f"{s['first']:>5}-{s['last']:<5} {s['batch']:>7} {s['steps']:>8} {s['micro_batch']:>6} "
                         f"{s['accum']:>6} {s['world_size']:>6} {s['data_ranks']:>6} {first.lr:>10.4g}..{last.lr:<10.4g}"
                         + (f" {first.beta:>6.4g}..{last.beta:<5.4g} {first.gamma:>6.4g}..{last.gamma:<5.4g}"
                            if momentum else ""))
        return "\n".join(lines + idle_warnings(stages) + zero_lr_warnings(stages, p.unit))
    where = "tokens from" if tokens else "samples from"
    # a stage that repeats over whole epochs at one batch is one line naming its epochs
    epochs = {s: str(s.epoch) if s.repeat == 1 else f"{s.epoch}-{s.epoch + s.repeat - 1}" for s in stages}
    width = max([5, *map(len, epochs.values())])
    lines = [head + f"; schedules in {p.unit}s, evaluated at each step",
             f"{'steps':>15} {'epoch':>{width}} {where:>14} {'batch':>7}" + (f" {'tokens':>9}" if tokens else "")
             + f" {'micro':>6} {'accum':>6} {'world':>6} {'w/data':>6} {'lr at start':>11}"
             + (f" {'beta':>8} {'gamma':>8}" if momentum else "")]
    for s in stages:
        start = s.samples * tokens if tokens else s.samples
        lines.append(f"{s.global_step:>7}-{s.global_step + s.total_steps - 1:<7} {epochs[s]:>{width}} {start:>14,} "
                     f"{s.batch:>7}"
                     + (f" {s.batch * tokens:>9,}" if tokens else "")
                     + f" {s.micro_batch:>6} {s.accum:>6} {s.world_size:>6} {s.data_ranks:>6} {s.lr:>11.4g}"
                     + (f" {s.beta:>8.4g} {s.gamma:>8.4g}" if momentum else ""))
    return "\n".join(lines + idle_warnings(stages, p.unit))
