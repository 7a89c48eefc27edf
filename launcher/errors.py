"""The errors a user sees, and the exit statuses they map to. Every module may import this one.

:class:`UserError` is bad input of any kind (a recipe key, a command-line option, missing data, a
checkpoint that cannot be used): its message is the one line the user reads, and the CLI exits with
:data:`BAD_INPUT`. :data:`PREEMPTED` is the status of a run that stopped on a preemption request
after saving a checkpoint: running the same command again resumes it.
"""
from __future__ import annotations

import errno
import os
import shutil

FAILED = 1              # the run stopped on a failure it could name (one line), e.g. a non-finite loss
BAD_INPUT = 2           # one line on stderr, nothing started (or nothing changed)
PREEMPTED = 75          # EX_TEMPFAIL: "preempted, resume me" (run the same command again)


class UserError(ValueError):
    """Bad input: the message is one line naming what is wrong, the value and what is allowed."""


class RecipeError(UserError):
    """A bad recipe key or override (a :class:`UserError` about the recipe itself)."""


class RunFailed(Exception):
    """Training stopped on a failure it can state in one line (exit :data:`FAILED`); nothing after the
    last good checkpoint was saved."""


DISK_FULL = (errno.ENOSPC, errno.EDQUOT)     # no space left on the device, or the user's quota spent


class DiskFull(RunFailed):
    """A write that found no space (or no quota) left: one line naming the folder, the file and the
    bytes it needed. What was saved before stays valid (a partial checkpoint is a .tmp- folder, which
    the next save removes), so the same command resumes once there is room."""

    def __init__(self, path, needed: int | None):
        folder = os.path.dirname(os.path.abspath(path)) or "."
        if os.path.basename(folder).startswith(".tmp-"):    # a checkpoint being written: name its folder
            folder = os.path.dirname(folder)
        try:
            free = f"{shutil.disk_usage(folder).free} bytes free"
        except OSError:
            free = "free space unknown"
        need = f"{needed} bytes" if needed is not None else "more room"
        super().__init__(f"no space left on the device of {folder}: writing {os.path.basename(path)} needed {need}, "
                         f"{free}; free some space (older runs, a smaller checkpoint.keep) and run the same command "
                         "again: it resumes from the newest checkpoint")


def disk_full(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and exc.errno in DISK_FULL


def exit_status(exc: BaseException) -> int:
    return BAD_INPUT if isinstance(exc, UserError) else FAILED


def one_line(text: object) -> str:
    """``text`` folded onto one line (a user's own exception message may span several)."""
    return " ".join(str(text).split())


def schedule_error(exc, size_key: str = "initial") -> RecipeError:
    """qhm's ScheduleError about one of its fields (``field``, ``value``, ``allowed``) as the recipe's one line,
    naming the recipe's key (schedule.<field>; ``size_key``: the batch kind's key for its first batch)."""
    key = {"batch.size": f"batch.{size_key}", "unit": "unit", "lr.unit": "unit"}.get(exc.field, exc.field)
    path = key if key == "epochs" else f"schedule.{key}"
    return RecipeError(f"{path}: {exc.value!r} is not valid; allowed: {exc.allowed}")


def one_of(path: str, value, allowed) -> None:
    """A recipe key's value must be one of ``allowed``: else the one line naming the key, the value, what is allowed."""
    if value not in allowed:
        raise RecipeError(f"{path}: {value!r} is not valid; allowed: {' | '.join(map(str, allowed))}")


def at_least(path: str, value, low) -> None:
    if value < low:
        raise RecipeError(f"{path}: {value!r} is not valid; allowed: >= {low}")


def at_most(path: str, value, high) -> None:
    if value > high:
        raise RecipeError(f"{path}: {value!r} is not valid; allowed: <= {high}")
