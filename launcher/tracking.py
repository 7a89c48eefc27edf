"""Metrics: one JSON object per epoch in ``<run>/metrics.jsonl`` (rank 0), mirrored to W&B.

On resume the rows at or after the checkpoint's epoch are dropped and written again, so a resumed
run's file equals the uninterrupted one's (wall-time fields aside). W&B logs against the monotone
``samples`` step; a restarted job reuses the run id stored in the checkpoint and the run folder.
"""
from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

WALL_FIELDS = ("wall_time", "samples_per_s")


class MetricsLog:
    def __init__(self, path: Path):
        self.path = Path(path)

    def rows(self) -> list[dict]:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]

    def keep_before(self, epoch: int) -> None:
        """Drop rows of epochs >= ``epoch`` (they will be computed again), atomically."""
        rows = self.rows()
        kept = [r for r in rows if r["epoch"] < epoch]
        if len(kept) == len(rows):
            return
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
        os.replace(tmp, self.path)

    def append(self, row: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()
            os.fsync(f.fileno())


def run_id(run_dir: Path, from_checkpoint: str | None) -> str:
    """The W&B run id: created once, kept in the run folder and in every checkpoint."""
    path = Path(run_dir) / "wandb_id"
    if from_checkpoint:
        rid = from_checkpoint
    elif path.exists():
        rid = path.read_text().strip()
    else:
        rid = uuid.uuid4().hex[:12]
    if not path.exists() or path.read_text().strip() != rid:
        path.write_text(rid + "\n")
    return rid


class Tracker:
    """W&B on rank 0 (mode online / offline / disabled). The API key is never written anywhere."""

    def __init__(self, recipe, run_dir: Path, rid: str):
        cfg = recipe.tracking.wandb
        self.run, self.last_epoch = None, -1
        if cfg.mode == "disabled":
            return
        import wandb
        os.environ.setdefault("WANDB_SILENT", "true")
        self.run = wandb.init(project=cfg.project, entity=cfg.entity, group=cfg.group, tags=list(cfg.tags),
                              name=recipe.name, mode=cfg.mode, dir=str(run_dir), id=rid, resume="allow",
                              config=recipe.to_dict())
        self.run.define_metric("samples")
        self.run.define_metric("*", step_metric="samples")
        # an online resume knows what it already has: do not log those epochs twice
        self.last_epoch = int(self.run.summary.get("epoch", -1)) if self.run.resumed else -1

    @property
    def files(self) -> str | None:
        return None if self.run is None else str(Path(self.run.dir).parent)

    def log(self, row: dict) -> None:
        if self.run is not None and row["epoch"] > self.last_epoch:
            self.run.log({k: v for k, v in row.items() if v is not None})

    def finish(self, exit_code: int = 0) -> None:
        if self.run is not None:
            self.run.finish(exit_code=exit_code)
