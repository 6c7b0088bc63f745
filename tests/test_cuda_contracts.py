"""What sparsetrain relies on from torch's CUDA kernels, checked on the GPU
(every test skips without CUDA):

* each attention implementation of the Collider engine (cuDNN, flash,
  recompute) gives the dense attention gradients, at a real head size, for
  an output gradient whose dropped query rows are zero;
* the engine's cuDNN backward stays right after ordinary
  ``F.scaled_dot_product_attention`` training of the same shapes in the
  process (torch caches cuDNN backward graphs per thread, keyed without the
  output gradient's strides: the engine runs its backward on a thread of
  its own);
* ``torch._grouped_mm`` leaves the rows past its last offset out: whatever
  they hold never reaches a row inside the groups or a weight gradient (the
  sync-free parked path of the sparse BK layers parks skipped rows there).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sparsetrain import kernels

from conftest import fresh_seed, requires_cuda


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def attention_inputs(B: int, H: int, T: int, hd: int, seed: int):
    """bf16 q, k, v in the engine's token-major layout, and an output gradient
    with zero rows at the dropped half of the queries."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    q, k, v = (torch.randn(B, T, H, hd, device="cuda", dtype=torch.bfloat16, generator=g).transpose(1, 2)
               for _ in range(3))
    keep = torch.rand(B, T, device="cuda", generator=g) < 0.5
    d = torch.randn(B, T, H * hd, device="cuda", dtype=torch.bfloat16, generator=g) * keep[..., None]
    return q, k, v, d.view(B, T, H, hd).transpose(1, 2)


def float32_grads(q, k, v, d_out):
    qf, kf, vf = (t.float().requires_grad_(True) for t in (q, k, v))
    return torch.autograd.grad(F.scaled_dot_product_attention(qf, kf, vf, is_causal=True), (qf, kf, vf), d_out.float())


@requires_cuda
@pytest.mark.parametrize("impl", ["cudnn", "flash", "recompute"])
def test_each_engine_attention_backward_matches_dense_gradients(impl: str) -> None:
    import sparsetrain.collider.attention as A

    q, k, v, d_out = attention_inputs(2, 4, 256, 64, fresh_seed())
    with kernels.using(attention_impl=impl):  # the policy, not the environment: it is read once per process
        out, saved = A.attention_forward(q, k, v)
        used = saved.flash[0] if saved.flash else "recompute"
        if used != impl:
            pytest.skip(f"{impl} attention does not run here (the engine used {used})")
        ref = float32_grads(q, k, v, d_out)
        got = A.attention_backward(saved, torch.empty_like(out).copy_(d_out))
    for name, a, r in zip(("dq", "dk", "dv"), got, ref):
        assert rel(a, r) < 2e-2, (impl, name, rel(a, r))  # bf16 inputs and products


class _EngineInBackward(torch.autograd.Function):
    """Runs the engine's attention backward where the engine runs it: inside a
    backward, on autograd's device thread."""

    grads: tuple = ()

    @staticmethod
    def forward(ctx, x, saved, d_out):  # type: ignore[override]
        ctx.saved, ctx.d_out = saved, d_out
        return x.clone()

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        import sparsetrain.collider.attention as A

        _EngineInBackward.grads = A.attention_backward(ctx.saved, ctx.d_out)
        return g, None, None


@requires_cuda
def test_engine_cudnn_backward_stays_right_after_ordinary_sdpa_training() -> None:
    import sparsetrain.collider.attention as A
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with kernels.using(attention_impl="cudnn"):  # process-wide: autograd's device thread sees it too
        seed = fresh_seed()
        # ordinary training first: cuDNN's backward of the same shapes, with a head-major output gradient
        q, k, v, d_out = attention_inputs(4, 12, 1024, 64, seed + 1)
        qr, kr, vr = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
        try:
            with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                F.scaled_dot_product_attention(qr, kr, vr, is_causal=True).backward(d_out.contiguous())
        except RuntimeError as e:
            pytest.skip(f"cuDNN attention does not run here: {str(e)[:100]}")
        for t, r in zip((qr, kr, vr), float32_grads(q, k, v, d_out)):
            assert rel(t.grad, r) < 2e-2
        # then the engine, inside a backward
        q, k, v, d_out = attention_inputs(4, 12, 1024, 64, seed)
        _, saved = A.attention_forward(q, k, v)
        if not saved.flash or saved.flash[0] != "cudnn":
            pytest.skip("the engine does not use cuDNN attention here")
        x = torch.zeros(1, device="cuda", requires_grad=True)
        _EngineInBackward.apply(x, saved, d_out).sum().backward()
        for name, a, r in zip(("dq", "dk", "dv"), _EngineInBackward.grads, float32_grads(q, k, v, d_out)):
            assert rel(a, r) < 2e-2, (name, rel(a, r))


@requires_cuda
def test_grouped_mm_leaves_the_rows_past_the_last_offset_out() -> None:
    if not hasattr(torch, "_grouped_mm"):
        pytest.skip("torch has no _grouped_mm")
    g = torch.Generator(device="cuda").manual_seed(fresh_seed())
    R, D, H, E = 4096, 256, 512, 4
    used = R // 2 // (16 * E) * 16 * E  # half the rows in groups, each group a multiple of 16 rows
    offs = (torch.arange(1, E + 1, device="cuda") * (used // E)).to(torch.int32)
    a = torch.randn(R, D, device="cuda", generator=g).bfloat16()
    a[used:] = 1e4  # garbage past the last offset
    w = (torch.randn(E, H, D, device="cuda", generator=g) / D**0.5).bfloat16().transpose(1, 2)  # the layers' layout
    dy = torch.randn(R, H, device="cuda", generator=g).bfloat16()
    dy[used:] = 1e4
    a.requires_grad_(True)
    w = w.detach().requires_grad_(True)
    try:
        y = torch._grouped_mm(a, w, offs=offs)
    except RuntimeError as e:
        pytest.skip(f"torch._grouped_mm does not run on this GPU: {str(e)[:100]}")
    y.backward(dy)
    ref_y, ref_da = torch.zeros(used, H, device="cuda"), torch.zeros(used, D, device="cuda")
    ref_dw = torch.zeros(E, D, H, device="cuda")
    start = 0
    for e, end in enumerate(offs.tolist()):  # float32, group by group, the rows inside the groups only
        af, gf = a[start:end].detach().float(), dy[start:end].float()
        ref_y[start:end] = af @ w[e].detach().float()
        ref_da[start:end] = gf @ w[e].detach().float().t()
        ref_dw[e] = af.t() @ gf
        start = end
    assert rel(y[:used], ref_y) < 1e-2
    assert rel(a.grad[:used], ref_da) < 1e-2
    assert rel(w.grad, ref_dw) < 1e-2
