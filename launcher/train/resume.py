"""Resuming: the newest valid checkpoint loaded into every part, what the log says of it (where from, a
branch's start, torchrun's restart after a membership change), and the restored position checked against
the run's plan."""
from __future__ import annotations

import os
from typing import TYPE_CHECKING

from launcher import config, env
from launcher.errors import UserError

if TYPE_CHECKING:
    from launcher.config import Recipe


def manifest(recipe: Recipe, state, tag: str, owed_evaluation: bool = False) -> dict:
    """What a checkpoint's manifest says besides its files: the position, the recipe and its trajectory's hash,
    the W&B id, why it was saved, and whether a preemption left this position's evaluation to the resume."""
    written = recipe.to_dict()
    return {"position": state.state_dict(), "recipe": written, "recipe_hash": config.trajectory_hash(written),
            "wandb_id": state.wandb_id, "tag": tag, **({"evaluation_owed": True} if owed_evaluation else {})}


def restore(parts, stages, log) -> dict | None:
    """Load the newest valid checkpoint (if any) into ``parts``; its manifest, or None for a fresh start."""
    folder, state, comm, recipe = parts.folder, parts.state, parts.comm, parts.recipe
    if comm.is_main:
        folder.create()
        folder.clear_stale(started=env.STARTED if env.PARENT in os.environ else None)
    manifest = parts.checkpoints.resume()
    if manifest is None:
        parts.rng.seed_from(0)
    else:
        log(f"[qhm-launch] resumed from {folder.checkpoints / ('step-%09d' % manifest['step'])} (epoch {state.epoch}, "
            f"step {state.step}, global step {state.global_step}, written by {manifest['world_size']} processes)")
        if config.is_branch_start(recipe, manifest):    # a branch starts: its own W&B run, grouped under the parent
            b = recipe.branch
            state.wandb_id = ""
            log(f"[qhm-launch] branch of {b.parent} at global step {b.at_step}: batch x{b.factor}, "
                f"lr rule {b.lr_rule}, for {b.length}")
    restarts = int(os.environ.get("TORCHELASTIC_RESTART_COUNT") or 0)
    if restarts:                                # elastic membership: torchrun restarted the workers
        log(f"[qhm-launch] membership changed (torchrun's restart {restarts}): world size "
            + (f"{manifest['world_size']} -> {comm.world}, resumed from global step {state.global_step}"
               if manifest is not None else f"now {comm.world}, no checkpoint yet: starting from the beginning"))
    if parts.growth is not None:                # the batches an adaptive run already chose
        if manifest is not None:
            parts.growth.check(f"checkpoint step-{manifest['step']:09d}")
        stages.set_decisions(parts.growth.batches)
    if manifest is not None:
        check_position(state, stages.plan, manifest, recipe.to_dict())
    return manifest


def owes_mid_epoch_evaluation(manifest: dict | None, state, stages) -> bool:
    """Whether a preemption interrupted the mid-epoch evaluation at the restored position (at an epoch's end
    the loop evaluates anyway)."""
    return manifest is not None and bool(manifest.get("evaluation_owed")) \
        and 0 < state.step < stages.steps_in(state.epoch)


def check_position(s, plan, manifest: dict, recipe_dict: dict) -> None:
    """The restored position ``s`` must be one of the run's ``plan`` (a checkpoint whose values were edited
    and its hash recomputed is refused in one line naming the field, not trained from)."""
    where = f"checkpoint step-{manifest['step']:09d}"

    def bad(field, value, allowed):
        raise UserError(f"{where}: {field} {value!r} is not valid; allowed: {allowed} (move this checkpoint aside "
                        "to resume from the one before it)")
    for field in ("epoch", "step", "global_step", "samples"):
        value = getattr(s, field)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            bad(f"train.{field}", value, "an integer >= 0")
    if s.epoch > plan.epochs:
        bad("train.epoch", s.epoch, f"an epoch of the run's plan (0 to {plan.epochs})")
    steps = plan.steps_in(s.epoch) if s.epoch < plan.epochs else 0
    last = steps if manifest.get("evaluation_owed") else steps - 1    # trained, its evaluation interrupted
    if not (s.step <= last or s.step == 0):
        bad("train.step", s.step, f"a step of epoch {s.epoch} (0 to {max(last, 0)})")
    if manifest["step"] != s.global_step:
        bad("train.global_step", s.global_step, f"the checkpoint's own step, {manifest['step']}")
    if config.trajectory_hash(manifest.get("recipe", {})) != config.trajectory_hash(recipe_dict):
        return                                  # --force-resume, a branch's start: another plan wrote it
    if s.step == steps > 0:                    # the epoch trained: where the next one starts
        global_step, samples = plan.end_of(s.epoch)
    elif s.epoch < plan.epochs:
        stage = plan.at(s.epoch, s.step)
        global_step, samples = stage.global_step + s.step - stage.first, stage.samples + stage.start(s.step) - stage.offset
    else:
        global_step, samples = plan.total_steps, plan.total_samples
    if (s.global_step, s.samples) != (global_step, samples):
        bad("train.global_step/samples", (s.global_step, s.samples),
            f"({global_step}, {samples}): where the plan puts epoch {s.epoch} step {s.step}")

