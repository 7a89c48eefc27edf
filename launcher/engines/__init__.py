"""Engines: what the training loop needs from DDP and (in its own module) DeepSpeed.

The loop owns the accumulation boundary: it runs ``micro_step(last)`` contexts itself and calls
``step()`` once per optimizer step, so a batch stage can change micro-batch and accumulation at any
epoch without restarting processes, and every optimizer step spans exactly the planned micro-batches.
An engine is also a checkpoint part: DDP's state is a replicated ``state_dict``; DeepSpeed writes
its own (partitioned) files, so its scope is ``files``.

An engine is one module that owns everything engine-specific, and :data:`REGISTRY` names it: besides its
engine class, each module has ``check_recipe(recipe)`` (its recipe checks, when the recipe loads),
``preflight(recipe, check_data, build_model)`` (the heavier checks before any worker starts),
``move_refusal(distributed, optimizer)`` (why its checkpoint cannot load on another world size, or None),
``noise_refusal(recipe, world)`` (why the noise scale cannot be read from it, or None), ``prepare(recipe,
module, comm)`` (the model before the optimizer is built on it), ``checkpoint_model(folder, replicated)`` (the
whole model in one of its checkpoints, read without a process group) and ``build(...)``. Nothing outside this
package compares an engine's name (tests/launcher/test_layers.py). Adding an engine: one module, one line below.
"""
from __future__ import annotations

import importlib
from pathlib import Path
from types import ModuleType
from typing import ContextManager, Protocol

import torch

from launcher.errors import RecipeError

REGISTRY = {"ddp": "launcher.engines.ddp", "deepspeed": "launcher.engines.deepspeed", "fsdp": "launcher.engines.fsdp"}
NAMES = tuple(REGISTRY)


class Engine(Protocol):
    module: torch.nn.Module              # the bare model (what is saved and evaluated)
    model: torch.nn.Module               # what the loop calls forward on (DDP / DeepSpeed wrapper)
    optimizer: torch.optim.Optimizer     # whose param_groups the schedules write
    checkpoint_scope: str                # "replicated" (state_dict) or "files" (save_files / load_files)
    clipped: torch.Tensor | None         # optimizer.clip_grad_norm: the last step's global norm before clipping
    lockstep: bool                       # every forward is a collective (FSDP): ranks run equal micro-steps

    def set_stage(self, micro_batch: int, accum: int) -> None: ...
    def micro_step(self, last: bool) -> ContextManager: ...
    def backward(self, loss: torch.Tensor) -> None: ...
    def step(self) -> None: ...
    def discard_gradients(self) -> None: ...
    def gradient_norm(self) -> torch.Tensor | None: ...
    def close(self) -> None: ...         # drop the hooks whose references keep the wrapper alive
    def full_state_dict(self) -> dict: ...   # the whole model for final_model.pt (a collective under FSDP)


class ReplicatedEngine(Engine, Protocol):
    """checkpoint_scope "replicated" (DDP): one state_dict, the same on every rank, in the manager's files."""
    def state_dict(self) -> dict: ...
    def load_state_dict(self, state: dict) -> None: ...


class FilesEngine(Engine, Protocol):
    """checkpoint_scope "files" (FSDP's DCP shards, DeepSpeed's partitions): the engine writes its own files into
    the checkpoint's folder, checks them before any collective load, and loads them."""
    def save_files(self, folder: Path) -> None: ...
    def check_files(self, folder: Path) -> None: ...
    def load_files(self, folder: Path) -> None: ...


class NoiseEngine(Engine, Protocol):
    """An engine whose ``noise_refusal`` can be None: it hands each rank's gradient (before the reduce) to the
    noise scale's probe (launcher.train.noise)."""
    def measure_noise(self, probe) -> None: ...


def module_of(name: str) -> ModuleType:
    """The module of engine ``name`` (one of :data:`NAMES`), imported when first asked for."""
    return importlib.import_module(REGISTRY[name])


def check_recipe(recipe) -> None:
    """The recipe's engine's checks of the recipe (one-line RecipeErrors)."""
    module_of(recipe.distributed.engine).check_recipe(recipe)


def preflight(recipe, check_data: bool, build_model) -> None:
    """The engine's checks that build something (DeepSpeed's own config; the model, which ``build_model()``
    returns on the CPU, only if the engine asks: the train layer knows how), before any worker starts."""
    module_of(recipe.distributed.engine).preflight(recipe, check_data, build_model)


def _module_written_by(recipe: dict) -> ModuleType:
    """The module of the engine a recipe as a mapping names (a manifest's: "ddp" where it names none)."""
    return module_of(recipe.get("distributed", {}).get("engine", "ddp"))


def move_refusal(recipe: dict) -> str | None:
    """Why a checkpoint written under ``recipe`` (as a mapping: a manifest's, or ``Recipe.to_dict()``) cannot
    load on another number of processes, or None where it can."""
    return _module_written_by(recipe).move_refusal(recipe.get("distributed", {}), recipe.get("optimizer", {}))


def checkpoint_model(recipe: dict, folder: Path, replicated: dict) -> dict:
    """The whole model (a state dict on the host) in checkpoint ``folder`` written under ``recipe`` (a mapping: the
    manifest's), read offline, without a process group (``qhm-launch export``); ``replicated``: its state.pt."""
    return _module_written_by(recipe).checkpoint_model(Path(folder), replicated)


def noise_refusal(recipe, world: int) -> str | None:
    """Why the noise scale cannot be read from this engine's gradients on ``world`` processes, or None."""
    return module_of(recipe.distributed.engine).noise_refusal(recipe, world)


def prepare(recipe, module: torch.nn.Module, comm) -> torch.nn.Module:
    """The model as the engine needs it before the optimizer is built on it (FSDP: sharded)."""
    return module_of(recipe.distributed.engine).prepare(recipe, module, comm)


def build(recipe, module, optimizer, comm, first_stage, reads_local_gradients: bool = False) -> Engine:
    """The engine the recipe names; ``first_stage`` (a Stage) sizes DeepSpeed's initial config;
    ``reads_local_gradients``: the noise scale reads each rank's gradient before DDP's reduce."""
    return module_of(recipe.distributed.engine).build(recipe, module, optimizer, comm, first_stage, reads_local_gradients)


def refuse_outside_lockstep(r, engine: str) -> None:
    """For an engine that shards the parameters itself (every forward gathers them, a collective): what needs
    a collective outside the lockstep of every rank's forwards is refused."""
    why = {"distributed.batch_norm": (r.distributed.batch_norm == "sync", "'sync'", "local (the parameters are "
                                      "sharded; SyncBatchNorm's collectives would interleave with their all-gathers)"),
           "eval.full_grad_norm": (r.eval.full_grad_norm, "True", "false (it takes autograd.grad of the sharded "
                                   "parameters, outside the engine's own gradient reduce)"),
           "performance.cuda_graphs": (r.performance.cuda_graphs, "True", "false (the gathers are collectives "
                                       "outside a captured graph)")}
    for key, (bad, value, allowed) in why.items():
        if bad:
            raise RecipeError(f"{key}: {value} is not valid with {engine}; allowed: {allowed}")


def refuse_deepspeed_config(r) -> None:
    """distributed.deepspeed_config is DeepSpeed's: another engine would ignore it."""
    if r.distributed.deepspeed_config:
        raise RecipeError(f"distributed.deepspeed_config: not valid with distributed.engine {r.distributed.engine}; "
                          "allowed: {} (or set distributed.engine: deepspeed)")
