"""ReLU² on the leading rows of a buffer, with the row count read on the GPU.

The grouped MoE experts (:func:`sparsetrain.bk.layers.grouped_experts`) sort
their rows into a buffer whose tail, past the last expert group's offset, holds
the skipped ("parked") positions and some slack. ``torch._grouped_mm`` does no
work there; a plain ReLU² between the two grouped GEMMs would run over the
whole ``[rows, hidden]`` buffer, forward and backward, and cost the threshold
path (parked rows) what the top-k path (gathered kept rows) does not
(bench/results/bk_profile_compiled_bf16_gather_rows_h200.json).

Here one Triton kernel per direction reads the row count (the last group
offset) from device memory, so nothing syncs and a CUDA graph can capture it,
and its programs past that row return at once. Rows past the count are left as
they were allocated (unspecified), exactly as the grouped GEMMs leave them;
nothing downstream reads them.

Numerics equal :func:`sparsetrain.model.relu_squared`: ``relu(u)²`` and its
gradient ``2 relu(u) g`` are computed in float32 and rounded once, which gives
the bits that the bf16 (and float32) ``r * r`` and its autograd give
(tests/test_relu_squared_rows.py). On CPU tensors outside Triton's interpreter,
and for float64, the plain-torch :func:`~sparsetrain.model.relu_squared` runs
on every row (the leading rows are all that is specified).
"""

from __future__ import annotations

import torch

from ..model import relu_squared
from ..triton_util import interpreting

try:
    import triton
    import triton.language as tl

    from ..triton_util import bf16_bits_rne
except ImportError:  # pragma: no cover - depends on the install
    triton = None

BLOCK_ROWS, BLOCK_COLS = 8, 1024  # 8k elements per program: enough bytes in flight for a memory-bound pass


def kernel_ok(u: torch.Tensor) -> bool:
    """Can the Triton kernel run on ``u`` (2-D, contiguous, 16-bit or float32, on CUDA or in the interpreter)?"""
    return (triton is not None and u.dim() == 2 and u.is_contiguous() and (u.is_cuda or interpreting())
            and u.dtype in (torch.bfloat16, torch.float16, torch.float32))


if triton is not None:

    @triton.jit
    def _relu_squared_rows_kernel(u_ptr, g_ptr, out_ptr, limit_ptr, n_cols,
                                  BACKWARD: tl.constexpr, ROUND_BF16: tl.constexpr,
                                  BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
        limit = tl.load(limit_ptr).to(tl.int64)
        row0 = tl.program_id(0).to(tl.int64) * BLOCK_R
        if row0 < limit:  # programs past the count do nothing: that is the saving
            rows = row0 + tl.arange(0, BLOCK_R).to(tl.int64)
            cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
            mask = (rows[:, None] < limit) & (cols[None, :] < n_cols)
            offs = rows[:, None] * n_cols + cols[None, :]
            u = tl.load(u_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            if BACKWARD:
                g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
                # relu's backward passes the gradient where u > 0 (and NaN through), else 0
                y = tl.where(u <= 0.0, 0.0, 2.0 * u * g)
            else:
                r = tl.where(u < 0.0, 0.0, u)  # NaN stays NaN, as in F.relu
                y = r * r
            if ROUND_BF16:  # the interpreter truncates to bf16: round to nearest even first, as the GPU does
                y = (bf16_bits_rne(y) << 16).to(tl.float32, bitcast=True)
            tl.store(out_ptr + offs, y.to(out_ptr.dtype.element_ty), mask=mask)


def launch(u: torch.Tensor, limit: torch.Tensor, grad: torch.Tensor | None = None,
           out: torch.Tensor | None = None) -> torch.Tensor:
    """Run the kernel: ``relu(u)²`` (or, given ``grad``, its gradient) on rows
    ``< limit[0]`` of ``u`` into ``out`` (allocated when None); other rows of
    ``out`` are not written. ``limit``: a 1-element integer tensor on ``u``'s device."""
    if not kernel_ok(u):
        raise ValueError(f"relu_squared_rows: needs a contiguous 2-D bf16/fp16/float32 tensor on CUDA, got "
                         f"{tuple(u.shape)} {u.dtype} on {u.device}")
    if grad is not None and (grad.shape != u.shape or grad.dtype != u.dtype or not grad.is_contiguous()):
        raise ValueError(f"relu_squared_rows: the gradient must match u ({tuple(u.shape)} {u.dtype}, contiguous), "
                         f"got {tuple(grad.shape)} {grad.dtype}")
    out = torch.empty_like(u) if out is None else out
    rows, cols = u.shape
    if rows == 0 or cols == 0:
        return out
    grid = (triton.cdiv(rows, BLOCK_ROWS), triton.cdiv(cols, BLOCK_COLS))
    _relu_squared_rows_kernel[grid](
        u, grad if grad is not None else u, out, limit, cols,
        BACKWARD=grad is not None, ROUND_BF16=interpreting() and u.dtype == torch.bfloat16,
        BLOCK_R=BLOCK_ROWS, BLOCK_C=BLOCK_COLS, num_warps=8)
    return out


@torch.library.custom_op("sparsetrain::relu_squared_rows", mutates_args=())
def _relu_squared_rows(u: torch.Tensor, limit: torch.Tensor) -> torch.Tensor:
    # a custom op: torch.compile keeps it as one call, and a CUDA graph captures the launch.
    # (A triton_op, whose kernel inductor would launch itself, cannot be traced with fake
    # tensors under Triton's CPU interpreter, so CI could not check it.)
    if kernel_ok(u):
        return launch(u, limit)
    return relu_squared(u)


@_relu_squared_rows.register_fake
def _(u: torch.Tensor, limit: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(u)


@torch.library.custom_op("sparsetrain::relu_squared_rows_backward", mutates_args=())
def _relu_squared_rows_backward(u: torch.Tensor, grad: torch.Tensor, limit: torch.Tensor) -> torch.Tensor:
    if kernel_ok(u) and grad.is_contiguous():
        return launch(u, limit, grad=grad)
    return torch.where(u <= 0, 0, 2 * u * grad)  # 2 r g = r g + r g: the bits of r * r's autograd


@_relu_squared_rows_backward.register_fake
def _(u: torch.Tensor, grad: torch.Tensor, limit: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(u)


def _setup(ctx, inputs, output) -> None:
    u, limit = inputs
    ctx.save_for_backward(u, limit)


def _backward(ctx, grad: torch.Tensor):
    u, limit = ctx.saved_tensors
    return _relu_squared_rows_backward(u, grad.contiguous(), limit), None


_relu_squared_rows.register_autograd(_backward, setup_context=_setup)


def relu_squared_rows(u: torch.Tensor, limit: torch.Tensor) -> torch.Tensor:
    """``relu(u)**2`` on rows ``< limit[0]`` of ``u[rows, cols]``, forward and
    backward; the other rows of the result and of ``u``'s gradient are
    unspecified. ``limit``: a 1-element integer tensor on ``u``'s device (read
    there: no host sync)."""
    return _relu_squared_rows(u, limit)
