"""Process supervision: the launcher process that starts torchrun, and the first lines of a worker.

Stdlib only: :func:`arm_worker` runs before torch is imported.

* The launcher (``qhm-launch run`` outside torchrun) starts torchrun's agent with SIGINT and SIGTERM
  ignored and handles them itself: a preemption signal is forwarded to the workers, which are found as
  the agent's children at that moment (never from files a killed run may have left behind) and
  signalled through a pidfd, so a PID that was reused can never be hit. SIGINT (Ctrl-C) is a
  preemption too; a second one stops everything at once. The agent dies with the launcher
  (PR_SET_PDEATHSIG), and so do the workers with the agent: nothing outlives a kill -9.
* A worker arms its own death signal first thing, against the parent it had when it started, and
  records any signal that arrives before the training loop installs its flag.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

PR_SET_PDEATHSIG = 1
EARLY_SIGNALS = ("SIGTERM", "SIGUSR1", "SIGUSR2", "SIGINT", "SIGHUP", "SIGQUIT")
_early: list[int] = []


def die_with_parent(expected_parent: Optional[int] = None) -> None:
    """Ask Linux to SIGKILL this process when its parent dies; if the parent already died (this
    process was re-parented), exit now. Elsewhere than Linux this does nothing."""
    try:
        import ctypes
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
    except OSError:
        return
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if expected_parent is not None and os.getppid() != expected_parent:
        os._exit(1)


def _record(signum, frame) -> None:
    _early.append(signum)


def arm_worker() -> None:
    """The first lines of a worker process, before any heavy import."""
    parent = os.getppid()
    launcher = os.environ.get("QHM_LAUNCH_PARENT")
    if parent == 1 or (launcher and not _alive(int(launcher))):
        os._exit(1)                              # started by a launcher that is already gone
    die_with_parent(parent)
    for name in EARLY_SIGNALS:
        signal.signal(getattr(signal, name), _record)


def early_signal(wanted: list[str]) -> Optional[int]:
    """The first signal received before the flag existed, if it is one of ``wanted``. A signal that
    arrived early and is not wanted gets its default action now (as if no handler had been there)."""
    numbers = {getattr(signal, n) for n in wanted}
    for signum in _early:
        if signum not in numbers:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
    for name in EARLY_SIGNALS:
        if getattr(signal, name) not in numbers:
            signal.signal(getattr(signal, name), signal.SIG_DFL)
    return next((s for s in _early if s in numbers), None)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def children(pid: int) -> list[int]:
    """The PIDs whose parent is ``pid`` right now (from /proc)."""
    out = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()      # the name may contain spaces and parentheses
        if int(fields[1]) == pid:
            out.append(int(entry.name))
    return out


def signal_children(parent: int, sig: int) -> int:
    """Send ``sig`` to every current child of ``parent``; returns how many got it. Each child is opened
    as a pidfd and checked to still be ``parent``'s child before the signal goes through that pidfd."""
    sent = 0
    for pid in children(parent):
        try:
            fd = os.pidfd_open(pid)
        except (ProcessLookupError, OSError):
            continue
        try:
            if pid in children(parent):
                signal.pidfd_send_signal(fd, sig)
                sent += 1
        except (ProcessLookupError, OSError):
            pass
        finally:
            os.close(fd)
    return sent


def _agent_preexec() -> None:
    """In torchrun's agent, before exec: die with the launcher; leave SIGINT/SIGTERM to the launcher."""
    die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def supervise(cmd: list[str], env: dict, forward: list[str], log=print) -> int:
    """Run torchrun and forward the ``forward`` signals (and SIGINT) to its workers. Returns torchrun's
    exit status; 130 after a second SIGINT, which kills the agent and the workers at once."""
    pending: list[int] = []
    handled = sorted({getattr(signal, n) for n in forward} | {signal.SIGINT})
    interrupts = []

    def on_signal(signum, frame):
        pending.append(signum)
        if signum == signal.SIGINT:
            interrupts.append(time.time())
    previous = {s: signal.signal(s, on_signal) for s in handled}
    env = dict(env, TORCHELASTIC_SIGNALS_TO_HANDLE="SIGHUP,SIGQUIT")
    try:
        proc = subprocess.Popen(cmd, env=env, preexec_fn=_agent_preexec)
        told = False
        while proc.poll() is None:
            if len(interrupts) >= 2:
                signal_children(proc.pid, signal.SIGKILL)
                proc.kill()
                proc.wait()
                log("[qhm-launch] second interrupt: stopped at once, nothing saved since the last checkpoint")
                return 130
            if pending and signal_children(proc.pid, pending[0]):
                sig = pending.pop(0)
                if not told:
                    log(f"[qhm-launch] {signal.Signals(sig).name}: checkpointing at the next step, then stopping"
                        + (" (Ctrl-C again to stop at once)" if sig == signal.SIGINT else ""))
                    told = True
            time.sleep(0.05)
        return proc.returncode
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
