"""The training loss: a per-sample loss, summed by the launcher (which divides by the global batch).

Summing per-sample losses and normalising by the number of samples in the *global* batch keeps every
split exact: micro-batches, accumulation, ranks with uneven (or no) samples, a partial last batch.
Accuracy is counted when the outputs are class logits (batch x classes) and the targets class indices;
otherwise it is left out (None), never reported as 0.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F


class Loss:
    """``per_sample(out, target)`` -> one loss per sample; the default is cross-entropy on class logits
    (computed summed in one kernel)."""

    def __init__(self, per_sample: Optional[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = None,
                 name: str = "cross_entropy"):
        self.per_sample, self.name = per_sample, name

    def __call__(self, out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The summed loss of the batch, in float32 at least (bf16 outputs are upcast first)."""
        if out.dtype in (torch.bfloat16, torch.float16):
            out = out.float()
        if self.per_sample is None:
            return F.cross_entropy(out, target, reduction="sum")
        losses = self.per_sample(out, target)
        if not (isinstance(losses, torch.Tensor) and losses.shape == (len(target),)):
            from launcher.errors import UserError
            shape = tuple(losses.shape) if isinstance(losses, torch.Tensor) else type(losses).__name__
            raise UserError(f"loss.factory: {self.name!r} gave {shape} for a batch of {len(target)}; allowed: one "
                            f"loss per sample, shape ({len(target)},) (the launcher sums them)")
        return losses.sum()

    @staticmethod
    def predictions(out: torch.Tensor, target: torch.Tensor) -> Optional[torch.Tensor]:
        """The predicted classes, or None when accuracy has no meaning for these outputs."""
        if out.dim() == 2 and target.dim() == 1 and not target.is_floating_point() and not target.is_complex():
            return out.argmax(1)
        return None

    @staticmethod
    def correct(out: torch.Tensor, target: torch.Tensor) -> Optional[torch.Tensor]:
        """Correct predictions in the batch, or None when accuracy has no meaning for these outputs."""
        predicted = Loss.predictions(out, target)
        return None if predicted is None else (predicted == target).sum()


def from_recipe(spec) -> Loss:
    """The recipe's loss: cross-entropy, or a ``loss.factory`` returning fn(output, target) -> per-sample losses."""
    if spec.factory is None:
        return Loss()
    from launcher.errors import UserError
    from launcher.config.factories import call
    fn = call("loss.factory", spec.factory, spec.kwargs)
    if not callable(fn):
        raise UserError(f"loss.factory: {spec.factory!r} returned {type(fn).__name__}; allowed: a callable "
                        "(output, target) -> per-sample losses")
    return Loss(fn, spec.factory)
