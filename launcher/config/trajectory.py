"""What a checkpoint's trajectory depends on: the recipe fields a resume must not change, their hash
(in the manifest and complete.json) and a one-line diff for the refusal."""
from __future__ import annotations

import dataclasses
import hashlib
import json

from launcher import keys
from launcher.config.schema import Recipe

# Fields that change the trajectory: a checkpoint written under other values is refused on resume.
# W&B, process count, micro-batch cap, eval, checkpoint cadence and paths may change freely.
TRAJECTORY_FIELDS = ("seed", "epochs", "train", "data.tokens_per_sample", "data.train", "data.seq_len", "data.vocab",
                     "data.dtype",
                     "data.text", "data.dataset", "data.factory", "data.kwargs", "data.augment", "data.size",
                     "data.shape", "data.classes", "data.image_size", "data.rotation", "data.validation", "model",
                     "loss", "precision", "optimizer", "schedule", "distributed.engine",
                     "distributed.zero_stage", "distributed.batch_norm", "performance.tf32",
                     "performance.deterministic", "branch")


def trajectory(recipe_dict: dict) -> dict:
    """The trajectory fields of a recipe; keys a recipe written by an earlier version lacks take their
    defaults (which are what that version did), so adding a key never refuses an old checkpoint."""
    full = _merged(dataclasses.asdict(Recipe()), recipe_dict)
    return {key: keys.get(full, key) for key in TRAJECTORY_FIELDS}


def _merged(defaults: dict, given: dict) -> dict:
    out = dict(defaults)
    for k, v in given.items():
        out[k] = _merged(defaults[k], v) if isinstance(v, dict) and isinstance(defaults.get(k), dict) else v
    return out


# Keys added after hashes were first written, at the defaults that reproduce what came before: left out of
# the hash when at those defaults, so a run folder completed earlier keeps its hash (and stays complete).
ADDED_DEFAULTS = {"train": {"steps": None, "samples": None, "tokens": None}, "data.tokens_per_sample": None,
                  "schedule.unit": "epoch", "schedule.batch.points": [], "schedule.batch.branches": None,
                  "schedule.batch.tolerance": 0.01, "schedule.lr.decay": 0,
                  "schedule.lr.batch_scaling": "none", "data.train": None, "data.seq_len": None, "data.vocab": None,
                  "data.dtype": None, "data.text": None, "optimizer.betas": [0.9, 0.999], "optimizer.nus": [1.0, 1.0],
                  "optimizer.eps": 1e-8,
                  "optimizer.decouple_weight_decay": None, "optimizer.weight_decay_all": False,
                  "optimizer.clip_grad_norm": None, "branch.seed": 0,     # before "branch": its default lacks it
                  "branch": {"parent": None, "parent_hash": None, "at_step": 0,
                                                                 "factor": 1, "lr_rule": "none", "length": None}}


# Defaults that changed later, at the value that earlier versions wrote: left out of the hash too (warmup_from's
# tolerance is resolved into the batch points when the recipe loads; an earlier recipe.yaml holds 0.01).
CHANGED_DEFAULTS = {"schedule.batch.tolerance": None}


def trajectory_hash(recipe_dict: dict) -> str:
    fields = json.loads(json.dumps(trajectory(recipe_dict)))
    for key, default in [*ADDED_DEFAULTS.items(), *CHANGED_DEFAULTS.items()]:
        holder, leaf = fields, key                     # a trajectory field itself ("train"), or inside one
        if key not in fields:
            *path, leaf = key.split(".")
            for part in path:
                holder = holder.get(part, {}) if isinstance(holder, dict) else {}
        if isinstance(holder, dict) and leaf in holder and holder[leaf] == default:
            del holder[leaf]
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]


def trajectory_diff(old: dict, new: dict) -> list[str]:
    """Leaf-level differences ``key: old -> new`` between two recipes' trajectory fields."""
    a, b = keys.flatten(trajectory(old)), keys.flatten(trajectory(new))
    return [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def is_branch_start(recipe: Recipe, manifest: dict) -> bool:
    """Whether checkpoint ``manifest`` is where the branch ``recipe`` starts: its parent's, at the branch
    step (a trajectory that differs from the branch's own by design)."""
    b = recipe.branch
    return (b.parent is not None and manifest.get("step") == b.at_step
            and trajectory_hash(manifest.get("recipe", {})) == b.parent_hash)
