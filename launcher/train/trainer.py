"""The training loop of one worker. :meth:`Trainer.train` reads top to bottom: resume, then for each
epoch set the stage, run its steps, end the epoch and save. No callbacks.

The Trainer is itself a checkpoint part (its :class:`TrainState`); with the engine, the data order, the
per-rank RNG and the epoch's running sums it is registered once with the checkpoint manager, which
saves and loads them all symmetrically.
"""
from __future__ import annotations

import contextlib
import dataclasses
import io
import sys
import time

import torch
from tqdm import tqdm

import qhm

from launcher import data as data_mod
from launcher.engines import ddp as engines
from launcher.train import microbatch
from launcher.train import models
from launcher.data import order
from launcher.train import splits as planning
from launcher import env as testhooks
from launcher.config import recipe as recipe_mod
from launcher.run.checkpoint import CheckpointManager
from launcher.errors import PREEMPTED, RunFailed, UserError
from launcher.train.evaluation import evaluate, full_grad_norm
from launcher.run.files import atomic_write
from launcher.train import losses
from launcher.train.signals import Agreement, PreemptionFlag
from launcher.train.state import EpochSums, RankRNG, TrainState
from launcher.run.tracking import MetricsLog, Tracker, run_id

DTYPES = {"fp32": torch.float32,
          # bf16 is torch.autocast over fp32 weights and data: parameters, optimizer state, inputs and
          # the loss stay fp32, only the matmuls and convolutions run in bf16 (both engines alike).
          "bf16": torch.float32,
          "fp64": torch.float64}


def build_optimizer(recipe, module) -> qhm.QHM:
    s, kernel = recipe.schedule_spec(), recipe.optimizer.kernel
    return qhm.QHM(module.parameters(), lr=s.lr(0), beta=s.beta(0), gamma=s.gamma(0),
                   weight_decay=recipe.optimizer.weight_decay, foreach=kernel == "foreach",
                   compiled=kernel in ("compiled", "fused") or None)


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


class Trainer:
    """One worker's run of a recipe."""

    def __init__(self, recipe, comm, preempt: PreemptionFlag, log=print, until_epoch: int | None = None):
        self.recipe, self.comm = recipe, comm
        self.until_epoch = min(until_epoch or recipe.epochs, recipe.epochs)   # a segment of an elastic chain
        self.log = log if comm.is_main else (lambda *a, **k: None)
        self.folder = recipe.folder
        self.device, dtype = comm.device, DTYPES[recipe.precision]
        self.autocast = (torch.autocast(self.device.type, dtype=torch.bfloat16) if recipe.precision == "bf16"
                         else contextlib.nullcontext())
        self.dataset = self._load_data(dtype)
        n = len(self.dataset.train)
        self.plan = planning.plan(recipe, n, comm.world)
        self.module = models.build(recipe.model, self.dataset.shape, self.dataset.num_classes, recipe.seed,
                                   dtype).to(self.device)
        perf = recipe.performance
        self.channels_last = perf.channels_last
        if self.channels_last:
            self.module = self.module.to(memory_format=torch.channels_last)
        self.compile_mode = perf.compile if perf.compile != "off" else ("reduce-overhead" if perf.cuda_graphs else None)
        if perf.cuda_graphs and self.device.type != "cuda":
            raise UserError("performance.cuda_graphs: true is not valid here; allowed: false (CUDA graphs need a "
                            "CUDA device)")
        self.compiled, self.compiled_micro = False, None
        self.auto_micro = recipe.distributed.max_micro_batch == "auto"
        self.probed: dict[int, int] = {}
        self.sync_bn = recipe.distributed.batch_norm == "sync" and comm.world > 1
        if self.sync_bn:
            if self.device.type != "cuda":
                raise UserError("distributed.batch_norm: 'sync' needs CUDA devices (torch's SyncBatchNorm); "
                                "allowed: local on CPU")
            self.module = torch.nn.SyncBatchNorm.convert_sync_batchnorm(self.module)
        self.engine = engines.build(recipe, self.module, build_optimizer(recipe, self.module), comm, self.plan[0])
        self.loss = losses.from_recipe(recipe.loss)
        self.sampler = order.GlobalBatchSampler(n, recipe.seed, self.device)
        self.batches = self.dataset.batches(self.sampler, recipe.seed, comm)
        self.state, self.sums, self.rng = TrainState(), EpochSums(self.device), RankRNG(recipe.seed, comm.rank)
        self.stop = Agreement(comm, preempt, self.folder.preempt_request)
        self.checkpoints = CheckpointManager(self.folder, comm, recipe.checkpoint.keep, self.log)
        for name, part, scope in (("engine", self.engine, self.engine.checkpoint_scope), ("train", self, "replicated"),
                                  ("order", self.sampler, "replicated"), ("rng", self.rng, "per_rank"),
                                  ("epoch_sums", self.sums, "per_rank")):
            self.checkpoints.register(name, part, scope)
        self.checkpoints.register_upgrade(1, upgrade_v1)
        self.metrics, self.tracker, self.bar = MetricsLog(self.folder.metrics), None, None
        self.steps_log = MetricsLog(self.folder.steps, key="step", durable=False)
        self.log_every = log_interval(recipe, self.plan)
        self.step_grad_norm = None
        # on the device, so watching for a non-finite loss never waits for it: the steps of this epoch whose
        # running loss sum was still finite (a non-finite loss stays in the sum, so the count stops there)
        self.finite_steps = torch.zeros((), dtype=torch.int64, device=self.device)
        self.step_delay = testhooks.step_delay()
        self.oom_at, self._oom_fired = testhooks.oom_at(), False    # read once, not per micro-batch
        self._clock, self._epoch_clock = time.time(), time.time()

    # the Trainer is the "train" part of every checkpoint
    def state_dict(self) -> dict:
        return self.state.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.state.load_state_dict(state)

    # ---------------------------------------------------------------------------------------- the loop
    def train(self) -> int:
        """Train (or resume) to the end. Returns 0, or PREEMPTED after a saved preemption."""
        self.resume()
        for epoch in range(self.state.epoch, self.until_epoch):
            stage = self.start_epoch(epoch)
            for step in range(self.state.step, stage.steps):
                self.train_step(stage, step)
                if self.log_every and self.state.global_step % self.log_every == 0:
                    self.log_steps(stage)
                if self.stop.poll():
                    return self.stop_preempted()
                if self.checkpoint_due(stage, step):
                    self.save(f"every {self.recipe.checkpoint.every_steps} steps")
            # no stop between the last step and the evaluation: the epoch row would then go to W&B in the
            # next segment, at a step the run already has, and be dropped
            self.end_epoch(stage)
            self.save("epoch end")
        return self.finish() if self.until_epoch == self.recipe.epochs else self.end_segment()

    def train_step(self, stage: planning.EpochPlan, step: int) -> None:
        """One optimizer step on global batch (epoch, step): this rank's micro-batches, one update."""
        size = self.forward_backward_retrying(stage, step) if self.auto_micro else self.forward_backward(stage, step)
        if self.recipe.tracking.step_grad_norm and self.log_every and (self.state.global_step + 1) % self.log_every == 0:
            self.step_grad_norm = self.engine.gradient_norm()      # read at the log point, not here
        self.engine.step()
        self.finite_steps += torch.isfinite(self.sums.loss)
        self.state.step, self.state.global_step = step + 1, self.state.global_step + 1
        self.state.samples += size
        if self.step_delay:
            time.sleep(self.step_delay)
        if self.bar is not None:
            self.bar.update(1)

    def forward_backward(self, stage: planning.EpochPlan, step: int) -> int:
        """This rank's micro-batches of global batch (epoch, step), forward and backward; its size.

        The summed loss is scaled by world/size: DDP averages over ranks, so the update is the mean
        gradient over the whole global batch, whatever its size (a partial last batch included) and split.
        """
        stage = self.plan[stage.epoch]               # the current split (a CUDA out-of-memory error halves it)
        size, micro_batches = self.batches.step(stage.epoch, step, stage)
        if self.sync_bn:              # every rank must join every batch-norm all-gather: as many micro-steps
            needed = -(-(-(-size // self.comm.world)) // stage.micro_batch)
            micro_batches += [(micro_batches[-1][0][:0], micro_batches[-1][1][:0])] * (needed - len(micro_batches))
        for i, (x, y) in enumerate(micro_batches):
            if self.oom_at and self._inject_oom(stage.epoch, step, i):
                raise microbatch.injected_oom(f"epoch {stage.epoch} step {step}")
            empty, model = len(y) == 0, self.engine.model
            eager = (torch.compiler.set_stance("force_eager") if self.compiled and len(y) != stage.micro_batch
                     else contextlib.nullcontext())      # a partial micro-batch: no compile for its shape
            if empty and not self.sync_bn:     # no samples here: join the gradient reduce with zeros,
                model.eval()                   # without touching batch-norm statistics
            if self.channels_last and x.dim() == 4:
                x = x.contiguous(memory_format=torch.channels_last)
            with self.engine.micro_step(last=i == len(micro_batches) - 1), self.autocast, eager:
                out = model(x)
                loss = self.loss(out, y)
                self.engine.backward(loss * (self.comm.world / size))
            if empty and not self.sync_bn:
                model.train()
            self.sums.add(loss, self.loss.correct(out, y), len(y))
        return size

    def forward_backward_retrying(self, stage: planning.EpochPlan, step: int) -> int:
        """forward_backward, agreed by every rank: after a CUDA out-of-memory error on any of them, all
        halve the micro-batch for the rest of the stage and redo the step from its first micro-batch,
        with buffers, RNG and sums as before it (see microbatch.py)."""
        snapshot = microbatch.StepSnapshot(self.module, self.sums, self.device)
        while True:
            try:
                size, ok = self.forward_backward(stage, step), True
            except torch.OutOfMemoryError:
                size, ok = 0, False
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
            if self.comm.agree(ok):
                return size
            snapshot.restore()
            self.engine.discard_gradients()
            self.resplit(self.plan[stage.epoch], max(1, self.plan[stage.epoch].micro_batch // 2),
                         f"CUDA out of memory at epoch {stage.epoch} step {step}: the micro-batch is halved for the "
                         "rest of the stage and the step redone from its first micro-batch", step=step)

    def _inject_oom(self, epoch: int, step: int, micro: int) -> bool:
        """Test hook: an out-of-memory error once at (epoch, step[, rank]), first micro-batch."""
        where = self.oom_at
        hit = (where[:2] == (epoch, step) and micro == 0 and not self._oom_fired
               and (len(where) < 3 or where[2] == self.comm.rank))
        if hit:
            self._oom_fired = True
        return hit

    def resplit(self, stage: planning.EpochPlan, micro: int, why: str, step: int | None = None) -> None:
        """Cut this stage's batch (from this epoch to the stage's end) into micro-batches of at most ``micro``."""
        if micro == stage.micro_batch and step is not None:
            raise RunFailed(f"CUDA out of memory at epoch {stage.epoch} step {step} with a micro-batch of "
                            f"{micro}; allowed: a smaller model or input, or more memory")
        m, accum = planning.split_batch(stage.batch, self.comm.world, micro)
        for e in range(stage.epoch, len(self.plan)):
            if self.plan[e].batch != stage.batch:
                break
            self.plan[e] = dataclasses.replace(self.plan[e], micro_batch=m, accum=accum)
        self.engine.set_stage(m, accum)
        self.log(f"[qhm-launch] {why}: batch {stage.batch} = {m} x {accum} x {self.comm.world}")

    def size_micro_batch(self, stage: planning.EpochPlan) -> planning.EpochPlan:
        """max_micro_batch auto: probe device memory once per batch stage (CPU: the recipe's cap)."""
        if stage.batch in self.probed or not (self.device.type == "cuda" or testhooks.oom_above() is not None):
            return stage
        share = -(-stage.batch // self.comm.world)
        found, use = microbatch.probe(self.module, self.batches.probe_batch, self.loss, self.autocast, share,
                                      self.device)
        agreed = int(self.comm.all_reduce_min(torch.tensor(use, device=self.device)))
        if agreed < 1:
            raise RunFailed(f"max_micro_batch auto: not even one sample fits in device memory at epoch {stage.epoch}")
        self.probed[stage.batch] = agreed
        self.resplit(stage, agreed, f"max_micro_batch auto: up to {found} samples fit here (of a share of {share}), "
                                    f"{agreed} over all ranks with a 10% margin")
        return self.plan[stage.epoch]

    def compile_for(self, stage: planning.EpochPlan) -> None:
        """performance.compile: the model is compiled in place (torch.compile, static shapes, inside DDP),
        and recompiles once for each stage's micro-batch shape; partial micro-batches run eagerly, so no
        other shape ever compiles."""
        if self.compile_mode is None or self.compiled_micro == stage.micro_batch:
            return
        if not self.compiled:
            import torch._dynamo.config as dynamo_config
            dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, len({e.micro_batch for e in self.plan}) + 8)
            self.module.compile(mode=None if self.compile_mode == "default" else self.compile_mode, dynamic=False)
            self.compiled = True
        self.compiled_micro = stage.micro_batch
        self.log(f"[qhm-launch] compile ({self.compile_mode}): batch stage {stage.batch}: the micro-step of "
                 f"{stage.micro_batch} samples compiles at its first step")

    def checkpoint_due(self, stage, step: int) -> bool:
        every = self.recipe.checkpoint.every_steps      # the epoch's end saves anyway
        return bool(every) and self.state.global_step % every == 0 and step + 1 < stage.steps

    # ---------------------------------------------------------------------------------------- pieces
    def _load_data(self, dtype):
        if self.comm.is_main and self.recipe.data.download:   # rank 0 downloads first, the others wait
            data_mod.load(self.recipe.data, torch.device("cpu"), dtype, is_first=True)
        self.comm.barrier()
        return data_mod.load(self.recipe.data, self.comm.device, dtype, is_first=False)

    def resume(self) -> None:
        """Load the newest valid checkpoint (if any); open the metrics files and W&B where it left off."""
        if self.comm.is_main:
            self.folder.path.mkdir(parents=True, exist_ok=True)
            self.folder.clear_stale()
        manifest = self.checkpoints.resume()
        if manifest is None:
            self.rng.seed_from(0)
        else:
            self.log(f"[qhm-launch] resumed from {self.folder.checkpoints / ('step-%09d' % manifest['step'])} "
                     f"(epoch {self.state.epoch}, step {self.state.step}, global step {self.state.global_step}, "
                     f"written by {manifest['world_size']} processes)")
        if self.comm.is_main:
            self.metrics.keep_before(self.state.epoch)
            self.steps_log.keep_before(self.state.global_step + 1)
            self.state.wandb_id = run_id(self.folder.wandb_id, self.state.wandb_id or None)
            self.tracker = Tracker(self.recipe, self.folder.wandb, self.state.wandb_id, self.log)
        self.state.wandb_id = self.comm.broadcast(self.state.wandb_id)
        self._clock = self._log_clock = time.time()
        self._log_samples = self.state.samples

    def start_epoch(self, epoch: int) -> planning.EpochPlan:
        """Set the stage of epoch ``epoch``: batch split, hyper-parameters, data, progress bar."""
        stage = self.plan[epoch]
        if self.auto_micro:
            stage = self.size_micro_batch(stage)
        self.compile_for(stage)
        self.engine.set_stage(stage.micro_batch, stage.accum)
        qhm.apply_hyperparams(self.engine.optimizer, stage.lr, stage.beta, stage.gamma)
        self.batches.start_epoch(epoch, self.state.step, stage)
        self.finite_steps.fill_(self.state.step)         # a checkpoint holds only finite steps
        self.stop.every = stop_check_interval(stage)
        self.module.train()
        self._epoch_clock, self._epoch_samples = time.time(), self.state.samples
        show = self.comm.is_main and sys.stderr.isatty()
        self.bar = tqdm(total=stage.steps, initial=self.state.step, desc=f"epoch {epoch} (batch {stage.batch})",
                        leave=False, dynamic_ncols=True, file=sys.stderr) if show else None
        return stage

    def end_epoch(self, stage: planning.EpochPlan) -> None:
        """The epoch's row: training sums over all ranks, evaluation, then the next position."""
        stage = self.plan[stage.epoch]                 # as split at the end (auto: maybe halved meanwhile)
        if self.bar is not None:
            self.bar.close()
        train_seconds = time.time() - self._epoch_clock
        self.check_finite()
        totals = self.comm.all_reduce_sum(self.sums.as_tensor())
        row = {"epoch": stage.epoch, "step": self.state.global_step, "samples": self.state.samples,
               "batch": stage.batch, "micro_batch": stage.micro_batch, "accum": stage.accum,
               "world_size": self.comm.world, "lr": stage.lr, "beta": stage.beta, "gamma": stage.gamma,
               "train_loss": float(totals[0] / totals[2]),
               "train_acc": float(totals[1] / totals[2]) if self.sums.has_accuracy else None,
               "test_loss": None, "test_acc": None, "grad_norm": None, "min_grad_norm": None}
        if self.dataset.validation is not None:
            row.update(val_loss=None, val_acc=None)
        if (stage.epoch + 1) % self.recipe.eval.every_epochs == 0 or stage.epoch == self.recipe.epochs - 1:
            with torch.compiler.set_stance("force_eager") if self.compiled else contextlib.nullcontext():
                self.evaluate_into(row, stage.epoch)      # evaluation shapes vary: never compiled
        row["min_grad_norm"] = None if self.state.min_grad_norm == float("inf") else self.state.min_grad_norm
        self._account_time()
        row.update(wall_time=round(self.state.wall_time, 3),
                   samples_per_s=round((self.state.samples - self._epoch_samples) / max(train_seconds, 1e-9), 1))
        self.state.epoch, self.state.step = stage.epoch + 1, 0
        self.sums.zero()
        if self.comm.is_main:
            self.metrics.append(row)
            self.tracker.log_row(row, step=self.state.global_step)
            fmt = lambda v, d: None if v is None else round(v, d)  # noqa: E731
            self.log(f"[qhm-launch] epoch {stage.epoch}: batch {stage.batch} ({stage.micro_batch}x{stage.accum}"
                     f"x{self.comm.world}) loss {row['train_loss']:.4f} test_acc {fmt(row['test_acc'], 4)} "
                     f"grad_norm {fmt(row['grad_norm'], 5)}")

    def log_steps(self, stage: planning.EpochPlan) -> None:
        """A steps.jsonl row for the window since the last one (and W&B, at this global step): the only
        place the per-step sums are read back from the device, in one all-reduce (with the count of
        ranks that saw a non-finite loss, which stops the run before anything is logged)."""
        unfinished = (self.finite_steps < self.state.step).to(torch.float64).reshape(1)
        window = self.comm.all_reduce_sum(torch.cat([self.sums.window(), unfinished]))
        if float(window[3]):
            self.check_finite()                   # names the step and raises
        self.sums.start_window()
        now, samples = time.time(), self.state.samples
        loss, correct, count = (float(v) for v in window[:3])
        row = {"step": self.state.global_step, "epoch": stage.epoch, "samples": samples, "batch": stage.batch,
               "micro_batch": stage.micro_batch, "accum": stage.accum, "world_size": self.comm.world,
               "lr": stage.lr, "beta": stage.beta, "gamma": stage.gamma, "train_loss": loss / max(count, 1),
               "train_acc": correct / max(count, 1) if self.sums.has_accuracy else None,
               "samples_per_s": round((samples - self._log_samples) / max(now - self._log_clock, 1e-9), 1)}
        if self.step_grad_norm is not None:
            row["grad_norm"] = float(self.step_grad_norm)
            self.step_grad_norm = None
        self._log_clock, self._log_samples = now, samples
        if self.comm.is_main:
            self.steps_log.append(row)
            self.tracker.log_row({("step/" + k if k not in ("epoch", "samples", "step") else k): v
                                  for k, v in row.items() if k != "step"}, step=row["step"])
            self.folder.touch_heartbeat()
            if self.bar is not None:
                self.bar.set_postfix(loss=f"{row['train_loss']:.4f}", lr=f"{stage.lr:.3g}", refresh=False)

    def evaluate_into(self, row: dict, epoch: int) -> None:
        """Test (and validation) loss and accuracy, and the full-gradient norm, into the epoch's row."""
        ds, r = self.dataset, self.recipe
        row["test_loss"], row["test_acc"] = evaluate(self.module, ds.test, self.comm, r.eval.batch_size,
                                                     self.autocast, self.loss)
        if row["test_acc"] is not None:
            self.state.best_test_acc = max(self.state.best_test_acc, row["test_acc"])
        if ds.validation is not None:
            row["val_loss"], row["val_acc"] = evaluate(self.module, ds.validation, self.comm, r.eval.batch_size,
                                                       self.autocast, self.loss)
            if row["val_acc"] is not None:
                self.state.best_val_acc = max(self.state.best_val_acc, row["val_acc"])
        if r.eval.full_grad_norm:
            row["grad_norm"] = full_grad_norm(self.module, ds, self.comm, r, epoch, self.autocast, self.loss)
            self.state.min_grad_norm = min(self.state.min_grad_norm, row["grad_norm"])

    def _account_time(self) -> None:
        now = time.time()
        self.state.wall_time += now - self._clock
        self._clock = now

    def check_finite(self) -> None:
        """Stop (on every rank) if any rank's loss was not finite since the last check: before anything
        is saved or logged, so no checkpoint ever holds what came of it."""
        finite = int(self.comm.all_reduce_min(self.finite_steps.clone()))
        if finite < self.state.step:
            first = self.state.global_step - self.state.step + finite + 1
            raise RunFailed(f"the training loss is not finite at global step {first}; stopped, nothing was saved "
                            f"after global step {self.checkpoints.last_step}; lower schedule.lr.max (or check the "
                            "data) and rerun to resume from there")

    def save(self, tag: str) -> None:
        self.check_finite()
        self._account_time()
        recipe = self.recipe.to_dict()
        path = self.checkpoints.save(self.state.global_step, {
            "position": self.state.state_dict(), "recipe": recipe, "recipe_hash": recipe_mod.trajectory_hash(recipe),
            "wandb_id": self.state.wandb_id, "tag": tag})
        self.log(f"[qhm-launch] checkpoint {path.name} ({tag})")

    def stop_preempted(self) -> int:
        if self.bar is not None:
            self.bar.close()
        self.save("preempted")
        if self.comm.is_main:
            self.folder.write_marker(self.folder.preempted, {"signal": self.stop.flag.received,
                                                             "global_step": self.state.global_step})
            self.tracker.finish(preempted=True)
        self.checkpoints.wait()
        self.stop.close()
        self.log(f"[qhm-launch] preempted: checkpoint at global step {self.state.global_step}")
        return PREEMPTED

    def end_segment(self) -> int:
        """An elastic chain's segment ends here, after its last epoch's checkpoint: the next segment's job
        resumes from it (on another number of ranks). W&B sees a preempting, not a finished, run."""
        self.checkpoints.wait()
        self.stop.close()
        if self.comm.is_main:
            self.tracker.finish(preempted=True)
        self.log(f"[qhm-launch] segment done: epochs up to {self.until_epoch} saved; the next segment resumes "
                 f"from global step {self.state.global_step}")
        return 0

    def finish(self) -> int:
        self.checkpoints.wait()
        self.stop.close()
        if self.comm.is_main:
            buffer = io.BytesIO()
            torch.save(self.module.state_dict(), buffer)
            atomic_write(self.folder.final_model, buffer.getvalue())
            self.folder.write_marker(self.folder.complete, {
                "global_step": self.state.global_step, "samples": self.state.samples, "epochs": self.recipe.epochs,
                "recipe_hash": recipe_mod.trajectory_hash(self.recipe.to_dict())})
            if self.compiled:
                from torch._dynamo.utils import counters
                self.log(f"[qhm-launch] compile: {counters['stats']['unique_graphs']} graphs compiled over the run")
            print_summary(self.recipe, self.state, self.metrics.rows(), self.tracker)
            self.tracker.summarise(summary_values(self.state, self.metrics.rows()))
            self.tracker.finish()
        return 0


def log_interval(recipe, plan: list) -> int:
    """Optimizer steps between two steps.jsonl rows: the recipe's, or about 2,000 rows over the run
    (at least 25 steps apart: each row reads the sums back from the device, across ranks)."""
    every = recipe.tracking.log_every_steps
    return max(25, sum(e.steps for e in plan) // 2000) if every is None else every


def stop_check_interval(stage: planning.EpochPlan) -> int:
    """Optimizer steps between two preemption checks: every step from batch 256 up; in the smallest
    stages, whose steps take a millisecond, fewer (at most 32 steps apart), so the check costs nothing."""
    return max(1, min(32, 256 // stage.batch))


def summary_values(state: TrainState, rows: list[dict]) -> dict:
    last = rows[-1] if rows else {}
    out = {f"final_{k}": last.get(k) for k in ("train_loss", "train_acc", "test_loss", "test_acc", "grad_norm")}
    out.update(best_test_acc=state.best_test_acc, best_val_acc=state.best_val_acc or None,
               min_grad_norm=None if state.min_grad_norm == float("inf") else state.min_grad_norm,
               total_steps=state.global_step, total_sfo=state.samples)
    return {k: v for k, v in out.items() if v is not None}


def print_summary(recipe, state: TrainState, rows: list[dict], tracker) -> None:
    last = rows[-1] if rows else {}
    fmt = lambda v: "-" if v is None else (f"{v:.5g}" if isinstance(v, float) else str(v))  # noqa: E731
    folder = recipe.folder
    items = [("epochs", recipe.epochs), ("optimizer steps", state.global_step), ("samples (SFO)", state.samples),
             ("final train loss", last.get("train_loss")), ("final test acc", last.get("test_acc")),
             ("best test acc", state.best_test_acc),
             ("min grad norm", None if state.min_grad_norm == float("inf") else state.min_grad_norm),
             ("wall time (s)", round(state.wall_time, 1))]
    width = max(len(k) for k, _ in items)
    print("\n".join(["", f"run {recipe.name} complete"] + [f"  {k:<{width}}  {fmt(v)}" for k, v in items] + [
        f"  {'metrics':<{width}}  {folder.metrics}",
        f"  {'checkpoints':<{width}}  {folder.checkpoints}",
        f"  {'final model':<{width}}  {folder.final_model}",
        f"  {'W&B files':<{width}}  {tracker.files if tracker and tracker.files else 'disabled'}"]), flush=True)
