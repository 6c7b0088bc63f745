"""Math on kept rows that the block adapters share: row gathers, weight
gradients, the RMSNorm and RoPE backward, and the compiled-piece cache."""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..model import upcast


def rows(t: torch.Tensor, kidx: torch.Tensor) -> torch.Tensor:
    """Kept tokens' rows of a token-major ``[B, T, ...]`` tensor: ``[K, ...]``.
    Inside compiled pieces this gather fuses into the kernel that reads it."""
    return t.flatten(0, 1).index_select(0, kidx)


def wgrad(dy: torch.Tensor, x: torch.Tensor, f32: bool) -> torch.Tensor:
    """A weight's gradient ``dy^T x``; with ``f32`` (16-bit CUDA operands, float32
    master weights) cuBLAS writes it in float32 directly: casting afterwards
    costs a separate copy kernel per weight (direct_copy_kernel in
    bench/results/collider_step_compact_1b_h200.json)."""
    return torch.mm(dy.t(), x, out_dtype=torch.float32) if f32 else dy.t() @ x


def wgrad_in_float32(weight: torch.Tensor, compute_dtype: torch.dtype) -> bool:
    """Whether :func:`wgrad` should write ``weight``'s gradient in float32 directly."""
    return weight.is_cuda and compute_dtype in (torch.float16, torch.bfloat16) and weight.dtype == torch.float32


def rmsnorm_backward(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of ``y = x / sqrt(mean(x^2) + eps) * w`` for rows ``x`` [K, D]:
    returns ``(dx, dw)`` in the float32/float64 compute precision."""
    x = upcast(x)
    dy = dy.to(x.dtype)
    r = torch.rsqrt(x.square().mean(-1, keepdim=True) + eps)
    xhat = x * r
    dw = (dy * xhat).sum(0)
    dxhat = dy * weight.to(x.dtype)
    dx = r * (dxhat - xhat * (dxhat * xhat).mean(-1, keepdim=True))
    return dx, dw


def swiglu_backward(df: torch.Tensor, g: torch.Tensor, u: torch.Tensor, dtype: torch.dtype
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients ``(dg, du)`` in ``dtype`` of ``f = silu(g) * u`` for ``df``,
    computed in float32 (float64 stays): ``du = df silu(g)``,
    ``dg = df u sigmoid(g) (1 + g (1 - sigmoid(g)))``."""
    df, gf, uf = upcast(df), upcast(g), upcast(u)
    sig = torch.sigmoid(gf)
    return (df * uf * sig * (1 + gf * (1 - sig))).to(dtype), (df * gf * sig).to(dtype)


def rope_inverse(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Transpose of :func:`~sparsetrain.model.apply_rope` (a rotation by the opposite angle)."""
    x1, x2 = upcast(x).chunk(2, dim=-1)
    return torch.cat((x1 * cos + x2 * sin, -x1 * sin + x2 * cos), dim=-1).type_as(x)


_compiled: dict[Callable, Callable] = {}


def piece(fn: Callable, compile: bool) -> Callable:
    """``fn`` (a function of tensors only), compiled on first use when asked.

    Backward pieces see a new kept count K most steps. torch.compile's default
    (automatic dynamic) recompiles once with K symbolic and every other size
    and stride fixed. ``dynamic=True`` would make the widths and strides
    symbolic as well, and the fused kept-row gathers then lose their vector
    loads, which slowed the whole compiled backward
    (bench/results/collider_step_dynamic_shapes_h200.json)."""
    if not compile:
        return fn
    if fn not in _compiled:
        _compiled[fn] = torch.compile(fn)
    return _compiled[fn]
