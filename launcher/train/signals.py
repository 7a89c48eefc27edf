"""Preemption: a signal only sets a flag; the ranks agree on it without stopping to wait.

Never save inside the handler (Lightning's save-in-handler hangs intermittently). At each check every
rank adds its flag to an all-reduce that runs in the background on a CPU (gloo) group, and reads the
result of the previous check's all-reduce: all ranks read the same result at the same step, so they
stop after the same step, save the same checkpoint and exit with PREEMPTED -- with no blocking
collective and no host-device synchronisation in the step (on GPUs, the flag never touches the device).

How often to check is measured, not guessed: a check costs an all-reduce (on a busy CPU host, a
gloo one costs about a millisecond of the step it lands in), which a millisecond step should not pay
every time, while a ten-second step must check every time (Slurm warns 120 s ahead).
Each rank proposes the steps that fit in :data:`CHECK_EVERY_S` at its measured pace (1 to
:data:`MAX_EVERY`), the proposal rides in the same all-reduce (as a maximum of its negative: the
smallest wins), and every rank takes the agreed interval from the same result at the same step. A
signal is therefore acted on within about two check intervals: about a second, or two steps when a
step takes longer than half a second.
"""
from __future__ import annotations

import signal
import time
from pathlib import Path
from typing import Optional

import torch


class PreemptionFlag:
    """Set by any of the given signals (by name); ``received`` is the first signal number, or 0 for a
    request file."""

    def __init__(self, names: list[str]):
        self.received: Optional[int] = None
        self.at: Optional[float] = None          # when (time.monotonic)
        for name in names:
            signal.signal(getattr(signal, name), self._handler)

    def _handler(self, signum, frame):
        if self.received is None:
            self.received, self.at = signum, time.monotonic()

    def adopt(self, early: Optional[int]) -> None:
        """Take a signal that arrived before this flag existed (recorded by the worker's first lines)."""
        if early is not None and self.received is None:
            self.received, self.at = early, time.monotonic()


CHECK_EVERY_S = 0.5           # a check at least this often (at most once per step)
# and at least every 1,000 steps: a bound on the wait when the pace slows after a check (a larger batch
# at a stage's start); 32 made a 2 ms step pay a check every 64 ms, 2% of the run on a 2-core host
MAX_EVERY = 1000


def stop_latency(step_seconds: float) -> float:
    """At most how long from a signal to the stop (the checkpoint's own time aside), at ``step_seconds`` a
    step: two checks, each at most CHECK_EVERY_S or one step apart."""
    return 2 * max(CHECK_EVERY_S, step_seconds)


class Agreement:
    """One-check-late, non-blocking agreement of all ranks on "stop now", checked at an interval of
    steps all ranks agree on. ``log`` (rank 0's) says at which global step the run will stop."""

    def __init__(self, comm, flag: PreemptionFlag, request_file: Optional[Path] = None, log=None,
                 clock=time.monotonic, max_every: int = MAX_EVERY):
        self.comm, self.flag, self.request_file = comm, flag, request_file
        self.log, self.clock, self.max_every = log, clock, max_every
        self.every = 1                    # steps between checks: agreed at each check for the next
        self._work, self._box, self._calls, self._next = None, None, 0, 1
        self._last: Optional[tuple[float, int]] = None      # (time, calls) at the previous check
        self._told = False
        self._hurry = False
        self.checked = False              # whether the last poll was a check (a step every rank agreed on)

    def _asked(self) -> bool:
        if self.flag.received is None and self.comm.is_main and self.request_file is not None \
                and self.request_file.exists():
            self.flag.received, self.flag.at = 0, time.monotonic()   # the batch script of a Slurm job asked
        return self.flag.received is not None

    def _proposal(self) -> int:
        """Steps per CHECK_EVERY_S at the pace since the previous check (1 before any measurement)."""
        now, last = self.clock(), self._last
        self._last = (now, self._calls)
        if last is None or now <= last[0]:
            return 1
        per_step = (now - last[0]) / (self._calls - last[1])
        return max(1, min(self.max_every, int(CHECK_EVERY_S / per_step + 1e-6)))

    def poll(self, global_step: Optional[int] = None) -> bool:
        """Call once per optimizer step, on every rank (``global_step``: the steps done, for the log
        line). True (on every rank, at the same step) when some rank was asked to stop at or before
        the previous check."""
        self._calls += 1
        self.checked = self._calls >= self._next
        if not self.checked:
            return False
        proposal = self._proposal()
        if self.comm.world == 1:
            self._agree(proposal)
            self._next = self._calls + self.every
            return self._asked()
        stop = False
        if self._work is not None:
            self._work.wait()
            stop = bool(self._box[0] > 0)
            self._agree(max(1, int(-self._box[1])))
        asked = self._asked()
        self._box = torch.tensor([1.0 if asked else 0.0, -float(proposal)])
        self._work = self.comm.all_reduce_max_async(self._box)
        self._next = self._calls + self.every
        if asked and not stop and not self._told and self.log is not None and global_step is not None:
            self._told = True
            what = "a stop request" if not self.flag.received else signal.Signals(self.flag.received).name
            self.log(f"[qhm-launch] {what}: stopping after global step {global_step + self.every} "
                     "(the next check), with a checkpoint")
        return stop

    def _agree(self, every: int) -> None:
        """The interval to the next check: the agreed one, or 1 right after :meth:`hurry`."""
        self.every, self._hurry = (1 if self._hurry else every), False

    def hurry(self) -> None:
        """After something long between steps (a checkpoint write, an evaluation; every rank at the same
        step): the next two polls are checks, so a signal that came meanwhile stops the run two steps on,
        not an interval (measured before, at the steps' pace) later."""
        self._next, self._hurry = self._calls + 1, True

    def fresh(self) -> "Agreement":
        """An agreement on the same flag with its own pace and count: for the batches of an evaluation,
        whose pace is not the steps' (closed when the evaluation ends)."""
        return Agreement(self.comm, self.flag, self.request_file, clock=self.clock, max_every=self.max_every)

    def close(self) -> None:
        """Wait for the outstanding all-reduce (every rank has one in flight): before the group goes."""
        if self._work is not None:
            self._work.wait()
            self._work = None


# a step this much longer than the steps before it (and at least STALL_MIN_S) is worth one warning
STALL_FACTOR, STALL_MIN_S = 20, 30.0
# a preemption signal this long ago, and no step ended since: the step will not end (a data worker stuck
# in a dataset's __getitem__, a peer that never joins a collective); well inside Slurm's usual warning
STUCK_AFTER_S = 20.0


def watch_verdict(now: float, activity: str, progress: float, typical: Optional[float], signalled: Optional[float],
                  stall_s: float = STALL_MIN_S, stuck_s: float = STUCK_AFTER_S) -> Optional[str]:
    """What the watchdog makes of a worker at ``now``: "stuck" (a preemption signal at ``signalled`` and
    no progress for ``stuck_s`` since it and since the last ``progress``, while training: the stop the
    signal asks for will never come), "stall" (a step running far longer than the ``typical`` one), or
    None. Saving and evaluating are progress of their own and never judged here."""
    if activity not in ("step", "between steps"):
        return None
    if signalled is not None and now - max(signalled, progress) > stuck_s:
        return "stuck"
    if activity == "step" and typical is not None and now - progress > max(stall_s, STALL_FACTOR * typical):
        return "stall"
    return None


class Activity:
    """What a worker is doing (``activity``), when a step last started or ended (``progress``) and the seconds
    a step takes, smoothed (``typical``): the loop writes them, the watchdog's thread reads them, unlocked;
    a failure's line says where the worker was."""

    def __init__(self):
        self.activity, self.progress, self.typical = "starting", time.monotonic(), None

    def step_started(self) -> float:
        self.activity, self.progress = "step", time.monotonic()
        return self.progress

    def step_ended(self, started: float) -> None:
        self.progress = time.monotonic()
        took = self.progress - started
        self.typical = took if self.typical is None else 0.8 * self.typical + 0.2 * took
        self.activity = "between steps"

    def between_steps(self) -> None:
        """Back in the loop after resuming, evaluating or saving: that was progress."""
        self.activity, self.progress = "between steps", time.monotonic()

    def new_shape(self) -> None:
        """A new batch shape: its first step may compile; no step time to judge it by until it ends."""
        self.typical, self.progress = None, time.monotonic()

    def where(self, global_step: int) -> str:
        """For a failure's line: in a step, or between steps (saving, evaluating), or before either."""
        return {"starting": "before training", "resuming": "while resuming",
                "step": f"at global step {global_step + 1}"}.get(self.activity, f"after global step {global_step}")


class Watchdog:
    """A daemon thread beside the training loop: one warning when a step takes far longer than the steps
    before it, and, when a preemption signal meets a step that will not end, the run ended the way a
    preemption ends it, without the checkpoint it cannot write: ``on_stuck()`` (the marker, the exit).
    It reads the loop's :class:`Activity`, which the loop writes as it goes; nothing is locked."""

    def __init__(self, activity: Activity, flag: PreemptionFlag, warn, on_stuck, stall_s: float = STALL_MIN_S,
                 stuck_s: float = STUCK_AFTER_S, every_s: float = 0.5):
        import threading
        self.pace, self.flag, self.warn, self.on_stuck = activity, flag, warn, on_stuck
        self.stall_s, self.stuck_s, self.every_s = stall_s, stuck_s, every_s
        self._done = threading.Event()
        self._warned_at = None                # the progress mark of the step already warned about
        self._thread = threading.Thread(target=self._watch, name="qhm-watchdog", daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        while not self._done.wait(self.every_s):
            t = self.pace
            progress, typical, now = t.progress, t.typical, time.monotonic()
            verdict = watch_verdict(now, t.activity, progress, typical, self.flag.at, self.stall_s, self.stuck_s)
            if verdict == "stuck":
                self.on_stuck(now - progress)
                return
            if verdict == "stall" and self._warned_at != progress:
                self._warned_at = progress
                self.warn(now - progress, typical)

    def close(self) -> None:
        self._done.set()
        self._thread.join()
