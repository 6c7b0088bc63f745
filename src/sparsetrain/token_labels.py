"""Which kind of document every train token comes from, and what a token selector keeps of each kind.

A corpus built by ``sparsetrain corpus build`` (:mod:`sparsetrain.corpora`) lists
every file it generated, with its kind, in ``.corpus_manifest.json``. Here each
token of the run's ``train.bin`` gets the label of the document it belongs to:

* label names: ``clean`` (code 0), then every kind the manifest's ``generated``
  files name, sorted (for a full build ``boilerplate, duplicate, minified,
  random, table``); a train document the manifest does not list is ``clean``;
* a clean file with noise spliced inside (``noise_placement = "inside"``: its
  entry lists ``inserted`` spans in characters) is encoded again with the
  tokenizer's character offsets, and a token whose first character lies in a
  span gets that span's kind;
* the token cache holds each train document preceded by one end-of-text token
  (:func:`sparsetrain.data.join_documents`), in the order of their relative
  paths. That end-of-text token carries the label of the document it *precedes*:
  a document's span is its end-of-text token and its own tokens, so the spans
  tile the stream. (As a target, that token is predicted at the end of the
  previous document; one token per document, at least 512 bytes for noise.)

The spans are found without tokenizing again: the ``k``-th end-of-text token of
the stream starts the ``k``-th document, except where a document's text holds
the end-of-text string itself, which the tokenizer also turns into that token;
those few documents are encoded again to count theirs. The count of end-of-text
tokens in the stream then checks the whole; where it disagrees (a given
tokenizer that makes the token from other text), every document is encoded
again and the spans follow from the lengths.

The trainer counts, per micro-batch and per label, the targets and the kept
targets on the device (:func:`label_counts`) and writes, per log window, each
kind's ``kept_share/<kind>`` and ``batch_share/<kind>``
(:func:`sparsetrain.metrics.label_shares`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .corpora import CLEAN_KIND, MANIFEST_NAME
from .data import TokenizedCorpus, read_documents
from .errors import DataError
from .tokenizer import EOT, BPETokenizer

CLEAN = CLEAN_KIND  # the label of a copied source file (and code 0)
CHUNK = 2**24  # tokens scanned at a time, so the scan of a large memory map needs little memory


@dataclass(frozen=True)
class TokenLabels:
    """``codes[i]``: the label of train token ``i`` (uint8), an index into ``names``."""

    codes: np.ndarray
    names: tuple[str, ...]

    def targets(self, starts: np.ndarray, seq_len: int) -> torch.Tensor:
        """uint8 ``[len(starts), seq_len]``: the labels of the targets ``y`` of the
        windows starting at ``starts`` (``y[b, t]`` is token ``starts[b] + 1 + t``,
        :func:`sparsetrain.data.train_batch`), on the CPU."""
        idx = np.asarray(starts, dtype=np.int64)[:, None] + 1 + np.arange(seq_len)[None, :]
        return torch.from_numpy(np.ascontiguousarray(self.codes[idx]))


def read_manifest(corpus: TokenizedCorpus) -> dict | None:
    """The ``.corpus_manifest.json`` of a text folder corpus, or None (no manifest, a
    ``.bin`` corpus, or files cut into train and val)."""
    if not corpus.text_root or not corpus.train_doc_names:
        return None
    path = Path(corpus.text_root) / MANIFEST_NAME
    if not path.is_file():
        return None
    manifest = json.loads(path.read_text())
    if not isinstance(manifest.get("generated"), dict):
        raise DataError(f"{path} has no 'generated' table of files; it is not a manifest of sparsetrain corpus build")
    return manifest


def label_names(manifest: dict) -> tuple[str, ...]:
    """``clean``, then the kinds of the manifest's generated files, sorted."""
    kinds = {meta["kind"] for meta in manifest["generated"].values()}
    kinds |= {kind for meta in manifest["generated"].values() for _, _, kind in meta.get("inserted", ())}
    kinds = sorted(kinds - {CLEAN})
    names = (CLEAN, *kinds)
    if len(names) > 256:
        raise DataError(f"the corpus manifest names {len(kinds)} kinds of document; labels hold at most 255")
    return names


def eot_positions(tokens: np.ndarray, eot_id: int) -> np.ndarray:
    """Positions (int64) of every ``eot_id`` in ``tokens``, in order."""
    parts = [np.flatnonzero(np.asarray(tokens[i : i + CHUNK]) == eot_id) + i for i in range(0, tokens.size, CHUNK)]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


def document_starts(tokens: np.ndarray, texts: list[str], tokenizer: BPETokenizer) -> np.ndarray:
    """Where each of ``texts`` starts in ``tokens`` (int64 ``[len(texts)]``): the
    position of the end-of-text token before it, ``tokens`` being the texts'
    encodings each preceded by end-of-text (:func:`sparsetrain.data.join_documents`).
    :class:`DataError` where ``tokens`` do not hold those texts."""
    eot = tokenizer.eot_id
    positions = eot_positions(tokens, eot)
    # end-of-text tokens inside a document: only where its text spells the token (counted by encoding it)
    inner = np.array([tokenizer.encode(t).count(eot) if EOT in t else 0 for t in texts], dtype=np.int64)
    if positions.size == len(texts) + int(inner.sum()):
        before = np.concatenate([[0], np.cumsum(inner)[:-1]]).astype(np.int64)
        starts = positions[np.arange(len(texts)) + before]
    else:  # the tokenizer made end-of-text tokens of other text too: the lengths of every encoding
        lengths = np.array([len(ids) + 1 for ids in tokenizer.encode_batch(texts)], dtype=np.int64)
        if int(lengths.sum()) != tokens.size:
            raise DataError(f"the train tokens ({tokens.size:,}) are not the {len(texts)} train documents' "
                            f"encodings ({int(lengths.sum()):,} tokens with their separators)")
        starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    if len(texts) and (starts[0] != 0 or np.any(np.asarray(tokens[starts]) != eot)):
        raise DataError("the train tokens do not start each train document with end-of-text")
    return starts


def train_document_starts(corpus: TokenizedCorpus) -> np.ndarray:
    """Where each of ``corpus.train_doc_names`` starts in its train tokens
    (:func:`document_starts`), the files read again from the corpus folder;
    :class:`DataError` where they changed since their tokens were cached."""
    root = Path(corpus.text_root)
    names = list(corpus.train_doc_names)
    docs = read_documents(root, [root / n for n in names])
    if list(docs) != names:  # a file emptied or removed since the token cache was built
        raise DataError(f"the train files under {root} changed since their tokens were cached")
    return document_starts(corpus.train, [docs[n] for n in names], corpus.tokenizer)


def train_token_labels(corpus: TokenizedCorpus, manifest: dict | None = None,
                       starts: np.ndarray | None = None) -> TokenLabels | None:
    """The label of every train token of ``corpus`` (see the module docstring), or
    None where the corpus has no manifest (nothing is read then but the folder's
    listing). ``manifest``: :func:`read_manifest`'s, and ``starts``:
    :func:`train_document_starts`'s, when the caller has them."""
    manifest = manifest if manifest is not None else read_manifest(corpus)
    if manifest is None:
        return None
    if corpus.tokenizer is None:
        raise DataError("token labels need the corpus's tokenizer")
    names = list(corpus.train_doc_names)
    starts = train_document_starts(corpus) if starts is None else starts
    label_of = label_names(manifest)
    code = {name: i for i, name in enumerate(label_of)}
    generated = manifest["generated"]
    doc_codes = np.array([code[generated[n]["kind"]] if n in generated else 0
                          for n in (Path(n).as_posix() for n in names)], dtype=np.uint8)
    lengths = np.diff(np.append(starts, corpus.train.size))
    codes = np.repeat(doc_codes, lengths)
    mixed = [(k, generated[n]["inserted"]) for k, n in enumerate(Path(n).as_posix() for n in names)
             if generated.get(n, {}).get("inserted")]
    if mixed:
        root = Path(corpus.text_root)
        for k, spans in mixed:
            text = read_documents(root, [root / names[k]])[names[k]]
            codes[starts[k] + 1 : starts[k] + lengths[k]] = _span_codes(text, spans, code, corpus.tokenizer,
                                                                        int(lengths[k]) - 1, names[k])
    return TokenLabels(codes=codes, names=label_of)


def _span_codes(text: str, spans: list, code: dict[str, int], tokenizer: BPETokenizer, n_tokens: int,
                name: str) -> np.ndarray:
    """The labels of ``text``'s tokens: clean, or the kind of the ``spans`` entry
    (``[start, end, kind]`` in characters) that holds the token's first character."""
    ids, offsets = tokenizer.encode_offsets(text)
    if len(ids) != n_tokens:
        raise DataError(f"{name}: {len(ids)} tokens when encoded again, {n_tokens} in the token cache")
    chars = np.zeros(len(text) + 1, dtype=np.uint8)
    for start, end, kind in spans:
        chars[start:end] = code[kind]
    first = np.array([a for a, _ in offsets], dtype=np.int64) if offsets else np.zeros(0, dtype=np.int64)
    return chars[np.minimum(first, len(text))]


def label_counts(labels: torch.Tensor, keep: torch.Tensor, n_labels: int) -> torch.Tensor:
    """Targets per label, not kept and kept: int64 ``[2 * n_labels]`` on ``keep``'s
    device, bin ``label + n_labels * kept`` (so bins ``n_labels ..`` count the kept
    targets). ``labels`` and ``keep`` (bool) have the targets' shape. Nothing is read
    back: a scatter-add, not ``torch.bincount``, which on CUDA reads its input's
    maximum on the host to size its output."""
    idx = labels.to(keep.device, non_blocking=True).reshape(-1).long() + n_labels * keep.reshape(-1).long()
    return torch.zeros(2 * n_labels, dtype=torch.int64, device=keep.device).scatter_add_(0, idx, torch.ones_like(idx))
