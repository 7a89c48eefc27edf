"""torch DDP as an :class:`~launcher.engines.Engine`: replicated, so it reads the noise scale from each
rank's gradient and its checkpoints load on any world size."""
from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path

import torch
from torch.autograd import Variable
from torch.nn.parallel import DistributedDataParallel as DDP

from launcher.engines import refuse_deepspeed_config


def check_recipe(r) -> None:
    refuse_deepspeed_config(r)


def preflight(recipe, check_data: bool, build_model) -> None:
    """Nothing beyond what every engine gets checked."""


def move_refusal(distributed: dict, optimizer: dict) -> str | None:
    return None                          # every rank holds the whole state


def noise_refusal(recipe, world: int) -> str | None:
    return None


def prepare(recipe, module: torch.nn.Module, comm) -> torch.nn.Module:
    return module


def build(recipe, module, optimizer, comm, first_stage, reads_local_gradients: bool) -> "DDPEngine":
    return DDPEngine(module, optimizer, comm, explicit_reduce=recipe.distributed.max_micro_batch == "auto",
                     reads_local_gradients=reads_local_gradients, clip=recipe.optimizer.clip_grad_norm)


class _FixedBuckets(torch.nn.Module):
    """The model as DDP sees it on more than two ranks, where DDP's buckets must keep one layout for the
    whole run. DDP rebuilds its buckets after a process's first backward (in the order the gradients
    came), so a resumed process reduces its first step in the construction-time layout where the
    uninterrupted run used the rebuilt one; on three or more ranks an element's place in the flat bucket
    decides the order in which the ranks' values are added (gloo's and NCCL's rings), so the gradient
    changes in its last bits (on two, a + b = b + a: no difference). DDP never rebuilds with
    ``find_unused_parameters``; this wrapper adds the one parameter no forward uses, so DDP finds an
    unused parameter and does not warn at every rank that the flag is not needed. Only DDP holds it:
    the optimizer, the checkpoints and the final model see the user's module."""

    def __init__(self, module: torch.nn.Module):
        super().__init__()
        self.module = module
        self.never_used = torch.nn.Parameter(torch.zeros(1, device=next(module.parameters()).device))

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)


class DDPEngine:
    """torch DDP: ``no_sync`` on all but the last micro-step, so one gradient all-reduce per step.

    With ``explicit_reduce`` every micro-step is ``no_sync`` and the gradient is all-reduced in
    :meth:`step` (one flat all-reduce, without DDP's overlap with the backward): a step that may be
    abandoned half-way (a CUDA out-of-memory error on one rank) then never leaves the other ranks
    waiting inside a collective. ``max_micro_batch: auto`` uses it."""
    checkpoint_scope = "replicated"
    lockstep = False                     # micro-steps without a collective (no_sync) may differ per rank

    def __init__(self, module: torch.nn.Module, optimizer: torch.optim.Optimizer, comm,
                 explicit_reduce: bool = False, reads_local_gradients: bool = False, clip: float | None = None):
        """``reads_local_gradients``: the noise scale reads this rank's gradient at the end of the
        synchronised backward, so ``.grad`` must not be a view of DDP's bucket (launcher.train.noise).
        ``clip``: the reduced gradient (the same on every rank) clipped to this global norm before each
        update, as clip_grad_norm_ of the whole global batch's gradient on one process."""
        self.module, self.optimizer, self.comm = module, optimizer, comm
        self.clip, self.clipped = clip, None
        distributed = torch.distributed.is_initialized()
        self.explicit_reduce = explicit_reduce and distributed
        bucket_view = not (reads_local_gradients and not self.explicit_reduce)
        fixed = distributed and comm.world > 2 and not self.explicit_reduce
        self.model = DDP(_FixedBuckets(module) if fixed else module,
                         device_ids=[comm.device.index] if comm.device.type == "cuda" else None,
                         gradient_as_bucket_view=bucket_view, find_unused_parameters=fixed) if distributed else module
        self._reduced = self._read_local = False
        self.probe, self._hook = None, None

    def measure_noise(self, probe) -> None:
        """Read the gradient before and after its all-reduce for the noise scale (launcher.train.noise):
        at the end of the synchronised backward, before DDP's reduced gradient lands in ``.grad``, or in
        the explicit reduce."""
        self.probe = probe
        if self.model is not self.module and not self.explicit_reduce:
            self._hook = probe.trainable[0].register_post_accumulate_grad_hook(self._queue_local_read)

    def full_state_dict(self) -> dict:
        """The whole model (every rank holds it)."""
        return self.module.state_dict()

    def close(self) -> None:
        """The hook goes: DDP's reducer holds the parameters from C++, so a parameter -> hook -> engine ->
        DDP cycle is one the garbage collector cannot free, and DDP would outlive its process group."""
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    def set_stage(self, micro_batch: int, accum: int) -> None:
        """DDP needs nothing: the loop decides where each step's micro-batches end."""

    def micro_step(self, last: bool):
        synced = last and not self.explicit_reduce
        self._read_local = synced            # read by the probe's hook, which only DDP with a probe has
        return nullcontext() if synced or self.model is self.module else self.model.no_sync()

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def _queue_local_read(self, param: torch.Tensor) -> None:
        """In a synchronised backward, once the first trainable parameter's gradient is complete: the
        probe's read of this rank's gradients, queued to run at backward's end before DDP's own final
        callback (which DDP queues once every gradient is complete, and which lands the reduced ones)."""
        if self._read_local:
            Variable._execution_engine.queue_callback(self.probe.read_local)

    def step(self) -> None:
        if self.explicit_reduce and not self._reduced:
            self._reduce()
        self._reduced = False
        if self.clip is not None:
            self.clipped = torch.nn.utils.clip_grad_norm_([p for p in self.module.parameters() if p.grad is not None],
                                                          self.clip, foreach=True)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self._sync_buffers_next_forward()

    def _sync_buffers_next_forward(self) -> None:
        """Buffers (batch-norm statistics) follow DDP's own rule on either path: rank 0's are broadcast at
        the first forward of every step. DDP does that after a step whose last micro-step synchronised;
        under ``explicit_reduce`` no micro-step does, so DDP would never broadcast again and each rank's
        statistics would drift apart. The flag is the one DDP's forward reads and sets."""
        if self.explicit_reduce:
            self.model.require_forward_param_sync = True

    def _reduce(self) -> None:
        """The mean gradient over ranks, as DDP's reduce gives it (a rank without data adds zeros)."""
        params = [p for p in self.module.parameters() if p.requires_grad]
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        if self.probe is not None:
            self.probe.record_local(grads)
        flat = self.comm.all_reduce_sum(torch.cat([g.reshape(-1) for g in grads]))
        flat.div_(self.comm.world)
        for p, g, chunk in zip(params, grads, torch.split(flat, [g.numel() for g in grads])):
            # into the gradient itself: its memory format stays (channels_last weights keep channels_last
            # gradients, so the optimizer's foreach kernels stay one launch per group), and no new tensor
            g.copy_(chunk.view(g.shape))
            p.grad = g
        if self.probe is not None:
            self.probe.record_reduced([p.grad for p in params])
        self._reduced = True

    def discard_gradients(self) -> None:
        """Forget a step's partial gradients (a step that is redone from its first micro-batch)."""
        self.optimizer.zero_grad(set_to_none=True)
        self._sync_buffers_next_forward()

    def gradient_norm(self) -> torch.Tensor | None:
        """||g|| of this step's reduced gradient (before the update), on the device: no sync here."""
        if self.explicit_reduce and not self._reduced:
            self._reduce()
        grads = [p.grad for p in self.module.parameters() if p.grad is not None]
        return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads))) if grads else None

    def state_dict(self) -> dict:
        return {"model": self.module.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])


def checkpoint_model(folder: Path, replicated: dict) -> dict:
    """The whole model in one of this engine's checkpoints: the replicated engine part holds it."""
    return replicated["engine"]["model"]
