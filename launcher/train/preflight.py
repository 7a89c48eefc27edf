"""What must hold before any worker starts (``run``, ``submit``, ``sweep``): the output folder can be
written, the data is there, the user's factories resolve and return what they must, and every stage
splits over the world. Each problem is one line (a :class:`UserError`)."""
from __future__ import annotations

import os
from pathlib import Path

import yaml

from launcher import config as recipe_mod
from launcher import engines
from launcher.config import Recipe
from launcher.errors import UserError, one_line
from launcher.train.planning import Stage, micro_cap, split_batch, split_epochs


def preflight(recipe: Recipe, world_size: int, check_data: bool = True) -> list[Stage]:
    """What must hold before any worker starts: the output folder can be written, the data is there,
    the user's factories resolve and return what they must, and every stage splits."""
    return preflight_worlds(recipe, [world_size], check_data)


def preflight_worlds(recipe: Recipe, world_sizes: list[int], check_data: bool = True) -> list[Stage]:
    """:func:`preflight` for each of ``world_sizes``: what does not depend on the world size (the folder,
    the data, the factories' one-sample calls, the engine's config) once, the split and what depends on it
    per world size. The plan on the last is returned."""
    from launcher import data
    from launcher.train import losses
    check_output(recipe)
    if not check_data:                      # submit --dry-run on a login node: no data, no factories
        n = None if recipe.data.factory else data.sizes(recipe.data)[0]
    else:
        data.check_available(recipe.data)
        if recipe.data.factory or recipe.data.dataset in ("imagefolder", "tokens") or not isinstance(recipe.model, str):
            # the user's own data or model: every factory called once, here, and a step's forward and loss
            # run on one sample; their errors are one line
            trained_on = check_samples_once(recipe)
            n = trained_on if recipe.data.factory else data.sizes(recipe.data)[0]
        else:
            n = data.sizes(recipe.data)[0]
            losses.from_recipe(recipe.loss, losses.per_token(recipe))
    for world_size in world_sizes:
        stages = [] if n is None else split_epochs(recipe, n, world_size)
        check_graphs(recipe, stages)
        check_adaptive(recipe, world_size)
    engines.preflight(recipe, check_data, lambda: cpu_model(recipe))
    return stages


def check_membership(recipe: Recipe, nproc: int, nodes: tuple[int, int], option: str,
                     check_data: bool = True) -> list[Stage]:
    """:func:`preflight` for every world size torchrun's membership of ``nodes`` (MIN, MAX) may take: it
    resumes on the nodes left, so each must split the batches, and an engine whose checkpoint loads only on
    the world size that wrote it cannot take part. ``option``: what the user typed, for the refusal. The
    plan on MAX nodes, the one the run starts on, is returned."""
    low, high = nodes
    if low < high:
        why = engines.move_refusal(recipe.to_dict())
        if why:
            raise UserError(f"{option} (elastic membership) resumes on the nodes left, and {why}; allowed: a fixed "
                            "number of nodes, or distributed.engine ddp or fsdp, or distributed.zero_stage 0, or "
                            "optimizer.name adamw (one parameter group under ZeRO-3)")
    return preflight_worlds(recipe, [nproc * count for count in range(low, high + 1)], check_data)


def cpu_model(recipe: Recipe):
    """The recipe's model on the CPU in float32 (for an engine's check of its modules)."""
    import torch
    from launcher import data
    from launcher.train import models
    dataset = data.load(recipe.data, torch.device("cpu"), torch.float32)
    return models.build(recipe.model, dataset.shape, dataset.num_classes, recipe.seed, torch.float32)


def check_adaptive(recipe: Recipe, world_size: int) -> None:
    """An adaptive batch grows by the measured noise scale: where it cannot be measured it never would."""
    from launcher.train import noise
    b = recipe.schedule.batch
    if not b.decided_during_run:
        return
    kind, why = noise.source(recipe, world_size, split_batch(b.initial, world_size, micro_cap(recipe))[1] > 1)
    if kind == noise.RANKS and b.initial < 2:
        kind, why = None, (f"a batch of {b.initial} on {world_size} processes: no rank has fewer samples than the "
                           "global batch, so no step has two batch sizes")
    if kind is None:
        raise UserError(f"schedule.batch.kind: 'adaptive' is not valid here: the noise scale it grows by cannot be "
                        f"measured ({why}); allowed: 2 or more processes, or one with accumulation "
                        "(distributed.max_micro_batch below schedule.batch.initial), on engine ddp (fsdp: 2 or more "
                        "processes) with tracking.noise_scale true; or a fixed schedule (exponential, constant)")


_checked: dict[str, int] = {}


def check_samples_once(recipe: Recipe) -> int:
    """:func:`check_samples`, once per data, model and loss in this process: a sweep's points differ in
    schedules and seeds, and 10,000 of them must not call the user's factories 10,000 times."""
    import json
    from dataclasses import asdict
    key = json.dumps([asdict(recipe.data), recipe.model if isinstance(recipe.model, str) else asdict(recipe.model),
                      asdict(recipe.loss), recipe.precision, os.getcwd()], sort_keys=True, default=str)
    if key not in _checked:
        _checked[key] = check_samples(recipe)
    return _checked[key]


def check_samples(recipe: Recipe) -> int:
    """Read one training and one test sample here, in the launcher, and run what a step runs on them (the
    model's forward, the loss), so that a dataset returning PIL images, labels the model cannot take or a
    model that cannot take the inputs is one line naming the key (not a traceback from every rank).
    Returns the number of training samples (validation held out)."""
    import torch
    from launcher import data
    from launcher.train import losses, models
    from launcher.train.models import DTYPES
    dtype = DTYPES[recipe.precision]
    dataset = data.load(recipe.data, torch.device("cpu"), dtype)
    key = "data.factory" if recipe.data.factory else ("data.train" if recipe.data.dataset == "tokens" else "data.root")
    where = f"{key}: {recipe.data.factory or recipe.data.train or recipe.data.root!r}"
    (x, y), (tx, ty) = (_sample(split, name, where) for split, name in ((dataset.train, "train"),
                                                                         (dataset.test, "test")))
    if x.shape != tx.shape:
        raise UserError(f"{where}: train[0] input has shape {tuple(x.shape)} and test[0] {tuple(tx.shape)}; "
                        "allowed: one input shape for every sample (resize or crop in the dataset's transform)")
    model_key = "model.factory" if getattr(recipe.model, "factory", None) else "model"
    module = models.build(recipe.model, tuple(x.shape), dataset.num_classes, recipe.seed, dtype)
    if not any(p.requires_grad for p in module.parameters()):
        raise UserError(f"{model_key}: the model has no trainable parameters; allowed: a model with parameters")
    module.eval()
    inputs = torch.stack([x, tx]).to(dtype if x.is_floating_point() else x.dtype)
    vocab = getattr(getattr(module, "tokens", None), "num_embeddings", None)     # the built-in GPT's
    if vocab is not None and not inputs.is_floating_point() and int(inputs.max()) >= vocab:
        raise UserError(f"{where}: a token id {int(inputs.max())} is out of range for the model's vocabulary of {vocab}; "
                        f"allowed: ids in [0, {vocab}) (model.vocab, or the data's vocabulary, meta.json)")
    try:
        with torch.no_grad():
            out = module(inputs)
    except Exception as exc:  # the user's model on the user's data: one line
        raise UserError(f"{model_key}: the forward pass of train[0] and test[0] (inputs {tuple(x.shape)}, {x.dtype}) "
                        f"raised {type(exc).__name__}: {one_line(exc)}") from exc
    loss = losses.from_recipe(recipe.loss, losses.per_token(recipe))
    target = torch.stack([y, ty])
    if loss.per_token:                      # next-token logits (batch, seq, vocab) and token ids in range
        check_next_tokens(out, target, model_key, where)
    elif (loss.per_sample is not None and dataset.num_classes and out.dim() == 2 and target.dim() == 1
          and not target.is_floating_point() and out.shape[1] < dataset.num_classes):
        raise UserError(f"{model_key}: the model gives {out.shape[1]} outputs and the data has {dataset.num_classes} "
                        f"classes; allowed: a model with {dataset.num_classes} outputs (a loss.factory taking class "
                        "indices indexes the outputs by them)")
    elif loss.per_sample is None:           # cross-entropy: class logits and class indices in their range
        if target.is_floating_point() or target.dtype == torch.bool:
            raise UserError(f"{where}: train[0] target is {y.tolist()!r} ({y.dtype}); allowed: an integer class "
                            "index for cross-entropy (or a loss.factory for other targets)")
        classes = out.shape[1] if out.dim() == 2 else None
        if classes is None:
            raise UserError(f"{model_key}: the model gives outputs of shape {tuple(out.shape)} for a batch of 2; "
                            "allowed: class logits of shape (batch, classes) for cross-entropy (or a loss.factory)")
        if dataset.num_classes and classes < dataset.num_classes:
            raise UserError(f"{model_key}: the model gives {classes} outputs and the data has {dataset.num_classes} "
                            f"classes; allowed: a model with {dataset.num_classes} outputs")
        bad = [(name, int(t)) for name, t in (("train[0]", y), ("test[0]", ty)) if not 0 <= int(t) < classes]
        if bad:
            raise UserError(f"{where}: {bad[0][0]} target {bad[0][1]} is out of range for the model's {classes} "
                            f"outputs; allowed: class indices in [0, {classes}) (or a model with more outputs)")
    try:
        value = loss(out.float(), target)
    except UserError:
        raise
    except Exception as exc:
        raise UserError(f"loss: on the model's outputs {tuple(out.shape)} and targets {tuple(target.shape)} it raised "
                        f"{type(exc).__name__}: {one_line(exc)}") from exc
    if not torch.isfinite(value):
        raise UserError(f"{where}: the loss of train[0] and test[0] is {float(value)} before any training; "
                        "allowed: finite inputs and targets")
    check_gradients(module, inputs, target, loss, model_key)
    if dataset.streamed and recipe.data.workers > 0:
        check_sendable(dataset, where, recipe.data.workers)
    return len(dataset.train)


def check_next_tokens(out, target, model_key: str, where: str) -> None:
    """A language model's outputs and targets: logits (batch, seq, vocab), targets (batch, seq) of ids in
    [0, vocab) or -100 (left out)."""
    from launcher.train.losses import IGNORE
    if out.dim() != 3 or target.shape != out.shape[:2]:
        raise UserError(f"{model_key}: the model gives outputs of shape {tuple(out.shape)} for targets of shape "
                        f"{tuple(target.shape)}; allowed: next-token logits (batch, seq, vocab) for targets (batch, seq)")
    if target.is_floating_point():
        raise UserError(f"{where}: targets are {target.dtype}; allowed: integer token ids (or -100, left out)")
    vocab, counted = out.shape[-1], target[target != IGNORE]
    if counted.numel() and not (0 <= int(counted.min()) and int(counted.max()) < vocab):
        raise UserError(f"{where}: a target id {int(counted.max())} is out of range for the model's {vocab} outputs; "
                        f"allowed: ids in [0, {vocab}) (model.vocab, or the data's vocabulary)")


def check_sendable(dataset, where: str, workers: int) -> None:
    """Each split's dataset must pickle: DataLoader workers get it from the rank's fork server (see
    launcher/data/streamed.py), not by inheriting the rank's memory."""
    from launcher.data.streamed import unpicklable
    failed = unpicklable({name: split.base for name, split in dataset.named_splits().items()})
    if failed:
        name, why = failed
        raise UserError(f"{where}: the {name} dataset cannot be sent to the data.workers: {workers} worker "
                        f"processes, it does not pickle ({one_line(why)}); allowed: a dataset built from "
                        "classes and functions defined at a module's top level (no lambdas, local functions, "
                        "open files or locks), or data.workers: 0 (samples read in each rank itself)")


def check_gradients(module, inputs, target, loss, model_key: str) -> None:
    """One training-mode forward and backward on the two samples: every trainable parameter must get a
    gradient (DDP's reducer otherwise stops the second step with a ten-line error on every rank). A
    model whose training-mode output is not a tensor (auxiliary heads) is left to the run."""
    import torch
    module.train()
    try:
        out = module(inputs)
        if not isinstance(out, torch.Tensor):
            return
        loss(out.float(), target).sum().backward()
    except Exception as exc:
        raise UserError(f"{model_key}: a training step on train[0] and test[0] raised {type(exc).__name__}: "
                        f"{one_line(exc)}") from exc
    unused = [name for name, p in module.named_parameters() if p.requires_grad and p.grad is None]
    if unused:      # DDP's reducer would stop the second step with a 10-line error, on every rank
        raise UserError(f"{model_key}: {len(unused)} trainable parameter(s) get no gradient from the loss "
                        f"({', '.join(unused[:3])}{', ...' if len(unused) > 3 else ''}); allowed: a model whose "
                        "trainable parameters all take part in the loss (freeze the others: requires_grad_(False))")


def _sample(split, name: str, where: str):
    """(input, target) of ``split``'s first sample, as tensors; one line naming what is wrong otherwise."""
    import numbers
    import numpy as np
    import torch
    if hasattr(split, "images"):                # in memory: tensors already
        return split.images[0], split.labels[0]
    try:
        item = split.base[0]
    except Exception as exc:
        raise UserError(f"{where}: reading {name}[0] raised {type(exc).__name__}: {one_line(exc)}") from exc
    if not (isinstance(item, (tuple, list)) and len(item) == 2):
        raise UserError(f"{where}: {name}[0] is {type(item).__name__}; allowed: a pair (input, target)")
    x, y = item
    kind = f"{type(x).__module__}.{type(x).__name__}"
    if kind.startswith("PIL."):
        raise UserError(f"{where}: {name}[0] input is a {kind}; allowed: a tensor or array (add "
                        "torchvision.transforms.ToTensor() to the dataset's transform)")
    if not isinstance(x, (torch.Tensor, np.ndarray)):
        raise UserError(f"{where}: {name}[0] input is a {kind}; allowed: a torch.Tensor or numpy array of numbers")
    x = torch.as_tensor(x)
    if not (x.is_floating_point() or x.dtype in (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)):
        raise UserError(f"{where}: {name}[0] input has dtype {x.dtype}; allowed: a numeric dtype")
    if not isinstance(y, (torch.Tensor, np.ndarray, numbers.Number)) or isinstance(y, bool):
        raise UserError(f"{where}: {name}[0] target is {y!r} ({type(y).__name__}); allowed: a number or a tensor "
                        "(an integer class index for cross-entropy)")
    return x, torch.as_tensor(y)


GRAPH_MODES = ("reduce-overhead", "max-autotune")     # torch.compile modes that capture CUDA graphs


def check_graphs(recipe: Recipe, stages: list[Stage]) -> None:
    """CUDA graphs (performance.cuda_graphs, or compile modes that capture them) with gradient
    accumulation: a captured micro-step leaves its gradients in graph memory that the next micro-step
    overwrites, so a step over several micro-batches would be wrong. Refused in one line, naming the
    first stage that accumulates."""
    perf = recipe.performance
    graphs = perf.cuda_graphs or perf.compile in GRAPH_MODES
    if not graphs:
        return
    key, value = ("performance.cuda_graphs", True) if perf.cuda_graphs else ("performance.compile", perf.compile)
    if recipe.distributed.max_micro_batch == "auto":
        raise UserError(f"{key}: {value!r} is not valid with distributed.max_micro_batch: auto (it may choose "
                        "gradient accumulation, whose micro-steps CUDA graphs would overwrite); allowed: an integer "
                        "max_micro_batch that gives accumulation 1 in every stage, or compile off/default")
    accumulating = [s for s in stages if s.accum > 1]
    if accumulating:
        s = accumulating[0]
        raise UserError(f"{key}: {value!r} is not valid with gradient accumulation (epoch {s.epoch}: batch {s.batch} "
                        f"= {s.micro_batch} x {s.accum} x {s.world_size}; CUDA graphs would overwrite one micro-step's "
                        "gradients with the next's); allowed: a larger distributed.max_micro_batch (accumulation 1 "
                        "in every stage), more ranks, or compile off/default")


def check_output(recipe: Recipe) -> None:
    """The run folder can be created and written: ``output`` (and the run folder) are folders, or do
    not exist yet under a writable one."""
    for path, key in ((recipe.run_dir, "name"), (Path(recipe.output), "output")):
        if path.is_symlink() and not path.exists():
            raise UserError(f"{key}: {str(path)!r} is a symbolic link that leads nowhere (broken, or a loop); "
                            "allowed: a folder (or a path that does not exist yet)")
        if path.exists() and not path.is_dir():
            raise UserError(f"{key}: {str(path)!r} is a file; allowed: a folder (or a path that does not exist yet)")
    recipe.folder.refuse_links()        # a link, a folder where a file goes, what this user cannot write
    probe = recipe.run_dir
    while not probe.exists():
        probe = probe.parent
    if not os.access(probe, os.W_OK | os.X_OK):
        raise UserError(f"output: {recipe.output!r} cannot be written ({str(probe)!r} is not writable); "
                        "allowed: a folder you can write to")


CPU_PROCESSES = 2     # nproc_per_node auto without GPUs: two ranks, so the gradient reduce is exercised on CPU too


def resolve_nproc(recipe: Recipe, visible_gpus: int, log=print) -> int:
    """distributed.nproc_per_node auto (what the demo uses): one process per visible GPU, or
    CPU_PROCESSES on a machine without any; written into the recipe (the workers read a number) and
    said in one log line. A number the user chose is kept as it is."""
    nproc = recipe.distributed.nproc_per_node
    if nproc != "auto":
        return nproc
    nproc = visible_gpus or CPU_PROCESSES
    where = f"one per visible GPU ({visible_gpus})" if visible_gpus else "no GPU here: processes on CPU"
    log(f"[qhm-launch] distributed.nproc_per_node auto: {nproc} process{'es' if nproc > 1 else ''}, {where}")
    recipe.distributed.nproc_per_node = nproc
    return nproc


def visible_gpus() -> int:
    import torch
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def check_devices(recipe: Recipe, world: int, has_cuda: bool, visible: int | None = None) -> None:
    """What needs CUDA where there is none, and more processes per node than GPUs where there are some:
    one line, before any worker starts (and again in each worker, for a run started without the
    launcher). ``visible``: the GPUs this node's processes can see (None: not checked)."""
    if has_cuda:
        nproc = recipe.distributed.nproc_per_node
        if visible is not None and isinstance(nproc, int) and nproc > visible:
            shown = os.environ.get("CUDA_VISIBLE_DEVICES")
            raise UserError(f"distributed.nproc_per_node: {nproc} processes asked, {visible} GPU"
                            f"{'s' if visible != 1 else ''} visible here"
                            f"{f' (CUDA_VISIBLE_DEVICES={shown})' if shown is not None else ''}; allowed: at most "
                            f"{visible} (one process per GPU), or auto")
        return
    if recipe.slurm.gpus_per_node > 0:
        import torch
        shown = os.environ.get("CUDA_VISIBLE_DEVICES")
        why = (f"CUDA_VISIBLE_DEVICES={shown!r}" if shown is not None and not shown.strip() else
               f"a driver older than this torch's CUDA {torch.version.cuda}, or a CPU-only torch"
               if torch.version.cuda else "this torch is built without CUDA")
        raise UserError(f"slurm.gpus_per_node: {recipe.slurm.gpus_per_node} GPU(s) per node asked, and torch sees no "
                        f"GPU here ({why}); allowed: a node whose GPUs torch can use, or slurm.gpus_per_node: 0 "
                        "for a CPU run (a rank on CPU would meet the other nodes' NCCL ranks with gloo and hang)")
    if recipe.distributed.batch_norm == "sync" and world > 1:
        raise UserError("distributed.batch_norm: 'sync' is not valid here; allowed: local (torch's "
                        "SyncBatchNorm needs CUDA devices, and this machine has none)")
    if recipe.performance.cuda_graphs:
        raise UserError("performance.cuda_graphs: true is not valid here; allowed: false (CUDA graphs need CUDA "
                        "devices, and this machine has none)")


NATIVE_BF16_FLAGS = {"avx512_bf16", "amx_bf16", "bf16"}     # x86 (AVX-512 BF16, AMX), Arm (FEAT_BF16)


def slow_precision_warning(recipe: Recipe, has_cuda: bool, cpuinfo: Path = Path("/proc/cpuinfo")) -> str | None:
    """bf16 autocast on a CPU with no bf16 instructions is emulated: about 20x slower than fp32 (ResNet-18
    at batch 4: 3.6-5.2 s a step against 0.2 s). Worth a line at start; None when it does not apply or
    the CPU's flags cannot be read."""
    if recipe.precision != "bf16" or has_cuda:
        return None
    try:
        flags = {word for line in cpuinfo.read_text().splitlines()
                 if line.split(":")[0].strip() in ("flags", "Features") for word in line.split(":", 1)[1].split()}
    except (OSError, IndexError):
        return None
    if not flags or flags & NATIVE_BF16_FLAGS:
        return None
    return ("qhm-launch: WARNING: precision bf16 on this CPU, which has no bf16 instructions (none of "
            f"{', '.join(sorted(NATIVE_BF16_FLAGS))} in {cpuinfo}): emulated, often ~20x slower than fp32; "
            "precision: fp32 is the fast choice here")


def check_resume(recipe: Recipe, force: bool, world: int, log=print) -> None:
    """Refuse a checkpoint written under other trajectory-changing fields (one-line diff), or one
    that this engine cannot load on ``world`` processes."""
    from launcher.run.checkpoint import CheckpointManager
    # quiet: the worker reports an invalid newest checkpoint itself when it resumes
    found = CheckpointManager(recipe.folder, log=lambda *a: None).find_latest_valid()
    if found is None:
        check_no_other_results(recipe)
        return
    if found.manifest["world_size"] != world:
        from launcher import engines
        why = engines.move_refusal(found.manifest["recipe"])
        if why:
            raise UserError(f"distributed.nproc_per_node: checkpoint {found.path} was written on "
                            f"{found.manifest['world_size']} processes and cannot be loaded on {world}: {why}; "
                            f"allowed: resume on {found.manifest['world_size']} processes")
    if recipe_mod.is_branch_start(recipe, found.manifest):   # a branch's start: the parent's checkpoint, which differs by design
        return
    diff = recipe_mod.trajectory_diff(found.manifest["recipe"], recipe.to_dict())
    if not diff:
        return
    if force:
        log("qhm-launch: WARNING: --force-resume: resuming " + str(found.path) + " although the recipe differs: "
            + "; ".join(diff))
        return
    raise UserError(f"recipe differs from checkpoint {found.path}: {'; '.join(diff)} "
                    "(use another name, or --force-resume)")


def check_no_other_results(recipe: Recipe) -> None:
    """A folder with no checkpoint to resume that holds another recipe's results (complete.json, the final
    model, metrics or step rows: a finished run whose checkpoints were deleted, say) is never trained over:
    refused in one line naming what is there. The same recipe starts again (it writes the same results)."""
    folder = recipe.folder
    results = [p.name for p in (folder.complete, folder.final_model, folder.metrics, folder.steps)
               if p.is_file() and p.stat().st_size > 0]
    if not results:
        return
    done = folder.read_json(folder.complete) or {}
    theirs = done.get("recipe_hash")
    if theirs is None and folder.recipe.is_file():
        try:
            theirs = recipe_mod.trajectory_hash(yaml.safe_load(folder.recipe.read_text()) or {})
        except Exception:  # noqa: BLE001 - an unreadable recipe.yaml: the results are of an unknown recipe
            theirs = "unknown (its recipe.yaml does not read)"
    mine = recipe_mod.trajectory_hash(recipe.to_dict())
    if theirs is not None and theirs != mine:
        raise UserError(f"run folder {folder.path}: holds another recipe's results ({', '.join(results)}; its recipe "
                        f"hash {theirs}, this recipe's {mine}) and no checkpoint to resume; allowed: another name "
                        f"(--set name=...) or output, or move {folder.path} aside to keep what is there")
