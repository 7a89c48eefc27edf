"""Engines: what the training loop needs from DDP and (in its own module) DeepSpeed.

The loop owns the accumulation boundary: it runs ``micro_step(last)`` contexts itself and calls
``step()`` once per optimizer step, so a batch stage can change micro-batch and accumulation at any
epoch without restarting processes, and every optimizer step spans exactly the planned micro-batches.
An engine is also a checkpoint part: DDP's state is a replicated ``state_dict``; DeepSpeed writes
its own (partitioned) files, so its scope is ``files``.
"""
from __future__ import annotations

from typing import ContextManager, Protocol

import torch


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


def build(recipe, module, optimizer, comm, first_stage, reads_local_gradients: bool = False) -> Engine:
    """The engine the recipe names; ``first_stage`` (a Stage) sizes DeepSpeed's initial config;
    ``reads_local_gradients``: the noise scale reads each rank's gradient before DDP's reduce."""
    if recipe.distributed.engine == "fsdp":
        from launcher.engines.fsdp import FSDPEngine
        return FSDPEngine(module, optimizer, comm, clip=recipe.optimizer.clip_grad_norm)
    if recipe.distributed.engine == "deepspeed":
        from launcher.engines.deepspeed import DeepSpeedEngine
        return DeepSpeedEngine(recipe, module, optimizer, comm, first_stage.micro_batch, first_stage.accum)
    from launcher.engines.ddp import DDPEngine
    return DDPEngine(module, optimizer, comm, explicit_reduce=recipe.distributed.max_micro_batch == "auto",
                     reads_local_gradients=reads_local_gradients, clip=recipe.optimizer.clip_grad_norm)
