"""2:4 sparsifiers: the pattern, top-2 choice, MVUE unbiasedness, the S-STE formula."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from sparsetrain.sparse24 import (
    is_24, mvue_24, mvue_probabilities, naive_24, soft_threshold_24, soft_threshold_scale, sparsify_24, sparsity_stats,
)


def relu2_like(rows: int = 64, cols: int = 32) -> torch.Tensor:
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31 - 1, ())))
    return F.relu(torch.randn(rows, cols, generator=g, dtype=torch.float64) - 0.3).square()


@pytest.mark.parametrize("method", ["naive", "mvue", "soft_threshold"])
def test_every_output_is_24(method: str) -> None:
    for x in (relu2_like(), torch.randn(16, 40, dtype=torch.float64)):
        out, mask = sparsify_24(x, method)
        assert is_24(out) and out.shape == x.shape
        assert ((mask.view(-1, 4).sum(-1)) <= 2).all()
        assert (out[~mask] == 0).all()


def test_naive_keeps_two_largest_magnitudes() -> None:
    x = torch.randn(8, 16, dtype=torch.float64)
    out, _ = naive_24(x)
    for row, orow in zip(x.view(-1, 4), out.view(-1, 4)):
        keep = sorted(range(4), key=lambda i: -abs(float(row[i])))[:2]
        ref = torch.zeros(4, dtype=torch.float64)
        ref[keep] = row[keep]
        assert torch.equal(orow, ref)


def test_mvue_probabilities_and_exact_counts() -> None:
    g = torch.tensor([[4.0, 1.0, 1.0, 0.0], [1.0, 1.0, 1.0, 1.0], [3.0, 0.0, 0.0, 0.0], [10.0, 3.0, 0.01, 0.01]])
    p = mvue_probabilities(g.view(-1, 1, 4)).view(-1, 4)
    assert torch.allclose(p[0], torch.tensor([1.0, 0.5, 0.5, 0.0]))
    assert torch.allclose(p[1], torch.full((4,), 0.5))
    assert torch.equal(p[2], torch.tensor([1.0, 0.0, 0.0, 0.0]))
    assert p[3, 0] == 1.0 and torch.allclose(p[3].sum(), torch.tensor(2.0))
    x = relu2_like(256, 32)
    _, mask = mvue_24(x)
    nz = (x.view(-1, 4) != 0).sum(-1)
    assert torch.equal(mask.view(-1, 4).sum(-1), nz.clamp(max=2))


def test_mvue_is_unbiased() -> None:
    x = relu2_like(1, 32).expand(40_000, 32).contiguous()
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31 - 1, ())))
    out, _ = mvue_24(x, gen)
    mean, std = out.mean(0), out.std(0)
    bound = 5 * std / (x.shape[0] ** 0.5) + 1e-12
    assert ((mean - x[0]).abs() <= bound).all(), (mean - x[0]).abs().max()
    assert not torch.equal(out[0], out[1])  # it is random


def test_soft_threshold_formula() -> None:
    x = torch.randn(6, 12, dtype=torch.float64)
    out, _ = soft_threshold_24(x, scale=1.7)
    for row, orow in zip(x.view(-1, 4), out.view(-1, 4)):
        order = sorted(range(4), key=lambda i: -abs(float(row[i])))
        t = abs(float(row[order[2]]))
        ref = torch.zeros(4, dtype=torch.float64)
        for i in order[:2]:
            ref[i] = 1.7 * torch.sign(row[i]) * (abs(float(row[i])) - t)
        assert torch.allclose(orow, ref)


def test_soft_threshold_scale_is_least_squares() -> None:
    x = relu2_like()
    beta = soft_threshold_scale(x)
    s, _ = soft_threshold_24(x)
    ref = torch.linalg.lstsq(s.reshape(-1, 1), x.reshape(-1, 1)).solution.item()
    assert beta == pytest.approx(ref, rel=1e-9)


def test_sparsity_stats_hand_computed() -> None:
    act = torch.tensor([[0.0, 2.0, 0.0, 3.0, 1.0, 2.0, 3.0, 4.0]])
    sparse, _ = naive_24(act)
    st = sparsity_stats(act, sparse)
    assert st["activation_sparsity"] == pytest.approx(2 / 8)
    assert st["groups_already_24"] == pytest.approx(1 / 2)
    assert st["pruned_beyond_relu"] == pytest.approx(2 / 8)


def test_bad_shapes_and_methods() -> None:
    with pytest.raises(ValueError, match="multiple of 4"):
        naive_24(torch.ones(3, 6))
    with pytest.raises(ValueError, match="unknown 2:4 method"):
        sparsify_24(torch.ones(4, 8), "magic")
