"""The ``relu2_24`` FFN on sparse tensor cores (cuSPARSELt through torch), for
the ``transposable`` method.

Forward and backward of ``y = S(relu(x W_up^T)^2) W_down^T``, six GEMMs of which
four take a 2:4 operand:

==========================  =====================================  ========
product                     operand layout                         kind
==========================  =====================================  ========
``u = x W_up^T``            dense                                  dense
``y = s W_down^T``          ``s`` [N, h], 2:4 along h              sparse
``ds = dy W_down``          dense                                  dense
``dW_down^T = s^T dy``      ``s^T`` [h, N], 2:4 along N            sparse
``dx = du W_up``            ``du`` [N, h], 2:4 along h             sparse
``dW_up^T... = du^T x``     ``du^T`` [h, N], 2:4 along N           sparse
==========================  =====================================  ========

``_sparse_semi_structured_tile`` picks the transposable pattern of ``s``
greedily per 4x4 tile and packs both ``s`` and ``s^T`` in one pass, so the
weight gradients use exactly the forward's ``s``. ``du = ds * 2 relu(u)``
restricted to the forward mask (``_sparse_semi_structured_apply_dense`` with the
tile kernel's bitmask) has its support inside a feasible pattern, so packing
it again with the greedy tile kernel is lossless. The result is the
masked-dense ``transposable`` path of ``ffn.py`` to bf16 rounding, which a GPU
test checks.

Requirements: CUDA with cuSPARSELt, bf16/fp16, token count and both widths
multiples of 64; :func:`supported` says whether a call can take this path.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F


@functools.cache
def cusparselt_available() -> bool:
    try:
        from torch.sparse import SparseSemiStructuredTensorCUSPARSELT  # noqa: F401

        return torch.cuda.is_available() and torch.backends.cusparselt.is_available() \
            and torch.cuda.get_device_capability() >= (8, 0)
    except (ImportError, AttributeError, RuntimeError):
        return False


def supported(x: torch.Tensor, w_up: torch.Tensor) -> bool:
    """Whether ``x[N, d] @ w_up[h, d]^T`` can run the cuSPARSELt path."""
    N, d = x.shape
    h = w_up.shape[0]
    return x.is_cuda and cusparselt_available() and N % 64 == 0 and d % 64 == 0 and h % 64 == 0


# torch's tile kernel chooses the transposable pattern and writes a packed
# layout reverse-engineered for older cuSPARSELt releases. On cuSPARSELt 0.8
# (torch 2.11, H200) products with that packing are wrong (relative error ~1,
# bench/cusparselt_check.py), so by default only its pattern is used and the
# packing is cuSPARSELt's own ``_cslt_compress``: correct, but a separate and
# slower pass. ``PACKING = "tile"`` restores the single-kernel packing where it is right.
PACKING = "compress"


def _pack(dense: torch.Tensor, algorithm: str):
    """Prune ``dense`` to the greedy transposable 2:4 pattern and pack it (and its
    transpose) for cuSPARSELt."""
    from torch.sparse import SparseSemiStructuredTensorCUSPARSELT as CSLT

    tiled = CSLT.prune_dense_static_sort(dense, algorithm=algorithm)
    if PACKING == "tile":
        return tiled
    pruned = torch._sparse_semi_structured_apply_dense(dense, tiled.compressed_swizzled_bitmask)
    return CSLT(dense.shape, packed=torch._cslt_compress(pruned), meta=None,
                packed_t=torch._cslt_compress(pruned.t().contiguous()), meta_t=None,
                compressed_swizzled_bitmask=tiled.compressed_swizzled_bitmask, requires_grad=False)


# cuSPARSELt's default algorithm can be slower than the dense GEMM; the best one
# per problem shape is searched once (``_cslt_sparse_mm_search``) and reused.
_ALG_IDS: dict[tuple, int | None] = {}


def sparse_mm(s, dense: torch.Tensor) -> torch.Tensor:
    """``s @ dense`` for a packed 2:4 ``s`` (or its ``.t()``), with the searched algorithm."""
    key = (tuple(s.shape), tuple(dense.shape), dense.stride(), dense.dtype)
    if key not in _ALG_IDS:
        try:
            _ALG_IDS[key] = int(torch._cslt_sparse_mm_search(s.packed, dense))
        except (AttributeError, RuntimeError, TypeError):
            _ALG_IDS[key] = None  # no search op here: the subclass's default algorithm
    alg = _ALG_IDS[key]
    if alg is None:
        return torch.mm(s, dense)
    return torch._cslt_sparse_mm(s.packed, dense, alg_id=alg)


class Sparse24FFNCusparselt(torch.autograd.Function):
    """``x[N, d]`` (bf16/fp16) -> ``y[N, d]``; weights in any float dtype (cast to ``x``'s)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor, stats: dict | None = None,
                sparse_grad_products: bool = True):  # type: ignore[override]
        # autocast would run relu()^2 in float32; the tile kernel wants 16-bit
        with torch.autocast("cuda", enabled=False):
            return Sparse24FFNCusparselt._forward(ctx, x, w_up, w_down, stats, sparse_grad_products)

    @staticmethod
    def _forward(ctx, x, w_up, w_down, stats, sparse_grad_products):
        dt = x.dtype
        wu, wd = w_up.to(dt), w_down.to(dt)
        u = F.linear(x, wu)
        a = F.relu(u).square()
        s = _pack(a, "")  # greedy by value: a >= 0, so by magnitude
        y = sparse_mm(s, wd.t().contiguous())
        if stats is not None:  # the dense view of s, only when asked (the trainer's log steps)
            from .sparsify import sparsity_stats

            stats.update(sparsity_stats(a, torch._sparse_semi_structured_apply_dense(a, s.compressed_swizzled_bitmask)))
        ctx.save_for_backward(x, u, wu, wd)
        ctx.s = s  # a tensor subclass; kept on ctx (save_for_backward wants plain tensors)
        ctx.weight_dtypes = (w_up.dtype, w_down.dtype)
        ctx.sparse_grad_products = sparse_grad_products
        return y

    @staticmethod
    def backward(ctx, dy: torch.Tensor):  # type: ignore[override]
        with torch.autocast("cuda", enabled=False):
            return Sparse24FFNCusparselt._backward(ctx, dy)

    @staticmethod
    def _backward(ctx, dy):
        x, u, wu, wd = ctx.saved_tensors
        s = ctx.s
        dy = dy.to(x.dtype).contiguous()
        ds = dy @ wd  # [N, h], dense
        g = ds * (2.0 * F.relu(u))
        g = torch._sparse_semi_structured_apply_dense(g, s.compressed_swizzled_bitmask)
        d_down = sparse_mm(s.t(), dy).t()  # (s^T dy)^T = dy^T s: [d, h]
        if ctx.sparse_grad_products:
            du = _pack(g, "largest_abs_values_greedy")  # lossless: support inside the forward's pattern
            dx = sparse_mm(du, wu)  # [N, d]
            d_up = sparse_mm(du.t(), x)  # [h, d]
        else:  # packing du costs about what its two sparse products save at these sizes
            dx = g @ wu
            d_up = g.t() @ x
        ctx.s = None
        return dx, d_up.to(ctx.weight_dtypes[0]), d_down.to(ctx.weight_dtypes[1]), None, None


