"""The training loop of one worker, over parts built elsewhere (:mod:`launcher.train.build`).
:meth:`Trainer.train` reads top to bottom: resume, then for each epoch enter its stage, run its steps,
end the epoch and save; it returns an :class:`Outcome`, which the CLI turns into markers, the final
model and an exit status. No callbacks.
"""
from __future__ import annotations

import enum
import os
import time

import torch

import qhm
from launcher import config, env
from launcher.errors import RunFailed
from launcher.train.build import Parts
from launcher.train.evaluation import evaluate_epoch
from launcher.train.report import Reporter, log_interval
from launcher.train.signals import Agreement, PreemptionFlag
from launcher.train.splits import EpochSplit
from launcher.train.stages import Stages
from launcher.train.steprows import StepRows
from launcher.train.step import StepRunner


class Outcome(enum.Enum):
    FINISHED = "finished"              # every epoch trained: the run is complete
    SEGMENT_DONE = "segment done"      # an elastic chain's segment saved its last epoch (--until-epoch)
    PREEMPTED = "preempted"            # stopped on a preemption request, after a checkpoint


class Trainer:
    """One worker's run of a recipe."""

    def __init__(self, parts: Parts, preempt: PreemptionFlag, until_epoch: int | None = None):
        self.parts, r = parts, parts.recipe
        self.recipe, self.comm, self.state, self.sums, self.log = r, parts.comm, parts.state, parts.sums, parts.log
        self.engine, self.checkpoints, self.folder = parts.engine, parts.checkpoints, parts.folder
        self.until_epoch = min(until_epoch or r.epochs, r.epochs)      # a segment of an elastic chain
        self.stages = Stages(parts)
        self.step_runner = StepRunner(parts, self.stages)
        self.reporter = Reporter(r, self.comm, self.folder, self.log)
        self.step_rows = StepRows(self.comm, self.reporter, self.stop_if_unfinished)
        self.stop = Agreement(self.comm, preempt, self.folder.preempt_request, log=self.log)
        self.log_every = log_interval(r, parts.splits)
        self.step_grad_norm = None
        self.step_delay = env.step_delay()

    def train(self) -> Outcome:
        """Train (or resume) to the end of the run, or of this segment."""
        self.resume()
        for epoch in range(self.state.epoch, self.until_epoch):
            split, stopping = self.start_epoch(epoch), False
            for step in range(self.state.step, split.steps):
                self.train_step(epoch, step)
                if self.log_every and self.state.global_step % self.log_every == 0:
                    self.log_steps(epoch)
                if self.due(self.recipe.eval.every_steps, split, step):
                    self.evaluate_mid_epoch(epoch)
                stopping = self.stop.poll(self.state.global_step)
                if stopping and step + 1 < split.steps:
                    self.save("preempted")
                    return Outcome.PREEMPTED
                if self.stop.checked:          # a step every rank agreed on: the queued rows' sums leave
                    self.step_rows.send()
                if self.due(self.recipe.checkpoint.every_steps, split, step):
                    self.save(f"every {self.recipe.checkpoint.every_steps} steps")
            # no stop between an epoch's last step and its evaluation: the epoch row would then go to W&B
            # in the next segment, at a step the run already has, and be dropped; a stop agreed at the
            # last step comes after the epoch's row and save
            self.end_epoch(epoch)
            self.save("epoch end")
            if stopping and epoch + 1 < self.until_epoch:
                return Outcome.PREEMPTED
        return Outcome.FINISHED if self.until_epoch == self.recipe.epochs else Outcome.SEGMENT_DONE

    def resume(self) -> None:
        """Load the newest valid checkpoint (if any); open the logs and W&B where it left off."""
        if self.comm.is_main:
            self.folder.create()
            self.folder.clear_stale(started=env.STARTED if env.PARENT in os.environ else None)
        manifest = self.checkpoints.resume()
        if manifest is None:
            self.parts.rng.seed_from(0)
        else:
            s = self.state
            self.log(f"[qhm-launch] resumed from {self.folder.checkpoints / ('step-%09d' % manifest['step'])} "
                     f"(epoch {s.epoch}, step {s.step}, global step {s.global_step}, "
                     f"written by {manifest['world_size']} processes)")
        if self.parts.growth is not None:           # the batches an adaptive run already chose
            for epoch, batch in self.parts.growth.first_epochs():
                self.stages.set_batch(epoch, batch)
        self.reporter.open(self.state)

    def start_epoch(self, epoch: int) -> EpochSplit:
        """Enter epoch ``epoch``'s stage: batch split, hyper-parameters, data, progress bar."""
        split = self.stages.enter(epoch)
        qhm.apply_hyperparams(self.engine.optimizer, split.lr, split.beta, split.gamma)
        self.parts.batches.start_epoch(epoch, self.state.step, split)
        self.sums.start_epoch(self.state.step)
        self.parts.module.train()
        self.reporter.start_epoch(split, self.state)
        return split

    def train_step(self, epoch: int, step: int) -> None:
        """One optimizer step on global batch (epoch, step): this rank's micro-batches, one update."""
        size = self.step_runner.run(epoch, step)
        if self.recipe.tracking.step_grad_norm and self.log_every and (self.state.global_step + 1) % self.log_every == 0:
            self.step_grad_norm = self.engine.gradient_norm()      # read at the log point, not here
        self.engine.step()
        self.parts.noise.end_step(self.sums, size)
        self.sums.step_done()
        self.state.step, self.state.global_step = step + 1, self.state.global_step + 1
        self.state.samples += size
        if self.step_delay:
            time.sleep(self.step_delay)
        self.reporter.step_done()

    def log_steps(self, epoch: int) -> None:
        """A log point: the window's sums since the last one (and this rank's steps whose loss stayed
        finite) queued on the device; its steps.jsonl row is written about a second later (see steprows.py)."""
        grad_norm, self.step_grad_norm = self.step_grad_norm, None
        window = self.sums.take_window()
        self.step_rows.take(self.stages[epoch], self.state, self.sums.has_accuracy,
                            torch.cat([window, self.sums.finite()]), grad_norm)

    def evaluate_mid_epoch(self, epoch: int) -> None:
        """eval.every_steps: a metrics.jsonl row inside the epoch (``mid_epoch: true``), so a target's
        crossing is not rounded to epochs. Before any save at this step, so a checkpoint follows its row."""
        self.step_rows.flush()                     # W&B takes rows in step order
        with self.stages.eager():
            evaluated = evaluate_epoch(self.parts, epoch)
        self.reporter.mid_epoch_row(self.stages[epoch], self.state, evaluated)

    def end_epoch(self, epoch: int) -> None:
        """The epoch's row: training sums over all ranks, evaluation, then the next position."""
        split = self.stages[epoch]                 # as split at the end (auto: maybe halved meanwhile)
        self.reporter.end_training()
        self.check_finite()
        totals = self.comm.all_reduce_sum(self.sums.as_tensor())
        evaluated = {}
        if (epoch + 1) % self.recipe.eval.every_epochs == 0 or epoch == self.recipe.epochs - 1:
            with self.stages.eager():                # evaluation shapes vary: never compiled
                evaluated = evaluate_epoch(self.parts, epoch)
        self.reporter.epoch_row(split, self.state, totals, self.sums.has_accuracy, evaluated,
                                self.parts.dataset.validation is not None)
        self.state.epoch, self.state.step = epoch + 1, 0
        self.sums.zero()
        grown = self.parts.growth and self.parts.growth.end_epoch(epoch, totals)
        if grown:                                   # adaptive: the next interval's batch, saved with this epoch
            self.stages.set_batch(epoch + 1, grown)

    def due(self, every: int, split: EpochSplit, step: int) -> bool:
        """Every ``every`` global steps (0: never), except at an epoch's last step: the epoch's end
        evaluates and saves anyway."""
        return bool(every) and self.state.global_step % every == 0 and step + 1 < split.steps

    def check_finite(self) -> None:
        """Stop (on every rank) if any rank's loss was not finite since the last check: before anything
        is saved or logged, so no checkpoint ever holds what came of it. The steps.jsonl rows are written
        first: a checkpoint follows every row up to its step, and W&B takes rows in step order."""
        self.step_rows.flush()
        self.stop_if_unfinished()

    def stop_if_unfinished(self) -> None:
        """The all-reduce behind check_finite: raises, naming the first step, if some rank's loss was not
        finite in this epoch (a collective: every rank calls it at the same step)."""
        finite = int(self.comm.all_reduce_min(self.sums.finite().clone()))
        if finite < self.state.step:
            first = self.state.global_step - self.state.step + finite + 1
            saved = self.checkpoints.last_step
            since = (f"nothing was saved after global step {saved}" if saved is not None else
                     "no checkpoint had been saved yet")
            raise RunFailed(f"the training loss is not finite at global step {first}; stopped, {since}; lower "
                            "schedule.lr.max (or check the data) and rerun"
                            + (" to resume from there" if saved is not None else ""))

    def save(self, tag: str) -> None:
        self.check_finite()
        self.reporter.account_time(self.state)
        recipe = self.recipe.to_dict()
        path = self.checkpoints.save(self.state.global_step, {
            "position": self.state.state_dict(), "recipe": recipe, "recipe_hash": config.trajectory_hash(recipe),
            "wandb_id": self.state.wandb_id, "tag": tag})
        self.log(f"[qhm-launch] checkpoint {path.name} ({tag})")

    def close(self, outcome: Outcome) -> None:
        """After train(): background checkpoint removal done, the stop agreement's last all-reduce in,
        W&B told how this process's part of the run ended, the engine's hooks gone (so DDP can be freed
        before its process group is destroyed), the data workers ended."""
        self.step_rows.flush()
        self.checkpoints.wait()
        self.stop.close()
        self.reporter.finish(self.state, finished=outcome is Outcome.FINISHED)
        self.parts.close()


def run(recipe, comm, preempt: PreemptionFlag | None = None, log=print, until_epoch: int | None = None) -> "Trainer":
    """Build the parts of this rank and train them, in this process (no markers, no final model: those
    are the CLI's). What benchmarks and in-process tests drive; the trainer is returned for what they
    read after training (its parts, state and stages)."""
    from launcher.train.build import build
    trainer = Trainer(build(recipe, comm, log), preempt or PreemptionFlag([]), until_epoch=until_epoch)
    trainer.close(trainer.train())
    return trainer
