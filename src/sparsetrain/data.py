"""Corpus discovery, tokenization cache and batch sampling.

The default corpus is the running interpreter's own standard library
(``Lib/**/*.py``, ~31 MB, no ``site-packages``): text every machine with Python
has, so training needs no download. ``--data`` takes a text file, a folder of
text files, or a pre-tokenized ``.bin`` of uint16/uint32 tokens.

Text corpora are split train/val by file, with a hash of each file's relative
path deciding (so adding a file never moves another one across the split). A
BPE tokenizer is trained on the train files (or a given ``tokenizer.json`` is
used, as a run continuing another run's weights must), and both splits are
tokenized once and cached under ``cache_dir/corpus-<hash>/``; the hash covers
every file's name and bytes, the vocabulary size, the split and a given
tokenizer, so the cache is rebuilt whenever the corpus changes.

Batches are a pure function of ``(seed, step, micro, rank)``: resuming at step
``s`` needs no loader state, and every DDP rank reads its own contiguous shard
of the train tokens.
"""

from __future__ import annotations

import fnmatch
import contextlib
import hashlib
import json
import math
import os
import re
import shutil
import sysconfig
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .checkpoint import fsync_dir, fsync_file, warn
from .errors import ConfigError, DataError
from .tokenizer import BPETokenizer

CACHE_FORMAT = 3  # 2: a document spelling <|endoftext|> is encoded as text, not as the separator;
#                  3: too few files for a split by file cuts each file, not their concatenation
SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__"}


def default_cache_dir() -> Path:
    """``$SPARSETRAIN_CACHE``, else ``~/.cache/sparsetrain``: the one place that variable is read."""
    return Path(os.environ.get("SPARSETRAIN_CACHE") or Path.home() / ".cache" / "sparsetrain")


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def discover_text_files(path: str | Path | None, include: str = "", exclude: str = "",
                        max_bytes: int = 0) -> tuple[Path, list[Path]]:
    """Return ``(root, files)``. ``None`` means the stdlib ``*.py`` sources.

    For a folder, every regular file below it that is not hidden and holds no
    NUL byte in its first 8 KiB (a binary file) counts as text; a single file
    given by name must be text. ``include``, ``exclude`` and ``max_bytes`` narrow
    a folder (or the stdlib) down, see :func:`select_files`.
    """
    if path is None:
        root = stdlib_root()
        files = [p for p in root.rglob("*.py") if not (SKIP_DIRS & set(p.relative_to(root).parts)) and p.is_file()]
        return root, select_files(root, sorted(files), include, exclude, max_bytes)
    p = Path(path)
    if not p.exists():
        raise DataError(f"data path does not exist: {path}")
    if p.is_file():
        if is_binary(p):
            raise DataError(f"data file {path} is not text (a NUL byte in its first 8 KiB); --data takes a text file, "
                            "a folder of text files, or a .bin of tokens")
        return p.parent, [p]
    files = []
    for f in sorted(p.rglob("*")):
        rel = f.relative_to(p).parts
        if not f.is_file() or any(part.startswith(".") for part in rel) or SKIP_DIRS & set(rel):
            continue
        files.append(f)
    files = [f for f in select_files(p, files, include, exclude) if not is_binary(f)]
    return p, select_files(p, files, max_bytes=max_bytes)


def _globs(patterns: str) -> list[str]:
    return [g.strip() for g in patterns.split(",") if g.strip()]


def select_files(root: Path, files: list[Path], include: str = "", exclude: str = "", max_bytes: int = 0) -> list[Path]:
    """The files (in their given order) whose path relative to ``root`` matches one of
    the comma-separated ``include`` globs (all, if empty) and none of ``exclude``
    (``fnmatch`` patterns, case-sensitive; ``*`` also crosses ``/``, so ``*.py``
    matches at any depth). With ``max_bytes``, files are taken in the order of a
    hash of their relative path (a fixed, directory-mixing order that does not
    depend on the other files) while their total size stays within ``max_bytes``;
    a file that would overflow it is skipped and smaller later ones still fit."""
    rel = {f: f.relative_to(root).as_posix() for f in files}
    inc, exc = _globs(include), _globs(exclude)
    kept = [f for f in files if (not inc or any(fnmatch.fnmatchcase(rel[f], g) for g in inc))
            and not any(fnmatch.fnmatchcase(rel[f], g) for g in exc)]
    if max_bytes:
        chosen, total = set(), 0
        # salted: unsalted, this order would be is_val_file's hash, and a cap would take the
        # held-out files first (the lowest hashes) and leave almost nothing to train on
        for f in sorted(kept, key=lambda f: hashlib.sha1(b"select:" + rel[f].encode()).digest()):
            size = f.stat().st_size
            if total + size <= max_bytes:
                chosen.add(f)
                total += size
        kept = [f for f in kept if f in chosen]
    if files and not kept:
        raise DataError(f"no file under {root} is left by data_include={include!r}, data_exclude={exclude!r}, "
                        f"data_max_bytes={max_bytes}")
    return kept


def is_binary(path: Path) -> bool:
    """A NUL byte in the first 8 KiB: not a text file (text never holds one)."""
    with open(path, "rb") as fh:
        return b"\0" in fh.read(8192)


def is_val_file(relpath: str, val_fraction: float) -> bool:
    """Deterministic split: a file is held out when the hash of its path falls
    below ``val_fraction``. Independent of file order and of other files."""
    h = int.from_bytes(hashlib.sha1(relpath.encode()).digest()[:8], "big")
    return h / 2**64 < val_fraction


def split_documents(docs: dict[str, str], val_fraction: float) -> tuple[list[str], list[str]]:
    """Split ``{relpath: text}`` into (train texts, val texts), sorted by path.

    With too few files for the hash split to put at least one on each side
    (a single text file, say), every file is cut instead: the last ``val_fraction``
    of its characters go to val, the rest to train. Each file is cut on its own, so
    adding a file moves no other file's cut.
    """
    names = sorted(docs)
    train = [docs[n] for n in names if not is_val_file(n, val_fraction)]
    val = [docs[n] for n in names if is_val_file(n, val_fraction)]
    if train and val:
        return train, val
    cuts = [(docs[n], int(len(docs[n]) * (1 - val_fraction))) for n in names]
    return [t[:c] for t, c in cuts if c > 0], [t[c:] for t, c in cuts if c < len(t)]


def require_text(docs: dict[str, str], source: str) -> None:
    """Refuse a corpus whose files hold nothing but whitespace (``docs`` as
    :func:`read_documents` returns it; ``source`` names the corpus)."""
    if not docs:
        raise DataError(f"no text found in {source}: the corpus is empty")


def split_text_corpus(docs: dict[str, str], val_fraction: float, source: str) -> tuple[list[str], list[str]]:
    """:func:`split_documents`, refusing a corpus with nothing to train on or nothing
    held out: no file holds more than whitespace, or the split leaves a side empty
    (a token cache never gets an empty token file). ``source`` names the corpus."""
    require_text(docs, source)
    train_docs, val_docs = split_documents(docs, val_fraction)
    if not train_docs or not val_docs:
        chars = sum(len(t) for t in docs.values())
        raise DataError(f"{source} is too small to split: {chars:,} characters in {len(docs)} file(s) leave the "
                        f"{'train' if not train_docs else 'val'} split empty at val_fraction {val_fraction}")
    return train_docs, val_docs


def train_document_names(names: Iterable[str], val_fraction: float) -> list[str]:
    """The relative paths of the train documents, in the order :func:`split_documents`
    gives their texts (sorted); empty where it cuts every file instead
    (too few files for a split by file), so that no train document is one file."""
    ordered = sorted(names)
    train = [n for n in ordered if not is_val_file(n, val_fraction)]
    return train if train and len(train) < len(ordered) else []


def read_documents(root: Path, files: list[Path]) -> dict[str, str]:
    """``{path relative to root: text}`` of the files holding more than whitespace,
    decoded as UTF-8 (invalid bytes become U+FFFD)."""
    docs = {}
    for f in files:
        text = f.read_bytes().decode("utf-8", errors="replace")
        if text.strip():
            docs[str(f.relative_to(root))] = text
    return docs


def join_documents(ids: list[list[int]], eot_id: int, dtype: np.dtype | type) -> np.ndarray:
    """One token stream: every document preceded by end-of-text, as a separator."""
    flat = np.empty(sum(len(x) + 1 for x in ids), dtype=dtype)
    pos = 0
    for seq in ids:
        flat[pos] = eot_id
        flat[pos + 1 : pos + 1 + len(seq)] = seq
        pos += len(seq) + 1
    return flat


@dataclass
class TokenizedCorpus:
    """Train and val token arrays (memory-mapped) and, for text corpora, the tokenizer."""

    train: np.ndarray
    val: np.ndarray
    vocab_size: int
    tokenizer: BPETokenizer | None
    tokenizer_path: Path | None
    description: str
    train_file: tuple[str, str, int] = ("", "", 0)  # (path, dtype, first token) of `train`, for loader workers
    train_text_files: tuple[str, ...] = ()  # raw train-split files, for tokenizing on the fly (text corpora)
    # text corpora split by file: the folder, and the train documents' paths relative to it in the order
    # train.bin holds them (each preceded by one end-of-text token); empty for a .bin or files cut in two
    text_root: str = ""
    train_doc_names: tuple[str, ...] = ()


DATA_RECORD_NAME = "data.json"  # a run's record of the tokens it trained on (:func:`data_record`)


def data_record(train: np.ndarray, val: np.ndarray) -> dict[str, int | str]:
    """What identifies the tokens a run trains and is evaluated on: both splits' token
    counts and the SHA-256 of the held-out tokens (:func:`held_out_record`). The train
    side is counted, not hashed: a pass over a corpus of any size at every start would
    cost more than a changed count is worth missing."""
    return {"n_train_tokens": int(train.size), **held_out_record(val)}


def held_out_record(val: np.ndarray) -> dict[str, int | str]:
    """The held-out part of :func:`data_record`: the count and the SHA-256 of the tokens
    (as uint32, so the token dtype does not matter)."""
    digest = hashlib.sha256()
    chunk = 1 << 24
    for start in range(0, val.size, chunk):
        digest.update(np.ascontiguousarray(val[start:start + chunk], dtype=np.uint32).tobytes())
    return {"n_val_tokens": int(val.size), "val_sha256": digest.hexdigest()}


def read_data_record(run: Path) -> dict:
    """A run's ``data.json`` (empty for a run from before it was written, or one unreadable)."""
    try:
        record = json.loads((run / DATA_RECORD_NAME).read_text())
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def data_record_changes(old: dict, new: dict) -> list[str]:
    """How the data ``new`` describes differs from ``old`` (:func:`data_record`, or the
    held-out part alone, :func:`held_out_record`, which compares that part only), as
    short phrases; empty when they match."""
    out = []
    for key, split in (("n_train_tokens", "train"), ("n_val_tokens", "val")):
        if key in new and old.get(key) != new[key]:
            was = f"{old[key]:,}" if isinstance(old.get(key), int) else "?"
            out.append(f"{split} tokens {was} -> {new[key]:,}")
    if old.get("val_sha256") != new["val_sha256"] and old.get("n_val_tokens") == new["n_val_tokens"]:
        out.append("val tokens changed (same count)")
    return out


MANIFEST_NAME = ".corpus_manifest.json"  # a corpus folder's record (``corpus build``, ``corpus filter``)


def check_filtered_split(root: str | Path, val_fraction: float) -> None:
    """Refuse to load a filtered copy (``corpus filter``) at a larger ``val_fraction``
    than it was filtered at: the files held out only at the larger one were train
    files to the filter, which may have left some out, so the held-out set would
    not be the source's. A smaller one is safe (its held-out files are among the
    filter's, all kept). The same for a built corpus (``corpus build``) and the
    fraction it was built at: its duplicates and noise copy that fraction's train
    files, which a larger one would partly hold out."""
    path = Path(root) / MANIFEST_NAME
    if not path.is_file():
        return
    try:
        manifest = json.loads(path.read_text())
        filtered = manifest.get("filtered") or {}
    except (OSError, ValueError, AttributeError):
        return  # not a manifest of ours; nothing to check
    at = filtered.get("val_fraction")
    if at is not None and val_fraction > at:
        raise DataError(f"{root} was filtered at val_fraction {at}: training it at val_fraction {val_fraction} would "
                        f"hold out files the filter may have left out; use val_fraction <= {at}, or filter the "
                        f"source again with --val-fraction {val_fraction}")
    built = manifest.get("val_fraction") if "source" in manifest else None  # corpus build's own record
    if isinstance(built, (int, float)) and val_fraction > built:
        raise DataError(f"{root} was built at val_fraction {built}: its duplicates and noise were made from the "
                        f"files train at that fraction, so at val_fraction {val_fraction} some held-out files would "
                        f"have copies in train; use val_fraction <= {built}, or build it again with "
                        f"--val-fraction {val_fraction}")


def load_corpus(
    data: str = "",
    vocab_size: int = 8192,
    val_fraction: float = 0.02,
    cache_dir: str | Path = "",
    token_dtype: str = "uint16",
    tokenizer: str = "",
    verbose: bool = True,
    include: str = "",
    exclude: str = "",
    max_bytes: int = 0,
) -> TokenizedCorpus:
    """Load (building and caching if needed) the corpus a run trains on. ``include``,
    ``exclude`` and ``max_bytes`` select a folder's files (:func:`select_files`); the
    cache key covers the selected files' names and contents, so each selection has
    its own cache. ``tokenizer`` names the ``tokenizer.json`` of a ``.bin`` file's
    tokens, or for text the one to tokenize it with instead of training a BPE on it."""
    if data and data.endswith(".bin"):
        return _load_bin(data, vocab_size, val_fraction, token_dtype, tokenizer)
    root, files = discover_text_files(data or None, include, exclude, max_bytes)
    if root.is_dir():
        check_filtered_split(root, val_fraction)
    docs = read_documents(root, files)
    source = data or f"Python {'.'.join(map(str, __import__('sys').version_info[:2]))} standard library at {root}"
    if include or exclude or max_bytes:
        chosen = [f"include {include}"] * bool(include) + [f"exclude {exclude}"] * bool(exclude)
        source += f" ({', '.join(chosen + [f'at most {max_bytes:,} bytes'] * bool(max_bytes))})"
    require_text(docs, data or str(root))
    given = _read_tokenizer(tokenizer, vocab_size) if tokenizer else None
    if given is not None:
        source += f", tokenized with {tokenizer}"
    key = _corpus_key(docs, vocab_size, val_fraction, given)
    folder = Path(cache_dir or default_cache_dir()) / f"corpus-{key[:16]}"
    problem = _cache_problem(folder) if folder.exists() else None
    if problem is not None:  # a cache cut short (a crash before its files reached the disk)
        warn(f"token cache {folder} is damaged ({problem}); building it again")
        _move_aside(folder)
    if not folder.exists():
        if verbose:
            what = "token cache" if given is not None else "tokenizer and token cache"
            print(f"building {what} for {source} ({len(docs)} files) in {folder} ...", flush=True)
        _build_cache(folder, docs, vocab_size, val_fraction, source, given)
    meta = json.loads((folder / "meta.json").read_text())
    dtype = np.dtype(meta["dtype"])
    tok = BPETokenizer.load(folder / "tokenizer.json")
    return TokenizedCorpus(
        train=np.memmap(folder / "train.bin", dtype=dtype, mode="r"),
        val=np.memmap(folder / "val.bin", dtype=dtype, mode="r"),
        vocab_size=vocab_size,
        tokenizer=tok,
        tokenizer_path=folder / "tokenizer.json",
        description=f"{source}: {meta['n_train_tokens']:,} train / {meta['n_val_tokens']:,} val tokens",
        train_file=(str(folder / "train.bin"), dtype.name, 0),
        # none where the split cut the files (their held-out tails would be read whole)
        train_text_files=tuple(str(root / n) for n in train_document_names(docs, val_fraction)),
        text_root=str(root),
        train_doc_names=tuple(train_document_names(docs, val_fraction)),
    )


def _read_tokenizer(path: str, vocab_size: int) -> bytes:
    """The bytes of a given ``tokenizer.json`` for a text corpus, checked to load and to fit ``vocab_size``."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"tokenizer file does not exist: {path}")
    tok = BPETokenizer.load(p)
    if tok.vocab_size > vocab_size:
        raise DataError(f"tokenizer {path} has {tok.vocab_size} tokens, more than model.vocab_size {vocab_size}")
    return p.read_bytes()


def _corpus_key(docs: dict[str, str], vocab_size: int, val_fraction: float, tokenizer: bytes | None = None) -> str:
    h = hashlib.sha256(f"format={CACHE_FORMAT};vocab={vocab_size};val={val_fraction!r}".encode())
    if tokenizer is not None:  # a given tokenizer makes other tokens; a trained one is a function of the rest
        h.update(b"tokenizer\0" + hashlib.sha256(tokenizer).digest())
    for name in sorted(docs):
        h.update(name.encode() + b"\0")
        h.update(hashlib.sha256(docs[name].encode()).digest())
    return h.hexdigest()


def _cache_problem(folder: Path) -> str | None:
    """Why the token cache in ``folder`` cannot be used, or None: its record
    (``meta.json``), tokenizer and token files must all be there, each token file
    as long as the record says."""
    try:
        meta = json.loads((folder / "meta.json").read_text())
        itemsize = np.dtype(meta["dtype"]).itemsize
        counts = {split: int(meta[f"n_{split}_tokens"]) for split in ("train", "val")}
    except (OSError, ValueError, KeyError, TypeError):
        return "no readable meta.json"
    if not (folder / "tokenizer.json").is_file():
        return "no tokenizer.json"
    for split, n in counts.items():
        path = folder / f"{split}.bin"
        size = path.stat().st_size if path.is_file() else None
        if size != n * itemsize:
            return f"{split}.bin holds {'no file' if size is None else f'{size:,} bytes'}, its record {n * itemsize:,}"
        if n == 0:  # an empty split, as builds before the check in _build_cache could leave
            return f"{split}.bin holds no tokens"
    return None


def _move_aside(folder: Path) -> None:
    """Take a damaged cache folder out of the way (another process may have done it first)."""
    aside = folder.with_name(f"{folder.name}.damaged-{os.getpid()}")
    try:
        os.replace(folder, aside)
    except FileNotFoundError:
        return
    shutil.rmtree(aside, ignore_errors=True)


def _build_cache(folder: Path, docs: dict[str, str], vocab_size: int, val_fraction: float, source: str,
                 tokenizer: bytes | None = None) -> None:
    """Tokenize ``docs`` into ``folder``: with a BPE trained on the train split, or with
    ``tokenizer`` (a ``tokenizer.json``'s bytes, kept as they are: a run's copy of it
    then compares equal to the file it came from)."""
    train_docs, val_docs = split_text_corpus(docs, val_fraction, source)  # before anything is written
    dtype = np.uint16 if vocab_size <= 2**16 else np.uint32
    folder.parent.mkdir(parents=True, exist_ok=True)
    # Build next to the final folder and rename: a crash or a concurrent build
    # never leaves a half-written cache that looks complete.
    tmp = Path(tempfile.mkdtemp(prefix=folder.name + ".tmp-", dir=folder.parent))
    try:
        if tokenizer is None:
            tok = BPETokenizer.train(train_docs, vocab_size)
            tok.save(tmp / "tokenizer.json")
        else:
            (tmp / "tokenizer.json").write_bytes(tokenizer)
            tok = BPETokenizer.load(tmp / "tokenizer.json")
        counts = {}
        for split, texts in (("train", train_docs), ("val", val_docs)):
            flat = join_documents(tok.encode_batch(texts), tok.eot_id, dtype)
            flat.tofile(tmp / f"{split}.bin")
            counts[split] = int(flat.size)
        meta = {
            "format": CACHE_FORMAT,
            "source": source,
            "vocab_size": vocab_size,
            "tokenizer_vocab_size": tok.vocab_size,
            "tokenizer": "given" if tokenizer is not None else "trained",
            "val_fraction": val_fraction,
            "dtype": np.dtype(dtype).name,
            "n_train_docs": len(train_docs),
            "n_val_docs": len(val_docs),
            "n_train_tokens": counts["train"],
            "n_val_tokens": counts["val"],
        }
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
        # on the disk before the rename: a crash then leaves no folder, or a whole one
        for name in ("tokenizer.json", "train.bin", "val.bin", "meta.json"):
            fsync_file(tmp / name)
        fsync_dir(tmp)
        try:
            os.replace(tmp, folder)
        except OSError:  # another process finished first; theirs is identical
            if _cache_problem(folder) is not None:
                raise
        fsync_dir(folder.parent)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def read_bin_tokens(path: str, token_dtype: str, vocab_size: int,
                    tokenizer: str | Path | BPETokenizer | None = None) -> tuple[np.ndarray, BPETokenizer | None]:
    """The tokens of a ``.bin`` file (memory-mapped) and its tokenizer (``tokenizer``:
    a ``tokenizer.json``, loaded once the file is found, or a loaded one), checked: a
    whole number of ``token_dtype`` items, not empty, not uint32 tokens read as uint16
    (:func:`_uint32_read_as_uint16`), every id inside ``vocab_size`` and the
    tokenizer's vocabulary."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"data path does not exist: {path}")
    dtype = np.dtype(token_dtype)
    if p.stat().st_size == 0:  # np.memmap cannot map an empty file
        raise DataError(f"no tokens in {path}: the corpus is empty")
    if p.stat().st_size % dtype.itemsize:
        raise DataError(f"{path} has {p.stat().st_size} bytes, not a whole number of {token_dtype} tokens")
    tokens = np.memmap(p, dtype=dtype, mode="r")
    if tokens.size == 0:
        raise DataError(f"no tokens in {path}: the corpus is empty")
    if dtype == np.uint16 and _uint32_read_as_uint16(tokens, vocab_size):
        high = "0" if vocab_size <= 2**16 else f"at most {(vocab_size - 1) >> 16}"
        raise DataError(f"{path} looks like uint32 tokens read as uint16 (every second uint16 is {high}, as the high "
                        f"halves of little-endian uint32 ids are); pass --token-dtype uint32 "
                        f"(data.token_dtype = \"uint32\")")
    top = max(int(tokens[i : i + 2**24].max()) for i in range(0, tokens.size, 2**24))
    if top >= vocab_size:
        hint = "; written as uint16? pass --token-dtype uint16" if dtype == np.uint32 and top >= 2**16 else ""
        raise DataError(f"{path} holds token id {top}, outside model.vocab_size {vocab_size}{hint}")
    if isinstance(tokenizer, (str, Path)):
        tok = BPETokenizer.load(tokenizer) if str(tokenizer) else None
    else:
        tok = tokenizer
    if tok is not None and top >= tok.vocab_size:
        which = f"tokenizer {tokenizer}" if isinstance(tokenizer, (str, Path)) else "the tokenizer"
        raise DataError(f"{path} holds token id {top}, outside the {tok.vocab_size} tokens of {which}")
    return tokens, tok


UINT32_CHECK_MIN_PAIRS = 16
"""Fewest uint16 pairs :func:`_uint32_read_as_uint16` judges a file by."""


def _uint32_read_as_uint16(tokens: np.ndarray, vocab_size: int) -> bool:
    """Whether uint16 ``tokens`` are really uint32 ids, read two uint16 per id.

    A little-endian uint32 id ``v`` is the uint16 pair ``(v & 0xFFFF, v >> 16)``, and
    every id is below ``vocab_size``: read as uint16, the file is an even number of
    items whose odd-indexed ones (the high halves) are all at most ``(vocab_size - 1)
    >> 16`` -- all 0 for a vocabulary of up to 2**16 ids -- while the even-indexed
    ones (the low halves, the ids themselves) are not all that small. In genuine
    uint16 tokens of text, every second token over the whole file being token 0
    (or 0 and 1) is practically impossible, so the file is judged whole (the
    vocabulary check reads it all anyway) and only from
    :data:`UINT32_CHECK_MIN_PAIRS` pairs on (a shorter file cannot train either).
    """
    if tokens.size % 2 or tokens.size < 2 * UINT32_CHECK_MIN_PAIRS:
        return False
    high_bound = (vocab_size - 1) >> 16
    low_max = high_max = 0
    for i in range(0, tokens.size, 2**24):  # an even chunk length keeps the pairs aligned
        chunk = tokens[i : i + 2**24]
        high_max = max(high_max, int(chunk[1::2].max()))
        if high_max > high_bound:
            return False
        low_max = max(low_max, int(chunk[0::2].max()))
    return low_max > high_bound


def _load_bin(path: str, vocab_size: int, val_fraction: float, token_dtype: str, tokenizer: str) -> TokenizedCorpus:
    p = Path(path)
    tokens, tok = read_bin_tokens(path, token_dtype, vocab_size, tokenizer)
    cut = int(tokens.size * (1 - val_fraction))
    return TokenizedCorpus(
        train=tokens[:cut],
        val=tokens[cut:],
        vocab_size=vocab_size,
        tokenizer=tok,
        tokenizer_path=Path(tokenizer) if tokenizer else None,
        description=f"{path}: {cut:,} train / {tokens.size - cut:,} val tokens",
        train_file=(str(p), tokens.dtype.name, 0),
    )


# ----------------------------------------------------------------------------- bytes


def tokens_per_byte(tokens: np.ndarray, tokenizer: BPETokenizer) -> float:
    """Tokens per UTF-8 byte of the text ``tokens`` stand for (end-of-text is a
    token of no bytes)."""
    lengths = np.asarray(tokenizer.byte_lengths(), dtype=np.int64)
    n_bytes = sum(int(lengths[np.asarray(tokens[i : i + 2**24], dtype=np.int64)].sum()) for i in range(0, tokens.size, 2**24))
    if n_bytes == 0:
        raise DataError("the tokens stand for no text bytes: bits per byte is undefined")
    return tokens.size / n_bytes


def bits_per_byte(nats_per_token: float, tokens_per_byte: float) -> float:
    """A cross-entropy in nats per token as bits per UTF-8 byte, which compares
    across tokenizers: ``nats * tokens / bytes / ln 2``."""
    return nats_per_token * tokens_per_byte / math.log(2)


# ----------------------------------------------------------------------------- batches


def out_of_memory(e: BaseException) -> bool:
    """Whether ``e`` says an allocation failed: numpy's :class:`MemoryError`, torch's
    :class:`torch.OutOfMemoryError` (CUDA) or the ``RuntimeError`` of torch's CPU allocator."""
    return isinstance(e, (MemoryError, torch.OutOfMemoryError)) or (
        isinstance(e, RuntimeError) and "can't allocate memory" in str(e)) or (
        isinstance(e, ValueError) and "Maximum allowed size exceeded" in str(e))  # numpy, past its index range


def allocation_asked(e: BaseException) -> str | None:
    """The size a failed allocation asked for, where the allocator's message says it
    (torch's CUDA and CPU allocators: "allocate 20.00 GiB", "allocate 274877906816 bytes")."""
    asked = re.search(r"allocate ([\d.,]+ ?[KMGTPE]?i?B|[\d,]+ bytes)", str(e))
    return asked.group(1) if asked else None


def batch_memory_error(e: BaseException, batch_size: int, seq_len: int, what: str) -> ConfigError:
    """One line for an allocation ``e`` that failed, ``what`` saying what did not fit:
    the batch shape to make smaller, and the size asked for where ``e`` says it."""
    asked = allocation_asked(e)
    size = f" (an allocation of {asked} failed)" if asked else ""
    return ConfigError(f"training.batch_size = {batch_size} with model.seq_len = {seq_len}: {what} in "
                       f"memory{size}; use a smaller batch_size (grad_accum keeps the tokens per step)")


@contextlib.contextmanager
def memory_named_by_batch(batch_size: int, seq_len: int, what: str) -> Iterator[None]:
    """Inside, a failed allocation (:func:`out_of_memory`) becomes
    :func:`batch_memory_error`'s one line (chained to it); any other error passes as it is.
    For work whose memory the batch shape sets: the batches, a training step."""
    try:
        yield
    except (MemoryError, RuntimeError, ValueError) as e:  # torch.OutOfMemoryError is a RuntimeError
        if not out_of_memory(e):
            raise
        raise batch_memory_error(e, batch_size, seq_len, what) from e


def _windows(tokens: np.ndarray, starts: np.ndarray, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    idx = starts[:, None] + np.arange(seq_len + 1)[None, :]
    chunk = torch.from_numpy(np.asarray(tokens[idx], dtype=np.int64))
    return chunk[:, :-1].contiguous(), chunk[:, 1:].contiguous()


def train_window_starts(
    n_tokens: int,
    batch_size: int,
    seq_len: int,
    *,
    seed: int,
    step: int,
    micro: int = 0,
    rank: int = 0,
    world_size: int = 1,
) -> np.ndarray:
    """Stream positions where the windows of :func:`train_batch` start (int64 ``[batch_size]``)."""
    lo, hi = rank * n_tokens // world_size, (rank + 1) * n_tokens // world_size
    if hi - lo < seq_len + 1:
        raise DataError(
            f"train split has {hi - lo} tokens per process, fewer than seq_len + 1 = {seq_len + 1}; "
            "use a larger corpus or a shorter seq_len"
        )
    rng = np.random.Generator(np.random.PCG64([seed, step, micro, rank]))
    return rng.integers(lo, hi - seq_len, size=batch_size)


def train_batch(
    tokens: np.ndarray,
    batch_size: int,
    seq_len: int,
    *,
    seed: int,
    step: int,
    micro: int = 0,
    rank: int = 0,
    world_size: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random windows from this rank's shard: ``(x, y)`` with ``y[:, t] = x[:, t+1]``
    of the underlying stream, both int64 ``[batch_size, seq_len]`` on the CPU. Row
    ``b`` starts at :func:`train_window_starts`' ``b``-th position."""
    with memory_named_by_batch(batch_size, seq_len, "the training batches do not fit"):
        starts = train_window_starts(tokens.size, batch_size, seq_len, seed=seed, step=step, micro=micro, rank=rank,
                                     world_size=world_size)
        return _windows(tokens, starts, seq_len)


def val_batches(
    tokens: np.ndarray, n_batches: int, batch_size: int, seq_len: int, rank: int = 0, world_size: int = 1
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A fixed, evenly spaced set of val windows (the same every eval); batch
    ``i`` goes to rank ``i % world_size``."""
    if tokens.size < seq_len + 1:
        raise DataError(f"val split has {tokens.size} tokens, fewer than seq_len + 1 = {seq_len + 1}")
    with memory_named_by_batch(batch_size, seq_len, f"the {n_batches} val batches do not fit"):
        starts = np.linspace(0, tokens.size - seq_len - 1, n_batches * batch_size).astype(np.int64)
        return [
            _windows(tokens, starts[i * batch_size : (i + 1) * batch_size], seq_len)
            for i in range(n_batches)
            if i % world_size == rank
        ]
