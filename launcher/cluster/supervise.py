"""Process supervision: the launcher process that starts torchrun, and the first lines of a worker.

Stdlib only: :func:`arm_worker` runs before torch is imported.

* The launcher (``qhm-launch run`` outside torchrun) starts torchrun's agent with SIGINT and SIGTERM
  ignored and handles them itself: a preemption signal is forwarded to the workers, which are found as
  the agent's children at that moment (never from files a killed run may have left behind) and
  signalled through a pidfd, so a PID that was reused can never be hit. SIGINT (Ctrl-C) is a
  preemption too; a second one stops everything at once. The agent dies with the launcher
  (PR_SET_PDEATHSIG), and so do the workers with the agent, and their DataLoader workers with them:
  nothing outlives a kill -9. The launcher is the run's child subreaper: a process a worker started and
  left behind (a user's ``subprocess.Popen``; torchrun gives each worker a session of its own, so no
  process group holds them all) becomes the launcher's child when its parent ends, and the CLI ends
  its children when it exits (:func:`end_children`).
* A worker that fails writes failed.json and exits 0 (torchrun then prints nothing); the other ranks
  may be waiting for it in a collective, so the launcher ends them a few seconds after it sees the file.
* A worker arms its own death signal first thing, against the parent it had when it started, and
  records any signal that arrives before the training loop installs its flag.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from launcher import env
from launcher.env import die_with_parent, early_signals, load_libc

PR_SET_CHILD_SUBREAPER, PR_GET_CHILD_SUBREAPER = 36, 37
_received: list[int] = []       # the preemption signals supervise() took since take_received() last looked


def take_received() -> list[int]:
    """The preemption signals that reached this process since the last call: those supervise() forwarded
    (a run may still have finished: the signal came after its last step) and those recorded while no run
    was under way (between a local sweep's points)."""
    taken = _received + env.take_early_signals()
    _received.clear()
    return taken


def arm_worker() -> None:
    """The first lines of a worker process, before any heavy import."""
    parent = os.getppid()
    launcher = os.environ.get(env.PARENT)
    if parent == 1 or (launcher and not env.alive(int(launcher))):
        os._exit(1)                              # started by a launcher that is already gone
    die_with_parent(parent)
    env.record_early_signals()


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


def catches(pid: int, sig: int) -> bool:
    """Whether process ``pid`` has a handler installed for ``sig`` (/proc/PID/status, SigCgt)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("SigCgt:"):
                return bool(int(line.split()[1], 16) >> (sig - 1) & 1)
    except (OSError, ValueError, IndexError):
        pass
    return False


def signal_children(parent: int, sig: int, only_if_caught: bool = True) -> tuple[int, int]:
    """Send ``sig`` to the current children of ``parent``: (sent, children). Each child is opened as a
    pidfd and checked to still be ``parent``'s child (and, with ``only_if_caught``, to have its handler
    for ``sig`` installed: a worker still starting up would otherwise die of it) before the signal goes
    through that pidfd, so a PID reused meanwhile is never hit."""
    kids = children(parent)
    sent = sum(signal_if(pid, sig, lambda p: p in children(parent) and (not only_if_caught or catches(p, sig)))
               for pid in kids)
    return sent, len(kids)


def signal_if(pid: int, sig: int, still) -> bool:
    """Send ``sig`` to ``pid`` if ``still(pid)`` holds once the process is held open as a pidfd: the check
    and the signal then concern one process, never one that reused the PID. Whether it was sent."""
    try:
        fd = os.pidfd_open(pid)
    except OSError:
        return False
    try:
        if still(pid):
            signal.pidfd_send_signal(fd, sig)
            return True
    except OSError:
        pass
    finally:
        os.close(fd)
    return False


def end_children() -> None:
    """Kill this process's remaining children (through pidfds, as :func:`signal_children`) and reap
    them: for the CLI process at its exit, whose only children left are ones a user's code started."""
    kids = children(os.getpid())
    if not kids:
        return
    signal_children(os.getpid(), signal.SIGKILL, only_if_caught=False)
    for pid in kids:
        try:
            os.waitpid(pid, 0)
        except ChildProcessError:
            pass


# torchrun's agent forwards only these itself (and dies of them, with a traceback); SIGINT and SIGTERM
# it ignores, and the launcher forwards them to the workers instead.
AGENT_SIGNALS = "--signals-to-handle=SIGHUP,SIGQUIT"


# a worker that failed has written failed.json; the others get this long to end by themselves
FAILURE_GRACE_S = 5.0

AGENT = ["-m", "launcher.cluster.agent"]
GATE = "--wait-for-go"      # the agent's one argument when started ahead: it reads what to run from its stdin


class PendingAgent:
    """torchrun's agent started before the launcher's checks (with :func:`_agent_preexec`, as any agent): it
    imports torch (about two seconds) while they run, then waits on its stdin. :meth:`go` sends it the
    arguments and environment of the run, :meth:`cancel` ends it if it never got them (refused input)."""

    def __init__(self):
        self.proc = subprocess.Popen([sys.executable, *AGENT, GATE], stdin=subprocess.PIPE, env=dict(os.environ),
                                     preexec_fn=_agent_preexec(os.getpid()))
        self.told = False

    def go(self, cmd: list[str], env: dict) -> subprocess.Popen:
        assert cmd[1:3] == AGENT, cmd
        try:
            self.proc.stdin.write(json.dumps({"argv": cmd[3:], "env": env}).encode())
            self.proc.stdin.close()
        except BrokenPipeError:               # it ended already (killed): its exit status says so
            self.told = True
        return self.proc

    def cancel(self) -> None:
        """End it unless it was told to run (it has started nothing: its group can go at once)."""
        if self.proc.stdin.closed or self.told:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        try:
            self.proc.stdin.close()
        except BrokenPipeError:
            pass
        self.proc.wait()


def _agent_preexec(launcher: int):
    def preexec() -> None:
        """In torchrun's agent, before exec: lead a process group of its own (its workers get sessions of
        their own; what the agent itself starts stays in it); die with the launcher (now, if it is already
        gone); leave SIGINT and SIGTERM to the launcher, which forwards them to the workers."""
        os.setpgid(0, 0)
        die_with_parent(launcher)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    return preexec


def _exited(pid: int) -> bool:
    """Whether child ``pid`` has exited, leaving it unreaped (a zombie keeps its PID and group taken)."""
    return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None


def _end_agent(proc: subprocess.Popen) -> None:
    """Kill the agent, its workers (and, through their death signals, their data workers), and what is
    left in the agent's process group; reap the agent. Its PID (the group's id) is not reused before.
    The agent is stopped first: it must not see its workers die of the SIGKILL sent here and report
    them as killed (:mod:`launcher.cluster.agent`)."""
    try:
        os.kill(proc.pid, signal.SIGSTOP)
    except ProcessLookupError:
        pass
    signal_children(proc.pid, signal.SIGKILL, only_if_caught=False)
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()


def adopt_orphans(on: bool) -> bool:
    """Make this process its descendants' child subreaper (or stop): what a worker leaves behind comes
    here, not to init. Returns whether it was one before."""
    libc = load_libc()
    if libc is None:
        return False
    import ctypes
    before = ctypes.c_int(0)
    libc.prctl(PR_GET_CHILD_SUBREAPER, ctypes.byref(before))
    libc.prctl(PR_SET_CHILD_SUBREAPER, int(on))
    return bool(before.value)


def supervise(cmd: list[str], env: dict, forward: list[str], failed=None, log=print,
              agent: PendingAgent | None = None) -> int:
    """Run torchrun and forward the ``forward`` signals (SIGINT among them) to its workers, including
    those that arrived while the launcher started. Returns torchrun's exit status; 130 after a second
    SIGINT, which kills the agent and the workers at once; 1 when ``failed()`` (a worker's failure
    marker) turned true and the workers had not ended :data:`FAILURE_GRACE_S` later. ``agent``: the agent
    started ahead (:class:`PendingAgent`), told ``cmd`` now, rather than a new one."""
    handled = sorted({getattr(signal, n) for n in forward})
    pending: list[int] = []
    interrupts: list[float] = []

    def on_signal(signum, frame):
        pending.append(signum)
        _received.append(signum)
        if signum == signal.SIGINT:
            interrupts.append(time.time())
    previous = {s: signal.signal(s, on_signal) for s in handled}
    for signum in early_signals(forward)[:1]:      # after the handlers are in place: none is lost
        on_signal(signum, None)
    proc, subreaper = None, adopt_orphans(True)
    try:
        proc = agent.go(cmd, env) if agent is not None else \
            subprocess.Popen(cmd, env=env, preexec_fn=_agent_preexec(os.getpid()))
        told, failed_at, polls = False, None, 0
        while not _exited(proc.pid):
            if len(interrupts) >= 2:
                _end_agent(proc)
                log("[qhm-launch] second interrupt: stopped at once, nothing saved since the last checkpoint")
                return 130
            if failed_at is None and failed is not None and polls % 10 == 0 and failed():
                failed_at = time.time()
            if failed_at is not None and time.time() - failed_at > FAILURE_GRACE_S:
                _end_agent(proc)       # ranks still waiting for the one that failed
                return 1
            if pending:
                sent, kids = signal_children(proc.pid, pending[0])
                if kids and sent == kids:           # every worker has it (else: again, once they can take it)
                    sig = pending.pop(0)
                    if not told:
                        log(f"[qhm-launch] {signal.Signals(sig).name}: checkpointing at the next agreed check (within "
                            "about a second, or two steps), then stopping"
                            + (" (Ctrl-C again to stop at once)" if sig == signal.SIGINT else ""))
                        told = True
            polls += 1
            time.sleep(0.05)
        _end_agent(proc)
        return proc.returncode
    finally:
        if proc is not None and proc.returncode is None:       # the launcher itself failed: take the run down
            _end_agent(proc)
        adopt_orphans(subreaper)
        for s, h in previous.items():
            signal.signal(s, h)
