"""The per-step rows (steps.jsonl, and W&B under step/): taken at fixed log points, read back in batches.

A row holds its window's sums over all ranks, so reading it costs an all-reduce and a read of the device.
Neither is paid at the log point, where the window is only taken on the device and queued. At each stop
check (steps every rank agreed on, about every half second: :class:`~launcher.train.signals.Agreement`)
the queued windows leave in one all-reduce in the background, and their rows are written at the next
check, when it is long done. So a log point costs a few small device operations, and a collective goes
out at most once per check whatever ``log_every_steps`` is: on a CPU (gloo) an extra collective costs
about a millisecond, 40 us a step when it came every 25 steps. Rows reach the files about a second late.

Before anything else is logged or saved the rows are flushed, waiting for them: a checkpoint follows
every row up to its step (a resume drops the rows after it), and W&B takes rows in step order.
"""
from __future__ import annotations

import copy
from typing import Callable

import torch


class StepRows:
    def __init__(self, comm, reporter, stop_if_unfinished: Callable[[], None]):
        self.comm, self.reporter, self.stop_if_unfinished = comm, reporter, stop_if_unfinished
        self.queued: list[tuple] = []      # (stage, hyper, state, clocks, has_accuracy, window, grad_norm), not sent
        self.sent = None                   # (those rows, a read of their reduced windows) in flight
        # the tensors of the last all-reduce, kept referenced from here: gloo's worker thread lets go of a
        # finished work a moment after the wait returns, and a tensor whose last reference goes on that
        # thread while the process exits needs the GIL there (an abort, seen once in 60 runs)
        self.last_sent = None

    def take(self, stage, hyper: tuple, state, sums, grad_norm: torch.Tensor | None) -> None:
        """A log point: the window of ``sums`` (this rank's since the last one, on the device, with the
        epoch's steps whose loss was finite as its last field) queued with the position, hyper-parameters
        and clocks as they are now."""
        window = torch.cat([sums.take_window(), sums.finite()])
        self.queued.append((stage, hyper, copy.copy(state), self.reporter.log_point(state), sums.has_accuracy,
                            window, grad_norm))

    def send(self) -> None:
        """At a step every rank agreed on: write the rows that came back, send the queued ones."""
        self._write_returned()
        if self.queued:
            rows, self.queued = self.queued, []
            norms = [r[6] for r in rows]
            self.last_sent = (torch.stack([r[5] for r in rows]),
                              None if any(n is None for n in norms) else torch.stack(norms))
            self.sent = rows, self.comm.all_reduce_sum_later(*self.last_sent)

    def flush(self) -> None:
        """Every row up to now written (waits for the all-reduce; every rank calls it at the same step)."""
        self.send()
        self._write_returned()

    def _write_returned(self) -> None:
        if self.sent is None:
            return
        (rows, read), self.sent = self.sent, None
        windows, norms = read()
        windows = windows.tolist()
        for i, (stage, hyper, state, clocks, has_accuracy, _, _) in enumerate(rows):
            if windows[i][-1] < self.comm.world * state.step:    # some rank's loss was not finite:
                self.stop_if_unfinished()                          # names the step and raises
            self.reporter.step_row(stage, hyper, state, windows[i][:-1], has_accuracy,
                                   None if norms is None else norms[i], clocks)
