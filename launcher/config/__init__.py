"""The recipe: typed dataclasses (schema), loaded from YAML and ``--set`` overrides (load), validated
once at the edge (validate), and the fields a resume must keep (trajectory). User factories are
resolved here too (factories). Every problem is a :class:`RecipeError` whose message is one line
naming the key path, the value and what is allowed; the CLI prints it and exits with status 2 before
any worker starts."""
from launcher.config.load import apply_overrides, dump, from_dict, load
from launcher.config.schema import (Batch, Beta, Checkpoint, Data, Distributed, Eval, Gamma, GPTSpec, LossSpec, LR, ModelSpec,
                                    Optimizer, Performance, Recipe, ScheduleConfig, Signals, Slurm, Tracking, Wandb)
from launcher.config.trajectory import (TRAJECTORY_FIELDS, is_branch_start, trajectory, trajectory_diff,
                                       trajectory_hash)
from launcher.config.validate import validate
from launcher.errors import RecipeError

__all__ = ["Recipe", "Batch", "Beta", "Checkpoint", "Data", "Distributed", "Eval", "Gamma", "LossSpec", "LR",
           "ModelSpec", "GPTSpec", "Optimizer", "Performance", "ScheduleConfig", "Signals", "Slurm", "Tracking", "Wandb",
           "load", "from_dict", "apply_overrides", "dump", "validate", "RecipeError",
           "TRAJECTORY_FIELDS", "trajectory", "trajectory_hash", "trajectory_diff", "is_branch_start"]
