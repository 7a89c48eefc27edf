"""qhm: mini-batch Quasi-Hyperbolic Momentum (and QHAdam, its Adam-family sibling), the paper's schedules,
their expansion and bounds.

Pure PyTorch and numpy: no I/O, no torch.distributed.
"""
from .bounds import Constants, corollary3, corollary5, summary, theorem2, theorem4, verdict
from .optimizer import PRESETS, QHM, from_torch_sgd, qhm, to_torch_sgd
from .qhadam import QHAdam, qhadam
from .plan import (BatchTooLarge, EpochTable, Schedule, Span, StepPlan, StepSequences, apply_hyperparams,
                   epoch_table, inverse_batch_sums, plan_steps, step_sequences)
from .schedules import BatchSchedule, BetaSchedule, GammaSchedule, LRSchedule, ScheduleError

__all__ = ["QHM", "qhm", "QHAdam", "qhadam", "PRESETS", "from_torch_sgd", "to_torch_sgd",
           "BatchSchedule", "LRSchedule", "BetaSchedule", "GammaSchedule", "ScheduleError",
           "Schedule", "EpochTable", "StepSequences", "epoch_table", "step_sequences",
           "apply_hyperparams", "inverse_batch_sums", "Span", "StepPlan", "plan_steps", "BatchTooLarge",
           "Constants", "theorem2", "theorem4", "corollary3", "corollary5",
           "verdict", "summary"]
