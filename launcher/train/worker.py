"""A worker's lifecycle: join the group, hold the run folder (unless the launcher does), train, say how the run
ended (the preempted or complete marker, the final model) or why it failed (one line into failed.json for the
launcher to print), leave the group. ``qhm-launch run`` calls :func:`run_worker` in each process torchrun starts;
the tests' in-process ranks call it too."""
from __future__ import annotations

import gc
import json
import os
import socket
import sys
from typing import TYPE_CHECKING

from launcher import config as recipe_mod
from launcher import env
from launcher.errors import PREEMPTED, DiskFull, RunFailed, UserError, disk_full, exit_status, one_line
from launcher.train.preflight import check_resume

if TYPE_CHECKING:
    from launcher.config import Recipe


def run_worker(recipe: Recipe, force: bool, until_epoch: int | None = None, comm=None, until_step: int | None = None) -> int:
    """One worker's whole life: join the group (unless ``comm`` is one already joined), hold the folder
    (unless the launcher does), train, say how it ended (markers, final model) or why it failed (one
    line), leave the group it joined."""
    from launcher.train import build
    from launcher.train import comm as comm_mod
    from launcher.train.signals import PreemptionFlag
    from launcher.train.trainer import Trainer
    flag = PreemptionFlag(preemption_signals(recipe))
    for signum in env.early_signals(preemption_signals(recipe))[:1]:
        flag.adopt(signum)
    if os.environ.get(env.UNTIL_EPOCH):        # the launcher's --until-epoch / --until-step, for its workers
        until_epoch = int(os.environ[env.UNTIL_EPOCH])
    if os.environ.get(env.UNTIL_STEP):
        until_step = int(os.environ[env.UNTIL_STEP])
    joined = comm is None
    comm = comm_mod.init() if joined else comm
    lock, trainer, watchdog = None, None, None
    try:
        if os.environ.get(env.LOCKED_BY) is None:      # nobody holds the folder for us: rank 0 does
            lock = _take_lock(recipe, comm)
        if env.PARENT not in os.environ:          # nobody checked the recipe before us
            check_resume(recipe, force, comm.world, log=print if comm.is_main else (lambda *a: None))
        trainer = Trainer(build.build(recipe, comm), flag, until_epoch=until_epoch, until_step=until_step)
        watchdog = watch(trainer, flag)
        rc = conclude(trainer, trainer.train())
    except (UserError, RunFailed) as exc:
        if env.flag(env.DEBUG):
            raise
        rc = report_failure(recipe, comm, exc)
    except Exception as exc:  # noqa: BLE001 - a mistake only a worker meets (the user's code, a bug): one line too
        where = trainer.pace.where(trainer.state.global_step) if trainer else None
        if env.flag(env.ELASTIC) and comm_mod.peer_lost(exc):
            rc = report_lost_peer(recipe, comm, exc, where)
        else:
            rc = report_failure(recipe, comm, exc, where=where)
    finally:
        if watchdog is not None:
            watchdog.close()
        # DDP must be gone before its process group: a gloo group destroyed under a live DDP aborts the
        # interpreter's teardown now and then ("terminate called without an active exception", exit -6
        # after a finished run: 13 of 100 runs of a plain DDP script, 0 of 70 with DDP freed first)
        if trainer is not None:           # a failed run did not close it
            trainer.parts.close()
        trainer = None
        gc.collect()
        if joined:
            comm.close()
        if lock is not None:
            lock.release()
    if rc == PREEMPTED and env.PARENT in os.environ:
        return 0                    # the parent turns the marker into the PREEMPTED status
    return rc


def watch(trainer, flag):
    """The worker's watchdog (launcher.train.signals.Watchdog): a step far slower than the ones before is
    one warning; a preemption signal that meets a step that will not end (a data worker stuck in a
    dataset's ``__getitem__``) ends the run as a preemption would, from the newest checkpoint, within the
    signal's grace time, where it would otherwise wait until Slurm's SIGKILL."""
    import signal
    import time
    from launcher.train.signals import STALL_MIN_S, STUCK_AFTER_S, Watchdog
    rank, folder = trainer.comm.rank, trainer.folder

    def warn(age: float, typical: float) -> None:
        print(f"[qhm-launch] WARNING: rank {rank}: global step {trainer.state.global_step + 1} has taken {age:.0f} s "
              f"(a step takes {typical:.2g} s): is a batch not coming (a data worker stuck in a dataset's "
              "__getitem__, a file system that hangs)?", file=sys.stderr, flush=True)

    def on_stuck(age: float) -> None:
        step = trainer.checkpoints.last_step
        if not folder.preempted.exists():            # the first rank to see it says it (each rank sees it)
            name = signal.Signals(flag.received).name if flag.received else "a stop request"
            print(f"[qhm-launch] {name}, and rank {rank} has made no progress for {age:.0f} s (at global step "
                  f"{trainer.state.global_step + 1}): stopping without a new checkpoint; the run resumes from "
                  + (f"global step {step}" if step is not None else "its start (no checkpoint yet)"),
                  file=sys.stderr, flush=True)
            try:
                folder.write_marker(folder.preempted, {"signal": flag.received, "global_step": step or 0,
                                                       "stuck": True})
            except (OSError, RunFailed):
                pass
        time.sleep(2.0)            # the other ranks see the marker before their collectives fail on our exit
        os._exit(0 if env.PARENT in os.environ else PREEMPTED)

    return Watchdog(trainer.pace, flag, warn, on_stuck, stall_s=float(os.environ.get(env.STALL_S) or STALL_MIN_S),
                    stuck_s=float(os.environ.get(env.STUCK_S) or STUCK_AFTER_S))


def conclude(trainer, outcome) -> int:
    """How a worker's run ended, in the run folder (rank 0): the preempted marker, or the final model and
    the complete marker; then the exit status (PREEMPTED, or 0)."""
    from launcher.run.files import atomic_write
    from launcher.train.trainer import Outcome
    folder, state, log = trainer.folder, trainer.state, trainer.log
    if trainer.comm.is_main and outcome is Outcome.PREEMPTED:
        folder.write_marker(folder.preempted, {"signal": trainer.stop.flag.received, "global_step": state.global_step})
    whole = trainer.engine.full_state_dict() if outcome is Outcome.FINISHED else None   # every rank (FSDP gathers)
    if trainer.comm.is_main and outcome is Outcome.FINISHED:
        import io
        import torch
        buffer = io.BytesIO()
        torch.save(whole, buffer)
        atomic_write(folder.final_model, buffer.getvalue())
        folder.write_marker(folder.complete, {
            "global_step": state.global_step, "samples": state.samples, "epochs": trainer.stages.epochs,
            "recipe_hash": recipe_mod.trajectory_hash(trainer.recipe.to_dict())})
        graphs = trainer.stages.graphs_compiled()
        if graphs is not None:
            log(f"[qhm-launch] compile: {graphs} graphs compiled over the run")
    trainer.close(outcome)
    if outcome is Outcome.PREEMPTED:
        log(f"[qhm-launch] preempted: checkpoint at global step {state.global_step}")
        return PREEMPTED
    if outcome is Outcome.SEGMENT_DONE:
        upto = f"epochs up to {trainer.until_epoch}" if trainer.until_step is None else f"steps up to {trainer.until_step}"
        log(f"[qhm-launch] segment done: {upto} saved; the next segment resumes from global step {state.global_step}")
    return 0


def report_failure(recipe: Recipe, comm, exc: BaseException, where: str | None = None) -> int:
    """A worker's one-line failure: into failed.json (the first rank to fail writes it), for the launcher
    to print and exit with; without a launcher, printed here. An unexpected exception (not a UserError or
    RunFailed, whose message is the line) is named by rank, global step and its last line, and its
    traceback appended to the run folder's failure.log (and shown with --debug).

    Under the launcher the worker then exits 0, so torchrun prints no block of its own: the launcher,
    seeing failed.json, gives the other ranks a moment to end (they may be waiting in a collective for
    this one) and then ends them."""
    if (recipe.folder.read_json(recipe.folder.preempted) or {}).get("stuck"):
        return 0 if env.PARENT in os.environ else PREEMPTED   # a stuck peer ended the run: this is what followed
    if disk_full(exc):                        # a write we did not make ourselves (DeepSpeed's files, W&B)
        exc = DiskFull(exc.filename or recipe.folder.path / "?", None)
    status = exit_status(exc)
    line = one_line(exc)
    if not isinstance(exc, (UserError, RunFailed)):
        import traceback
        where = where or "before training"
        text = log_traceback(recipe, comm, exc, where)
        from launcher.data.streamed import worker_failure
        what = worker_failure(exc) or traceback.format_exception_only(exc)[-1]
        line = one_line(f"rank {comm.rank} failed {where}: {what} (traceback in {recipe.folder.failure_log})")
        if env.flag(env.DEBUG):
            print(text, file=sys.stderr, flush=True)
    if not recipe.folder.failed.exists():     # the first rank to fail names the cause; the others follow it
        marker = {"error": line, "exit": status, "rank": comm.rank}
        try:
            recipe.folder.write_marker(recipe.folder.failed, marker)
        except (OSError, RunFailed):          # e.g. the disk is full: the launcher's note (its temp folder)
            try:
                with open(os.environ[env.FAILURE_NOTE], "w") as note:
                    json.dump(marker, note)
            except (KeyError, OSError):       # no launcher to tell: the line, and torchrun ends the others
                print(f"qhm-launch: error: {line}", file=sys.stderr, flush=True)
                return status
    if env.PARENT in os.environ:
        return 0
    if comm.is_main or not isinstance(exc, (UserError, RunFailed)):
        print(f"qhm-launch: error: {line}", file=sys.stderr)
    return status


def report_lost_peer(recipe: Recipe, comm, exc: BaseException, where: str | None) -> int:
    """Under elastic membership, a collective that failed because a process of the run is gone (a node
    lost): no failure marker, which would end the run, but exit 1, for torchrun's agent to restart this
    node's workers on the nodes left (they resume from the newest checkpoint). One line from this node,
    the traceback in failure.log."""
    where = where or "before training"
    log_traceback(recipe, comm, exc, f"{where} (a process of the run lost)")
    if comm.local_rank == 0:
        print(f"[qhm-launch] {socket.gethostname()}: a process of the run is gone ({where}, "
              f"world size {comm.world}: {_gist(exc)}); torchrun "
              "restarts the workers on the nodes left, from the newest checkpoint", file=sys.stderr, flush=True)
    return 1


def log_traceback(recipe: Recipe, comm, exc: BaseException, where: str) -> str:
    """``exc``'s traceback appended to the run folder's failure.log (as far as it can be written); the text."""
    import traceback
    text = "".join(traceback.format_exception(exc))
    try:
        recipe.folder.append_failure(f"rank {comm.rank} on {socket.gethostname()}, {where}:\n{text}")
    except (OSError, RunFailed):
        pass
    return text


def _gist(exc: BaseException) -> str:
    """gloo's message without its source location and its advice: "Connection closed by peer [127.0.0.1]:35751"."""
    import re
    text = re.sub(r"^\[[^\]]*\] ", "", str(exc).strip())
    return one_line(f"{type(exc).__name__}: {text.split('. ')[0]}")[:200]


def preemption_signals(recipe: Recipe) -> list[str]:
    """The recipe's preemption signals, and SIGINT (Ctrl-C saves and stops, like a preemption)."""
    return list(dict.fromkeys(list(recipe.signals.preempt) + ["SIGINT"]))


def _take_lock(recipe: Recipe, comm):
    """Rank 0 takes the run folder's lock; every rank stops with its one-line error if it cannot."""
    lock, problem = None, None
    if comm.is_main:
        try:
            lock = recipe.folder.acquire_lock()
        except UserError as exc:
            problem = str(exc)
    problem = comm.broadcast(problem)
    if problem:
        raise UserError(problem)
    return lock
