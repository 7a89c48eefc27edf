"""The run's keeper: a small process that outlives the launcher just long enough to end what the run
started, even when the launcher is killed with SIGKILL. Stdlib only.

Every process of a run carries one environment entry, ``QHM_LAUNCH_TREE=<token>``: the launcher sets
it before its checks call a user's factory, and torchrun's agent, the workers, their data workers and
whatever a user's code starts inherit it. Death signals cannot reach all of these: Linux clears a
process's death signal in the children it forks, so a ``subprocess.Popen`` in a factory is handed to
init when the launcher dies, and lives on. The keeper, in a session of its own (a terminal's Ctrl-C or
a ``kill`` of the launcher's group does not reach it), waits until the launcher dies (its death signal,
SIGUSR1) or says the run is over (the same signal, sent on purpose); then it kills every process that
carries the token, through pidfds, until none is left.
"""
from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

from launcher.cluster.supervise import signal_if
from launcher.env import PR_SET_PDEATHSIG, load_libc

TREE = "QHM_LAUNCH_TREE"
END = signal.SIGUSR1
# what keeps forking while it is being killed gets this long; what still stands after it is said
GIVE_UP_S = 5.0


def carrying(token: str) -> list[int]:
    """PIDs of the processes other than this one whose environment carries ``TREE=token``."""
    entry, me, out = f"{TREE}={token}".encode(), os.getpid(), []
    for proc in os.scandir("/proc"):
        if proc.name.isdigit() and int(proc.name) != me and _carries(int(proc.name), entry):
            out.append(int(proc.name))
    return out


def _carries(pid: int, entry: bytes) -> bool:
    try:
        return entry in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:                    # gone, or not ours to read
        return False


def end_tree(token: str) -> list[int]:
    """SIGKILL every process carrying ``token``; again for what they started meanwhile. Each is opened
    as a pidfd and checked to carry the token through it, so a PID reused meanwhile is never hit.
    Returns the PIDs still standing after :data:`GIVE_UP_S` (none, unless something forks faster)."""
    entry, deadline = f"{TREE}={token}".encode(), time.monotonic() + GIVE_UP_S
    while True:
        left = carrying(token)
        if not left or time.monotonic() > deadline:
            return left
        for pid in left:
            signal_if(pid, signal.SIGKILL, lambda p: _carries(p, entry))
        time.sleep(0.02)


class Keeper:
    """The launcher's side: ``with Keeper() as token:`` puts ``TREE=token`` into this process's
    environment (what it starts from now on inherits it) and starts the keeper; leaving the block ends
    what is left of the tree, waits for the keeper and takes the entry out again."""

    def __init__(self):
        self.token, self.proc, self.before = secrets.token_hex(8), None, None

    def __enter__(self) -> str:
        self.before = os.environ.get(TREE)
        os.environ[TREE] = self.token
        self.proc = subprocess.Popen([sys.executable, "-m", "launcher.cluster.keeper", self.token, str(os.getpid())],
                                     start_new_session=True, stdin=subprocess.DEVNULL)
        return self.token

    def __exit__(self, *exc) -> None:
        if self.before is None:
            os.environ.pop(TREE, None)
        else:
            os.environ[TREE] = self.before
        try:
            self.proc.send_signal(END)
        except ProcessLookupError:
            pass
        self.proc.wait()


def main(argv: list[str]) -> int:
    token, launcher = argv[0], int(argv[1])
    for name in ("SIGINT", "SIGTERM", "SIGHUP", "SIGQUIT"):     # the launcher's to handle; it then ends us
        signal.signal(getattr(signal, name), signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_BLOCK, {END})   # taken by sigwait below, never lost before it
    libc = load_libc()
    if libc is not None:
        libc.prctl(PR_SET_PDEATHSIG, END)
    if os.getppid() == launcher:       # else the launcher died before the death signal was armed
        signal.sigwait({END})
    left = end_tree(token)
    if left:
        print(f"[qhm-launch] keeper: processes {left} of the run still stand after {GIVE_UP_S:.0f} s of SIGKILL",
              file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
