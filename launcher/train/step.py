"""One global batch's forward and backward on this rank: its micro-batches under the engine's
accumulation contexts, SyncBN's padding to the same number of micro-steps on every rank, and (with
``max_micro_batch: auto``) the out-of-memory retry agreed by every rank."""
from __future__ import annotations

import torch

from launcher import env
from launcher.errors import RunFailed, one_line
from launcher.train import microbatch
from launcher.train.build import Parts
from launcher.train.planning import ceil_div
from launcher.train.stages import Stages


class StepRunner:
    def __init__(self, parts: Parts, stages: Stages):
        p = parts
        self.stages, self.engine, self.batches, self.loss, self.sums = stages, p.engine, p.batches, p.loss, p.sums
        self.noise = p.noise
        self.comm, self.module, self.autocast = p.comm, p.module, p.autocast
        self.channels_last = p.recipe.performance.channels_last
        # a per-token loss over token files counts every position: the global batch's tokens are known on
        # the host; elsewhere (a mask may leave some out) they are counted and all-reduced each step
        self.tokens_per_sample = p.dataset.tokens_per_sample if self.loss.per_token else None
        self.sync_bn = p.recipe.distributed.batch_norm == "sync" and p.comm.world > 1
        # every rank must join every collective a forward makes (SyncBN's all-gathers, FSDP's): as many
        # micro-steps on each, the ranks with fewer samples running empty ones
        self.lockstep = (self.sync_bn or p.engine.lockstep) and p.comm.world > 1
        self.oom_at, self._oom_fired = env.oom_at(), False     # a test hook, read once

    def run(self, epoch: int, step: int) -> int:
        """Forward and backward of global batch (epoch, step) on this rank; returns the batch's size."""
        if not self.stages.auto:
            return self._forward_backward(epoch, step)
        if not self.engine.lockstep:
            return self._retrying(epoch, step)
        try:       # sharded: a step cannot be redone (the other ranks wait in a collective); torchrun stops them
            return self._forward_backward(epoch, step)
        except torch.OutOfMemoryError as exc:
            micro = self.stages.at(epoch, step).micro_batch
            raise RunFailed(f"CUDA out of memory at epoch {epoch} step {step} with the micro-batch of {micro} that "
                            f"max_micro_batch auto extrapolated ({one_line(exc)[:160]}); a sharded "
                            f"engine cannot redo a step; allowed: distributed.max_micro_batch an integer below "
                            f"{micro}") from None

    def _forward_backward(self, epoch: int, step: int) -> int:
        """This rank's micro-batches of global batch (epoch, step), forward and backward.

        The summed loss is scaled by world/size: DDP averages over ranks, so the update is the mean
        gradient over the whole global batch, whatever its size (a partial last batch included) and split.
        A per-token loss is scaled by world/tokens, the global batch's tokens that count.
        """
        stage = self.stages.at(epoch, step)            # as split now (an out-of-memory error halves it)
        size, micro_batches = self.batches.step(epoch, step, stage)
        if self.lockstep:             # every rank must join every forward's collectives: as many micro-steps
            needed = ceil_div(ceil_div(size, self.comm.world), stage.micro_batch)
            micro_batches += [(micro_batches[-1][0][:0], micro_batches[-1][1][:0])] * (needed - len(micro_batches))
        self.noise.start_step()
        model, scale, last_index = self.engine.model, self.comm.world / size, len(micro_batches) - 1
        counts = [None] * len(micro_batches)
        if self.tokens_per_sample is not None:
            scale = self.comm.world / (size * self.tokens_per_sample)
        elif self.loss.per_token:            # one all-reduce of the counted tokens, before any backward
            counts = [self.loss.count(y) for _, y in micro_batches]
            total = self.comm.all_reduce_sum(torch.stack(counts).sum().to(torch.float64))
            scale = self.comm.world / total.clamp(min=1)
        for i, (x, y) in enumerate(micro_batches):
            if self.oom_at and self._inject_oom(epoch, step, i):
                raise microbatch.injected_oom(f"epoch {epoch} step {step}")
            samples, last = y.shape[0], i == last_index
            empty = samples == 0 and not self.sync_bn
            if empty:                          # no samples here: join the gradient reduce with zeros,
                model.eval()                   # without touching batch-norm statistics
            if self.channels_last and x.dim() == 4:
                x = x.contiguous(memory_format=torch.channels_last)
            # a partial micro-batch is another shape: it runs eagerly, never compiled
            with self.engine.micro_step(last), self.autocast, self.stages.eager(samples != stage.micro_batch):
                out = model(x)
                loss = self.loss(out, y)
                self.engine.backward(loss * (scale.to(loss.dtype) if isinstance(scale, torch.Tensor) else scale))
            self.noise.micro_step_done(i, last, samples)
            if empty:
                model.train()
            tokens = counts[i] if counts[i] is not None else samples * (self.tokens_per_sample or 0)
            self.sums.add(loss, self.loss.predictions(out, y), y, samples, tokens)
        return size

    def _retrying(self, epoch: int, step: int) -> int:
        """_forward_backward, agreed by every rank: after a CUDA out-of-memory error on any of them, all
        halve the micro-batch for the rest of the stage and redo the step from its first micro-batch,
        with buffers, RNG and sums as before it (see microbatch.py)."""
        snapshot = microbatch.StepSnapshot(self.module, self.sums, self.comm.device)
        while True:
            try:
                size, ok = self._forward_backward(epoch, step), True
            except torch.OutOfMemoryError:
                size, ok = 0, False
            if not ok and self.comm.device.type == "cuda":
                # here, past the except: its traceback (and the failed step's tensors its frames hold) is
                # gone, so what the cache frees is really free
                torch.cuda.empty_cache()
            if self.comm.agree(ok):
                return size
            snapshot.restore()
            self.engine.discard_gradients()
            self.stages.halve(epoch, step)

    def _inject_oom(self, epoch: int, step: int, micro: int) -> bool:
        """Test hook: an out-of-memory error once at (epoch, step[, rank]), first micro-batch."""
        where = self.oom_at
        hit = (where[:2] == (epoch, step) and micro == 0 and not self._oom_fired
               and (len(where) < 3 or where[2] == self.comm.rank))
        if hit:
            self._oom_fired = True
        return hit
