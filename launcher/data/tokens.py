"""Token data: flat files of token ids, as nanoGPT writes them (``train.bin``: uint16 ids back to back;
uint32 for a vocabulary past 65,536), or ``.npy`` arrays; ``meta.json`` beside them says the dtype and
the vocabulary.

Sample i of a file is the window of tokens [i T, i T + T + 1), T = ``data.seq_len``: its inputs are the
first T tokens and its targets the T that follow each. Windows do not overlap, so an epoch is one pass
over the file; their order is the launcher's keyed permutation like any dataset's, so (seed, epoch,
position) alone say which tokens a step trains on, on any world size. The file is opened with
``np.memmap`` in each process that reads it (never read whole, never copied per worker: a dataset
pickles as its path).

``qhm-launch tokenize`` (and a recipe's ``data.text``, where the files do not exist yet) writes them:
byte-level ids (vocabulary 256, nothing to download), or a byte-level BPE trained here with the
``tokenizers`` library (``--vocab N``), its ``tokenizer.json`` saved beside the files.
"""
from __future__ import annotations

import glob
import json
import os
import sys
import sysconfig
from pathlib import Path

import numpy as np
import torch

from launcher.errors import UserError, one_line

META = "meta.json"
STDLIB_BYTES = 4_000_000        # "stdlib": the first this many bytes of the standard library's sources


def dtype_of(path: Path, vocab: int | None = None) -> np.dtype:
    """The ids' dtype: a .npy file's own, else meta.json's (beside the file a link points to), else uint16
    (uint32 past 65,536 ids). Anything but an integer dtype, or a .npy that does not read, is one line."""
    path = Path(path)
    if path.suffix == ".npy":
        try:
            dtype = np.load(path, mmap_mode="r").dtype
        except (ValueError, OSError, EOFError) as exc:       # pickled objects, a truncated header
            raise UserError(f"data: {str(path)!r} is not a readable .npy array of token ids ({one_line(exc)}); allowed: "
                            "an integer .npy array, or a flat .bin of ids") from None
        where = "its array"
    else:
        meta = read_meta(path.resolve().parent)
        if "dtype" not in meta:
            return np.dtype(np.uint16 if (vocab or 0) <= 2 ** 16 else np.uint32)
        try:
            dtype = np.dtype(meta["dtype"])
        except (TypeError, ValueError):
            dtype = None
        where = "meta.json's dtype"
    if dtype is None or dtype.kind not in "ui":
        raise UserError(f"data: {str(path)!r}: {where} is {dtype.name if dtype is not None else repr(meta['dtype'])}; allowed: "
                        "integer token ids (uint16, uint32, int32, int64, ...)")
    return dtype


def read_meta(folder: Path) -> dict:
    """meta.json of a token folder ({} where there is none); one that is not an object is one line."""
    try:
        meta = json.loads((Path(folder) / META).read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(meta, dict):
        raise UserError(f"data: {str(Path(folder) / META)!r} holds a {type(meta).__name__}; allowed: an object "
                        "({\"vocab\": N, \"dtype\": \"uint16\"})")
    return meta


def id_range(path: Path, dtype: np.dtype, chunk: int = 1 << 24) -> tuple[int, int]:
    """(smallest, largest) id in a token file, read in chunks (a vectorised scan, never the whole file at
    once); (0, -1) for an empty one."""
    ids = open_ids(path, dtype)
    low, top = 0, -1
    for start in range(0, len(ids), chunk):
        part = ids[start:start + chunk]
        low, top = min(low, int(part.min())), max(top, int(part.max()))
    return low, top


def open_ids(path: Path, dtype: np.dtype) -> np.ndarray:
    """The file's ids, memory-mapped (read only)."""
    if Path(path).suffix == ".npy":
        return np.load(path, mmap_mode="r")
    return np.memmap(path, dtype=dtype, mode="r")


class TokenWindows(torch.utils.data.Dataset):
    """Windows of ``seq_len + 1`` tokens of a token file: ``[i]`` -> (inputs, targets), int64, shape (T,)."""

    def __init__(self, path, seq_len: int, dtype: np.dtype):
        self.path, self.seq_len, self.dtype = str(path), int(seq_len), np.dtype(dtype)
        self._ids = None
        self.tokens = len(self.ids)
        self.n = max(0, (self.tokens - 1) // self.seq_len)

    @property
    def ids(self) -> np.ndarray:
        if self._ids is None:                 # opened in the process that reads (a worker, a rank)
            self._ids = open_ids(Path(self.path), self.dtype)
        return self._ids

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_ids": None}

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        start = int(i) * self.seq_len
        window = torch.from_numpy(np.asarray(self.ids[start:start + self.seq_len + 1], dtype=np.int64))
        return window[:-1], window[1:]


def files(cfg) -> tuple[Path, Path]:
    return Path(cfg.train).expanduser(), Path(cfg.validation).expanduser()


def vocabulary(cfg, say=None) -> int:
    """The vocabulary: data.vocab, else the files' meta.json, else the largest id in either file + 1 (said
    in one line to ``say``), never what the dtype could hold (65,536 for uint16 bytes: a 275x embedding)."""
    if cfg.vocab:
        return int(cfg.vocab)
    train, val = files(cfg)
    meta = read_meta(train.resolve().parent)
    if "vocab" in meta:
        vocab = meta["vocab"]
        if isinstance(vocab, bool) or not isinstance(vocab, int) or vocab < 1:
            raise UserError(f"data: {str(train.resolve().parent / META)!r}: vocab {vocab!r} is not valid; allowed: an "
                            "integer >= 1")
        return vocab
    vocab = max(id_range(p, dtype_of(p))[1] for p in (train, val)) + 1
    if say:
        say(f"qhm-launch: data: no data.vocab and no vocab in meta.json: the vocabulary is {vocab:,}, the files' "
            "largest id + 1")
    return vocab


def check_available(cfg) -> None:
    """The files are there (made from data.text first where they are not), each with at least one window."""
    prepare(cfg)
    vocab = None
    for key, path in zip(("train", "validation"), files(cfg)):
        if not path.is_file():
            raise UserError(f"data.{key}: {str(path)!r} is not a file; allowed: a token file (qhm-launch tokenize "
                            "TEXT... --out DIR writes train.bin and val.bin), or data.text to make it from")
        dtype = dtype_of(path, cfg.vocab)
        size = path.stat().st_size
        if path.suffix != ".npy" and (size == 0 or size % dtype.itemsize):
            raise UserError(f"data.{key}: {str(path)!r} holds {size:,} bytes, not a whole number of {dtype.name} ids "
                            f"(of {dtype.itemsize} bytes) and at least one; allowed: a token file of {dtype.name} ids "
                            "(meta.json's dtype says which)")
        windows = TokenWindows(path, cfg.seq_len, dtype)
        if len(windows) < 1:
            raise UserError(f"data.{key}: {str(path)!r} holds {windows.tokens} tokens, fewer than one window of "
                            f"data.seq_len + 1 = {cfg.seq_len + 1}; allowed: more text, or a shorter seq_len")
        vocab = vocab or vocabulary(cfg, say=lambda line: print(line, file=sys.stderr, flush=True))
        low, top = id_range(path, dtype)
        if top >= vocab or low < 0:
            raise UserError(f"data.{key}: {str(path)!r} holds the id {top:,} (or a negative one), outside the "
                            f"vocabulary of {vocab:,}; allowed: ids in [0, {vocab:,}) (data.vocab, or meta.json's vocab)")


FINGERPRINT_CHUNK = 1 << 20     # bytes hashed at each of a token file's start, middle and end


def fingerprint(cfg) -> dict:
    """Each token file's size and a hash of its first, middle and last MiB (xxh3: a few milliseconds for
    any size): what a resume checks, so a file replaced under a run (tokenize --out onto it) is found."""
    import xxhash
    out = {}
    for key, path in zip(("train", "validation"), files(cfg)):
        size = path.stat().st_size
        digest = xxhash.xxh3_64()
        with open(path, "rb") as f:
            for start in sorted({0, max(0, size // 2 - FINGERPRINT_CHUNK // 2), max(0, size - FINGERPRINT_CHUNK)}):
                f.seek(start)
                digest.update(f.read(FINGERPRINT_CHUNK))
        out[key] = {"bytes": size, "xxh3": digest.hexdigest()}
    return out


def sizes(cfg) -> tuple[int, int]:
    """(training windows, validation windows)."""
    prepare(cfg)
    train, val = files(cfg)
    return tuple(TokenWindows(p, cfg.seq_len, dtype_of(p, cfg.vocab)).n for p in (train, val))


def load(cfg) -> tuple[TokenWindows, TokenWindows, int]:
    """(training windows, validation windows, vocabulary)."""
    prepare(cfg)
    train, val = files(cfg)
    return (TokenWindows(train, cfg.seq_len, dtype_of(train, cfg.vocab)),
            TokenWindows(val, cfg.seq_len, dtype_of(val, cfg.vocab)), vocabulary(cfg))


def prepare(cfg) -> None:
    """data.text: write the two files from it when either is missing (byte level, or BPE of data.vocab)."""
    train, val = files(cfg)
    if cfg.text is None or (train.is_file() and val.is_file()):
        return
    if train.parent != val.parent:
        raise UserError(f"data.text: the files it makes share one folder; data.train {str(train)!r} and "
                        f"data.validation {str(val)!r} are in two; allowed: both in one folder")
    sources = text_files(cfg.text, "data.text")
    tokenize(sources, train.parent, vocab=cfg.vocab if cfg.vocab and cfg.vocab > 256 else None,
             names=(train.name, val.name), log=lambda line: print(line, file=sys.stderr, flush=True))


def text_files(spec, key: str) -> list[Path]:
    """The text files ``spec`` names: "stdlib" (the Python standard library's own sources: every machine
    has them, in an order drawn with a fixed seed, so a prefix of them, and the share held out for
    validation, are samples of the whole library rather than its first and last folders), or paths and
    globs, in sorted order."""
    specs = [spec] if isinstance(spec, str) else list(spec)
    found: list[Path] = []
    for item in specs:
        if item == "stdlib":
            root = Path(sysconfig.get_paths()["stdlib"])
            library = sorted(p for p in root.rglob("*.py") if "site-packages" not in p.parts)
            found += [library[i] for i in np.random.default_rng(0).permutation(len(library))]
            continue
        matched = sorted(Path(p) for p in glob.glob(os.path.expanduser(item), recursive=True) if Path(p).is_file())
        if not matched:
            raise UserError(f"{key}: {item!r} matches no file; allowed: text files or globs, or 'stdlib'")
        found += matched
    return found


def read_text(paths: list[Path], limit: int | None) -> list[bytes]:
    """The files' bytes, each ending in a newline, up to ``limit`` bytes in all (None: every byte)."""
    out, total = [], 0
    for path in paths:
        data = path.read_bytes()
        if limit is not None and total + len(data) >= limit:
            out.append(data[:limit - total])
            break
        out.append(data if data.endswith(b"\n") else data + b"\n")
        total += len(out[-1])
        if limit is not None and total >= limit:
            break
    return out


def tokenize(paths: list[Path], out: Path, vocab: int | None = None, validation: float = 0.1,
             names: tuple[str, str] = ("train.bin", "val.bin"), limit: int | None = None, log=None) -> dict:
    """Write the ids of ``paths``' text into ``out``: the last ``validation`` share of the tokens (at least
    one window's worth is the caller's to check) as the validation file, the rest as training. Byte
    level unless ``vocab`` (a BPE of that many ids, trained here on the same text). Returns meta.json's
    contents."""
    if not 0.0 < validation < 1.0:
        raise UserError(f"--validation: {validation!r} is not valid; allowed: a fraction in (0, 1)")
    stdlib = any(Path(sysconfig.get_paths()["stdlib"]) in p.parents for p in paths)
    texts = read_text(paths, limit if limit is not None else (STDLIB_BYTES if stdlib else None))
    if vocab is None:
        ids = np.frombuffer(b"".join(texts), dtype=np.uint8).astype(np.uint16)
        meta = {"tokenizer": "bytes", "vocab": 256}
    else:
        ids, meta = _bpe(texts, vocab, out)
    dtype = np.uint16 if meta["vocab"] <= 2 ** 16 else np.uint32
    ids = ids.astype(dtype)
    cut = len(ids) - max(1, int(len(ids) * validation))
    out.mkdir(parents=True, exist_ok=True)
    for name, part in ((names[0], ids[:cut]), (names[1], ids[cut:])):
        _write(out / name, part.tobytes())
    meta.update(dtype=np.dtype(dtype).name, files=len(texts), bytes=sum(map(len, texts)),
                tokens={names[0]: int(cut), names[1]: int(len(ids) - cut)})
    _write(out / META, (json.dumps(meta, indent=1) + "\n").encode())
    if log:
        log(f"qhm-launch: tokenized {meta['files']} file(s), {meta['bytes']:,} bytes -> {len(ids):,} tokens "
            f"({meta['tokenizer']}, vocabulary {meta['vocab']:,}): {out / names[0]} ({cut:,}), "
            f"{out / names[1]} ({len(ids) - cut:,})")
    return meta


def _bpe(texts: list[bytes], vocab: int, out: Path) -> tuple[np.ndarray, dict]:
    """A byte-level BPE of ``vocab`` ids trained on ``texts`` with the tokenizers library (no download),
    saved as tokenizer.json; the texts' ids."""
    try:
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    except ImportError:
        raise UserError("--vocab: a BPE needs the tokenizers package (pip install tokenizers); allowed: no --vocab "
                        "(byte-level ids)") from None
    if not 257 <= vocab <= 2 ** 32:
        raise UserError(f"--vocab: {vocab!r} is not valid; allowed: an integer in [257, 2^32] (byte level: no --vocab)")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    strings = [t.decode("utf-8", errors="replace") for t in texts]
    tokenizer.train_from_iterator(strings, trainer=trainer)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(out / "tokenizer.json"))
    ids = np.concatenate([np.asarray(e.ids, dtype=np.int64) for e in tokenizer.encode_batch(strings)])
    return ids, {"tokenizer": "bpe (tokenizers, byte level)", "vocab": tokenizer.get_vocab_size()}


def _write(path: Path, data: bytes) -> None:
    """Atomically: two runs preparing the same files never leave a half-written one."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


WRITES = ("train.bin", "val.bin", META, "tokenizer.json")     # what tokenize --out writes


def check_out(out: Path) -> None:
    """``tokenize --out``: a new or empty folder, or one without token files: never onto or through an
    existing file (a run may be training on it: a resume would go on over other text), a link or a device."""
    if out.is_symlink():
        raise UserError(f"--out: {str(out)!r} is a symbolic link; allowed: a folder (the files are written into it, "
                        "never through a link)")
    if out.exists() and not out.is_dir():
        raise UserError(f"--out: {str(out)!r} is not a folder; allowed: a new or existing folder")
    there = [name for name in WRITES if (out / name).exists() or (out / name).is_symlink()]
    if there:
        raise UserError(f"--out: {str(out)!r} already holds {', '.join(there)} (token files a run may be training on); "
                        "allowed: a new folder, or move them aside to write new ones")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test.{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise UserError(f"--out: {str(out)!r} cannot be written ({exc.strerror or type(exc).__name__}); allowed: a "
                        "folder this user can write") from None


def cmd_tokenize(args) -> int:
    """``qhm-launch tokenize TEXT... --out DIR [--vocab N] [--validation F]``."""
    paths = text_files(args.text, "TEXT")
    out = Path(args.out).expanduser()
    check_out(out)
    if sum(p.stat().st_size for p in paths) == 0:
        raise UserError(f"TEXT: {', '.join(map(str, args.text))} hold no text (0 bytes); allowed: files with text")
    tokenize(paths, out, vocab=args.vocab, validation=args.validation, limit=args.max_bytes,
             log=lambda line: print(line, file=sys.stdout))
    return 0
