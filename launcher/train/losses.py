"""The training loss: a per-sample loss, summed by the launcher (which divides by the global batch).

Summing per-sample losses and normalising by the number of samples in the *global* batch keeps every
split exact: micro-batches, accumulation, ranks with uneven (or no) samples, a partial last batch.

A language model's loss is per token: logits (B, T, vocab) against next tokens (B, T), cross-entropy
summed over every target that is not IGNORE (-100: padding, a masked position), and the launcher
divides by the *global* count of those tokens, the sum over every rank's (all-reduced where a mask may
vary it, known on the host for token files, where every position counts). So the update is the mean over
the global batch's tokens, whatever the split, and a masked position never counts.
Accuracy is counted when the outputs are class logits (batch x classes) and the targets class indices;
otherwise it is left out (None), never reported as 0.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Optional

import torch
import torch.nn.functional as F

from launcher import models

if TYPE_CHECKING:
    from launcher.config import Recipe


IGNORE = -100         # a target position that is not trained on (torch's cross_entropy ignore_index)


class Loss:
    """``per_sample(out, target)`` -> one loss per sample; the default is cross-entropy on class logits
    (computed summed in one kernel). ``per_token``: the language-model loss, cross-entropy per token."""

    def __init__(self, per_sample: Optional[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = None,
                 name: str = "cross_entropy", per_token: bool = False):
        self.per_sample, self.name, self.per_token = per_sample, name, per_token

    def __call__(self, out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The summed loss of the batch, in float32 at least (bf16 outputs are upcast first)."""
        if out.dtype in (torch.bfloat16, torch.float16):
            out = out.float()
        if self.per_token:
            return F.cross_entropy(out.flatten(0, -2), target.flatten(), ignore_index=IGNORE, reduction="sum")
        if self.per_sample is None:
            return F.cross_entropy(out, target, reduction="sum")
        losses = self.per_sample(out, target)
        if not (isinstance(losses, torch.Tensor) and losses.shape == (len(target),)):
            from launcher.errors import UserError
            shape = tuple(losses.shape) if isinstance(losses, torch.Tensor) else type(losses).__name__
            raise UserError(f"loss.factory: {self.name!r} gave {shape} for a batch of {len(target)}; allowed: one "
                            f"loss per sample, shape ({len(target)},) (the launcher sums them)")
        return losses.sum()

    def count(self, target: torch.Tensor):
        """The terms of the batch's summed loss: its samples, or (per token) its tokens that count, a
        0-d tensor on the device (no sync)."""
        return (target != IGNORE).sum() if self.per_token else len(target)

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


def from_recipe(spec, per_token: bool = False) -> Loss:
    """The recipe's loss: cross-entropy (per token for a language model), or a ``loss.factory`` returning
    fn(output, target) -> per-sample losses."""
    if spec.factory is None:
        return Loss(per_token=per_token)
    from launcher.config.factories import call
    from launcher.errors import UserError
    fn = call("loss.factory", spec.factory, spec.kwargs)
    if not callable(fn):
        raise UserError(f"loss.factory: {spec.factory!r} returned {type(fn).__name__}; allowed: a callable "
                        "(output, target) -> per-sample losses")
    trained = [n for n, p in fn.named_parameters() if p.requires_grad] if isinstance(fn, torch.nn.Module) else []
    if trained:
        # the optimizer, DDP's reduce, FSDP's and ZeRO's shards and the checkpoint hold the model's parameters
        # only: these would never train, differ per rank, and be lost on resume
        raise UserError(f"loss.factory: {spec.factory!r} returned a module with {len(trained)} trainable "
                        f"parameter(s) ({', '.join(trained[:4])}), which no engine sees (the optimizer, the gradient "
                        "reduce, the shards and the checkpoint hold the model's only); allowed: a loss without "
                        "parameters (move them into the model, or requires_grad=False)")
    return Loss(fn, spec.factory)


def per_token(recipe: Recipe) -> bool:
    """Whether the recipe trains a language model: token data, or the built-in GPT."""
    return recipe.data.dataset == "tokens" or models.language_model(recipe.model)
