"""The batch stages as they are run: the plan's stages (:mod:`launcher.train.planning`), whose split may
change while training (the memory probe of ``max_micro_batch: auto``, a CUDA out-of-memory error
halving the micro-batch, an adaptive batch's decisions re-planning what follows), and what follows a
split (the engine's stage, one compile per micro-batch shape). Callers ask for the stage of a step each
time they need it (:meth:`Stages.at`), so no one holds a split that was replaced meanwhile.

In the units step, sample and token the hyper-parameters move at every step: :class:`StepValues`
evaluates them for a block of a stage's steps at once."""
from __future__ import annotations

import contextlib

import numpy as np
import torch

from launcher import env
from launcher.config.schema import ADAM_FAMILY
from launcher.errors import RunFailed
from launcher.train import microbatch, planning
from launcher.train.build import Parts
from launcher.train.planning import Stage, ceil_div


class StepValues:
    """(lr, beta, gamma) of every step in the units step, sample and token: the schedules at the step's
    position, for :data:`BLOCK` steps of a stage at a time (blocks counted from the stage's first step,
    so a resumed run evaluates the same arrays as an uninterrupted one, bit for bit)."""
    BLOCK = 1024

    def __init__(self, plan: planning.Plan):
        self.plan, self._key, self._values = plan, None, None
        self.first_batch = plan.stages[0].batch if plan.stages else None

    def at(self, stage: Stage, step: int) -> tuple[float, float, float]:
        block, i = divmod(step - stage.first, self.BLOCK)
        key = (stage.epoch, stage.first, stage.batch, block)
        if key != self._key:
            k = np.arange(block * self.BLOCK, min((block + 1) * self.BLOCK, stage.steps), dtype=np.int64)
            unit, tokens = self.plan.unit, self.plan.steps.tokens_per_sample or 1
            u = {"step": stage.global_step + k, "sample": stage.samples + k * stage.batch,
                 "token": (stage.samples + k * stage.batch) * tokens}[unit]
            lr, beta, gamma = self.plan.schedule.hyperparams(u, np.full(len(k), stage.batch), self.first_batch)
            if stage.lr_scale != 1.0:                  # a branch's learning-rate rule
                lr = lr * stage.lr_scale
            self._values = list(zip(np.broadcast_to(lr, k.shape).tolist(), np.broadcast_to(beta, k.shape).tolist(),
                                    np.broadcast_to(gamma, k.shape).tolist()))
            self._key = key
        return self._values[i]


def unallocated_state(optimizer: torch.optim.Optimizer, per_parameter: int) -> int:
    """Bytes of optimizer state that training will allocate and that do not exist yet (before the first
    step): ``per_parameter`` tensors the size of each parameter (of its local shard)."""
    if optimizer.state:
        return 0
    local = [p.to_local() if hasattr(p, "to_local") else p for g in optimizer.param_groups for p in g["params"]]
    return per_parameter * sum(p.numel() * p.element_size() for p in local)


class Stages:
    def __init__(self, parts: Parts):
        p, perf = parts, parts.recipe.performance
        self.plan: planning.Plan = p.plan
        self.recipe, self.n = p.recipe, len(p.dataset.train)
        self.comm, self.engine, self.module, self.batches, self.loss = p.comm, p.engine, p.module, p.batches, p.loss
        self.autocast, self.log = p.autocast, p.log
        self.auto = p.recipe.distributed.max_micro_batch == "auto"
        self.probed: dict[int, int] = {}       # batch -> the micro-batch the probe agreed on
        self.micro: dict[int, int] = {}        # batch -> the micro-batch cap chosen while running
        self.decisions: list[int] | None = None    # an adaptive batch's, so far
        self.current: Stage | None = None      # the stage entered last
        self.per_step = self.plan.unit != "epoch"
        self.momentum = p.recipe.optimizer.name not in ADAM_FAMILY   # QHM's beta and gamma (the Adam family: lr only)
        self.values = StepValues(self.plan)
        self.compile_mode = perf.compile if perf.compile != "off" else ("reduce-overhead" if perf.cuda_graphs else None)
        self.compiled, self.compiled_micro = False, None

    @property
    def epochs(self) -> int:
        return self.plan.epochs

    def steps_in(self, epoch: int) -> int:
        return self.plan.steps_in(epoch)

    def at(self, epoch: int, step: int) -> Stage:
        """The stage holding step ``step`` of epoch ``epoch``, as split now."""
        current = self.current
        if current is not None and current.epoch == epoch and current.first <= step < current.end:
            return current
        return self.plan.at(epoch, step)

    def starts_stage(self, epoch: int, step: int) -> bool:
        """Whether step ``step`` of epoch ``epoch`` lies outside the stage entered last."""
        return self.at(epoch, step) is not self.current

    def enter(self, epoch: int, step: int = 0) -> Stage:
        """The stage of step (epoch, step) starts, or the run resumes inside it: its split sized (auto),
        compiled for (compile), set on the engine."""
        self.current = None
        if self.auto:
            self.size_micro_batch(self.at(epoch, step), epoch)
        stage = self.current = self.at(epoch, step)
        self.compile_for(stage)
        self.engine.set_stage(stage.micro_batch, stage.accum)
        return stage

    def hyperparams(self, epoch: int, step: int) -> tuple:
        """(lr, beta, gamma) of step (epoch, step): its stage's in the epoch unit, the step's own otherwise;
        beta and gamma None for an optimizer without them."""
        stage = self.at(epoch, step)
        lr, beta, gamma = self.values.at(stage, step) if self.per_step else (stage.lr, stage.beta, stage.gamma)
        return (lr, beta, gamma) if self.momentum else (lr, None, None)

    def replan(self) -> None:
        """The plan again with what was decided while running (the past stays as it was)."""
        epoch, first = (self.current.epoch, self.current.first) if self.current else (0, 0)
        self.plan = planning.plan(self.recipe, self.n, self.comm.world, decisions=self.decisions, micro=self.micro)
        self.values = StepValues(self.plan)
        if self.current is not None:
            self.current = None
            self.current = self.at(epoch, first)

    def resplit(self, micro: int, why: str) -> None:
        """Cut the current stage's batch (from now on) into micro-batches of at most ``micro``."""
        batch = self.current.batch
        self.micro[batch] = micro
        self.replan()
        stage = self.current
        self.engine.set_stage(stage.micro_batch, stage.accum)
        self.log(f"[qhm-launch] {why}: batch {batch} = {stage.micro_batch} x {stage.accum} x {self.comm.world}")

    def set_decisions(self, decisions: list[int]) -> None:
        """An adaptive batch decided at run time: the stages from the next decision point on follow it."""
        self.decisions = list(decisions)
        self.replan()

    def halve(self, epoch: int, step: int) -> None:
        """After a CUDA out-of-memory error in step ``step``: half the micro-batch for the rest of the stage."""
        micro = self.at(epoch, step).micro_batch
        if micro == 1:
            raise RunFailed(f"CUDA out of memory at epoch {epoch} step {step} with a micro-batch of 1; allowed: a "
                            "smaller model or input, or more memory")
        self.resplit(micro // 2, f"CUDA out of memory at epoch {epoch} step {step}: the micro-batch is "
                                 "halved for the rest of the stage and the step redone from its first "
                                 "micro-batch")

    def size_micro_batch(self, stage: Stage, epoch: int) -> None:
        """max_micro_batch auto: probe device memory once per batch (CPU: the recipe's cap)."""
        device = self.comm.device
        hooked = env.oom_above() is not None or env.device_memory() is not None
        if stage.batch in self.probed or not (device.type == "cuda" or hooked):
            return
        share = ceil_div(stage.batch, self.comm.world)
        with self.eager():     # every probe size compiled would be a graph (and a recompile) of its own
            if self.engine.lockstep:   # sharded: every pass is a collective, no rank may run out of memory
                unallocated = unallocated_state(self.engine.optimizer, 1 if self.momentum else 2)
                found, use, fit = microbatch.extrapolate(self.module, self.batches.probe_batch, self.loss,
                                                         self.autocast, share, device, unallocated, self.comm.rank)
                how = f"extrapolated from micro-batches 1 and 2 ({fit}; 10% kept free)"
            else:
                found, use = microbatch.probe(self.module, self.batches.probe_batch, self.loss, self.autocast, share,
                                              device)
                how = "with a 10% margin"
        agreed = int(self.comm.all_reduce_min(torch.tensor(use, device=device)))
        if agreed < 1:
            raise RunFailed(f"max_micro_batch auto: not even one sample fits in device memory at epoch {epoch}")
        self.probed[stage.batch] = agreed
        self.current = stage
        self.resplit(agreed, f"max_micro_batch auto: up to {found} samples fit here (of a share of {share}), "
                             f"{agreed} over all ranks {how}")

    def compile_for(self, stage: Stage) -> None:
        """performance.compile: the model is compiled in place (torch.compile, static shapes, inside DDP),
        and recompiles once for each stage's micro-batch shape; partial micro-batches run eagerly, so no
        other shape ever compiles."""
        if self.compile_mode is None or self.compiled_micro == stage.micro_batch:
            return
        import torch._dynamo.config as dynamo_config
        # raised at every new shape: an adaptive batch adds stages (and shapes) after the first compile
        raise_recompile_limit(dynamo_config, len({e.micro_batch for e in self.plan.stages}) + 8)
        if not self.compiled:
            backend = env.compile_backend()
            mode = None if self.compile_mode == "default" or backend != "inductor" else self.compile_mode
            self.module.compile(backend=backend, mode=mode, dynamic=False)
            self.compiled = True
        self.compiled_micro = stage.micro_batch
        self.log(f"[qhm-launch] compile ({self.compile_mode}): batch stage {stage.batch}: the micro-step of "
                 f"{stage.micro_batch} samples compiles at its first step")

    def eager(self, always: bool = True):
        """Run eagerly inside (evaluation shapes vary; a partial micro-batch is another shape)."""
        return torch.compiler.set_stance("force_eager") if self.compiled and always else contextlib.nullcontext()

    def graphs_compiled(self) -> int | None:
        if not self.compiled:
            return None
        from torch._dynamo.utils import counters
        return counters["stats"]["unique_graphs"]


def raise_recompile_limit(dynamo_config, at_least: int) -> None:
    """Let dynamo compile one graph per stage shape: its limit is ``recompile_limit`` from torch 2.7 and
    ``cache_size_limit`` before (pyproject allows 2.6)."""
    name = "recompile_limit" if hasattr(dynamo_config, "recompile_limit") else "cache_size_limit"
    setattr(dynamo_config, name, max(getattr(dynamo_config, name), at_least))
