"""``qhm-launch export RUN [--step N] --format hf --out DIR``: a run's model as a folder Hugging Face's
``transformers`` loads with no code of ours (safetensors, config.json, the run's tokenizer files).

The model comes from ``final_model.pt``, or from a checkpoint of any engine, read without a process group
(each engine's ``checkpoint_model``: DDP's replicated state, FSDP's DCP shards, DeepSpeed's files); the
family's ``to_hf`` says how its parameters map onto the Hugging Face class. A model no family maps is one
line, and the output folder is never one that holds files.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch

from launcher import config as recipe_mod
from launcher import engines, models
from launcher.errors import UserError
from launcher.run.checkpoint import CheckpointManager, CorruptCheckpoint, read_file, step_name, step_of
from launcher.run.folder import RunFolder


def model_state(folder: RunFolder, step: int | None) -> tuple[dict, str]:
    """(the model's state dict, what it was read from): checkpoint ``step``, else final_model.pt, else the
    newest valid checkpoint."""
    manager = CheckpointManager(folder, log=lambda *a: None)
    if step is None and folder.final_model.is_file():
        return torch.load(folder.final_model, map_location="cpu", weights_only=True), "final_model.pt"
    if step is None:
        found = manager.find_latest_valid()
        if found is None:
            raise UserError(f"RUN_DIR: {str(folder.path)!r} has no final_model.pt and no checkpoint; allowed: a run "
                            "folder that trained (see qhm-launch status)")
    else:
        path = folder.checkpoints / step_name(step)
        if path not in manager.candidates():
            have = ", ".join(str(step_of(p)) for p in manager.candidates()) or "none"
            raise UserError(f"--step: {step} has no checkpoint in {folder.checkpoints}; allowed: {have}")
        try:
            found = manager.verified(path)
        except CorruptCheckpoint as exc:
            raise UserError(f"--step: checkpoint {path} is not valid ({exc}); allowed: another step") from None
    replicated = read_file(found.path / "state.pt")
    return engines.checkpoint_model(found.manifest["recipe"], found.path, replicated), f"checkpoint {found.path.name}"


def export(run: str, step: int | None, out: str) -> dict:
    """Write the run's model into ``out`` in Hugging Face's format; what was written ({source, model, tokenizer})."""
    folder = RunFolder(Path(run))
    if not folder.recipe.is_file():
        raise UserError(f"RUN_DIR: {run!r} is not a run folder (no recipe.yaml); allowed: <output>/<name> of a run")
    recipe = recipe_mod.load(folder.recipe, [])
    family = models.family_of(recipe.model)
    to_hf = getattr(family, "to_hf", None)
    if to_hf is None:
        raise UserError(f"--format: hf cannot express model {models.named(recipe.model)} (no Hugging Face class maps "
                        f"its parameters); allowed: a run of {' | '.join(models.names_with('to_hf'))}")
    target = Path(out).expanduser()
    if target.is_symlink() or (target.exists() and (not target.is_dir() or any(target.iterdir()))):
        raise UserError(f"--out: {out!r} already holds something; allowed: a new or empty folder (nothing is ever "
                        "written over)")
    try:
        import transformers                   # the format's own library, an extra
    except ImportError:
        raise UserError("--format: hf needs the transformers package (pip install 'qhm-launch[hf]'); allowed: install "
                        "it, then export again") from None
    state, source = model_state(folder, step)
    config, weights = to_hf(recipe.model, state, recipe.data.seq_len)
    model = getattr(transformers, config.architectures[0])(config)      # random weights: every one replaced below
    missing, unexpected = model.load_state_dict(weights, strict=False)
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    if unexpected or set(missing) - tied:
        raise UserError(f"--format: hf: the mapping of {family.NAMES[0]} does not fit {config.architectures[0]} "
                        f"(missing {sorted(set(missing) - tied)[:4]}, unexpected {sorted(unexpected)[:4]})")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        model.save_pretrained(staging, safe_serialization=True)
        copied = [p.name for p in sorted(folder.tokenizer.glob("*")) if p.is_file()]
        for name in copied:
            shutil.copyfile(folder.tokenizer / name, staging / name)
        if target.exists():
            target.rmdir()                     # empty (checked above): the finished folder takes its place
        os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return {"source": source, "model": config.architectures[0], "tokenizer": copied}
