"""The fused cross-entropy kernels (Triton's interpreter on CPU) against float64 and the plain-torch loss."""

import pytest
import torch
import torch.nn.functional as F

from sparsetrain.cross_entropy import cross_entropy, cross_entropy_reference, fused_cross_entropy, fused_ok
from sparsetrain.model import IGNORE_INDEX

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("V", [300, 4096 + 7])  # one partial block; several blocks with a partial last one
def test_fused_cross_entropy_matches_float64(dtype: torch.dtype, V: int) -> None:
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31 - 1, ())))
    N = 19
    logits = (3 * torch.randn(N, V, generator=g)).to(DEVICE, dtype)
    targets = torch.randint(0, V, (N,), generator=g).to(DEVICE)
    targets[torch.randperm(N, generator=g)[:5].to(DEVICE)] = IGNORE_INDEX
    grad_out = float(torch.rand((), generator=g)) + 0.5  # not 1: the backward must scale by it
    assert fused_ok(logits)

    x = logits.detach().clone().requires_grad_()
    loss = fused_cross_entropy(x, targets)
    (dx,) = torch.autograd.grad(loss * grad_out, x)
    xr = logits.detach().double().requires_grad_()
    want = F.cross_entropy(xr, targets, ignore_index=IGNORE_INDEX)
    (dx_want,) = torch.autograd.grad(want * grad_out, xr)

    assert loss.dtype == torch.float32 and dx.dtype == dtype and dx.shape == logits.shape
    assert abs(loss.item() - want.item()) <= 1e-5 * abs(want.item())
    # float32: a few ulp of the largest entry; bf16: one rounding (half an ulp, 2^-9 relative)
    tol = 1e-6 if dtype == torch.float32 else 2**-8
    assert torch.allclose(dx.double(), dx_want, rtol=tol, atol=tol * float(dx_want.abs().max()))
    assert not dx[targets == IGNORE_INDEX].any()  # rows without a target: no gradient
    # and against the plain-torch loss the model ran before: the same value
    assert torch.allclose(loss, cross_entropy_reference(logits, targets), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grad_kernel_on_listed_rows_matches_the_reference(dtype: torch.dtype) -> None:
    """``cross_entropy_grad(rows=...)`` reads the listed rows in place: equal to
    the plain-torch gradient of those rows (one rounding) and to float64."""
    from sparsetrain.cross_entropy import cross_entropy_grad, cross_entropy_grad_reference

    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31 - 1, ())))
    N, V = 23, 1500
    logits = (3 * torch.randn(N, V, generator=g)).to(DEVICE, dtype)
    targets = torch.randint(0, V, (N,), generator=g).to(DEVICE)
    targets[3] = IGNORE_INDEX
    rows = torch.randperm(N, generator=g)[:9].to(DEVICE)
    rows[0] = 3  # a listed row without a target
    lse = torch.logsumexp(logits.float(), dim=-1).index_select(0, rows)
    scale = torch.tensor([0.37], device=DEVICE)
    got = cross_entropy_grad(logits, targets, lse, scale, rows=rows)
    want = cross_entropy_grad_reference(logits, targets, lse, scale, rows=rows)
    x64 = logits.double().index_select(0, rows)
    t = targets.index_select(0, rows)
    exact = (torch.softmax(x64, -1) - F.one_hot(t.clamp(min=0), V).double()) * 0.37 * (t != IGNORE_INDEX)[:, None]
    assert got.shape == (9, V) and got.dtype == dtype and not got[0].any()
    tol = 1e-6 if dtype == torch.float32 else 2**-8
    assert torch.allclose(got.double(), want.double(), rtol=tol, atol=tol * float(want.abs().max().double()))
    assert torch.allclose(got.double(), exact, rtol=tol, atol=tol * float(exact.abs().max()))


def test_fused_cross_entropy_edge_cases() -> None:
    logits = torch.randn(4, 300, device=DEVICE)
    none = torch.full((4,), IGNORE_INDEX, device=DEVICE)
    # no row with a target: NaN, as F.cross_entropy
    assert torch.isnan(fused_cross_entropy(logits, none)) and torch.isnan(cross_entropy_reference(logits, none))
    with pytest.raises(ValueError, match="do not match"):
        fused_cross_entropy(logits, none[:3])
    if DEVICE == "cpu":  # on CUDA an out-of-range target is a device-side assert, which poisons the context
        with pytest.raises(RuntimeError, match="outside"):
            fused_cross_entropy(logits, torch.tensor([0, 1, 300, 2], device=DEVICE))


def test_cross_entropy_dispatch_keeps_cpu_on_the_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    """CPU tensors take the plain-torch loss even where the interpreter could run the kernels."""
    import sparsetrain.cross_entropy as ce

    calls = []
    monkeypatch.setattr(ce, "fused_cross_entropy", lambda *a: calls.append(1))
    logits, targets = torch.randn(3, 300), torch.tensor([1, IGNORE_INDEX, 5])
    assert torch.equal(cross_entropy(logits, targets), cross_entropy_reference(logits, targets))
    assert calls == []


def test_fused_cross_entropy_ops_pass_opcheck_and_compile() -> None:
    """The custom ops' fake implementations and autograd registration are
    consistent (``torch.library.opcheck``), and the loss traces whole under
    torch.compile with the same value and gradient as eager."""
    from sparsetrain import cross_entropy as ce

    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31 - 1, ())))
    logits = torch.randn(8, 300, generator=g).to(DEVICE).requires_grad_(True)
    targets = torch.randint(0, 300, (8,), generator=g).to(DEVICE)
    targets[3] = IGNORE_INDEX
    torch.library.opcheck(ce._ce_forward, (logits, targets))
    loss = fused_cross_entropy(logits, targets)
    (want,) = torch.autograd.grad(loss, logits)
    torch._dynamo.reset()
    compiled = torch.compile(fused_cross_entropy, backend="aot_eager", fullgraph=True)
    got_loss = compiled(logits, targets)
    (got,) = torch.autograd.grad(got_loss, logits)
    assert torch.equal(got_loss, loss) and torch.equal(got, want)
