r"""The schedule expanded over training: per epoch, and per step, as the paper defines them.

Epoch m runs T_m = ceil(n / b'_m) steps at (b'_m, alpha'_m, beta'_m, gamma'_m); the step-indexed
sequences b_k, alpha_k, beta_k, gamma_k repeat each epoch's value T_m times, K = sum_m T_m.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .schedules import BatchSchedule, BetaSchedule, GammaSchedule, LRSchedule, ScheduleError

__all__ = ["Schedule", "EpochTable", "StepSequences", "epoch_table", "step_sequences",
           "apply_hyperparams", "inverse_batch_sums"]


@dataclass(frozen=True)
class Schedule:
    """Batch, LR, beta and gamma schedules over ``epochs`` = M epochs."""
    epochs: int
    batch: BatchSchedule
    lr: LRSchedule
    beta: BetaSchedule
    gamma: GammaSchedule

    def __post_init__(self):
        if not (isinstance(self.epochs, int) and self.epochs >= 1):
            raise ScheduleError("epochs", self.epochs, "an integer >= 1")
        if self.lr.epochs != self.epochs:
            raise ScheduleError("lr.epochs", self.lr.epochs, f"equal to epochs={self.epochs}")
        self.batch.values(np.arange(self.epochs))       # raises if the batch outgrows an int64


@dataclass(frozen=True)
class EpochTable:
    """One row per epoch m: batch b'_m, steps T_m, alpha'_m, beta'_m, gamma'_m (numpy arrays)."""
    epoch: np.ndarray
    batch: np.ndarray
    steps: np.ndarray
    lr: np.ndarray
    beta: np.ndarray
    gamma: np.ndarray
    n: int

    @property
    def total_steps(self) -> int:
        return int(self.steps.sum())

    @property
    def total_samples(self) -> int:
        """SFO calls: every epoch computes n per-sample gradients, whatever its batch size."""
        return int(self.n) * len(self.epoch)

    def row(self, m: int) -> dict:
        return {"epoch": int(self.epoch[m]), "batch": int(self.batch[m]), "steps": int(self.steps[m]),
                "lr": float(self.lr[m]), "beta": float(self.beta[m]), "gamma": float(self.gamma[m])}


@dataclass(frozen=True)
class StepSequences:
    """alpha_k, beta_k, gamma_k, b_k for k in [0, K-1] (numpy arrays of length K)."""
    lr: np.ndarray
    beta: np.ndarray
    gamma: np.ndarray
    batch: np.ndarray


def epoch_table(schedule: Schedule, n: int, batches=None) -> EpochTable:
    """The schedule per epoch. ``batches``: the batch of each epoch as a run actually used it (a batch
    decided at run time, ``schedule.batch.kind: adaptive``), for the epochs it trained; the table then
    covers those epochs, with the schedule's learning rate, beta and gamma at them."""
    if not (isinstance(n, (int, np.integer)) and n >= 1):
        raise ValueError(f"n={n!r}: the training-set size must be an integer >= 1")
    if batches is None:
        m = np.arange(schedule.epochs)
        batch = schedule.batch.values(m)
    else:
        batch = np.asarray(batches, dtype=np.int64)
        if not (1 <= len(batch) <= schedule.epochs and np.all(batch >= 1)):
            raise ValueError(f"batches={list(batches)!r}: one batch >= 1 per epoch, at most {schedule.epochs}")
        m = np.arange(len(batch))
    return EpochTable(epoch=m, batch=batch, steps=-(-int(n) // batch), lr=schedule.lr.values(m),
                      beta=schedule.beta.values(m), gamma=schedule.gamma.values(m), n=int(n))


def step_sequences(table: EpochTable) -> StepSequences:
    rep = table.steps
    return StepSequences(lr=np.repeat(table.lr, rep), beta=np.repeat(table.beta, rep),
                         gamma=np.repeat(table.gamma, rep), batch=np.repeat(table.batch, rep))


def inverse_batch_sums(table: EpochTable) -> tuple[np.ndarray, np.ndarray]:
    """Per epoch: (sum over its steps of 1/b_k as the bounds take it, b_k = b'_m for all T_m steps;
    the same sum over the batches actually drawn, the last one partial: n - (T_m - 1) b'_m samples).
    The bounds' B_K and B'_K assume the first; the second is larger when n is not a multiple of b'_m."""
    b = table.batch.astype(np.float64)
    last = table.n - (table.steps - 1) * table.batch
    return table.steps / b, (table.steps - 1) / b + 1.0 / last


def apply_hyperparams(optimizer, lr: float, beta: float, gamma: float) -> None:
    """Write one epoch's values into every param group (the one place schedules touch an optimizer)."""
    for group in optimizer.param_groups:
        group["lr"], group["beta"], group["gamma"] = float(lr), float(beta), float(gamma)
