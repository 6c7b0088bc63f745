"""Rotary position embedding as one Triton kernel per direction.

The plain-torch RoPE (:func:`sparsetrain.model.apply_rope_reference`) upcasts
q and k to float32, multiplies and adds halves in separate kernels and
concatenates them: about ten passes over a float32 copy of q and of k in the
forward, more in the backward: in an eager step's profile a large share of the
``aten::copy_``, ``aten::mul`` and ``aten::cat`` time
(bench/results/sparse24_step_profile_h200.json). Here one kernel reads
each (position, head) row once from wherever it lies (q and k are strided
views of the fused qkv output), rotates it in float32 registers and writes it
contiguous. The backward is the same kernel rotating by the opposite angle
(the transpose of a rotation).

Under ``torch.compile`` the reference runs instead: inductor fuses it on its own.
"""

from __future__ import annotations

import torch

from .triton_util import interpreting

try:
    import triton
    import triton.language as tl

    from .triton_util import bf16_bits_rne
except ImportError:  # pragma: no cover - depends on the install
    triton = None


def fused_rope_ok(x: torch.Tensor) -> bool:
    """Can :func:`fused_rope` run on ``x`` (4-D, 16-bit or float32, on CUDA or in Triton's interpreter)?"""
    return (triton is not None and x.dim() == 4 and (x.is_cuda or interpreting())
            and x.dtype in (torch.bfloat16, torch.float16, torch.float32) and x.shape[-1] % 2 == 0)


if triton is not None:

    @triton.jit
    def _rope_kernel(x_ptr, out_ptr, cos_ptr, sin_ptr, H, T,
                     xs_b, xs_h, xs_t, xs_d, os_b, os_h, os_t, os_d, cs_t,
                     SIGN: tl.constexpr, HALF: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
                     ROUND_BF16: tl.constexpr):
        # one program: BLOCK_T positions of one (batch, head); both halves of each row
        bh = tl.program_id(0)
        b = (bh // H).to(tl.int64)
        h = (bh % H).to(tl.int64)
        t = (tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
        d = tl.arange(0, BLOCK_D).to(tl.int64)
        mask = (t[:, None] < T) & (d[None, :] < HALF)
        src = x_ptr + b * xs_b + h * xs_h + t[:, None] * xs_t + d[None, :] * xs_d
        x1 = tl.load(src, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(src + HALF * xs_d, mask=mask, other=0.0).to(tl.float32)
        table = t[:, None] * cs_t + d[None, :]
        c = tl.load(cos_ptr + table, mask=mask, other=0.0)
        s = tl.load(sin_ptr + table, mask=mask, other=0.0) * SIGN
        dst = out_ptr + b * os_b + h * os_h + t[:, None] * os_t + d[None, :] * os_d
        o1 = x1 * c - x2 * s
        o2 = x1 * s + x2 * c
        if ROUND_BF16:  # the interpreter truncates to bf16: round to nearest even first, as the GPU does
            o1 = (bf16_bits_rne(o1) << 16).to(tl.float32, bitcast=True)
            o2 = (bf16_bits_rne(o2) << 16).to(tl.float32, bitcast=True)
        ty = out_ptr.dtype.element_ty
        tl.store(dst, o1.to(ty), mask=mask)
        tl.store(dst + HALF * os_d, o2.to(ty), mask=mask)


def _launch(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, seq_dim: int, sign: float) -> torch.Tensor:
    """Rotate ``x`` (positions along ``seq_dim``, 1 or 2; heads along the other
    of dims 1 and 2) by ``sign`` times the angles; the result is contiguous in
    ``x``'s dimension order."""
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    # index both as [B, H, T, hd]
    xv, ov = (x, out) if seq_dim == 2 else (x.transpose(1, 2), out.transpose(1, 2))
    B, H, T, hd = xv.shape
    cos, sin = cos.float().contiguous(), sin.float().contiguous()
    half = hd // 2
    block_d = triton.next_power_of_2(half)
    block_t = max(1, min(64, 4096 // block_d))
    grid = (B * H, triton.cdiv(T, block_t))
    _rope_kernel[grid](xv, ov, cos, sin, H, T, *xv.stride(), *ov.stride(), cos.stride(0),
                       SIGN=sign, HALF=half, BLOCK_T=block_t, BLOCK_D=block_d,
                       ROUND_BF16=interpreting() and x.dtype == torch.bfloat16)
    return out


class _FusedRope(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, seq_dim: int) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(cos, sin)
        ctx.seq_dim = seq_dim
        return _launch(x, cos, sin, seq_dim, 1.0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        cos, sin = ctx.saved_tensors
        return _launch(grad, cos, sin, ctx.seq_dim, -1.0), None, None, None


def fused_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, seq_dim: int = 2) -> torch.Tensor:
    """RoPE on ``x`` ``[B, H, T, hd]`` (``seq_dim`` 2) or ``[B, T, H, hd]``
    (``seq_dim`` 1), any strides; ``cos``, ``sin``: ``[T, hd/2]``. Same result as
    the reference (float32 arithmetic, one rounding to ``x``'s dtype), contiguous
    in ``x``'s dimension order; differentiable in ``x``."""
    if seq_dim not in (1, 2):
        raise ValueError(f"seq_dim must be 1 or 2, got {seq_dim}")
    return _FusedRope.apply(x, cos, sin, seq_dim)
