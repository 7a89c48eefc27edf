"""Preemption: a signal only sets a flag; ranks agree on it at the next optimizer-step boundary.

Never save inside the handler (Lightning's save-in-handler hangs intermittently): the loop polls
:meth:`PreemptionFlag.agreed`, an all-reduce, so every rank stops after the same step, saves the same
checkpoint and exits with :data:`PREEMPTED`.
"""
from __future__ import annotations

import signal

PREEMPTED = 75          # EX_TEMPFAIL: "preempted, resume me" (run the same command again)
BAD_INPUT = 2


class PreemptionFlag:
    def __init__(self, names: list[str]):
        self.received: int | None = None
        for name in names:
            signal.signal(getattr(signal, name), self._handler)

    def _handler(self, signum, frame):
        self.received = signum

    def agreed(self, comm, request_file=None) -> bool:
        """True on every rank when any rank got a signal, or (rank 0) a request file exists: the batch
        script of a multi-node Slurm job touches it, since signals reach only its own node."""
        asked = self.received is not None
        if not asked and comm.is_main and request_file is not None and request_file.exists():
            asked, self.received = True, 0
        return comm.any(asked)
