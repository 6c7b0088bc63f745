"""FIRE reinitialisation: replace each Linear weight by its polar factor, scaled.

``W <- sqrt(d_out / d_in) * W (W^T W)^(-1/2)`` (FIRE, arXiv 2602.08040): the
nearest matrix with all singular values equal, keeping the directions the
network has learned while restoring a well-conditioned scale -- used to regain
plasticity before continual training on new data.

The polar factor comes from Newton-Schulz iterations ``X <- 1.5 X - 0.5 X X^T X``
(started at ``W / ||W||_F``, so every singular value is in (0, 1]), run until the
orthogonality error ``||X^T X - I||_F / sqrt(n)`` (``X X^T`` for wide matrices)
is below ``tol``; if they have not converged after ``max_iters`` (tiny singular
values converge slowly), an SVD gives the exact ``U V^T``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn as nn


def orthogonality_error(x: torch.Tensor) -> float:
    """``||X^T X - I||_F / sqrt(n)`` with ``n = min(shape)`` (the Gram matrix of the short side)."""
    gram = x.t() @ x if x.shape[0] >= x.shape[1] else x @ x.t()
    n = gram.shape[0]
    return float((gram - torch.eye(n, dtype=gram.dtype, device=gram.device)).norm() / math.sqrt(n))


def polar_factor(w: torch.Tensor, tol: float = 1e-4, max_iters: int = 60) -> tuple[torch.Tensor, dict]:
    """``(U V^T, info)`` for ``w = U S V^T``, computed in float32 (or float64)."""
    x = w.double() if w.dtype == torch.float64 else w.float()
    x = x / x.norm().clamp(min=1e-30)
    info = {"method": "newton_schulz", "iterations": 0}
    tall = x.shape[0] >= x.shape[1]
    for i in range(max_iters):
        err = orthogonality_error(x)
        if err < tol:
            info["iterations"] = i
            info["orthogonality_error"] = err
            return x, info
        x = 1.5 * x - 0.5 * (x @ (x.t() @ x) if tall else (x @ x.t()) @ x)
    err = orthogonality_error(x)
    if err < tol:
        info.update(iterations=max_iters, orthogonality_error=err)
        return x, info
    u, _, vh = torch.linalg.svd(w.double() if w.dtype == torch.float64 else w.float(), full_matrices=False)
    x = u @ vh
    info.update(method="svd", iterations=max_iters, orthogonality_error=orthogonality_error(x))
    return x, info


@torch.no_grad()
def reinitialize(
    model: nn.Module,
    tol: float = 1e-4,
    max_iters: int = 60,
    include: Callable[[str, nn.Linear], bool] | None = None,
) -> list[dict]:
    """Apply FIRE to every ``nn.Linear`` of ``model`` (those ``include(name, module)``
    accepts) in place. Returns one stats dict per layer: name, shape, method,
    iterations, orthogonality error (of the polar factor), scale and the
    relative change of the weight."""
    stats = []
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.Linear) or (include is not None and not include(name, mod)):
            continue
        w = mod.weight
        d_out, d_in = w.shape
        q, info = polar_factor(w, tol, max_iters)
        scale = math.sqrt(d_out / d_in)
        new = (q * scale).to(w.dtype)
        change = float((new.double() - w.double()).norm() / w.double().norm().clamp(min=1e-30))
        w.copy_(new)
        stats.append({"name": name, "shape": [d_out, d_in], "scale": scale, "relative_change": change, **info})
    return stats
