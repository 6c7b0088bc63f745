"""Per-token importance scores from logits and targets.

Alignment, once for all of sparsetrain: ``targets[..., t]`` is the token that
``logits[..., t, :]`` should predict (the next-token shift is already done, as
the data loader and :class:`~sparsetrain.model.GPT` do it). Hugging Face style
``labels`` equal to the inputs go through :func:`shift_labels` first. Positions
whose target is ``ignore_index`` (-100) are never scored: their score is
``-inf``, so no selector can pick them.

Every score is "higher = more worth a gradient":

========== ===============================================================
``loss``     cross-entropy ``NLL = lse - x_target``
``entropy``  ``H = lse - sum_v p_v x_v``
``margin``   ``1 - (p1 - p2)`` with ``p1 >= p2`` the two largest probabilities
``combined`` CGGR's ``(H - p1) + (1 - (p1 - p2)) + NLL``
``collider`` per-sequence min-max normalised loss ``(l - min) / (max - min + eps)``
``excess``   ``NLL - NLL_ref``: loss above a reference model's (Rho-1)
``reference`` ``-NLL_ref``: what the reference model finds easiest, whatever
             the model's own loss (a perplexity filter, per token or, with a
             span, per block; it does not drift as the model learns, which
             ``excess`` does)
``gradnorm`` ``1 - p_target = 1 - exp(-NLL)``: within a factor of sqrt(2) of
             the norm of the loss's gradient in the logits, ``||softmax - onehot||``
             (``(1 - p_t)^2 <= ||.||^2 <= 2 (1 - p_t)^2``); the sampling weight
             of the ``importance`` method
========== ===============================================================

All of them derive from five per-row numbers, :class:`RowStats`, which one
streaming pass over the vocabulary yields (the Triton kernel on CUDA; a
chunked torch path elsewhere, never holding more than ``chunk_rows`` rows of
float32 at a time).
"""

from __future__ import annotations

import torch

from ..errors import DivergedError
from ..numerics import IGNORE_INDEX
from .row_stats import RowStats

SCORES = ("loss", "entropy", "margin", "combined", "collider", "excess", "reference", "gradnorm")
REFERENCE_SCORES = ("excess", "reference")  # the scores that read a reference model's per-token losses
NONNEGATIVE_SCORES = ("loss", "gradnorm")  # the scores the importance method can sample in proportion to
COLLIDER_EPS = 1e-6


def raise_if_nonfinite(stats: RowStats) -> None:
    """Raise :class:`~sparsetrain.errors.DivergedError` when any scored row's logits
    (or reference loss) held NaN or Inf: no score can rank such a token. Reads the
    count on the host (a sync, for CUDA tensors)."""
    if stats.nonfinite is None:
        return
    n = int(stats.nonfinite)
    if n:
        raise nonfinite_error(n, int(stats.valid.sum()))


def nonfinite_error(n: int, total: int) -> DivergedError:
    """The error for ``n`` of ``total`` scored tokens with NaN/Inf logits."""
    return DivergedError(f"logits hold NaN or Inf in {n} of {total} scored tokens; "
                         "token scores cannot rank them (the model has diverged)")


def shift_labels(labels: torch.Tensor, ignore_index: int | float = IGNORE_INDEX) -> torch.Tensor:
    """Turn HF-style ``labels`` (= input ids) into aligned targets: position t
    predicts ``labels[t + 1]``; the last position has nothing to predict (it
    holds ``ignore_index``). Also shifts per-label values, such as losses."""
    out = torch.full_like(labels, ignore_index)
    out[..., :-1] = labels[..., 1:]
    return out


def row_stats_torch(
    logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = IGNORE_INDEX, chunk_rows: int = 1024
) -> RowStats:
    """Reference implementation: exact, in float32, ``chunk_rows`` rows at a time."""
    shape = logits.shape[:-1]
    flat = logits.reshape(-1, logits.shape[-1])
    tgt = targets.reshape(-1)
    if tgt.numel() != flat.shape[0]:
        raise ValueError(f"targets {tuple(targets.shape)} do not match logits {tuple(logits.shape)}")
    n = flat.shape[0]
    dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32  # float64 in, float64 out (tests)
    out = {k: torch.empty(n, device=logits.device, dtype=dtype) for k in ("lse", "nll", "entropy", "p1", "p2")}
    valid = tgt != ignore_index
    for i in range(0, n, chunk_rows):
        x = flat[i : i + chunk_rows].to(dtype)
        lse = torch.logsumexp(x, -1)
        p = torch.exp(x - lse[:, None])
        t = tgt[i : i + chunk_rows]
        v = valid[i : i + chunk_rows]
        x_t = x.gather(1, torch.where(v, t, 0)[:, None]).squeeze(1)
        top = x.topk(2, dim=-1).values if x.shape[-1] > 1 else torch.cat([x, torch.full_like(x, float("-inf"))], -1)
        out["lse"][i : i + chunk_rows] = lse
        out["nll"][i : i + chunk_rows] = torch.where(v, lse - x_t, 0.0)
        out["entropy"][i : i + chunk_rows] = lse - (p * x).sum(-1)
        out["p1"][i : i + chunk_rows] = torch.exp(top[:, 0] - lse)
        out["p2"][i : i + chunk_rows] = torch.exp(top[:, 1] - lse)
    return RowStats(**{k: v.view(shape) for k, v in out.items()}, valid=valid.view(shape))


def row_stats(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> RowStats:
    """Per-token statistics; the fused Triton kernel on CUDA, torch elsewhere."""
    if logits.is_cuda:
        from .triton_scores import row_stats_triton, triton_available

        if triton_available():
            return row_stats_triton(logits, targets, ignore_index)
    return row_stats_torch(logits, targets, ignore_index)


def collider_normalize(loss: torch.Tensor, valid: torch.Tensor, eps: float = COLLIDER_EPS) -> torch.Tensor:
    """Min-max normalise ``loss`` within each sequence (last dim) over valid
    positions: ``(l - min) / (max - min + eps)``; invalid positions get -inf."""
    big = torch.finfo(loss.dtype).max
    lo = torch.where(valid, loss, big).amin(-1, keepdim=True)
    hi = torch.where(valid, loss, -big).amax(-1, keepdim=True)
    out = (loss - lo) / (hi - lo + eps)
    return out.masked_fill(~valid, float("-inf"))


def scores_from_stats(kind: str, stats: RowStats, ref_nll: torch.Tensor | None = None) -> torch.Tensor:
    """Importance of each token (higher = keep), ``-inf`` where the target is ignored."""
    if kind == "loss":
        s = stats.nll
    elif kind == "entropy":
        s = stats.entropy
    elif kind == "margin":
        s = 1.0 - (stats.p1 - stats.p2)
    elif kind == "combined":
        s = (stats.entropy - stats.p1) + (1.0 - (stats.p1 - stats.p2)) + stats.nll
    elif kind == "collider":
        return collider_normalize(stats.nll, stats.valid)
    elif kind == "gradnorm":
        s = -torch.expm1(-stats.nll)  # 1 - p_target, exact near 0
    elif kind in REFERENCE_SCORES:
        if ref_nll is None:
            raise ValueError(f"score {kind!r} needs the reference model's per-token losses (ref_nll)")
        if ref_nll.shape != stats.nll.shape:
            raise ValueError(f"ref_nll shape {tuple(ref_nll.shape)} does not match tokens {tuple(stats.nll.shape)}")
        ref = ref_nll.to(stats.nll.device, stats.nll.dtype)
        s = stats.nll - ref if kind == "excess" else -ref
    else:
        raise ValueError(f"unknown score {kind!r} (choose from {', '.join(SCORES)})")
    return s.masked_fill(~stats.valid, float("-inf"))


@torch.no_grad()
def score_tokens(
    kind: str,
    logits: torch.Tensor,
    targets: torch.Tensor,
    ref_nll: torch.Tensor | None = None,
    ignore_index: int = IGNORE_INDEX,
) -> tuple[torch.Tensor, RowStats]:
    """``(scores, stats)`` for ``logits [..., V]`` and aligned ``targets [...]``.

    Never builds a graph: scores choose which tokens get a gradient, they are
    not part of the objective.

    A scored row (target not ignored) whose logits hold NaN or +Inf (or are all
    -Inf) raises :class:`~sparsetrain.errors.DivergedError`: at once for CPU
    tensors; for CUDA tensors, which are read without a host sync, when the
    selection's statistics are first read (``stats.nonfinite`` holds the count).
    -Inf entries in a row (a masked vocabulary) are fine.
    """
    if kind not in SCORES:
        raise ValueError(f"unknown score {kind!r} (choose from {', '.join(SCORES)})")
    stats = row_stats(logits.detach(), targets, ignore_index)
    bad = ~torch.isfinite(stats.lse)
    if ref_nll is not None and ref_nll.shape == bad.shape:
        bad |= ~torch.isfinite(ref_nll.to(bad.device))
    stats.nonfinite = (bad & stats.valid).sum()
    if not logits.is_cuda:
        raise_if_nonfinite(stats)
    return scores_from_stats(kind, stats, ref_nll), stats


def span_mean(scores: torch.Tensor, span: int) -> torch.Tensor:
    """Each position's score replaced by the mean over the valid positions of its
    block of ``span`` consecutive positions (blocks laid from the start of each
    sequence, the last one possibly shorter), so a selection keeps or drops whole
    spans: a document of noise is dropped as one, not token by token. Ignored
    positions (``-inf``) stay ``-inf``; a block with none valid is ``-inf``."""
    if span < 1:
        raise ValueError(f"span must be >= 1, got {span}")
    if span == 1:
        return scores
    T = scores.shape[-1]
    pad = -T % span
    valid = scores > float("-inf")
    x = torch.where(valid, scores, 0.0)
    if pad:
        x = torch.nn.functional.pad(x, (0, pad))
        valid_p = torch.nn.functional.pad(valid, (0, pad))
    else:
        valid_p = valid
    blocks = x.reshape(*x.shape[:-1], -1, span)
    counts = valid_p.reshape(*x.shape[:-1], -1, span).sum(-1, keepdim=True)
    means = (blocks.sum(-1, keepdim=True) / counts.clamp(min=1)).masked_fill(counts == 0, float("-inf"))
    out = means.expand_as(blocks).reshape(x.shape)[..., :T]
    return out.masked_fill(~valid, float("-inf"))

