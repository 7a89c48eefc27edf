"""``qhm-launch``: run, plan, bounds (and the Slurm / analysis commands in their modules).

Exit status: 0 done; 2 bad input (one line on stderr, ``--debug`` for the traceback); 75 preempted
after saving a checkpoint (run the same command again to resume); anything else: a failure.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import sys

from launcher.config import recipe as recipe_mod
from launcher.cli.args import Parser, add_debug, nonnegative_float, positive_float, positive_int, text
from launcher.errors import BAD_INPUT, FAILED, PREEMPTED, RunFailed, UserError, exit_status, one_line

PARENT_ENV = "QHM_LAUNCH_PARENT"        # set for workers that `qhm-launch run` started itself
FORCE_ENV = "QHM_FORCE_RESUME"
LOCK_ENV = "QHM_FOLDER_LOCKED_BY"       # the launcher holds the run folder's lock for its workers
UNTIL_ENV = "QHM_UNTIL_EPOCH"           # run --until-epoch, for the workers
BATCH_ENV = "QHM_BATCH_JOB"             # set by the generated Slurm script


def _parser() -> argparse.ArgumentParser:
    p = Parser(prog="qhm-launch", description="QHM with increasing batch size, data-parallel: torchrun, "
               "DeepSpeed, Slurm, W&B.")
    p.add_argument("--debug", action="store_true", help="show the traceback of an error instead of one line")
    p.add_argument("--version", action="version", version=f"qhm-launch {version()}")
    # the `deepspeed` launcher passes --local_rank=N before the command (it also sets LOCAL_RANK)
    p.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    sub = p.add_subparsers(dest="command", required=True, parser_class=Parser)

    def command(name, help):
        sp = sub.add_parser(name, help=help, description=help)
        add_debug(sp)
        return sp

    def recipe_args(sp):
        sp.add_argument("recipe", help="YAML recipe")
        sp.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a recipe key, e.g. schedule.lr.max=0.05 (repeatable)")

    r = command("run", "train (or resume) a recipe; starts torchrun itself when needed")
    recipe_args(r)
    r.add_argument("--force-resume", action="store_true",
                   help="resume even if trajectory-changing recipe fields differ from the checkpoint's")
    r.add_argument("--nnodes", type=positive_int, default=1,
                   help="nodes of a multi-node run: run this command once on each (a Slurm script does)")
    r.add_argument("--rdzv-endpoint", type=text, help="HOST:PORT of the rendezvous (multi-node; the first node)")
    r.add_argument("--rdzv-id", type=text, help="the rendezvous id, the same on every node (multi-node)")
    r.add_argument("--until-epoch", type=positive_int,
                   help="stop after this many epochs with a checkpoint (a segment of an elastic chain)")

    pl = command("plan", "the stage table: batch, steps, micro-batch x accumulation x world")
    recipe_args(pl)
    pl.add_argument("--nproc", type=positive_int, help="processes per node (default: distributed.nproc_per_node)")
    pl.add_argument("--nnodes", type=positive_int, default=1, help="nodes (default 1)")
    pl.add_argument("--n", type=positive_int, help="training-set size (default: the dataset's)")
    pl.add_argument("--json", action="store_true", help="print the plan as JSON")
    pl.add_argument("--elastic", action="store_true",
                    help="the segments of an elastic chain on up to --nnodes nodes of --nproc GPUs, and its GPU-hours "
                         "next to a fixed allocation")
    pl.add_argument("--rate", type=positive_float, default=2000.0,
                    help="samples/s one GPU trains, for the GPU-hour estimate (default 2000)")

    b = command("bounds", "Theorem 2 / Theorem 4 terms at the end of training, and the verdict")
    recipe_args(b)
    b.add_argument("--n", type=positive_int, help="training-set size (default: the dataset's)")
    b.add_argument("--L", type=positive_float, help="smoothness constant L of f (with all four: the bound itself)")
    b.add_argument("--sigma2", type=nonnegative_float, help="variance bound sigma^2 of the stochastic gradient")
    b.add_argument("--G", type=nonnegative_float, help="bound G on every per-sample gradient norm")
    b.add_argument("--f-gap", type=nonnegative_float, dest="f_gap", help="f(x_0) - f_star")
    b.add_argument("--json", action="store_true", help="print the terms as JSON")
    from launcher.cluster import slurm
    slurm.add_arguments(command)

    from launcher.cli.analysis import METRICS, RANKS, XS
    pt = command("plot", "curves of several runs: mean and min-max band over seeds")
    pt.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run folders (those without metrics are listed)")
    pt.add_argument("--metric", default="test_acc", help=f"what to draw: {' | '.join(METRICS)} (default test_acc)")
    pt.add_argument("--x", default="epoch", help=f"x axis: {' | '.join(XS)} (default epoch)")
    pt.add_argument("--out", default="plot.png", help="FILE.png or FILE.pdf (default plot.png)")
    pt.add_argument("--rows", default="epochs", help="epochs (metrics.jsonl) | steps (steps.jsonl) (default epochs)")
    rp = command("report", "a markdown table: one row per run")
    rp.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run or sweep folders (those without metrics are listed)")
    rp.add_argument("--rank", help=f"sort by: {' | '.join(RANKS)} (best first)")
    st = command("status", "one row per run: done / running / preempted / failed / interrupted / not started")
    st.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run folders, or sweep folders (their points)")
    return p


def version() -> str:
    try:
        from importlib.metadata import version as installed
        return installed("qhm-launch")
    except Exception:  # noqa: BLE001 - running from a source tree that was never installed
        return "unknown"


def cmd_plot(args) -> int:
    from launcher.cli import analysis
    drawn = analysis.plot(args.runs, args.metric, args.x, args.out, args.rows)
    print(f"qhm-launch: {len(drawn)} curves from {len(args.runs)} runs -> {args.out}")
    return 0


def cmd_report(args) -> int:
    from launcher.cli import analysis
    print(analysis.report(args.runs, args.rank))
    return 0


def cmd_status(args) -> int:
    from launcher.cli import status
    print(status.table(args.runs))
    return 0


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    if args.local_rank is not None:
        os.environ.setdefault("LOCAL_RANK", str(args.local_rank))
    from launcher.cluster import slurm
    from launcher.cluster.supervise import early_signals
    if args.command != "run":               # only a run treats signals as a request to checkpoint
        early_signals([])
    commands = {"run": cmd_run, "plan": cmd_plan, "bounds": cmd_bounds, "submit": slurm.cmd_submit,
                "sweep": slurm.cmd_sweep, "plot": cmd_plot, "report": cmd_report, "status": cmd_status}
    try:
        return commands[args.command](args)
    except UserError as exc:
        if args.debug:
            raise
        print(f"qhm-launch: error: {one_line(exc)}", file=sys.stderr)
        return BAD_INPUT


def _training_set_size(recipe, override) -> int:
    from launcher import data
    return override if override is not None else data.sizes(recipe.data)[0]


def cmd_plan(args) -> int:
    from launcher.train import splits as planning
    recipe = recipe_mod.load(args.recipe, args.set)
    nproc = args.nproc if args.nproc is not None else recipe.distributed.nproc_per_node
    n = _training_set_size(recipe, args.n)
    epochs = planning.plan(recipe, n, nproc * args.nnodes)
    if args.elastic:
        print(elastic_report(recipe, n, nproc, args.nnodes, args.rate))
        return 0
    print(json.dumps(planning.plan_json(epochs, n), indent=1) if args.json else planning.format_table(epochs, n))
    if recipe.distributed.max_micro_batch == "auto" and not args.json:
        print(f"note: max_micro_batch auto: each stage's micro x accum is chosen when it starts, by probing device "
              f"memory (the log and metrics rows say what); shown with the CPU cap, "
              f"cpu_micro_batch = {recipe.distributed.cpu_micro_batch}")
    return 0


def elastic_report(recipe, n: int, per_node: int, max_nodes: int, rate: float) -> str:
    """The segments of an elastic chain, each one's plan, and the GPU-hours next to a fixed allocation."""
    from launcher.train import splits as planning
    segments = planning.elastic_segments(recipe, n, per_node, max_nodes)
    nodes_of = {m: s.nodes for s in segments for m in range(s.first, s.last + 1)}
    epochs = [e for s in segments for e in planning.plan(recipe, n, s.nodes * per_node)[s.first:s.last + 1]]
    floor = recipe.distributed.min_rank_batch
    elastic = planning.gpu_hours(epochs, lambda m: nodes_of[m] * per_node, rate, floor)
    fixed = planning.gpu_hours(planning.plan(recipe, n, max_nodes * per_node), lambda m: max_nodes * per_node,
                               rate, floor)
    lines = [f"elastic chain of {len(segments)} jobs (distributed.min_rank_batch = {floor} samples per rank):"]
    for k, s in enumerate(segments):
        first = epochs[s.first]
        lines.append(f"  job {k + 1}: epochs {s.first}-{s.last} on {s.nodes} node(s) x {per_node} = {s.nodes * per_node} "
                     f"ranks, batch {first.batch}..{epochs[s.last].batch}"
                     + (f", then --until-epoch {s.last + 1}" if k < len(segments) - 1 else ""))
    lines.append(f"estimate at {rate:g} samples/s per GPU (a rank with fewer than {floor} samples is no faster): "
                 f"elastic {elastic[0]:.1f} GPU-hours ({elastic[1]:.1f} h), fixed {max_nodes} node(s) "
                 f"{fixed[0]:.1f} GPU-hours ({fixed[1]:.1f} h): {elastic[0] / fixed[0]:.2f}x the GPU-hours")
    return "\n".join(lines)


def cmd_bounds(args) -> int:
    import qhm
    recipe = recipe_mod.load(args.recipe, args.set)
    n = _training_set_size(recipe, args.n)
    out = qhm.summary(recipe.schedule_spec(), n, qhm.Constants(L=args.L, sigma2=args.sigma2, G=args.G,
                                                               f_gap=args.f_gap))
    if args.json:
        print(json.dumps(out, indent=1))
        return 0
    t2, t4 = out["theorem2"], out["theorem4"]
    g = lambda v: "-" if v is None else f"{v:.6g}"  # noqa: E731
    b4, c4, d4 = t4["B'_K"], t4["C'_K"], t4["D'_K"]
    lines = [f"K = {out['K']} steps over n = {n} samples; {out['verdict']}",
             f"Theorem 2: A_K={g(t2['A_K'])} B_K={g(t2['B_K'])} C_K={g(t2['C_K'])} "
             f"(sup gamma*beta={g(t2['sup_gamma_beta'])}) bound={g(t2['bound'])} {t2['note']}".rstrip(),
             "  Corollary 3: " + (", ".join(f"{k}_K<={g(v)}" for k, v in t2["corollary3"].items()) or "not covered"),
             f"Theorem 4: A_K={g(t4['A_K'])} B'_K={g(b4)} C'_K={g(c4)} D'_K={g(d4)} "
             f"condition={'holds' if t4['condition_holds'] else 'fails'} bound={g(t4['bound'])} {t4['note']}".rstrip(),
             "  Corollary 5: " + (", ".join(f"{k}_K<={g(v)}" for k, v in t4["corollary5"].items()) or "not covered")]
    pb = out["partial_batches"]
    if pb["excess"] > 0:
        lines.append(f"note: the last batch of an epoch is partial where n is not a multiple of the batch, while "
                     f"B_K and B'_K take b_k = b'_m: the run's sum of 1/b_k is {100 * pb['excess']:.3g}% above "
                     f"theirs (worst epoch {pb['worst_epoch']}: {100 * pb['worst_excess']:.3g}% at batch "
                     f"{pb['worst_batch']})")
    lines.append("note: grad_norm is the norm of the unregularised training loss's gradient (weight decay "
                 "is not in f)")
    print("\n".join(lines))
    return 0


# ------------------------------------------------------------------------------------------------
# run

def check_resume(recipe, force: bool, world: int, log=print) -> None:
    """Refuse a checkpoint written under other trajectory-changing fields (one-line diff), or one
    that this engine cannot load on ``world`` processes."""
    from launcher.run.checkpoint import CheckpointManager
    # quiet: the worker reports an invalid newest checkpoint itself when it resumes
    found = CheckpointManager(recipe.folder, log=lambda *a: None).find_latest_valid()
    if found is None:
        return
    saved = found.manifest["recipe"].get("distributed", {})
    if saved.get("engine") == "deepspeed" and saved.get("zero_stage", 0) > 0 and found.manifest["world_size"] != world:
        raise UserError(f"distributed.nproc_per_node: checkpoint {found.path} holds ZeRO stage "
                        f"{saved['zero_stage']} optimizer state partitioned over {found.manifest['world_size']} "
                        f"processes and cannot be loaded on {world}; allowed: resume on "
                        f"{found.manifest['world_size']} processes (or convert it with DeepSpeed's ds_to_universal)")
    diff = recipe_mod.trajectory_diff(found.manifest["recipe"], recipe.to_dict())
    if not diff:
        return
    if force:
        log("qhm-launch: WARNING: --force-resume: resuming " + str(found.path) + " although the recipe differs: "
            + "; ".join(diff))
        return
    raise UserError(f"recipe differs from checkpoint {found.path}: {'; '.join(diff)} "
                    "(use another name, or --force-resume)")


def cmd_run(args) -> int:
    recipe = recipe_mod.load(args.recipe, args.set)
    from launcher.train.comm import in_worker_env
    if in_worker_env():
        until = int(os.environ[UNTIL_ENV]) if os.environ.get(UNTIL_ENV) else args.until_epoch
        return run_worker(recipe, force=args.force_resume or os.environ.get(FORCE_ENV) == "1", until_epoch=until)
    from launcher.config import factories
    from launcher.train import splits as planning
    from launcher.cluster.supervise import AGENT_SIGNALS, supervise
    folder = recipe.folder
    nproc, nnodes = recipe.distributed.nproc_per_node, args.nnodes
    if nnodes > 1 and not (args.rdzv_endpoint and args.rdzv_id):
        raise UserError(f"--nnodes: {nnodes} needs --rdzv-endpoint HOST:PORT and --rdzv-id ID (the same on every "
                        "node); allowed: 1 without them")
    factories.importable_from_cwd()          # the user's packages, here and in the workers
    planning.preflight(recipe, nproc * nnodes)
    check_devices(recipe, nproc)
    # one run per folder: a single node holds the lock here; on several nodes, the first worker does
    lock = folder.acquire_lock() if nnodes == 1 else None
    check_resume(recipe, args.force_resume, nproc * nnodes)
    done = folder.read_json(folder.complete)
    if done and done.get("recipe_hash") == recipe_mod.trajectory_hash(recipe.to_dict()):
        print(f"qhm-launch: {folder.path} is already complete; nothing to do")
        return 0
    resolved = recipe_mod.write_resolved(recipe)
    folder.preempted.unlink(missing_ok=True)
    topology = (["--standalone", "--nnodes=1"] if nnodes == 1 else
                [f"--nnodes={nnodes}", "--rdzv_backend=c10d", f"--rdzv_endpoint={args.rdzv_endpoint}",
                 f"--rdzv_id={args.rdzv_id}"])
    cmd = [sys.executable, "-m", "torch.distributed.run", *topology, f"--nproc_per_node={nproc}", AGENT_SIGNALS,
           "-m", "launcher", "run", str(resolved)]
    env = dict(os.environ, **{PARENT_ENV: str(os.getpid()), FORCE_ENV: "1" if args.force_resume else "0",
                              "QHM_DEBUG": "1" if args.debug else "0", UNTIL_ENV: str(args.until_epoch or "")})
    if lock is not None:
        env[LOCK_ENV] = str(os.getpid())
    # torchrun sets 1 thread per worker and prints a banner saying so; we choose the share of cores
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    rc = supervise(cmd, env, preemption_signals(recipe))
    if lock is not None:
        lock.release()
    failed = folder.read_json(folder.failed)
    if failed:                                # a worker stopped on a failure it could name
        print(f"qhm-launch: error: {failed.get('error')}", file=sys.stderr)
        return int(failed.get("exit", FAILED))
    preempted = folder.read_json(folder.preempted)
    if preempted is not None:
        if os.environ.get(BATCH_ENV) == "1":  # in a Slurm job: the script requeues on the marker; srun sees 0
            print(f"[qhm-launch] {socket.gethostname()}: preempted, checkpoint at global step "
                  f"{preempted.get('global_step')}; the job requeues", flush=True)
            return 0
        print(f"qhm-launch: preempted at global step {preempted.get('global_step')}; run the same command to "
              f"resume (exit {PREEMPTED})", flush=True)
        return PREEMPTED
    return rc


def check_devices(recipe, nproc: int) -> None:
    """What needs CUDA where this machine has none: one line, before any worker starts."""
    import torch
    if torch.cuda.is_available():
        return
    if recipe.distributed.batch_norm == "sync" and nproc > 1:
        raise UserError("distributed.batch_norm: 'sync' is not valid here; allowed: local (torch's "
                        "SyncBatchNorm needs CUDA devices, and this machine has none)")
    if recipe.performance.cuda_graphs:
        raise UserError("performance.cuda_graphs: true is not valid here; allowed: false (CUDA graphs need CUDA "
                        "devices, and this machine has none)")


def run_worker(recipe, force: bool, until_epoch: int | None = None) -> int:
    from launcher.train import comm as comm_mod
    from launcher.cluster import supervise
    from launcher.train.signals import PreemptionFlag
    from launcher.train.trainer import Trainer
    flag = PreemptionFlag(preemption_signals(recipe))
    for signum in supervise.early_signals(preemption_signals(recipe))[:1]:
        flag.adopt(signum)
    comm = comm_mod.init()
    lock = None
    try:
        if os.environ.get(LOCK_ENV) is None:      # nobody holds the folder for us: rank 0 does
            lock = _take_lock(recipe, comm)
        if PARENT_ENV not in os.environ:          # nobody checked the recipe before us
            check_resume(recipe, force, comm.world, log=print if comm.is_main else (lambda *a: None))
        rc = Trainer(recipe, comm, flag, until_epoch=until_epoch).train()
    except (UserError, RunFailed) as exc:
        if os.environ.get("QHM_DEBUG") == "1":
            raise
        rc = report_failure(recipe, comm, exc)
    finally:
        comm.close()
        if lock is not None:
            lock.release()
    if rc == PREEMPTED and PARENT_ENV in os.environ:
        return 0                    # the parent turns the marker into the PREEMPTED status
    return rc


def report_failure(recipe, comm, exc: BaseException) -> int:
    """A worker's one-line failure: into failed.json (rank 0), for the launcher to print and exit with;
    without a launcher, printed here. Either way torchrun sees a clean exit and prints no traceback."""
    status = exit_status(exc)
    if comm.is_main:
        recipe.folder.write_marker(recipe.folder.failed, {"error": one_line(exc), "exit": status})
    if PARENT_ENV in os.environ:
        return 0
    if comm.is_main:
        print(f"qhm-launch: error: {one_line(exc)}", file=sys.stderr)
    return status


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
