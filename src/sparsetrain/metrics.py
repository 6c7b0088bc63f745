"""Training metrics: one channel from the micro-steps to the metrics.jsonl rows.

Every micro-step hands :meth:`MetricWindow.add` a dict (the objective's
metrics, the backward time); every optimizer step ends with
:meth:`MetricWindow.end_step` (loss, grad norm, lr and the step's own
extras). Values may be device tensors, host numbers, :class:`ElapsedMs`
(CUDA events), or lists and dicts of them; nothing is read back until
:meth:`MetricWindow.rows`, which the trainer calls at a log step after its one
sync of the window, and which copies every device value to the host in one
transfer per device.

How the keys reduce:

* ``kept`` / ``total`` (tokens kept by a token filter / valid tokens): summed
  over the step's micro-steps, written per step as ``kept_fraction``;
* a step's extras (``sparse24``): on that step's row only;
* ``label_counts`` (targets per document kind, not kept and kept, see
  :func:`sparsetrain.token_labels.label_counts`): summed over the log window and
  written as ``kept_share/<kind>`` and ``batch_share/<kind>``
  (:func:`label_shares`), the same on every row of the
  window, for the ``label_names`` the window was made with;
* anything else a micro-step reports (``backward_ms``, ``mtp_losses``,
  ``bk_sparsity``, ...): the mean over the log window (element-wise for lists,
  key-wise for dicts), the same value on every row of the window.

Numbers are rounded to 4 decimals (``backward_ms`` to 3).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

STEP_SUMS = ("kept", "total")
LABEL_COUNTS = "label_counts"
DIGITS = {"backward_ms": 3}
DEFAULT_DIGITS = 4


class ElapsedMs:
    """Milliseconds between two recorded CUDA events, read when the window is."""

    __slots__ = ("start", "end")

    def __init__(self, start: torch.cuda.Event, end: torch.cuda.Event) -> None:
        self.start, self.end = start, end

    def read(self) -> float:
        return self.start.elapsed_time(self.end)


def _tensors(tree: Any, out: list[torch.Tensor]) -> None:
    if isinstance(tree, torch.Tensor):
        out.append(tree)
    elif isinstance(tree, dict):
        for v in tree.values():
            _tensors(v, out)
    elif isinstance(tree, (list, tuple)):
        for v in tree:
            _tensors(v, out)


def to_host(tree: Any) -> Any:
    """``tree`` with every tensor as a Python float (0-dim) or list of floats and
    every :class:`ElapsedMs` read; one device-to-host copy per device."""
    tensors: list[torch.Tensor] = []
    _tensors(tree, tensors)
    values: dict[int, list[float]] = {}
    by_device: dict[torch.device, list[torch.Tensor]] = {}
    for t in tensors:
        by_device.setdefault(t.device, []).append(t)
    for group in by_device.values():
        flat = torch.cat([t.detach().reshape(-1).to(torch.float64) for t in group]).cpu().tolist()
        i = 0
        for t in group:
            values[id(t)] = flat[i:i + t.numel()]
            i += t.numel()

    def convert(x: Any) -> Any:
        if isinstance(x, torch.Tensor):
            v = values[id(x)]
            return v[0] if x.dim() == 0 else v
        if isinstance(x, ElapsedMs):
            return x.read()
        if isinstance(x, dict):
            return {k: convert(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [convert(v) for v in x]
        return x

    return convert(tree)


def mean(values: list[Any]) -> Any:
    """Mean of same-shaped host values: numbers, lists (element-wise) or dicts (key-wise);
    strings must agree and are kept."""
    first = values[0]
    if isinstance(first, dict):
        return {k: mean([v[k] for v in values]) for k in first}
    if isinstance(first, list):
        return [mean(list(col)) for col in zip(*values)]
    if isinstance(first, str):
        return first
    return sum(values) / len(values)


def rounded(x: Any, digits: int = DEFAULT_DIGITS) -> Any:
    if isinstance(x, dict):
        return {k: rounded(v, digits) for k, v in x.items()}
    if isinstance(x, list):
        return [rounded(v, digits) for v in x]
    if isinstance(x, float):
        return round(x, digits)
    return x


def label_shares(counts: list[float], names: tuple[str, ...]) -> dict[str, float | None]:
    """From :func:`~sparsetrain.token_labels.label_counts` summed over a window (host
    numbers): ``kept_share/<name>``, the kept fraction of that label's targets (None
    where the window held none), and ``batch_share/<name>``, that label's fraction of
    all targets; rounded to 4 decimals."""
    n = len(names)
    dropped, kept = counts[:n], counts[n:]
    total = [d + k for d, k in zip(dropped, kept)]
    everything = sum(total)
    out: dict[str, float | None] = {}
    for name, k, t in zip(names, kept, total):
        out[f"kept_share/{name}"] = round(k / t, 4) if t else None
    for name, t in zip(names, total):
        out[f"batch_share/{name}"] = round(t / everything, 4) if everything else None
    return out


class MetricWindow:
    """The metrics of the optimizer steps since the last :meth:`rows`. ``label_names``:
    the document kinds that micro-steps' ``label_counts`` count (none: no such counts)."""

    def __init__(self, label_names: tuple[str, ...] = ()) -> None:
        self.label_names = tuple(label_names)
        self._micro: list[dict[str, Any]] = []  # the step in progress
        self._steps: list[dict[str, Any]] = []  # finished steps of the window
        self._window: list[dict[str, Any]] = []  # every micro-step of the window, less the per-step sums

    def add(self, metrics: dict[str, Any]) -> None:
        """One micro-step's metrics."""
        self._micro.append(metrics)

    def end_step(self, step: int, loss: torch.Tensor | float, grad_norm: torch.Tensor | float, lr: float,
                 extras: dict[str, Any] | None = None) -> None:
        """Close optimizer step ``step`` (its number as logged, counted from 1)."""
        record: dict[str, Any] = {"step": step, "loss": loss, "grad_norm": grad_norm, "lr": lr, "extras": extras or {}}
        for key in STEP_SUMS:
            parts = [m[key] for m in self._micro if key in m]
            if parts:
                record[key] = sum(parts[1:], parts[0])
        self._window.extend({k: v for k, v in m.items() if k not in STEP_SUMS} for m in self._micro)
        self._steps.append(record)
        self._micro = []

    def __len__(self) -> int:
        return len(self._steps)

    def rows(self, tokens_per_step: int, tokens_per_s: float) -> list[dict[str, Any]]:
        """metrics.jsonl ``train`` rows of the window's steps, then an empty window.
        Reads every device value: call it once the device has caught up."""
        steps, window = to_host((self._steps, self._window))
        self._steps, self._window = [], []
        counts = [m.pop(LABEL_COUNTS) for m in window if LABEL_COUNTS in m]
        shares = label_shares([sum(col) for col in zip(*counts)], self.label_names) if counts else {}
        keys: list[str] = []
        for m in window:
            keys += [k for k in m if k not in keys]
        means = {k: rounded(mean([m[k] for m in window if k in m]), DIGITS.get(k, DEFAULT_DIGITS)) for k in keys}
        rows = []
        for s in steps:
            row = {"kind": "train", "step": s["step"], "loss": s["loss"], "grad_norm": s["grad_norm"], "lr": s["lr"],
                   "tokens": s["step"] * tokens_per_step, "tokens_per_s": round(tokens_per_s, 1)}
            if s.get("total"):
                row["kept_fraction"] = round(s["kept"] / s["total"], 4)
            if "backward_ms" in means:
                row["backward_ms"] = means["backward_ms"]
            row.update(rounded(s["extras"]))
            row.update({k: v for k, v in means.items() if k != "backward_ms"})
            row.update(shares)
            rows.append(row)
        return rows


def tensor_means(dicts: Iterable[dict[str, torch.Tensor | float]]) -> dict[str, torch.Tensor | float]:
    """Key-wise mean of same-keyed dicts, left on the device (nothing read back)."""
    dicts = list(dicts)
    return {k: sum(d[k] for d in dicts) / len(dicts) for k in dicts[0]}
