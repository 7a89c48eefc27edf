"""The process group, seen through the few collectives the runtime needs."""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


def in_worker_env() -> bool:
    """True under torchrun (or any launcher that sets RANK and WORLD_SIZE)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


# torch 2.14 names it all_gather_single and warns (FutureWarning, above a failure's one line) at the old name,
# which is all an older torch has
GATHER = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


@dataclass
class Comm:
    rank: int
    world: int
    local_rank: int
    device: torch.device
    control: object = None          # a gloo group for small CPU messages that must never touch the device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def gather(self, obj):
        """obj from every rank, as a list on rank 0 (None elsewhere)."""
        if self.world == 1:
            return [obj]
        out = [None] * self.world if self.rank == 0 else None
        dist.gather_object(obj, out, dst=0)
        return out

    def broadcast(self, obj):
        """rank 0's obj on every rank."""
        if self.world == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def all_reduce_sum_later(self, tensor: torch.Tensor, *also: torch.Tensor | None):
        """Start summing ``tensor`` over ranks without waiting for it; returns a function that gives the
        sum, and ``also`` (tensors of this rank, or None), on the host. Called a while later (the next stop
        check) it finds the all-reduce long done: no step waits for the other ranks or for the device.
        On a GPU the all-reduce is ordered on the stream and the host copies are asynchronous, read after
        their event; on a CPU (gloo) the all-reduce runs on gloo's own thread until waited for.

        On more than two ranks the sum is taken in rank order from an all-gather: an all-reduce adds an
        element's values in an order set by its place in the tensor (the ring's chunks), and here the
        place depends on how many rows were queued, which depends on timing; two ranks' a + b is exact."""
        work, total = self._sum_started(tensor)
        if self.device.type != "cuda":
            def read():
                if work is not None:
                    work.wait()
                return (total(), *also)
            return read
        if work is not None:
            work.wait()                  # NCCL: the stream waits for the collective, the host does not
        copies = [t if t is None else t.to("cpu", non_blocking=True) for t in (total(), *also)]
        done = torch.cuda.Event()
        done.record()

        def read_cuda():
            done.synchronize()
            return tuple(copies)
        return read_cuda

    def _sum_started(self, tensor: torch.Tensor):
        """(the collective's work or None, a function giving the sum once it is done): see
        :meth:`all_reduce_sum_later`."""
        if self.world == 1:
            return None, lambda: tensor
        if self.world == 2:
            return dist.all_reduce(tensor, op=dist.ReduceOp.SUM, async_op=True), lambda: tensor
        parts = torch.empty(self.world * tensor.numel(), dtype=tensor.dtype, device=tensor.device)
        work = GATHER(parts, tensor.reshape(-1).contiguous(), async_op=True)

        def total() -> torch.Tensor:
            ranks = parts.view(self.world, *tensor.shape)
            out = ranks[0].clone()
            for rank in ranks[1:]:
                out += rank
            return out
        return work, total

    def all_reduce_min(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            dist.all_reduce(tensor, op=dist.ReduceOp.MIN)
        return tensor

    def agree(self, ok: bool) -> bool:
        """True on every rank when ``ok`` is True on every rank (a blocking all-reduce on the CPU group)."""
        if self.world == 1:
            return ok
        box = torch.tensor([1.0 if ok else 0.0])
        dist.all_reduce(box, op=dist.ReduceOp.MIN, group=self.control)
        return bool(box[0] > 0)

    def all_reduce_max_async(self, cpu_tensor: torch.Tensor):
        """Start an all-reduce (max) of a CPU tensor on the control group; returns the work to wait on."""
        return dist.all_reduce(cpu_tensor, op=dist.ReduceOp.MAX, group=self.control, async_op=True)

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()


# what gloo's and NCCL's errors say when another process of the group is gone (its sockets closed)
PEER_GONE = ("Connection reset by peer", "Connection closed by peer", "Broken pipe", "Connection refused",
             "NCCL communicator was aborted", "remote process exited")


def peer_lost(exc: BaseException) -> bool:
    """Whether ``exc`` is a collective (or the store) failing because another process of the run is gone:
    torch.distributed's own error types, or a RuntimeError in the words gloo and NCCL use for it."""
    while exc is not None:
        if isinstance(exc, dist.DistError) or (isinstance(exc, (RuntimeError, ConnectionError))
                                               and any(words in str(exc) for words in PEER_GONE)):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def init() -> Comm:
    """Join the process group torchrun describes: CUDA -> nccl, one device per local rank; else gloo."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        if local_rank >= torch.cuda.device_count():      # started without the launcher's check
            from launcher.errors import UserError
            raise UserError(f"distributed.nproc_per_node: local rank {local_rank} has no GPU of its own "
                            f"({torch.cuda.device_count()} visible); allowed: at most one process per visible GPU")
        torch.cuda.set_device(local_rank)
        device, backend = torch.device("cuda", local_rank), "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    control = None
    if in_worker_env() and not dist.is_initialized():
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=30),
                                device_id=device if backend == "nccl" else None)
    if world > 1:
        control = dist.new_group(backend="gloo")
    return Comm(rank=rank, world=world, local_rank=local_rank, device=device, control=control)
