"""Every N units: when a step is due for an evaluation or a checkpoint (``eval.every``, ``checkpoint.every``
and their ``every_steps``).

A step is due when its position after it, in the cadence's unit, crosses a multiple of N: in steps every
N-th global step; in samples or tokens the first step that reaches 10M tokens, 20M tokens, ... whatever
the batch. So runs at different batch sizes are evaluated on the same grid of samples or tokens (each
within one batch of it), which is what comparing them to a target needs.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from launcher.config import units

if TYPE_CHECKING:
    from launcher.config import Recipe


class Every:
    """A cadence of ``count`` units (``unit`` step, sample or token; count 0: never)."""

    def __init__(self, unit: str, count: int, tokens_per_sample: int | None = None):
        self.unit, self.count, self.tokens_per_sample = unit, count, tokens_per_sample or 1

    def position(self, state, back: int = 0) -> int:
        """The train state's position in the unit (``back``: that many samples before it)."""
        if self.unit == "step":
            return state.global_step - (1 if back else 0)
        samples = state.samples - back
        return samples * self.tokens_per_sample if self.unit == "token" else samples

    def due(self, state, size: int) -> bool:
        """Whether the step just done (of ``size`` samples) crossed a multiple of the cadence."""
        if not self.count:
            return False
        return self.position(state) // self.count > self.position(state, size) // self.count

    def __str__(self) -> str:
        return f"{self.count} {self.unit}s"


def cadence(every, every_steps: int, recipe: Recipe) -> Every:
    """The cadence of ``every`` (an amount with its unit, or a count in schedule.unit), or of
    ``every_steps``; validated with the recipe."""
    if every is None:
        return Every("step", every_steps)
    unit, count = units.parse("every", every, recipe.schedule.unit)
    return Every(unit, count, recipe.data.tokens_per_sample)
