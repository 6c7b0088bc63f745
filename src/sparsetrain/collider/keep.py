"""Which tokens a Collider backward keeps.

The keep mask travels with the loss: :func:`~sparsetrain.collider.masked_cross_entropy`
leaves ``(keep, kidx, grad_rows)`` in the :class:`~sparsetrain.collider.loss.RowGradSlot`
its logits carry, and the first backward node of that forward takes the mask
from there (:class:`KeepResolver`). :func:`filter` is optional: when given, its
mask must agree with the loss's; with no kept-rows loss it supplies the mask
(for any other loss on the logits or hidden states); with neither, every token
is kept (dense gradients).

The filter stack is process-wide, not thread-local: autograd runs CUDA backward
nodes on its own worker thread, which would not see a thread-local set by the caller.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from ..selection.select import kept_indices
from .loss import is_same_tensor

_filters: list[torch.Tensor | None] = []
_lock = threading.Lock()


@contextlib.contextmanager
def filter(keep: torch.Tensor | None) -> Iterator[None]:
    """Backward passes inside this block keep only the ``keep`` tokens ([B, T] bool).

    Optional: a Collider backward takes its mask from the kept-rows loss. When
    both are given they must agree (same mask, or equal values), else the
    backward raises. ``None`` keeps every token. Nests; restores on exit.
    """
    with _lock:
        _filters.append(keep)
    try:
        yield
    finally:
        with _lock:
            _filters.pop()


def _filter_state() -> tuple[bool, torch.Tensor | None]:
    """``(given, keep)`` of the innermost :func:`filter`."""
    with _lock:
        return (True, _filters[-1]) if _filters else (False, None)


@dataclass
class KeptRows:
    """The kept tokens of one backward: ``keep`` ([B, T] bool, or None: all) and
    their sorted flat indices ``kidx`` (``b * T + t``)."""

    keep: torch.Tensor | None
    kidx: torch.Tensor
    shape: tuple[int, int]
    _positions: tuple[torch.Tensor, torch.Tensor] | None = field(default=None, repr=False)

    @property
    def count(self) -> int:
        return self.kidx.numel()

    @property
    def tokens(self) -> int:
        return self.shape[0] * self.shape[1]

    @property
    def positions(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(kb, kt)``: batch row and position of each kept token."""
        if self._positions is None:
            T = self.shape[1]
            self._positions = (self.kidx // T, self.kidx % T)
        return self._positions

    def rows(self, t: torch.Tensor) -> torch.Tensor:
        """The kept rows ``[K, ...]`` of a token-major ``[B, T, ...]`` tensor."""
        return t.flatten(0, 1).index_select(0, self.kidx)


def _same_mask(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same object (no host sync), else equal shape, device and values."""
    return a is b or (a.shape == b.shape and a.device == b.device and bool(torch.equal(a, b)))


def _check_filter(loss_keep: torch.Tensor) -> None:
    given, keep = _filter_state()
    if not given:
        return
    if keep is None:
        if not bool(loss_keep.all()):
            raise ValueError("collider.filter(None) keeps every token, but the loss was computed on a keep mask that "
                             "drops some: pass the loss's mask to filter, or leave filter out")
    elif not _same_mask(keep, loss_keep):
        raise ValueError("collider.filter was given a keep mask that differs from the one the loss was computed "
                         "with: pass the same mask, or leave filter out (the loss's mask is used)")


class KeepResolver:
    """Finds the keep mask of one forward's backward, once per backward.

    ``slot``: where the kept-rows loss leaves ``(keep, kidx, grad_rows)``. The
    first backward node to run calls :meth:`begin` (the logits' node) or
    :meth:`resolve` (any other); the last calls :meth:`finish`.
    """

    def __init__(self, slot) -> None:
        self.slot = slot
        self.kept: KeptRows | None = None
        self.loss_rows: list[torch.Tensor] = []  # the kept-rows losses' [K, V] logit gradients
        self.loss_markers: list[torch.Tensor] = []  # the zero gradients those losses gave autograd instead

    def begin(self, shape: tuple[int, int], device: torch.device) -> KeptRows:
        """Take the loss's mask and rows from the slot (a new backward starts here)."""
        items, self.slot.items = self.slot.items, []
        self.loss_markers, self.slot.markers = self.slot.markers, []
        if items:
            keep, kidx = items[0][0], items[0][1]
            for other, _, _ in items[1:]:
                if not _same_mask(other, keep):
                    raise ValueError("two kept-rows losses on one Collider forward used different keep masks; "
                                     "add the losses first and call backward once per mask")
            _check_filter(keep)
        else:
            keep = _filter_state()[1]
            kidx = None
        if keep is not None and tuple(keep.shape) != tuple(shape):
            raise ValueError(f"keep mask shape {tuple(keep.shape)} does not match the batch {tuple(shape)}")
        if kidx is None:
            kidx = kept_indices(keep) if keep is not None else torch.arange(shape[0] * shape[1], device=device)
            if kidx.numel() == 0:
                raise ValueError("Collider keep mask keeps no token: nothing to learn from in this batch")
        self.kept = KeptRows(keep, kidx, tuple(shape))
        self.loss_rows = [rows for _, _, rows in items]
        return self.kept

    def resolve(self, shape: tuple[int, int], device: torch.device) -> KeptRows:
        """The kept rows of the running backward (found now if no node has yet)."""
        return self.kept if self.kept is not None else self.begin(shape, device)

    def finish(self) -> None:
        self.kept, self.loss_rows, self.loss_markers = None, [], []

    def logit_rows(self, dlogits: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
        """The logits' gradient at the kept rows, ``[K, V]`` in ``dtype``: the
        kept-rows losses' rows plus the kept rows of autograd's ``dlogits``
        when it is a real gradient (not the zero a kept-rows loss returned)."""
        kept = self.kept
        if kept is None:
            raise RuntimeError("logit_rows before the keep mask was resolved")
        dl = None
        if dlogits is not None and not any(is_same_tensor(dlogits, m) for m in self.loss_markers):
            dl = kept.rows(dlogits).to(dtype)
        for r in self.loss_rows:
            dl = r.to(dtype) if dl is None else dl + r.to(dtype)
        if dl is None:  # neither: a zero gradient
            V = dlogits.shape[-1] if dlogits is not None else 0
            dl = torch.zeros(kept.count, V, dtype=dtype, device=kept.kidx.device)
        return dl
