"""The launcher's side of ``qhm-launch run``: the checks before any worker starts, the run folder's lock,
torchrun (its agent: ``launcher.cluster.agent``) under supervision, and the markers its workers left turned into
one line and an exit status."""
from __future__ import annotations

import os
import socket
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from launcher import config as recipe_mod
from launcher import env
from launcher.errors import FAILED, PREEMPTED, RunFailed, UserError
from launcher.train.preflight import check_resume
from launcher.train.worker import preemption_signals

if TYPE_CHECKING:
    from launcher.config import Recipe


def threads_per_rank(nproc: int) -> int:
    """Each rank's share of the CPUs this process may run on (a Slurm job's or a taskset's, not the
    machine's: os.cpu_count() would oversubscribe a job given some of a node's cores)."""
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, usable // nproc)


def launch(args, recipe: Recipe) -> int:
    """The launcher's side of ``run``: the checks, the folder's lock, torchrun under supervision, and the
    markers its workers left turned into one line and an exit status. torchrun's agent starts first and
    imports torch while the checks run (two seconds off every start); it runs nothing until they pass."""
    from launcher.cluster.supervise import PendingAgent
    agent = PendingAgent()
    try:
        return _launch(args, recipe, agent)
    finally:
        agent.cancel()


def _launch(args, recipe: Recipe, agent) -> int:
    from launcher.cluster.supervise import AGENT_SIGNALS, supervise
    from launcher.config import factories
    from launcher.train import preflight
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
    from launcher.train import planning
    planned = preflight.check_membership(recipe, nproc, args.nnodes, f"--nnodes: {nodes_text}")
    warnings = planning.zero_lr_warnings(planned, recipe.schedule.unit)
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
        rc = supervise(cmd, worker_env, preemption_signals(recipe), failed=worker_failed, agent=agent)
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
