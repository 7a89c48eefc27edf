"""Small file-system helpers that make writes durable and never clobber what a user already has."""
from __future__ import annotations

import json
import os
from pathlib import Path

from launcher.errors import DiskFull, disk_full


# Everything a run writes is its owner's alone (checkpoints hold the model; a shared output folder is
# common on clusters), and no file is opened through a symbolic link: a link planted in a run folder
# would otherwise make the run truncate or append to whatever it points at.
DIR_MODE, FILE_MODE = 0o700, 0o600
NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)


def open_fd(path: Path, flags: int) -> int:
    """os.open for writing, owner-only, never through a symbolic link (ELOOP if ``path`` is one)."""
    return os.open(path, flags | NOFOLLOW, FILE_MODE)


def fsync_path(path: Path) -> None:
    """fsync a file or a folder by path (a folder's fsync makes a rename inside it durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: str | bytes, durable: bool = True) -> None:
    """Write ``data`` to ``path`` through a temporary file and a rename: readers see the old content
    or the new one, never a part. ``durable`` fsyncs the file before and the folder after the rename."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        fd = open_fd(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        with os.fdopen(fd, "wb" if isinstance(data, bytes) else "w") as f:
            f.write(data)
            if durable:
                f.flush()
                os.fsync(f.fileno())
    except OSError as exc:
        full = DiskFull(path, len(data.encode() if isinstance(data, str) else data)) if disk_full(exc) else None
        tmp.unlink(missing_ok=True)            # the part written: room for what reports the failure
        if full:
            raise full from exc
        raise
    os.replace(tmp, path)
    if durable:
        fsync_path(path.parent)


def atomic_write_json(path: Path, obj, durable: bool = True) -> None:
    atomic_write(path, json.dumps(obj, indent=1, sort_keys=True) + "\n", durable)


def open_append(path: Path) -> int:
    """An append-only descriptor of ``path`` (created if missing)."""
    try:
        return open_fd(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    except OSError as exc:
        if disk_full(exc):
            raise DiskFull(path, 0) from exc
        raise


def write_line(fd: int, path: Path, line: str, durable: bool = True) -> None:
    """Append one line to ``fd`` (open on ``path``, for messages), fsynced when ``durable``. Raw writes,
    no text-file object: this runs at every log point of a training loop."""
    data = (line + "\n").encode()
    try:
        rest = memoryview(data)
        while rest:                         # a short write is followed by one that says why
            rest = rest[os.write(fd, rest):]
        if durable:
            os.fsync(fd)
    except OSError as exc:
        if disk_full(exc):
            raise DiskFull(path, len(data)) from exc
        raise


def append_line(path: Path, line: str, durable: bool = True) -> None:
    """Append one line to ``path`` (and fsync it when ``durable``)."""
    fd = open_append(path)
    try:
        write_line(fd, path, line, durable)
    finally:
        os.close(fd)


def read_jsonl(path: Path) -> list[dict]:
    """The JSON objects of a JSON-lines file ([] when it does not exist). A torn last line (a kill
    in the middle of an append) is skipped; every complete row is kept."""
    path = Path(path)
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows


INTEGER_FIELDS = {"epoch": 0, "step": 0, "samples": 0, "tokens": 0, "batch": 1, "micro_batch": 1, "accum": 1,
                  "world_size": 1}      # integer fields of a row, and their least value
TEXT_FIELDS = ("noise_scale_reason",)   # fields a row holds as text (why a number is null)


def row_problem(row, required: tuple = ()) -> str | None:
    """Why ``row`` is not a row the readers can use (None: it is): a JSON object with the ``required``
    keys, integer counts (epoch, step, samples, batch, ...) and numbers (or null) wherever the launcher
    writes numbers."""
    if not isinstance(row, dict):
        return f"{type(row).__name__}, not an object"
    for key in required:
        if key not in row:
            return f"no {key!r}"
    for key, value in row.items():
        if key in INTEGER_FIELDS:
            if isinstance(value, bool) or not isinstance(value, int) or value < INTEGER_FIELDS[key]:
                return f"{key}={value!r}, not an integer >= {INTEGER_FIELDS[key]}"
        elif key in TEXT_FIELDS:
            if value is not None and not isinstance(value, str):
                return f"{key}={value!r}, not text"
        elif key != "mid_epoch" and value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            return f"{key}={value!r}, not a number"
    return None


def read_rows(path: Path, warn=None, required: str = "epoch") -> list[dict]:
    """A run's rows (metrics.jsonl, steps.jsonl) for the readers (report, plot, status, scaling, bounds):
    every row that :func:`row_problem` accepts; each other line (not JSON, not UTF-8, a row of the wrong
    shape) skipped with one line to ``warn`` naming the file and line (a torn last line, from a kill in
    the middle of an append, and ``#`` comments silently). ``required``: the key every row has (epoch rows:
    "epoch"; evaluation rows inside epochs and step rows: "step"). A file that cannot be read is one
    UserError."""
    from launcher.errors import UserError
    path = Path(path)
    if not path.exists():
        return []
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise UserError(f"runs: {str(path)!r} cannot be read ({exc.strerror or type(exc).__name__}); allowed: a run "
                        "folder's files, readable") from None
    lines = data.split(b"\n")
    rows = []
    for number, raw in enumerate(lines, 1):
        if not raw.strip() or raw.lstrip().startswith(b"#"):
            continue
        try:
            row = json.loads(raw.decode("utf-8"))
            need = ("step",) if isinstance(row, dict) and row.get("mid_epoch") else (required,)
            problem = row_problem(row, need)
        except UnicodeDecodeError:
            problem = "not UTF-8"
        except json.JSONDecodeError:
            problem = None if number == len(lines) else "not JSON"       # the last, torn: a kill mid-append
            if problem is None:
                continue
        if problem is None:
            rows.append(row)
        elif warn is not None:
            warn(f"qhm-launch: warning: {path} line {number}: skipped ({problem})")
    return rows


def next_free(folder: Path, stem: str, suffix: str) -> Path:
    """``folder/stem-K.suffix`` for the smallest K >= 1 not taken, nor any ``stem-K-...`` or ``stem-K_...``
    (the scripts that come with it): never overwrite an earlier one."""
    k = 1
    while (Path(folder) / f"{stem}-{k}{suffix}").exists() or any(Path(folder).glob(f"{stem}-{k}[_-]*")):
        k += 1
    return Path(folder) / f"{stem}-{k}{suffix}"
