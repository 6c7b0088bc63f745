"""2:4 sparsification of activations: at most 2 nonzeros in every group of 4
consecutive values along the last dimension (the hidden dimension of the FFN).

Each method returns ``(values, mask)``: the 2:4 tensor, and the bool mask of
kept positions that the backward reuses (values pruned in the forward never
get a gradient back).

* ``naive``: keep the 2 largest ``|x|`` of each group.
* ``mvue``: the unbiased estimator. Each value is kept with probability
  ``p_i`` proportional to ``|x_i|`` (capped at 1, the excess handed to the
  others) so that exactly two are kept per group, and kept values are divided
  by ``p_i``: ``E[out] = x``. Two indices are drawn by systematic sampling
  over the cumulative probabilities.
* ``soft_threshold`` (S-STE): subtract the group's larger pruned magnitude
  from the two kept ones, ``sign(x) * (|x| - t)``, then multiply by a
  per-layer scale ``beta`` (computed once by the caller and then fixed).
* ``transposable``: 2:4 along *both* dimensions of a 2-D ``[tokens, hidden]``
  tensor. Each aligned 4x4 tile keeps, of the 90 patterns with two entries in
  every row and column, the one with the largest sum of magnitudes
  (``packing.transposable_mask``). The result is 2:4 along the hidden dimension
  (the forward product's operand) and along tokens (the weight-gradient
  products' operand), so one mask serves every sparse GEMM of the FFN and the
  weight gradients stay exact. It is the pattern the GPU path's packing kernel
  chooses, bit for bit, which is why it is the method that path runs.
* ``transposable_random``: the control for ``transposable`` -- per tile one of
  the 90 patterns drawn uniformly at random, whatever the values: the same
  structure and budget with the choice left to chance (masked-dense path only).
"""

from __future__ import annotations

import torch

from ..model import upcast
from .packing import TRANSPOSABLE_PATTERNS, pattern_mask, transposable_mask

METHODS = ("naive", "mvue", "soft_threshold", "transposable", "transposable_random")


def _groups(x: torch.Tensor) -> torch.Tensor:
    if x.shape[-1] % 4:
        raise ValueError(f"the last dimension ({x.shape[-1]}) must be a multiple of 4 for 2:4 sparsity")
    return x.reshape(*x.shape[:-1], x.shape[-1] // 4, 4)


def naive_24(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep the two largest magnitudes of each group of four."""
    g = _groups(x)
    idx = g.abs().topk(2, dim=-1).indices
    mask = torch.zeros_like(g, dtype=torch.bool).scatter_(-1, idx, True)
    return (g * mask).reshape(x.shape), mask.reshape(x.shape)


def mvue_probabilities(g: torch.Tensor) -> torch.Tensor:
    """Inclusion probabilities summing to ``min(2, nonzeros)`` per group, proportional
    to ``|x|`` with any probability above 1 capped and its excess given to the rest."""
    a = upcast(g.abs())
    p = torch.zeros_like(a)
    capped = torch.zeros_like(a, dtype=torch.bool)
    for _ in range(2):  # at most two values can be capped in a group of four
        budget = 2.0 - capped.sum(-1, keepdim=True)
        free = torch.where(capped, 0.0, a)
        total = free.sum(-1, keepdim=True)
        p = torch.where(capped, 1.0, budget * free / total.clamp(min=1e-30))
        capped = capped | (p >= 1.0)
    p = p.clamp(max=1.0)
    nz = (a > 0).sum(-1, keepdim=True)
    return torch.where(nz <= 2, (a > 0).float(), p)  # groups already 2:4 keep their nonzeros


def mvue_24(x: torch.Tensor, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Unbiased 2:4: keep two values per group with probabilities ``p``, scaled by ``1/p``."""
    g = _groups(x)
    p = mvue_probabilities(g)
    c = p.cumsum(-1)
    c = c / c[..., -1:].clamp(min=1e-30) * p.sum(-1, keepdim=True).round()  # totals exactly 0, 1 or 2
    u = torch.rand(*g.shape[:-1], 1, generator=generator, device=g.device, dtype=c.dtype)
    # systematic sampling: value i is picked when a point u or u + 1 falls in (c_{i-1}, c_i]
    prev = c - p
    mask = ((prev < u) & (u <= c)) | ((prev < u + 1) & (u + 1 <= c))
    mask &= p > 0
    out = torch.where(mask, upcast(g) / p.clamp(min=1e-30), 0.0).to(x.dtype)
    return out.reshape(x.shape), mask.reshape(x.shape)


def soft_threshold_24(x: torch.Tensor, scale: float | torch.Tensor = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """S-STE: ``scale * sign(x) * (|x| - t)`` on the two kept values, ``t`` the
    group's larger pruned magnitude (its 3rd largest ``|x|``)."""
    g = _groups(x)
    a = g.abs()
    top = a.topk(3, dim=-1)
    t = top.values[..., 2:3]
    mask = torch.zeros_like(g, dtype=torch.bool).scatter_(-1, top.indices[..., :2], True)
    out = torch.where(mask, torch.sign(g) * (a - t), torch.zeros_like(g)) * scale
    return out.reshape(x.shape), mask.reshape(x.shape)


def soft_threshold_scale(x: torch.Tensor) -> float:
    """The per-layer ``beta`` minimising ``||x - beta * soft(x)||^2``: ``<x, s> / <s, s>``
    (computed once, from the first sparse batch, then kept fixed)."""
    s, _ = soft_threshold_24(x)
    num = (x.double() * s.double()).sum()
    den = (s.double() * s.double()).sum()
    return float(num / den) if den > 0 else 1.0


def transposable_24(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Transposable 2:4 of a 2-D ``x`` (columns a multiple of 4; rows are zero
    padded to one): see the module docstring."""
    if x.dim() != 2:
        raise ValueError(f"transposable 2:4 needs a 2-D [tokens, hidden] tensor, got shape {tuple(x.shape)}")
    R, C = x.shape
    _groups(x)  # checks C % 4
    pad = (-R) % 4
    mask = transposable_mask(torch.nn.functional.pad(x.abs(), (0, 0, 0, pad)))[:R]
    return x * mask, mask


def transposable_random_24(x: torch.Tensor, generator: torch.Generator | None = None
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """A uniformly random transposable pattern per 4x4 tile of a 2-D ``x``
    (rows zero padded to a multiple of 4), independent of the values."""
    if x.dim() != 2:
        raise ValueError(f"transposable 2:4 needs a 2-D [tokens, hidden] tensor, got shape {tuple(x.shape)}")
    R, C = x.shape
    _groups(x)
    Rt = (R + 3) // 4
    ids = torch.randint(0, len(TRANSPOSABLE_PATTERNS), (Rt, C // 4), generator=generator,
                        device=generator.device if generator is not None else x.device)
    mask = pattern_mask(ids.to(x.device))[:R]
    return x * mask, mask


def sparsify_24(x: torch.Tensor, method: str, scale: float = 1.0,
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Dispatch by name (see :data:`METHODS`)."""
    if method == "naive":
        return naive_24(x)
    if method == "mvue":
        return mvue_24(x, generator)
    if method == "soft_threshold":
        return soft_threshold_24(x, scale)
    if method == "transposable":
        return transposable_24(x)
    if method == "transposable_random":
        return transposable_random_24(x, generator)
    raise ValueError(f"unknown 2:4 method {method!r} (choose from {', '.join(METHODS)})")


def is_24(x: torch.Tensor) -> bool:
    """At most two nonzeros in every group of four along the last dimension."""
    return bool(((_groups(x) != 0).sum(-1) <= 2).all())


def sparsity_stats(act: torch.Tensor, sparse: torch.Tensor) -> dict[str, torch.Tensor]:
    """``activation_sparsity``: zeros in the activation before pruning;
    ``groups_already_24``: groups of four that fit 2:4 as they are;
    ``pruned_beyond_relu``: nonzero values the 2:4 step removed, as a fraction of all values.

    0-dim tensors, counted without float copies of the activation and read
    without a host sync: the trainer converts them when it logs. (As Python
    floats they cost three syncs per layer on every logged step, and under
    torch.compile a graph break each.)"""
    nz = act != 0
    n = nz.numel()
    per_group = _groups(nz).sum(-1, dtype=torch.uint8)
    return {
        "activation_sparsity": 1 - nz.sum() / n,
        "groups_already_24": (per_group <= 2).sum() / per_group.numel(),
        "pruned_beyond_relu": (nz & (sparse == 0)).sum() / n,
    }
