"""The micro-batch sized by device memory (``distributed.max_micro_batch: auto``).

Before a stage starts, each rank finds the largest micro-batch for which one forward and backward of
the model fit in device memory (doubling, then bisection, catching CUDA out-of-memory errors), keeps a
10% margin for what training holds besides, and the ranks agree on the smallest. A CUDA out-of-memory
error during training (on any rank) makes every rank halve the micro-batch for the rest of the stage
and redo the step from its first micro-batch, with the batch-norm buffers, the RNG and the running
sums as they were before it: the update is the same. On CPU there is no device memory to probe, so
``auto`` means ``distributed.cpu_micro_batch``; the test hooks QHM_TEST_OOM_ABOVE and QHM_TEST_OOM_AT
make the probe and the back-off run on CPU with injected errors.

Under FSDP an out-of-memory error must never happen: every forward and backward is a collective (the
parameters' all-gathers, the gradients' reduce-scatters), so a rank whose allocation failed half-way would
leave the others waiting in one. :func:`extrapolate` sizes it instead from the peak memory of a forward and
backward at micro-batches 1 and 2, which every rank runs in lockstep, fitted as ``base + per_sample x m``,
plus the optimizer state not allocated yet, within the same 10% margin; there is no back-off (an error
fails the run in one line, and torchrun stops the other ranks). The hook QHM_TEST_DEVICE_MEMORY gives the
readings on CPU.
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

    with preserved(module, device):
        found = largest_fitting(fits, limit)
    return found, (found if found >= limit else max(1, int(found * MARGIN)))


def extrapolate(module: torch.nn.Module, sample: Callable[[int], tuple], loss, autocast, limit: int,
                device: torch.device, unallocated: int, rank: int) -> tuple[int, int, str]:
    """(largest micro-batch up to ``limit`` whose extrapolated peak fits, the one to use after the margin,
    the fit in words) from two forward and backward passes, at 1 and 2 samples, that every rank runs.
    ``unallocated``: bytes training will hold that the passes did not (the optimizer state before the
    first step). Buffers, the RNG and the gradients are as before when it returns."""
    hook = env.device_memory()
    peaks = []
    with preserved(module, device):
        for m in (1, 2):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
                torch.cuda.reset_peak_memory_stats(device)
            x, y = sample(m)
            with autocast:
                loss(module(x), y).backward()
            module.zero_grad(set_to_none=True)
            peaks.append(torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0)
    if hook is not None:
        base, per_sample, capacities = hook
        peaks, capacity = [base + per_sample, base + 2 * per_sample], capacities[min(rank, len(capacities) - 1)]
    else:
        free, _ = torch.cuda.mem_get_info(device)
        capacity = free + torch.cuda.memory_reserved(device)     # what this process's allocations may reach
    per_sample = max(peaks[1] - peaks[0], 1)
    fixed = peaks[0] - per_sample + unallocated

    def largest(budget: float) -> int:
        return int(max(0, min(limit, (budget - fixed) // per_sample)))

    words = (f"{per_sample / 2**20:.1f} MiB per sample over {fixed / 2**20:.1f} MiB (optimizer state to come: "
             f"{unallocated / 2**20:.1f} MiB), of {capacity / 2**20:.1f} MiB")
    found = largest(capacity)
    return found, (found if found >= limit else max(0, largest(MARGIN * capacity))), words


class Saved:
    """A module's buffers (batch-norm statistics) and the RNG, to put back."""

    def __init__(self, module: torch.nn.Module, device: torch.device):
        self.module, self.device = module, device
        self.buffers = [b.detach().clone() for b in module.buffers()]
        self.rng = torch.get_rng_state(), (torch.cuda.get_rng_state(device) if device.type == "cuda" else None)

    def restore(self) -> None:
        for b, saved in zip(self.module.buffers(), self.buffers):
            b.copy_(saved)
        torch.set_rng_state(self.rng[0])
        if self.rng[1] is not None:
            torch.cuda.set_rng_state(self.rng[1], self.device)


class preserved:
    """A probe's context: buffers and the RNG as they were on leaving, gradients cleared."""

    def __init__(self, module: torch.nn.Module, device: torch.device):
        self.module, self.saved = module, Saved(module, device)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.module.zero_grad(set_to_none=True)
        self.saved.restore()


class StepSnapshot(Saved):
    """What a step that is redone must find as it was: buffers, RNG and the running sums."""

    def __init__(self, module: torch.nn.Module, sums, device: torch.device):
        super().__init__(module, device)
        self.sums, self.summed = sums, sums.snapshot()

    def restore(self) -> None:
        super().restore()
        self.sums.restore(self.summed)
