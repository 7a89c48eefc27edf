"""One worker's parts, built from a recipe in one place: the dataset, the module (dtype, channels_last,
SyncBN), the optimizer, the engine, the loss, the data order and batches, the state, and the checkpoint
manager with every stateful part registered once. The :class:`~launcher.train.trainer.Trainer` only
loops over what this returns, so a test can build the parts of a real rank in-process."""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

import torch

import qhm
from launcher import data as data_mod
from launcher import engines
from launcher import models as launcher_models
from launcher.data import order
from launcher.run.checkpoint import CheckpointManager
from launcher.run.folder import RunFolder
from launcher.train import adaptive, losses, models, noise, planning, preflight
from launcher.train.comm import Comm
from launcher.train.models import DTYPES
from launcher.train.state import EpochSums, RankRNG, TrainState

if TYPE_CHECKING:
    from launcher.config import Recipe



@dataclass
class Parts:
    recipe: Recipe
    comm: Comm
    folder: RunFolder
    dataset: data_mod.Dataset
    plan: planning.Plan                     # every stage's split as planned (Stages may re-split or re-plan)
    module: torch.nn.Module               # the bare model (saved, evaluated)
    engine: engines.Engine
    loss: losses.Loss
    sampler: order.GlobalBatchSampler
    batches: Any                          # InMemoryBatches or StreamedBatches
    autocast: contextlib.AbstractContextManager
    state: TrainState
    sums: EpochSums
    noise: noise.NoiseProbe
    growth: adaptive.BatchGrowth | None   # schedule.batch.kind adaptive: the batch decisions
    rng: RankRNG
    checkpoints: CheckpointManager
    log: Callable[..., None]
    noise_windows: noise.NoiseWindows | None = None   # the step rows' B_simple over enough windows
    flops_per_token: float | None = None  # training FLOPs per token of the model, where its family counts them

    def close(self) -> None:
        """What must end before the process group does (the engine's hooks), and the data workers (now,
        while their queues are alive: see StreamedSplit.close). Safe to call twice."""
        self.engine.close()
        self.batches.close()
        self.dataset.close()


def param_groups(module: torch.nn.Module, o) -> list[dict]:
    """The Adam family's groups: weight decay on matrices (weights of dimension >= 2), none on biases,
    norms and embeddings (tied ones included), unless ``weight_decay_all``; one group without decay."""
    params = [p for p in module.parameters() if p.requires_grad]
    if o.weight_decay_all or o.weight_decay == 0:
        return [{"params": params, "weight_decay": o.weight_decay}]
    embedded = {id(m.weight) for m in module.modules() if isinstance(m, torch.nn.Embedding)}
    decayed = [p for p in params if p.dim() >= 2 and id(p) not in embedded]
    kept = [p for p in params if p.dim() < 2 or id(p) in embedded]
    return [g for g in ({"params": decayed, "weight_decay": o.weight_decay}, {"params": kept, "weight_decay": 0.0})
            if g["params"]]


def build_optimizer(recipe: Recipe, module, plan: planning.Plan) -> torch.optim.Optimizer:
    """The optimizer at its first step's hyper-parameters (the loop writes each stage's or step's)."""
    first, kernel, o = plan.stages[0], recipe.optimizer.kernel, recipe.optimizer
    if o.name == "adamw":                      # torch's: fused on CUDA, foreach elsewhere (or the loop)
        cuda = next(module.parameters()).device.type == "cuda"
        return torch.optim.AdamW(param_groups(module, o), lr=first.lr, betas=tuple(o.betas), eps=o.eps,
                                 foreach=kernel == "foreach" and not cuda, fused=cuda and kernel == "foreach" or None)
    if o.name == "qhadam":
        return qhm.QHAdam(param_groups(module, o), lr=first.lr, betas=tuple(o.betas), nus=tuple(o.nus),
                          weight_decay=o.weight_decay, decouple_weight_decay=o.decouple_weight_decay is not False,
                          eps=o.eps, foreach=kernel == "foreach")
    return qhm.QHM(module.parameters(), lr=first.lr, beta=first.beta, gamma=first.gamma,
                   weight_decay=recipe.optimizer.weight_decay, foreach=kernel == "foreach",
                   compiled=kernel in ("compiled", "fused") or None)


def autocast_for(recipe: Recipe, device: torch.device):
    """bf16: torch.autocast around forward and loss; otherwise nothing."""
    return (torch.autocast(device.type, dtype=torch.bfloat16) if recipe.precision == "bf16"
            else contextlib.nullcontext())


def apply_tf32(setting: bool | None) -> None:
    """performance.tf32: None leaves torch's defaults (fp32 matmuls, TF32 cuDNN convolutions: what the
    paper's code ran); True or False sets both. Flags only: nothing changes on a CPU."""
    if setting is not None:
        torch.backends.cuda.matmul.allow_tf32 = setting
        torch.backends.cudnn.allow_tf32 = setting


CUBLAS_DETERMINISTIC = ":4096:8"     # cuBLAS's fixed workspace, the setting torch's reproducibility notes name


def apply_determinism(on: bool) -> None:
    """performance.deterministic: deterministic kernels only (an op without one raises, naming itself),
    cuDNN's deterministic algorithms without autotuning, and cuBLAS's fixed workspace (read when cuBLAS
    starts: the launcher also puts it in the workers' environment). Set both ways, so a process that
    trains one recipe after another (the test pool, a benchmark) carries nothing over."""
    torch.use_deterministic_algorithms(on)
    torch.backends.cudnn.deterministic = on
    if on:
        torch.backends.cudnn.benchmark = False
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_DETERMINISTIC)


def load_data(recipe: Recipe, comm: Comm, dtype: torch.dtype) -> data_mod.Dataset:
    """The recipe's data on this rank's device; with ``download``, rank 0 downloads first, the others wait."""
    if comm.is_main and recipe.data.download:
        data_mod.load(recipe.data, torch.device("cpu"), dtype, is_first=True)
    if comm.is_main:
        data_mod.prepare(recipe.data)
        data_mod.keep_tokenizer(recipe.data, recipe.folder.tokenizer)
    comm.barrier()
    dataset = data_mod.load(recipe.data, comm.device, dtype, is_first=False)
    budget = recipe.eval_samples()            # eval.max_batches / max_tokens: a fixed subset, spread evenly
    dataset.test = data_mod.evaluation_subset(dataset.test, budget)
    dataset.validation = data_mod.evaluation_subset(dataset.validation, budget)
    return dataset


def build_module(recipe: Recipe, dataset: data_mod.Dataset, comm: Comm, dtype: torch.dtype) -> torch.nn.Module:
    """The model with the same initial weights on every rank, in the recipe's dtype and memory format;
    batch norm synchronised over ranks when asked (CUDA only)."""
    module = models.build(recipe.model, dataset.shape, dataset.num_classes, recipe.seed, dtype).to(comm.device)
    if recipe.performance.activation_checkpointing:
        launcher_models.checkpoint_activations(recipe.model, module)
    if recipe.performance.deterministic:
        models.deterministic_pooling(module)
    if recipe.performance.channels_last:
        module = module.to(memory_format=torch.channels_last)
    if recipe.distributed.batch_norm == "sync" and comm.world > 1:
        module = torch.nn.SyncBatchNorm.convert_sync_batchnorm(module)
    return module


def upgrade_v1(replicated: dict, per_rank: list) -> tuple[dict, list]:
    """Checkpoint layout 1 -> 2: the W&B id moves into the train state, the running sums get their own
    part (per rank: loss, correct; samples as an integer), the data order is recorded (v1 had none)."""
    train = dict(replicated["train"], wandb_id=replicated.get("wandb_id") or "")
    new = {"engine": replicated["engine"], "train": train, "order": {"n": None, "seed": None, "version": 1}}
    if "deepspeed_tag" in replicated["engine"]:
        new["engine"] = None
    ranks = [{"rng": r["rng"], "epoch_sums": {"values": r["running"][:2].clone(), "samples": int(r["running"][2])}}
             for r in per_rank]
    return new, ranks


def build(recipe: Recipe, comm: Comm, log: Callable[..., None] = print) -> Parts:
    """Every part of one rank's run of ``recipe`` (collective: every rank calls it)."""
    log = log if comm.is_main else (lambda *a, **k: None)
    preflight.check_devices(recipe, comm.world, comm.device.type == "cuda")
    apply_tf32(recipe.performance.tf32)
    apply_determinism(recipe.performance.deterministic)
    dtype, folder = DTYPES[recipe.precision], recipe.folder
    dataset = load_data(recipe, comm, dtype)
    n = len(dataset.train)
    planned = planning.plan(recipe, n, comm.world)
    module = build_module(recipe, dataset, comm, dtype)
    noise_kind, why_not = noise.source(recipe, comm.world, any(s.accum > 1 for s in planned.stages))
    flops = launcher_models.flops_per_token(recipe.model, module)   # counted on the whole model, before sharding
    module = engines.prepare(recipe, module, comm)      # FSDP: sharded, for the optimizer to step the shards
    engine = engines.build(recipe, module, build_optimizer(recipe, module, planned), comm, planned.stages[0],
                           reads_local_gradients=noise_kind == noise.RANKS)
    loss = losses.from_recipe(recipe.loss, losses.per_token(recipe))
    noise_probe = build_noise_probe(recipe, engine, module, comm, noise_kind, why_not, log, n)
    sampler = order.GlobalBatchSampler(n, recipe.seed, comm.device, reorder=planning.branch_reorder(recipe, planned))
    state, rng = TrainState(), RankRNG(recipe.seed, comm.rank, comm.device)
    sums = EpochSums(comm.device, count_tokens=loss.per_token)
    checkpoints = CheckpointManager(folder, comm, recipe.checkpoint.keep, log)
    for name, part, scope in (("engine", engine, engine.checkpoint_scope), ("train", state, "replicated"),
                              ("order", sampler, "replicated"), ("rng", rng, "per_rank"),
                              ("epoch_sums", sums, "per_rank")):
        checkpoints.register(name, part, scope)
    growth = adaptive.BatchGrowth(recipe, n, comm, log) if recipe.schedule.batch.decided_during_run else None
    if growth is not None:
        checkpoints.register("batch_growth", growth, "replicated")
    noise_windows = noise.NoiseWindows(n, comm.world)
    checkpoints.register("noise_windows", noise_windows, "replicated", optional=True)
    checkpoints.register("data", data_mod.DataFingerprint(recipe.data), "replicated", optional=True)
    checkpoints.register_upgrade(1, upgrade_v1)
    return Parts(recipe=recipe, comm=comm, folder=folder, dataset=dataset, plan=planned, module=module,
                 engine=engine, loss=loss, sampler=sampler,
                 batches=dataset.batches(sampler, recipe.seed, comm), autocast=autocast_for(recipe, comm.device),
                 state=state, sums=sums, noise=noise_probe, growth=growth, rng=rng, checkpoints=checkpoints, log=log,
                 noise_windows=noise_windows, flops_per_token=flops)


def build_noise_probe(recipe: Recipe, engine, module, comm: Comm, kind, why, log, n: int | None = None) -> noise.NoiseProbe:
    """The gradient noise scale's probe (``kind``, ``why``: noise.source's answer), wired into the engine
    where several ranks measure it; where it cannot be measured (or is off), one log line says why."""
    probe = noise.NoiseProbe(kind, module, comm.world, comm.device, n)
    if kind == noise.RANKS:
        engine.measure_noise(probe)
    elif kind is None and recipe.tracking.noise_scale:
        log(f"[qhm-launch] gradient noise scale: not measured ({why}); grad_sq, trace_cov and noise_scale "
            "are null")
    return probe
