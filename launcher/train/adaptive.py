"""``schedule.batch.kind: adaptive``: the global batch grows when the measured gradient noise scale says so.

At the end of every interval of E = ``schedule.interval`` epochs (where the paper's schedules may change)
the noise scale measured over the interval, B_simple = sum tr(Σ) / sum |G|² over its steps (the epoch
rows' sums, all-reduced, so every rank sees the same value and decides alike), is compared with the
batch: at least ``factor`` x the batch, and the batch grows by ``growth`` -- after g growths it is
b_0 growth^g rounded up, as the exponential schedule's (eq. 2), capped at ``max`` and at the training set;
otherwise it stays. It never decreases, so the paper's bounds hold for the batches used, and
``qhm-launch bounds RUN_DIR`` computes them. Learning rate, beta and gamma follow their per-epoch
schedules as for any batch.

In the units step, sample and token the intervals are E units long and a decision is made at the first
step at or past each multiple of E, inside an epoch: the epoch's sums so far are all-reduced there (every
rank at the same step), and the interval's are the sums since the decision before.

The decisions and the interval's running sums are a checkpointed part: a resume keeps the batches
already chosen and, on the same world size, decides the rest bitwise alike. On another world size the
next estimates come from the new split (another small batch per rank), so later decisions may differ.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import qhm
from launcher import env
from launcher.train import noise
from launcher.train.state import EpochSums

if TYPE_CHECKING:
    from launcher.config import Recipe

GRAD_SQ, TRACE_COV = EpochSums.FIELDS.index("grad_sq"), EpochSums.FIELDS.index("trace_cov")


class BatchGrowth:
    """The batch of every interval entered so far, and the noise sums of the interval in progress."""

    def __init__(self, recipe: Recipe, n: int, comm, log):
        b = recipe.schedule.batch
        self.grown = qhm.BatchSchedule("exponential", b.initial, growth=b.growth, interval=1)   # b_0 growth^g
        self.factor, self.cap, self.n = b.factor, largest_batch(recipe, n), n
        self.interval, self.log, self.comm = recipe.interval(), log, comm
        self.duration = recipe.duration()
        self.unit, self.tokens_per_sample = recipe.schedule.unit, recipe.data.tokens_per_sample or 1
        self.per_step = self.unit != "epoch"      # decisions inside epochs, at the steps past each multiple of E
        self.batches = [b.initial]            # interval k trains at batches[k]
        self.sums = [0.0, 0.0]                # grad_sq, trace_cov over the finished epochs of this interval
        self.taken = [0.0, 0.0]               # per_step: the epoch's sums (all ranks) at the decision in it
        self.injected = env.noise_scales()    # test hook: the measured value of each decision, in order

    def state_dict(self) -> dict:
        return {"batches": list(self.batches), "sums": list(self.sums), "taken": list(self.taken)}

    def load_state_dict(self, state: dict) -> None:
        self.batches, self.sums = [int(b) for b in state["batches"]], [float(s) for s in state["sums"]]
        self.taken = [float(s) for s in state.get("taken", [0.0, 0.0])]

    def check(self, where: str) -> None:
        """Restored decisions must be ones this rule can make: from the initial batch, never decreasing,
        within the cap (a checkpoint edited by hand is refused naming the field)."""
        from launcher.errors import UserError
        b = self.batches
        ok = (b and all(isinstance(x, int) and not isinstance(x, bool) for x in b) and b[0] == self.grown(0)
              and all(x <= y for x, y in zip(b, b[1:])) and max(b) <= max(self.cap, b[0]))
        if not ok:
            raise UserError(f"{where}: batch_growth.batches {b!r} is not valid; allowed: decisions from "
                            f"{self.grown(0)} that never decrease, up to {self.cap} (move this checkpoint aside to "
                            "resume from the one before it)")

    def decide_at(self, stage, sums: EpochSums) -> bool:
        """per_step, where a stage starts: if its first step is at or past the next multiple of E, the
        interval's noise sums (this epoch's so far, all-reduced: a collective every rank makes at the same
        step) decide the batch from here on. True when a decision was made."""
        position = {"step": stage.global_step, "sample": stage.samples,
                    "token": stage.samples * self.tokens_per_sample}[self.unit]
        if position // self.interval < len(self.batches) or position >= self.duration_in_unit():
            return False
        totals = self.comm.all_reduce_sum(sums.as_tensor())
        now = [float(totals[GRAD_SQ]), float(totals[TRACE_COV])]
        self.sums = [self.sums[i] + now[i] - self.taken[i] for i in range(2)]
        self.taken = now
        self.decide(position, f"{self.unit} {position:,}")
        while len(self.batches) <= position // self.interval:      # a step that spanned several intervals
            self.batches.append(self.batches[-1])
        return True

    def at_stage_start(self, stages, epoch: int, step: int, sums: EpochSums) -> None:
        """Where a stage starts (or the run resumes inside one): per_step, decide if a decision point has
        passed, and re-plan from it."""
        if self.per_step and self.decide_at(stages.at(epoch, step), sums):
            stages.set_decisions(self.batches)

    def at_epoch_end(self, epoch: int, totals, stages) -> None:
        """After epoch ``epoch``'s row (``totals``: its sums over all ranks): per epoch, the next interval's
        batch at an interval's end (saved with this epoch), re-planned; per_step, the epoch's sums kept."""
        if self.per_step:
            self.end_epoch_sums(totals)
        elif self.end_epoch(epoch, totals):
            stages.set_decisions(self.batches)

    def duration_in_unit(self) -> float:
        """The run's end in the decisions' unit, where known (no decision is made at or after it)."""
        unit, amount = self.duration
        return amount if unit == self.unit else float("inf")

    def end_epoch_sums(self, totals) -> None:
        """per_step: an epoch ended (``totals``: its sums over all ranks); its part since the last decision
        joins the interval's."""
        now = [float(totals[GRAD_SQ]), float(totals[TRACE_COV])]
        self.sums = [self.sums[i] + now[i] - self.taken[i] for i in range(2)]
        self.taken = [0.0, 0.0]

    def end_epoch(self, epoch: int, totals) -> int | None:
        """After epoch ``epoch``'s row (``totals``: its sums over all ranks, laid out as EpochSums.FIELDS):
        at an interval's end, the next interval's batch, decided and said in one line; else None."""
        self.sums = [self.sums[0] + float(totals[GRAD_SQ]), self.sums[1] + float(totals[TRACE_COV])]
        start = epoch + 1
        if start % self.interval or (self.duration[0] == "epoch" and start >= self.duration[1]):
            return None
        return self.decide(start, f"epoch {start}")

    def decide(self, start: int, where_text: str) -> int:
        """The next interval's batch from the interval's sums (then zeroed), said in one line."""
        grad_sq, trace_cov = self.sums
        self.sums = [0.0, 0.0]
        measured = trace_cov / grad_sq if grad_sq > 0 and trace_cov > 0 else None
        decision = len(self.batches) - 1
        if decision < len(self.injected):
            measured = self.injected[decision]
        batch = self.batches[-1]
        growths = len(set(self.batches)) - 1
        larger = min(int(self.grown(growths + 1)), self.cap)
        where = f"[qhm-launch] {where_text}: "
        if measured is None:
            over = (f"epochs {start - self.interval}-{start - 1}" if not self.per_step else
                    f"{self.unit}s {start - start % self.interval - self.interval:,}-{start - start % self.interval:,}")
            self.log(where + f"noise scale not measured over {over}: batch stays {batch}")
        elif measured >= self.n / noise.TRUST_SHARE and decision >= len(self.injected):
            # no measurement in this regime (launcher/train/noise.py: biased low while training): skipped
            self.log(where + f"noise scale {measured:.4g} is n/{noise.TRUST_SHARE} of the {self.n:,} training samples or "
                             f"more, where training biases it low; not a measurement: batch stays {batch}")
        elif measured < self.factor * batch:
            self.log(where + f"noise scale {measured:.4g} < {self.factor:g} x {batch}: batch stays {batch}")
        elif larger <= batch:
            self.log(where + f"noise scale {measured:.4g} >= {self.factor:g} x {batch}: batch stays {batch}, "
                             "its cap (schedule.batch.max or the training set)")
        else:
            self.log(where + f"noise scale {measured:.4g} >= {self.factor:g} x {batch}: batch {batch} -> {larger}")
            batch = larger
        self.batches.append(batch)
        return batch


def largest_batch(recipe: Recipe, n: int) -> int:
    """The batch an adaptive run never grows past: ``schedule.batch.max``, and the training set."""
    return min(recipe.schedule.batch.max or n, n)


def step_range(recipe: Recipe, n: int, world: int = 1) -> tuple[int, int]:
    """(fewest, most) optimizer steps an adaptive run can take: growing at every interval's end, or never."""
    from launcher.train import planning
    b, cap = recipe.schedule.batch, largest_batch(recipe, n)
    grown = qhm.BatchSchedule("exponential", b.initial, growth=b.growth, interval=1)
    always = [min(b.initial, cap)]
    while always[-1] < cap:
        always.append(min(int(grown(len(always))), cap))
    fewest = planning.plan(recipe, n, world, decisions=always)
    most = planning.plan(recipe, n, world, decisions=[b.initial])
    return fewest.total_steps, most.total_steps
