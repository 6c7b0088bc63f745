"""A corpus without the documents a reference model finds hardest: ``sparsetrain corpus filter``.

The excess score keeps, inside every batch, the spans where the model lags a
reference. Part of what it buys could be had without Collider: score each
train document once by the reference's mean loss of its tokens (read from the
reference-loss sidecar, :mod:`sparsetrain.reference_losses`) and leave the
highest-scoring documents out of the corpus, then train dense on the rest. That
is the static control of the excess score (a perplexity filter), and the user's
cheaper alternative whenever it does as well; where the noise comes in whole
documents it did better (docs/time_to_quality.md, regime 3).

* The documents left out are the highest mean reference loss first, until at
  least ``drop`` of the train tokens are gone (each document's end-of-text
  separator counted with it).
* Only train files are left out; every val file is copied, under its own path,
  so the held-out split (a hash of each path, :func:`sparsetrain.data.is_val_file`)
  is the source's exactly.
* The manifest of a ``corpus build`` folder is carried over with the left-out
  files removed from its ``generated`` table, and a ``filtered`` section says
  what was left out (its other counts describe the source), and the seconds the
  filter took; a plain folder's copy gets a manifest holding that section
  alone. The folder appears whole or not at all.
* **The random control** (``random_seed``, no losses): the same share of
  train tokens left out in whole documents taken in a random order, so a
  filter's gain can be told from the mere shrinking of the corpus (read more
  times in the same budget).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .corpora import MANIFEST_NAME, check_out_name, check_out_outside
from .data import TokenizedCorpus
from .errors import DataError
from .reference_losses import ReferenceLosses
from .token_labels import read_manifest, train_document_starts, train_token_labels


@dataclass(frozen=True)
class DocumentLosses:
    """Each train document's relative path, token count (separator included),
    the reference's mean loss of its own tokens and, for a corpus, its start in
    the train tokens."""

    names: tuple[str, ...]
    tokens: np.ndarray
    mean_loss: np.ndarray
    starts: np.ndarray | None = None  # where each begins in the train tokens, for a corpus's documents


def document_losses(corpus: TokenizedCorpus, losses: np.ndarray | None) -> DocumentLosses:
    """The train documents of ``corpus`` with the mean of ``losses`` (a sidecar:
    entry ``i`` is the loss of train token ``i + 1``) over each one's tokens
    (None: no losses, every mean NaN; the documents and their sizes alone)."""
    if corpus.tokenizer is None or not corpus.text_root:
        raise DataError("corpus filter needs a folder of text files and its tokenizer")
    root = Path(corpus.text_root)
    names = list(corpus.train_doc_names)
    if not names:
        raise DataError(f"{root} has no val file at this val_fraction, so its split cuts every file and no "
                        "train document is a file: pass the --val-fraction the corpus was built for")
    starts = train_document_starts(corpus)
    ends = np.append(starts[1:], corpus.train.size)
    if losses is None:
        return DocumentLosses(names=tuple(names), tokens=ends - starts, mean_loss=np.full(len(names), np.nan),
                              starts=starts)
    # a document spans its separator (at its start) and its tokens; the entries predicting its
    # tokens are start .. end - 2 (entry end - 1 predicts the next document's separator)
    sums = np.add.reduceat(losses, starts, dtype=np.float64) if len(starts) else np.zeros(0)
    last = np.asarray(losses[ends - 1], dtype=np.float64)
    own = ends - starts - 1
    mean = np.where(own > 0, (sums - last) / np.maximum(own, 1), 0.0)
    return DocumentLosses(names=tuple(names), tokens=ends - starts, mean_loss=mean, starts=starts)


def choose_left_out(docs: DocumentLosses, drop: float, random_seed: int | None = None) -> np.ndarray:
    """Bool per document: left out, the highest mean loss first, until at least
    ``drop`` of the tokens are (ties broken by path, so the choice is deterministic);
    with ``random_seed``, in the order of a random permutation drawn from that seed instead."""
    check_drop(drop)
    if random_seed is None:
        order = sorted(range(len(docs.names)), key=lambda i: (-docs.mean_loss[i], docs.names[i]))
    else:
        order = np.random.default_rng(random_seed).permutation(len(docs.names)).tolist()
    target = drop * float(docs.tokens.sum())
    out = np.zeros(len(docs.names), dtype=bool)
    gone = 0
    for i in order:
        if gone >= target:
            break
        out[i] = True
        gone += int(docs.tokens[i])
    if out.all():  # a copy of val files alone would cut their text into a new split
        raise DataError(f"--drop {drop} leaves out every one of the {len(out)} train documents (the last one taken "
                        f"holds {int(docs.tokens[i]):,} of the {int(docs.tokens.sum()):,} train tokens); use a smaller --drop")
    return out


def filter_corpus(corpus: TokenizedCorpus, sidecar: str | Path | None, drop: float, out: str | Path,
                  verbose: bool = True, random_seed: int | None = None, val_fraction: float | None = None) -> dict:
    """Write ``corpus``'s folder to ``out`` without the train documents whose mean
    reference loss (from ``sidecar``) is highest, about ``drop`` of its train
    tokens; with ``random_seed`` and no ``sidecar``, without documents taken in a
    random order instead (the control). ``val_fraction``: the one ``corpus`` was
    split at, recorded so that a run at a larger one is refused
    (:func:`sparsetrain.data.check_filtered_split`). Returns the ``filtered``
    record (also in ``out``'s manifest)."""
    if (sidecar is None) == (random_seed is None):
        raise DataError("corpus filter takes reference losses or a random seed, one of the two")
    if random_seed is not None:
        check_random_seed(random_seed)
    check_out(Path(corpus.text_root), out)
    began = time.perf_counter()
    out = Path(out)
    losses = None if sidecar is None else ReferenceLosses(sidecar, corpus.train).losses
    docs = document_losses(corpus, losses)
    left_out = choose_left_out(docs, drop, random_seed)
    gone = {docs.names[i] for i in np.flatnonzero(left_out)}
    record = {"source": str(Path(corpus.text_root).resolve()),
              "reference_losses": None if sidecar is None else str(Path(sidecar).resolve()),
              "random_seed": random_seed, "val_fraction": val_fraction,
              "drop": drop, "train_documents": len(docs.names), "left_out_documents": len(gone),
              "train_tokens": int(docs.tokens.sum()), "left_out_tokens": int(docs.tokens[left_out].sum())}
    if losses is not None:
        record.update(mean_loss_kept=_weighted(docs, ~left_out), mean_loss_left_out=_weighted(docs, left_out))
    manifest = read_manifest(corpus)
    if manifest is not None:  # each token's kind (noise spliced inside a file has its own), kept or not
        labels = train_token_labels(corpus, manifest, docs.starts)  # the starts read once, for both
        kept = np.repeat(~left_out, docs.tokens)
        total = np.bincount(labels.codes, minlength=len(labels.names))
        kept_by = np.bincount(labels.codes[kept], minlength=len(labels.names))
        record["kept_share_by_kind"] = {name: round(float(kept_by[i] / total[i]), 4)
                                        for i, name in enumerate(labels.names) if total[i]}
        manifest = {**manifest, "generated": {k: v for k, v in manifest["generated"].items() if k not in gone},
                    "filtered": record}
    else:  # a plain folder: a manifest of its own, so the record (and a race's one-time cost) travels with the copy
        manifest = {"format": 1, "generated": {}, "filtered": record}
    record["seconds"] = round(time.perf_counter() - began, 3)  # the filter's share of the one-time cost
    _write_filtered(Path(corpus.text_root), out, gone, manifest)
    if verbose:
        shares = record.get("kept_share_by_kind")
        why = (f"mean reference loss {record['mean_loss_left_out']:.3f} left out, {record['mean_loss_kept']:.3f} kept"
               if losses is not None else f"taken at random, seed {random_seed}")
        print(f"corpus {out}: left out {len(gone):,} of {len(docs.names):,} train documents "
              f"({record['left_out_tokens']:,} of {record['train_tokens']:,} tokens, a share of "
              f"{record['left_out_tokens'] / record['train_tokens']:.3f} for --drop {drop}; {why})"
              + (f"; share of each kind's tokens kept: " + ", ".join(f"{k} {v:.3f}" for k, v in shares.items())
                 if shares else ""), flush=True)
    return record


def check_drop(drop: float) -> None:
    """Refuse a ``drop`` outside (0, 1)."""
    if not 0.0 < drop < 1.0:
        raise DataError(f"--drop must be in (0, 1), got {drop}")


def check_random_seed(seed: int) -> None:
    """Refuse a negative ``--random-seed`` (numpy's generators take none)."""
    if seed < 0:
        raise DataError(f"--random-seed must be >= 0, got {seed}")


def check_out(corpus: Path, out: str | Path) -> None:
    """Refuse an ``out`` that is not a new or empty folder, or that lies inside ``corpus``
    (the copy would join the corpus's own files), or that names no new folder (empty, ``.``)."""
    check_out_name(out)
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DataError(f"--out {out} exists and is not an empty folder; pick another")
    check_out_outside(out, corpus, "corpus")


def _weighted(docs: DocumentLosses, which: np.ndarray) -> float:
    w = docs.tokens[which].astype(np.float64)
    return float((docs.mean_loss[which] * w).sum() / w.sum()) if w.sum() else 0.0


def _write_filtered(src: Path, out: Path, gone: set[str], manifest: dict | None) -> None:
    """Copy ``src`` without the files ``gone`` into a folder beside ``out``, then rename it into place."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.partial-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        for f in sorted(src.rglob("*")):
            rel = f.relative_to(src).as_posix()
            if not f.is_file() or rel in gone or rel == MANIFEST_NAME:
                continue
            dest = tmp / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(f, dest)
        tmp.mkdir(parents=True, exist_ok=True)
        if manifest is not None:
            (tmp / MANIFEST_NAME).write_text(json.dumps(manifest, indent=1))
        if out.exists():
            out.rmdir()  # empty, checked above
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


__all__ = ["DocumentLosses", "check_drop", "check_out", "check_random_seed", "choose_left_out", "document_losses",
           "filter_corpus"]
