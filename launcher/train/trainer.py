"""The training loop of one worker, over parts built elsewhere (:mod:`launcher.train.build`).
:meth:`Trainer.train` reads top to bottom: resume, then for each epoch enter its stage, run its steps
(entering the next stage where the batch changes inside the epoch), end the epoch and save; it returns an
:class:`Outcome`, which the CLI turns into markers, the final model and an exit status. No callbacks.
"""
from __future__ import annotations

import enum
import time
from typing import TYPE_CHECKING

import qhm
from launcher import env
from launcher.train.build import Parts
from launcher.train.cadence import cadence
from launcher.train.evaluation import evaluate_unless_stopped
from launcher.train.report import Reporter, log_interval
from launcher.train.resume import manifest, owes_mid_epoch_evaluation, restore
from launcher.train.signals import Activity, Agreement, PreemptionFlag
from launcher.train.stages import Stages
from launcher.train.step import StepRunner
from launcher.train.steprows import StepRows

if TYPE_CHECKING:
    from launcher.config import Recipe


class Outcome(enum.Enum):
    FINISHED = "finished"              # every step trained: the run is complete
    SEGMENT_DONE = "segment done"      # an elastic chain's segment saved its last epoch or step (--until-*)
    PREEMPTED = "preempted"            # stopped on a preemption request, after a checkpoint


class Trainer:
    """One worker's run of a recipe."""

    def __init__(self, parts: Parts, preempt: PreemptionFlag, until_epoch: int | None = None,
                 until_step: int | None = None):
        self.parts, r = parts, parts.recipe
        self.recipe, self.comm, self.state, self.sums, self.log = r, parts.comm, parts.state, parts.sums, parts.log
        self.engine, self.checkpoints, self.folder = parts.engine, parts.checkpoints, parts.folder
        self.until_epoch, self.until_step = until_epoch, until_step       # a segment of an elastic chain
        self.stages = Stages(parts)
        self.step_runner = StepRunner(parts, self.stages)
        self.reporter = Reporter(r, self.comm, self.folder, self.log, parts.plan.steps.tokens_per_sample,
                                 per_token=parts.loss.per_token, noise_windows=parts.noise_windows,
                                 flops_per_token=parts.flops_per_token)
        self.step_rows = StepRows(self.comm, self.reporter, lambda: self.sums.raise_unless_finite(
            self.comm, self.state, self.checkpoints.last_step))
        self.stop = Agreement(self.comm, preempt, self.folder.preempt_request, log=self.log)
        self.log_every = log_interval(r, parts.plan.total_steps)
        self.evaluate_every = cadence(r.eval.every, r.eval.every_steps, r)
        self.save_every = cadence(r.checkpoint.every, r.checkpoint.every_steps, r)
        # the last step's (lr, beta, gamma) as written, its samples, and its gradient norm for the log point
        self.hyper, self.last_size, self.step_grad_norm = None, 0, None
        self.tokens_per_sample = parts.plan.steps.tokens_per_sample or 0
        self.step_delay, self.eval_delay = env.step_delay(), env.eval_delay()
        self.owed_evaluation = False       # a preemption interrupted this position's mid-epoch evaluation
        self.pace = Activity()             # what the worker is doing: the watchdog and a failure's line read it

    def between_steps(self) -> None:
        """Back in the loop after resuming, evaluating or saving: progress, and a check soon (a signal may
        have come meanwhile)."""
        self.pace.between_steps()
        self.stop.hurry()

    def last_epoch(self) -> int:
        """The epochs this process trains: the run's (an adaptive batch may change them), or its segment's."""
        return min(self.until_epoch or self.stages.epochs, self.stages.epochs)

    def train(self) -> Outcome:
        """Train (or resume) to the end of the run, or of this segment."""
        self.resume()
        while self.state.epoch < self.last_epoch():
            epoch, stopping = self.state.epoch, False
            self.start_epoch(epoch)
            if self.owed_evaluation and not self.evaluate_mid_epoch(epoch):
                return self.interrupted()
            while self.state.step < self.stages.steps_in(epoch):      # (an adaptive batch may re-plan the epoch)
                step = self.state.step
                if self.stages.starts_stage(epoch, step):      # the batch changes inside the epoch
                    self.start_stage(epoch, step)
                self.train_step(epoch, step)
                last = step + 1 == self.stages.steps_in(epoch)
                if self.log_every and self.state.global_step % self.log_every == 0:
                    self.log_steps()
                if not last and self.evaluate_every.due(self.state, self.last_size) \
                        and not self.evaluate_mid_epoch(epoch):
                    return self.interrupted()
                stopping = self.stop.poll(self.state.global_step)
                segment_done = self.state.global_step == self.until_step
                if (stopping or segment_done) and not last:
                    self.save("preempted" if stopping else f"segment ends at global step {self.until_step}")
                    return Outcome.PREEMPTED if stopping else Outcome.SEGMENT_DONE
                if self.stop.checked:          # a step every rank agreed on: the queued rows' sums leave
                    self.step_rows.send()
                if not last and self.save_every.due(self.state, self.last_size):
                    self.save(f"every {self.save_every}")
            # no stop between an epoch's last step and its evaluation: the epoch row would then go to W&B
            # in the next segment, at a step the run already has, and be dropped; a stop agreed at the
            # last step comes after the epoch's row and save
            if not self.end_epoch(epoch):
                return self.interrupted()
            self.save("epoch end")
            if self.state.epoch < self.last_epoch() and (stopping or self.state.global_step == self.until_step):
                return Outcome.PREEMPTED if stopping else Outcome.SEGMENT_DONE
        return Outcome.FINISHED if self.state.epoch >= self.stages.epochs else Outcome.SEGMENT_DONE

    def interrupted(self) -> Outcome:
        """A preemption stopped an evaluation: saved where training stood, the evaluation owed (a resume
        does it first, so its row is the one an uninterrupted run writes)."""
        self.log(f"[qhm-launch] stop request: the evaluation at global step {self.state.global_step} stopped "
                 "part-way; it is done again on resume")
        self.save("preempted during an evaluation", owed_evaluation=True)
        return Outcome.PREEMPTED

    def resume(self) -> None:
        """Load the newest valid checkpoint (if any); open the logs and W&B where it left off."""
        self.pace.activity = "resuming"
        manifest = restore(self.parts, self.stages, self.log)
        self.owed_evaluation = owes_mid_epoch_evaluation(manifest, self.state, self.stages)
        self.reporter.open(self.state, owed_row=manifest is not None and bool(manifest.get("evaluation_owed")))
        self.between_steps()

    def start_epoch(self, epoch: int) -> None:
        """Enter epoch ``epoch`` (its stage at the step it starts from): batch split, hyper-parameters,
        data, progress bar."""
        self.start_stage(epoch, min(self.state.step, self.stages.steps_in(epoch) - 1))   # (trained: its last stage)
        self.sums.start_epoch(self.state.step)
        self.parts.module.train()
        self.reporter.start_epoch(self.stages.current, self.stages.steps_in(epoch), self.state)

    def start_stage(self, epoch: int, step: int) -> None:
        """A stage starts at step (epoch, step) (or the run resumes inside one): an adaptive batch decides
        if a decision point has passed, then the stage's split, hyper-parameters and data."""
        if self.parts.growth is not None:          # an adaptive batch: decided where a decision point passed
            self.parts.growth.at_stage_start(self.stages, epoch, step, self.sums)
        stage = self.stages.enter(epoch, step)
        if not self.stages.per_step:
            self.hyper = self.stages.hyperparams(epoch, step)
            qhm.apply_hyperparams(self.engine.optimizer, *self.hyper)
        self.parts.batches.start_epoch(epoch, step, stage)
        self.pace.new_shape()

    def train_step(self, epoch: int, step: int) -> None:
        """One optimizer step on global batch (epoch, step): this rank's micro-batches, one update."""
        started = self.pace.step_started()
        if self.stages.per_step:                    # schedules in steps, samples or tokens: every step its own
            self.hyper = self.stages.hyperparams(epoch, step)
            qhm.apply_hyperparams(self.engine.optimizer, *self.hyper)
        size = self.step_runner.run(epoch, step)
        logged = self.log_every and (self.state.global_step + 1) % self.log_every == 0
        if self.recipe.tracking.step_grad_norm and logged:
            self.step_grad_norm = self.engine.gradient_norm()      # read at the log point, not here
        self.engine.step()
        if logged and self.engine.clipped is not None:    # clipping: the norm it clipped, at the log point
            self.step_grad_norm = self.engine.clipped
        self.parts.noise.end_step(self.sums, size)
        self.sums.step_done()
        self.state.advance(size, self.tokens_per_sample)
        self.last_size = size
        self.pace.step_ended(started)
        if self.step_delay:
            time.sleep(self.step_delay)
        self.reporter.step_done()

    def log_steps(self) -> None:
        """A log point: the window's sums queued on the device; its steps.jsonl row follows (steprows.py)."""
        grad_norm, self.step_grad_norm = self.step_grad_norm, None
        self.step_rows.take(self.stages.current, self.hyper, self.state, self.sums, grad_norm)

    def evaluate(self, epoch: int) -> dict | None:
        """The evaluation passes, or None when a preemption every rank agreed on stopped them part-way."""
        self.pace.activity = "evaluating"
        with self.stages.eager():                    # evaluation shapes vary: never compiled
            return evaluate_unless_stopped(self.parts, epoch, self.stop.fresh(), self.eval_delay)

    def evaluate_mid_epoch(self, epoch: int) -> bool:
        """eval.every / every_steps: a ``mid_epoch`` row, so a target's crossing is not rounded to epochs; before
        any save at this step, so a checkpoint follows its row. False: a preemption interrupted it."""
        self.step_rows.flush()                     # W&B takes rows in step order
        evaluated = self.evaluate(epoch)
        if evaluated is None:
            return False
        self.owed_evaluation = False
        self.reporter.mid_epoch_row(self.stages.current, self.state, evaluated)
        self.between_steps()
        return True

    def end_epoch(self, epoch: int) -> bool:
        """The epoch's row: training sums over all ranks, evaluation, then the next position. False: a
        preemption interrupted the evaluation (nothing written, the position unchanged)."""
        stage = self.stages.current                # as split at the end (auto: maybe halved meanwhile)
        self.pace.activity = "evaluating"
        self.reporter.end_training()
        self.check_finite()
        totals = self.comm.all_reduce_sum(self.sums.as_tensor())
        evaluated = {}
        if (epoch + 1) % self.recipe.eval.every_epochs == 0 or epoch == self.stages.epochs - 1:
            evaluated = self.evaluate(epoch)
            if evaluated is None:
                return False
        self.reporter.epoch_row(stage, self.hyper, self.state, totals, self.sums.has_accuracy, evaluated,
                                self.parts.dataset.validation is not None)
        self.state.epoch, self.state.step = epoch + 1, 0
        self.sums.zero()
        if self.parts.growth is not None:
            self.parts.growth.at_epoch_end(epoch, totals, self.stages)
        self.between_steps()
        return True

    def check_finite(self) -> None:
        """Stop (every rank) if a loss was not finite since the last check, before anything is saved or logged.
        The step rows go first: a checkpoint follows every row up to its step (W&B takes them in order)."""
        self.step_rows.flush()
        self.sums.raise_unless_finite(self.comm, self.state, self.checkpoints.last_step)

    def save(self, tag: str, owed_evaluation: bool = False) -> None:
        self.pace.activity = "saving"
        self.check_finite()
        self.reporter.account_time(self.state)
        path = self.checkpoints.save(self.state.global_step, manifest(self.recipe, self.state, tag, owed_evaluation))
        self.log(f"[qhm-launch] checkpoint {path.name} ({tag})")
        self.between_steps()

    def close(self, outcome: Outcome) -> None:
        """After train(): checkpoint removal done, the agreement's last all-reduce in, W&B told how this part
        ended, the engine's hooks gone (DDP freed before its process group), the data workers ended."""
        self.step_rows.flush()
        self.checkpoints.wait()
        self.stop.close()
        self.reporter.finish(self.state, finished=outcome is Outcome.FINISHED)
        self.parts.close()


def run(recipe: Recipe, comm, preempt: PreemptionFlag | None = None, log=print, until_epoch: int | None = None,
        until_step: int | None = None) -> "Trainer":
    """Build the parts of this rank and train them, in this process (no markers, no final model: those
    are the CLI's). What benchmarks and in-process tests drive; the trainer is returned for what they
    read after training (its parts, state and stages)."""
    from launcher.train.build import build
    trainer = Trainer(build(recipe, comm, log), preempt or PreemptionFlag([]), until_epoch=until_epoch,
                      until_step=until_step)
    trainer.close(trainer.train())
    return trainer
