"""A reference model's per-token losses, computed once, read for free at train time.

The ``excess`` token score (Rho-1) is the current model's loss minus a reference
model's. Run online (``reference_ckpt``), the reference costs a forward pass of a
second model in every training step. ``sparsetrain reference-losses`` instead
computes the reference's loss of every train token once and stores it in a
float16 *sidecar* aligned with the train token stream: entry ``i`` is the
reference's cross-entropy (nats) of token ``i + 1`` given the tokens before it
(the last entry, which has no next token, is 0). A run with
``reference_losses = FILE`` reads the entries of its batch's windows (the
windows of :func:`sparsetrain.data.train_batch`: positions ``start .. start +
seq_len - 1`` for the targets ``y``) from the memory-mapped file.

Context. A training window starts anywhere, so no stream-aligned file can give
every window's tokens the exact context the online reference sees (the tokens
from the window's start). The sidecar's entries are computed over windows of
the reference's ``seq_len`` ``L`` that start every ``H = L // 2`` tokens; each
window contributes its last ``H`` positions (the first window all of its ``L``,
and a final window ending at the stream's end covers the tail), so every entry
after the stream's first ``L`` positions was computed with at least ``L - H``
tokens of context (:func:`sidecar_windows`). The reference's loss of a token is
then at least as well informed as the online one for positions past the middle
of a window, and better informed for the early positions, where the online
reference has seen few tokens. It is a different (deterministic) quantity from
the online score, not a copy of it.

Cost. With that overlap the reference reads every token about twice. A smaller
``context`` (``sparsetrain reference-losses --context C``) lets windows overlap
by ``C`` tokens only: ``--context 0`` reads each token once, at half the
forwards, and a position ``p`` tokens into its window then has ``p`` tokens of
context, as the online reference's would. The header records the context.

The file ``FILE`` holds the raw float16 values; ``FILE.json`` the number of
tokens, a fingerprint of the train tokens (a sidecar from another corpus or
split is refused), the windows' ``L`` and count, the reference run, the dtype
and the seconds the forwards took (the one-time cost a race reports apart).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .checkpoint import atomic_write_text, first_line
from .data import train_window_starts
from .errors import DataError

SIDECAR_FORMAT = 1


def header_path(path: str | Path) -> Path:
    return Path(str(path) + ".json")


def tokens_fingerprint(tokens: np.ndarray) -> str:
    """SHA-256 of the token count and the tokens: all of them up to 64 Mi tokens,
    else 64 evenly spaced runs of 1 Mi tokens (cheap on a large memory map)."""
    h = hashlib.sha256(f"{tokens.size}:{tokens.dtype.name}".encode())
    chunk = 2**20
    if tokens.size <= 64 * chunk:
        for i in range(0, tokens.size, 16 * chunk):
            h.update(np.ascontiguousarray(tokens[i : i + 16 * chunk]).tobytes())
    else:
        for start in np.linspace(0, tokens.size - chunk, 64).astype(np.int64):
            h.update(np.ascontiguousarray(tokens[start : start + chunk]).tobytes())
    return h.hexdigest()


def default_context(seq_len: int) -> int:
    """The context every sidecar entry past the first window gets by default: ``L - L // 2``."""
    return seq_len - max(1, seq_len // 2)


def sidecar_windows(n_tokens: int, seq_len: int, context: int | None = None) -> list[tuple[int, int, int]]:
    """``(window start, first kept position, end of kept positions)`` covering the
    positions ``0 .. n_tokens - 2`` (those with a next token) exactly once, in order.
    A window of ``seq_len`` inputs starting at ``w`` gives the losses of positions
    ``w .. w + seq_len - 1``; each window after the first keeps its last
    ``seq_len - context`` of them, so each of those has at least ``context``
    tokens before it in the window (default :func:`default_context`)."""
    if n_tokens < seq_len + 1:
        raise DataError(f"train split has {n_tokens} tokens, fewer than the reference's seq_len + 1 = {seq_len + 1}")
    context = default_context(seq_len) if context is None else context
    if not 0 <= context < seq_len:
        raise DataError(f"--context must be in [0, {seq_len}) (the reference's seq_len), got {context}")
    step = seq_len - context  # the positions each later window keeps, and how far the windows move
    last = n_tokens - 1  # positions with a target
    out = [(0, 0, seq_len)]
    w = step
    while w + seq_len <= last:
        out.append((w, w + context, w + seq_len))
        w += step
    covered = out[-1][2]
    if covered < last:  # the tail: one window ending at the stream's end
        out.append((last - seq_len, covered, last))
    return out


@torch.no_grad()
def compute_reference_losses(model: torch.nn.Module, tokens: np.ndarray, out: str | Path, batch_size: int,
                             device: torch.device, amp_dtype: torch.dtype | None, reference: str = "",
                             verbose: bool = True, reference_train_seconds: float | None = None,
                             context: int | None = None) -> Path:
    """Write the sidecar of ``model``'s per-token losses over ``tokens`` to ``out``
    (and its header to ``out.json``); the data file is written under a temporary
    name and renamed once complete. ``reference_train_seconds``: how long the
    reference trained (its run's clock, start-up included), kept in the header
    so that a race can count the whole one-time cost (:func:`one_time_cost`)."""
    seq_len = model.config.seq_len
    context = default_context(seq_len) if context is None else context
    windows = sidecar_windows(tokens.size, seq_len, context)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    sidecar = np.memmap(tmp, dtype=np.float16, mode="w+", shape=(tokens.size,))
    sidecar[-1] = 0.0
    model.eval()
    offsets = np.arange(seq_len + 1)
    began = time.perf_counter()  # the forwards alone: what the excess score's one-time cost is, beside training
    for b in range(0, len(windows), batch_size):
        group = windows[b : b + batch_size]
        starts = np.array([w for w, _, _ in group], dtype=np.int64)
        chunk = torch.from_numpy(np.asarray(tokens[starts[:, None] + offsets[None, :]], dtype=np.int64)).to(device)
        with torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else contextlib.nullcontext():
            logits, _ = model(chunk[:, :-1])
        nll = F.cross_entropy(logits.float().flatten(0, 1), chunk[:, 1:].flatten(), reduction="none")
        nll = nll.view(len(group), seq_len).cpu().numpy()
        for row, (w, lo, hi) in zip(nll, group):
            sidecar[lo:hi] = row[lo - w : hi - w]
        if verbose and (b // batch_size) % 200 == 0:
            print(f"reference losses: {min(b + batch_size, len(windows)):,}/{len(windows):,} windows", flush=True)
    seconds = time.perf_counter() - began  # every batch was read back to the host: nothing is still running
    sidecar.flush()
    del sidecar
    os.replace(tmp, out)
    header = {"format": SIDECAR_FORMAT, "n_tokens": int(tokens.size), "tokens_fingerprint": tokens_fingerprint(tokens),
              "seq_len": seq_len, "reference": reference, "dtype": str(amp_dtype or torch.float32),
              "seconds": round(seconds, 3), "windows": len(windows), "context": context,
              "reference_train_seconds": reference_train_seconds}
    atomic_write_text(header_path(out), json.dumps(header, indent=2))
    return out


def one_time_cost(sidecar: str | Path) -> dict[str, Any]:
    """What a sidecar cost once, from its header: ``reference_training`` (the
    reference run's training seconds) and ``reference_losses`` (the forwards'
    seconds), None where the header predates the record; and ``reference``, the
    checkpoint that computed it (so a reference shared by sidecars counts once)."""
    header = read_header(sidecar)
    return {"reference_training": header.get("reference_train_seconds"), "reference_losses": header.get("seconds"),
            "reference": header.get("reference", "")}


def read_header(sidecar: str | Path, required: tuple[str, ...] = ()) -> dict[str, Any]:
    """A sidecar's JSON header (``<sidecar>.json``), refused with one line when it does not
    parse into an object or lacks one of the ``required`` fields."""
    hp = header_path(sidecar)
    try:
        header = json.loads(hp.read_text())
    except (OSError, ValueError) as e:
        raise DataError(f"reference_losses {sidecar}: its header {hp} cannot be read ({first_line(e)}); "
                        "recompute the sidecar with sparsetrain reference-losses") from None
    if not isinstance(header, dict):
        raise DataError(f"reference_losses {sidecar}: its header {hp} is not a JSON object; "
                        "recompute the sidecar with sparsetrain reference-losses")
    missing = [k for k in required if k not in header]
    if missing:
        raise DataError(f"reference_losses {sidecar}: its header {hp} lacks {', '.join(missing)}; "
                        "recompute the sidecar with sparsetrain reference-losses")
    return header


class ReferenceLosses:
    """A sidecar opened against the run's train tokens; :meth:`batch` gives the
    reference losses of a :func:`~sparsetrain.data.train_batch` micro-batch."""

    def __init__(self, path: str | Path, train_tokens: np.ndarray) -> None:
        hp = header_path(path)
        if not Path(path).is_file() or not hp.is_file():
            raise DataError(f"reference_losses {path}: no such sidecar (or no {hp.name} next to it); "
                            "make one with sparsetrain reference-losses")
        header = read_header(path, ("format", "n_tokens", "tokens_fingerprint"))
        if header.get("format") != SIDECAR_FORMAT:
            raise DataError(f"reference_losses {path} has format {header.get('format')}, expected {SIDECAR_FORMAT}")
        if header["n_tokens"] != train_tokens.size or header["tokens_fingerprint"] != tokens_fingerprint(train_tokens):
            raise DataError(f"reference_losses {path} was computed for other train tokens ({header['n_tokens']:,} "
                            f"there, {train_tokens.size:,} here, or other contents); recompute it for this corpus")
        size = Path(path).stat().st_size
        if size != 2 * train_tokens.size:  # a copy cut short (or padded): memmap would fail or read past the losses
            raise DataError(f"reference_losses {path} holds {size:,} bytes where its {train_tokens.size:,} float16 "
                            f"losses take {2 * train_tokens.size:,}: a damaged copy; recompute it with sparsetrain "
                            "reference-losses")
        self.losses = np.memmap(path, dtype=np.float16, mode="r", shape=(train_tokens.size,))
        self.n_tokens = int(train_tokens.size)
        self.path = str(path)

    def batch(self, batch_size: int, seq_len: int, *, seed: int, step: int, micro: int, rank: int,
              world_size: int) -> torch.Tensor:
        """float32 ``[batch_size, seq_len]`` losses aligned with the targets of that micro-batch."""
        starts = train_window_starts(self.n_tokens, batch_size, seq_len, seed=seed, step=step, micro=micro,
                                     rank=rank, world_size=world_size)
        idx = starts[:, None] + np.arange(seq_len)[None, :]
        return torch.from_numpy(self.losses[idx].astype(np.float32))
