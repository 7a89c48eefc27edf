"""``qhm-launch run``: the launcher side (checks before any worker starts, the run folder's lock,
torchrun under supervision, the markers turned into an exit status) and a worker's lifecycle (join the
group, train, report a failure in one line).

Exit status: 0 done; 2 bad input (one line on stderr, ``--debug`` for the traceback); 75 preempted
after saving a checkpoint (run the same command again to resume); anything else: a failure.
"""
from __future__ import annotations

import gc
import json
import os
import socket
import sys
import tempfile
from pathlib import Path

import yaml

from launcher import config as recipe_mod
from launcher import env
from launcher.errors import FAILED, PREEMPTED, DiskFull, RunFailed, UserError, disk_full, exit_status, one_line


def check_resume(recipe, force: bool, world: int, log=print) -> None:
    """Refuse a checkpoint written under other trajectory-changing fields (one-line diff), or one
    that this engine cannot load on ``world`` processes."""
    from launcher.run.checkpoint import CheckpointManager
    # quiet: the worker reports an invalid newest checkpoint itself when it resumes
    found = CheckpointManager(recipe.folder, log=lambda *a: None).find_latest_valid()
    if found is None:
        check_no_other_results(recipe)
        return
    if found.manifest["world_size"] != world:
        from launcher import engines
        why = engines.move_refusal(found.manifest["recipe"])
        if why:
            raise UserError(f"distributed.nproc_per_node: checkpoint {found.path} was written on "
                            f"{found.manifest['world_size']} processes and cannot be loaded on {world}: {why}; "
                            f"allowed: resume on {found.manifest['world_size']} processes")
    if recipe_mod.is_branch_start(recipe, found.manifest):   # a branch's start: the parent's checkpoint, which differs by design
        return
    diff = recipe_mod.trajectory_diff(found.manifest["recipe"], recipe.to_dict())
    if not diff:
        return
    if force:
        log("qhm-launch: WARNING: --force-resume: resuming " + str(found.path) + " although the recipe differs: "
            + "; ".join(diff))
        return
    raise UserError(f"recipe differs from checkpoint {found.path}: {'; '.join(diff)} "
                    "(use another name, or --force-resume)")


def check_no_other_results(recipe) -> None:
    """A folder with no checkpoint to resume that holds another recipe's results (complete.json, the final
    model, metrics or step rows: a finished run whose checkpoints were deleted, say) is never trained over:
    refused in one line naming what is there. The same recipe starts again (it writes the same results)."""
    folder = recipe.folder
    results = [p.name for p in (folder.complete, folder.final_model, folder.metrics, folder.steps)
               if p.is_file() and p.stat().st_size > 0]
    if not results:
        return
    done = folder.read_json(folder.complete) or {}
    theirs = done.get("recipe_hash")
    if theirs is None and folder.recipe.is_file():
        try:
            theirs = recipe_mod.trajectory_hash(yaml.safe_load(folder.recipe.read_text()) or {})
        except Exception:  # noqa: BLE001 - an unreadable recipe.yaml: the results are of an unknown recipe
            theirs = "unknown (its recipe.yaml does not read)"
    mine = recipe_mod.trajectory_hash(recipe.to_dict())
    if theirs is not None and theirs != mine:
        raise UserError(f"run folder {folder.path}: holds another recipe's results ({', '.join(results)}; its recipe "
                        f"hash {theirs}, this recipe's {mine}) and no checkpoint to resume; allowed: another name "
                        f"(--set name=...) or output, or move {folder.path} aside to keep what is there")


def threads_per_rank(nproc: int) -> int:
    """Each rank's share of the CPUs this process may run on (a Slurm job's or a taskset's, not the
    machine's: os.cpu_count() would oversubscribe a job given some of a node's cores)."""
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, usable // nproc)


def cmd_run(args) -> int:
    recipe = recipe_mod.load(args.recipe, args.set)
    from launcher.train.comm import in_worker_env
    if in_worker_env():
        return run_worker(recipe, force=args.force_resume or env.flag(env.FORCE_RESUME), until_epoch=args.until_epoch,
                          until_step=args.until_step)
    from launcher.cluster.keeper import Keeper
    with Keeper():           # from here on, nothing the run starts outlives it (a kill -9 of this process included)
        return launch(args, recipe)


def launch(args, recipe) -> int:
    """The launcher's side of ``run``: the checks, the folder's lock, torchrun under supervision, and the
    markers its workers left turned into one line and an exit status."""
    from launcher.config import factories
    from launcher.train import preflight
    from launcher.cluster.supervise import AGENT_SIGNALS, supervise
    folder = recipe.folder
    gpus = preflight.visible_gpus()
    nproc = preflight.resolve_nproc(recipe, gpus)
    min_nodes, nnodes = args.nnodes
    elastic = min_nodes < nnodes
    nodes_text = f"{min_nodes}:{nnodes}" if elastic else str(nnodes)
    if nnodes > 1 and not (args.rdzv_endpoint and args.rdzv_id):
        raise UserError(f"--nnodes: {nodes_text} needs --rdzv-endpoint HOST:PORT and --rdzv-id ID (the same on every "
                        "node); allowed: 1 without them")
    if args.max_restarts is not None and not elastic:
        raise UserError(f"--max-restarts: {args.max_restarts} restarts the workers when a node is lost, which needs "
                        f"elastic membership; allowed: with --nnodes MIN:MAX (MIN < MAX; given {nodes_text})")
    factories.importable_from_cwd()          # the user's packages, here and in the workers
    from launcher.train import splits
    planned = preflight.check_membership(recipe, nproc, args.nnodes, f"--nnodes: {nodes_text}")
    warnings = splits.zero_lr_warnings(planned, recipe.schedule.unit)
    preflight.check_devices(recipe, nproc * nnodes, gpus > 0, visible=gpus)
    slow = preflight.slow_precision_warning(recipe, gpus > 0)
    if slow:
        print(slow, file=sys.stderr, flush=True)
    # one run per folder: a single node holds the lock here; on several nodes, the first worker does
    lock = folder.acquire_lock() if nnodes == 1 else None
    try:
        check_resume(recipe, args.force_resume, nproc * nnodes)
    except BaseException:                     # refused: the folder is free again (a sweep's next point may be it)
        if lock is not None:
            lock.release()
        raise
    done = folder.read_json(folder.complete)
    if done and done.get("recipe_hash") == recipe_mod.trajectory_hash(recipe.to_dict()) and folder.final_model.is_file():
        print(f"qhm-launch: {folder.path} is already complete; nothing to do")
        if lock is not None:
            lock.release()
        return 0
    for line in warnings:                     # every check passed: what it would be good to know, once
        print(line.replace("warning: ", "qhm-launch: WARNING: "), file=sys.stderr, flush=True)
    resolved = folder.write_recipe(recipe_mod.dump(recipe))
    folder.preempted.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "launcher.cluster.agent", *topology(args), f"--nproc_per_node={nproc}",
           AGENT_SIGNALS, "-m", "launcher", "run", str(resolved)]
    worker_env = dict(os.environ, **{env.PARENT: str(os.getpid()), env.FORCE_RESUME: "1" if args.force_resume else "0",
                              env.DEBUG: "1" if args.debug else "0", env.UNTIL_EPOCH: str(args.until_epoch or ""),
                              env.UNTIL_STEP: str(args.until_step or "")})
    if lock is not None:
        worker_env[env.LOCKED_BY] = str(os.getpid())
    if elastic:                               # a worker that loses a peer exits non-zero: torchrun restarts the group
        worker_env[env.ELASTIC] = "1"
        # each round's workers meet in a store of their own: in the store torchrun shares across rounds, a
        # restarted group read the last round's gloo addresses and never met (pytorch#135712): 600 s hangs
        worker_env.setdefault("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "1")
    if recipe.performance.deterministic:      # read when cuBLAS starts, before any code of ours could set it
        from launcher.train.build import CUBLAS_DETERMINISTIC
        worker_env.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_DETERMINISTIC)
    # torchrun sets 1 thread per worker and prints a banner saying so; we choose the share of cores
    worker_env.setdefault("OMP_NUM_THREADS", str(threads_per_rank(nproc)))
    # a rank the agent ends (another one failed) leaves its data workers' semaphores to its resource tracker,
    # which cleans them up and warns about them at exit: lines under the one that says what failed; and
    # DeepSpeed's ZeRO calls collectives torch has deprecated, a FutureWarning on every rank
    worker_env["PYTHONWARNINGS"] = ",".join(w for w in (os.environ.get("PYTHONWARNINGS"),
                                                        "ignore:resource_tracker:UserWarning",
                                                        "ignore::FutureWarning:torch.distributed.c10d_logger") if w)
    if lock is not None:                      # this process holds the folder: an earlier failure is history
        folder.failed.unlink(missing_ok=True)
    before = _signature(folder.failed)
    seen: list[dict] = []
    # where a worker reports its failure when failed.json cannot be written (a full disk)
    fd, note = tempfile.mkstemp(prefix="qhm-launch-failure-", suffix=".json")
    os.close(fd)
    worker_env[env.FAILURE_NOTE] = note
    fd, agent_note = tempfile.mkstemp(prefix="qhm-launch-agent-", suffix=".json")
    os.close(fd)
    worker_env[env.AGENT_NOTE] = agent_note

    def worker_failed() -> bool:              # a failure written during this run (a rank may remove it later)
        if not seen and _signature(folder.failed) != before:
            seen.extend(filter(None, [folder.read_json(folder.failed)]))
        if not seen:
            seen.extend(filter(None, [folder.read_json(Path(note))]))
        return bool(seen)
    try:
        rc = supervise(cmd, worker_env, preemption_signals(recipe), failed=worker_failed)
        worker_failed()
        died = folder.read_json(Path(agent_note))
    finally:
        os.unlink(note)
        os.unlink(agent_note)
    unsaid = untold_end(folder, died, rc, told=bool(seen))
    if unsaid is not None:                    # a worker (or the agent) ended without a word of its own
        seen[:] = [unsaid]
        try:
            folder.write_marker(folder.failed, unsaid)
        except (OSError, RunFailed):
            pass
    if lock is not None:
        lock.release()
    failed = seen[0] if seen else folder.read_json(folder.failed)
    if failed:                                # a worker stopped on a failure it could name
        print(f"qhm-launch: error: {failed.get('error')}", file=sys.stderr)
        return int(failed.get("exit", FAILED))
    preempted = folder.read_json(folder.preempted)
    if preempted is not None:
        if env.flag(env.BATCH_JOB):  # in a Slurm job: the script requeues on the marker; srun sees 0
            print(f"[qhm-launch] {socket.gethostname()}: preempted, checkpoint at global step "
                  f"{preempted.get('global_step')}; the job requeues", flush=True)
            return 0
        print(f"qhm-launch: preempted at global step {preempted.get('global_step')}; run the same command to "
              f"resume (exit {PREEMPTED})", flush=True)
        return PREEMPTED
    return rc


def topology(args) -> list[str]:
    """torchrun's arguments for the nodes (``args.nnodes``: MIN, MAX): standalone on one; else a c10d
    rendezvous on the first node, with elastic membership (MIN < MAX: ``--nnodes MIN:MAX`` and restarts)."""
    low, high = args.nnodes
    if high == 1:
        return ["--standalone", "--nnodes=1"]
    rendezvous = ["--rdzv_backend=c10d", f"--rdzv_endpoint={args.rdzv_endpoint}", f"--rdzv_id={args.rdzv_id}"]
    conf = [args.rdzv_conf] if args.rdzv_conf else []
    node = os.environ.get("SLURM_NODEID")
    if os.environ.get(env.BATCH_JOB) and node is not None and "is_host" not in (args.rdzv_conf or ""):
        # the job's --rdzv-endpoint is its first node: the store lives there. torchrun guesses by matching the
        # endpoint against this host's names and addresses; where nodes share a host (containers, the test
        # cluster) the first agent to bind hosts it, which need not be the first node's.
        conf.append(f"is_host={'true' if node == '0' else 'false'}")
    if conf:
        rendezvous.append(f"--rdzv_conf={','.join(conf)}")
    if low == high:
        return [f"--nnodes={high}", *rendezvous]
    restarts = DEFAULT_RESTARTS if args.max_restarts is None else args.max_restarts
    return [f"--nnodes={low}:{high}", f"--max_restarts={restarts}", *rendezvous]


DEFAULT_RESTARTS = 3


# what a signal a worker died of most likely means, for the line that says so
SIGNAL_CAUSES = {"SIGKILL": "what the kernel's out-of-memory killer sends: see the node's memory, e.g. `dmesg`",
                 "SIGSEGV": "a crash in native code", "SIGBUS": "a crash in native code (or a full /dev/shm)",
                 "SIGABRT": "an abort in native code"}


def untold_end(folder, died: dict | None, rc: int, told: bool) -> dict | None:
    """The failure marker for a run whose cause no worker could name: a worker killed by a signal (the
    agent's note ``died``; its peers' errors are the consequence, so it outranks what they ``told``), a
    worker that exited with a status of its own while none reported anything, or torchrun's agent itself
    killed (``rc`` < 0, its workers dying with it). None when the workers' own report stands."""
    from launcher.run.checkpoint import CheckpointManager, step_of
    newest = CheckpointManager(folder, log=lambda *a: None).candidates()
    again = ("run the same command again to resume from the newest checkpoint (global step "
             f"{step_of(newest[0])})" if newest else "no checkpoint was written: run the same command to start again")
    if died is not None and "rendezvous" in died:   # the node holding the rendezvous' store lost: all end
        return {"error": f"{died['host']}: the rendezvous is gone ({died['rendezvous'][:160]}): the node at "
                         "--rdzv-endpoint, which holds its store, was lost or ended, and the run ends on every node; "
                         + again.replace("run the same command", "run the same command on every node"),
                "exit": FAILED}
    if died is not None and (died.get("signal") or not told):
        how = (f"was killed by {died['signal']} (signal {-died['exitcode']}"
               + (f"; {SIGNAL_CAUSES[died['signal']]})" if died["signal"] in SIGNAL_CAUSES else ")")
               if died.get("signal") else f"exited with status {died['exitcode']} without a word")
        return {"error": f"rank {died['rank']} (pid {died['pid']} on {died['host']}) {how}; {again}",
                "exit": FAILED, "rank": died["rank"], "signal": died.get("signal")}
    if rc < 0 and not told:
        import signal
        name = signal.Signals(-rc).name if -rc in signal.valid_signals() else f"signal {-rc}"
        return {"error": f"torchrun's agent was killed by {name} (signal {-rc}) and its workers ended with it; {again}",
                "exit": FAILED, "signal": name}
    return None


def _signature(path) -> tuple | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns, st.st_size


def run_worker(recipe, force: bool, until_epoch: int | None = None, comm=None, until_step: int | None = None) -> int:
    """One worker's whole life: join the group (unless ``comm`` is one already joined), hold the folder
    (unless the launcher does), train, say how it ended (markers, final model) or why it failed (one
    line), leave the group it joined."""
    from launcher.cluster import supervise
    from launcher.train import build, comm as comm_mod
    from launcher.train.signals import PreemptionFlag
    from launcher.train.trainer import Trainer
    flag = PreemptionFlag(preemption_signals(recipe))
    for signum in supervise.early_signals(preemption_signals(recipe))[:1]:
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


def report_failure(recipe, comm, exc: BaseException, where: str | None = None) -> int:
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


def report_lost_peer(recipe, comm, exc: BaseException, where: str | None) -> int:
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


def log_traceback(recipe, comm, exc: BaseException, where: str) -> str:
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


def preemption_signals(recipe) -> list[str]:
    """The recipe's preemption signals, and SIGINT (Ctrl-C saves and stops, like a preemption)."""
    return list(dict.fromkeys(list(recipe.signals.preempt) + ["SIGINT"]))


def _take_lock(recipe, comm):
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
