"""The fused RoPE kernel (Triton's interpreter on CPU) against the plain-torch reference."""

import pytest
import torch

from sparsetrain.model import apply_rope_reference, rope_tables
from sparsetrain.rope_triton import fused_rope, fused_rope_ok

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("seq_dim", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_rope_matches_reference_forward_and_backward(seq_dim: int, dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31 - 1, ())))
    B, T, H, hd = 2, 37, 3, 24  # T not a multiple of the block, hd/2 not a power of two
    cos, sin = (t.to(DEVICE) for t in rope_tables(64, hd, 10000.0))
    cos, sin = cos[:T], sin[:T]
    # q as the model makes it: a strided view of the fused qkv output
    qkv = torch.randn(B, T, 3, H, hd, generator=g).to(DEVICE, dtype)
    x = qkv[:, :, 0] if seq_dim == 1 else qkv.permute(2, 0, 3, 1, 4)[0]
    assert fused_rope_ok(x) and not x.is_contiguous()
    up = torch.randn(x.shape, generator=g).to(DEVICE, dtype)

    xf = x.detach().clone().requires_grad_()
    got = fused_rope(xf, cos, sin, seq_dim)
    (dx,) = torch.autograd.grad((got.float() * up.float()).sum(), xf)
    # the reference in float64: what both float32 computations approximate
    xr = x.detach().double().requires_grad_()
    want = apply_rope_reference(xr, cos.double(), sin.double(), seq_dim)
    (dx_want,) = torch.autograd.grad((want * up.double()).sum(), xr)

    assert got.shape == x.shape and got.is_contiguous() and got.dtype == dtype
    # float32: a few ulp; bf16: one rounding of a float32 result (half an ulp, 2^-9 relative)
    tol = dict(rtol=1e-6, atol=1e-6) if dtype == torch.float32 else dict(rtol=2**-8, atol=2**-8)
    assert torch.allclose(got.double(), want, **tol)
    assert torch.allclose(dx.double(), dx_want, **tol)
    # and against the float32 reference the model runs elsewhere: the same roundings
    same = apply_rope_reference(x, cos, sin, seq_dim)
    assert (got.float() - same.float()).abs().max() <= (2**-7 if dtype == torch.bfloat16 else 1e-6) * same.float().abs().max()


def test_fused_rope_is_a_rotation() -> None:
    """Norms of each (x1_i, x2_i) pair are kept, and rotating back (the backward's
    kernel) recovers the input: a formula check independent of the reference."""
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31 - 1, ())))
    x = torch.randn(1, 2, 16, 8, generator=g).to(DEVICE)
    cos, sin = (t.to(DEVICE) for t in rope_tables(16, 8, 10000.0))
    y = fused_rope(x, cos, sin)
    pair_norm = lambda t: t[..., :4].square() + t[..., 4:].square()  # noqa: E731
    assert torch.allclose(pair_norm(y), pair_norm(x), rtol=1e-5, atol=1e-6)
    x.requires_grad_()
    (back,) = torch.autograd.grad(fused_rope(x, cos, sin), x, grad_outputs=y)  # R^T (R x) = x
    assert torch.allclose(back, x.detach(), rtol=1e-5, atol=1e-5)
