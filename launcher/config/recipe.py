"""The recipe: typed dataclasses, loaded from YAML with ``yaml.safe_load``, validated once at the edge.

Every problem is a :class:`RecipeError` whose message is one line naming the key path, the value and
what is allowed; the CLI prints it and exits with status 2 before any worker starts.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import yaml

import qhm

from launcher.config import keys
from launcher.config import yamlfile
from launcher.errors import RecipeError  # noqa: F401  (raised by every check below; importable from here)
from launcher.run.files import atomic_write
from launcher.run.folder import RunFolder

DATASETS = ("digits", "synthetic", "cifar10", "cifar100", "imagefolder")
MODELS = ("small_cnn", "resnet18", "vit_tiny")
PRECISIONS = ("fp32", "bf16", "fp64")
OPTIMIZERS = tuple(qhm.PRESETS)            # qhm | sgd (gamma = 0) | nshb (gamma = 1)
KERNELS = ("foreach", "compiled", "loop", "fused")   # fused: the earlier name of compiled
ENGINES = ("ddp", "deepspeed")
WANDB_MODES = ("online", "offline", "disabled")
GRAD_NORM_MODES = ("exact", "paper")
BATCH_NORMS = ("local", "sync")
COMPILE_MODES = ("off", "default", "reduce-overhead", "max-autotune")
SIGNALS = ("SIGTERM", "SIGUSR1", "SIGUSR2", "SIGINT", "SIGHUP", "SIGQUIT")
MAX_INT = 2 ** 63 - 1              # every integer key fits an int64 (seeds, sizes, steps)
MAX_EPOCHS = 100_000               # the paper runs 300; the per-epoch plan is computed for every epoch
MAX_NAME = 128                     # a run name is a folder name (and a W&B name)
MAX_TAG = 64                       # W&B refuses longer tags
SYNTHETIC_MAX = 10_000_000         # synthetic samples are generated in memory
# Keys of a raw DeepSpeed config that the launcher derives from the recipe: a recipe may not set them.
DEEPSPEED_OWNED = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
                   "zero_optimization.stage", "zero_allow_untested_optimizer", "optimizer", "scheduler", "bf16",
                   "fp16", "gradient_clipping")


@dataclass
class Data:
    dataset: Optional[str] = None       # digits (the default) | synthetic | cifar10 | cifar100 | imagefolder
    root: Optional[str] = None          # CIFAR: the torchvision root; imagefolder: root/train, root/val
    download: bool = False
    augment: bool = True
    size: Optional[int] = None          # synthetic only: training-set size (test set: a quarter)
    shape: Optional[list] = None        # synthetic only: one sample's shape, [C, H, W] (default [1, 8, 8])
    classes: Optional[int] = None       # synthetic only: classes (default 10)
    rotation: float = 0.0               # random rotation in [-r, r] degrees (the paper's CIFAR-100: 15)
    validation: float = 0.0             # fraction of the training set held out for validation
    factory: Optional[str] = None       # "package.module:callable" returning train and test datasets (streamed)
    kwargs: dict = field(default_factory=dict)
    workers: int = 4                    # DataLoader worker processes per rank (the streamed path)
    stream: bool = False                # read a built-in dataset through DataLoader workers too
    image_size: Optional[int] = None    # imagefolder: resize and centre-crop to this (default 224)


@dataclass
class ModelSpec:
    factory: str = ""                   # "package.module:callable" returning an nn.Module
    kwargs: dict = field(default_factory=dict)


@dataclass
class LossSpec:
    factory: Optional[str] = None       # "package.module:callable" returning fn(output, target) -> per-sample loss
    kwargs: dict = field(default_factory=dict)


@dataclass
class Optimizer:
    name: str = "qhm"
    weight_decay: float = 0.0
    kernel: str = "foreach"             # foreach | compiled (torch.compile'd single pass, CPU) | loop


@dataclass
class Batch:
    kind: str = "exponential"           # constant {size} | exponential {initial, growth}
    size: Optional[int] = None
    initial: Optional[int] = None
    growth: float = 2.0


@dataclass
class LR:
    kind: str = "constant"              # constant | sqrt_decay | decay | cosine | polynomial
    max: float = 0.1
    min: float = 0.0
    power: float = 2.0
    warmup: int = 0                     # linear warm-up epochs (0: the paper's schedules)


@dataclass
class Beta:
    kind: str = "constant"              # constant {max} | step_decay {max, factor} | increasing {min}
    max: float = 0.9
    min: float = 0.5
    factor: float = 0.5
    staged: bool = False                # increasing in stages of E epochs, as the paper's code (not eq. 10)


@dataclass
class Gamma:
    kind: str = "constant"              # constant {max} | step_decay {max, factor}
    max: float = 0.7
    factor: float = 0.5


@dataclass
class ScheduleConfig:
    interval: int = 1                   # E, shared by the batch, beta and gamma step schedules
    batch: Batch = field(default_factory=Batch)
    lr: LR = field(default_factory=LR)
    beta: Beta = field(default_factory=Beta)
    gamma: Gamma = field(default_factory=Gamma)


@dataclass
class Distributed:
    engine: str = "ddp"
    nproc_per_node: int = 1
    max_micro_batch: Union[int, str] = 64   # or "auto": the largest that fits in device memory, per stage
    cpu_micro_batch: int = 64               # what "auto" means on CPU (no device memory to probe)
    zero_stage: int = 0                 # deepspeed only
    deepspeed_config: dict = field(default_factory=dict)
    batch_norm: str = "local"           # local: statistics per micro-batch | sync: over all ranks (CUDA)
    min_rank_batch: int = 32            # the smallest per-rank share worth a rank (elastic chains, plan's estimate)


@dataclass
class Eval:
    every_epochs: int = 1
    full_grad_norm: bool = True
    grad_norm_mode: str = "exact"       # exact: un-augmented, eval mode | paper: as the paper's code
    batch_size: int = 500


@dataclass
class Checkpoint:
    every_steps: int = 0                # 0: only at epoch ends and on preemption
    keep: int = 3


@dataclass
class Wandb:
    mode: str = "offline"
    project: str = "qhm-launch"
    entity: Optional[str] = None
    group: Optional[str] = None
    tags: list = field(default_factory=list)
    system_stats: bool = False          # W&B's CPU/GPU monitor: a helper process that outlives a killed run by seconds


@dataclass
class Tracking:
    wandb: Wandb = field(default_factory=Wandb)
    log_every_steps: Optional[int] = None   # steps.jsonl rows; None: about 2,000 over the run; 0: none
    step_grad_norm: bool = False            # the norm of each logged step's averaged gradient (DDP)


@dataclass
class Signals:
    preempt: list = field(default_factory=lambda: ["SIGTERM", "SIGUSR1", "SIGUSR2"])


@dataclass
class Slurm:
    setup: list = field(default_factory=list)   # lines a job runs before training ("module load cuda/12.4")


@dataclass
class Performance:
    channels_last: bool = False         # NHWC activations for convolutional models (fast on GPUs; numerics move)
    compile: str = "off"                # off | default | reduce-overhead | max-autotune: torch.compile of the model
    cuda_graphs: bool = False           # CUDA graphs for the fixed-shape micro-step, captured once per stage


@dataclass
class Recipe:
    name: str = "run"
    output: str = "runs"
    seed: int = 0
    epochs: int = 1
    data: Data = field(default_factory=Data)
    model: Union[str, ModelSpec] = "small_cnn"
    loss: LossSpec = field(default_factory=LossSpec)
    precision: str = "fp32"
    optimizer: Optimizer = field(default_factory=Optimizer)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    distributed: Distributed = field(default_factory=Distributed)
    eval: Eval = field(default_factory=Eval)
    checkpoint: Checkpoint = field(default_factory=Checkpoint)
    tracking: Tracking = field(default_factory=Tracking)
    signals: Signals = field(default_factory=Signals)
    performance: Performance = field(default_factory=Performance)
    slurm: Slurm = field(default_factory=Slurm)

    @property
    def run_dir(self) -> Path:
        return Path(self.output) / self.name

    @property
    def folder(self) -> RunFolder:
        return RunFolder(self.run_dir)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def schedule_spec(self) -> qhm.Schedule:
        """The qhm schedule this recipe describes (validated when the recipe is loaded)."""
        s, E = self.schedule, self.schedule.interval
        size = s.batch.size if s.batch.kind == "constant" else s.batch.initial
        gamma = s.gamma
        if self.optimizer.name != "qhm":          # sgd / nshb fix gamma, whatever the recipe says
            gamma = Gamma(kind="constant", max=qhm.PRESETS[self.optimizer.name]["gamma"])
        return qhm.Schedule(
            epochs=self.epochs,
            batch=qhm.BatchSchedule(s.batch.kind, size, growth=s.batch.growth, interval=E),
            lr=qhm.LRSchedule(s.lr.kind, s.lr.max, s.lr.min, power=s.lr.power, epochs=self.epochs,
                              warmup=s.lr.warmup),
            beta=qhm.BetaSchedule(s.beta.kind, max=s.beta.max, min=s.beta.min, factor=s.beta.factor,
                                  interval=E, staged=s.beta.staged),
            gamma=qhm.GammaSchedule(gamma.kind, max=gamma.max, factor=gamma.factor, interval=E))


# Fields that change the trajectory: a checkpoint written under other values is refused on resume.
# W&B, process count, micro-batch cap, eval, checkpoint cadence and paths may change freely.
TRAJECTORY_FIELDS = ("seed", "epochs", "data.dataset", "data.factory", "data.kwargs", "data.augment", "data.size",
                     "data.shape", "data.classes", "data.image_size", "data.rotation", "data.validation", "model",
                     "loss", "precision", "optimizer", "schedule", "distributed.engine",
                     "distributed.zero_stage", "distributed.batch_norm")


def trajectory(recipe_dict: dict) -> dict:
    """The trajectory fields of a recipe; keys a recipe written by an earlier version lacks take their
    defaults (which are what that version did), so adding a key never refuses an old checkpoint."""
    full = _merged(dataclasses.asdict(Recipe()), recipe_dict)
    return {key: keys.get(full, key) for key in TRAJECTORY_FIELDS}


def _merged(defaults: dict, given: dict) -> dict:
    out = dict(defaults)
    for k, v in given.items():
        out[k] = _merged(defaults[k], v) if isinstance(v, dict) and isinstance(defaults.get(k), dict) else v
    return out


def trajectory_hash(recipe_dict: dict) -> str:
    return hashlib.sha256(json.dumps(trajectory(recipe_dict), sort_keys=True).encode()).hexdigest()[:16]


def trajectory_diff(old: dict, new: dict) -> list[str]:
    """Leaf-level differences ``key: old -> new`` between two recipes' trajectory fields."""
    a, b = keys.flatten(trajectory(old)), keys.flatten(trajectory(new))
    return [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


# ------------------------------------------------------------------------------------------------
# Loading: dict -> dataclasses with key paths in every error.

def _describe(tp) -> str:
    if tp is bool:
        return "true or false"
    if tp is int:
        return "an integer"
    if tp is float:
        return "a number"
    if tp is str:
        return "a string"
    if tp is list:
        return "a list"
    if tp is dict:
        return "a mapping"
    return getattr(tp, "__name__", str(tp))


def _coerce(value, tp, path: str):
    origin = typing.get_origin(tp)
    if origin is typing.Union:                       # Optional[X], or X | Y: the first type that takes it
        inner = [t for t in typing.get_args(tp) if t is not type(None)]
        if value is None and type(None) in typing.get_args(tp):
            return None
        for i, t in enumerate(inner):
            try:
                return _coerce(value, t, path)
            except RecipeError:
                if i == len(inner) - 1:
                    raise RecipeError(f"{path}: {value!r} is not valid; allowed: "
                                      + " or ".join(_describe(t) for t in inner)) from None
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, path)
    if tp is float and isinstance(value, str):
        value = _number(value)                       # PyYAML reads 1e-3 (no dot) as a string
    ok = {bool: lambda v: isinstance(v, bool),
          int: lambda v: isinstance(v, int) and not isinstance(v, bool),
          float: lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
          str: lambda v: isinstance(v, str),
          list: lambda v: isinstance(v, list),
          dict: lambda v: isinstance(v, dict)}[tp](value)
    if not ok:
        raise RecipeError(f"{path}: {value!r} is not valid; allowed: {_describe(tp)}")
    if tp is float and not math.isfinite(value):
        raise RecipeError(f"{path}: {value!r} is not valid; allowed: a finite number")
    if tp is int and abs(value) > MAX_INT:
        raise RecipeError(f"{path}: {value!r} is not valid; allowed: an integer of at most {MAX_INT}")
    if tp is str and not value.isprintable():
        raise RecipeError(f"{path}: {value!r} is not valid; allowed: text without control characters")
    return float(value) if tp is float else value


def _number(text: str):
    """A number written the way a person types one ("1e-3", "2.5E2"); the text itself otherwise."""
    try:
        return float(text.strip())
    except ValueError:
        return text


def _build(cls, data, path: str):
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise RecipeError(f"{path or 'recipe'}: {data!r} is not valid; allowed: a mapping of "
                          + ", ".join(f.name for f in dataclasses.fields(cls)))
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in data:
        if key not in names:
            where = f"{path}.{key}" if path else str(key)
            raise RecipeError(f"{where}: unknown key; allowed keys here: {', '.join(names)}")
    kwargs = {k: _coerce(v, hints[k], f"{path}.{k}" if path else k) for k, v in data.items()}
    return cls(**kwargs)


def _one_of(path: str, value, allowed) -> None:
    if value not in allowed:
        raise RecipeError(f"{path}: {value!r} is not valid; allowed: {' | '.join(map(str, allowed))}")


def _at_least(path: str, value, low) -> None:
    if value < low:
        raise RecipeError(f"{path}: {value!r} is not valid; allowed: >= {low}")


def _at_most(path: str, value, high) -> None:
    if value > high:
        raise RecipeError(f"{path}: {value!r} is not valid; allowed: <= {high}")


def validate(r: Recipe) -> Recipe:
    if r.data.factory is not None and r.data.dataset is not None:
        raise RecipeError(f"data.dataset: {r.data.dataset!r} is not valid with data.factory; allowed: one of the two")
    if r.data.factory is None:
        r.data.dataset = r.data.dataset or "digits"
        _one_of("data.dataset", r.data.dataset, DATASETS)
    if isinstance(r.model, str):
        _one_of("model", r.model, MODELS)
    elif not r.model.factory:
        raise RecipeError("model.factory: missing; allowed: 'package.module:callable' (or a built-in model name: "
                          + " | ".join(MODELS) + ")")
    _at_least("data.workers", r.data.workers, 0)
    if r.data.image_size is not None and not 8 <= r.data.image_size <= 4096:
        raise RecipeError(f"data.image_size: {r.data.image_size!r} is not valid; allowed: an integer in [8, 4096]")
    _one_of("precision", r.precision, PRECISIONS)
    _one_of("optimizer.name", r.optimizer.name, OPTIMIZERS)
    _one_of("optimizer.kernel", r.optimizer.kernel, KERNELS)
    _one_of("distributed.engine", r.distributed.engine, ENGINES)
    _one_of("distributed.zero_stage", r.distributed.zero_stage, (0, 1, 2))
    _one_of("tracking.wandb.mode", r.tracking.wandb.mode, WANDB_MODES)
    _one_of("eval.grad_norm_mode", r.eval.grad_norm_mode, GRAD_NORM_MODES)
    _one_of("distributed.batch_norm", r.distributed.batch_norm, BATCH_NORMS)
    if isinstance(r.distributed.max_micro_batch, str):
        _one_of("distributed.max_micro_batch", r.distributed.max_micro_batch, ("auto",))
    else:
        _at_least("distributed.max_micro_batch", r.distributed.max_micro_batch, 1)
    _one_of("performance.compile", r.performance.compile, COMPILE_MODES)
    if r.distributed.engine == "deepspeed" and (r.performance.compile != "off" or r.performance.cuda_graphs):
        raise RecipeError(f"performance.compile: {r.performance.compile!r} is not valid with distributed.engine "
                          "deepspeed; allowed: off (compile and CUDA graphs are for the ddp engine)")
    if r.distributed.engine == "deepspeed" and r.distributed.max_micro_batch == "auto":
        raise RecipeError("distributed.max_micro_batch: 'auto' is not valid with distributed.engine deepspeed; "
                          "allowed: an integer >= 1")
    if r.distributed.engine == "deepspeed":
        check_raw_deepspeed_config(r.distributed.deepspeed_config)
    elif r.distributed.deepspeed_config:
        raise RecipeError("distributed.deepspeed_config: not valid with distributed.engine ddp; allowed: {} "
                          "(or set distributed.engine: deepspeed)")
    for i, sig in enumerate(r.signals.preempt):
        _one_of(f"signals.preempt[{i}]", sig, SIGNALS)
    if not r.name or "/" in r.name or r.name in (".", "..") or not r.name.isprintable() or len(r.name) > MAX_NAME:
        raise RecipeError(f"name: {r.name!r} is not valid; allowed: a non-empty folder name of at most {MAX_NAME} "
                          "characters, without '/' or control characters")
    for i, line in enumerate(r.slurm.setup):
        if not isinstance(line, str) or not line.strip() or not line.isprintable():
            raise RecipeError(f"slurm.setup[{i}]: {line!r} is not valid; allowed: one line of shell, e.g. "
                              "'module load cuda/12.4'")
    for i, tag in enumerate(r.tracking.wandb.tags):
        if not isinstance(tag, str) or not tag or len(tag) > MAX_TAG or not tag.isprintable():
            raise RecipeError(f"tracking.wandb.tags[{i}]: {tag!r} is not valid; allowed: text of 1 to {MAX_TAG} "
                              "characters (W&B's limit)")
    if not r.output or not r.output.isprintable():
        raise RecipeError(f"output: {r.output!r} is not valid; allowed: a folder path without control characters")
    _at_most("epochs", r.epochs, MAX_EPOCHS)
    for path, value, low in (("seed", r.seed, 0), ("epochs", r.epochs, 1), ("schedule.interval", r.schedule.interval, 1),
                             ("distributed.nproc_per_node", r.distributed.nproc_per_node, 1),
                             ("distributed.cpu_micro_batch", r.distributed.cpu_micro_batch, 1),
                             ("distributed.min_rank_batch", r.distributed.min_rank_batch, 1),
                             ("eval.every_epochs", r.eval.every_epochs, 1),
                             ("eval.batch_size", r.eval.batch_size, 1),
                             ("checkpoint.every_steps", r.checkpoint.every_steps, 0),
                             ("tracking.log_every_steps", r.tracking.log_every_steps or 0, 0),
                             ("checkpoint.keep", r.checkpoint.keep, 1),
                             ("optimizer.weight_decay", r.optimizer.weight_decay, 0.0),
                             ("schedule.lr.max", r.schedule.lr.max, 0.0),
                             ("schedule.lr.min", r.schedule.lr.min, 0.0)):
        _at_least(path, value, low)
    if r.data.size is not None:
        if r.data.dataset != "synthetic":
            raise RecipeError(f"data.size: {r.data.size!r} is not valid; allowed: null unless "
                              "data.dataset is synthetic")
        _at_least("data.size", r.data.size, 4)
        _at_most("data.size", r.data.size, SYNTHETIC_MAX)
    for key in ("shape", "classes"):
        if getattr(r.data, key) is not None and r.data.dataset != "synthetic":
            raise RecipeError(f"data.{key}: {getattr(r.data, key)!r} is not valid; allowed: null unless "
                              "data.dataset is synthetic")
    if r.data.shape is not None and not (len(r.data.shape) == 3 and all(isinstance(v, int) and 1 <= v <= 4096
                                                                           for v in r.data.shape)):
        raise RecipeError(f"data.shape: {r.data.shape!r} is not valid; allowed: [channels, height, width], "
                          "integers in [1, 4096]")
    if r.data.classes is not None and not 2 <= r.data.classes <= 100_000:
        raise RecipeError(f"data.classes: {r.data.classes!r} is not valid; allowed: an integer in [2, 100000]")
    if not 0.0 <= r.data.rotation <= 180.0:
        raise RecipeError(f"data.rotation: {r.data.rotation!r} is not valid; allowed: degrees in [0, 180]")
    if not 0.0 <= r.data.validation < 1.0:
        raise RecipeError(f"data.validation: {r.data.validation!r} is not valid; allowed: a fraction in [0, 1)")
    b = r.schedule.batch
    _one_of("schedule.batch.kind", b.kind, qhm.schedules.BATCH_KINDS)
    size_key = "size" if b.kind == "constant" else "initial"
    if getattr(b, size_key) is None:
        raise RecipeError(f"schedule.batch.{size_key}: missing; allowed: an integer >= 1 "
                          f"(required for kind {b.kind})")
    try:
        r.schedule_spec()
    except ValueError as exc:                       # qhm names the field; we add the recipe's path
        msg = str(exc)
        key, _, rest = msg.partition("=")
        key = {"batch.size": f"batch.{size_key}"}.get(key, key)
        value, _, allowed = rest.partition(": must be ")
        path = key if key == "epochs" else f"schedule.{key}"
        raise RecipeError(f"{path}: {value} is not valid; allowed: {allowed}") from None
    return r


def check_raw_deepspeed_config(raw: dict) -> None:
    for key in DEEPSPEED_OWNED:
        if keys.has(raw, key):
            raise RecipeError(f"distributed.deepspeed_config.{key}: {keys.get(raw, key)!r} is not allowed; "
                              f"the launcher sets it from the recipe (schedule, precision, "
                              f"distributed.zero_stage)")


def _parse_override(text: str) -> tuple[list[str], Any]:
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise RecipeError(f"--set {text!r}: not valid; allowed: KEY.PATH=VALUE, e.g. schedule.lr.max=0.05")
    try:
        value = yamlfile.parse(raw, f"--set {key}") if raw.strip() else None
    except yamlfile.NotYAML:
        value = raw
    return key.strip().split("."), value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    for text in overrides or []:
        path, value = _parse_override(text)

        def conflict(prefix, node, path=".".join(path)):
            raise RecipeError(f"{prefix}: {node!r} is not a mapping; cannot set {path}")
        keys.set_(data, ".".join(path), value, on_conflict=conflict)
    return data


def from_dict(data: dict, overrides: Optional[list[str]] = None) -> Recipe:
    data = apply_overrides(json.loads(json.dumps(data or {}, default=str)), overrides or [])
    return validate(_build(Recipe, data, ""))


def load(path: str | Path, overrides: Optional[list[str]] = None) -> Recipe:
    return from_dict(yamlfile.load(path, "recipe"), overrides)


def dump(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe.to_dict(), sort_keys=False)


def write_resolved(recipe: Recipe) -> Path:
    """<run>/recipe.yaml: the recipe as resolved; a different earlier one is kept beside it."""
    folder = recipe.folder
    folder.path.mkdir(parents=True, exist_ok=True)
    text = dump(recipe)
    if folder.recipe.exists() and folder.recipe.read_text() != text:
        folder.recipe.rename(folder.next_previous_recipe())
    atomic_write(folder.recipe, text, durable=False)
    return folder.recipe
