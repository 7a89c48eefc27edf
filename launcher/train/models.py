"""The recipe's model as a worker builds it: a built-in family's (:mod:`launcher.models`) or the user's factory's,
with the same initial weights on every rank; the dtypes of each precision; deterministic pooling."""
from __future__ import annotations

import torch
from torch import nn

from launcher import models


DTYPES = {"fp32": torch.float32,
          # bf16 is torch.autocast over fp32 weights and data: parameters, optimizer state, inputs and
          # the loss stay fp32, only the matmuls and convolutions run in bf16 (both engines alike).
          "bf16": torch.float32,
          "fp64": torch.float64}


def build(spec, shape: tuple, num_classes: int, seed: int, dtype: torch.dtype) -> nn.Module:
    """The recipe's model: a built-in name, or a ModelSpec whose factory (with its kwargs) returns an
    nn.Module. The same initial weights on every rank: the init draws from the RNG seeded by ``seed``."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        family = models.family_of(spec)
        model = user_model(spec) if family is None else family.build(spec, shape, num_classes)
    return model.to(dtype)


class GlobalAvgPool(nn.Module):
    """Average over height and width (keeping them as 1 x 1): AdaptiveAvgPool2d(1)'s value, with a
    backward that is an expand. CUDA's adaptive_avg_pool2d backward accumulates with atomics, and torch
    refuses it under deterministic algorithms."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(-2, -1), keepdim=True)


def deterministic_pooling(model: nn.Module) -> int:
    """performance.deterministic: every AdaptiveAvgPool2d to 1 x 1 (ResNet's, most CNNs') replaced by
    GlobalAvgPool, so the paper's ResNet-18 runs deterministically on CUDA; returns how many."""
    found = [(name, m) for name, m in model.named_modules()
             if isinstance(m, nn.AdaptiveAvgPool2d) and m.output_size in (1, (1, 1))]
    for name, _ in found:
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, GlobalAvgPool())
    return len(found)


def user_model(spec) -> nn.Module:
    from launcher.errors import UserError
    from launcher.config.factories import call
    model = call("model.factory", spec.factory, spec.kwargs)
    if not isinstance(model, nn.Module):
        raise UserError(f"model.factory: {spec.factory!r} returned {type(model).__name__}; allowed: a torch.nn.Module")
    return model
