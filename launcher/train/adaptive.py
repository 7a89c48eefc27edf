"""``schedule.batch.kind: adaptive``: the global batch grows when the measured gradient noise scale says so.

At the end of every interval of E = ``schedule.interval`` epochs (where the paper's schedules may change)
the noise scale measured over the interval, B_simple = sum tr(Σ) / sum |G|² over its steps (the epoch
rows' sums, all-reduced, so every rank sees the same value and decides alike), is compared with the
batch: at least ``factor`` x the batch, and the batch grows by ``growth`` -- after g growths it is
b_0 growth^g rounded up, as the exponential schedule's (eq. 2), capped at ``max`` and at the training set;
otherwise it stays. It never decreases, so the paper's bounds hold for the batches used, and
``qhm-launch bounds RUN_DIR`` computes them. Learning rate, beta and gamma follow their per-epoch
schedules as for any batch.

The decisions and the interval's running sums are a checkpointed part: a resume keeps the batches
already chosen and, on the same world size, decides the rest bitwise alike. On another world size the
next estimates come from the new split (another small batch per rank), so later decisions may differ.
"""
from __future__ import annotations

import qhm

from launcher import env
from launcher.train.splits import ceil_div
from launcher.train.state import EpochSums

GRAD_SQ, TRACE_COV = EpochSums.FIELDS.index("grad_sq"), EpochSums.FIELDS.index("trace_cov")


class BatchGrowth:
    """The batch of every interval entered so far, and the noise sums of the interval in progress."""

    def __init__(self, recipe, n: int, log):
        b = recipe.schedule.batch
        self.grown = qhm.BatchSchedule("exponential", b.initial, growth=b.growth, interval=1)   # b_0 growth^g
        self.factor, self.cap = b.factor, largest_batch(recipe, n)
        self.interval, self.epochs, self.log = recipe.schedule.interval, recipe.epochs, log
        self.batches = [b.initial]            # interval k trains at batches[k]
        self.sums = [0.0, 0.0]                # grad_sq, trace_cov over the finished epochs of this interval
        self.injected = env.noise_scales()    # test hook: the measured value of each decision, in order

    def state_dict(self) -> dict:
        return {"batches": list(self.batches), "sums": list(self.sums)}

    def load_state_dict(self, state: dict) -> None:
        self.batches, self.sums = [int(b) for b in state["batches"]], [float(s) for s in state["sums"]]

    def first_epochs(self) -> list[tuple[int, int]]:
        """(first epoch, batch) of every interval entered so far."""
        return [(k * self.interval, b) for k, b in enumerate(self.batches)]

    def end_epoch(self, epoch: int, totals) -> int | None:
        """After epoch ``epoch``'s row (``totals``: its sums over all ranks, laid out as EpochSums.FIELDS):
        at an interval's end, the next interval's batch, decided and said in one line; else None."""
        self.sums = [self.sums[0] + float(totals[GRAD_SQ]), self.sums[1] + float(totals[TRACE_COV])]
        start = epoch + 1
        if start % self.interval or start >= self.epochs:
            return None
        grad_sq, trace_cov = self.sums
        self.sums = [0.0, 0.0]
        measured = trace_cov / grad_sq if grad_sq > 0 and trace_cov > 0 else None
        decision = len(self.batches) - 1
        if decision < len(self.injected):
            measured = self.injected[decision]
        batch = self.batches[-1]
        growths = len(set(self.batches)) - 1
        larger = min(int(self.grown(growths + 1)), self.cap)
        where = f"[qhm-launch] epoch {start}: "
        if measured is None:
            self.log(where + f"noise scale not measured over epochs {start - self.interval}-{epoch}: "
                             f"batch stays {batch}")
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


def largest_batch(recipe, n: int) -> int:
    """The batch an adaptive run never grows past: ``schedule.batch.max``, and the training set."""
    return min(recipe.schedule.batch.max or n, n)


def step_range(recipe, n: int) -> tuple[int, int]:
    """(fewest, most) optimizer steps an adaptive run can take: growing at every interval's end, or never."""
    b, interval, cap = recipe.schedule.batch, recipe.schedule.interval, largest_batch(recipe, n)
    grown = qhm.BatchSchedule("exponential", b.initial, growth=b.growth, interval=interval)
    fewest = sum(ceil_div(n, min(int(grown(m)), cap)) for m in range(recipe.epochs))
    return fewest, recipe.epochs * ceil_div(n, b.initial)
