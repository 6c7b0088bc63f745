"""The row-limited ReLU² kernel against ``model.relu_squared`` (bit for bit) and a
float64 formula, on the GPU or in Triton's CPU interpreter."""

from __future__ import annotations

import pytest
import torch

from sparsetrain.bk import relu_squared_rows as rsr
from sparsetrain.model import relu_squared

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _inputs(rows: int, cols: int, dtype: torch.dtype, seed: int):
    gen = torch.Generator().manual_seed(seed)
    u = torch.randn(rows, cols, generator=gen).to(DEVICE, dtype)
    g = torch.randn(rows, cols, generator=gen).to(DEVICE, dtype)
    limit = int(torch.randint(1, rows + 1, (1,), generator=gen))
    return u, g, limit


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("rows, cols", [(37, 1100), (16, 64)])
def test_leading_rows_equal_relu_squared_bit_for_bit(dtype, rows, cols) -> None:
    u, g, limit = _inputs(rows, cols, dtype, seed=rows * cols)
    lim = torch.tensor([limit], dtype=torch.int32, device=DEVICE)
    u1 = u.clone().requires_grad_(True)
    y = rsr.relu_squared_rows(u1, lim)
    (du,) = torch.autograd.grad(y, u1, g)
    u2 = u.clone().requires_grad_(True)
    want_y = relu_squared(u2)
    (want_du,) = torch.autograd.grad(want_y, u2, g)
    assert torch.equal(y[:limit], want_y[:limit])
    assert torch.equal(du[:limit], want_du[:limit])
    # and the formula in float64, within one rounding of the dtype
    u64, g64 = u[:limit].double(), g[:limit].double()
    eps = torch.finfo(dtype).eps
    assert torch.allclose(y[:limit].double(), u64.clamp_min(0) ** 2, rtol=eps, atol=0)
    assert torch.allclose(du[:limit].double(), 2 * u64.clamp_min(0) * g64, rtol=eps, atol=0)


@pytest.mark.parametrize("limit", [0, 5, 24])
def test_rows_past_the_limit_are_not_written(limit: int) -> None:
    u, g, _ = _inputs(24, 300, torch.bfloat16, seed=limit)
    lim = torch.tensor([limit], dtype=torch.int64, device=DEVICE)
    for grad in (None, g):
        out = torch.full_like(u, 7.0)
        rsr.launch(u, lim, grad=grad, out=out)
        assert torch.all(out[limit:] == 7.0)
        want = relu_squared(u) if grad is None else torch.where(u > 0, 2 * u * g, 0)
        assert torch.equal(out[:limit], want[:limit])


def test_the_op_passes_opcheck() -> None:
    u, g, _ = _inputs(8, 96, torch.float32, seed=3)
    lim = torch.tensor([8], dtype=torch.int32, device=DEVICE)  # every row: the result is fully specified
    torch.library.opcheck(rsr._relu_squared_rows, (u.requires_grad_(True), lim))
    torch.library.opcheck(rsr._relu_squared_rows_backward, (u.detach(), g, lim))


def test_float64_runs_the_reference_on_every_row() -> None:
    u = torch.randn(6, 10, dtype=torch.float64, requires_grad=True)
    y = rsr.relu_squared_rows(u, torch.tensor([2]))
    assert torch.equal(y, u.detach().clamp_min(0) ** 2)
    torch.autograd.gradcheck(lambda t: rsr.relu_squared_rows(t, torch.tensor([6])), (u,))


def test_bad_input_names_the_value() -> None:
    with pytest.raises(ValueError, match=r"got \(3, 4\) torch.float64"):
        rsr.launch(torch.zeros(3, 4, dtype=torch.float64, device=DEVICE), torch.tensor([1], device=DEVICE))
    with pytest.raises(ValueError, match=r"gradient must match u .* got \(3, 5\)"):
        u = torch.zeros(3, 4, device=DEVICE)
        rsr.launch(u, torch.tensor([1], device=DEVICE), grad=torch.zeros(3, 5, device=DEVICE))


@requires_cuda
def test_a_cuda_graph_reads_the_count_on_every_replay() -> None:
    u, g, _ = _inputs(64, 2048, torch.bfloat16, seed=9)
    lim = torch.tensor([10], dtype=torch.int32, device="cuda")
    out = torch.zeros_like(u)
    rsr.launch(u, lim, out=out)  # compile outside the capture
    out.zero_()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        rsr.launch(u, lim, out=out)
    lim.fill_(40)
    graph.replay()
    assert torch.equal(out[:40], relu_squared(u)[:40]) and torch.all(out[40:] == 0)
