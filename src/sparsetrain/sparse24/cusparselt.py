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

``packing.pack_transposable`` (one Triton pass over ``u``) picks each 4x4
tile's transposable pattern from ``relu(u)^2`` and writes ``s`` and ``s^T``
packed in cuSPARSELt's own layout, so the weight gradients use exactly the
forward's ``s``. The backward calls it again with ``ds``: the same pattern
(chosen from ``u`` again), the values ``du = ds * 2 relu(u)``, packed both
ways (reading the forward's pattern ids instead of searching again). The result is the masked-dense ``transposable`` path of ``ffn.py`` to
bf16 rounding, which a GPU test checks.

Requirements: CUDA with cuSPARSELt, bf16, token count and both widths
multiples of 64; :func:`supported` says whether a call can take this path.
"""

from __future__ import annotations


import torch
import torch.nn.functional as F

from .. import kernels
from . import cslt_plans
from .custom_ops import ffn_op
from .packing import pack_transposable


# decided once for the process, a constant to torch.compile (see sparsetrain.kernels)
cusparselt_available = kernels.cusparselt_available


def supported(x: torch.Tensor, w_up: torch.Tensor) -> bool:
    """Whether ``x[N, d] @ w_up[h, d]^T`` can run the cuSPARSELt path."""
    N, d = x.shape
    h = w_up.shape[0]
    return x.is_cuda and cusparselt_available() and N % 64 == 0 and d % 64 == 0 and h % 64 == 0


# cuSPARSELt's default algorithm can be slower than the dense GEMM; the best
# configuration (algorithm, split-K and its mode) per problem is searched once
# and reused. ``torch._cslt_sparse_mm_search`` returns the algorithm alone and
# drops the split-K it found, so the full search is used where torch has it.
_CONFIGS: dict[tuple, tuple[int, int, int]] = {}


def _search(packed: torch.Tensor, dense: torch.Tensor, transpose_result: bool) -> tuple[int, int, int]:
    try:
        alg, split_k, split_k_mode, _ = torch._C._cusparselt.mm_search(packed, dense, None, None, None, transpose_result)
        return int(alg), int(split_k), int(split_k_mode)
    except (AttributeError, RuntimeError, TypeError, ValueError):
        pass
    try:
        return int(torch._cslt_sparse_mm_search(packed, dense, transpose_result=transpose_result)), 1, -1
    except (AttributeError, RuntimeError, TypeError):
        return 0, 1, -1  # no search op here: the default configuration


def sparse_mm(packed: torch.Tensor, dense: torch.Tensor, transpose_result: bool = False) -> torch.Tensor:
    """``s @ dense`` (``[M, K] x [K, N]``) for ``s`` packed in cuSPARSELt's layout,
    with the searched configuration; ``transpose_result``: return ``(s @ dense)^T``
    ``[N, M]``, written that way by the kernel.

    ``dense`` is taken row-major or column-major as it comes: torch hands any
    non-contiguous operand to cuSPARSELt as a transposed (column-major) one,
    and a transposing copy costs more than the layout saves (measured in
    bench/results/sparse24_ffn_profile_column_major_h200.json and
    sparse24_fp8_gemm_layouts_d4096_h200.json). Other strides are copied."""
    if not (dense.is_contiguous() or dense.t().is_contiguous()):
        dense = dense.contiguous()
    key = (tuple(packed.shape), tuple(dense.shape), dense.stride(), dense.dtype, transpose_result)
    if key not in _CONFIGS:
        _CONFIGS[key] = _search(packed, dense, transpose_result)
    alg, split_k, split_k_mode = _CONFIGS[key]
    return cslt_plans.sparse_mm(packed, dense, transpose_result, alg, split_k, split_k_mode)


def _forward(x: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """``(y, u, s^T packed, pattern ids)``: the output and what the backward needs."""
    with torch.autocast("cuda", enabled=False):  # the GEMMs and the packing kernel take bf16 as given
        dt = x.dtype
        u = F.linear(x, w_up.to(dt))
        packed, packed_t, pattern = pack_transposable(u)  # s and s^T, pattern from relu(u)^2
        y = sparse_mm(packed, w_down.to(dt).t())  # W_down^T: column-major, no copy
    return y, u, packed_t, pattern


def _backward(dy: torch.Tensor, x: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor, u: torch.Tensor,
              packed_t: torch.Tensor, pattern: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    with torch.autocast("cuda", enabled=False):
        dy = dy.to(x.dtype).contiguous()
        ds = dy @ w_down.to(x.dtype)  # [N, h], dense
        d_down = sparse_mm(packed_t, dy, transpose_result=True)  # (s^T dy)^T = dy^T s: [d, h], contiguous
        du, du_t, _ = pack_transposable(u, ds, pattern)  # du = ds * 2 relu(u) on the forward's pattern, no search
        dx = sparse_mm(du, w_up.to(x.dtype))  # [N, d]
        d_up = sparse_mm(du_t, x)  # [h, d]
    return dx, d_up.to(w_up.dtype), d_down.to(w_down.dtype)


def _fake_saved(x: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor) -> tuple[torch.Tensor, ...]:
    N, h = x.shape[0], w_up.shape[0]
    return (x.new_empty(N, h), x.new_empty(h, N // 2 + N // 16),
            x.new_empty(N // 4, h // 4, dtype=torch.uint8))


# ``x[N, d]`` (bf16/fp16) -> ``y[N, d]``, differentiable in all three; weights in
# any float dtype (cast to ``x``'s; their gradients come back in theirs). One custom
# op (``sparsetrain::ffn24_cusparselt``) forward and one backward, so torch.compile
# does not break its graph here.
sparse24_ffn_cusparselt = ffn_op("ffn24_cusparselt", _forward, _backward, _fake_saved)
