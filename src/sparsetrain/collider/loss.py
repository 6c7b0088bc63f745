"""Mean cross-entropy over kept tokens, computed on the kept rows only.

The plain way (``F.cross_entropy(logits[keep].float(), ...)``) gathers the
kept logits, upcasts them to float32, and in backward scatters the gradient
into a zeroed ``[B, T, V]`` tensor that the Collider engine then gathers
again. At a 32k vocabulary and 16k tokens that is about 5 GB of memory
traffic per step for a few MB of useful numbers.

:class:`_KeptCrossEntropy` reads each kept row once in forward (log-sum-exp
in float32, never materialised) and once in backward: on CUDA through the
Triton kernels of :mod:`sparsetrain.cross_entropy` (the row-statistics kernel
and the gradient kernel, both reading the kept rows in place by index),
elsewhere (or with the kernel policy's fused cross-entropy off) in plain torch, which on CUDA
is compiled when the engine compiles. When ``logits`` came
out of a :class:`~sparsetrain.collider.ColliderModel` or a model made by
``collider.apply`` (it carries a :class:`RowGradSlot`), the backward leaves
the keep mask, its kept indices and the compact ``[K, V]`` gradient in the
slot for the model's backward, and returns a stride-0 zero tensor to
autograd, so the full-size gradient is never written. Any other logits get
the ordinary full gradient.
"""

from __future__ import annotations

import torch

from .. import cross_entropy as ce
from .. import kernels
from ..model import IGNORE_INDEX, upcast
from ..selection.select import cached_kept_indices, kept_indices

SLOT_ATTR = "_sparsetrain_row_grad_slot"


def zero_gradient(like: torch.Tensor) -> torch.Tensor:
    """A stride-0 zero tensor shaped like ``like``: what autograd carries where the
    real gradient travels as compact rows beside it (no ``[N, ...]`` memory)."""
    return torch.zeros((), dtype=like.dtype, device=like.device).expand(like.shape)


def is_same_tensor(a: torch.Tensor, b: torch.Tensor) -> bool:
    """``a`` is ``b`` as autograd handed it on (same memory, shape and strides)."""
    return a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.stride() == b.stride() and a.dtype == b.dtype


class RowGradSlot:
    """Where a kept-rows loss leaves ``(keep, kidx, grad_rows)`` for the backward
    of the model that made its logits, and the stride-0 zero gradients it
    returned to autograd in their place (so the model's backward can tell them
    from a real gradient, which it adds)."""

    __slots__ = ("compile", "items", "markers")

    def __init__(self, compile: bool = False) -> None:
        self.compile = compile
        self.items: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self.markers: list[torch.Tensor] = []


def _ce_forward(logits2d: torch.Tensor, kidx: torch.Tensor, targets1d: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-kept-row ``(lse, loss)`` in float32 (float64 stays), rows without a
    target at loss 0, and the number of rows with one."""
    rows = upcast(logits2d.index_select(0, kidx))
    t = targets1d.index_select(0, kidx)
    valid = t != IGNORE_INDEX
    lse = torch.logsumexp(rows, dim=-1)
    picked = rows.gather(1, torch.where(valid, t, 0)[:, None]).squeeze(1)
    return lse, torch.where(valid, lse - picked, 0.0), valid.sum()


def _ce_forward_fused(logits2d: torch.Tensor, kidx: torch.Tensor, targets1d: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`_ce_forward` by the row-statistics kernel, reading the kept rows in place."""
    from ..selection.triton_scores import row_stats_triton

    stats = row_stats_triton(logits2d, targets1d, IGNORE_INDEX, rows=kidx)
    return stats.lse, stats.nll, stats.valid.sum()


def _ce_backward(logits2d: torch.Tensor, kidx: torch.Tensor, targets1d: torch.Tensor, lse: torch.Tensor,
                 scale: torch.Tensor) -> torch.Tensor:
    """``scale * (softmax - onehot)`` on kept rows with a target, 0 on the others, in the logits' dtype."""
    return ce.cross_entropy_grad_reference(logits2d, targets1d, lse, scale, rows=kidx)


def _ce_backward_fused(logits2d: torch.Tensor, kidx: torch.Tensor, targets1d: torch.Tensor, lse: torch.Tensor,
                       scale: torch.Tensor) -> torch.Tensor:
    """:func:`_ce_backward` by the gradient kernel, reading the kept rows in place."""
    return ce.cross_entropy_grad(logits2d, targets1d, lse, scale, rows=kidx)


def _fused(logits2d: torch.Tensor) -> bool:
    """The loss's Triton kernels (``sparsetrain.cross_entropy``'s, reading kept rows
    in place: one read of each kept row per direction, at any kept count without
    recompiling) run on CUDA; elsewhere, or with the kernel policy's ``fused_cross_entropy``
    off, plain torch.
    They beat plain torch eagerly and at the larger vocabulary compiled too
    (bench/results/cross_entropy_kept_rows_h200.json)."""
    return kernels.current().fused_cross_entropy and logits2d.is_cuda and ce.fused_ok(logits2d)


_compiled: dict[str, object] = {}


def _fn(name: str, compile: bool, fused: bool = False):
    """The forward or backward: the kernels' (which need no compiling), else plain
    torch, compiled once when asked."""
    if fused:
        return {"forward": _ce_forward_fused, "backward": _ce_backward_fused}[name]
    fn = {"forward": _ce_forward, "backward": _ce_backward}[name]
    if not compile:
        return fn
    if name not in _compiled:  # automatic dynamic: only the kept count becomes symbolic (engine._piece)
        _compiled[name] = torch.compile(fn)
    return _compiled[name]


class _KeptCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor, keep: torch.Tensor, kidx: torch.Tensor,  # type: ignore[override]
                weights: torch.Tensor | None, slot: RowGradSlot | None) -> torch.Tensor:
        logits2d = logits.reshape(-1, logits.shape[-1])
        compile = slot is not None and slot.compile and logits.is_cuda
        fused = _fused(logits2d)
        lse, loss_rows, count = _fn("forward", compile, fused)(logits2d, kidx, targets.reshape(-1))
        wk = None if weights is None else weights.reshape(-1).index_select(0, kidx).to(lse.dtype)
        ctx.save_for_backward(logits, targets, keep, kidx, lse, count, wk)
        ctx.slot, ctx.compile, ctx.fused = slot, compile, fused
        return (loss_rows if wk is None else loss_rows * wk).sum() / count

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        logits, targets, keep, kidx, lse, count, wk = ctx.saved_tensors
        V = logits.shape[-1]
        scale = (grad.to(lse.dtype) / count).reshape(1)
        if wk is not None:  # one scale per kept row: the backward's kernels read it per row
            scale = scale * wk
        rows = _fn("backward", ctx.compile, ctx.fused)(logits.reshape(-1, V), kidx, targets.reshape(-1), lse, scale)
        if ctx.slot is not None:
            marker = zero_gradient(logits)
            ctx.slot.items.append((keep, kidx, rows))
            ctx.slot.markers.append(marker)
            return marker, None, None, None, None, None
        full = torch.zeros(logits.shape[:-1].numel(), V, dtype=logits.dtype, device=logits.device)
        return full.index_copy_(0, kidx, rows).view(logits.shape), None, None, None, None, None


def masked_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, keep: torch.Tensor,
                         weights: torch.Tensor | None = None) -> torch.Tensor:
    """Mean cross-entropy over tokens that are kept and have a target (in float32, or float64).

    ``logits`` [B, T, V], ``targets`` [B, T] (``IGNORE_INDEX`` for none), ``keep`` [B, T] bool.
    ``weights`` [B, T] (optional): each kept token's loss and gradient are multiplied
    by its weight before the mean over the kept count, ``sum_kept w_i l_i / K``; the
    ``importance`` selection's weights make this an unbiased estimate of the mean
    loss over every token (:func:`~sparsetrain.selection.select_importance`).
    """
    if keep.shape != targets.shape or logits.shape[:-1] != targets.shape:
        raise ValueError(f"keep {tuple(keep.shape)}, targets {tuple(targets.shape)} and logits "
                         f"{tuple(logits.shape)} do not line up")
    if weights is not None and weights.shape != keep.shape:
        raise ValueError(f"weights {tuple(weights.shape)} do not match keep {tuple(keep.shape)}")
    kidx = cached_kept_indices(keep)
    if kidx is None:  # a mask from elsewhere: check it (a host sync) and find its rows
        if not bool((keep & (targets != IGNORE_INDEX)).any()):
            raise ValueError("Collider keep mask keeps no token with a target")
        kidx = kept_indices(keep)
    # else a selector's mask: it kept >= 1 token, all with targets, and its rows came with it (no sync)
    return _KeptCrossEntropy.apply(logits, targets, keep, kidx, weights, getattr(logits, SLOT_ATTR, None))
