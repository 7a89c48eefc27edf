"""The training loop of one worker: plan -> resume -> epochs of steps -> eval -> checkpoint.

It reads top to bottom: :func:`train` is the loop; :func:`train_step` is one optimizer step over the
planned micro-batches; evaluation and the full-gradient norm follow. No callbacks.
"""
from __future__ import annotations

import contextlib
import json
import os
import random
import sys
import time
from dataclasses import asdict, dataclass, fields

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

import qhm

from . import data as data_mod
from . import engines, models, planning, recipe as recipe_mod
from .checkpoint import CheckpointManager, NoValidCheckpoint
from .signals import PREEMPTED, PreemptionFlag
from .tracking import MetricsLog, Tracker, run_id

DTYPES = {"fp32": torch.float32, "bf16": torch.float32, "fp64": torch.float64}


@dataclass
class TrainState:
    """Where training stands; saved in every checkpoint."""
    epoch: int = 0             # the epoch in progress
    step: int = 0              # optimizer steps done in that epoch
    global_step: int = 0
    samples: int = 0           # SFO: per-sample gradients computed so far
    min_grad_norm: float = float("inf")
    best_test_acc: float = 0.0
    wall_time: float = 0.0     # seconds trained so far, over all restarts

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, d: dict) -> None:
        for f in fields(self):
            setattr(self, f.name, d[f.name])


def rng_state() -> dict:
    np_state = np.random.get_state()
    out = {"python": random.getstate(), "torch": torch.get_rng_state(),
           "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]]}
    if torch.cuda.is_available():
        out["cuda"] = torch.cuda.get_rng_state_all()
    return out


def set_rng_state(state: dict | None, seed: int, rank: int, step: int) -> None:
    """Restore this rank's RNG; a rank the checkpoint did not have derives it from (seed, rank, step)."""
    if state is None:
        g = data_mod.keyed_generator(seed, "rank_rng", rank, step)
        s = int(torch.randint(0, 2 ** 31 - 1, (1,), generator=g))
        random.seed(s)
        np.random.seed(s)
        torch.manual_seed(s)
        return
    random.setstate(state["python"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def build_optimizer(recipe, module):
    s = recipe.schedule_spec()
    kernel = recipe.optimizer.kernel
    return qhm.QHM(module.parameters(), lr=s.lr(0), beta=s.beta(0), gamma=s.gamma(0),
                   weight_decay=recipe.optimizer.weight_decay,
                   foreach=kernel == "foreach", fused=kernel == "fused" or None)


def train(recipe, comm, preempt: PreemptionFlag | None = None, log=print) -> int:
    """Train (or resume) the run this recipe names. Returns 0, or PREEMPTED after a saved preemption."""
    log = log if comm.is_main else (lambda *a, **k: None)
    run_dir = recipe.run_dir
    start = time.time()
    device, dtype = comm.device, DTYPES[recipe.precision]
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if recipe.precision == "bf16"
                else contextlib.nullcontext())
    preempt = preempt or PreemptionFlag(recipe.signals.preempt)

    if comm.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "preempted.json").unlink(missing_ok=True)
        (run_dir / "preempt.request").unlink(missing_ok=True)
        if recipe.data.download:               # rank 0 downloads first; the others wait at the barrier
            data_mod.load(recipe.data, torch.device("cpu"), dtype, is_first=True)
    comm.barrier()
    dataset = data_mod.load(recipe.data, device, dtype, is_first=False)
    n = len(dataset.train)
    plan = planning.plan(recipe, n, comm.world)
    module = models.build(recipe.model, dataset.shape, dataset.num_classes, recipe.seed, dtype).to(device)
    engine = engines.build(recipe, module, build_optimizer(recipe, module), comm, plan[0])
    sampler = data_mod.GlobalBatchSampler(n, recipe.seed)
    state = TrainState()
    running = torch.zeros(3, dtype=torch.float64, device=device)    # loss sum, correct, samples (this rank)

    # ---- resume from the newest valid checkpoint, if any
    ckpt = CheckpointManager(run_dir, comm.rank, comm.world, recipe.checkpoint.keep, comm, log=log)
    found, problem = None, None
    if comm.is_main:
        try:
            found = ckpt.find_latest_valid()
        except NoValidCheckpoint as exc:
            problem = str(exc)
    found, problem = comm.broadcast((found, problem))
    if problem:                                  # every rank stops the same way, before training
        raise recipe_mod.RecipeError(problem)
    wandb_from_ckpt = None
    if found is not None:
        saved, mine = ckpt.load(found)
        engine.load(saved["engine"], found.path)
        state.load_state_dict(saved["train"])
        wandb_from_ckpt = saved["wandb_id"]
        if mine is not None and found.manifest["world_size"] == comm.world:
            running.copy_(mine["running"])
        elif comm.is_main:                     # another world size: rank 0 carries the epoch's sums
            running.copy_(saved["running_total"])
        set_rng_state(mine["rng"] if mine is not None else None, recipe.seed, comm.rank, state.global_step)
        log(f"[qhm-launch] resumed from {found.path} (epoch {state.epoch}, step {state.step}, "
            f"global step {state.global_step}, written by {found.manifest['world_size']} processes)")
    else:
        set_rng_state(None, recipe.seed, comm.rank, 0)
    metrics = MetricsLog(run_dir / "metrics.jsonl")
    tracker, wandb_id = None, None
    if comm.is_main:
        metrics.keep_before(state.epoch)
        wandb_id = run_id(run_dir, wandb_from_ckpt)
        tracker = Tracker(recipe, run_dir, wandb_id)
    wandb_id = comm.broadcast(wandb_id)

    def save(tag: str) -> None:
        total = comm.all_reduce_sum(running.clone())
        extra = getattr(engine, "write_checkpoint_files", None)
        path = ckpt.save(state.global_step,
                         state={"engine": engine.state_dict(), "train": state.state_dict(), "wandb_id": wandb_id,
                                "running_total": total.cpu()},
                         rank_state={"rng": rng_state(), "running": running.cpu()},
                         manifest={"position": state.state_dict(), "recipe": recipe.to_dict(),
                                   "recipe_hash": recipe_mod.trajectory_hash(recipe.to_dict()),
                                   "wandb_id": wandb_id, "tag": tag},
                         write_extra=extra)
        log(f"[qhm-launch] checkpoint {path.name} ({tag})")

    # ---- the loop
    every = recipe.checkpoint.every_steps
    test_delay = float(os.environ.get("QHM_TEST_STEP_DELAY", "0") or 0)   # lets tests kill mid-run
    for epoch in range(state.epoch, recipe.epochs):
        p = plan[epoch]
        engine.set_stage(p.micro_batch, p.accum)
        qhm.apply_hyperparams(engine.optimizer, p.lr, p.beta, p.gamma)
        module.train()
        epoch_start, epoch_samples = time.time(), 0
        bar = tqdm(total=p.steps, initial=state.step, desc=f"epoch {epoch}", leave=False, dynamic_ncols=True,
                   file=sys.stderr, disable=not (comm.is_main and sys.stderr.isatty()))
        for step in range(state.step, p.steps):
            size = train_step(engine, dataset, sampler, p, epoch, step, running, comm, recipe.seed, autocast)
            state.step, state.global_step, state.samples = step + 1, state.global_step + 1, state.samples + size
            epoch_samples += size
            if test_delay:
                time.sleep(test_delay)
            bar.update(1)
            if not bar.disable and step % 20 == 0:        # this rank's running loss: no extra sync
                bar.set_postfix(loss=f"{float(running[0] / running[2].clamp(min=1)):.4f}", batch=p.batch,
                                lr=f"{p.lr:.3g}")
            if preempt.agreed(comm, run_dir / "preempt.request"):
                bar.close()
                state.wall_time += time.time() - start
                save("preempted")
                if comm.is_main:
                    (run_dir / "preempted.json").write_text(json.dumps(
                        {"signal": preempt.received, "global_step": state.global_step}) + "\n")
                    tracker.finish(exit_code=PREEMPTED)
                ckpt.wait()
                log(f"[qhm-launch] preempted: saved at global step {state.global_step}; "
                    f"run the same command to resume (exit {PREEMPTED})")
                return PREEMPTED
            if every and state.global_step % every == 0 and step + 1 < p.steps:   # epoch end saves anyway
                save(f"every {every} steps")
        bar.close()
        train_seconds = time.time() - epoch_start

        # ---- end of epoch: metrics, then the checkpoint (so a resume never loses a row)
        totals = comm.all_reduce_sum(running.clone())
        row = {"epoch": epoch, "step": state.global_step, "samples": state.samples, "batch": p.batch,
               "micro_batch": p.micro_batch, "accum": p.accum, "world_size": comm.world, "lr": p.lr,
               "beta": p.beta, "gamma": p.gamma, "train_loss": float(totals[0] / totals[2]),
               "train_acc": float(totals[1] / totals[2]), "test_loss": None, "test_acc": None,
               "grad_norm": None, "min_grad_norm": None}
        if (epoch + 1) % recipe.eval.every_epochs == 0 or epoch == recipe.epochs - 1:
            row["test_loss"], row["test_acc"] = evaluate(module, dataset.test, comm, recipe.eval.batch_size, autocast)
            state.best_test_acc = max(state.best_test_acc, row["test_acc"])
            if recipe.eval.full_grad_norm:
                row["grad_norm"] = full_grad_norm(module, dataset, comm, recipe, epoch, autocast)
                state.min_grad_norm = min(state.min_grad_norm, row["grad_norm"])
        row["min_grad_norm"] = None if state.min_grad_norm == float("inf") else state.min_grad_norm
        state.wall_time += time.time() - start
        start = time.time()
        row.update(wall_time=round(state.wall_time, 3), samples_per_s=round(epoch_samples / max(train_seconds, 1e-9), 1))
        state.epoch, state.step = epoch + 1, 0
        running.zero_()
        if comm.is_main:
            metrics.append(row)
            tracker.log(row)
            log(f"[qhm-launch] epoch {epoch}: batch {p.batch} ({p.micro_batch}x{p.accum}x{comm.world}) "
                f"loss {row['train_loss']:.4f} test_acc {row['test_acc'] if row['test_acc'] is None else round(row['test_acc'], 4)} "
                f"grad_norm {row['grad_norm'] if row['grad_norm'] is None else round(row['grad_norm'], 5)}")
        save("epoch end")

    ckpt.wait()
    if comm.is_main:
        torch.save(module.state_dict(), run_dir / "final_model.pt")
        (run_dir / "complete.json").write_text(json.dumps(
            {"global_step": state.global_step, "samples": state.samples, "epochs": recipe.epochs,
             "recipe_hash": recipe_mod.trajectory_hash(recipe.to_dict())}) + "\n")
        print_summary(recipe, state, metrics.rows(), tracker)
        tracker.finish()
    return 0


def train_step(engine, dataset, sampler, p, epoch, step, running, comm, seed, autocast) -> int:
    """One optimizer step on global batch (epoch, step): this rank's slice, cut into micro-batches.

    The summed loss is scaled by world/size: DDP averages over ranks, so the update is the mean
    gradient over the whole global batch, whatever its size (a partial last batch included) and split.
    """
    idx = sampler.global_batch(epoch, step, p.batch)
    size = len(idx)
    lo, hi = data_mod.rank_bounds(size, comm.rank, comm.world)
    aug = dataset.augment
    offsets, flips = data_mod.augment_params(seed, epoch, step, size, aug) if aug else (None, None)
    chunks = data_mod.micro_batches(lo, hi, p.micro_batch)
    for i, (a, b) in enumerate(chunks):
        sel = idx[a:b].to(comm.device)
        x, y = dataset.train.images[sel], dataset.train.labels[sel]
        if aug:
            x = data_mod.apply_augment(x, offsets[:, a:b], flips[a:b], aug.pad)
        if a == b:                       # no samples here: join the reduce with zero gradients,
            engine.model.eval()          # without touching batch-norm statistics
        with engine.micro_step(last=i == len(chunks) - 1), autocast:
            out = engine.model(x)
            loss = F.cross_entropy(out.float() if out.dtype == torch.bfloat16 else out, y, reduction="sum")
            engine.backward(loss * (comm.world / size))
        if a == b:
            engine.model.train()
        running += torch.stack([loss.detach().double(), (out.argmax(1) == y).sum().double(),
                                torch.tensor(float(b - a), dtype=torch.float64, device=running.device)])
    engine.step()
    return size


@torch.no_grad()
def evaluate(module, split, comm, batch_size, autocast) -> tuple[float, float]:
    """Test loss and accuracy: each rank a contiguous shard, sums all-reduced."""
    module.eval()
    lo, hi = data_mod.rank_bounds(len(split), comm.rank, comm.world)
    sums = torch.zeros(3, dtype=torch.float64, device=comm.device)
    for a in range(lo, hi, batch_size):
        x, y = split.images[a:min(a + batch_size, hi)], split.labels[a:min(a + batch_size, hi)]
        with autocast:
            out = module(x)
        sums += torch.stack([F.cross_entropy(out.double(), y, reduction="sum"),
                             (out.argmax(1) == y).sum().double(), torch.tensor(float(len(y)), device=sums.device,
                                                                                dtype=torch.float64)])
    comm.all_reduce_sum(sums)
    module.train()
    return float(sums[0] / sums[2]), float(sums[1] / sums[2])


def full_grad_norm(module, dataset, comm, recipe, epoch, autocast) -> float:
    """||grad f(x)|| of the empirical training loss f = (1/n) sum_i l_i: the exact mean gradient.

    Model in eval mode; mode "exact" uses the un-augmented training set, mode "paper" augments it as
    the paper's code does. Each rank does 1/W of a pass over its shard; the sums are all-reduced.
    Gradients go to fresh tensors (autograd.grad), never into .grad, so training state is untouched.
    """
    module.eval()
    params = [p for p in module.parameters() if p.requires_grad]
    split, n = dataset.train, len(dataset.train)
    lo, hi = data_mod.rank_bounds(n, comm.rank, comm.world)
    paper = recipe.eval.grad_norm_mode == "paper" and dataset.augment is not None
    if paper:
        offsets, flips = data_mod.augment_params(recipe.seed, epoch, -1, n, dataset.augment)
    total = [torch.zeros_like(p) for p in params]
    for a in range(lo, hi, recipe.eval.batch_size):
        b = min(a + recipe.eval.batch_size, hi)
        x, y = split.images[a:b], split.labels[a:b]
        if paper:
            x = data_mod.apply_augment(x, offsets[:, a:b], flips[a:b], dataset.augment.pad)
        with autocast:
            out = module(x)
        loss = F.cross_entropy(out.float() if out.dtype == torch.bfloat16 else out, y, reduction="sum")
        for t, g in zip(total, torch.autograd.grad(loss, params)):
            t += g
    flat = comm.all_reduce_sum(torch.cat([t.reshape(-1) for t in total]).double())
    module.train()
    return float(flat.div_(n).norm())


def print_summary(recipe, state: TrainState, rows: list[dict], tracker) -> None:
    last = rows[-1] if rows else {}
    fmt = lambda v: "-" if v is None else (f"{v:.5g}" if isinstance(v, float) else str(v))  # noqa: E731
    items = [("epochs", recipe.epochs), ("optimizer steps", state.global_step), ("samples (SFO)", state.samples),
             ("final train loss", last.get("train_loss")), ("final test acc", last.get("test_acc")),
             ("best test acc", state.best_test_acc),
             ("min grad norm", None if state.min_grad_norm == float("inf") else state.min_grad_norm),
             ("wall time (s)", round(state.wall_time, 1))]
    width = max(len(k) for k, _ in items)
    print("\n".join(["", f"run {recipe.name} complete"] + [f"  {k:<{width}}  {fmt(v)}" for k, v in items] + [
        f"  {'metrics':<{width}}  {recipe.run_dir / 'metrics.jsonl'}",
        f"  {'checkpoints':<{width}}  {recipe.run_dir / 'checkpoints'}",
        f"  {'final model':<{width}}  {recipe.run_dir / 'final_model.pt'}",
        f"  {'W&B files':<{width}}  {tracker.files if tracker and tracker.files else 'disabled'}"]), flush=True)
