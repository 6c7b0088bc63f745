"""Row moves with gather/scatter backwards equal index_select's own autograd."""

import torch

from sparsetrain.rows import gather_rows, permute_rows


def _seeded() -> torch.Generator:
    return torch.Generator().manual_seed(int(torch.randint(0, 2**31 - 1, ())))


def test_gather_rows_matches_index_select_autograd() -> None:
    g = _seeded()
    for picked in (7, 40, 40):  # some rows, and every row (a permutation)
        x = torch.randn(40, 5, 3, dtype=torch.float64, generator=g, requires_grad=True)
        index = torch.randperm(40, generator=g)[:picked]
        up = torch.randn(picked, 5, 3, dtype=torch.float64, generator=g)
        got = gather_rows(x, index)
        (dx,) = torch.autograd.grad((got * up).sum(), x)
        want = x.index_select(0, index)
        (dx_ref,) = torch.autograd.grad((want * up).sum(), x)
        assert torch.equal(got, want)
        assert torch.equal(dx, dx_ref)
        if picked < 40:  # rows not picked get exactly zero gradient
            missing = torch.ones(40, dtype=torch.bool)
            missing[index] = False
            assert dx[missing].abs().sum() == 0
    assert torch.autograd.gradcheck(lambda t: gather_rows(t, torch.tensor([3, 0, 5])),
                                    (torch.randn(6, 2, dtype=torch.float64, generator=g, requires_grad=True),))


def test_permute_rows_matches_index_select_autograd() -> None:
    g = _seeded()
    x = torch.randn(33, 4, dtype=torch.float64, generator=g, requires_grad=True)
    perm = torch.randperm(33, generator=g)
    inv = torch.argsort(perm)
    up = torch.randn(33, 4, dtype=torch.float64, generator=g)
    got = permute_rows(x, perm, inv)
    (dx,) = torch.autograd.grad((got * up).sum(), x)
    (dx_ref,) = torch.autograd.grad((x[perm] * up).sum(), x)
    assert torch.equal(got, x[perm])
    assert torch.equal(dx, dx_ref)
    assert torch.equal(permute_rows(got, inv, perm), x)
    assert torch.autograd.gradcheck(lambda t: permute_rows(t, perm, inv), (x,))


def test_gather_rows_op_passes_opcheck() -> None:
    g = _seeded()
    x = torch.randn(12, 3, dtype=torch.float64, generator=g, requires_grad=True)
    torch.library.opcheck(torch.ops.sparsetrain.gather_rows.default, (x, torch.randperm(12, generator=g)[:5]))


def test_gather_rows_compiles_with_a_size_from_a_float() -> None:
    """A keep count derived from a float attribute that differs between calls
    (the top-k BK layer at two sparsities) makes dynamo treat the float as a
    symbol; the gather must still compile and give eager's gradients."""
    from sparsetrain.bk.layers import SparseMoEResNetBKLayer

    torch.manual_seed(int(torch.randint(0, 2**31 - 1, ())))
    torch._dynamo.reset()
    for skip in (0.5, 0.7):
        layer = SparseMoEResNetBKLayer(16, 32, 2, target_sparsity=skip, mask_mode="topk", causal=False).double().eval()
        x = torch.randn(2, 24, 16, dtype=torch.float64, requires_grad=True)
        want = layer(x)
        (dx_want,) = torch.autograd.grad(want.square().sum(), x)
        got = torch.compile(layer, backend="aot_eager")(x)
        (dx,) = torch.autograd.grad(got.square().sum(), x)
        assert torch.allclose(got, want, rtol=1e-10, atol=1e-12)
        assert torch.allclose(dx, dx_want, rtol=1e-10, atol=1e-12)
