"""Atomic, verified checkpoints: one manager gathers every stateful piece of a run.

Layout of ``<run>/checkpoints/``::

    step-000001234/            one checkpoint, named by its global optimizer step
        state.pt               written by rank 0: everything replicated (model, optimizer, position...)
        rank-00000.pt ...      one per rank: what differs per rank (RNG, running metric sums)
        manifest.json          version, world size, position, recipe, W&B id, and size + xxh3 hash per file
    latest                     the name of the newest complete checkpoint, written last

A checkpoint is written into ``.tmp-step-...``, every file fsynced, the manifest last, then the folder is
renamed into place and ``latest`` replaced atomically: a kill at any moment leaves the previous
checkpoint intact. Loading checks every file's size and hash; a corrupt or truncated checkpoint is
reported in one line and the previous one is used. Files are read with ``weights_only=True``.
Nothing the user has is deleted except checkpoints older than the ``keep`` newest valid ones; a corrupt
one that would be overwritten is moved aside instead.
"""
from __future__ import annotations

import json
import mmap
import os
import shutil
import time
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch
import xxhash

VERSION = 1


def file_hash(path: Path) -> str:
    """xxh3-64 of a file through a memory map: the page cache is hashed in place, never copied
    (xxh3 runs at memory speed, about 5x faster than zlib's CRC32 here)."""
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size == 0:
            return xxhash.xxh3_64_hexdigest(b"")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            return xxhash.xxh3_64_hexdigest(mm)


def write_file(path: Path, obj) -> dict:
    """torch.save, fsync, then size and hash (read back through the page cache, in place)."""
    torch.save(obj, path)
    _fsync(path)
    return {"size": path.stat().st_size, "xxh3_64": file_hash(path)}


def write_json(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _fsync(path: Path) -> None:
    """fsync a file or a folder by path."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_file(path: Path, expect: dict, verified: bool = False):
    """Load a checkpoint file after checking its size and hash (skipped when already ``verified``).

    Loaded with mmap: tensors are views of the page cache until the caller copies them into place
    (load_state_dict), so verifying costs one pass over memory and loading almost nothing."""
    if not verified:
        verify_file(path, expect)
    return torch.load(path, weights_only=True, map_location="cpu", mmap=True)


def verify_file(path: Path, expect: dict) -> None:
    """Raise CorruptCheckpoint unless the file exists with the manifest's size and hash."""
    if not path.is_file():
        raise CorruptCheckpoint(f"{path.name} is missing")
    size = path.stat().st_size
    if size != expect["size"]:
        raise CorruptCheckpoint(f"{path.name} has {size} bytes, expected {expect['size']}")
    if file_hash(path) != expect["xxh3_64"]:
        raise CorruptCheckpoint(f"{path.name} fails its checksum (xxh3_64)")


class CorruptCheckpoint(Exception):
    pass


class NoValidCheckpoint(Exception):
    pass


def step_name(step: int) -> str:
    return f"step-{step:09d}"


@dataclass
class Found:
    path: Path
    manifest: dict
    verified: set = field(default_factory=set)      # files whose hash was checked by the finder


class CheckpointManager:
    """Saves and finds checkpoints of one run folder. Collective calls go through ``comm``.

    ``comm`` offers ``barrier()`` and ``gather(obj) -> list | None`` (the list on rank 0); a single
    process passes a trivial one. The manager never calls torch.distributed itself.
    """

    def __init__(self, run_dir: Path, rank: int, world: int, keep: int, comm, log: Callable[[str], None] = print):
        self.dir = Path(run_dir) / "checkpoints"
        self.rank, self.world, self.keep, self.comm, self.log = rank, world, keep, comm, log
        self._pruner: Optional[threading.Thread] = None

    # -------------------------------------------------------------------------- writing
    def save(self, step: int, state: dict, rank_state: dict, manifest: dict,
             write_extra: Optional[Callable[[Path], None]] = None) -> Path:
        """Write checkpoint ``step`` (collective). ``write_extra(folder)`` lets an engine that saves its
        own files (DeepSpeed) write them into the temporary folder before it is sealed."""
        final = self.dir / step_name(step)
        tmp = self.dir / f".tmp-{step_name(step)}"
        if self.rank == 0:
            self.dir.mkdir(parents=True, exist_ok=True)
            for stale in self.dir.glob(".tmp-*"):           # left by a killed write
                shutil.rmtree(stale, ignore_errors=True)
            tmp.mkdir()
        self.comm.barrier()
        files = {f"rank-{self.rank:05d}.pt": write_file(tmp / f"rank-{self.rank:05d}.pt", rank_state)}
        if self.rank == 0:
            files["state.pt"] = write_file(tmp / "state.pt", state)
        if write_extra is not None:
            write_extra(tmp)
            self.comm.barrier()
        gathered = self.comm.gather(files)
        if self.rank == 0:
            for part in gathered:
                files.update(part)
            for extra in sorted(p for p in tmp.rglob("*") if p.is_file()):   # e.g. DeepSpeed's own files
                name = str(extra.relative_to(tmp))
                if name not in files:
                    files[name] = {"size": extra.stat().st_size, "xxh3_64": file_hash(extra)}
            write_json(tmp / "manifest.json", {**manifest, "version": VERSION, "step": step,
                                               "world_size": self.world, "files": files,
                                               "written_at": time.time()})
            pause = float(os.environ.get("QHM_TEST_PAUSE_BEFORE_SEAL", "0") or 0)
            if pause and step >= int(os.environ.get("QHM_TEST_PAUSE_FROM_STEP", "0")):                                          # test hook: a kill lands mid-write
                print(f"[test] checkpoint {step_name(step)} written, pausing {pause}s before sealing", flush=True)
                time.sleep(pause)
            if final.exists():
                aside = self.dir / f"replaced-{step_name(step)}-{int(time.time())}"
                os.replace(final, aside)
                self.log(f"checkpoint {final.name} existed (from an interrupted run); moved aside to {aside.name}")
            _fsync(tmp)
            os.replace(tmp, final)
            _fsync(self.dir)
            pointer = self.dir / "latest.tmp"
            pointer.write_text(final.name + "\n")
            with open(pointer) as f:
                os.fsync(f.fileno())
            os.replace(pointer, self.dir / "latest")
            _fsync(self.dir)
            self._prune()
        self.comm.barrier()
        return final

    def _prune(self) -> None:
        """Remove checkpoints beyond the ``keep`` newest, in the background: training need not wait for
        the file system. A removal cut short by a kill leaves an incomplete old folder, which loading
        skips (it is never the newest) and the next prune removes."""
        self.wait()
        old = sorted(p for p in self.dir.glob("step-*") if p.is_dir())[:-self.keep]
        if old:
            self._pruner = threading.Thread(target=lambda: [shutil.rmtree(p, ignore_errors=True) for p in old])
            self._pruner.start()

    def wait(self) -> None:
        """Let a background removal finish (called before the next prune and at the end of training)."""
        if self._pruner is not None:
            self._pruner.join()
            self._pruner = None

    # -------------------------------------------------------------------------- reading
    def candidates(self) -> list[Path]:
        return sorted((p for p in self.dir.glob("step-*") if p.is_dir()), reverse=True)

    def find_latest_valid(self) -> Optional[Found]:
        """The newest checkpoint whose manifest and files check out; None when there is none at all.

        Raises NoValidCheckpoint when checkpoints exist but none is valid (nothing is deleted)."""
        candidates = self.candidates()
        problems = []
        for path in candidates:
            try:
                manifest = json.loads((path / "manifest.json").read_text())
                if manifest.get("version") != VERSION:
                    raise CorruptCheckpoint(f"version {manifest.get('version')} (this launcher reads {VERSION})")
                for name, expect in manifest["files"].items():
                    verify_file(path / name, expect)
            except (OSError, ValueError, KeyError, CorruptCheckpoint) as exc:
                reason = exc if isinstance(exc, CorruptCheckpoint) else f"unreadable manifest ({exc})"
                problems.append(f"{path.name}: {reason}")
                self.log(f"checkpoint {path.name} is not valid ({reason}); trying the previous one")
                continue
            return Found(path, manifest, set(manifest["files"]))
        if candidates:
            raise NoValidCheckpoint(f"no valid checkpoint in {self.dir} ({'; '.join(problems)}); "
                                    "nothing was deleted: move the folder aside to start afresh")
        return None

    def load(self, found: Found) -> tuple[dict, Optional[dict]]:
        """(replicated state, this rank's state or None when the saved world had no such rank)."""
        files = found.manifest["files"]
        state = read_file(found.path / "state.pt", files["state.pt"], "state.pt" in found.verified)
        name = f"rank-{self.rank:05d}.pt"
        rank_state = read_file(found.path / name, files[name], name in found.verified) if name in files else None
        return state, rank_state
