"""Atomic, verified checkpoints: one manager gathers every stateful part of a run.

Each part is registered once, with its scope:

* ``replicated``: the same on every rank (model and optimizer under DDP, train state, data order);
  rank 0 writes its ``state_dict()`` into ``state.pt``, every rank loads it;
* ``per_rank``: differs per rank (RNG, the epoch's running sums); each rank writes ``rank-RRRRR.pt``.
  Loading a checkpoint written by another number of ranks asks the part to ``reshard`` what was saved;
* ``files``: a part that writes its own files, collectively (DeepSpeed's engine): ``save_files(folder)``
  and ``load_files(folder)``.

Layout of ``<run>/checkpoints/``::

    step-000001234/            one checkpoint, named by its global optimizer step
        state.pt               replicated parts, by name
        rank-00000.pt ...      per-rank parts, by name, one file per rank
        deepspeed/...          a files part's own files
        manifest.json          version, world size, position, recipe, W&B id, parts, size + xxh3 of every file
    latest                     the name of the newest complete checkpoint, written last

A checkpoint is written into ``.tmp-step-...``, every file fsynced, the manifest last, then the folder
is renamed into place and ``latest`` replaced atomically: a kill at any moment leaves the previous
checkpoint intact. Loading checks the manifest's schema and every file's size and hash, and reads with
``torch.load(weights_only=True)``; a checkpoint that fails any check, or fails to load on any rank, is
reported in one line and the previous one is used. Checkpoint folders are created 0700 and files 0600.
Only checkpoints known to be valid (written by this process, resumed from, or older than that one with
a sound manifest) are counted for ``keep`` and pruned; nothing else in the folder is ever deleted, and
the newest valid checkpoint never is.
"""
from __future__ import annotations

import json
import mmap
import os
import re
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Literal, Optional, Protocol

import torch
import xxhash

from launcher import env
from launcher.errors import DiskFull, UserError, disk_full, one_line
from launcher.run.files import DIR_MODE, FILE_MODE, atomic_write, atomic_write_json, fsync_path, open_fd
from launcher.run.folder import RunFolder

VERSION = 2                   # 1: state.pt held engine/train/wandb_id/running_total (upgraded on load)
KNOWN_VERSIONS = (1, 2)
Scope = Literal["replicated", "per_rank", "files"]
STEP_DIR = re.compile(r"^step-(\d{9,})$")


def step_of(path: Path) -> int:
    """The global step a ``step-N`` checkpoint folder is named after."""
    return int(path.name[5:])


SAFE_NAME = re.compile(r"^[A-Za-z0-9._-]+(/[A-Za-z0-9._-]+)*$")


class Stateful(Protocol):
    def state_dict(self) -> dict: ...
    def load_state_dict(self, state: dict) -> None: ...


class PerRankStateful(Stateful, Protocol):
    def reshard(self, saved: list[dict], rank: int, world: int, step: int) -> dict:
        """This rank's state, from the states the ``len(saved)`` ranks of the checkpoint wrote."""


class FileStateful(Protocol):
    def save_files(self, folder: Path) -> None: ...
    def check_files(self, folder: Path) -> None:
        """Read what load_files will read, without collectives: raise if any of it cannot be loaded."""
    def load_files(self, folder: Path) -> None: ...


class CorruptCheckpoint(Exception):
    pass


def step_name(step: int) -> str:
    return f"step-{step:09d}"


def rank_file(rank: int) -> str:
    """The name of rank ``rank``'s file of per-rank parts in a checkpoint folder."""
    return f"rank-{rank:05d}.pt"


def file_hash(path: Path) -> str:
    """xxh3-64 of a file through a memory map: the page cache is hashed in place, never copied."""
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size == 0:
            return xxhash.xxh3_64_hexdigest(b"")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            return xxhash.xxh3_64_hexdigest(mm)


def describe(path: Path) -> dict:
    return {"size": path.stat().st_size, "xxh3_64": file_hash(path)}


def write_file(path: Path, obj) -> dict:
    """torch.save (owner-only), fsync, then size and hash (read back through the page cache, in place)."""
    try:
        fd = open_fd(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
    except (OSError, RuntimeError) as exc:
        # torch.save's zip writer reports a short write as a RuntimeError ("unexpected pos"): a full disk
        # shows as too little room left for this file's tensors
        needed = tensor_bytes(obj)
        if not (disk_full(exc) or shutil.disk_usage(path.parent).free < needed):
            raise
        full = DiskFull(path, needed)           # the free space as it was
        path.unlink(missing_ok=True)            # the part written: room for what reports the failure
        raise full from exc
    return describe(path)


def tensor_bytes(obj) -> int:
    """The bytes of the tensors in ``obj`` (nested dicts, lists, tuples) this rank holds: what a checkpoint
    file holds, give or take its pickled structure."""
    if isinstance(obj, torch.Tensor):
        local = obj.to_local() if hasattr(obj, "to_local") else obj      # a DTensor: this rank's shard
        return local.numel() * local.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0


def verify_file(path: Path, expect: dict) -> None:
    """Raise CorruptCheckpoint unless the file exists with the manifest's size and hash."""
    if not path.is_file():
        raise CorruptCheckpoint(f"{path.name} is missing")
    size = path.stat().st_size
    if size != expect["size"]:
        raise CorruptCheckpoint(f"{path.name} has {size} bytes, expected {expect['size']}")
    if file_hash(path) != expect["xxh3_64"]:
        raise CorruptCheckpoint(f"{path.name} fails its checksum (xxh3_64)")


def read_file(path: Path):
    """Load a verified checkpoint file: weights_only (no code runs), memory-mapped (tensors are views of
    the page cache until load_state_dict copies them into place)."""
    return torch.load(path, weights_only=True, map_location="cpu", mmap=True)


def check_manifest(manifest) -> dict:
    """The manifest's schema; raise CorruptCheckpoint naming the first thing that is wrong."""
    def need(ok, what):
        if not ok:
            raise CorruptCheckpoint(f"manifest: {what}")
    need(isinstance(manifest, dict), "not a mapping")
    version = manifest.get("version")
    need(version in KNOWN_VERSIONS, f"version {version!r} (this launcher reads {', '.join(map(str, KNOWN_VERSIONS))})")
    need(isinstance(manifest.get("step"), int) and manifest["step"] >= 0, "step is not an integer >= 0")
    world = manifest.get("world_size")
    need(isinstance(world, int) and world >= 1, "world_size is not an integer >= 1")
    need(isinstance(manifest.get("position"), dict), "position is missing")
    need(isinstance(manifest.get("recipe"), dict), "recipe is missing")
    files = manifest.get("files")
    need(isinstance(files, dict) and files, "files is missing")
    for name, expect in files.items():
        need(isinstance(name, str) and SAFE_NAME.match(name) and ".." not in name.split("/"),
             f"file name {name!r} is not a plain relative path")
        need(isinstance(expect, dict) and isinstance(expect.get("size"), int)
             and isinstance(expect.get("xxh3_64"), str), f"files.{name} is not {{size, xxh3_64}}")
    need("state.pt" in files, "files has no state.pt")
    for r in range(world):
        need(rank_file(r) in files, f"files has no {rank_file(r)}")
    extra = [name for name in files if name.startswith("rank-") and name not in {rank_file(r) for r in range(world)}]
    need(not extra, f"files has {extra[0] if extra else ''} beyond world_size {world}")
    recipe = manifest["recipe"]
    for section in ("distributed", "schedule", "data", "tracking"):
        need(isinstance(recipe.get(section, {}), dict), f"recipe.{section} is not a mapping")
    return manifest


@dataclass
class Found:
    path: Path
    manifest: dict
    verified: set = field(default_factory=set)      # files whose hash was checked by the finder

    @property
    def step(self) -> int:
        return self.manifest["step"]


@dataclass
class _Part:
    name: str
    obj: object
    scope: Scope
    optional: bool = False


class CheckpointManager:
    """Saves and resumes the checkpoints of one run folder. Collective calls go through ``comm``
    (``barrier``, ``gather``, ``broadcast``, ``any``); the manager never calls torch.distributed itself.
    With ``comm=None`` it can only find checkpoints (the launcher's check before any worker starts)."""

    def __init__(self, folder: RunFolder, comm=None, keep: int = 3, log: Callable[[str], None] = print):
        self.folder, self.dir = folder, folder.checkpoints
        self.comm, self.keep, self.log = comm, keep, log
        self.rank = comm.rank if comm is not None else 0
        self.world = comm.world if comm is not None else 1
        self._parts: list[_Part] = []
        self._upgrades: dict[int, Callable[[dict, list], tuple[dict, list]]] = {}
        self._known: list[Path] = []               # valid checkpoints, oldest first: what pruning may touch
        self.last_step: Optional[int] = None       # the newest checkpoint written or resumed from
        self._pruner: Optional[threading.Thread] = None

    def register(self, name: str, part, scope: Scope, optional: bool = False) -> None:
        """``optional``: a replicated part added after checkpoints were written: one without it loads, the
        part left as built."""
        if any(p.name == name for p in self._parts):
            raise ValueError(f"checkpoint part {name!r} registered twice")
        needs = ("save_files", "check_files", "load_files") if scope == "files" else ("state_dict", "load_state_dict")
        if scope == "per_rank":
            needs += ("reshard",)
        missing = [m for m in needs if not callable(getattr(type(part), m, None))]
        if missing:
            raise TypeError(f"checkpoint part {name!r} ({type(part).__name__}) lacks {', '.join(missing)}")
        self._parts.append(_Part(name, part, scope, optional))

    def register_upgrade(self, version: int, upgrade: Callable[[dict, list], tuple[dict, list]]) -> None:
        """``upgrade(replicated, per_rank) -> (replicated, per_rank)`` turns the loaded files of a
        checkpoint of ``version`` into those of ``version + 1`` (per_rank: the rank files read here)."""
        self._upgrades[version] = upgrade

    def _of(self, scope: Scope) -> list[_Part]:
        return [p for p in self._parts if p.scope == scope]

    # -------------------------------------------------------------------------- writing
    def save(self, step: int, manifest: dict) -> Path:
        """Write checkpoint ``step`` of every registered part (collective); ``manifest`` adds fields
        (position, recipe, W&B id, tag...) to the manifest."""
        final, tmp = self.dir / step_name(step), self.dir / f".tmp-{step_name(step)}"
        if self.rank == 0:
            self.dir.mkdir(parents=True, exist_ok=True, mode=DIR_MODE)
            for stale in self.dir.glob(".tmp-*"):           # left by a killed write
                shutil.rmtree(stale, ignore_errors=True)
            tmp.mkdir(mode=DIR_MODE)
        self.comm.barrier()
        name = rank_file(self.rank)
        files = {name: write_file(tmp / name, {p.name: p.obj.state_dict() for p in self._of("per_rank")})}
        if self.rank == 0:
            files["state.pt"] = write_file(tmp / "state.pt", {p.name: p.obj.state_dict() for p in self._of("replicated")})
        if self._of("files"):
            for part in self._of("files"):
                part.obj.save_files(tmp)
            self.comm.barrier()
        gathered = self.comm.gather(files)
        if self.rank == 0:
            for part_files in gathered:
                files.update(part_files)
            for extra in sorted(p for p in tmp.rglob("*") if p.is_file()):   # a files part's own files
                rel = str(extra.relative_to(tmp))
                if rel not in files:
                    os.chmod(extra, FILE_MODE)
                    files[rel] = describe(extra)
            atomic_write_json(tmp / "manifest.json", {
                **manifest, "version": VERSION, "step": step, "world_size": self.world, "files": files,
                "parts": {p.name: p.scope for p in self._parts}, "written_at": time.time()})
            pause = env.pause_before_seal(step)
            if pause:
                print(f"[test] checkpoint {step_name(step)} written, pausing {pause}s before sealing", flush=True)
                time.sleep(pause)
            self._seal(tmp, final)
            self._prune(final)
        self.comm.barrier()
        self.last_step = step
        return final

    def _seal(self, tmp: Path, final: Path) -> None:
        if final.exists():
            aside = self.dir / f"replaced-{final.name}-{int(time.time())}"
            os.replace(final, aside)
            self.log(f"checkpoint {final.name} existed (from an interrupted run); moved aside to {aside.name}")
        fsync_path(tmp)
        os.replace(tmp, final)
        fsync_path(self.dir)
        atomic_write(self.dir / "latest", final.name + "\n")

    def _prune(self, newest: Path) -> None:
        """Remove the known-valid checkpoints beyond the ``keep`` newest, in a background thread:
        training need not wait for the file system. Anything not known to be valid is left alone."""
        self.wait()
        self._known = [p for p in self._known if p != newest] + [newest]
        old, self._known = self._known[:-self.keep], self._known[-self.keep:]
        if old:
            self._pruner = threading.Thread(target=lambda: [shutil.rmtree(p, ignore_errors=True) for p in old])
            self._pruner.start()

    def wait(self) -> None:
        """Let a background removal finish (before the next prune, and at the end of training)."""
        if self._pruner is not None:
            self._pruner.join()
            self._pruner = None

    # -------------------------------------------------------------------------- finding
    def candidates(self) -> list[Path]:
        """step-N folders, newest first (by step number, not by name)."""
        found = [p for p in self.dir.glob("step-*") if STEP_DIR.match(p.name) and p.is_dir()]
        return sorted(found, key=step_of, reverse=True)

    def find_latest_valid(self, skip: Optional[dict] = None) -> Optional[Found]:
        """The newest checkpoint whose manifest and files check out; None when there is none at all.
        ``skip``: {name: reason} of checkpoints already found not to load. Raises UserError when
        checkpoints exist but none is valid (nothing is deleted)."""
        skip = skip or {}
        candidates = self.candidates()
        problems = []
        for path in candidates:
            if path.name in skip:
                problems.append(f"{path.name}: {skip[path.name]}")
                continue
            try:
                return self.verified(path)
            except CorruptCheckpoint as exc:
                problems.append(f"{path.name}: {exc}")
                self.log(f"checkpoint {path.name} is not valid ({exc}); trying the previous one")
        if candidates:
            raise UserError(f"no valid checkpoint in {self.dir} ({'; '.join(problems)}); "
                            "nothing was deleted: move the folder aside to start afresh")
        return None

    def verified(self, path: Path) -> Found:
        """The checkpoint at ``path``, its manifest sound and every file's size and hash as it says; else
        CorruptCheckpoint saying why."""
        try:
            manifest = check_manifest(json.loads((path / "manifest.json").read_text()))
            if manifest["step"] != step_of(path):          # a folder renamed (or copied) under another step
                raise CorruptCheckpoint(f"manifest: step {manifest['step']} in folder {path.name}")
            for name, expect in manifest["files"].items():
                verify_file(path / name, expect)
        except (OSError, ValueError) as exc:
            if isinstance(exc, OSError) and exc.filename and Path(exc.filename).name != "manifest.json":
                raise CorruptCheckpoint(f"{Path(exc.filename).name} cannot be read "
                                        f"({exc.strerror or type(exc).__name__})") from None
            raise CorruptCheckpoint(f"unreadable manifest ({type(exc).__name__})") from None
        return Found(path, manifest, set(manifest["files"]))

    def _older_sound(self, found: Found) -> list[Path]:
        """Checkpoints older than ``found`` whose manifest is sound and file sizes match: ours, from
        earlier processes of this run (counted for ``keep``; their hashes are not re-read)."""
        out = []
        for path in self.candidates():
            if step_of(path) >= found.step:
                continue
            try:
                manifest = check_manifest(json.loads((path / "manifest.json").read_text()))
                if all((path / n).stat().st_size == e["size"] for n, e in manifest["files"].items()):
                    out.append(path)
            except (OSError, ValueError, CorruptCheckpoint):
                continue
        return sorted(out, key=step_of)

    # -------------------------------------------------------------------------- resuming
    def resume(self) -> Optional[dict]:
        """Load every registered part from the newest valid checkpoint (collective). Returns its
        manifest, or None when there is no checkpoint. A checkpoint that any rank fails to load is
        skipped in favour of the previous one; a UserError from a part (an incompatible resume) stops."""
        skip: dict[str, str] = {}
        while True:
            found, problem = None, None
            if self.rank == 0:
                try:
                    found = self.find_latest_valid(skip)
                except UserError as exc:
                    problem = str(exc)
            found, problem = self.comm.broadcast((found, problem))
            if problem:
                raise UserError(problem)
            if found is None:
                return None
            error, staged = None, None
            try:
                staged = self._read(found)     # every file this rank needs, read and checked: no collectives
            except UserError as exc:
                error = ("user", str(exc))
            except Exception as exc:  # noqa: BLE001 - any failure to load means "not valid"
                error = ("corrupt", f"{type(exc).__name__}: {one_line(exc)[:200]}")
            errors = self.comm.gather(error)
            errors = self.comm.broadcast([e for e in errors if e] if errors else [])
            users = [msg for kind, msg in errors if kind == "user"]
            if users:
                raise UserError(users[0])
            if errors:
                reason = f"fails to load ({errors[0][1]})"
                self.log(f"checkpoint {found.path.name} is not valid ({reason}); trying the previous one")
                skip[found.path.name] = reason
                continue
            self._apply(found, *staged)        # all ranks read it: now the parts take it (collectively)
            if self.rank == 0:
                self._known = self._older_sound(found) + [found.path]
            self.last_step = found.step
            return found.manifest

    def _read(self, found: Found) -> tuple[dict, list]:
        """(replicated states, per-rank states this rank needs), upgraded to the current layout; the
        files parts check what they will read. Raises on anything that does not load."""
        files, path = found.manifest["files"], found.path
        replicated = read_file(path / "state.pt")
        saved_world = found.manifest["world_size"]
        same_world = saved_world == self.world
        per_rank_names = [rank_file(self.rank)] if same_world else [rank_file(r) for r in range(saved_world)]
        per_rank = [read_file(path / n) for n in per_rank_names if n in files]
        for version in range(found.manifest["version"], VERSION):
            replicated, per_rank = self._upgrades[version](replicated, per_rank)
        for part in self._of("files"):
            part.obj.check_files(path)
        return replicated, per_rank

    def _apply(self, found: Found, replicated: dict, per_rank: list) -> None:
        path, same_world = found.path, found.manifest["world_size"] == self.world
        for part in self._of("replicated"):
            if part.optional and part.name not in replicated:
                continue
            part.obj.load_state_dict(replicated[part.name])
        for part in self._of("per_rank"):
            saved = [s[part.name] for s in per_rank]
            part.obj.load_state_dict(saved[0] if same_world else
                                     part.obj.reshard(saved, self.rank, self.world, found.step))
        for part in self._of("files"):
            part.obj.load_files(path)

