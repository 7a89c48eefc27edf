"""What must hold before any worker starts (``run``, ``submit``, ``sweep``): the output folder can be
written, the data is there, the user's factories resolve and return what they must, and every stage
splits over the world. Each problem is one line (a :class:`UserError`)."""
from __future__ import annotations

import os
from pathlib import Path

from launcher.config import Recipe
from launcher.errors import UserError
from launcher.train.splits import EpochSplit, split_epochs


def preflight(recipe: Recipe, world_size: int, check_data: bool = True) -> list[EpochSplit]:
    """What must hold before any worker starts: the output folder can be written, the data is there,
    the user's factories resolve and return what they must, and every stage splits."""
    from launcher import data
    from launcher.train import losses
    from launcher.train import models
    check_output(recipe)
    if not check_data:                      # submit --dry-run on a login node: no data, no factories
        splits = [] if recipe.data.factory else split_epochs(recipe, data.sizes(recipe.data)[0], world_size)
    else:
        data.check_available(recipe.data)
        n = data.sizes(recipe.data)[0]      # calls a data factory: its errors are one line here
        if not isinstance(recipe.model, str):
            models.user_model(recipe.model)
        losses.from_recipe(recipe.loss)
        splits = split_epochs(recipe, n, world_size)
    check_graphs(recipe, splits)
    return splits


GRAPH_MODES = ("reduce-overhead", "max-autotune")     # torch.compile modes that capture CUDA graphs


def check_graphs(recipe: Recipe, splits: list[EpochSplit]) -> None:
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
    accumulating = [s for s in splits if s.accum > 1]
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
    if recipe.distributed.batch_norm == "sync" and world > 1:
        raise UserError("distributed.batch_norm: 'sync' is not valid here; allowed: local (torch's "
                        "SyncBatchNorm needs CUDA devices, and this machine has none)")
    if recipe.performance.cuda_graphs:
        raise UserError("performance.cuda_graphs: true is not valid here; allowed: false (CUDA graphs need CUDA "
                        "devices, and this machine has none)")
