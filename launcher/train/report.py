"""What a run reports: one row per epoch (metrics.jsonl) and one per log point (steps.jsonl), both of one
schema and mirrored to W&B at the global step; the progress bar; the clocks (wall time over restarts,
samples/s); the summary at the end. Rank 0 writes; every rank keeps the clocks."""
from __future__ import annotations

import math
import sys
import time
from typing import TYPE_CHECKING

import torch
from tqdm import tqdm

from launcher.run.tracking import MetricsLog, Tracker, run_id
from launcher.train import noise
from launcher.train.planning import Stage
from launcher.train.state import TrainState

if TYPE_CHECKING:
    from launcher.config import Recipe


HEARTBEAT_EVERY_S = 10.0      # the run folder's lock touched at most this often (status trusts 600 s)


def log_interval(recipe: Recipe, total_steps: int) -> int:
    """Optimizer steps between two steps.jsonl rows: the recipe's, or about 2,000 rows over the run
    (at least 25 steps apart: each row costs a few device operations, a JSON line and a W&B log)."""
    every = recipe.tracking.log_every_steps
    return max(25, total_steps // 2000) if every is None else every


class Reporter:
    def __init__(self, recipe: Recipe, comm, folder, log, tokens_per_sample: int | None = None, per_token: bool = False,
                 noise_windows: noise.NoiseWindows | None = None, flops_per_token: float | None = None):
        self.recipe, self.comm, self.folder, self.log = recipe, comm, folder, log
        self.noise_windows = noise_windows or noise.NoiseWindows()      # the step rows' B_simple (and its n)
        self.tokens_per_sample = tokens_per_sample      # rows count tokens where it is known
        self.per_token = per_token                      # a language model: losses per token, perplexities
        self.flops_per_token = flops_per_token          # where known: the step rows' TFLOP/s
        self.peak_tflops = peak_tflops(recipe, comm.device)   # where known: their MFU
        self.metrics = MetricsLog(folder.metrics)
        self.steps = MetricsLog(folder.steps, durable=False)
        self.tracker, self.bar = None, None
        self._clock = self._epoch_clock = self._log_clock = time.time()
        self._epoch_samples = self._log_samples = self._log_steps = 0
        self._heartbeat, self._epoch_seconds = 0.0, 0.0

    def open(self, state: TrainState, owed_row: bool = False) -> None:
        """After a resume: drop the rows past the checkpoint (they are computed again), open W&B under
        the run's one id (``owed_row``: the evaluation at this step was interrupted, its row is owed), start the
        clocks."""
        if self.comm.is_main:
            # epoch rows by epoch (a save at an epoch's last step comes before its row); the rows of
            # eval.every_steps by step (each is written before any save at its step)
            self.metrics.keep(lambda r: r["step"] <= state.global_step if r.get("mid_epoch")
                              else r["epoch"] < state.epoch)
            self.steps.keep(lambda r: r["step"] <= state.global_step)
            state.wandb_id = run_id(self.folder.wandb_id, state.wandb_id or None)
            self.tracker = Tracker(self.recipe, self.folder.wandb, state.wandb_id, self.log)
            if owed_row:
                self.tracker.owe(state.global_step)
        state.wandb_id = self.comm.broadcast(state.wandb_id)
        self._clock = self._log_clock = time.time()
        self._log_samples, self._log_steps = state.samples, state.global_step

    def start_epoch(self, stage: Stage, steps: int, state: TrainState) -> None:
        self._epoch_clock, self._epoch_samples = time.time(), state.samples
        show = self.comm.is_main and sys.stderr.isatty()
        self.bar = tqdm(total=steps, initial=state.step, desc=f"epoch {stage.epoch} (batch {stage.batch})",
                        leave=False, dynamic_ncols=True, file=sys.stderr) if show else None

    def end_training(self) -> None:
        """The epoch's training is done (what follows, evaluation, is not in its samples/s). On a GPU the
        host may be steps ahead of the device: the clock stops once the device has finished (one
        synchronisation an epoch; the epoch's sums are read right after anyway)."""
        if self.comm.device.type == "cuda":
            torch.cuda.synchronize(self.comm.device)
        self._epoch_seconds = time.time() - self._epoch_clock

    def step_done(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def close_bar(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def account_time(self, state: TrainState) -> None:
        now = time.time()
        state.wall_time += now - self._clock
        self._clock = now

    def row(self, stage: Stage, hyper: tuple, state: TrainState, sums: list[float], has_accuracy: bool) -> dict:
        """The fields both logs share: position (and tokens, where counted), split, the hyper-parameters
        of the last step (``hyper``: lr, beta, gamma as written into the optimizer), the training loss and
        accuracy and the gradient noise estimates over ``sums`` (laid out as :data:`EpochSums.FIELDS`)."""
        loss, correct, count = sums[:3]
        lr, beta, gamma = hyper
        row = {**noise.window_fields(sums[3:6], self.noise_windows.n), "epoch": stage.epoch, "step": state.global_step,
               "samples": state.samples, **self.tokens(state), "batch": stage.batch, "micro_batch": stage.micro_batch,
               "accum": stage.accum, "world_size": self.comm.world,
               "lr": lr, "beta": beta, "gamma": gamma, "train_loss": loss / max(count, 1),
               "train_acc": correct / max(count, 1) if has_accuracy else None}
        if self.per_token:                   # the mean over the tokens that count, not over samples
            row.update(train_loss=loss / max(sums[6], 1), train_acc=None)
            row["train_ppl"] = perplexity(row["train_loss"])
        return row

    def tokens(self, state: TrainState) -> dict:
        """``tokens`` trained so far, where a sample's tokens are known (nothing otherwise)."""
        return {"tokens": state.tokens} if self.tokens_per_sample else {}

    def rates(self, samples: int, seconds: float) -> dict:
        """samples/s (and tokens/s where tokens are counted) of ``samples`` trained in ``seconds``."""
        out = {"samples_per_s": round(samples / max(seconds, 1e-9), 1)}
        if self.tokens_per_sample:
            out["tokens_per_s"] = round(samples * self.tokens_per_sample / max(seconds, 1e-9), 1)
        return out

    def epoch_row(self, stage: Stage, hyper: tuple, state: TrainState, totals: torch.Tensor, has_accuracy: bool,
                  evaluated: dict, with_validation: bool) -> None:
        """The epoch's row: its training sums over all ranks and what evaluation measured."""
        train_seconds = self._epoch_seconds
        self.close_bar()
        sums = totals.tolist()                                                  # one read of the device
        row = self.row(stage, hyper, state, sums, has_accuracy)
        self.noise_windows.end_epoch(sums[3:6])
        row.update(test_loss=None, test_acc=None, grad_norm=None)
        if with_validation:
            row.update(val_loss=None, val_acc=None)
        row.update(evaluated)
        with_perplexities(row, self.per_token)
        row["min_grad_norm"] = None if state.min_grad_norm == float("inf") else state.min_grad_norm
        self.account_time(state)
        row.update(wall_time=round(state.wall_time, 3), **self.rates(state.samples - self._epoch_samples, train_seconds))
        if self.comm.is_main:
            self.metrics.append(row)
            self.tracker.log_row(row, step=state.global_step)
            self.log(f"[qhm-launch] epoch {stage.epoch}: batch {stage.batch} ({stage.micro_batch}x{stage.accum}"
                     f"x{self.comm.world}) " + console_fields(row))

    def mid_epoch_row(self, stage: Stage, state: TrainState, evaluated: dict) -> None:
        """eval.every / every_steps: what evaluation measured at this global step, inside epoch ``stage.epoch``."""
        evaluated = with_perplexities(dict(evaluated), self.per_token)
        row = {"epoch": stage.epoch, "step": state.global_step, "samples": state.samples, **self.tokens(state),
               "mid_epoch": True,
               "batch": stage.batch, "world_size": self.comm.world, **evaluated,
               "wall_time": round(state.wall_time + time.time() - self._clock, 3)}
        if self.comm.is_main:
            self.metrics.append(row)
            self.tracker.log_row({k: v for k, v in row.items() if k != "mid_epoch"}, step=state.global_step)
            self.log(f"[qhm-launch] evaluation at step {state.global_step} ({position(row)}): " + " ".join(
                f"{k} {row[k]:.4g}" for k in EVALUATED if row.get(k) is not None))

    def log_point(self, state: TrainState) -> dict:
        """The clock fields of a steps.jsonl row, read at its log point (its sums come back later)."""
        now = time.time()
        seconds, steps = max(now - self._log_clock, 1e-9), state.global_step - self._log_steps
        clocks = {**self.rates(state.samples - self._log_samples, seconds),
                  "wall_time": round(state.wall_time + now - self._clock, 3)}      # over restarts, as epoch rows
        if steps > 0:
            clocks["ms_per_step"] = round(1000 * seconds / steps, 2)
        if self.flops_per_token and "tokens_per_s" in clocks:
            clocks["tflops_per_s"] = round(clocks["tokens_per_s"] * self.flops_per_token / 1e12, 4)
            if self.peak_tflops:     # model FLOPs utilisation: one device's share against its peak
                clocks["mfu"] = round(clocks["tflops_per_s"] / self.comm.world / self.peak_tflops, 4)
        if self.comm.device.type == "cuda":
            clocks["peak_memory_gib"] = round(torch.cuda.max_memory_allocated(self.comm.device) / 2**30, 2)
        self._log_clock, self._log_samples, self._log_steps = now, state.samples, state.global_step
        return clocks

    def step_row(self, stage: Stage, hyper: tuple, state: TrainState, window: list[float], has_accuracy: bool,
                 grad_norm, clocks: dict) -> None:
        """A steps.jsonl row for the window since the last one (and W&B, under step/, at this global step);
        ``state``, ``hyper`` and ``clocks`` as they were at the log point."""
        row = {**self.row(stage, hyper, state, window, has_accuracy), **clocks}
        if window[5]:                 # measured steps: B_simple over enough recent windows, with its error
            for key in ("noise_scale_reason", "noise_scale_lower_bound"):
                row.pop(key, None)
            row.update(self.noise_windows.add(window[3:6]))
        if grad_norm is not None:      # one step's mini-batch gradient: not the epoch rows' full-gradient norm
            row["minibatch_grad_norm"] = float(grad_norm)
        if self.comm.is_main:
            self.steps.append(row)
            if self.tracker.active:
                self.tracker.log_row({("step/" + k if k not in ("epoch", "samples", "tokens", "step") else k): v
                                      for k, v in row.items() if k != "step"}, step=row["step"])
            if self._log_clock - self._heartbeat >= HEARTBEAT_EVERY_S:
                self.folder.touch_heartbeat()
                self._heartbeat = self._log_clock
            if self.bar is not None:   # a terminal: the line above the bar, which tqdm redraws under it
                self.bar.set_postfix(loss=f"{row['train_loss']:.4f}", lr=f"{stage.lr:.3g}", refresh=False)
                tqdm.write(step_line(row, self.comm.world), file=sys.stdout)
            else:                      # not a terminal (torchrun, a Slurm log): a line per log point
                self.log(step_line(row, self.comm.world))

    def finish(self, state: TrainState, finished: bool) -> None:
        """W&B: a finished run gets its summary; a preempted one (or an elastic chain's segment) is marked
        preempting, so the next segment continues the same run id."""
        self.close_bar()
        self.steps.close()
        if not self.comm.is_main:
            return
        if finished:
            rows, step_rows = self.folder.metric_rows(), self.folder.step_rows()
            print_summary(self.recipe, state, rows, self.tracker, self.log, step_rows)
            self.tracker.summarise(summary_values(state, rows, step_rows))
        self.tracker.finish(preempted=not finished)


def perplexity(loss: float | None) -> float | None:
    """exp(loss) of a per-token loss (in nats); None where there is none, inf past what a float holds."""
    if loss is None:
        return None
    return math.exp(loss) if loss < 709 else float("inf")


def with_perplexities(row: dict, per_token: bool) -> dict:
    """A language model's row: ``*_ppl`` beside each evaluated ``*_loss`` (and no accuracy)."""
    if per_token:
        for split in ("test", "val"):
            if f"{split}_loss" in row:
                row[f"{split}_ppl"] = perplexity(row[f"{split}_loss"])
                row.pop(f"{split}_acc", None)
    return row


EVALUATED = ("test_loss", "test_ppl", "test_acc", "val_loss", "val_ppl", "val_acc", "grad_norm")


def amount(n: float) -> str:
    """1,234 -> 1.23K, 5,000,000 -> 5M: a count as a person reads it."""
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.3g}{unit}"
    return f"{n:g}"


def position(row: dict) -> str:
    """Where a row is in the run: its tokens where counted, else its samples."""
    return f"{amount(row['tokens'])} tokens" if row.get("tokens") is not None else f"{amount(row['samples'])} samples"


def step_line(row: dict, world: int) -> str:
    """The console line of a steps.jsonl row: step, position, loss, LR, gradient norm, throughput (global and
    per device), ms per step, TFLOP/s where the model's FLOPs are known."""
    parts = [f"step {row['step']}", position(row), f"loss {row['train_loss']:.4f}", f"lr {row['lr']:.3g}"]
    if row.get("minibatch_grad_norm") is not None:
        parts.append(f"grad_norm {row['minibatch_grad_norm']:.3g}")
    rate, what = (row["tokens_per_s"], "tokens/s") if "tokens_per_s" in row else (row["samples_per_s"], "samples/s")
    parts.append(f"{amount(rate)} {what} ({amount(rate / world)}/device)")
    if row.get("ms_per_step") is not None:
        parts.append(f"{row['ms_per_step']:.1f} ms/step")
    if row.get("tflops_per_s") is not None:
        parts.append(f"{row['tflops_per_s'] / world:.3g} TFLOP/s/device")
    if row.get("mfu") is not None:
        parts.append(f"MFU {100 * row['mfu']:.1f}%")
    if row.get("peak_memory_gib") is not None:
        parts.append(f"peak mem {row['peak_memory_gib']:.2f} GiB")
    return "[qhm-launch] " + " | ".join(parts)


# Dense (no sparsity) bf16/fp16 tensor-core peaks, TFLOP/s per device, from the vendors' data sheets; the first
# name contained in torch.cuda.get_device_name() wins (so "H100 PCIe" before "H100").
PEAK_TFLOPS_16BIT = (("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.4), ("H200", 989.4), ("GH200", 989.4),
                     ("B200", 2250.0), ("A100", 312.0), ("A800", 312.0), ("L40S", 362.0), ("L40", 181.0),
                     ("A6000", 154.8), ("A10G", 70.0), ("A10", 125.0), ("V100", 125.0), ("L4", 121.0),
                     ("MI300X", 1307.4), ("MI250X", 383.0))


def peak_tflops(recipe: Recipe, device: torch.device, name: str | None = None) -> float | None:
    """One device's peak TFLOP/s for MFU: ``performance.peak_tflops``, else a known GPU's 16-bit dense peak
    when the run computes in bf16 or fp16 (the peak of fp32 depends on TF32 and is not guessed), else None."""
    if recipe.performance.peak_tflops:
        return float(recipe.performance.peak_tflops)
    if device.type != "cuda" or recipe.precision not in ("bf16", "fp16"):
        return None
    name = name or torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_TFLOPS_16BIT if key in name), None)


def console_fields(row: dict) -> str:
    """The console line's measurements: loss first; accuracy only where a run has one."""
    fmt = lambda v, d: None if v is None else round(v, d)  # noqa: E731
    parts = [f"loss {row['train_loss']:.4f}"]
    if "test_ppl" in row:
        parts += [f"test_loss {fmt(row.get('test_loss'), 4)}", f"test_ppl {fmt(row.get('test_ppl'), 2)}"]
    elif row.get("test_acc") is not None or row.get("train_acc") is not None:
        parts.append(f"test_acc {fmt(row.get('test_acc'), 4)}")
    else:
        parts.append(f"test_loss {fmt(row.get('test_loss'), 4)}")
    return " ".join(parts + [f"grad_norm {fmt(row.get('grad_norm'), 5)}"])


def has_accuracy(rows: list[dict]) -> bool:
    """Whether any row measured an accuracy (a language model's, or a regression's, never do)."""
    return any(r.get(k) is not None for r in rows for k in ("train_acc", "test_acc", "val_acc"))


def final_train_loss(rows: list[dict], step_rows: list[dict]) -> float | None:
    """The training loss where the run ended: the last steps.jsonl row's (the window since the log point
    before it), else the last epoch row's mean (no step rows: tracking.log_every_steps 0)."""
    window = step_rows[-1].get("train_loss") if step_rows else None
    return window if window is not None else (rows[-1].get("train_loss") if rows else None)


def summary_values(state: TrainState, rows: list[dict], step_rows: list[dict] | None = None) -> dict:
    last = rows[-1] if rows else {}
    keys = ("train_loss", "train_acc", "test_loss", "test_acc", "test_ppl", "grad_norm")
    out = {f"final_{k}": last.get(k) for k in keys}
    out["final_train_loss"] = final_train_loss(rows, step_rows or [])
    out["last_epoch_train_loss"] = last.get("train_loss")      # the mean over the last epoch's steps
    if has_accuracy(rows):
        out.update(best_test_acc=state.best_test_acc, best_val_acc=state.best_val_acc or None)
    else:
        out["best_test_loss"] = min((r["test_loss"] for r in rows if r.get("test_loss") is not None), default=None)
    out.update(min_grad_norm=None if state.min_grad_norm == float("inf") else state.min_grad_norm,
               total_steps=state.global_step, total_sfo=state.samples)
    if state.tokens:
        out["total_tokens"] = state.tokens
    return {k: v for k, v in out.items() if v is not None}


def print_summary(recipe: Recipe, state: TrainState, rows: list[dict], tracker, log=print,
                  step_rows: list[dict] | None = None) -> None:
    last = rows[-1] if rows else {}
    fmt = lambda v: "-" if v is None else (f"{v:.5g}" if isinstance(v, float) else str(v))  # noqa: E731
    folder = recipe.folder
    # the loss where the run ended (the last log window), and beside it the mean over the last epoch, named
    train = [("final train loss", final_train_loss(rows, step_rows or [])),
             *([("mean train loss, last epoch", last.get("train_loss"))] if step_rows else [])]
    measured = ([*train, ("final test acc", last.get("test_acc")), ("best test acc", state.best_test_acc)]
                if has_accuracy(rows) else
                [*train, ("final test loss", last.get("test_loss")),
                 *([("final test perplexity", last["test_ppl"])] if last.get("test_ppl") is not None else [])])
    items = [("epochs", state.epoch), ("optimizer steps", state.global_step), ("samples (SFO)", state.samples),
             *([("tokens", state.tokens)] if state.tokens else []), *measured,
             ("min grad norm", None if state.min_grad_norm == float("inf") else state.min_grad_norm),
             ("wall time (s)", round(state.wall_time, 1))]
    width = max(len(k) for k, _ in items)
    log("\n".join(["", f"run {recipe.name} complete"] + [f"  {k:<{width}}  {fmt(v)}" for k, v in items] + [
        f"  {'metrics':<{width}}  {folder.metrics}",
        f"  {'checkpoints':<{width}}  {folder.checkpoints}",
        f"  {'final model':<{width}}  {folder.final_model}",
        f"  {'W&B files':<{width}}  {tracker.files if tracker and tracker.files else 'disabled'}"]))
    sys.stdout.flush()          # the run's last lines: on screen (and in a job's log) before the process ends
