"""Metrics: one JSON row per epoch in ``metrics.jsonl`` and one every ``tracking.log_every_steps``
optimizer steps in ``steps.jsonl`` (rank 0), mirrored to W&B.

On resume the rows after the checkpoint's position are dropped and written again, so a resumed run's
files equal the uninterrupted one's (wall-time fields aside). Every W&B ``log`` carries the global
optimizer step as its explicit step, so one run id holds one history across any number of restarts,
online or offline: a restarted job reuses the id stored in the checkpoint and the run folder.

Tracking is never in the way: if W&B fails at any point (its service killed by the same signal that
preempts the job, no network), the run says so in one line and trains, saves and requeues on; the
JSON-lines files stay complete.
"""
from __future__ import annotations

import json
import os
import sys
import uuid
import weakref
from pathlib import Path

from launcher.errors import one_line
from launcher.run.files import append_line, atomic_write, open_append, read_jsonl, write_line

WALL_FIELDS = ("wall_time", "samples_per_s", "tokens_per_s", "steps_per_s", "ms_per_step", "tflops_per_s", "mfu",
               "peak_memory_gib")


class MetricsLog:
    """A JSON-lines file of rows (epochs, or log points). ``durable`` fsyncs each row
    (epoch rows: few and precious); per-step rows are not, since a resume rewrites those after its
    checkpoint anyway."""

    def __init__(self, path: Path, durable: bool = True):
        self.path, self.durable = Path(path), durable
        self._fd = None          # a non-durable log keeps its file open: a log point costs one write

    def close(self) -> None:
        if self._fd is not None:
            self._closer()
            self._fd = None

    def rows(self) -> list[dict]:
        return read_jsonl(self.path)

    def keep(self, wanted) -> None:
        """Keep only the rows for which ``wanted(row)`` holds (the others will be computed again),
        atomically. Lines that are not rows (a ``# comment`` someone added, anything not a JSON object)
        are the user's and stay where they are; a torn last line (a kill mid-append) goes."""
        self.close()                          # the file is replaced: appends go to the new one
        if not self.path.exists():
            return
        text = self.path.read_bytes().decode("utf-8", errors="surrogateescape")
        lines = text.split("\n")
        torn = lines.pop() if lines else ""   # after the last newline: empty, or a torn row
        out, changed = [], bool(torn)
        for line in lines:
            try:
                row = json.loads(line)
            except ValueError:
                row = None
            try:
                drop = isinstance(row, dict) and not wanted(row)
            except (KeyError, TypeError):       # a row of another shape: the user's, kept
                drop = False
            if drop:
                changed = True
                continue
            out.append(line)
        if changed:
            data = "".join(line + "\n" for line in out).encode("utf-8", errors="surrogateescape")
            atomic_write(self.path, data, durable=False)

    def append(self, row: dict) -> None:
        if self.durable:
            append_line(self.path, json.dumps(row))
            return
        if self._fd is None:
            self._fd = open_append(self.path)
            self._closer = weakref.finalize(self, os.close, self._fd)     # closed with this object at the latest
        write_line(self._fd, self.path, json.dumps(row), durable=False)


def run_id(id_file: Path, from_checkpoint: str | None) -> str:
    """The W&B run id: created once, kept in the run folder and in every checkpoint."""
    id_file = Path(id_file)
    if from_checkpoint:
        rid = from_checkpoint
    elif id_file.exists() and id_file.read_text().strip():
        rid = id_file.read_text().strip()
    else:
        rid = uuid.uuid4().hex[:12]
    if not id_file.exists() or id_file.read_text().strip() != rid:
        atomic_write(id_file, rid + "\n", durable=False)
    return rid


def _let_go_of_wandb() -> None:
    """Drop W&B's connection to its (dead) service now, so its exit hook has nothing left to report."""
    try:
        import wandb
        wandb.teardown()
    except BaseException:  # noqa: BLE001 - it is already broken; all we want is silence
        pass


class Tracker:
    """W&B on rank 0 (mode online / offline / disabled). The API key is never written anywhere.

    Every call is guarded: the first failure prints one line and turns W&B off for the rest of the
    process; nothing else changes.
    """

    def __init__(self, recipe, wandb_dir: Path, rid: str, log=print):
        cfg = recipe.tracking.wandb
        self.run, self.log, self.last_step = None, log, -1
        self.owed_step: int | None = None      # a row a preemption left to the resume (see owe)
        if cfg.mode == "disabled":
            return
        try:
            import wandb
        except Exception as exc:  # noqa: BLE001 - not installed, or broken: W&B is never in the way
            print(f"[qhm-launch] W&B is not available ({type(exc).__name__}: {one_line(exc)[:160]}); training "
                  "continues without it, metrics.jsonl and steps.jsonl stay complete", file=sys.stderr, flush=True)
            return
        os.environ.setdefault("WANDB_SILENT", "true")
        self._guard("init", lambda: self._init(wandb, cfg, recipe, wandb_dir, rid))

    def _init(self, wandb, cfg, recipe, wandb_dir, rid):
        Path(wandb_dir).mkdir(parents=True, exist_ok=True)
        settings = wandb.Settings(x_disable_stats=not cfg.system_stats)
        self.run = wandb.init(project=cfg.project, entity=cfg.entity, group=cfg.group, tags=list(cfg.tags),
                              name=recipe.name, mode=cfg.mode, dir=str(Path(wandb_dir).parent), id=rid,
                              resume="allow", config=recipe.to_dict(), settings=settings)
        for axis in ("samples", "tokens", "epoch"):   # usable as x-axes beside the step
            self.run.define_metric(axis)
        # an online resume knows what it already has: do not log those steps again
        self.last_step = int(self.run.step) - 1 if self.run.resumed else -1

    def _guard(self, what: str, call):
        if what != "init" and self.run is None:
            return None
        try:
            return call()
        except BaseException as exc:  # W&B must never stop training
            if isinstance(exc, KeyboardInterrupt):
                raise
            print(f"[qhm-launch] W&B failed ({what}: {type(exc).__name__}: {one_line(exc)[:160]}); "
                  "training continues, metrics.jsonl and steps.jsonl stay complete", file=sys.stderr, flush=True)
            self.run = None
            _let_go_of_wandb()
            return None

    @property
    def active(self) -> bool:
        return self.run is not None

    @property
    def files(self) -> str | None:
        return None if self.run is None else str(Path(self.run.dir).parent)

    def owe(self, step: int) -> None:
        """The evaluation at ``step`` was interrupted by a preemption and is done again after the resume: its row
        was never logged, though an online run already has rows at that step (which W&B would drop it behind)."""
        self.owed_step = step

    def log_row(self, row: dict, step: int) -> None:
        """Log ``row`` at global optimizer step ``step`` (steps already in an online run are skipped, but for the
        row owed at one of them: it goes right after the run's last step, its own samples/tokens/epoch fields
        placing it on those axes)."""
        if step == self.owed_step and step <= self.last_step:
            step, self.owed_step = self.last_step + 1, None
        if self.run is not None and step > self.last_step:
            self._guard("log", lambda: self.run.log({k: v for k, v in row.items()              # text: why a value is null
                                                     if v is not None and not isinstance(v, str)}, step=step))

    def summarise(self, values: dict) -> None:
        if self.run is not None:
            self._guard("summary", lambda: self.run.summary.update(values))

    def finish(self, preempted: bool = False) -> None:
        """End this process's part of the run. A preempted segment is marked preempting, not failed:
        the next segment continues the same run id."""
        if self.run is None:
            return
        if preempted:
            self._guard("mark_preempting", self.run.mark_preempting)
        self._guard("finish", lambda: self.run.finish(exit_code=0))
        self.run = None
