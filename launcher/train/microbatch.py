"""The micro-batch sized by device memory (``distributed.max_micro_batch: auto``).

Before a stage starts, each rank finds the largest micro-batch for which one forward and backward of
the model fit in device memory (doubling, then bisection, catching CUDA out-of-memory errors), keeps a
10% margin for what training holds besides, and the ranks agree on the smallest. A CUDA out-of-memory
error during training (on any rank) makes every rank halve the micro-batch for the rest of the stage
and redo the step from its first micro-batch, with the batch-norm buffers, the RNG and the running
sums as they were before it: the update is the same. On CPU there is no device memory to probe, so
``auto`` means ``distributed.cpu_micro_batch``; the test hooks QHM_TEST_OOM_ABOVE and QHM_TEST_OOM_AT
make the probe and the back-off run on CPU with injected errors.
"""
from __future__ import annotations

from typing import Callable

import torch

from launcher import env

MARGIN = 0.9


def injected_oom(what: str) -> torch.OutOfMemoryError:
    return torch.OutOfMemoryError(f"CUDA out of memory ({what}, injected by a test hook)")


def largest_fitting(fits: Callable[[int], bool], limit: int) -> int:
    """The largest m <= limit with fits(m) (fits monotone): doubling, then bisection; 0 if not even 1."""
    lo, m = 0, 1
    while m <= limit and fits(m):
        lo, m = m, m * 2
    hi = min(m, limit + 1)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def probe(module: torch.nn.Module, sample: Callable[[int], tuple], loss, autocast, limit: int,
          device: torch.device) -> tuple[int, int]:
    """(largest fitting micro-batch up to ``limit``, the one to use after the margin). The module's
    buffers (batch-norm statistics), the RNG and the gradients are as before when it returns."""
    buffers = [b.detach().clone() for b in module.buffers()]
    rng = torch.get_rng_state(), (torch.cuda.get_rng_state(device) if device.type == "cuda" else None)
    above = env.oom_above()

    def fits(m: int) -> bool:
        try:
            if above is not None and m > above:
                raise injected_oom(f"probe of micro-batch {m}")
            x, y = sample(m)
            with autocast:
                loss(module(x), y).backward()
            fitted = True
        except torch.OutOfMemoryError:
            fitted = False
        # past the except, where its traceback no longer holds the failed probe's tensors
        module.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
        return fitted

    try:
        found = largest_fitting(fits, limit)
    finally:
        for b, saved in zip(module.buffers(), buffers):
            b.copy_(saved)
        torch.set_rng_state(rng[0])
        if rng[1] is not None:
            torch.cuda.set_rng_state(rng[1], device)
    return found, (found if found >= limit else max(1, int(found * MARGIN)))


class StepSnapshot:
    """What a step that is redone must find as it was: buffers, RNG and the running sums."""

    def __init__(self, module: torch.nn.Module, sums, device: torch.device):
        self.module, self.sums, self.device = module, sums, device
        self.buffers = [b.detach().clone() for b in module.buffers()]
        self.rng = torch.get_rng_state(), (torch.cuda.get_rng_state(device) if device.type == "cuda" else None)
        self.saved = sums.snapshot()

    def restore(self) -> None:
        for b, saved in zip(self.module.buffers(), self.buffers):
            b.copy_(saved)
        torch.set_rng_state(self.rng[0])
        if self.rng[1] is not None:
            torch.cuda.set_rng_state(self.rng[1], self.device)
        self.sums.restore(self.saved)
