"""The one-pass transposable 2:4 packing (sparse24/packing.py) against
independent references: a brute-force enumeration of 4x4 patterns, float64
tile sums, cuSPARSELt's own ``_cslt_compress`` output (saved from an H200 with
cuSPARSELt 0.8 in tests/data, and live on CUDA), and the
plain-torch packer (the Triton kernel runs in the interpreter on CPU)."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch

from sparsetrain.sparse24 import packing
from sparsetrain.sparse24.packing import (TRANSPOSABLE_PATTERNS, pack_24_reference, pack_transposable,
                                          pack_transposable_reference, pattern_mask, transposable_mask,
                                          transposable_pattern)
from sparsetrain.sparse24.sparsify import is_24, transposable_24

FIXTURE = Path(__file__).parent / "data" / "cusparselt_0.8_compress.pt"


def _brute_force_patterns() -> list[torch.Tensor]:
    """Every 4x4 0/1 matrix with two ones in each row and column."""
    out = []
    for bits in range(1 << 16):
        m = torch.tensor([(bits >> k) & 1 for k in range(16)]).view(4, 4)
        if (m.sum(0) == 2).all() and (m.sum(1) == 2).all():
            out.append(m.bool())
    return out


BRUTE = _brute_force_patterns()


def _seed() -> int:
    return int(torch.randint(0, 2**31 - 1, ()))


def test_the_90_patterns_are_all_transposable_patterns() -> None:
    ours = {tuple(m.flatten().tolist()) for m in (torch.tensor(packing._pattern_mask(p)) for p in TRANSPOSABLE_PATTERNS)}
    assert len(ours) == 90 == len(BRUTE)
    assert ours == {tuple(m.flatten().tolist()) for m in BRUTE}


def test_transposable_mask_is_the_best_pattern_per_tile() -> None:
    g = torch.Generator().manual_seed(_seed())
    x = torch.rand(16, 24, generator=g, dtype=torch.float64)
    mask = transposable_mask(x)
    stack = torch.stack(BRUTE).double()  # [90, 4, 4]
    for r0, c0 in itertools.product(range(0, 16, 4), range(0, 24, 4)):
        tile = x[r0:r0 + 4, c0:c0 + 4]
        m = mask[r0:r0 + 4, c0:c0 + 4]
        assert (m.sum(0) == 2).all() and (m.sum(1) == 2).all()
        best = float((stack * tile).sum((1, 2)).max())
        assert float(tile[m].sum()) == pytest.approx(best, rel=1e-6)  # sums are float32 in the chooser


def test_transposable_24_method_is_24_both_ways_and_keeps_a_fitting_support() -> None:
    g = torch.Generator().manual_seed(_seed())
    x = torch.randn(22, 32, generator=g, dtype=torch.float64)  # 22 rows: a padded last tile
    out, mask = transposable_24(x)
    assert is_24(out) and is_24(torch.nn.functional.pad(out, (0, 0, 0, 2)).t())
    assert torch.equal(out, x * mask)
    # a support that already fits a pattern is kept whole (why packing the gradient again is lossless)
    _, m = transposable_24(torch.rand(32, 32, generator=g, dtype=torch.float64))
    y = torch.randn(32, 32, generator=g, dtype=torch.float64) * m
    assert torch.equal(transposable_24(y)[0], y)


def test_reference_packing_equals_cusparselt_compress() -> None:
    data = torch.load(FIXTURE)
    assert data["version"] == 800
    for name, (dense, packed) in data["cases"].items():
        got = pack_24_reference(dense, dense != 0)
        assert got.shape == packed.shape, name
        assert torch.equal(got.view(torch.int16), packed.view(torch.int16)), name


def _random_u(M: int, K: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator(device=device).manual_seed(_seed())
    u = torch.randn(M, K, generator=g, device=device).bfloat16()
    ds = torch.randn(M, K, generator=g, device=device).bfloat16()
    return u, ds


@pytest.mark.parametrize("shape", [(64, 128), (128, 64)])
def test_kernel_equals_reference_bit_for_bit(shape: tuple[int, int]) -> None:
    device = "cuda" if torch.cuda.is_available() else "cpu"  # CPU: the Triton interpreter
    u, ds = _random_u(*shape, device)
    u[0, :8] = 0.0  # all-zero tiles: ties everywhere, the first pattern wins in both
    assert packing.triton_ok(u)
    packs = {}
    for name, grad in (("forward", None), ("backward", ds)):
        got, got_t, got_pattern = packs[name] = pack_transposable(u, grad)
        want, want_t, want_pattern = pack_transposable_reference(u, grad)
        assert torch.equal(got.view(torch.int16), want.view(torch.int16))
        assert torch.equal(got_t.view(torch.int16), want_t.view(torch.int16))
        assert got_pattern.dtype == torch.uint8 and torch.equal(got_pattern, want_pattern)
    # the backward on the forward's saved pattern skips the search and packs the same bits
    saved = pack_transposable(u, ds, packs["forward"][2])
    for got, want in zip(saved, packs["backward"]):
        assert torch.equal(got.view(torch.int16) if got.is_floating_point() else got,
                           want.view(torch.int16) if want.is_floating_point() else want)
    # what it packs: relu(u)^2, and ds * 2 relu(u), on the mask chosen from relu(u)^2
    a = torch.relu(u.float()).square().bfloat16()
    mask = transposable_mask(a)
    du = (ds.float() * 2 * torch.relu(u.float())).bfloat16()
    for name, vals in (("forward", a), ("backward", du)):
        assert torch.equal(packs[name][0].view(torch.int16), pack_24_reference(vals * mask, mask).view(torch.int16))


@pytest.mark.parametrize("shape", [(64, 128), (128, 192)])
def test_dense_masked_output_equals_reference_bit_for_bit(shape: tuple[int, int]) -> None:
    """mask_transposable: the kernel's dense output (the masked-dense path's
    activation and gradient) is the reference values times the reference mask."""
    device = "cuda" if torch.cuda.is_available() else "cpu"  # CPU: the Triton interpreter
    u, ds = _random_u(*shape, device)
    u[3, 8:16] = 0.0  # a tie inside a tile
    assert packing.triton_ok(u)
    a = torch.relu(u.float()).square().bfloat16()
    mask = transposable_mask(a)
    du = (ds.float() * 2 * torch.relu(u.float())).bfloat16()
    for grad, vals in ((None, a), (ds, du)):
        got, pattern = packing.mask_transposable(u, grad)
        assert got.dtype == torch.bfloat16 and got.shape == u.shape
        assert torch.equal(got.float(), (vals * mask).float())  # as numbers: a dropped -x is +0 here, -0 there
        assert bool(((got != 0) <= mask).all())
        assert torch.equal(pattern_mask(pattern), mask)
        again, same = packing.mask_transposable(u, grad, pattern)  # on a saved pattern: no search, same output
        assert torch.equal(again.view(torch.int16), got.view(torch.int16)) and torch.equal(same, pattern)


def test_pattern_ids_name_the_chosen_patterns() -> None:
    """transposable_pattern's ids, mapped through TRANSPOSABLE_PATTERNS tile by
    tile (a loop, independent of pattern_mask's gather), give transposable_mask."""
    g = torch.Generator().manual_seed(_seed())
    x = torch.rand(12, 20, generator=g)
    ids = transposable_pattern(x)
    assert ids.shape == (3, 5) and ids.dtype == torch.uint8
    mask = transposable_mask(x)
    for tr, tc in itertools.product(range(3), range(5)):
        want = torch.tensor(packing._pattern_mask(TRANSPOSABLE_PATTERNS[int(ids[tr, tc])]))
        assert torch.equal(mask[4 * tr:4 * tr + 4, 4 * tc:4 * tc + 4], want)


def test_bad_shapes_raise() -> None:
    with pytest.raises(ValueError, match="multiples of 64"):
        pack_transposable(torch.zeros(64, 96, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="multiples of 4"):
        transposable_mask(torch.zeros(6, 8))
    with pytest.raises(ValueError, match="pattern must be uint8 of shape"):
        pack_transposable(torch.zeros(64, 64, dtype=torch.bfloat16), pattern=torch.zeros(16, 8, dtype=torch.uint8))
    with pytest.raises(ValueError, match="exactly two"):
        pack_24_reference(torch.ones(64, 32), torch.ones(64, 32, dtype=torch.bool))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_kernel_equals_cslt_compress_and_multiplies_right() -> None:
    from sparsetrain.sparse24.cusparselt import cusparselt_available, sparse_mm

    if not cusparselt_available():
        pytest.skip("no cuSPARSELt")
    u, ds = _random_u(256, 512, "cuda")
    u = u.abs() + 0.25  # no zero kept: cuSPARSELt picks its own indices in groups with fewer than two nonzeros
    packed, packed_t, _ = pack_transposable(u)
    a = torch.relu(u.float()).square().bfloat16()
    s = a * transposable_mask(a)
    assert torch.equal(packed.view(torch.int16), torch._cslt_compress(s).view(torch.int16))
    assert torch.equal(packed_t.view(torch.int16), torch._cslt_compress(s.t().contiguous()).view(torch.int16))
    # products, for the gradient packing too (zeros kept where relu(u) = 0)
    u, ds = _random_u(256, 512, "cuda")
    du, du_t, _ = pack_transposable(u, ds)
    vals = (ds.float() * 2 * torch.relu(u.float())).bfloat16() * transposable_mask(torch.relu(u.float()).square().bfloat16())
    b = torch.randn(512, 128, device="cuda", dtype=torch.bfloat16)
    want = vals.float() @ b.float()
    assert (sparse_mm(du, b).float() - want).norm() / want.norm() < 1e-2
    c = torch.randn(256, 64, device="cuda", dtype=torch.bfloat16)
    want_t = vals.float().t() @ c.float()
    assert (sparse_mm(du_t, c).float() - want_t).norm() / want_t.norm() < 1e-2
