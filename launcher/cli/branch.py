"""``qhm-launch branch RUN --at POSITIONS --batch FACTORS --for LENGTH``: the critical batch size measured
directly (Merrill et al. 2025): short runs branched from the parent's exact checkpoints at larger batches.

For each position, the parent's newest valid checkpoint at or before it (or within one step after it,
where a cadence of N units saved it: at the first step that reached N) is where the branches start
(position 0: the parent's initial weights, no checkpoint). Each factor f (1 always, the control) is a
branch: the parent's recipe with ``branch: {parent, at_step, factor, lr_rule, length}`` (see
:class:`launcher.config.schema.Branch`): from the checkpoint's step on, f times the parent's batch
(the keyed order continues from the samples the parent consumed: the branch's first batch is the
parent's next f batches), the LR times f^p of the rule, for LENGTH units, every other schedule the
parent's over the parent's length. So factor 1 with rule none continues the parent bit for bit.

Branches are ordinary run folders, ``<output>/<parent>.branches/<parent>-at<pos><unit>-x<f>/`` (outside the
parent's folder, which is never written: the checkpoint is linked, not moved), each with its
``branch.json`` (parent, step, position, factor), its own W&B run in a group named after the parent. They
run here one after another (``--local``) or as one Slurm job array; the same command again runs what
is missing (a complete branch is skipped, an interrupted one resumes its own checkpoints).
"""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from launcher import config as recipe_mod
from launcher import data as data_mod
from launcher.config import units
from launcher.config.validate import MAX_LENGTH
from launcher.errors import UserError
from launcher.run import branches
from launcher.run.checkpoint import CheckpointManager, check_manifest, step_name
from launcher.run.folder import RunFolder
from launcher.train import planning

if TYPE_CHECKING:
    from launcher.config import Recipe

UNIT_WORDS = {"steps": "step", "samples": "sample", "tokens": "token", "step": "step", "sample": "sample",
              "token": "token"}
SHORT = {"step": "s", "sample": "n", "token": "t"}


def parent_of(run: str) -> tuple[RunFolder, dict]:
    folder = RunFolder(Path(run))
    if not folder.recipe.is_file():
        raise UserError(f"branch: {run!r} is not a run folder (no recipe.yaml); allowed: the parent run's folder")
    data = yaml.safe_load(folder.recipe.read_text())
    recipe = recipe_mod.from_dict(data)
    if recipe.branch.parent is not None:
        raise UserError(f"branch: {run!r} is itself a branch; allowed: the run it branched from ({recipe.branch.parent})")
    return folder, data


def checkpoints(folder: RunFolder) -> list[dict]:
    """The parent's valid checkpoints' manifests, oldest first (a checkpoint whose manifest does not check
    out is left out; its files are checked when a branch loads it)."""
    manager = CheckpointManager(folder, log=lambda *a: None)
    found = []
    for path in reversed(manager.candidates()):
        try:
            found.append(check_manifest(json.loads((path / "manifest.json").read_text())) | {"path": str(path)})
        except (OSError, ValueError, Exception):  # noqa: BLE001 - not a valid checkpoint: not a branch point
            continue
    return found


def position(manifest: dict, unit: str) -> int:
    state = manifest["position"]
    return {"step": state["global_step"], "sample": state["samples"], "token": state.get("tokens", 0)}[unit]


def choose(found: list[dict], at: int, unit: str, tokens: bool, slack: int = 0) -> dict | None:
    """The newest checkpoint at or before position ``at``, or within ``slack`` after it (one step of the
    parent: a cadence of N units saves at the first step that reaches N); None for 0: the start."""
    if unit == "token" and not tokens:
        raise UserError("--unit: 'tokens' is not valid for this parent: it counts no tokens; allowed: steps or samples "
                        "(or a parent with data.tokens_per_sample, or token data)")
    if at == 0:
        return None
    before = [m for m in found if position(m, unit) <= at + slack]
    if not before:
        have = ", ".join(str(position(m, unit)) for m in found) or "none"
        raise UserError(f"--at: {at:,} {unit}s is before the parent's first checkpoint; allowed: 0, or a position at "
                        f"or after one of its checkpoints ({unit}s: {have}; checkpoint.every places them)")
    return before[-1]


# The LR rule when --lr-rule is not given, per optimizer family: the square-root rule for the Adam family
# (what Merrill et al. 2025 use for their AdamW branches, as OLMo-core's batch-size scheduler does: Malladi et
# al. 2022's SDE argument for adaptive methods), the linear rule for SGD-like updates (QHM, SGD, NSHB: Goyal
# et al. 2017; for QHM the step is alpha times a convex mix of g and d, an SGD-momentum step).
DEFAULT_LR_RULE = {"adam": "sqrt", "sgd": "linear"}


def lr_rule_for(recipe: Recipe) -> str:
    """The default LR rule of the recipe's optimizer family (see DEFAULT_LR_RULE)."""
    from launcher.config.schema import ADAM_FAMILY
    return DEFAULT_LR_RULE["adam" if recipe.optimizer.name in ADAM_FAMILY else "sgd"]


def plan_branches(args) -> tuple[list[dict], list]:
    """The branch points and their recipes (resolved), writing nothing."""
    parent, data = parent_of(args.run)
    recipe = recipe_mod.from_dict(data)
    rule = args.lr_rule or lr_rule_for(recipe)
    seeds = getattr(args, "seeds", 1)
    unit = UNIT_WORDS.get(args.unit or recipe.schedule.unit)
    if unit is None:
        raise UserError(f"--unit: {args.unit!r} is not valid; allowed: steps | samples | tokens")
    positions = [units.in_unit("--at", p.strip(), unit, minimum=0) for p in args.at.split(",") if p.strip()]
    if not positions:
        raise UserError(f"--at: {args.at!r} is not valid; allowed: positions separated by commas, e.g. 20,40")
    factors = []
    for f in args.batch.split(","):
        if not re.fullmatch(r"[0-9]+", f.strip()) or int(f) < 1:       # isdigit() takes "²", which int() refuses
            raise UserError(f"--batch: {f.strip()!r} is not valid; allowed: integer factors >= 1 separated by commas "
                            "(the branch's batch is factor x the parent's, a whole number of samples)")
        factors.append(int(f))
    factors = sorted(set(factors) | {1})                # factor 1 is always run: the control
    length = units.in_unit("--for", args.for_, unit)
    if length > MAX_LENGTH:
        raise UserError(f"--for: {args.for_!r} is not valid; allowed: at most {MAX_LENGTH:.0e} {unit}s")
    for key in ("name", "branch"):                  # what a branch is called and is: the command's to say
        if any(str(item).split("=", 1)[0].strip() == key or str(item).startswith(key + ".") for item in args.set):
            raise UserError(f"--set: {key} is not valid for branch; allowed: keys of the training itself, and output "
                            f"(the branches are named by the command: <output>/{parent.path.name}.branches/)")
    found = checkpoints(parent)
    tokens = recipe.data.tokens_per_sample is not None
    n = data_mod.sizes(recipe.data)[0]
    parent_plan = planning.plan(recipe, n, 1)
    step_units = max(s.batch for s in parent_plan.stages) * {"step": 0, "sample": 1,
                                                             "token": recipe.data.tokens_per_sample or 1}[unit]
    end = parent_plan.steps.length(unit)
    for at in positions:
        if at >= end:
            raise UserError(f"--at: {at:,} {unit}s is not valid: the parent ends at {end:,}; allowed: positions before "
                            "its end (a branch from there would train nothing to compare)")
    chosen = {}
    for at in positions:
        manifest = choose(found, at, unit, tokens, slack=max(step_units - 1, 0))
        chosen[manifest["step"] if manifest else 0] = manifest
    out_dir = parent.path.parent / f"{parent.path.name}.branches"
    parent_hash = recipe_mod.trajectory_hash(data)
    points, recipes = [], []
    for step, manifest in sorted(chosen.items()):
        at = position(manifest, unit) if manifest else 0
        batch = parent_batch(parent_plan, step)
        for factor, draw in ((f, k) for f in factors for k in range(seeds)):
            name = f"{parent.path.name}-at{at}{SHORT[unit]}-x{factor}" + (f"-s{draw}" if draw else "")
            over = json.loads(json.dumps(data))
            over.update(name=name, output=str(out_dir))
            over["branch"] = {"parent": str(parent.path.resolve()), "parent_hash": parent_hash, "at_step": step,
                              "factor": factor, "lr_rule": rule, "length": f"{length} {unit}s", "seed": draw}
            over.setdefault("tracking", {}).setdefault("wandb", {})["group"] = parent.path.name
            branched = recipe_mod.from_dict(over, args.set)
            inside(branched.folder.path, parent.path)
            label = f"at {at:,} {unit}s, batch x{factor}" + (f", data order {draw}" if seeds > 1 else "")
            points.append({"index": len(points), "seed": None, "label": label, "name": name, "step": step, "at": at,
                           "unit": unit, "factor": factor, "draw": draw, "parent_batch": batch,
                           "checkpoint": manifest["path"] if manifest else None})
            recipes.append(branched)
    return points, recipes


def parent_batch(p: planning.Plan, step: int) -> int:
    """The parent's batch at global step ``step`` (its last stage's at its end)."""
    stage = p.stage_at(step)
    return stage.scheduled_batch or stage.batch


def prepare(point: dict, recipe: Recipe) -> None:
    """The branch's folder: branch.json, and the parent's checkpoint linked in where the branch has none of
    its own yet (hard links: nothing of the parent is moved or written)."""
    folder = recipe.folder
    check_own(folder, recipe)
    folder.create()
    b = recipe.branch
    (folder.path / "branch.json").write_text(json.dumps(
        {"parent": b.parent, "at_step": b.at_step, "position": {point["unit"]: point["at"]}, "unit": point["unit"],
         "factor": b.factor, "lr_rule": b.lr_rule, "length": b.length, "seed": b.seed,
         "parent_batch": point["parent_batch"]}, indent=1) + "\n")
    source = point["checkpoint"]
    if source is None or list(folder.checkpoints.glob("step-*")) or folder.read_json(folder.complete):
        return
    target = folder.checkpoints / step_name(point["step"])
    folder.checkpoints.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = folder.checkpoints / f".tmp-{target.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(source, tmp, copy_function=_link_or_copy)
    os.replace(tmp, target)
    (folder.checkpoints / "latest").write_text(target.name + "\n")


def inside(path: Path, parent: Path) -> None:
    """A branch folder inside its parent's folder is refused: the parent is never written."""
    if path.resolve().is_relative_to(parent.resolve()):
        raise UserError(f"--set output: the branches would land in {path}, inside the parent's folder {parent}; allowed: "
                        "an output outside it (the parent is never written)")


def check_own(folder: RunFolder, recipe: Recipe) -> None:
    """A branch's folder is one this command made for this very branch, or new: a run folder without a
    branch.json, or another branch's (another parent, point, factor or seed), is refused in one line."""
    if not folder.path.exists() or not any(folder.path.iterdir()):
        return
    b = recipe.branch
    mine = {"parent": b.parent, "at_step": b.at_step, "factor": b.factor, "seed": b.seed}
    try:
        theirs = branches.read_branch(folder.path)
    except ValueError:
        theirs = None
    same = theirs is not None and all(theirs.get(k, 0 if k == "seed" else None) == v for k, v in mine.items())
    if not same:
        what = "a run that is no branch" if theirs is None else f"another branch ({theirs.get('parent')}, step " \
               f"{theirs.get('at_step')}, x{theirs.get('factor')})"
        raise UserError(f"branch: {folder.path} holds {what}; allowed: a folder this command made for this branch, "
                        "or none (move that folder aside to keep it)")


def _link_or_copy(source: str, target: str) -> None:
    try:
        os.link(source, target)
    except OSError:                  # another file system: a copy
        shutil.copy2(source, target)


def cmd_branch(args, run_point) -> int:
    """Plan the branches, prepare their folders, run them here (--local) or as one Slurm job array."""
    from launcher.cluster import slurm
    points, recipes = plan_branches(args)
    print(f"qhm-launch: {len(points)} branch(es) of {args.run}: " +
          "; ".join(f"{p['name']} ({p['label']})" for p in points), flush=True)
    if not args.dry_run:
        for p, r in zip(points, recipes):
            prepare(p, r)
    if args.local and not args.dry_run:
        from launcher.cluster import sweep
        return sweep.run_locally(points, recipes, run_point)
    slurm._check(args)
    warnings: list[str] = []
    prepared = [slurm._prepare(r, args, warnings) for r in recipes]
    slurm._warn(warnings)
    folder = RunFolder(Path(prepared[0][0].output))
    return slurm.submit_points(args, f"{Path(args.run).name}.branches", folder, points, prepared, run_point)
