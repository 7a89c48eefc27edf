"""Slurm: `qhm-launch submit` (one run) and `qhm-launch sweep` (a grid as one job array; the grid itself
is :mod:`launcher.cluster.sweep`).

Scripts come from ``launcher/cluster/templates/job.sbatch`` (package data, so an installed wheel has
it); every value a user typed goes through ``shlex.quote``. One node: one ``srun`` of the launcher, which
starts torchrun with G local processes. Several nodes: one task per node running torchrun with a c10d
rendezvous on the allocation's first node, a per-job rendezvous id and port. Preemption:
``--signal=B:<SIG>@<s>``, ``--requeue``, ``--open-mode=append``; the batch shell asks the launcher to save,
waits, and requeues on exit status 75 (array tasks as ARRAYJOB_TASK).
"""
from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from launcher import config as recipe_mod
from launcher import env
from launcher.cluster import sweep
from launcher.errors import UserError
from launcher.run.files import next_free
from launcher.run.folder import RunFolder

if TYPE_CHECKING:
    from launcher.config import Recipe

TEMPLATE = Path(__file__).resolve().parent / "templates" / "job.sbatch"
SIGNALS = ("USR1", "USR2", "TERM")
q = shlex.quote


def _check(args) -> None:
    parts = args.time.replace("-", ":").split(":")
    if not (2 <= len(parts) <= 4 and all(p.isdigit() for p in parts)):
        raise UserError(f"--time: {args.time!r} is not valid; allowed: HH:MM:SS or D-HH:MM:SS")


def single_line(text: str) -> str:
    """Text for a comment line of the script: anything that could end the line is escaped."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


CPUS_PER_GPU_RANK = 4      # a GPU rank's threads: the main one, autograd's device thread, NCCL's proxy, compile


def cpus_needed(recipe: Recipe, nproc: int) -> int:
    """What one node's task needs: each rank its cores (slurm.cpus_per_rank; by default 4 for a GPU rank,
    whose threads would share one core on a site that binds CPUs, and 1 on CPU) and each of its
    DataLoader workers (streamed data) one more."""
    from launcher import data
    per_rank = recipe.slurm.cpus_per_rank or (CPUS_PER_GPU_RANK if recipe.slurm.gpus_per_node else 1)
    return nproc * (per_rank + (recipe.data.workers if data.is_streamed(recipe.data) else 0))


def _sbatch_lines(args, cpus: int, array: str | None, nodes: int, gpus_per_node: int) -> list[str]:
    """#SBATCH lines: only numbers and fixed words. Options holding user text (job name, log path,
    partition, account, extra arguments) go on sbatch's command line as separate argv items, where no
    shell or directive parser can split or evaluate them."""
    lines = [f"--nodes={nodes}", "--ntasks-per-node=1", f"--time={args.time}",
             f"--signal=B:{args.signal}@{args.signal_seconds}", "--requeue", "--open-mode=append",
             f"--cpus-per-task={args.cpus_per_task or cpus}"]
    if gpus_per_node:
        lines.append(f"--gpus-per-node={gpus_per_node}")
    if args.min_nodes and nodes > 1:
        lines.append("--no-kill")              # a failed node does not end the allocation: the others go on
    if array:
        lines.append(f"--array={array}")
    return ["#SBATCH " + line for line in lines]


def sbatch_command(args, name: str, log: Path, script: Path, dependency: str | None = None) -> list[str]:
    safe_name = re.sub(r"[^A-Za-z0-9._-]", "_", name)[:64] or "qhm"
    cmd = ["sbatch", "--parsable", f"--job-name={safe_name}", f"--output={log}"]
    if dependency:
        cmd.append(f"--dependency={dependency}")
    if args.partition:
        cmd.append(f"--partition={args.partition}")
    if args.account:
        cmd.append(f"--account={args.account}")
    return cmd + list(args.sbatch_arg) + [str(script)]


# The c10d rendezvous port, chosen per job outside the kernel's ephemeral range (where an outgoing connection
# of the node may already hold it: 20000 + id % 20000 fell inside 32768-60999 for a third of the jobs): below
# its low end, or above its high end where the range starts low. QHM_PORT_RANGE: another file (tests).
RENDEZVOUS_PORT = """read -r PORTS_LOW PORTS_HIGH < "${QHM_PORT_RANGE:-/proc/sys/net/ipv4/ip_local_port_range}" 2>/dev/null \\
    || { PORTS_LOW=32768; PORTS_HIGH=60999; }
if [ "$PORTS_LOW" -gt 11024 ]; then RDZV_PORT=$(( 10000 + SLURM_JOB_ID % (PORTS_LOW - 10000) ))
elif [ "$PORTS_HIGH" -lt 64511 ]; then RDZV_PORT=$(( PORTS_HIGH + 1 + SLURM_JOB_ID % (65535 - PORTS_HIGH) ))
else RDZV_PORT=$(( 10000 + SLURM_JOB_ID % 1000 )); fi"""


# A lost node's task ends with a non-zero status (srun's too) while the nodes left finish the run: the job ends
# well when this job completed the run
LOST_NODE_ENDED_WELL = """if [ "$rc" != 0 ] && [ -f "${RUN_DIR}/${COMPLETE_FILE}" ] \\
        && [ "$(stat -c %Y "${RUN_DIR}/${COMPLETE_FILE}")" -ge "$STARTED" ]; then
    echo "[qhm-launch] the run completed on the nodes left (srun: exit $rc, a node's task ended early)"
    rc=0
fi"""


def _launch(args, nodes: int, until: str = "") -> tuple[str, str, str]:
    """One ``qhm-launch run`` per node: it starts torchrun there (c10d rendezvous on the first node, an id
    and port from the job) and forwards the job's signals to its workers. On one node it runs right in
    the batch step, without srun: srun turns a SIGTERM it receives into a SIGKILL of its tasks, so a
    SIGTERM to every process of the job (preemption, scancel --full) would leave nothing time to save.
    Returns the lines before the launch, the launch, and the lines after it (they may change ``rc``)."""
    py = q(args.python or sys.executable)
    if nodes == 1:
        return "", f'{py} -m launcher run "$RECIPE"{until}', ""
    prelude = 'HEAD_NODE=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)\n' + RENDEZVOUS_PORT
    if args.min_nodes:
        # torchrun's elastic membership: a node's task that ends (its node lost) must not end the others', whose
        # agents restart their workers on the nodes left, from the newest checkpoint
        kill, nnodes = "--no-kill --kill-on-bad-exit=0", f'--nnodes="{args.min_nodes}:$SLURM_JOB_NUM_NODES"'
        prelude += "\nSTARTED=$(date +%s)"
        after = LOST_NODE_ENDED_WELL
    else:
        kill, nnodes, after = "--kill-on-bad-exit=1", '--nnodes="$SLURM_JOB_NUM_NODES"', ""
    rdzv_conf = f" --rdzv-conf {q(args.rdzv_conf)}" if args.rdzv_conf else ""
    # --cpus-per-task again: since Slurm 22.05 srun does not inherit it from the job, and on a site that
    # binds CPUs the node's launcher, its ranks and their data workers would share one core
    launch = (f'srun --ntasks-per-node=1 --cpus-per-task="$SLURM_CPUS_PER_TASK" {kill} '
              f'{py} -m launcher run "$RECIPE" '
              f'{nnodes} --rdzv-endpoint="$HEAD_NODE:$RDZV_PORT" --rdzv-id="qhm-$JOB_ID"{rdzv_conf}{until}')
    return prelude, launch, after


def render(args, recipes: list[Path], run_dirs: list[Path], cpus: int, array: str | None,
           submit_cmd: list[str], nodes: int, gpus_per_node: int, until: str = "") -> str:
    """The job script; ``until``: where a segment of an elastic chain stops (" --until-epoch 3")."""
    prelude, launch, after = _launch(args, nodes, until)
    if array:
        select = (f"RECIPES=({' '.join(q(str(p)) for p in recipes)})\n"
                  f"RUN_DIRS=({' '.join(q(str(p)) for p in run_dirs)})\n"
                  'RECIPE="${RECIPES[$SLURM_ARRAY_TASK_ID]}"\nRUN_DIR="${RUN_DIRS[$SLURM_ARRAY_TASK_ID]}"')
    else:
        select = f"RECIPE={q(str(recipes[0]))}\nRUN_DIR={q(str(run_dirs[0]))}"
    text = TEMPLATE.read_text()
    workdir = q(str(Path.cwd()))
    exports = (f"export PYTHONUNBUFFERED=1 {env.BATCH_JOB}=1\n"
               f"export PYTHONPATH={workdir}${{PYTHONPATH:+:$PYTHONPATH}}   # the user's packages, on every node")
    setup = "\n".join(args.setup) if args.setup else "# (no setup lines: --setup 'module load ...' or slurm.setup)"
    names = RunFolder(Path("."))                 # the run folder's file names, relative to $RUN_DIR
    for key, value in {"{{request_file}}": q(names.preempt_request.name),
                       "{{preempted_file}}": q(names.preempted.name),
                       "{{complete_file}}": q(names.complete.name),
                       "{{sbatch_lines}}": "\n".join(_sbatch_lines(args, cpus, array, nodes, gpus_per_node)),
                       "{{submit}}": single_line(shlex.join(submit_cmd)), "{{setup}}": setup,
                       "{{workdir}}": workdir, "{{exports}}": exports,
                       "{{prelude}}": select + ("\n" + prelude if prelude else ""), "{{launch}}": launch,
                       "{{after_launch}}": after,
                       "{{signal}}": args.signal, "{{signal_seconds}}": str(args.signal_seconds)}.items():
        text = text.replace(key, value)
    return text


def _prepare(recipe: Recipe, args, warnings: list | None = None):
    """The recipe as the job will run it: its shape (``slurm.nodes``/``gpus_per_node``, where --nodes and
    --gpus-per-node win), absolute output, processes from the GPUs per node; its setup lines unless
    --setup gave some. What the job should be warned of is added to ``warnings``."""
    from launcher.train import planning, preflight
    if args.nodes is not None:
        recipe.slurm.nodes = args.nodes
    if args.gpus_per_node is not None:
        recipe.slurm.gpus_per_node = args.gpus_per_node
    if recipe.slurm.gpus_per_node:
        recipe.distributed.nproc_per_node = recipe.slurm.gpus_per_node
    preflight.resolve_nproc(recipe, 0, log=lambda line: None)   # auto without --gpus-per-node: a CPU job
    recipe.output = str(Path(recipe.output).resolve())
    if args.setup is None:
        args.setup = list(recipe.slurm.setup)
    nproc = recipe.distributed.nproc_per_node
    nodes = recipe.slurm.nodes
    if args.min_nodes is not None:
        if args.elastic:
            raise UserError(f"--min-nodes: {args.min_nodes} keeps one job going on the nodes left, and --elastic chains "
                            "jobs on more nodes as the batch grows; allowed: one of the two")
        if not args.min_nodes < nodes:
            allowed = f"1 to {nodes - 1}" if nodes > 1 else "--min-nodes with --nodes 2 or more"
            raise UserError(f"--min-nodes: {args.min_nodes} is not fewer than the job's {nodes} node(s) (--nodes or "
                            f"slurm.nodes); allowed: {allowed}")
    membership = (args.min_nodes or nodes, nodes)
    epochs = preflight.check_membership(recipe, nproc, membership, f"--min-nodes: {args.min_nodes} (of {nodes} nodes)",
                                        check_data=not args.dry_run)
    if warnings is not None and not args.elastic:        # an elastic chain gives each stage its own nodes
        warnings += [line.replace("warning: ", "qhm-launch: WARNING: ")
                     for line in planning.idle_warnings(epochs, recipe.schedule.unit)]
    if warnings is not None and epochs:
        warnings += stop_latency_warning(recipe, epochs[0].batch, args.signal_seconds)
    if args.elastic:
        from launcher import engines
        why = engines.move_refusal(recipe.to_dict())
        if why:
            raise UserError(f"--elastic: not valid here: {why}; allowed: ddp or fsdp, ZeRO 0, or optimizer.name adamw")
    return recipe, nproc


def stop_latency_warning(recipe: Recipe, batch: int, signal_seconds: int) -> list[str]:
    """A preemption is acted on within :func:`launcher.train.signals.stop_latency`, plus the checkpoint.
    Warned of when that could pass a quarter of the
    warning time Slurm gives; the step time is this run folder's own, measured at the first stage's batch
    in an earlier segment (none measured: only the checks' floor is known)."""
    from launcher.train.signals import stop_latency
    rates = [r["samples_per_s"] for r in recipe.folder.metric_rows()
             if r.get("batch") == batch and r.get("samples_per_s")]
    step_s = batch / min(rates) if rates else 0.0
    latency = stop_latency(step_s)
    if latency <= signal_seconds / 4:
        return []
    measured = f"steps of {step_s:.3g} s at batch {batch} measured in {recipe.folder.path}" if rates else "the checks"
    return [f"qhm-launch: WARNING: a preemption may take {latency:.3g} s before its checkpoint starts ({measured}), "
            f"more than a quarter of --signal-seconds {signal_seconds}; give --signal-seconds {int(4 * latency) + 1} "
            "or more (or a larger first batch)"]


def _warn(warnings: list[str]) -> None:
    for line in dict.fromkeys(warnings):          # once each, in order (a sweep's points repeat them)
        print(line, file=sys.stderr)


def max_array_size() -> int | None:
    """Slurm's MaxArraySize (array indices must be below it), or None when scontrol cannot say."""
    try:
        out = subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    found = re.search(r"^MaxArraySize\s*=\s*(\d+)", out.stdout, re.MULTILINE)
    return int(found.group(1)) if found else None


def _cpus(args, needed: list[int]) -> int:
    """CPUs per node's task: what the ranks and their data workers need, or --cpus-per-task (with a
    warning when that is fewer)."""
    need = max(needed)
    if args.cpus_per_task and args.cpus_per_task < need:
        print(f"qhm-launch: WARNING: --cpus-per-task {args.cpus_per_task} is fewer than the {need} a node's ranks "
              "and their data workers need (processes x (data.workers + 1)): they will share cores", file=sys.stderr)
    return need


def _sbatch(cmd: list[str]) -> str:
    if shutil.which("sbatch") is None:
        raise UserError("sbatch: not found on PATH; allowed: a machine with the Slurm client (or --dry-run)")
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        lines = out.stderr.strip().splitlines()
        raise UserError(f"sbatch: {lines[-1] if lines else f'exit {out.returncode}'}")
    return out.stdout.strip().split(";")[0]


def _segments(recipe: Recipe, nproc: int, args) -> list:
    """The jobs to submit: one on the recipe's nodes, or (--elastic) one per segment of stages, on up to
    that many."""
    from launcher import data
    from launcher.train import planning
    if not args.elastic:
        return [planning.Segment(0, 0, recipe.slurm.nodes)]          # one job: it runs to the end
    return planning.elastic_segments(recipe, data.sizes(recipe.data)[0], nproc, recipe.slurm.nodes)


def _chain(args, stem: Path, name: str, log: Path, segments: list, dependency: str, recipes: list[Path],
           run_dirs: list[Path], cpus: int, array: str | None, gpus_per_node: int) -> list[tuple]:
    """(script, sbatch command, script text) per segment: ``stem.sbatch``, then ``stem-2.sbatch``, ...,
    each after the one before (``dependency``: afterok for a run, aftercorr for an array's tasks) and
    stopping at its segment's last epoch (``--until-epoch``) or global step (``--until-step``); the last
    runs to the end."""
    jobs = []
    for k, seg in enumerate(segments):
        script = stem.with_name(f"{stem.name}.sbatch" if k == 0 else f"{stem.name}-{k + 1}.sbatch")
        cmd = sbatch_command(args, name, log, script, f"{dependency}:{{previous}}" if k else None)
        until = "" if k == len(segments) - 1 else f" --until-{seg.by} {seg.last + 1}"
        jobs.append((script, cmd, render(args, recipes, run_dirs, cpus, array, cmd, seg.nodes, gpus_per_node, until)))
    return jobs


def cmd_submit(args) -> int:
    _check(args)
    warnings: list[str] = []
    recipe, nproc = _prepare(recipe_mod.load(args.recipe, args.set), args, warnings)
    _warn(warnings)
    folder = recipe.folder
    segments = _segments(recipe, nproc, args)
    first = next_free(folder.slurm, "submit", ".sbatch")
    scripts = _chain(args, first.with_suffix(""), recipe.name, folder.slurm / "slurm-%j.out", segments, "afterok",
                     [folder.recipe], [folder.path], _cpus(args, [cpus_needed(recipe, nproc)]), None,
                     recipe.slurm.gpus_per_node)
    if args.dry_run:
        print("\n\n".join(text for _, _, text in scripts))
        return 0
    recipe.folder.write_recipe(recipe_mod.dump(recipe))
    folder.slurm.mkdir(exist_ok=True)
    previous = None
    for (script, cmd, text), seg in zip(scripts, segments):
        script.write_text(text)
        previous = _sbatch([c.replace("{previous}", previous or "") for c in cmd])
        what = f" ({seg.by}s {seg.first}-{seg.last} on {seg.nodes} node(s))" if args.elastic else ""
        print(f"qhm-launch: submitted job {previous}{what}: {script}\n  log: {folder.slurm / f'slurm-{previous}.out'}")
    return 0


# ------------------------------------------------------------------------------------------------
# Sweeps as job arrays

def shape_words(nodes: int, gpus_per_node: int) -> str:
    return f"{nodes} node(s)" + (f" x {gpus_per_node} GPU(s)" if gpus_per_node else "")


def cmd_sweep(args, run_point=None) -> int:
    """One job array per resource shape (slurm.nodes x slurm.gpus_per_node) among the points, each with its
    own --nodes; the chained arrays of --elastic per shape."""
    _check(args)
    spec = sweep.load_spec(Path(args.sweep))
    points = sweep.grid_points(spec, args.set)
    warnings: list[str] = []
    recipes = [_prepare(recipe_mod.load(spec["recipe"], p["overrides"]), args, warnings) for p in points]
    _warn(warnings)
    names = [r.name for r, _ in recipes]
    if len(set(names)) != len(names):
        raise UserError(f"sweep.grid: two points get the same run name ({sorted(n for n in names if names.count(n) > 1)[0]}); "
                        "allowed: grid values that differ once made filesystem-safe")
    folder = RunFolder(Path(recipes[0][0].output) / spec["name"])
    return submit_points(args, spec["name"], folder, points, recipes, run_point)


def submit_points(args, name: str, folder: RunFolder, points: list[dict], recipes: list[tuple], run_point=None) -> int:
    """Run or submit prepared points (a sweep's, a branch study's): ``recipes`` [(recipe, processes)], one
    job array per resource shape (--elastic: chained arrays), or one after another here (--local)."""
    shapes: dict[tuple, list[int]] = {}           # (nodes, gpus per node) -> the points' indices, in order
    for i, (r, _) in enumerate(recipes):
        shapes.setdefault((r.slurm.nodes, r.slurm.gpus_per_node), []).append(i)
    if args.local and any(nodes > 1 for nodes, _ in shapes):
        raise UserError(f"--local: points ask for {max(n for n, _ in shapes)} nodes; allowed: slurm.nodes 1 here "
                        "(submit without --local to run them on the cluster)")
    first = next_free(folder.slurm, "sweep", ".sbatch")
    arrays = []              # (shape, indices, array spec, [(script, sbatch command, text) per chained job])
    for (nodes, gpus), members in shapes.items():
        group = [recipes[i] for i in members]
        segments = {tuple(_segments(r, nproc, args)) for r, nproc in group}
        if len(segments) > 1:
            raise UserError("--elastic: the sweep's points cut into different segments (their batch schedules differ); "
                            "allowed: points with one batch schedule, or submit them without --elastic")
        stem = first.stem if len(shapes) == 1 else f"{first.stem}_{nodes}n" + (f"{gpus}g" if gpus else "")
        array = f"0-{len(members) - 1}%{args.max_parallel}"
        # task i of each chained array runs after task i of the previous one (aftercorr)
        jobs = _chain(args, folder.slurm / stem, name, folder.slurm / "slurm-%A_%a.out", list(segments.pop()),
                      "aftercorr", [r.folder.recipe for r, _ in group], [r.run_dir for r, _ in group],
                      _cpus(args, [cpus_needed(r, nproc) for r, nproc in group]), array, gpus)
        arrays.append(((nodes, gpus), members, array, jobs))
    if not args.local:
        limit, largest = max_array_size(), max(len(members) for _, members, _, _ in arrays)
        if limit is not None and largest > limit:
            raise UserError(f"sweep: {largest} points on one resource shape make an array --array=0-{largest - 1}, and this "
                            f"cluster's MaxArraySize is {limit} (indices below it); allowed: at most {limit} points per "
                            "shape (split the grid into several sweeps)")
    if args.dry_run:
        for p, (r, _) in zip(points, recipes):
            seed = "" if p["seed"] is None else f"  seed={p['seed']}"
            print(f"{p['index']:>3}  {r.run_dir}  {p['label']}{seed}  [{shape_words(r.slurm.nodes, r.slurm.gpus_per_node)}]")
        for shape, members, array, jobs in arrays:
            print(f"{len(members)} run(s) as one job array --array={array} on {shape_words(*shape)}" +
                  (f", in {len(jobs)} chained arrays (--elastic)" if len(jobs) > 1 else ""))
        print("\n" + "\n\n".join(text for *_, jobs in arrays for _, _, text in jobs))
        return 0
    if args.local:
        return sweep.run_locally(points, [r for r, _ in recipes], run_point)
    busy = [str(r.folder.path) for r, _ in recipes if r.folder.in_use()]
    if busy:                                    # nothing is written into a folder another run holds
        raise UserError(f"sweep: {len(busy)} point(s) are in use by a run ({', '.join(busy[:3])}"
                        f"{', ...' if len(busy) > 3 else ''}); allowed: submit when they have finished (nothing "
                        "was written or submitted)")
    folder.slurm.mkdir(parents=True, exist_ok=True)
    for r, _ in recipes:
        r.folder.write_recipe(recipe_mod.dump(r))
    (folder.path / "points.json").write_text(json.dumps(
        [{**p, "run_dir": str(r.run_dir), "nodes": r.slurm.nodes, "gpus_per_node": r.slurm.gpus_per_node}
         for p, (r, _) in zip(points, recipes)], indent=1))
    for shape, members, _, jobs in arrays:
        previous = None
        for script, cmd, text in jobs:
            script.write_text(text)
            previous = _sbatch([c.replace("{previous}", previous or "") for c in cmd])
            print(f"qhm-launch: submitted array job {previous} ({len(members)} runs on {shape_words(*shape)}): "
                  f"{script}\n  logs: {folder.slurm}")
    return 0
