"""FSDP2 (``torch.distributed.fsdp.fully_shard``) as an :class:`~launcher.engines.Engine`: each parameter
sharded over the ranks (dim 0), gathered for a module's forward and backward and resharded after.

* **Sharding**: every module of the ``distributed.fsdp.shard`` type (default: the built-in GPT's
  blocks, else none) is a unit of its own, and the root always: one all-gather per unit per forward
  (and, with ``reshard_after_forward``, again in backward: less memory, more communication).
* **Accumulation**: ``set_requires_gradient_sync(False)`` on every micro-step but the last, so one
  reduce-scatter per step, as DDP's ``no_sync``; the gradient is the mean over ranks, as DDP's.
* **Lockstep**: every forward all-gathers, so every rank runs the same number of micro-steps (a rank with
  fewer samples of a global batch runs empty ones) and of evaluation batches.
* **Precision**: ``bf16`` is ``MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)``: parameters
  gathered and computed in bf16, gradients reduced in fp32, the sharded master weights and the optimizer
  state in fp32.
* **Optimizers**: QHM, QHAdam and AdamW run their foreach kernels on the sharded (DTensor) parameters.
* **The noise scale** (:mod:`launcher.train.noise`): FSDP reduce-scatters each unit's gradient inside
  backward, so this rank's own gradient never reaches ``.grad``. The reduce-scatter is FSDP's own, called
  through a :class:`MeasuredReduceScatter` that first takes the norm of its input (this rank's unsharded
  gradient of the unit, zero-padded: its norm is the gradient's); the reduced shards' squares, summed
  over ranks (one 0-d all-reduce per step), are the global batch's. The update is untouched.
* **Checkpoints**: ``torch.distributed.checkpoint`` (DCP) writes the sharded model and optimizer state,
  each rank its own files, in parallel, into the manager's atomic folder (which checksums them); DCP
  reshards on load, so a checkpoint of 2 processes resumes on 1 or 3. The final model is the full
  (unsharded) state dict, gathered onto rank 0.
"""
from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path

import torch

from launcher import models
from launcher.engines import refuse_deepspeed_config, refuse_outside_lockstep
from launcher.errors import RecipeError, UserError

try:    # FSDP's reduce-scatter as a class a module can be handed (a recent torch; pyproject allows 2.6)
    from torch.distributed.fsdp._fully_shard._fsdp_collectives import DefaultReduceScatter, _get_gradient_divide_factors
except ImportError:
    DefaultReduceScatter = None

FOLDER = "fsdp"


def can_measure_noise() -> bool:
    """Whether this torch's FSDP takes a custom reduce-scatter (what the noise scale reads through)."""
    from torch.distributed.fsdp import FSDPModule
    return DefaultReduceScatter is not None and hasattr(FSDPModule, "set_custom_reduce_scatter")


class MeasuredReduceScatter(DefaultReduceScatter or object):
    """FSDP's default reduce-scatter (``FSDPModule.set_custom_reduce_scatter``), which first appends the
    norm of its input to ``norms``: this rank's gradient of one unit before the reduce. Where FSDP
    divided the input before calling (a reduce dtype other than fp32/bf16: fp64 here) the norm is taken
    back to the undivided one, with FSDP's own rule for that factor."""

    def __init__(self, norms: list):
        super().__init__()
        self.norms = norms

    def __call__(self, output_tensor, input_tensor, group, op, async_op=False):
        predivided = _get_gradient_divide_factors(group, None, input_tensor.dtype, input_tensor.device.type)[0]
        norm = torch.linalg.vector_norm(input_tensor)
        if predivided not in (None, 1):
            norm = norm * predivided
        if input_tensor.is_cuda:      # made on FSDP's reduce-scatter stream, read on the default one
            norm.record_stream(torch.cuda.default_stream(input_tensor.device))
        self.norms.append(norm)
        return super().__call__(output_tensor, input_tensor, group, op, async_op)


def check_recipe(r) -> None:
    refuse_outside_lockstep(r, "distributed.engine fsdp")
    rule = r.distributed.fsdp.shard
    if rule is not None and not (isinstance(rule, str) and rule.isidentifier() or
                                 isinstance(rule, list) and rule and all(isinstance(x, str) and x.isidentifier()
                                                                         for x in rule)):
        raise RecipeError(f"distributed.fsdp.shard: {rule!r} is not valid; allowed: a module class name, e.g. Block, "
                          "or a list of them")
    refuse_deepspeed_config(r)


def preflight(recipe, check_data: bool, build_model) -> None:
    """distributed.fsdp.shard must name module classes the model has (else FSDP would shard the root only)."""
    if not (recipe.distributed.fsdp.shard and check_data):
        return
    names = {type(m).__name__ for m in build_model().modules()}
    missing = [t for t in shard_types(recipe) if t not in names]
    if missing:
        raise UserError(f"distributed.fsdp.shard: {recipe.distributed.fsdp.shard!r} names no module of the model "
                        f"({', '.join(missing)}); allowed: a module class it has ({', '.join(sorted(names)[:12])})")


def move_refusal(distributed: dict, optimizer: dict) -> str | None:
    return None                          # DCP reshards on load


def noise_refusal(recipe, world: int) -> str | None:
    if world == 1:
        return ("FSDP on one process: accumulation keeps the step's gradient in FSDP's unsharded buffers until "
                "the last micro-batch, so .grad holds one batch size per step")
    if not can_measure_noise():
        return (f"this torch's FSDP ({torch.__version__}) has no set_custom_reduce_scatter, through which "
                "a rank's own gradient is read before the reduce")
    return None


def prepare(recipe, module: torch.nn.Module, comm) -> torch.nn.Module:
    """Sharded before the optimizer is built: it steps the shards (DTensors)."""
    return shard(recipe, module, comm)


def build(recipe, module, optimizer, comm, first_stage, reads_local_gradients: bool) -> "FSDPEngine":
    return FSDPEngine(module, optimizer, comm, clip=recipe.optimizer.clip_grad_norm)


def shard_types(recipe) -> tuple[str, ...]:
    """The class names of the modules that are FSDP units of their own."""
    rule = recipe.distributed.fsdp.shard
    if rule:
        return tuple(rule) if isinstance(rule, list) else (rule,)
    return models.shard_units(recipe.model)


def shard(recipe, module: torch.nn.Module, comm) -> torch.nn.Module:
    """``module`` with ``fully_shard`` applied: each module of the shard rule's types, then the root.
    A rule that names no module of the model is one line (it would shard nothing but the root)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    policy = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
              if recipe.precision == "bf16" else MixedPrecisionPolicy())
    reshard = recipe.distributed.fsdp.reshard_after_forward
    types = shard_types(recipe)
    units = [m for m in module.modules() if type(m).__name__ in types and m is not module]
    if recipe.distributed.fsdp.shard and not units:
        found = sorted({type(m).__name__ for m in module.modules()})
        raise UserError(f"distributed.fsdp.shard: {recipe.distributed.fsdp.shard!r} names no module of the model; "
                        f"allowed: a module class it has ({', '.join(found[:12])})")
    for unit in reversed(units):                 # innermost first
        fully_shard(unit, mp_policy=policy, reshard_after_forward=reshard)
    fully_shard(module, mp_policy=policy, reshard_after_forward=reshard)
    return module


class FSDPEngine:
    checkpoint_scope = "files"
    lockstep = True                      # every forward is a collective: ranks run the same micro-steps

    def __init__(self, module: torch.nn.Module, optimizer: torch.optim.Optimizer, comm, clip: float | None = None):
        """``module``: already sharded (:func:`shard`; the optimizer was built on its DTensors)."""
        self.module = self.model = module
        self.optimizer, self.comm, self.clip, self.clipped = optimizer, comm, clip, None
        self.probe, self._local_norms, self._last = None, [], False

    def measure_noise(self, probe) -> None:
        """Each unit's reduce-scatter takes the norm of this rank's gradient before reducing it; the last
        micro-step's backward hands those and the reduced gradient's norm to the probe."""
        from torch.distributed.fsdp import FSDPModule
        self.probe, comm = probe, MeasuredReduceScatter(self._local_norms)
        for unit in self.module.modules():
            if isinstance(unit, FSDPModule):
                unit.set_custom_reduce_scatter(comm)

    def set_stage(self, micro_batch: int, accum: int) -> None:
        """Nothing to do: the loop decides where a step's micro-batches end."""

    def micro_step(self, last: bool):
        self.module.set_requires_gradient_sync(last)
        self._last = last
        if last:
            self._local_norms.clear()
        return nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()
        if self.probe is not None and self._last:   # every unit reduced: on every rank (lockstep), one all-reduce
            self.probe.record_norms(tuple(self._local_norms), (self.gradient_norm(),))

    def step(self) -> None:
        if self.clip is not None:        # DTensor gradients: the norm over every rank's shards, exact
            norm = torch.nn.utils.clip_grad_norm_([p for p in self.module.parameters() if p.grad is not None],
                                                  self.clip, foreach=True)
            self.clipped = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def discard_gradients(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def gradient_norm(self) -> torch.Tensor | None:
        """||g|| of this step's reduced gradient: the sum of the shards' squares, all-reduced."""
        grads = [p.grad.to_local() for p in self.module.parameters() if p.grad is not None]
        if not grads:
            return None
        square = torch.stack([g.double().pow(2).sum() for g in grads]).sum()
        return self.comm.all_reduce_sum(square).sqrt()

    def close(self) -> None:
        """Nothing of ours hooks into FSDP."""

    def full_state_dict(self) -> dict:
        """The unsharded model, gathered onto rank 0 (a collective: every rank calls it; the others get {})."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        return get_model_state_dict(self.module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    # checkpoints: DCP writes the shards, each rank its own, into the manager's folder
    def _state(self) -> dict:
        from torch.distributed.checkpoint.state_dict import get_state_dict
        model, optim = get_state_dict(self.module, self.optimizer)
        return {"model": model, "optimizer": optim}

    def save_files(self, folder: Path) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.api import CheckpointException
        state = self._state()
        try:
            dcp.save(state, checkpoint_id=str(Path(folder) / FOLDER))
        except CheckpointException as exc:
            raise dcp_failure(exc, Path(folder) / FOLDER, state) from None

    def check_files(self, folder: Path) -> None:
        """DCP's metadata is there and readable (the manager has checked every file's size and hash)."""
        from torch.distributed.checkpoint import FileSystemReader
        FileSystemReader(str(Path(folder) / FOLDER)).read_metadata()

    def load_files(self, folder: Path) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import set_state_dict
        state = self._state()
        dcp.load(state, checkpoint_id=str(Path(folder) / FOLDER))       # resharded onto this world size
        set_state_dict(self.module, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])


def dcp_failure(exc, where: Path, state: dict) -> Exception:
    """DCP's CheckpointException (a BaseException: it went past every handler, 183 lines of each rank's
    traceback on stderr, and no failed.json) as one of ours: DiskFull where a rank's write found no room
    (or the disk has less than this rank's shards), else RunFailed naming the first rank's error."""
    import shutil
    from launcher.errors import DiskFull, RunFailed, disk_full, one_line
    from launcher.run.checkpoint import tensor_bytes
    failures = [failure for failure, _ in getattr(exc, "failures", {}).values()]
    needed = tensor_bytes(state)
    try:
        short = shutil.disk_usage(where.parent).free < needed
    except OSError:
        short = False
    if short or any(disk_full(f) or "No space left" in str(f) for f in failures):
        full = DiskFull(where.parent / f"{where.name} shards (DCP)", needed)      # the free space as it was
        shutil.rmtree(where, ignore_errors=True)          # the shards written: room for failed.json
        return full
    first = failures[0] if failures else exc
    return RunFailed(f"FSDP checkpoint {where.parent.name}: {type(first).__name__}: {one_line(first)}")


def checkpoint_model(folder: Path, replicated: dict) -> dict:
    """The whole model in one of this engine's checkpoints: DCP's shards of every rank, consolidated on the
    host by torch's own offline converter (dcp_to_torch_save), the model's part of it."""
    import tempfile

    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
    with tempfile.TemporaryDirectory(prefix="qhm-export-") as tmp:
        whole = Path(tmp) / "whole.pt"
        dcp_to_torch_save(str(Path(folder) / FOLDER), str(whole))
        return torch.load(whole, map_location="cpu", weights_only=True)["model"]
