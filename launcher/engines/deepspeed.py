"""DeepSpeed engine: the same loop on ZeRO 0/1/2/3, with QHM as the client optimizer.

We own the accumulation boundary. DeepSpeed's own boundary is ``(micro_steps + 1) % GAS`` and
micro_steps is never reset, so changing GAS mid-run (a new batch stage) would make the first step
after the switch span the wrong number of micro-batches. Instead the loop marks each micro-batch with
``set_gradient_accumulation_boundary(last)`` and calls ``step()`` once, after the last one; the loss is
already normalised by the global batch, so ``backward(scale_wrt_gas=False)``. The engine's batch
settings still follow the plan (``set_stage``), so its counters and logs agree with ours.

Mixed precision is torch.autocast over fp32 weights, as with DDP (DeepSpeed's bf16 mode is left off),
so both engines compute the same updates.

ZeRO-3 partitions the parameters too: each forward gathers them (a collective), so ranks run in lockstep
(a rank with a smaller share of a global batch runs empty micro-steps, evaluation gives every rank as
many batches), and the final model is gathered one parameter at a time. DeepSpeed keeps parameters
below ``stage3_param_persistence_threshold`` elements whole on every rank; only the others are gathered.

Checkpoints: DeepSpeed writes its own (partitioned) files into our atomic folder. It reads them back
with ``torch.load`` and weights_only off, which runs whatever code a crafted file carries; we replace
its checkpoint engine with one that loads ``weights_only=True``, allowing only the few DeepSpeed and
Python types its own files hold. ZeRO 1-3 partitions are per rank: on another number of processes the
checkpoint is first converted with DeepSpeed's own ``ds_to_universal`` (every parameter's fp32 weights
and optimizer moments whole), which carries Adam's state only, so only ``adamw`` can move (and under ZeRO-3 with one parameter
group only, see :func:`move_refusal`).
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import shutil
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from launcher import env, keys
from launcher.engines import refuse_outside_lockstep
from launcher.errors import RecipeError, UserError, one_line

TAG = "deepspeed"
# DeepSpeed's universal checkpoint writes each parameter's fp32 weights and Adam's two moments (exp_avg,
# exp_avg_sq) and the step, nothing else: QHM's and SGD's momentum and QHAdam's bias weights would be lost.
MOVABLE_OPTIMIZERS = ("adamw",)


# Keys of a raw DeepSpeed config that the launcher derives from the recipe: a recipe may not set them.
OWNED = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
         "zero_optimization.stage", "zero_allow_untested_optimizer", "optimizer", "scheduler", "bf16",
         "fp16", "gradient_clipping")


def check_recipe(r) -> None:
    d = r.distributed
    if r.performance.compile != "off" or r.performance.cuda_graphs:
        raise RecipeError(f"performance.compile: {r.performance.compile!r} is not valid with distributed.engine "
                          "deepspeed; allowed: off (compile and CUDA graphs are for the ddp engine)")
    if d.max_micro_batch == "auto":
        raise RecipeError("distributed.max_micro_batch: 'auto' is not valid with distributed.engine deepspeed "
                          "(its backward reduces inside DeepSpeed's engine, where a probe or a redo cannot run); "
                          "allowed: an integer >= 1, or distributed.engine ddp or fsdp")
    if d.zero_stage == 3:
        refuse_outside_lockstep(r, "DeepSpeed ZeRO-3 (distributed.zero_stage 3)")
    for key in OWNED:
        if keys.has(d.deepspeed_config, key):
            raise RecipeError(f"distributed.deepspeed_config.{key}: {keys.get(d.deepspeed_config, key)!r} is not "
                              "allowed; the launcher sets it from the recipe (schedule, precision, "
                              "distributed.zero_stage, optimizer.clip_grad_norm)")


def preflight(recipe, check_data: bool, build_model) -> None:
    check_config(recipe)


def noise_refusal(recipe, world: int) -> str | None:
    return "DeepSpeed keeps its gradients in its own partitioned buffers, out of reach of the read"


def prepare(recipe, module: torch.nn.Module, comm) -> torch.nn.Module:
    return module


def build(recipe, module, optimizer, comm, first_stage, reads_local_gradients: bool) -> "DeepSpeedEngine":
    return DeepSpeedEngine(recipe, module, optimizer, comm, first_stage.micro_batch, first_stage.accum)


def move_refusal(distributed: dict, optimizer: dict) -> str | None:
    """Why a DeepSpeed checkpoint written under ``distributed`` (the recipe's section, as a mapping) of
    ``optimizer`` cannot load on another number of processes, or None where it can: ZeRO 0 holds
    everything on every rank; adamw is converted to DeepSpeed's universal format."""
    zero_stage = distributed.get("zero_stage", 0)
    name = optimizer.get("name", "qhm")
    if zero_stage == 0:
        return None
    if name not in MOVABLE_OPTIMIZERS:
        return (f"ZeRO stage {zero_stage} partitions the optimizer state over the processes that wrote it, and "
                f"DeepSpeed's universal checkpoint, which moves it, carries Adam's state only (exp_avg, exp_avg_sq), "
                f"not {name}'s")
    two_groups = optimizer.get("weight_decay", 0.0) != 0 and not optimizer.get("weight_decay_all", False)
    if zero_stage == 3 and two_groups:
        # measured (DeepSpeed 0.19.8, CPU): after a 2 -> 1 move the parameters were 1e-3 off within 3 steps,
        # with or without weight decay in the second group; one group matched to 3e-7
        return ("ZeRO stage 3's universal load (DeepSpeed's) restores a second parameter group wrongly, and adamw "
                "has two here (weight decay on matrices, none on biases, norms and embeddings): use "
                "optimizer.weight_decay_all true or weight_decay 0 for a ZeRO-3 run that must move")
    return None


def build_config(recipe, micro: int, accum: int, world: int, parameters: int | None = None) -> dict:
    """DeepSpeed's config for a stage (``parameters``: the model's element count, where known)."""
    cfg = json.loads(json.dumps(recipe.distributed.deepspeed_config))
    zero = cfg.setdefault("zero_optimization", {})
    zero["stage"] = recipe.distributed.zero_stage
    if zero["stage"] == 3 and parameters:
        # ZeRO-3 allocates its gradient bucket whole, at reduce_bucket_size elements (default 5e8: 1.9 GiB in
        # fp32, measured in benchmarks/fsdp_memory.py): never more than the model's parameters
        zero.setdefault("reduce_bucket_size", min(500_000_000, parameters))
    clip = recipe.optimizer.clip_grad_norm
    cfg.update(train_micro_batch_size_per_gpu=micro, gradient_accumulation_steps=accum,
               train_batch_size=micro * accum * world, zero_allow_untested_optimizer=True,
               bf16={"enabled": False}, gradient_clipping=float(clip or 0.0))
    cfg.setdefault("steps_per_print", 1 << 30)
    cfg.setdefault("wall_clock_breakdown", False)
    # No host sync per micro-batch: DeepSpeed's throughput timer (on and synchronised by default) calls
    # synchronize() in every forward and step, and ZeRO 1/2 computes the gradient norm (a bool() on the
    # device) every step, for clipping, which the launcher keeps off. The user's config may turn either on.
    throughput = cfg.setdefault("timers", {}).setdefault("throughput", {})
    throughput.setdefault("enabled", False)
    throughput.setdefault("synchronized", False)
    if zero["stage"] in (1, 2) and knows_compute_grad_norm():
        zero.setdefault("compute_grad_norm", bool(clip))    # clipping needs the norm; without it, no sync
    return cfg


def knows_compute_grad_norm() -> bool:
    """Whether this DeepSpeed's ZeRO config has ``compute_grad_norm`` (0.19 on): an older one refuses
    the key ("Extra inputs are not permitted")."""
    try:
        from deepspeed.runtime.zero.config import DeepSpeedZeroConfig
    except ImportError:
        return False
    return "compute_grad_norm" in getattr(DeepSpeedZeroConfig, "model_fields", {})


def check_config(recipe) -> None:
    """DeepSpeed's own validation of the config the workers will use (its batch fields are the launcher's,
    set per stage), in the launcher: a bad ``deepspeed_config`` is one line before any worker starts, not a traceback from each
    rank 30 s later."""
    zero = recipe.distributed.deepspeed_config.get("zero_optimization", {})
    if not isinstance(zero, dict):
        raise UserError(f"distributed.deepspeed_config.zero_optimization: {zero!r} is not valid; allowed: a mapping "
                        "(DeepSpeed's zero_optimization section; the stage is distributed.zero_stage)")
    from deepspeed.runtime.config import DeepSpeedConfig
    try:    # as one process: DeepSpeed reads the world size from the process group, which the launcher has not
        DeepSpeedConfig(build_config(recipe, 1, 1, 1))
    except Exception as exc:  # DeepSpeed's own complaint, in one line
        raise UserError(f"distributed.deepspeed_config: DeepSpeed refuses it: {type(exc).__name__}: "
                        f"{one_line(exc)[:400]}") from exc


def _safe_checkpoint_engine():
    """DeepSpeed's torch checkpoint engine, loading with weights_only=True."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    class WeightsOnlyCheckpointEngine(TorchCheckpointEngine):
        def load(self, path: str, map_location=None):
            return load_deepspeed_file(path, map_location)

    return WeightsOnlyCheckpointEngine()


def load_deepspeed_file(path, map_location="cpu"):
    """One of DeepSpeed's checkpoint files, weights_only: tensors, containers and its few plain types."""
    with torch.serialization.safe_globals(_deepspeed_safe_globals()):
        return torch.load(path, map_location=map_location, weights_only=True)


def _deepspeed_safe_globals() -> list:
    """The types DeepSpeed's own ZeRO 0/1/2 files hold besides tensors and containers (each one found
    necessary by loading them): plain data classes, no code runs when they are rebuilt."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address
    return [LossScaler, ZeroStageEnum, fragment_address]


class DeepSpeedEngine:
    checkpoint_scope = "files"

    def __init__(self, recipe, module, optimizer, comm, micro: int, accum: int):
        import logging
        # DeepSpeed's op builder imports torch's extension builder, which warns on every rank of a CPU host
        # that it found no CUDA runtime: lines above the one a failure prints
        logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
        import deepspeed
        self.module, self.world, self.comm = module, comm.world, comm
        # ZeRO-2 reduce-scatters every micro-step's gradient into the partitions (a collective per backward)
        # and ZeRO-3 gathers the parameters in every forward: ranks run as many micro-steps. ZeRO 0/1 reduce
        # at the accumulation boundary only.
        self.stage = recipe.distributed.zero_stage
        self.lockstep = self.stage >= 2
        self.model, self.optimizer, _, _ = deepspeed.initialize(
            model=module, optimizer=optimizer,
            config=build_config(recipe, micro, accum, comm.world, sum(p.numel() for p in module.parameters())),
            dist_init_required=False)
        self.model.checkpoint_engine = _safe_checkpoint_engine()
        self._backwards = 0
        self._step_log = env.step_log() if comm.is_main else None
        self.clip = recipe.optimizer.clip_grad_norm

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

    @property
    def clipped(self) -> torch.Tensor | None:
        """optimizer.clip_grad_norm: the norm DeepSpeed's own gradient_clipping measured at the last step
        (read on demand: a log point's, not every step's)."""
        norm = self.model.get_global_grad_norm() if self.clip is not None else None
        return None if norm is None else torch.as_tensor(float(norm))

    def gradient_norm(self):
        """Not offered: ZeRO partitions the gradient (steps.jsonl leaves grad_norm out)."""
        return None

    def discard_gradients(self) -> None:
        self.model.zero_grad()
        self._backwards = 0

    def full_state_dict(self) -> dict:
        """The whole model: under ZeRO 0/1/2 every rank holds it; under ZeRO-3 each partitioned parameter
        is gathered in turn (a collective: every rank calls it) and copied to the host on rank 0 (the others
        get {}), so no rank ever holds more than one whole parameter besides its shards."""
        if self.stage < 3:
            return self.module.state_dict()
        from deepspeed.runtime.zero import GatheredParameters
        whole = {}
        for name, tensor in self.module.state_dict(keep_vars=True).items():
            partitioned = hasattr(tensor, "ds_id")
            with GatheredParameters([tensor]) if partitioned else nullcontext():
                if self.comm.is_main:
                    whole[name] = tensor.detach().to("cpu", copy=True)
        return whole

    def close(self) -> None:
        """Nothing of ours hooks into DeepSpeed's engine."""

    # checkpoints: DeepSpeed writes model and (partitioned) optimizer state itself, into our folder
    def save_files(self, folder: Path) -> None:
        try:
            self.model.save_checkpoint(str(folder), tag=TAG, save_latest=False)
        except (OSError, RuntimeError) as exc:
            # torch.save's writer reports a full disk as a RuntimeError ("write(): fd 20 failed with No space
            # left on device"): the same line and failed.json as our own files get
            from launcher.errors import DiskFull, disk_full
            if not (disk_full(exc) or "No space left on device" in str(exc)):
                raise
            shutil.rmtree(Path(folder) / TAG, ignore_errors=True)      # what was written: room for failed.json
            raise DiskFull(Path(folder) / f"{TAG} (DeepSpeed's shards)", None) from None

    def check_files(self, folder: Path) -> None:
        """Load every DeepSpeed file of the checkpoint the safe way, here, before DeepSpeed's own load
        (which has collectives inside: a file that fails there on one rank would leave the others
        waiting); whatever fails here makes the checkpoint "not valid" on every rank."""
        for path in sorted((Path(folder) / TAG).glob("*.pt")):
            load_deepspeed_file(path)

    def load_files(self, folder: Path) -> None:
        saved_world = len(list((Path(folder) / TAG).glob("zero_pp_rank_*_optim_states.pt")))
        if self.stage == 0 or saved_world in (0, self.world):
            self._load(Path(folder))
            return
        started = time.monotonic()
        universal = self._to_universal(Path(folder))
        if self.comm.is_main:
            print(f"[qhm-launch] checkpoint {Path(folder).name}: the ZeRO stage {self.stage} partitions of {saved_world} "
                  f"processes converted for {self.world} (DeepSpeed's ds_to_universal, {time.monotonic() - started:.1f} s)",
                  flush=True)
        self.model._config.load_universal_checkpoint = True      # read at load time only
        try:
            self._load(universal)
        finally:
            self.model._config.load_universal_checkpoint = False
        self.comm.barrier()
        if self.comm.is_main:
            shutil.rmtree(universal, ignore_errors=True)

    def _load(self, folder: Path) -> None:
        path, _ = self.model.load_checkpoint(str(folder), tag=TAG, load_optimizer_states=True,
                                             load_lr_scheduler_states=False)
        if path is None:
            raise UserError(f"checkpoint {folder}: DeepSpeed could not load tag {TAG!r}")

    def _to_universal(self, folder: Path) -> Path:
        """The checkpoint converted by DeepSpeed's ds_to_universal into ``.tmp-universal-step-N`` beside it
        (rank 0 converts, every rank waits; a ``.tmp-`` folder left by a kill is removed by the next save).
        Serial (one worker): forking a process that holds a process group, or CUDA, is not safe."""
        out = folder.parent / f".tmp-universal-{folder.name}"
        error = None
        if self.comm.is_main:
            shutil.rmtree(out, ignore_errors=True)
            from deepspeed.checkpoint import ds_to_universal
            args = argparse.Namespace(input_folder=str(folder / TAG), output_folder=str(out / TAG),
                                      num_extract_workers=1, num_merge_workers=1, keep_temp_folder=False,
                                      strict=True, inject_missing_state=True)
            chatter = io.StringIO()
            try:
                with contextlib.redirect_stdout(chatter), contextlib.redirect_stderr(chatter):
                    ds_to_universal.main(args)
            except Exception as exc:  # noqa: BLE001 - reported on every rank, in one line
                error = f"{type(exc).__name__}: {one_line(exc)[:300]}"
        error = self.comm.broadcast(error)
        if error:
            raise RuntimeError(f"checkpoint {folder}: DeepSpeed's universal conversion (ds_to_universal) failed: {error}")
        return out


def checkpoint_model(folder: Path, replicated: dict) -> dict:
    """The whole model in one of this engine's checkpoints: under ZeRO 1-3 its fp32 weights gathered from the
    partitions by DeepSpeed's own zero_to_fp32; without ZeRO (stage 0) the module's state in its model file.
    zero_to_fp32 unpickles in full and memory-maps, which needs torch's zip format (DeepSpeed writes the legacy
    one, whose write on a full disk is the one-line error): it reads copies, each file loaded weights-only here
    first and saved again in the zip format."""
    tag = Path(folder) / TAG
    if not any(tag.glob("*optim_states.pt")):
        return load_deepspeed_file(tag / "mp_rank_00_model_states.pt")["module"]
    import contextlib
    import io
    import tempfile

    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    with tempfile.TemporaryDirectory(prefix="qhm-export-") as tmp:
        (Path(tmp) / TAG).mkdir()
        for path in tag.glob("*_states.pt"):
            torch.save(load_deepspeed_file(path), Path(tmp) / TAG / path.name)
        with contextlib.redirect_stdout(io.StringIO()):           # its progress report is not ours to print
            return dict(get_fp32_state_dict_from_zero_checkpoint(tmp, tag=TAG))
