"""Preemption: a signal only sets a flag; the ranks agree on it without stopping to wait.

Never save inside the handler (Lightning's save-in-handler hangs intermittently). Each optimizer step
every rank adds its flag to an all-reduce that runs in the background on a CPU (gloo) group, and reads
the result of the previous step's all-reduce: all ranks read the same result at the same step, so they
stop after the same step, save the same checkpoint and exit with PREEMPTED -- with no blocking
collective and no host-device synchronisation in the step (on GPUs, the flag never touches the device).
A signal that arrives during step k stops the run after step k+1. In the smallest batch stages, whose
steps take about a millisecond, the check runs every few steps (at most 32, the same steps on every rank).
"""
from __future__ import annotations

import signal
from pathlib import Path
from typing import Optional

import torch



class PreemptionFlag:
    """Set by any of the given signals (by name); ``received`` is the first signal number, or 0 for a
    request file."""

    def __init__(self, names: list[str]):
        self.received: Optional[int] = None
        for name in names:
            signal.signal(getattr(signal, name), self._handler)

    def _handler(self, signum, frame):
        if self.received is None:
            self.received = signum

    def adopt(self, early: Optional[int]) -> None:
        """Take a signal that arrived before this flag existed (recorded by the worker's first lines)."""
        if early is not None and self.received is None:
            self.received = early


class Agreement:
    """One-step-late, non-blocking agreement of all ranks on "stop now"."""

    def __init__(self, comm, flag: PreemptionFlag, request_file: Optional[Path] = None, every: int = 1):
        self.comm, self.flag, self.request_file = comm, flag, request_file
        self.every = every                # check at every ``every``-th call (the same on every rank)
        self._work, self._box, self._calls = None, None, 0

    def _asked(self) -> bool:
        if self.flag.received is None and self.comm.is_main and self.request_file is not None \
                and self.request_file.exists():
            self.flag.received = 0        # the batch script of a Slurm job asked (all nodes see the file)
        return self.flag.received is not None

    def poll(self) -> bool:
        """Call once per optimizer step, on every rank. True (on every rank, at the same step) when
        some rank was asked to stop at or before the previous check."""
        self._calls += 1
        if self._calls % self.every:
            return False
        if self.comm.world == 1:
            return self._asked()
        stop = False
        if self._work is not None:
            self._work.wait()
            stop = bool(self._box[0] > 0)
        self._box = torch.tensor([1.0 if self._asked() else 0.0])
        self._work = self.comm.all_reduce_max_async(self._box)
        return stop

    def close(self) -> None:
        """Wait for the outstanding all-reduce (every rank has one in flight): before the group goes."""
        if self._work is not None:
            self._work.wait()
            self._work = None
