"""The run folder ``<output>/<name>/``: every file the launcher, the CLI, analysis and Slurm read or
write there is named here, and nowhere else.

    recipe.yaml             the resolved recipe (an earlier, different one is kept as recipe.prev-K.yaml)
    metrics.jsonl           one row per epoch (rank 0), and with eval.every_steps evaluation rows inside
                            epochs (``mid_epoch: true``)
    steps.jsonl             one row every ``tracking.log_every_steps`` optimizer steps (rank 0)
    checkpoints/            step-NNNNNNNNN/ folders and ``latest`` (see checkpoint.py)
    final_model.pt          the model's state_dict at the end
    complete.json           written when training finished (a rerun then does nothing)
    preempted.json          written when a run stopped on a preemption request after saving
    failed.json             the error line of a run that failed (for ``qhm-launch status``)
    failure.log             the traceback of each worker that failed on an unexpected exception
    preempt.request         created by a Slurm batch script: "checkpoint and stop" (all nodes see it)
    .lock                   held (flock) by the one process that runs this folder, for its whole life
    wandb_id                the W&B run id, created once
    wandb/                  W&B's own files
    slurm/                  generated sbatch scripts and job logs
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from launcher.errors import UserError
from launcher.run.files import (DIR_MODE, append_line, atomic_write, atomic_write_json, next_free, open_fd, read_rows)


@dataclass(frozen=True)
class RunFolder:
    path: Path

    def __post_init__(self):
        object.__setattr__(self, "path", Path(self.path))

    # ---- every name in the folder
    @property
    def recipe(self) -> Path:
        return self.path / "recipe.yaml"

    @property
    def metrics(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def steps(self) -> Path:
        return self.path / "steps.jsonl"

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @property
    def final_model(self) -> Path:
        return self.path / "final_model.pt"

    @property
    def tokenizer(self) -> Path:
        """A language model's tokenizer files (tokenizer.json, meta.json), kept with the model it trained."""
        return self.path / "tokenizer"

    @property
    def complete(self) -> Path:
        return self.path / "complete.json"

    @property
    def preempted(self) -> Path:
        return self.path / "preempted.json"

    @property
    def failed(self) -> Path:
        return self.path / "failed.json"

    @property
    def failure_log(self) -> Path:
        return self.path / "failure.log"

    @property
    def preempt_request(self) -> Path:
        return self.path / "preempt.request"

    @property
    def lock(self) -> Path:
        return self.path / ".lock"

    @property
    def wandb_id(self) -> Path:
        return self.path / "wandb_id"

    @property
    def wandb(self) -> Path:
        return self.path / "wandb"

    @property
    def slurm(self) -> Path:
        return self.path / "slurm"

    def next_previous_recipe(self) -> Path:
        """Where an earlier, different recipe.yaml is kept: recipe.prev-K.yaml, K the first free."""
        return next_free(self.path, "recipe.prev", ".yaml")

    def create(self) -> None:
        """The run folder, owner-only (its parents, the user's output folder, as the umask says)."""
        self.path.mkdir(parents=True, exist_ok=True, mode=DIR_MODE)

    def refuse_links(self) -> None:
        """A symbolic link among the run's files (a shared output folder: anyone may plant one), or the
        run folder itself a link, would make the run write through it; refused in one line before
        anything is written. So are a run file that is not a plain file (a folder named metrics.jsonl)
        and, where this user could not write them, the files and folders the run writes into: found now,
        not at the first save after an hour of training."""
        if self.path.is_symlink():
            raise UserError(f"run folder {str(self.path)!r} is a symbolic link (to {os.readlink(self.path)!r}); allowed: "
                            "a folder (the run's files are written into the folder itself, never through a link)")
        if not self.path.is_dir():
            return
        for path in (self.recipe, self.metrics, self.steps, self.failed, self.preempted, self.complete, self.lock,
                     self.wandb_id, self.final_model, self.failure_log):
            if path.exists() and not path.is_symlink() and not path.is_file():
                raise UserError(f"run folder {str(self.path)!r}: {path.name} is not a plain file (a folder?); allowed: "
                                "the run's own files (move it aside, or use another name)")
            if path.is_file() and not os.access(path, os.W_OK):
                raise UserError(f"run folder {str(self.path)!r}: {path.name} is not writable; allowed: files this user "
                                "can write (the run writes it; fix its permissions, or use another name)")
        for folder in (self.path, self.checkpoints):
            if folder.is_dir() and not os.access(folder, os.W_OK | os.X_OK):
                raise UserError(f"run folder {str(self.path)!r}: {folder.name}/ is not writable; allowed: folders this "
                                "user can write (the run saves there)")
        inside = [self.path / "checkpoints"] if (self.path / "checkpoints").is_dir() else []
        for folder in [self.path, *inside]:
            for entry in folder.iterdir():
                if entry.is_symlink():
                    raise UserError(f"run folder {str(self.path)!r} holds a symbolic link {entry.name!r} (to "
                                    f"{os.readlink(entry)!r}); allowed: a run folder of plain files and folders "
                                    "(remove the link, or use another name)")

    # ---- small readers and writers of those files
    def write_recipe(self, text: str) -> Path:
        """recipe.yaml: the recipe as resolved (``text``); a different earlier one is kept beside it."""
        self.create()
        if self.recipe.exists() and self.recipe.read_text() != text:
            self.recipe.rename(self.next_previous_recipe())
        atomic_write(self.recipe, text, durable=False)
        return self.recipe

    def read_json(self, path: Path) -> dict | None:
        """A marker file's content, or None when it is absent or unreadable."""
        try:
            value = json.loads(path.read_text())
        except (OSError, ValueError):
            return None
        return value if isinstance(value, dict) else None

    def write_marker(self, path: Path, content: dict) -> None:
        atomic_write_json(path, content)

    def append_failure(self, text: str) -> None:
        """A worker's traceback, appended to failure.log (every failure of the run is kept)."""
        self.create()
        append_line(self.failure_log, f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} {text.rstrip()}")

    def touch_heartbeat(self) -> None:
        """Mark the run alive (the lock file's time): ``status`` reads it for runs on other hosts."""
        try:
            os.utime(self.lock)
        except OSError:
            pass

    def metric_rows(self) -> list[dict]:
        """The epoch rows of metrics.jsonl (a line that is no row skipped, said once on stderr)."""
        return [r for r in self._rows(self.metrics) if not r.get("mid_epoch")]

    def mid_epoch_rows(self) -> list[dict]:
        """The rows eval.every_steps wrote inside epochs (evaluation only, ``mid_epoch: true``)."""
        return [r for r in self._rows(self.metrics, quiet=True) if r.get("mid_epoch")]

    def step_rows(self) -> list[dict]:
        return self._rows(self.steps, required="step")

    def _rows(self, path: Path, quiet: bool = False, required: str = "epoch") -> list[dict]:
        warn = None if quiet else (lambda line: print(line, file=sys.stderr))
        return read_rows(path, warn, required)

    def clear_stale(self, started: float | None = None) -> None:
        """Remove what an earlier, killed process of this run may have left: its markers of a state that
        no longer holds, and the per-process PID files older versions wrote (never trusted again). A
        failure marker written since ``started`` (this process's start) is another rank's, of this run,
        and stays."""
        for path in (self.preempted, self.preempt_request, self.failed):
            try:
                if path == self.failed and started is not None and path.stat().st_mtime >= started:
                    continue
            except OSError:
                continue
            path.unlink(missing_ok=True)
        shutil.rmtree(self.path / ".pids", ignore_errors=True)

    # ---- one run per folder
    def in_use(self) -> bool:
        """Whether another live process holds the folder's lock (nothing may be written into it then)."""
        try:
            fd = os.open(self.lock, os.O_RDONLY | os.O_NOFOLLOW)
        except OSError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            return False
        except OSError:
            return True
        finally:
            os.close(fd)

    def acquire_lock(self) -> "RunLock":
        """Hold the folder's advisory lock for this process's life (the kernel releases it on death).
        A second run of the same folder gets a one-line error."""
        self.create()
        self.refuse_links()
        try:
            fd = open_fd(self.lock, os.O_RDWR | os.O_CREAT)
        except OSError as exc:                  # a directory, or a file this user may not write
            raise UserError(f"run folder {str(self.path)!r}: its lock file {self.lock.name} cannot be opened "
                            f"({exc.strerror or type(exc).__name__}); allowed: a regular file this user can write "
                            "(remove it if no run holds the folder)") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            owner = lock_owner(fd)
            holder = f" (pid {owner[0]} on {owner[1]})" if owner else ""
            os.close(fd)
            if exc.errno in (errno.EAGAIN, errno.EACCES):
                raise UserError(f"run folder {str(self.path)!r} is in use by another run{holder}; allowed: one run "
                                "per folder (wait for it, or use another name)") from None
            raise
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()} {os.uname().nodename}\n".encode())
        return RunLock(fd)


def lock_owner(fd: int) -> tuple[str, str] | None:
    """(pid, host) that the run holding a lock file wrote into it; None when it cannot be read."""
    try:
        words = os.pread(fd, 200, 0).decode(errors="replace").split()
    except OSError:
        return None
    return (words[0], words[1]) if len(words) >= 2 else None


class RunLock:
    def __init__(self, fd: int):
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)          # closing the descriptor releases the flock
            self.fd = None
