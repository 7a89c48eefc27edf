"""Token data: flat files of token ids, as nanoGPT writes them (``train.bin``: uint16 ids back to back;
uint32 for a vocabulary past 65,536), or ``.npy`` arrays; ``meta.json`` beside them says the dtype and
the vocabulary.

Sample i of a file is the window of tokens [i T, i T + T + 1), T = ``data.seq_len``: its inputs are the
first T tokens and its targets the T that follow each. Windows do not overlap, so an epoch is one pass
over the file; their order is the launcher's keyed permutation like any dataset's, so (seed, epoch,
position) alone say which tokens a step trains on, on any world size. The file is opened with
``np.memmap`` in each process that reads it (never read whole, never copied per worker: a dataset
pickles as its path).

``data.train`` and ``data.validation`` are each a file, a glob (shards: ``web/part-*.npy``), a list of them,
or a mapping of them to mixture weights (``{web/*.npy: 0.75, code/*.npy: 0.25}``). Windows never cross a
file's end; the files' windows are numbered one after another in sorted order. With weights, an epoch keeps
its size (every file's windows) and gives source s round(w_s N) of them: a fixed subset of its windows where
that is fewer than it has, all of them repeated (and a fixed subset for the rest) where it is more, drawn
with a seed of its own, the same at every epoch and on every world size; the keyed permutation then orders
them as any dataset's.

A ``.npy`` file without numpy's header (OLMo writes its token arrays as raw memory maps) and a ``.bin`` are
raw ids of ``data.dtype`` (else meta.json's dtype, else uint16, or uint32 past 65,536 ids). The vocabulary is
``data.vocab``, else meta.json's ``vocab``, else nanoGPT's ``meta.pkl``'s ``vocab_size`` (read only if it
holds plain values), else the files' largest id + 1, said in one line.

``qhm-launch tokenize`` (and a recipe's ``data.text``, where the files do not exist yet) writes them:
byte-level ids (the 256 bytes and an end-of-document id 256: vocabulary 257, nothing to download), or a
byte-level BPE trained here with the ``tokenizers`` library (``--vocab N``, <|endoftext|> among its ids), its
``tokenizer.json`` saved beside the files. The validation share is drawn as chunks spread over the whole text.
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


NPY_MAGIC = b"\x93NUMPY"


def has_header(path: Path) -> bool:
    """Whether a .npy file starts with numpy's header (OLMo's token files are raw ids named .npy)."""
    with open(path, "rb") as f:
        return f.read(len(NPY_MAGIC)) == NPY_MAGIC


def dtype_of(path: Path, vocab: int | None = None, declared: str | None = None) -> np.dtype:
    """The ids' dtype: a .npy file's own header's, else ``declared`` (data.dtype), else meta.json's (beside
    the file a link points to), else uint16 (uint32 past 65,536 ids). Anything but an integer dtype, or a
    .npy header that does not read, is one line."""
    path = Path(path)
    meta: dict = {}
    if path.suffix == ".npy" and path.is_file() and has_header(path):
        try:
            dtype = np.load(path, mmap_mode="r").dtype
        except (ValueError, OSError, EOFError) as exc:       # pickled objects, a truncated header
            raise UserError(f"data: {str(path)!r} is not a readable .npy array of token ids ({one_line(exc)}); allowed: "
                            "an integer .npy array, or a flat .bin of ids") from None
        where = "its array"
    elif declared is not None:
        dtype, where = np.dtype(declared), "data.dtype"
    else:
        meta = read_meta(path.resolve().parent)
        if "dtype" not in meta and path.suffix == ".npy":
            raise UserError(f"data: {str(path)!r} is a .npy without numpy's header (raw ids, as OLMo writes them), and "
                            "nothing says their dtype; allowed: data.dtype (e.g. uint32), or a meta.json with dtype "
                            "beside it")
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
    if Path(path).suffix == ".npy" and has_header(Path(path)):
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


KEYS = ("train", "validation")


def sources(cfg, key: str) -> list[tuple[list[Path], float | None]]:
    """data.train or data.validation as (files, mixture weight) per source: a file or glob (its files in sorted
    order), a list of them, or a mapping of them to weights. A glob that matches nothing is one line."""
    spec = getattr(cfg, key)
    items = list(spec.items()) if isinstance(spec, dict) else [(spec, None)] if isinstance(spec, str) else \
        [(item, None) for item in spec]
    out = []
    for pattern, weight in items:
        text = os.path.expanduser(str(pattern))
        if glob.has_magic(text):
            matched = sorted(Path(p) for p in glob.glob(text, recursive=True) if Path(p).is_file())
            if not matched:
                raise UserError(f"data.{key}: {pattern!r} matches no file; allowed: token files or globs that match "
                                "some (qhm-launch tokenize TEXT... --out DIR writes train.bin and val.bin)")
        else:
            matched = [Path(text)]
        out.append((matched, None if weight is None else float(weight)))
    return out


def paths(cfg, key: str) -> list[Path]:
    """Every file of data.train or data.validation, in the order their windows are numbered."""
    return [path for files, _ in sources(cfg, key) for path in files]


def metadata_folder(cfg) -> Path:
    """Where meta.json (meta.pkl, tokenizer.json) is looked for: beside the first training file's target."""
    return paths(cfg, "train")[0].resolve().parent


def read_pickled_meta(folder: Path) -> dict:
    """nanoGPT's meta.pkl ({} where there is none), unpickled only if it holds plain values (dicts, lists,
    strings, numbers): a pickle naming any class or function is refused in one line, never run."""
    import pickle
    path = Path(folder) / "meta.pkl"
    if not path.is_file():
        return {}

    class PlainValues(pickle.Unpickler):
        def find_class(self, module, name):
            raise pickle.UnpicklingError(f"it names {module}.{name}")
    try:
        with open(path, "rb") as f:
            meta = PlainValues(f).load()
    except Exception as exc:  # noqa: BLE001 - whatever a hostile or broken pickle raises: one line
        raise UserError(f"data: {str(path)!r} is not a pickle of plain values ({one_line(exc)}); allowed: nanoGPT's "
                        "meta.pkl (a dict with vocab_size), or a meta.json ({\"vocab\": N}) beside the files") from None
    return meta if isinstance(meta, dict) else {}


def vocabulary(cfg, say=None) -> int:
    """The vocabulary: data.vocab, else meta.json's vocab, else meta.pkl's vocab_size (nanoGPT's), else the
    largest id in the files + 1 (said in one line to ``say``), never what the dtype could hold (65,536 for
    uint16 bytes: a 275x embedding)."""
    if cfg.vocab:
        return int(cfg.vocab)
    folder = metadata_folder(cfg)
    for meta, key, where in ((read_meta(folder), "vocab", META), (read_pickled_meta(folder), "vocab_size", "meta.pkl")):
        if key in meta:
            vocab = meta[key]
            if isinstance(vocab, bool) or not isinstance(vocab, int) or vocab < 1:
                raise UserError(f"data: {str(folder / where)!r}: {key} {vocab!r} is not valid; allowed: an integer >= 1")
            return vocab
    vocab = max(id_range(p, dtype_of(p, declared=cfg.dtype))[1] for key in KEYS for p in paths(cfg, key)) + 1
    if say:
        say(f"qhm-launch: data: no data.vocab and no vocab in meta.json or meta.pkl: the vocabulary is {vocab:,}, the "
            "files' largest id + 1")
    return vocab


def check_available(cfg) -> None:
    """Every file is there (made from data.text first where they are not), holds whole ids of its dtype and
    at least one window, and no id outside the vocabulary."""
    prepare(cfg)
    vocab = None
    for key in KEYS:
        for path in paths(cfg, key):
            if not path.is_file():
                raise UserError(f"data.{key}: {str(path)!r} is not a file; allowed: a token file (qhm-launch tokenize "
                                "TEXT... --out DIR writes train.bin and val.bin), or data.text to make it from")
            dtype = dtype_of(path, cfg.vocab, cfg.dtype)
            size = path.stat().st_size
            if (path.suffix != ".npy" or not has_header(path)) and (size == 0 or size % dtype.itemsize):
                raise UserError(f"data.{key}: {str(path)!r} holds {size:,} bytes, not a whole number of {dtype.name} ids "
                                f"(of {dtype.itemsize} bytes) and at least one; allowed: a token file of {dtype.name} "
                                "ids (data.dtype or meta.json's dtype says which)")
            windows = TokenWindows(path, cfg.seq_len, dtype)
            if len(windows) < 1:
                raise UserError(f"data.{key}: {str(path)!r} holds {windows.tokens} tokens, fewer than one window of "
                                f"data.seq_len + 1 = {cfg.seq_len + 1}; allowed: more text, or a shorter seq_len")
            vocab = vocab or vocabulary(cfg, say=lambda line: print(line, file=sys.stderr, flush=True))
            low, top = id_range(path, dtype)
            if top >= vocab or low < 0:
                raise UserError(f"data.{key}: {str(path)!r} holds the id {top:,} (or a negative one), outside the "
                                f"vocabulary of {vocab:,}; allowed: ids in [0, {vocab:,}) (data.vocab, or meta.json's "
                                "vocab)")


TOKENIZER_FILES = ("tokenizer.json", META, "meta.pkl")    # what says what the ids mean


def keep_tokenizer(cfg, into: Path) -> list[str]:
    """Copy the files that say what the ids mean (tokenizer.json, meta.json, nanoGPT's meta.pkl) from beside
    the training files into ``into`` (a run folder's tokenizer/), so the model leaves the run with them
    whatever later happens to the data folder; the names copied."""
    folder, copied = metadata_folder(cfg), []
    for name in TOKENIZER_FILES:
        if (folder / name).is_file():
            into.mkdir(parents=True, exist_ok=True)
            _write(into / name, (folder / name).read_bytes())
            copied.append(name)
    return copied


FINGERPRINT_CHUNK = 1 << 20     # bytes hashed at each of a token file's start, middle and end


def fingerprint(cfg) -> dict:
    """Each token file's size and a hash of its first, middle and last MiB (xxh3: a few milliseconds for
    any size): what a resume checks, so a file replaced under a run (tokenize --out onto it) is found. One
    file per key is keyed by the key alone (as checkpoints of one file always were), shards by key[i]."""
    import xxhash
    out = {}
    for key in KEYS:
        files = paths(cfg, key)
        for i, path in enumerate(files):
            size = path.stat().st_size
            digest = xxhash.xxh3_64()
            with open(path, "rb") as f:
                for start in sorted({0, max(0, size // 2 - FINGERPRINT_CHUNK // 2), max(0, size - FINGERPRINT_CHUNK)}):
                    f.seek(start)
                    digest.update(f.read(FINGERPRINT_CHUNK))
            out[key if len(files) == 1 else f"{key}[{i}]"] = {"bytes": size, "xxh3": digest.hexdigest()}
    return out


class ShardedWindows(torch.utils.data.Dataset):
    """The windows of several files numbered one after another (``[i]`` -> the file holding window i), or
    ``picks``: the numbers of the windows this dataset is (a mixture), in that order."""

    def __init__(self, shards: list[TokenWindows], picks: np.ndarray | None = None):
        self.shards, self.picks = shards, picks
        self.starts = np.cumsum([0] + [len(w) for w in shards])

    def __len__(self) -> int:
        return int(self.starts[-1]) if self.picks is None else len(self.picks)

    def __getitem__(self, i: int):
        g = int(i) if self.picks is None else int(self.picks[i])
        k = int(np.searchsorted(self.starts, g, side="right")) - 1
        return self.shards[k][g - int(self.starts[k])]


def mixture(counts: list[int], weights: list[float]) -> np.ndarray:
    """The window numbers of an epoch of sum(counts) windows that gives source s round(w_s N) of them (the
    last source takes the rounding's rest): a fixed subset where that is fewer than it has, all of them
    repeated and a fixed subset for the rest where it is more; each source drawn with a seed of its own."""
    total, share = sum(counts), np.asarray(weights, dtype=np.float64) / sum(weights)
    wanted = [int(round(w * total)) for w in share[:-1]]
    wanted.append(total - sum(wanted))
    picks, start = [], 0
    for s, (have, want) in enumerate(zip(counts, wanted)):
        rng = np.random.default_rng([0, s])
        whole, rest = divmod(want, have)
        chosen = np.concatenate([np.tile(np.arange(have), whole), np.sort(rng.permutation(have)[:rest])])
        picks.append(start + chosen.astype(np.int64))
        start += have
    return np.concatenate(picks)


def windows(cfg, key: str) -> torch.utils.data.Dataset:
    """data.train or data.validation as windows: one file's :class:`TokenWindows` itself (as it always was),
    else a :class:`ShardedWindows` over every file, mixed by the sources' weights where they have them."""
    found = sources(cfg, key)
    grouped = [[TokenWindows(p, cfg.seq_len, dtype_of(p, cfg.vocab, cfg.dtype)) for p in files] for files, _ in found]
    shards = [w for group in grouped for w in group]
    weights = [w for _, w in found]
    if len(shards) == 1 and weights[0] is None:
        return shards[0]
    if all(w is None for w in weights):
        return ShardedWindows(shards)
    return ShardedWindows(shards, mixture([sum(map(len, group)) for group in grouped], [float(w) for w in weights]))


def sizes(cfg) -> tuple[int, int]:
    """(training windows, validation windows)."""
    prepare(cfg)
    return len(windows(cfg, "train")), len(windows(cfg, "validation"))


def load(cfg) -> tuple[torch.utils.data.Dataset, torch.utils.data.Dataset, int]:
    """(training windows, validation windows, vocabulary)."""
    prepare(cfg)
    return windows(cfg, "train"), windows(cfg, "validation"), vocabulary(cfg)


def prepare(cfg) -> None:
    """data.text: write the two files from it when either is missing (byte level, or BPE of data.vocab)."""
    if cfg.text is None:
        return
    train, val = (Path(os.path.expanduser(getattr(cfg, key))) for key in KEYS)   # one file each (validated)
    if train.is_file() and val.is_file():
        return
    if train.parent != val.parent:
        raise UserError(f"data.text: the files it makes share one folder; data.train {str(train)!r} and "
                        f"data.validation {str(val)!r} are in two; allowed: both in one folder")
    tokenize(text_files(cfg.text, "data.text"), train.parent, vocab=cfg.vocab if cfg.vocab and cfg.vocab > BYTE_EOD + 1 else None,
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


BYTE_EOD = 256                  # byte level: the end-of-document id, past the 256 bytes (vocabulary 257)
BPE_EOD = "<|endoftext|>"      # BPE: the end-of-document special token (GPT-2's name for it)
CHUNKS = 200                   # the validation share is drawn as whole chunks of about len / CHUNKS tokens


def validation_chunks(total: int, share: float) -> tuple[np.ndarray, np.ndarray]:
    """(training, validation) token positions of a stream of ``total``: cut into chunks of about total /
    CHUNKS tokens (64 to 4,096), chunk i held out where floor((i + 1) share) > floor(i share), so round(share
    n) chunks spread evenly over the stream (over every document, not the tail of the last one)."""
    chunk = int(min(4096, max(64, total // CHUNKS)))
    chunks = -(-total // chunk)
    held = np.floor(np.arange(1, chunks + 1) * share) > np.floor(np.arange(chunks) * share)
    if not held.any():
        held[chunks // 2] = True
    if held.all():
        held[0] = False
    positions = np.arange(total)
    in_validation = held[positions // chunk]
    return positions[~in_validation], positions[in_validation]


def tokenize(paths: list[Path], out: Path, vocab: int | None = None, validation: float = 0.1,
             names: tuple[str, str] = ("train.bin", "val.bin"), limit: int | None = None, log=None) -> dict:
    """Write the ids of ``paths``' text into ``out``, each document (file) followed by the end-of-document id
    (byte level: 256, so the vocabulary is 257; BPE: its <|endoftext|> token): a ``validation`` share of the
    tokens, drawn as chunks spread evenly over the whole stream (:func:`validation_chunks`), as the validation
    file, the rest as training. Byte level unless ``vocab`` (a BPE of that many ids, trained here on the same
    text). Returns meta.json's contents."""
    if not 0.0 < validation < 1.0:
        raise UserError(f"--validation: {validation!r} is not valid; allowed: a fraction in (0, 1)")
    stdlib = any(Path(sysconfig.get_paths()["stdlib"]) in p.parents for p in paths)
    texts = read_text(paths, limit if limit is not None else (STDLIB_BYTES if stdlib else None))
    if vocab is None:
        docs = [np.frombuffer(t, dtype=np.uint8).astype(np.int64) for t in texts]
        eod, meta = BYTE_EOD, {"tokenizer": "bytes", "vocab": BYTE_EOD + 1}
    else:
        docs, eod, meta = _bpe(texts, vocab, out)
    ids = np.concatenate([part for doc in docs for part in (doc, np.array([eod], dtype=np.int64))])
    dtype = np.uint16 if meta["vocab"] <= 2 ** 16 else np.uint32
    ids = ids.astype(dtype)
    kept, held = validation_chunks(len(ids), validation)
    out.mkdir(parents=True, exist_ok=True)
    for name, part in ((names[0], ids[kept]), (names[1], ids[held])):
        _write(out / name, part.tobytes())
    meta.update(dtype=np.dtype(dtype).name, eod=int(eod), files=len(texts), bytes=sum(map(len, texts)),
                tokens={names[0]: int(len(kept)), names[1]: int(len(held))})
    _write(out / META, (json.dumps(meta, indent=1) + "\n").encode())
    if log:
        log(f"qhm-launch: tokenized {meta['files']} file(s), {meta['bytes']:,} bytes -> {len(ids):,} tokens "
            f"({meta['tokenizer']}, vocabulary {meta['vocab']:,}, end of document {eod}): {out / names[0]} "
            f"({len(kept):,}), {out / names[1]} ({len(held):,}, chunks spread over the text)")
    return meta


def _bpe(texts: list[bytes], vocab: int, out: Path) -> tuple[list[np.ndarray], int, dict]:
    """A byte-level BPE of ``vocab`` ids (<|endoftext|> among them) trained on ``texts`` with the tokenizers
    library (no download), saved as tokenizer.json; each text's ids, and the end-of-document id."""
    try:
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    except ImportError:
        raise UserError("--vocab: a BPE needs the tokenizers package (pip install tokenizers); allowed: no --vocab "
                        "(byte-level ids)") from None
    if not 258 <= vocab <= 2 ** 32:
        raise UserError(f"--vocab: {vocab!r} is not valid; allowed: an integer in [258, 2^32] (byte level: no --vocab)")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=[BPE_EOD], show_progress=False)
    strings = [t.decode("utf-8", errors="replace") for t in texts]
    tokenizer.train_from_iterator(strings, trainer=trainer)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(out / "tokenizer.json"))
    docs = [np.asarray(e.ids, dtype=np.int64) for e in tokenizer.encode_batch(strings)]
    return docs, tokenizer.token_to_id(BPE_EOD), {"tokenizer": "bpe (tokenizers, byte level)",
                                                  "vocab": tokenizer.get_vocab_size()}


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
