"""The batch stages as they are run: every epoch's split, which may change while training (the memory
probe of ``max_micro_batch: auto``, a CUDA out-of-memory error halving the micro-batch), and what follows
a split (the engine's stage, one compile per micro-batch shape). Callers ask for ``stages[epoch]`` each
time they need it, so no one holds a split that was replaced meanwhile."""
from __future__ import annotations

import contextlib
import dataclasses

import torch

from launcher import env
from launcher.errors import RunFailed
from launcher.train import microbatch
from launcher.train.build import Parts
from launcher.train.splits import EpochSplit, ceil_div, micro_cap, split_batch


class Stages:
    def __init__(self, parts: Parts):
        p, perf = parts, parts.recipe.performance
        self.splits = list(p.splits)
        self.recipe, self.n = p.recipe, len(p.dataset.train)
        self.comm, self.engine, self.module, self.batches, self.loss = p.comm, p.engine, p.module, p.batches, p.loss
        self.autocast, self.log = p.autocast, p.log
        self.auto = p.recipe.distributed.max_micro_batch == "auto"
        self.probed: dict[int, int] = {}       # batch -> the micro-batch the probe agreed on
        self.compile_mode = perf.compile if perf.compile != "off" else ("reduce-overhead" if perf.cuda_graphs else None)
        self.compiled, self.compiled_micro = False, None

    def __getitem__(self, epoch: int) -> EpochSplit:
        return self.splits[epoch]

    def enter(self, epoch: int) -> EpochSplit:
        """Epoch ``epoch`` starts: its split sized (auto), compiled for (compile), set on the engine."""
        if self.auto:
            self.size_micro_batch(epoch)
        split = self.splits[epoch]
        self.compile_for(split)
        self.engine.set_stage(split.micro_batch, split.accum)
        return split

    def resplit(self, epoch: int, micro: int, why: str) -> None:
        """Cut epoch ``epoch``'s batch (from it to its stage's end) into micro-batches of at most ``micro``."""
        batch = self.splits[epoch].batch
        m, accum = split_batch(batch, self.comm.world, micro)
        for e in range(epoch, len(self.splits)):
            if self.splits[e].batch != batch:
                break
            self.splits[e] = dataclasses.replace(self.splits[e], micro_batch=m, accum=accum)
        self.engine.set_stage(m, accum)
        self.log(f"[qhm-launch] {why}: batch {batch} = {m} x {accum} x {self.comm.world}")

    def set_batch(self, epoch: int, batch: int) -> None:
        """An adaptive batch decided at run time: epochs from ``epoch`` on train at global batch ``batch``,
        their steps and split following it (until a later decision)."""
        n, world = self.n, self.comm.world
        micro, accum = split_batch(batch, world, micro_cap(self.recipe))
        for e in range(epoch, len(self.splits)):
            self.splits[e] = dataclasses.replace(self.splits[e], batch=batch, steps=ceil_div(n, batch),
                                                 micro_batch=micro, accum=accum, data_ranks=min(world, batch))

    def halve(self, epoch: int, step: int) -> None:
        """After a CUDA out-of-memory error in step ``step``: half the micro-batch for the rest of the stage."""
        micro = self.splits[epoch].micro_batch
        if micro == 1:
            raise RunFailed(f"CUDA out of memory at epoch {epoch} step {step} with a micro-batch of 1; allowed: a "
                            "smaller model or input, or more memory")
        self.resplit(epoch, micro // 2, f"CUDA out of memory at epoch {epoch} step {step}: the micro-batch is "
                                        "halved for the rest of the stage and the step redone from its first "
                                        "micro-batch")

    def size_micro_batch(self, epoch: int) -> None:
        """max_micro_batch auto: probe device memory once per batch stage (CPU: the recipe's cap)."""
        split, device = self.splits[epoch], self.comm.device
        if split.batch in self.probed or not (device.type == "cuda" or env.oom_above() is not None):
            return
        share = ceil_div(split.batch, self.comm.world)
        with self.eager():     # every probe size compiled would be a graph (and a recompile) of its own
            found, use = microbatch.probe(self.module, self.batches.probe_batch, self.loss, self.autocast, share, device)
        agreed = int(self.comm.all_reduce_min(torch.tensor(use, device=device)))
        if agreed < 1:
            raise RunFailed(f"max_micro_batch auto: not even one sample fits in device memory at epoch {epoch}")
        self.probed[split.batch] = agreed
        self.resplit(epoch, agreed, f"max_micro_batch auto: up to {found} samples fit here (of a share of {share}), "
                                    f"{agreed} over all ranks with a 10% margin")

    def compile_for(self, split: EpochSplit) -> None:
        """performance.compile: the model is compiled in place (torch.compile, static shapes, inside DDP),
        and recompiles once for each stage's micro-batch shape; partial micro-batches run eagerly, so no
        other shape ever compiles."""
        if self.compile_mode is None or self.compiled_micro == split.micro_batch:
            return
        import torch._dynamo.config as dynamo_config
        # raised at every new shape: an adaptive batch adds stages (and shapes) after the first compile
        raise_recompile_limit(dynamo_config, len({e.micro_batch for e in self.splits}) + 8)
        if not self.compiled:
            backend = env.compile_backend()
            mode = None if self.compile_mode == "default" or backend != "inductor" else self.compile_mode
            self.module.compile(backend=backend, mode=mode, dynamic=False)
            self.compiled = True
        self.compiled_micro = split.micro_batch
        self.log(f"[qhm-launch] compile ({self.compile_mode}): batch stage {split.batch}: the micro-step of "
                 f"{split.micro_batch} samples compiles at its first step")

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
