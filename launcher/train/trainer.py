"""The training loop of one worker, over parts built elsewhere (:mod:`launcher.train.build`).
:meth:`Trainer.train` reads top to bottom: resume, then for each epoch enter its stage, run its steps
(entering the next stage where the batch changes inside the epoch), end the epoch and save; it returns an
:class:`Outcome`, which the CLI turns into markers, the final model and an exit status. No callbacks.
"""
from __future__ import annotations

import enum
import os
import time

import torch

import qhm
from launcher import config, env
from launcher.errors import RunFailed, UserError
from launcher.train.build import Parts
from launcher.train.evaluation import Interrupted, evaluate_epoch
from launcher.train.cadence import cadence
from launcher.train.report import Reporter, log_interval
from launcher.train.signals import Agreement, PreemptionFlag
from launcher.train.stages import Stages
from launcher.train.steprows import StepRows
from launcher.train.step import StepRunner


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
                                 per_token=parts.loss.per_token, noise_windows=parts.noise_windows)
        self.step_rows = StepRows(self.comm, self.reporter, self.stop_if_unfinished)
        self.stop = Agreement(self.comm, preempt, self.folder.preempt_request, log=self.log)
        self.log_every = log_interval(r, parts.plan.total_steps)
        self.evaluate_every = cadence(r.eval.every, r.eval.every_steps, r)
        self.save_every = cadence(r.checkpoint.every, r.checkpoint.every_steps, r)
        self.step_grad_norm = None
        self.hyper = None                  # (lr, beta, gamma) of the last step, as written into the optimizer
        self.last_size = 0                 # the last step's samples
        self.tokens_per_sample = parts.plan.steps.tokens_per_sample or 0
        self.step_delay, self.eval_delay = env.step_delay(), env.eval_delay()
        self.owed_evaluation = False       # a preemption interrupted this position's mid-epoch evaluation
        self.activity = "starting"        # what the worker is doing: the one-line failure says where it was
        self.progress = time.monotonic()   # when a step last started or ended (the watchdog reads these two)
        self.typical: float | None = None  # seconds a step takes, smoothed

    def between_steps(self) -> None:
        """Back in the loop after resuming, evaluating or saving: that was progress (the watchdog's clock)."""
        self.activity, self.progress = "between steps", time.monotonic()
        self.stop.hurry()
    def where(self) -> str:
        """Where this worker is, for a failure's line: in a step, or between steps (saving, evaluating)."""
        g = self.state.global_step
        return {"starting": "before training", "resuming": "while resuming",
                "step": f"at global step {g + 1}"}.get(self.activity, f"after global step {g}")

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
                    self.log_steps(epoch)
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
        self.activity = "resuming"
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
            if config.is_branch_start(self.recipe, manifest):    # a branch starts: its own W&B run, grouped under the parent
                b = self.recipe.branch
                s.wandb_id = ""
                self.log(f"[qhm-launch] branch of {b.parent} at global step {b.at_step}: batch x{b.factor}, "
                         f"lr rule {b.lr_rule}, for {b.length}")
        restarts = int(os.environ.get("TORCHELASTIC_RESTART_COUNT") or 0)
        if restarts:                                # elastic membership: torchrun restarted the workers
            self.log(f"[qhm-launch] membership changed (torchrun's restart {restarts}): world size "
                     + (f"{manifest['world_size']} -> {self.comm.world}, resumed from global step {self.state.global_step}"
                        if manifest is not None else f"now {self.comm.world}, no checkpoint yet: starting from the beginning"))
        if self.parts.growth is not None:           # the batches an adaptive run already chose
            if manifest is not None:
                self.parts.growth.check(f"checkpoint step-{manifest['step']:09d}")
            self.stages.set_decisions(self.parts.growth.batches)
        if manifest is not None:
            self.check_position(manifest)
            self.owed_evaluation = bool(manifest.get("evaluation_owed")) and self.state.step > 0 \
                and self.state.step < self.stages.steps_in(self.state.epoch)   # an epoch's end: end_epoch does it
        self.reporter.open(self.state)
        self.between_steps()

    def check_position(self, manifest: dict) -> None:
        """The restored position must be one of the run's plan (a checkpoint whose values were edited and
        its hash recomputed is refused in one line naming the field, not trained from)."""
        s, plan = self.state, self.stages.plan
        where = f"checkpoint step-{manifest['step']:09d}"

        def bad(field, value, allowed):
            raise UserError(f"{where}: {field} {value!r} is not valid; allowed: {allowed} (move this checkpoint aside "
                            "to resume from the one before it)")
        for field in ("epoch", "step", "global_step", "samples"):
            value = getattr(s, field)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                bad(f"train.{field}", value, "an integer >= 0")
        if s.epoch > plan.epochs:
            bad("train.epoch", s.epoch, f"an epoch of the run's plan (0 to {plan.epochs})")
        steps = plan.steps_in(s.epoch) if s.epoch < plan.epochs else 0
        last = steps if manifest.get("evaluation_owed") else steps - 1    # trained, its evaluation interrupted
        if not (s.step <= last or s.step == 0):
            bad("train.step", s.step, f"a step of epoch {s.epoch} (0 to {max(last, 0)})")
        if manifest["step"] != s.global_step:
            bad("train.global_step", s.global_step, f"the checkpoint's own step, {manifest['step']}")
        if config.trajectory_hash(manifest.get("recipe", {})) != config.trajectory_hash(self.recipe.to_dict()):
            return                                  # --force-resume, a branch's start: another plan wrote it
        if s.step == steps > 0:                    # the epoch trained: where the next one starts
            global_step, samples = plan.end_of(s.epoch)
        elif s.epoch < plan.epochs:
            stage = plan.stages[plan.index(s.epoch, s.step)]
            global_step, samples = stage.global_step + s.step - stage.first, stage.samples + stage.start(s.step) - stage.offset
        else:
            global_step, samples = plan.total_steps, plan.total_samples
        if (s.global_step, s.samples) != (global_step, samples):
            bad("train.global_step/samples", (s.global_step, s.samples),
                f"({global_step}, {samples}): where the plan puts epoch {s.epoch} step {s.step}")

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
        growth = self.parts.growth
        if growth is not None and growth.per_step:
            decided = growth.decide_at(self.stages.at(epoch, step), self.sums)
            if decided:
                self.stages.set_decisions(growth.batches)
        stage = self.stages.enter(epoch, step)
        if not self.stages.per_step:
            self.hyper = self.stages.hyperparams(epoch, step)
            qhm.apply_hyperparams(self.engine.optimizer, *self.hyper)
        self.parts.batches.start_epoch(epoch, step, stage)
        # a new batch shape: its first step may compile; no step time to judge it by until it ends
        self.typical, self.progress = None, time.monotonic()

    def train_step(self, epoch: int, step: int) -> None:
        """One optimizer step on global batch (epoch, step): this rank's micro-batches, one update."""
        started = self.progress = time.monotonic()
        self.activity = "step"
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
        self.state.step, self.state.global_step = step + 1, self.state.global_step + 1
        self.state.samples += size
        self.state.tokens += size * self.tokens_per_sample
        self.last_size = size
        self.progress = time.monotonic()
        took = self.progress - started
        self.typical = took if self.typical is None else 0.8 * self.typical + 0.2 * took
        self.activity = "between steps"
        if self.step_delay:
            time.sleep(self.step_delay)
        self.reporter.step_done()

    def log_steps(self, epoch: int) -> None:
        """A log point: the window's sums since the last one (and this rank's steps whose loss stayed
        finite) queued on the device; its steps.jsonl row is written about a second later (see steprows.py)."""
        grad_norm, self.step_grad_norm = self.step_grad_norm, None
        window = self.sums.take_window()
        self.step_rows.take(self.stages.current, self.hyper, self.state, self.sums.has_accuracy,
                            torch.cat([window, self.sums.finite()]), grad_norm)

    def evaluate(self, epoch: int) -> dict | None:
        """The evaluation passes, or None when a preemption every rank agreed on stopped them part-way."""
        self.activity, agreement = "evaluating", self.stop.fresh()

        def stopped() -> bool:
            if self.eval_delay:
                time.sleep(self.eval_delay)
            return agreement.poll()
        try:
            with self.stages.eager():                # evaluation shapes vary: never compiled
                return evaluate_epoch(self.parts, epoch, stopped)
        except Interrupted:
            return None
        finally:
            agreement.close()

    def evaluate_mid_epoch(self, epoch: int) -> bool:
        """eval.every / every_steps: a metrics.jsonl row inside the epoch (``mid_epoch: true``), so a
        target's crossing is not rounded to epochs. Before any save at this step, so a checkpoint follows
        its row. False: a preemption interrupted it."""
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
        self.activity = "evaluating"
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
        growth = self.parts.growth
        if growth is not None and not growth.per_step:
            grown = growth.end_epoch(epoch, totals)
            if grown:                               # adaptive: the next interval's batch, saved with this epoch
                self.stages.set_decisions(growth.batches)
        elif growth is not None:
            growth.end_epoch_sums(totals)
        self.between_steps()
        return True

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

    def save(self, tag: str, owed_evaluation: bool = False) -> None:
        self.activity = "saving"
        self.check_finite()
        self.reporter.account_time(self.state)
        recipe = self.recipe.to_dict()
        path = self.checkpoints.save(self.state.global_step, {
            "position": self.state.state_dict(), "recipe": recipe, "recipe_hash": config.trajectory_hash(recipe),
            "wandb_id": self.state.wandb_id, "tag": tag, **({"evaluation_owed": True} if owed_evaluation else {})})
        self.log(f"[qhm-launch] checkpoint {path.name} ({tag})")
        self.between_steps()

    def close(self, outcome: Outcome) -> None:
        """After train(): background checkpoint removal done, the stop agreement's last all-reduce in,
        W&B told how this process's part of the run ended, the engine's hooks gone (so DDP can be freed
        before its process group is destroyed), the data workers ended."""
        self.step_rows.flush()
        self.checkpoints.wait()
        self.stop.close()
        self.reporter.finish(self.state, finished=outcome is Outcome.FINISHED)
        self.parts.close()


def run(recipe, comm, preempt: PreemptionFlag | None = None, log=print, until_epoch: int | None = None,
        until_step: int | None = None) -> "Trainer":
    """Build the parts of this rank and train them, in this process (no markers, no final model: those
    are the CLI's). What benchmarks and in-process tests drive; the trainer is returned for what they
    read after training (its parts, state and stages)."""
    from launcher.train.build import build
    trainer = Trainer(build(recipe, comm, log), preempt or PreemptionFlag([]), until_epoch=until_epoch,
                      until_step=until_step)
    trainer.close(trainer.train())
    return trainer
