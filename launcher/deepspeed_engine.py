"""DeepSpeed engine: the same loop on ZeRO 0/1/2, with QHM as the client optimizer.

We own the accumulation boundary. DeepSpeed's own boundary is ``(micro_steps + 1) % GAS`` and
micro_steps is never reset, so changing GAS mid-run (a new batch stage) would make the first step
after the switch span the wrong number of micro-batches. Instead the loop marks each micro-batch with
``set_gradient_accumulation_boundary(last)`` and calls ``step()`` once, after the last one; the loss is
already normalised by the global batch, so ``backward(scale_wrt_gas=False)``. The engine's batch
settings still follow the plan (``set_stage``), so its counters and logs agree with ours.

Mixed precision is torch.autocast over fp32 weights, as with DDP (DeepSpeed's bf16 mode is left off),
so both engines compute the same updates.
"""
from __future__ import annotations

import json
import os
from contextlib import nullcontext
from pathlib import Path

from .recipe import RecipeError

TAG = "deepspeed"
# Keys the launcher derives from the recipe; a raw deepspeed_config may not set them.
OWNED = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
         "zero_optimization.stage", "zero_allow_untested_optimizer", "optimizer", "scheduler", "bf16",
         "fp16", "gradient_clipping")


def check_raw_config(raw: dict) -> None:
    for key in OWNED:
        node, parts = raw, key.split(".")
        for part in parts[:-1]:
            node = node.get(part, {}) if isinstance(node, dict) else {}
        if isinstance(node, dict) and parts[-1] in node:
            raise RecipeError(f"distributed.deepspeed_config.{key}: {node[parts[-1]]!r} is not allowed; "
                              f"the launcher sets it from the recipe (schedule, precision, "
                              f"distributed.zero_stage)")


def build_config(recipe, micro: int, accum: int, world: int) -> dict:
    cfg = json.loads(json.dumps(recipe.distributed.deepspeed_config))
    zero = cfg.setdefault("zero_optimization", {})
    zero["stage"] = recipe.distributed.zero_stage
    cfg.update(train_micro_batch_size_per_gpu=micro, gradient_accumulation_steps=accum,
               train_batch_size=micro * accum * world, zero_allow_untested_optimizer=True,
               bf16={"enabled": False}, gradient_clipping=0.0)
    cfg.setdefault("steps_per_print", 1 << 30)
    cfg.setdefault("wall_clock_breakdown", False)
    return cfg


class DeepSpeedEngine:
    def __init__(self, recipe, module, optimizer, comm, micro: int, accum: int):
        import deepspeed
        self.module, self.world = module, comm.world
        self.model, self.optimizer, _, _ = deepspeed.initialize(
            model=module, optimizer=optimizer, config=build_config(recipe, micro, accum, comm.world),
            dist_init_required=False)
        self._backwards = 0
        self._step_log = os.environ.get("QHM_TEST_STEP_LOG") if comm.is_main else None

    def set_stage(self, micro_batch: int, accum: int) -> None:
        self.model.set_train_micro_batch_size(micro_batch)
        self.model.set_train_batch_size(micro_batch * accum * self.world)

    def micro_step(self, last: bool):
        self.model.set_gradient_accumulation_boundary(last)
        return nullcontext()

    def backward(self, loss) -> None:
        self.model.backward(loss, scale_wrt_gas=False)
        self._backwards += 1

    def step(self) -> None:
        self.model.step()
        if self._step_log:                   # test hook: what each optimizer step spanned
            with open(self._step_log, "a") as f:
                f.write(json.dumps({"global_steps": self.model.global_steps, "micro_batches": self._backwards,
                                    "gas": self.model.gradient_accumulation_steps(),
                                    "micro": self.model.train_micro_batch_size_per_gpu()}) + "\n")
        self._backwards = 0

    # checkpoints: DeepSpeed writes model and (partitioned) optimizer state itself, into our folder
    def state_dict(self) -> dict:
        return {"deepspeed_tag": TAG}

    def write_checkpoint_files(self, folder: Path) -> None:
        self.model.save_checkpoint(str(folder), tag=TAG, save_latest=False)

    def load(self, state: dict, folder: Path) -> None:
        path, _ = self.model.load_checkpoint(str(folder), tag=state["deepspeed_tag"], load_optimizer_states=True,
                                             load_lr_scheduler_states=False)
        if path is None:
            raise RecipeError(f"checkpoint {folder}: DeepSpeed could not load tag {state['deepspeed_tag']!r}")
