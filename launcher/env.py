"""Names the whole process tree shares (and the two small mechanisms it shares: a death signal, and this
process's start time): every ``QHM_*`` environment variable the launcher reads (named
here and nowhere else) and the signal names a run may take as preemption. Stdlib only: the first lines
of a worker import it before torch.

The process tree's own: what ``qhm-launch run`` tells the workers it starts, and what a generated
Slurm script tells the launcher. Then the test hooks, which only the test-suite sets: they let a test
land a kill at a chosen moment (a slow step, a slow evaluation, a checkpoint write paused before it is
sealed), see what each DeepSpeed optimizer step spanned, or inject a CUDA out-of-memory error. A user
never needs them; each does nothing unless set.
"""
from __future__ import annotations

import os
import signal
import time
from typing import Optional

# when this process started (a worker imports this module in its first lines): a failure marker newer
# than this is another rank's, of this run
STARTED = time.time()
PR_SET_PDEATHSIG = 1

# the signals a run may take as a request to checkpoint and stop (recipe key signals.preempt); a worker
# records them from its first line on, before the real handlers exist
PREEMPTION_SIGNALS = ("SIGTERM", "SIGUSR1", "SIGUSR2", "SIGINT", "SIGHUP", "SIGQUIT")

# set by `qhm-launch run` for the torchrun workers it starts
PARENT = "QHM_LAUNCH_PARENT"                      # the launcher's PID: workers die with it, report through it
FORCE_RESUME = "QHM_FORCE_RESUME"                 # "1": --force-resume
LOCKED_BY = "QHM_FOLDER_LOCKED_BY"                # the launcher holds the run folder's lock for its workers
UNTIL_EPOCH = "QHM_UNTIL_EPOCH"                   # run --until-epoch (a segment of an elastic chain)
UNTIL_STEP = "QHM_UNTIL_STEP"                     # run --until-step (a segment of a chain in steps, samples, tokens)
FAILURE_NOTE = "QHM_FAILURE_NOTE"                 # file (the launcher's temp folder): a worker's failure when
                                                  # failed.json cannot be written (a full disk)
AGENT_NOTE = "QHM_AGENT_NOTE"                     # file (the launcher's temp folder): the agent's word on a
                                                  # worker that ended without its own (a signal, an exit status)
ELASTIC = "QHM_ELASTIC"                           # "1": --nnodes MIN:MAX (a worker that loses a peer exits
                                                  # non-zero, for torchrun to restart the group on the nodes left)
DEBUG = "QHM_DEBUG"                               # "1": --debug (tracebacks instead of one line)
BATCH_JOB = "QHM_BATCH_JOB"                       # "1": inside a generated Slurm script

# test hooks
STEP_DELAY = "QHM_TEST_STEP_DELAY"                # seconds to sleep after every optimizer step
EVAL_DELAY = "QHM_TEST_EVAL_DELAY"                # seconds to sleep after every evaluation batch
PAUSE_BEFORE_SEAL = "QHM_TEST_PAUSE_BEFORE_SEAL"  # seconds to pause before a checkpoint is sealed...
PAUSE_FROM_STEP = "QHM_TEST_PAUSE_FROM_STEP"      # ...for checkpoints at or after this global step
STEP_LOG = "QHM_TEST_STEP_LOG"                    # file: one JSON line per DeepSpeed optimizer step
OOM_AT = "QHM_TEST_OOM_AT"                        # "epoch:step[:micro]": raise an out-of-memory error there once
OOM_ABOVE = "QHM_TEST_OOM_ABOVE"                  # micro-batch size above which the memory probe "fails"
DEVICE_MEMORY = "QHM_TEST_DEVICE_MEMORY"          # "base,per_sample,capacity[,capacity of rank 1,...]" bytes:
                                                  # what the sharded engines' memory probe reads on CPU
NOISE_SCALES = "QHM_TEST_NOISE_SCALES"            # "v1,v2,...": the noise scale each adaptive batch decision
                                                  # takes, in order, instead of the measured one
STALL_S = "QHM_TEST_STALL_S"                     # the watchdog's thresholds (launcher.train.signals), in seconds:
STUCK_S = "QHM_TEST_STUCK_S"                      # a step worth a warning, a preempted run that is stuck
COMPILE_BACKEND = "QHM_COMPILE_BACKEND"           # torch.compile's backend (default inductor; the GPU check's
                                                  # smoke mode and tests use eager: dynamo traces, nothing is built)


def flag(name: str) -> bool:
    return os.environ.get(name) == "1"


def _float(name: str) -> float:
    return float(os.environ.get(name) or 0)


def step_delay() -> float:
    return _float(STEP_DELAY)


def eval_delay() -> float:
    return _float(EVAL_DELAY)


def pause_before_seal(step: int) -> float:
    """Seconds to pause before sealing checkpoint ``step`` (0: no pause)."""
    pause = _float(PAUSE_BEFORE_SEAL)
    return pause if pause and step >= int(_float(PAUSE_FROM_STEP)) else 0.0


def step_log() -> str | None:
    return os.environ.get(STEP_LOG) or None


def oom_at() -> tuple[int, ...] | None:
    text = os.environ.get(OOM_AT)
    return tuple(int(x) for x in text.split(":")) if text else None


def oom_above() -> int | None:
    text = os.environ.get(OOM_ABOVE)
    return int(text) if text else None


def device_memory() -> tuple[int, int, list[int]] | None:
    text = os.environ.get(DEVICE_MEMORY)
    if not text:
        return None
    base, per_sample, *capacities = (int(x) for x in text.split(","))
    return base, per_sample, capacities


def noise_scales() -> list[float]:
    text = os.environ.get(NOISE_SCALES)
    return [float(x) for x in text.split(",")] if text else []


def compile_backend() -> str:
    return os.environ.get(COMPILE_BACKEND) or "inductor"


# ---- the process tree's own small mechanisms (stdlib; every layer may use them)

def load_libc():
    try:
        import ctypes
        return ctypes.CDLL("libc.so.6", use_errno=True)
    except OSError:                    # not Linux: no death signals, no subreaper
        return None


def alive(pid: int) -> bool:
    """Whether process ``pid`` is running (a zombie is not: it has ended, its parent has not reaped it)."""
    if os.path.isdir("/proc/self"):
        try:
            stat = open(f"/proc/{pid}/stat").read()
        except OSError:
            return False
        return stat[stat.rindex(")") + 2] != "Z"         # the name may contain spaces and parentheses
    try:                               # no /proc (not Linux): ask the kernel
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def exit_with(pid: int, poll_s: float = 0.25) -> None:
    """End this process the moment process ``pid`` ends (now, if it already has), whoever our parent is:
    a daemon thread waits on a pidfd (Linux 5.3+), else polls every ``poll_s`` seconds. For a process
    whose parent outlives what it works for (a DataLoader worker, child of its rank's fork server)."""
    import select
    import threading

    def wait() -> None:
        try:
            fd = os.pidfd_open(pid)
        except (AttributeError, OSError):            # no pidfd here, or the process is gone already
            fd = None
        if fd is not None:
            select.select([fd], [], [])             # readable once the process has ended
        while fd is None and alive(pid):
            time.sleep(poll_s)
        os._exit(1)

    if not alive(pid):
        os._exit(1)
    threading.Thread(target=wait, name=f"exit-with-{pid}", daemon=True).start()


def die_with_parent(expected_parent: Optional[int] = None) -> None:
    """Ask Linux to SIGKILL this process when its parent dies; if the parent already died (this
    process was re-parented), exit now. Elsewhere than Linux this does nothing."""
    libc = load_libc()
    if libc is None:
        return
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if expected_parent is not None and os.getppid() != expected_parent:
        os._exit(1)


# ---- signals that arrive before the code that handles them (a worker imports torch for seconds first)

_early: list[int] = []


def _record(signum, frame) -> None:
    _early.append(signum)


def record_early_signals() -> None:
    """Record (rather than die of) the signals a run may treat as preemption, from the first line of
    the process on: importing torch takes seconds, and a preemption that lands meanwhile must count."""
    for name in PREEMPTION_SIGNALS:
        signal.signal(getattr(signal, name), _record)


def take_early_signals() -> list[int]:
    """The signals recorded so far, forgotten here (a local sweep's next point must not take them again)."""
    taken = list(_early)
    _early.clear()
    return taken


def early_signals(wanted: list[str]) -> list[int]:
    """The signals received before their real handler existed that are among ``wanted``, in order.
    The other early signals get their default action now (as if no recorder had been there), and
    signals not wanted get their default disposition back."""
    numbers = {getattr(signal, n) for n in wanted}
    for name in PREEMPTION_SIGNALS:
        if getattr(signal, name) not in numbers:
            signal.signal(getattr(signal, name), signal.SIG_DFL)
    taken = take_early_signals()
    for signum in taken:
        if signum not in numbers:
            os.kill(os.getpid(), signum)
    return [s for s in taken if s in numbers]
