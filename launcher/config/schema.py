"""The recipe's schema: typed dataclasses with their defaults, and the names each key allows.

A :class:`Recipe` is built from YAML by :mod:`launcher.config.load` and checked once by
:mod:`launcher.config.validate`; everything after that may trust it.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

import qhm

from launcher import engines, models
from launcher.config import batch_kinds
from launcher.models.gpt import Settings as GPTSpec
from launcher.models.llama import Settings as LlamaSpec
from launcher.env import PREEMPTION_SIGNALS as SIGNALS  # noqa: F401  (signals.preempt allows these)
from launcher.run.folder import RunFolder

DATASETS = ("digits", "synthetic", "cifar10", "cifar100", "imagefolder", "tokens")
MODELS = models.NAMES               # launcher/models: one module per model family
ADAM_FAMILY = ("qhadam", "adamw")          # optimizers whose schedules drive the learning rate only
PRECISIONS = ("fp32", "bf16", "fp64")
OPTIMIZERS = tuple(qhm.PRESETS) + ADAM_FAMILY   # qhm | sgd (gamma = 0) | nshb (gamma = 1) | qhadam | adamw
KERNELS = ("foreach", "compiled", "loop", "fused")   # fused: the earlier name of compiled
ENGINES = engines.NAMES             # launcher/engines: one module per engine
# adaptive: decided at run time (launcher.train.adaptive); warmup_from: a piecewise schedule along the CBS measured
# by branches, resolved into kind steps when the recipe is loaded
UNITS = qhm.schedules.UNITS                # what schedule positions count: epoch (the paper) | step | sample | token
BATCH_SCALINGS = tuple(qhm.schedules.BATCH_SCALINGS)
Amount = Union[int, float, str]            # a count in a unit: 500, "2.5K", "10M tokens" (launcher.config.units)
WANDB_MODES = ("online", "offline", "disabled")
GRAD_NORM_MODES = ("exact", "paper")
BATCH_NORMS = ("local", "sync")
COMPILE_MODES = ("off", "default", "reduce-overhead", "max-autotune")
MAX_INT = 2 ** 63 - 1              # every integer key fits an int64 (seeds, sizes, steps)
MAX_EPOCHS = 100_000               # the paper runs 300; the per-epoch plan is computed for every epoch
MAX_DATA_WORKERS = 64              # DataLoader processes per rank: a node has at most a few hundred cores for 8 ranks
MAX_NAME = 128                     # a run name is a folder name (and a W&B name)
MAX_TAG = 64                       # W&B refuses longer tags
SYNTHETIC_MAX = 10_000_000         # synthetic samples are generated in memory


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
    validation: Union[float, str, list, dict] = 0.0   # fraction of the training set held out for validation;
                                        # tokens: files, as train
    factory: Optional[str] = None       # "package.module:callable" returning train and test datasets (streamed)
    kwargs: dict = field(default_factory=dict)
    workers: int = 4                    # DataLoader worker processes per rank (the streamed path)
    stream: bool = False                # read a built-in dataset through DataLoader workers too
    image_size: Optional[int] = None    # imagefolder: resize and centre-crop to this (default 224)
    tokens_per_sample: Optional[int] = None   # tokens in every sample (fixed length): tokens are counted
    train: Union[str, list, dict, None] = None   # tokens: the training token file (.bin of ids, or .npy), a glob
                                        # of shards, a list of them, or a mapping of them to mixture weights
    dtype: Optional[str] = None         # tokens: the ids' dtype in raw files (.bin, headerless .npy); null: meta.json's
    seq_len: Optional[int] = None       # tokens: a sample is a window of seq_len + 1 tokens (inputs, next tokens)
    vocab: Optional[int] = None         # tokens: the vocabulary (default: the files' meta.json, else 65,536 / 2^32)
    text: Union[str, list, None] = None   # tokens: what to tokenize into train/validation when they are missing
                                        # ("stdlib": the Python standard library's sources; or file paths/globs)


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
    name: str = "qhm"                   # qhm | sgd | nshb (the paper's) | qhadam | adamw
    weight_decay: float = 0.0
    kernel: str = "foreach"             # foreach | compiled (torch.compile'd single pass, CPU) | loop
    betas: list = field(default_factory=lambda: [0.9, 0.999])   # qhadam, adamw
    nus: list = field(default_factory=lambda: [1.0, 1.0])       # qhadam: (1, 1) is Adam
    eps: float = 1e-8                   # qhadam, adamw
    decouple_weight_decay: Optional[bool] = None   # qhadam (null: true, AdamW's decoupled decay); adamw always
    weight_decay_all: bool = False      # qhadam, adamw: decay biases, norms and embeddings too (default: not)
    clip_grad_norm: Optional[float] = None   # clip the global gradient norm to this (every engine)


@dataclass
class Batch:
    kind: str = "exponential"           # constant {size} | exponential {initial, growth} |
                                        # steps {points: [[position, batch], ...]}: piecewise, in schedule.unit |
                                        # adaptive {initial, growth, max, factor}: grows by growth at an interval's
                                        # end when the noise scale measured over it is >= factor x the batch
    # a batch is samples (256), or text naming samples or tokens ("512K tokens": data.seq_len-token samples)
    size: Union[int, str, None] = None
    initial: Union[int, str, None] = None
    growth: float = 2.0
    max: Union[int, str, None] = None   # adaptive: the largest batch (null: the training set)
    factor: float = 1.0                 # adaptive: grow when noise scale >= factor x batch
    points: list = field(default_factory=list)   # steps: [[0, 256], ["2B", 512], ...], positions in schedule.unit
    branches: Optional[str] = None      # warmup_from: the branch folders (qhm-launch branch) whose CBS it follows
    tolerance: Union[float, str, None] = None   # warmup_from: the CBS criterion's tolerance (0.01, or "2%"); None: 2%

    @property
    def decided_during_run(self) -> bool:
        """Whether the run decides its batches as it trains (adaptive): no plan knows them in advance."""
        kind = batch_kinds.KINDS.get(self.kind)
        return kind is not None and kind.decided_during_run


@dataclass
class LR:
    kind: str = "constant"              # constant | sqrt_decay | decay | cosine | polynomial | wsd
    max: float = 0.1
    min: float = 0.0
    power: float = 2.0
    warmup: Amount = 0                  # linear warm-up over this many schedule units (0: the paper's schedules)
    decay: Amount = 0                   # wsd: its final linear decay to min, over this many units
    batch_scaling: str = "none"         # none | linear | sqrt: lr x (b_k / b_0)^p where the batch changes


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
    unit: str = "epoch"                 # what positions count: epoch (the paper) | step | sample | token
    interval: Amount = 1                # E, shared by the batch, beta and gamma step schedules, in that unit
    batch: Batch = field(default_factory=Batch)
    lr: LR = field(default_factory=LR)
    beta: Beta = field(default_factory=Beta)
    gamma: Gamma = field(default_factory=Gamma)


@dataclass
class FSDP:
    shard: Union[str, list, None] = None   # the module class(es) that are FSDP units (default: the GPT's Block)
    reshard_after_forward: bool = True  # free the gathered parameters after forward (gather again in backward)


@dataclass
class Distributed:
    engine: str = "ddp"
    nproc_per_node: Union[int, str] = 1    # or "auto": one per visible GPU (2 on a machine without GPUs)
    max_micro_batch: Union[int, str] = 64   # or "auto": the largest that fits in device memory, per stage
    cpu_micro_batch: int = 64               # what "auto" means on CPU (no device memory to probe)
    zero_stage: int = 0                 # deepspeed only
    deepspeed_config: dict = field(default_factory=dict)
    batch_norm: str = "local"           # local: statistics per micro-batch | sync: over all ranks (CUDA)
    min_rank_batch: int = 32            # the smallest per-rank share worth a rank (elastic chains, plan's estimate)
    fsdp: FSDP = field(default_factory=FSDP)   # engine fsdp: what is sharded, and how


@dataclass
class Eval:
    every_epochs: int = 1
    every_steps: int = 0                # 0: at epoch ends only; k: also every k optimizer steps (mid-epoch rows)
    every: Optional[Amount] = None      # also every N units: "10M tokens", "50K samples", or a count in schedule.unit
    full_grad_norm: bool = True
    grad_norm_mode: str = "exact"       # exact: un-augmented, eval mode | paper: as the paper's code
    batch_size: int = 500
    # a fixed subset of the test and validation samples, spread evenly over each (the same at every evaluation,
    # batch size and world size, so curves compare): at most max_batches x batch_size samples, or max_tokens
    # tokens' worth of windows (a token dataset); null: all of them. The full-gradient norm reads all the training set.
    max_batches: Optional[int] = None
    max_tokens: Optional[Amount] = None


@dataclass
class Checkpoint:
    every_steps: int = 0                # 0: only at epoch ends and on preemption
    every: Optional[Amount] = None      # also every N units, as eval.every
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
    noise_scale: bool = True                # the gradient noise scale, measured at every step (launcher/train/noise.py)


@dataclass
class Signals:
    preempt: list = field(default_factory=lambda: ["SIGTERM", "SIGUSR1", "SIGUSR2"])


@dataclass
class Slurm:
    setup: list = field(default_factory=list)   # lines a job runs before training ("module load cuda/12.4")
    nodes: int = 1                      # nodes per job (submit/sweep --nodes wins); a sweep grid may vary it
    gpus_per_node: int = 0              # GPUs (= processes) per node; 0: CPU, processes from nproc_per_node
    cpus_per_rank: Optional[int] = None   # cores a rank's task reserves; null: 4 per GPU rank (its main thread,
                                        # autograd's device thread, NCCL's proxy, compile workers), 1 on CPU;
                                        # each streamed-data worker adds one


@dataclass
class Performance:
    channels_last: bool = False         # NHWC activations for convolutional models (fast on GPUs; numerics move)
    compile: str = "off"                # off | default | reduce-overhead | max-autotune: torch.compile of the model
    cuda_graphs: bool = False           # CUDA graphs for the fixed-shape micro-step, captured once per stage
    tf32: Optional[bool] = None         # null: torch's defaults (fp32 matmuls, TF32 cuDNN convolutions); true: TF32
                                        # for both (Ampere and later: faster, ~1e-3 relative); false: full fp32 for both
    deterministic: bool = False         # deterministic CUDA kernels (slower): what makes resume on CUDA bitwise
    activation_checkpointing: bool = False   # built-in gpt/llama: each block's activations recomputed in the
                                        # backward (less memory, about a third more compute; the same numbers)
    peak_tflops: Optional[float] = None  # one device's peak TFLOP/s at the run's precision, for MFU; null: known
                                        # GPUs' dense bf16/fp16 peak (launcher/train/report.py), else no MFU


@dataclass
class Train:
    """The run's length when it is not whole epochs: one of these (the run ends after the first step that
    reaches it)."""
    steps: Optional[Amount] = None
    samples: Optional[Amount] = None
    tokens: Optional[Amount] = None

    def duration(self) -> tuple[str, Amount] | None:
        """(unit, the amount as written) of the one set, None if none is."""
        given = [(unit[:-1], v) for unit, v in (("steps", self.steps), ("samples", self.samples),
                                                ("tokens", self.tokens)) if v is not None]
        return given[0] if len(given) == 1 else None


@dataclass
class Branch:
    """A short run branched from another's exact checkpoint (``qhm-launch branch`` writes it): the
    parent's recipe, from its global step ``at_step`` on at ``factor`` times its batch (and the learning
    rate times factor^p of ``lr_rule``), for ``length`` units; the parent's schedules otherwise, over the
    parent's length."""
    parent: Optional[str] = None        # the parent's run folder
    parent_hash: Optional[str] = None   # the parent's trajectory hash: its checkpoint is where this starts
    at_step: int = 0                    # the parent's global step the branch starts after
    factor: int = 1                     # batch multiplier from at_step on
    lr_rule: str = "none"               # none | sqrt | linear: lr x factor^(0 | 1/2 | 1) from at_step on
    length: Optional[Amount] = None     # how long the branch trains, in its unit ("100K tokens", "30 steps")
    seed: int = 0                       # the data order after at_step: 0 the parent's, k > 0 another (branch --seeds)


@dataclass
class Recipe:
    name: str = "run"
    output: str = "runs"
    seed: int = 0
    epochs: Optional[int] = None        # M; default 1 unless train gives another length
    train: Train = field(default_factory=Train)
    data: Data = field(default_factory=Data)
    model: Union[str, GPTSpec, LlamaSpec, ModelSpec] = "small_cnn"
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
    branch: Branch = field(default_factory=Branch)

    @property
    def run_dir(self) -> Path:
        return Path(self.output) / self.name

    @property
    def folder(self) -> RunFolder:
        return RunFolder(self.run_dir)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def duration(self) -> tuple[str, int]:
        """The run's length: ("epoch", M), or (unit, count) of ``train`` (validated: one of them is set)."""
        from launcher.config import units
        given = self.train.duration()
        if given is None:
            return "epoch", self.epochs or 1
        unit, value = given
        return unit, units.in_unit(f"train.{unit}s", value, unit)

    def batch_spec(self) -> qhm.BatchSchedule:
        """The batch schedule in qhm's terms (adaptive: the initial batch, until decided otherwise)."""
        return batch_kinds.KINDS[self.schedule.batch.kind].spec(self)

    def eval_samples(self) -> int | None:
        """The samples an evaluation pass reads at most (eval.max_batches or eval.max_tokens); None: all."""
        from launcher.config import units
        e = self.eval
        if e.max_batches is not None:
            return e.max_batches * e.batch_size
        if e.max_tokens is not None:
            tokens = units.in_unit("eval.max_tokens", e.max_tokens, "token")
            return -(-tokens // (self.data.tokens_per_sample or 1))
        return None

    def interval(self) -> int:
        """schedule.interval as a count in schedule.unit."""
        from launcher.config import units
        return units.in_unit("schedule.interval", self.schedule.interval, self.schedule.unit)

    def schedule_spec(self, epochs: int | None = None, length: int | None = None) -> qhm.Schedule:
        """The qhm schedule this recipe describes (validated when the recipe is loaded). ``epochs`` and
        ``length``: the epochs the run trains in and its length in schedule.unit, from its plan
        (launcher.train.planning.plan); by default the recipe's epochs, whose length is all the epoch unit
        needs."""
        from launcher.config import units
        s, E, unit = self.schedule, self.interval(), self.schedule.unit
        epochs = epochs or self.epochs or 1
        gamma = s.gamma
        if self.optimizer.name in ("sgd", "nshb"):     # they fix gamma, whatever the recipe says
            gamma = Gamma(kind="constant", max=qhm.PRESETS[self.optimizer.name]["gamma"])
        warmup = units.in_unit("schedule.lr.warmup", s.lr.warmup, unit, minimum=0)
        decay = units.in_unit("schedule.lr.decay", s.lr.decay, unit, minimum=0)
        return qhm.Schedule(
            epochs=epochs,
            batch=self.batch_spec(),
            lr=qhm.LRSchedule(s.lr.kind, s.lr.max, s.lr.min, power=s.lr.power, epochs=epochs, warmup=warmup,
                              unit=unit, length=(length or 0) if unit != "epoch" else 0, decay=decay),
            beta=qhm.BetaSchedule(s.beta.kind, max=s.beta.max, min=s.beta.min, factor=s.beta.factor,
                                  interval=E, staged=s.beta.staged),
            gamma=qhm.GammaSchedule(gamma.kind, max=gamma.max, factor=gamma.factor, interval=E),
            unit=unit, batch_scaling=s.lr.batch_scaling)
