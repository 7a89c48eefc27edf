"""Slurm: `qhm-launch submit` (one run) and `qhm-launch sweep` (a grid as one job array).

Scripts come from ``launcher/templates/job.sbatch`` (package data, so an installed wheel has it); every value a user typed goes through ``shlex.quote``. One node:
one ``srun`` of the launcher, which starts torchrun with G local processes. Several nodes: one task
per node running torchrun with a c10d rendezvous on the allocation's first node, a per-job rendezvous id
and port. Preemption: ``--signal=B:<SIG>@<s>``, ``--requeue``, ``--open-mode=append``; the batch shell
asks the launcher to save, waits, and requeues on exit status 75 (array tasks as ARRAYJOB_TASK).
"""
from __future__ import annotations

import hashlib
import itertools
import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path


from launcher.config import recipe as recipe_mod
from launcher.config import yamlfile
from launcher.cli.args import nonnegative_int, positive_int, text
from launcher.errors import UserError
from launcher.run.files import next_free
from launcher.run.folder import RunFolder

TEMPLATE = Path(__file__).resolve().parent / "templates" / "job.sbatch"
SIGNALS = ("USR1", "USR2", "TERM")
q = shlex.quote


def add_arguments(command) -> None:
    """The ``submit`` and ``sweep`` subcommands (``command(name, help)`` makes a subparser)."""
    def slurm_args(sp):
        sp.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a recipe key, e.g. schedule.lr.max=0.05 (repeatable)")
        sp.add_argument("--nodes", type=positive_int, default=1, help="nodes per job (default 1)")
        sp.add_argument("--gpus-per-node", type=nonnegative_int, default=0,
                        help="GPUs (= processes) per node; 0: CPU, processes from distributed.nproc_per_node")
        sp.add_argument("--time", type=text, default="01:00:00", help="time limit, HH:MM:SS or D-HH:MM:SS")
        sp.add_argument("--partition", type=text, help="Slurm partition")
        sp.add_argument("--account", type=text, help="Slurm account")
        sp.add_argument("--cpus-per-task", type=positive_int, help="CPUs per node's task (default: processes)")
        sp.add_argument("--signal", default="USR2", choices=SIGNALS,
                        help="preemption warning signal (default USR2: NCCL does not use it)")
        sp.add_argument("--signal-seconds", type=positive_int, default=120,
                        help="how long before the time limit the warning comes (default 120)")
        sp.add_argument("--sbatch-arg", type=text, action="append", default=[], metavar="ARG",
                        help="extra sbatch option, e.g. --sbatch-arg=--qos=high (repeatable)")
        sp.add_argument("--setup", type=text, action="append", default=None, metavar="LINE",
                        help="a line the job runs before training, e.g. --setup 'module load cuda/12.4' "
                             "(repeatable; default: the recipe's slurm.setup)")
        sp.add_argument("--python", type=text, help="the Python the job runs (default: this one, "
                                                    f"{sys.executable})")
        sp.add_argument("--elastic", action="store_true",
                        help="grow the allocation with the batch: one job per segment of stages, each on the "
                             "nodes its batch can use (distributed.min_rank_batch per rank), chained afterok")
        sp.add_argument("--dry-run", action="store_true", help="print the script, submit nothing")

    s = command("submit", "write an sbatch script into the run folder and submit it")
    s.add_argument("recipe", help="YAML recipe")
    slurm_args(s)
    w = command("sweep", "expand a grid into one recipe per point and one Slurm job array")
    w.add_argument("sweep", help="YAML sweep: recipe, name, grid, seeds, set")
    w.add_argument("--max-parallel", type=positive_int, default=4, help="P in --array=0-N%%P (default 4)")
    w.add_argument("--local", action="store_true", help="run the points one after another here, no Slurm")
    slurm_args(w)


def _check(args) -> None:
    if args.nodes < 1 or args.gpus_per_node < 0:
        raise UserError(f"--nodes/--gpus-per-node: {args.nodes}/{args.gpus_per_node} is not valid; "
                          "allowed: nodes >= 1, gpus-per-node >= 0")
    parts = args.time.replace("-", ":").split(":")
    if not (2 <= len(parts) <= 4 and all(p.isdigit() for p in parts)):
        raise UserError(f"--time: {args.time!r} is not valid; allowed: HH:MM:SS or D-HH:MM:SS")


def single_line(text: str) -> str:
    """Text for a comment line of the script: anything that could end the line is escaped."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _sbatch_lines(args, nproc: int, array: str | None, nodes: int) -> list[str]:
    """#SBATCH lines: only numbers and fixed words. Options holding user text (job name, log path,
    partition, account, extra arguments) go on sbatch's command line as separate argv items, where no
    shell or directive parser can split or evaluate them."""
    lines = [f"--nodes={nodes}", "--ntasks-per-node=1", f"--time={args.time}",
             f"--signal=B:{args.signal}@{args.signal_seconds}", "--requeue", "--open-mode=append",
             f"--cpus-per-task={args.cpus_per_task or max(1, nproc)}"]
    if args.gpus_per_node:
        lines.append(f"--gpus-per-node={args.gpus_per_node}")
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


def _launch(args, nodes: int, until_epoch: int | None) -> tuple[str, str]:
    """One ``qhm-launch run`` per node: it starts torchrun there (c10d rendezvous on the first node, an id
    and port from the job) and forwards the job's signals to its workers. On one node it runs right in
    the batch step, without srun: srun turns a SIGTERM it receives into a SIGKILL of its tasks, so a
    SIGTERM to every process of the job (preemption, scancel --full) would leave nothing time to save."""
    py = q(args.python or sys.executable)
    until = f" --until-epoch {until_epoch}" if until_epoch else ""
    if nodes == 1:
        return "", f'{py} -m launcher run "$RECIPE"{until}'
    prelude = ('HEAD_NODE=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)\n'
               'RDZV_PORT=$(( 20000 + SLURM_JOB_ID % 20000 ))')
    launch = (f'srun --ntasks-per-node=1 --kill-on-bad-exit=1 {py} -m launcher run "$RECIPE" '
              f'--nnodes="$SLURM_JOB_NUM_NODES" --rdzv-endpoint="$HEAD_NODE:$RDZV_PORT" --rdzv-id="qhm-$JOB_ID"{until}')
    return prelude, launch


def render(args, recipes: list[Path], run_dirs: list[Path], nproc: int, array: str | None,
           submit_cmd: list[str], nodes: int | None = None, until_epoch: int | None = None) -> str:
    nodes = nodes or args.nodes
    prelude, launch = _launch(args, nodes, until_epoch)
    if array:
        select = (f"RECIPES=({' '.join(q(str(p)) for p in recipes)})\n"
                  f"RUN_DIRS=({' '.join(q(str(p)) for p in run_dirs)})\n"
                  'RECIPE="${RECIPES[$SLURM_ARRAY_TASK_ID]}"\nRUN_DIR="${RUN_DIRS[$SLURM_ARRAY_TASK_ID]}"')
    else:
        select = f"RECIPE={q(str(recipes[0]))}\nRUN_DIR={q(str(run_dirs[0]))}"
    text = TEMPLATE.read_text()
    workdir = q(str(Path.cwd()))
    exports = (f"export PYTHONUNBUFFERED=1 QHM_BATCH_JOB=1\n"
               f"export PYTHONPATH={workdir}${{PYTHONPATH:+:$PYTHONPATH}}   # the user's packages, on every node")
    setup = "\n".join(args.setup) if args.setup else "# (no setup lines: --setup 'module load ...' or slurm.setup)"
    names = RunFolder(Path("."))                 # the run folder's file names, relative to $RUN_DIR
    for key, value in {"{{request_file}}": q(names.preempt_request.name),
                       "{{preempted_file}}": q(names.preempted.name),
                       "{{complete_file}}": q(names.complete.name),
                       "{{sbatch_lines}}": "\n".join(_sbatch_lines(args, nproc, array, nodes)),
                       "{{submit}}": single_line(shlex.join(submit_cmd)), "{{setup}}": setup,
                       "{{workdir}}": workdir, "{{exports}}": exports,
                       "{{prelude}}": select + ("\n" + prelude if prelude else ""), "{{launch}}": launch,
                       "{{signal}}": args.signal, "{{signal_seconds}}": str(args.signal_seconds)}.items():
        text = text.replace(key, value)
    return text


def _prepare(recipe, args):
    """The recipe as the job will run it: absolute output, processes from --gpus-per-node; its setup
    lines unless --setup gave some."""
    from launcher.train import splits as planning
    if args.gpus_per_node:
        recipe.distributed.nproc_per_node = args.gpus_per_node
    recipe.output = str(Path(recipe.output).resolve())
    if args.setup is None:
        args.setup = list(recipe.slurm.setup)
    nproc = recipe.distributed.nproc_per_node
    planning.preflight(recipe, nproc * args.nodes, check_data=not args.dry_run)
    if args.elastic and recipe.distributed.engine == "deepspeed" and recipe.distributed.zero_stage > 0:
        raise UserError(f"--elastic: not valid with DeepSpeed ZeRO stage {recipe.distributed.zero_stage} (its optimizer "
                        "state cannot move to another world size here); allowed: ddp, or ZeRO 0")
    return recipe, nproc


def _sbatch(cmd: list[str]) -> str:
    if shutil.which("sbatch") is None:
        raise UserError("sbatch: not found on PATH; allowed: a machine with the Slurm client (or --dry-run)")
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        lines = out.stderr.strip().splitlines()
        raise UserError(f"sbatch: {lines[-1] if lines else f'exit {out.returncode}'}")
    return out.stdout.strip().split(";")[0]


def _segments(recipe, nproc: int, args) -> list:
    """The jobs to submit: one on --nodes, or (--elastic) one per segment of stages."""
    from launcher import data
    from launcher.train import splits as planning
    if not args.elastic:
        return [planning.Segment(0, recipe.epochs - 1, args.nodes)]
    return planning.elastic_segments(recipe, data.sizes(recipe.data)[0], nproc, args.nodes)


def cmd_submit(args) -> int:
    _check(args)
    recipe, nproc = _prepare(recipe_mod.load(args.recipe, args.set), args)
    folder = recipe.folder
    segments, scripts, after = _segments(recipe, nproc, args), [], None
    for k, seg in enumerate(segments):
        script = next_free(folder.slurm, "submit", ".sbatch") if not scripts else \
            folder.slurm / f"{scripts[-1][0].stem}-{k + 1}.sbatch"
        cmd = sbatch_command(args, recipe.name, folder.slurm / "slurm-%j.out", script, after)
        until = seg.last + 1 if seg.last + 1 < recipe.epochs else None
        scripts.append((script, cmd, render(args, [folder.recipe], [folder.path], nproc, None, cmd, seg.nodes, until)))
        after = "afterok:{previous}"
    if args.dry_run:
        print("\n\n".join(text for _, _, text in scripts))
        return 0
    recipe_mod.write_resolved(recipe)
    folder.slurm.mkdir(exist_ok=True)
    previous = None
    for (script, cmd, text), seg in zip(scripts, segments):
        script.write_text(text)
        previous = _sbatch([c.replace("{previous}", previous or "") for c in cmd])
        what = f" (epochs {seg.first}-{seg.last} on {seg.nodes} node(s))" if args.elastic else ""
        print(f"qhm-launch: submitted job {previous}{what}: {script}\n  log: {folder.slurm / f'slurm-{previous}.out'}")
    return 0


# ------------------------------------------------------------------------------------------------
# Sweeps

def load_sweep(path: Path) -> dict:
    spec = yamlfile.load(path, "sweep")
    if not isinstance(spec, dict):
        raise UserError(f"sweep: {str(path)!r} must be a mapping with recipe, name, grid, seeds")
    allowed = {"recipe", "name", "grid", "seeds", "set"}
    for key in spec:
        if key not in allowed:
            raise UserError(f"sweep.{key}: unknown key; allowed keys here: {', '.join(sorted(allowed))}")
    for key in ("recipe", "name"):
        value = spec.get(key)
        if not isinstance(value, str) or not value or not value.isprintable() or (key == "name" and "/" in value):
            raise UserError(f"sweep.{key}: {value!r} is not valid; allowed: "
                            + ("a file path" if key == "recipe" else "a folder name without '/' or control characters"))
    grid = spec.get("grid") or {}
    if not isinstance(grid, dict) or not all(isinstance(v, list) and v for v in grid.values()):
        raise UserError(f"sweep.grid: {grid!r} is not valid; allowed: a mapping of KEY.PATH to non-empty lists")
    seeds = spec.get("seeds", [None])
    if not isinstance(seeds, list) or not seeds:
        raise UserError(f"sweep.seeds: {seeds!r} is not valid; allowed: a non-empty list of integers")
    spec["seeds"] = seeds
    spec["recipe"] = str((Path(path).parent / spec["recipe"]).resolve())
    return spec


def point_name(sweep: str, keys: list[str], values: tuple) -> str:
    """A grid point's run name: the sweep's name and every grid key's value, short and filesystem-safe,
    e.g. ``qhm-grid_lr.max=0.05_beta.max=0.3``. It depends on the point's values alone, so adding values
    or keys to the grid never renames a point that was already there (a key's name stays in the name
    even while it has one value). Too long a name is cut and completed by a hash of the whole."""
    def short(key):
        return ".".join(key.split(".")[-2:])

    def fmt(value):
        if isinstance(value, dict):            # canonical whatever the file's key order: kind first
            rest = [f"{k}{fmt(v)}" for k, v in sorted(value.items()) if k != "kind"]
            return "-".join(([fmt(value["kind"])] if "kind" in value else []) + rest)
        if isinstance(value, list):
            return "-".join(fmt(v) for v in value)
        return str(value)
    label = "_".join(f"{short(k)}={fmt(v)}" for k, v in zip(keys, values))
    name = re.sub(r"[^A-Za-z0-9.=+_-]", "-", f"{sweep}_{label}" if label else sweep)
    if len(name) > 100:
        digest = hashlib.sha256(name.encode()).hexdigest()[:8]
        name = f"{name[:91]}~{digest}"
    return name


def expand(spec: dict, extra: list[str] = ()) -> list[dict]:
    """One entry per grid point and seed: its overrides (the sweep's ``set``, then ``extra``, e.g. from
    --set), its run name and its W&B group (the point's name: its seeds share it)."""
    keys = list(spec["grid"])
    points = []
    for i, values in enumerate(itertools.product(*(spec["grid"][k] for k in keys))):
        label = ",".join(f"{k}={v}" for k, v in zip(keys, values))
        group = point_name(spec["name"], keys, values)
        for seed in spec["seeds"]:
            overrides = [f"{k}={json.dumps(v)}" for k, v in zip(keys, values)]
            overrides += [f"{k}={json.dumps(v)}" for k, v in (spec.get("set") or {}).items()]
            overrides += list(extra)
            name = group
            if seed is not None:
                overrides.append(f"seed={seed}")
                name += f"_s{seed}"
            overrides += [f"name={name}", f"tracking.wandb.group={group}"]
            points.append({"index": len(points), "point": i, "seed": seed, "label": label, "name": name,
                           "overrides": overrides})
    return points


def cmd_sweep(args) -> int:
    _check(args)
    spec = load_sweep(Path(args.sweep))
    points = expand(spec, args.set)
    recipes = [_prepare(recipe_mod.load(spec["recipe"], p["overrides"]), args) for p in points]
    names = [r.name for r, _ in recipes]
    if len(set(names)) != len(names):
        raise UserError(f"sweep.grid: two points get the same run name ({sorted(n for n in names if names.count(n) > 1)[0]}); "
                        "allowed: grid values that differ once made filesystem-safe")
    sweep = RunFolder(Path(recipes[0][0].output) / spec["name"])
    array = f"0-{len(points) - 1}%{args.max_parallel}"
    segments = {tuple(_segments(r, nproc, args)) for r, nproc in recipes}
    if len(segments) > 1:
        raise UserError("--elastic: the sweep's points cut into different segments (their batch schedules differ); "
                        "allowed: points with one batch schedule, or submit them without --elastic")
    segments, jobs, after = list(segments.pop()), [], None
    for k, seg in enumerate(segments):
        script = next_free(sweep.slurm, "sweep", ".sbatch") if not jobs else \
            sweep.slurm / f"{jobs[-1][0].stem}-{k + 1}.sbatch"
        cmd = sbatch_command(args, spec["name"], sweep.slurm / "slurm-%A_%a.out", script, after)
        until = seg.last + 1 if seg.last + 1 < recipes[0][0].epochs else None
        jobs.append((script, cmd, render(args, [r.folder.recipe for r, _ in recipes], [r.run_dir for r, _ in recipes],
                                         recipes[0][1], array, cmd, seg.nodes, until)))
        after = "aftercorr:{previous}"               # task i of this array after task i of the previous one
    if args.dry_run:
        for p, (r, _) in zip(points, recipes):
            seed = "" if p["seed"] is None else f"  seed={p['seed']}"
            print(f"{p['index']:>3}  {r.run_dir}  {p['label']}{seed}")
        print(f"{len(points)} runs as one job array --array={array}" +
              (f", in {len(jobs)} chained arrays (--elastic)" if len(jobs) > 1 else "") + "\n")
        print("\n\n".join(text for _, _, text in jobs))
        return 0
    if args.local:
        return _run_locally(points, recipes)
    sweep.slurm.mkdir(parents=True, exist_ok=True)
    for r, _ in recipes:
        recipe_mod.write_resolved(r)
    (sweep.path / "points.json").write_text(json.dumps(
        [{**p, "run_dir": str(r.run_dir)} for p, (r, _) in zip(points, recipes)], indent=1))
    previous = None
    for script, cmd, text in jobs:
        script.write_text(text)
        previous = _sbatch([c.replace("{previous}", previous or "") for c in cmd])
        print(f"qhm-launch: submitted array job {previous} ({len(points)} runs): {script}\n  logs: {sweep.slurm}")
    return 0


def _run_locally(points, recipes) -> int:
    """Each point through `qhm-launch run` (which resumes or skips completed runs), in order."""
    failed = []
    for p, (r, _) in zip(points, recipes):
        print(f"[qhm-launch] sweep point {p['index'] + 1}/{len(points)}: {r.name} ({p['label']})", flush=True)
        rc = subprocess.call([sys.executable, "-m", "launcher", "run", str(recipe_mod.write_resolved(r))])
        if rc != 0:
            failed.append(f"{r.name} (exit {rc})")
    if failed:
        print(f"qhm-launch: {len(failed)} of {len(points)} runs failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    print(f"qhm-launch: {len(points)} runs done")
    return 0
