"""Validation, once, at the edge: every rule that a recipe's values must obey together, each broken one
a :class:`RecipeError` naming the key path, the value and what is allowed. Defaults that depend on other
keys (the dataset) are filled in here too."""
from __future__ import annotations

import glob

import numpy as np

import qhm

from launcher import keys
from launcher.config import batch_kinds, units
from launcher.config.schema import (BATCH_NORMS, BATCH_SCALINGS, COMPILE_MODES, DATASETS, ENGINES,
                                    GRAD_NORM_MODES, KERNELS, MAX_DATA_WORKERS, MAX_EPOCHS, MAX_NAME, MAX_TAG, MODELS, OPTIMIZERS,
                                    PRECISIONS, SIGNALS, SYNTHETIC_MAX, UNITS, WANDB_MODES, ADAM_FAMILY, ModelSpec,
                                    Optimizer, Recipe)
from launcher import engines, models
from launcher.errors import RecipeError, at_least, at_most, one_of, schedule_error
from launcher.limits import MAX_NODES

def validate(r: Recipe) -> Recipe:
    """Every rule, section by section (each a function below); defaults that depend on other keys filled in."""
    check_data(r)
    check_model(r)
    check_optimizer(r)
    check_distributed(r)
    check_run(r)
    check_duration(r)
    check_evaluation(r)
    check_schedule(r)
    check_branch(r)
    return r


def check_data(r: Recipe) -> None:
    """data: a built-in dataset or a factory (not both), its keys in range, token files (check_tokens_data)."""
    d = r.data
    if d.factory is not None and d.dataset is not None:
        raise RecipeError(f"data.dataset: {d.dataset!r} is not valid with data.factory; allowed: one of the two")
    if d.factory is None:
        d.dataset = d.dataset or "digits"
        one_of("data.dataset", d.dataset, DATASETS)
    at_least("data.workers", d.workers, 0)
    if d.workers > MAX_DATA_WORKERS:
        raise RecipeError(f"data.workers: {d.workers!r} is not valid; allowed: an integer in [0, {MAX_DATA_WORKERS}] "
                          "(DataLoader processes per rank, each with its own copy of the dataset object: more than a "
                          "node's cores per rank only costs memory)")
    if d.image_size is not None and not 8 <= d.image_size <= 4096:
        raise RecipeError(f"data.image_size: {d.image_size!r} is not valid; allowed: an integer in [8, 4096]")
    if d.size is not None:
        if d.dataset != "synthetic":
            raise RecipeError(f"data.size: {d.size!r} is not valid; allowed: null unless data.dataset is synthetic")
        at_least("data.size", d.size, 4)
        at_most("data.size", d.size, SYNTHETIC_MAX)
    for key in ("shape", "classes"):
        if getattr(d, key) is not None and d.dataset != "synthetic":
            raise RecipeError(f"data.{key}: {getattr(d, key)!r} is not valid; allowed: null unless "
                              "data.dataset is synthetic")
    if d.shape is not None and not (len(d.shape) == 3 and all(
            isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= 4096 for v in d.shape)):
        raise RecipeError(f"data.shape: {d.shape!r} is not valid; allowed: [channels, height, width], "
                          "integers in [1, 4096]")
    if d.classes is not None and not 2 <= d.classes <= 100_000:
        raise RecipeError(f"data.classes: {d.classes!r} is not valid; allowed: an integer in [2, 100000]")
    if not 0.0 <= d.rotation <= 180.0:
        raise RecipeError(f"data.rotation: {d.rotation!r} is not valid; allowed: degrees in [0, 180]")
    check_tokens_data(r)
    if isinstance(d.validation, (int, float)) and not 0.0 <= d.validation < 1.0:
        raise RecipeError(f"data.validation: {d.validation!r} is not valid; allowed: a fraction in [0, 1)")


def check_model(r: Recipe) -> None:
    """model: a built-in family's name or settings (the family checks them), or a factory."""
    if isinstance(r.model, str):
        one_of("model", r.model, MODELS)
        settings = models.settings_for(r.model)
        if settings is not None:              # a family with settings, named alone: its defaults
            r.model = settings()
    if isinstance(r.model, ModelSpec) and not r.model.factory:
        raise RecipeError("model.factory: missing; allowed: 'package.module:callable' (or a built-in model name: "
                          + " | ".join(MODELS) + ")")
    models.check(r)                           # the family's own checks (launcher/models/<family>.py)


def check_distributed(r: Recipe) -> None:
    """distributed and performance: the engine (and its own checks), process counts, micro-batches, precision."""
    dist = r.distributed
    one_of("precision", r.precision, PRECISIONS)
    one_of("distributed.engine", dist.engine, ENGINES)
    if dist.zero_stage not in (0, 1, 2, 3) or isinstance(dist.zero_stage, bool):
        raise RecipeError(f"distributed.zero_stage: {dist.zero_stage!r} is not valid; allowed: 0 | 1 | 2 | 3")
    one_of("distributed.batch_norm", dist.batch_norm, BATCH_NORMS)
    if isinstance(dist.nproc_per_node, str):
        one_of("distributed.nproc_per_node", dist.nproc_per_node, ("auto",))
    else:
        at_least("distributed.nproc_per_node", dist.nproc_per_node, 1)
    if isinstance(dist.max_micro_batch, str):
        one_of("distributed.max_micro_batch", dist.max_micro_batch, ("auto",))
    else:
        at_least("distributed.max_micro_batch", dist.max_micro_batch, 1)
    at_least("distributed.cpu_micro_batch", dist.cpu_micro_batch, 1)
    at_least("distributed.min_rank_batch", dist.min_rank_batch, 1)
    one_of("performance.compile", r.performance.compile, COMPILE_MODES)
    peak = r.performance.peak_tflops
    if peak is not None and (isinstance(peak, bool) or not isinstance(peak, (int, float)) or not 0 < peak <= 1e6):
        raise RecipeError(f"performance.peak_tflops: {peak!r} is not valid; allowed: one device's peak TFLOP/s, a "
                          "number in (0, 1e6] (e.g. 989 for an H100 SXM in bf16), or null")
    engines.check_recipe(r)                   # each engine's own checks (launcher/engines/<name>.py)
    if dist.batch_norm == "sync" and dist.max_micro_batch == "auto":
        raise RecipeError("distributed.batch_norm: 'sync' is not valid with distributed.max_micro_batch auto (the "
                          "memory probe and an out-of-memory redo run SyncBatchNorm's collectives: one rank out of "
                          "memory mid-forward would leave the others waiting in them); allowed: local, or an "
                          "integer max_micro_batch")


def check_run(r: Recipe) -> None:
    """What names and keeps the run: name, output, seed, signals, checkpoints, tracking, Slurm."""
    if not r.name.strip() or "/" in r.name or r.name in (".", "..") or not r.name.isprintable() or len(r.name) > MAX_NAME:
        raise RecipeError(f"name: {r.name!r} is not valid; allowed: a non-empty folder name of at most {MAX_NAME} "
                          "characters, without '/' or control characters")
    if not r.output or not r.output.isprintable():
        raise RecipeError(f"output: {r.output!r} is not valid; allowed: a folder path without control characters")
    at_least("seed", r.seed, 0)
    for i, sig in enumerate(r.signals.preempt):
        one_of(f"signals.preempt[{i}]", sig, SIGNALS)
    at_least("checkpoint.every_steps", r.checkpoint.every_steps, 0)
    at_least("checkpoint.keep", r.checkpoint.keep, 1)
    one_of("tracking.wandb.mode", r.tracking.wandb.mode, WANDB_MODES)
    at_least("tracking.log_every_steps", r.tracking.log_every_steps or 0, 0)
    for i, tag in enumerate(r.tracking.wandb.tags):
        if not isinstance(tag, str) or not tag or len(tag) > MAX_TAG or not tag.isprintable():
            raise RecipeError(f"tracking.wandb.tags[{i}]: {tag!r} is not valid; allowed: text of 1 to {MAX_TAG} "
                              "characters (W&B's limit)")
    at_least("slurm.nodes", r.slurm.nodes, 1)
    at_most("slurm.nodes", r.slurm.nodes, MAX_NODES)
    at_least("slurm.gpus_per_node", r.slurm.gpus_per_node, 0)
    at_least("slurm.cpus_per_rank", r.slurm.cpus_per_rank or 1, 1)
    for i, line in enumerate(r.slurm.setup):
        if not isinstance(line, str) or not line.strip() or not line.isprintable():
            raise RecipeError(f"slurm.setup[{i}]: {line!r} is not valid; allowed: one line of shell, e.g. "
                              "'module load cuda/12.4'")


def check_evaluation(r: Recipe) -> None:
    """eval: how often, on what batch, how the gradient norm is measured."""
    one_of("eval.grad_norm_mode", r.eval.grad_norm_mode, GRAD_NORM_MODES)
    at_least("eval.every_epochs", r.eval.every_epochs, 1)
    at_least("eval.every_steps", r.eval.every_steps, 0)
    at_least("eval.batch_size", r.eval.batch_size, 1)
    e = r.eval
    if e.max_batches is not None and e.max_tokens is not None:
        raise RecipeError(f"eval.max_tokens: {e.max_tokens!r} is not valid with eval.max_batches; allowed: one of the two")
    if e.max_batches is not None:
        at_least("eval.max_batches", e.max_batches, 1)
    if e.max_tokens is not None:
        if r.data.tokens_per_sample is None:
            raise RecipeError(f"eval.max_tokens: {e.max_tokens!r} is not valid: the samples' tokens are not known; "
                              "allowed: eval.max_batches, or data.tokens_per_sample (data.dataset tokens sets it)")
        at_most("eval.max_tokens", units.in_unit("eval.max_tokens", e.max_tokens, "token"), MAX_LENGTH)


def check_schedule(r: Recipe) -> None:
    """schedule: the batch (its kind's own keys and rules: launcher/config/batch_kinds.py), the learning rate,
    the units every amount is counted in; then qhm builds the schedule, which checks the values themselves."""
    at_least("schedule.lr.max", r.schedule.lr.max, 0.0)
    at_least("schedule.lr.min", r.schedule.lr.min, 0.0)
    batch_kinds.check(r)
    check_units(r)
    if r.schedule.lr.decay != 0 and r.schedule.lr.kind != "wsd":
        raise RecipeError(f"schedule.lr.decay: {r.schedule.lr.decay!r} is not valid with kind {r.schedule.lr.kind}; "
                          "allowed: 0 (decay is the wsd kind's final decay; it would be ignored)")
    try:
        r.schedule_spec(length=placeholder_length(r))
    except qhm.ScheduleError as exc:                # qhm names its field; the recipe's path is ours
        raise schedule_error(exc, batch_kinds.KINDS[r.schedule.batch.kind].size_key or "initial") from None


def placeholder_length(r: Recipe) -> int | None:
    """A length in schedule.unit that passes qhm's checks, for validating the recipe before its plan
    (which needs the data) gives the real one; the plan checks warmup and decay against that."""
    if r.schedule.unit == "epoch":
        return None
    unit = r.schedule.unit
    return 1 + max(units.in_unit("schedule.lr.warmup", r.schedule.lr.warmup, unit, minimum=0),
                   units.in_unit("schedule.lr.decay", r.schedule.lr.decay, unit, minimum=0))


def check_tokens_data(r: Recipe) -> None:
    """data.dataset tokens: a training file (or text to make it from), a validation file, seq_len; the
    other datasets take none of these keys. Tokens are then counted: tokens_per_sample is seq_len."""
    d = r.data
    token_keys = ("train", "seq_len", "vocab", "text", "dtype")
    if d.dataset != "tokens":
        for key in token_keys:
            if getattr(d, key) is not None:
                raise RecipeError(f"data.{key}: {getattr(d, key)!r} is not valid; allowed: null unless data.dataset "
                                  "is tokens")
        if not isinstance(d.validation, (int, float)) or isinstance(d.validation, bool):
            raise RecipeError(f"data.validation: {d.validation!r} is not valid; allowed: a fraction in [0, 1) (a "
                              "file with data.dataset tokens)")
        return
    for key, example in (("train", "data/train.bin"), ("validation", "data/val.bin")):
        check_token_files(f"data.{key}", getattr(d, key), example)
    if d.text is not None and any(not isinstance(getattr(d, key), str) or glob.has_magic(getattr(d, key))
                                  for key in ("train", "validation")):
        raise RecipeError(f"data.text: {d.text!r} is not valid with several token files; allowed: one file each for "
                          "data.train and data.validation (what it makes), or no data.text")
    if d.dtype is not None:
        try:
            kind = np.dtype(d.dtype).kind
        except (TypeError, ValueError):
            kind = None
        if kind not in ("u", "i"):
            raise RecipeError(f"data.dtype: {d.dtype!r} is not valid; allowed: an integer dtype of the raw ids "
                              "(uint16, uint32, int32, int64, ...)")
    if d.seq_len is None:
        raise RecipeError("data.seq_len: missing; allowed: an integer >= 1 (the tokens of a sample; required for "
                          "data.dataset tokens)")
    at_least("data.seq_len", d.seq_len, 1)
    if d.vocab is not None:
        at_least("data.vocab", d.vocab, 2)
    if d.text is not None and not (isinstance(d.text, str) or all(isinstance(t, str) for t in d.text)):
        raise RecipeError(f"data.text: {d.text!r} is not valid; allowed: 'stdlib', or file paths or globs")
    if d.tokens_per_sample not in (None, d.seq_len):
        raise RecipeError(f"data.tokens_per_sample: {d.tokens_per_sample!r} is not valid with data.dataset tokens; "
                          f"allowed: null (it is data.seq_len, {d.seq_len})")
    d.tokens_per_sample = d.seq_len
    if d.augment:
        d.augment = False                      # token windows have no augmentation


def check_token_files(path: str, value, example: str) -> None:
    """data.train / data.validation of token data: a file or glob of .bin/.npy files, a non-empty list of
    them, or a mapping of them to mixture weights (numbers > 0)."""
    allowed = (f"a token file (.bin of ids, or .npy), e.g. {example}, a glob of shards, a list of them, or a "
               "mapping of them to mixture weights ({web/*.npy: 0.75, code/*.npy: 0.25})")
    items = list(value) if isinstance(value, (list, dict)) else [value]
    if not items or any(not isinstance(item, str) or not item.strip() for item in items):
        raise RecipeError(f"{path}: {value!r} is not valid; allowed: {allowed} (required for data.dataset tokens)")
    for item in items:
        if not item.endswith((".bin", ".npy")):
            raise RecipeError(f"{path}: {item!r} is not valid; allowed: a .bin (flat ids, as nanoGPT writes) or .npy "
                              "token file, or a glob, list or mapping of them")
    if isinstance(value, dict):
        for item, weight in value.items():
            if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not 0 < weight < float("inf"):
                raise RecipeError(f"{path}[{item!r}]: {weight!r} is not valid; allowed: a mixture weight, a number > 0")


def check_optimizer(r: Recipe) -> None:
    """optimizer: its name and kernel, the Adam family's keys in range (and only there), clipping positive."""
    o = r.optimizer
    one_of("optimizer.name", o.name, OPTIMIZERS)
    one_of("optimizer.kernel", o.kernel, KERNELS)
    at_least("optimizer.weight_decay", o.weight_decay, 0.0)
    if o.clip_grad_norm is not None and not o.clip_grad_norm > 0:
        raise RecipeError(f"optimizer.clip_grad_norm: {o.clip_grad_norm!r} is not valid; allowed: a number > 0, or "
                          "null (no clipping)")
    for key, low, high, what in (("betas", 0.0, 1.0, "in [0, 1)"), ("nus", 0.0, 1.0, "in [0, 1]")):
        value = getattr(o, key)
        upper_ok = (lambda v, high=high: v < high) if key == "betas" else (lambda v, high=high: v <= high)
        if not (len(value) == 2 and all(isinstance(v, (int, float)) and not isinstance(v, bool) and low <= v
                                        and upper_ok(v) for v in value)):
            raise RecipeError(f"optimizer.{key}: {value!r} is not valid; allowed: two numbers {what}")
    at_least("optimizer.eps", o.eps, 0.0)
    if o.name not in ADAM_FAMILY:
        defaults = Optimizer()
        for key in ("betas", "nus", "eps", "decouple_weight_decay", "weight_decay_all"):
            if getattr(o, key) != getattr(defaults, key):
                raise RecipeError(f"optimizer.{key}: {getattr(o, key)!r} is not valid with optimizer.name {o.name!r}; "
                                  f"allowed: its default, or optimizer.name qhadam or adamw")
    elif o.name == "adamw" and o.decouple_weight_decay is False:
        raise RecipeError("optimizer.decouple_weight_decay: False is not valid with optimizer.name adamw; allowed: "
                          "null or true (AdamW's decay is decoupled; coupled L2: qhadam)")
    if o.name in ADAM_FAMILY and o.kernel == "compiled":
        raise RecipeError(f"optimizer.kernel: 'compiled' is not valid with optimizer.name {o.name!r}; allowed: "
                          "foreach or loop (adamw: fused where torch has it)")


def check_duration(r: Recipe) -> None:
    """``epochs: M`` or one of ``train.steps | samples | tokens``, a positive count."""
    given = [f"train.{k}" for k in ("steps", "samples", "tokens") if getattr(r.train, k) is not None]
    if len(given) > 1:
        raise RecipeError(f"{given[1]}: {getattr(r.train, given[1][6:])!r} is not valid with {given[0]}; allowed: "
                          "one duration (train.steps, train.samples or train.tokens, or epochs)")
    if given:
        units.in_unit(given[0], getattr(r.train, given[0][6:]), given[0][6:-1])
    if given and r.epochs is not None:
        raise RecipeError(f"epochs: {r.epochs!r} is not valid with {given[0]}; allowed: one duration (epochs, or "
                          "one of train.steps, train.samples, train.tokens)")
    if not given and r.epochs is None:
        r.epochs = 1
    if r.epochs is not None:
        at_least("epochs", r.epochs, 1)
        at_most("epochs", r.epochs, MAX_EPOCHS)


MAX_LENGTH = 10 ** 15          # a run's length in steps, samples or tokens (a quadrillion tokens: far past any run)


def check_units(r: Recipe) -> None:
    """schedule.unit and every amount counted in a unit: interval, warmup and decay in the schedule's,
    eval.every and checkpoint.every in any but the epoch, tokens only where a sample's tokens are known."""
    s, unit = r.schedule, r.schedule.unit
    one_of("schedule.unit", unit, UNITS)
    one_of("schedule.lr.batch_scaling", s.lr.batch_scaling, BATCH_SCALINGS)
    r.interval()
    placeholder_length(r)
    given = r.train.duration()
    if given is not None and r.duration()[1] > MAX_LENGTH:
        raise RecipeError(f"train.{given[0]}s: {given[1]!r} is not valid; allowed: at most {MAX_LENGTH:.0e} "
                          f"{given[0]}s")
    for path, value, other in (("eval.every", r.eval.every, "eval.every_steps"),
                               ("checkpoint.every", r.checkpoint.every, "checkpoint.every_steps")):
        if value is None:
            continue
        named, _ = units.parse(path, value, unit)
        if keys.get(r.to_dict(), other):
            raise RecipeError(f"{path}: {value!r} is not valid with {other}; allowed: one of the two")
        if named == "epoch":
            raise RecipeError(f"{path}: {value!r} is not valid; allowed: a count with its unit ('10M tokens', "
                              f"'50K samples', '500 steps'){' (or eval.every_epochs)' if path[0] == 'e' else ''}")
    if r.data.tokens_per_sample is not None:
        at_least("data.tokens_per_sample", r.data.tokens_per_sample, 1)
    elif uses_tokens(r):
        raise RecipeError(f"{uses_tokens(r)}: counted in tokens, and data.tokens_per_sample is not set; allowed: "
                          "data.tokens_per_sample: T (the tokens of every sample), or another unit")


def check_branch(r: Recipe) -> None:
    """A branch: a parent, a step >= 0, an integer factor >= 1, a rule, a length in a step unit."""
    b = r.branch
    if b.parent is None:
        return
    at_least("branch.at_step", b.at_step, 0)
    at_least("branch.factor", b.factor, 1)
    one_of("branch.lr_rule", b.lr_rule, BATCH_SCALINGS)
    at_least("branch.seed", b.seed, 0)
    if b.length is None:
        raise RecipeError("branch.length: missing; allowed: how long the branch trains ('100K tokens', '30 steps')")
    unit, length = units.parse("branch.length", b.length, r.schedule.unit if r.schedule.unit != "epoch" else "step")
    at_most("branch.length", length, MAX_LENGTH)
    if unit == "epoch":
        raise RecipeError(f"branch.length: {b.length!r} is not valid; allowed: a count of steps, samples or tokens")
    if r.schedule.batch.decided_during_run:
        raise RecipeError("branch.parent: a run whose batch is adaptive is not valid; allowed: a parent with a fixed "
                          "batch schedule (the branch multiplies it)")


def uses_tokens(r: Recipe) -> str | None:
    """The first key that counts tokens, or None."""
    if r.schedule.unit == "token":
        return "schedule.unit"
    if r.train.tokens is not None:
        return "train.tokens"
    for path, value in (("eval.every", r.eval.every), ("checkpoint.every", r.checkpoint.every)):
        if value is not None and units.parse(path, value, r.schedule.unit)[0] == "token":
            return path
    return None


