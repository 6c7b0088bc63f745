"""2:4 sparsifiers: the pattern, top-2 choice, MVUE unbiasedness, the S-STE formula."""

from __future__ import annotations


import pytest
import torch
import torch.nn.functional as F

from sparsetrain.sparse24 import (
    is_24, mvue_24, mvue_probabilities, naive_24, soft_threshold_24, soft_threshold_scale, sparsify_24, sparsity_stats,
)


def relu2_like(rows: int = 64, cols: int = 32) -> torch.Tensor:
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31 - 1, ())))
    return F.relu(torch.randn(rows, cols, generator=g, dtype=torch.float64) - 0.3).square()


@pytest.mark.parametrize("method", ["naive", "mvue", "soft_threshold", "transposable"])
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
    row = relu2_like(1, 32)
    row[0, :4] = torch.tensor([0.5, 1.0, 2.0, 3.0], dtype=torch.float64)  # at least one group needs a draw
    x = row.expand(40_000, 32).contiguous()
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31 - 1, ())))
    out, _ = mvue_24(x, gen)
    mean, std = out.mean(0), out.std(0)
    bound = 5 * std / (x.shape[0] ** 0.5) + 1e-12
    assert ((mean - x[0]).abs() <= bound).all(), (mean - x[0]).abs().max()
    assert (out != out[0]).any()  # it is random


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
    assert all(v.dim() == 0 for v in st.values())  # tensors: the trainer reads them when it logs, no sync here
    assert float(st["activation_sparsity"]) == pytest.approx(2 / 8)
    assert float(st["groups_already_24"]) == pytest.approx(1 / 2)
    assert float(st["pruned_beyond_relu"]) == pytest.approx(2 / 8)


def test_sparsity_stats_against_a_loop_over_groups() -> None:
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31 - 1, ())))
    act = torch.relu(torch.randn(6, 40, generator=g, dtype=torch.float64)) ** 2
    sparse, _ = naive_24(act)
    groups = act.reshape(-1, 4).tolist()
    fits = sum(sum(v != 0 for v in grp) <= 2 for grp in groups) / len(groups)
    zeros = sum(v == 0 for grp in groups for v in grp) / act.numel()
    pruned = sum(a != 0 and b == 0 for a, b in zip(act.flatten().tolist(), sparse.flatten().tolist())) / act.numel()
    st = sparsity_stats(act, sparse)
    assert float(st["groups_already_24"]) == pytest.approx(fits)
    assert float(st["activation_sparsity"]) == pytest.approx(zeros)
    assert float(st["pruned_beyond_relu"]) == pytest.approx(pruned)


def test_bad_shapes_and_methods() -> None:
    with pytest.raises(ValueError, match="multiple of 4"):
        naive_24(torch.ones(3, 6))
    with pytest.raises(ValueError, match="unknown 2:4 method"):
        sparsify_24(torch.ones(4, 8), "magic")


# ----------------------------------------------------------------------------- the relu2_24 FFN

from sparsetrain.sparse24.ffn import Sparse24FFN, _Sparse24FFN, densest_features, token_24  # noqa: E402


def _ffn_inputs(N=24, d=8, h=16):
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31 - 1, ())))
    x = torch.randn(N, d, generator=g, dtype=torch.float64)
    w_up = torch.randn(h, d, generator=g, dtype=torch.float64) * 0.5
    w_down = torch.randn(d, h, generator=g, dtype=torch.float64) * 0.5
    dy = torch.randn(N, d, generator=g, dtype=torch.float64)
    return x, w_up, w_down, dy


@pytest.mark.parametrize("method", ["naive", "mvue", "soft_threshold", "transposable"])
def test_ffn_gradients_equal_masked_dense_float64_reference(method: str) -> None:
    x, w_up, w_down, dy = _ffn_inputs()
    seed = int(torch.randint(0, 2**31 - 1, ()))
    args = [t.clone().requires_grad_(True) for t in (x, w_up, w_down)]
    y = _Sparse24FFN.apply(*args, method, 1.3, torch.Generator().manual_seed(seed), False, 0.0, None)
    y.backward(dy)
    # reference: plain autograd through the masked forward, the mask (and MVUE's 1/p, S-STE's threshold) held fixed
    ref = [t.clone().requires_grad_(True) for t in (x, w_up, w_down)]
    a = F.relu(ref[0] @ ref[1].t()).square()
    s_fixed, mask = sparsify_24(a.detach(), method, 1.3, torch.Generator().manual_seed(seed))
    if method in ("naive", "transposable"):
        s = a * mask
    elif method == "mvue":
        s = a * (s_fixed / a.detach().clamp(min=1e-300)).where(mask, torch.zeros_like(a))
    else:
        groups = a.detach().view(-1, 4)
        t = groups.sort(-1, descending=True).values[:, 2:3].expand(-1, 4).reshape(a.shape)  # 3rd largest per group
        s = 1.3 * mask.double() * (a - t)
    assert torch.allclose(y, s @ ref[2].t(), rtol=1e-10)
    (s @ ref[2].t()).backward(dy)
    for got, want in zip(args, ref):
        assert torch.allclose(got.grad, want.grad, rtol=1e-9, atol=1e-12)


def test_token_wise_pruning_of_weight_gradients() -> None:
    x, w_up, w_down, dy = _ffn_inputs(N=22)
    m = torch.randn(22, 16, dtype=torch.float64)
    dense = densest_features((m.abs() > 0.5).double(), 0.25)
    pruned = token_24(m, dense)
    assert pruned.shape == m.shape
    for f in range(16):
        col = pruned[:, f]
        if f in dense.tolist():
            assert torch.equal(col, m[:, f])
        else:
            padded = F.pad(col, (0, 2))
            assert ((padded.view(-1, 4) != 0).sum(-1) <= 2).all()
    args = [t.clone().requires_grad_(True) for t in (x, w_up, w_down)]
    _Sparse24FFN.apply(*args, "naive", 1.0, None, True, 0.0, None).backward(dy)
    a = F.relu(x @ w_up.t()).square()
    s, mask = naive_24(a)
    assert torch.allclose(args[2].grad, dy.t() @ token_24(s, None))
    du = (dy @ w_down) * mask * 2 * F.relu(x @ w_up.t())
    assert torch.allclose(args[1].grad, token_24(du, None).t() @ x)
    assert torch.allclose(args[0].grad, du @ w_up)  # the input gradient is not token-pruned


def test_ffn_module_warmup_and_permutation() -> None:
    torch.manual_seed(int(torch.randint(0, 2**31 - 1, ())))
    ffn = Sparse24FFN(8, 16, "naive", dense_warmup_steps=2).double()
    x = torch.randn(2, 6, 8, dtype=torch.float64)
    dense = ffn.down(F.relu(ffn.up(x)).square())
    for _ in range(2):
        assert not ffn.sparse and torch.equal(ffn(x), dense)
        ffn.step()
    assert ffn.sparse
    out = ffn(x)
    s, _ = naive_24(F.relu(ffn.up(x)).square())
    assert torch.allclose(out, ffn.down(s), rtol=1e-12)  # the token permutation is undone exactly
    assert not torch.allclose(out, dense)


def _compiled_graph_runs(prepare: bool, device: str) -> tuple[int, int, list[str]]:
    """(graphs compiled, graph calls in the third step, permutation warnings) of
    a 3-layer relu2_24 GPT compiled with a counting backend."""
    import collections
    import warnings

    from sparsetrain.config import build_config
    from sparsetrain.build import build_model
    from sparsetrain.sparse24 import prepare_ffns

    torch._dynamo.reset()
    cfg = build_config(preset="nano-125m", overrides={
        "seq_len": 64, "n_layer": 3, "d_model": 64, "n_head": 2, "vocab_size": 300, "ffn": "relu2_24",
        "activation_sparse_method": "transposable", "activation_dense_warmup_steps": 0})
    model = build_model(cfg.model).to(device)
    x = torch.randint(0, 300, (2, 64), device=device)
    if prepare:
        prepare_ffns(model, x.numel())
    runs: collections.Counter = collections.Counter()
    graphs: list = []

    def backend(gm, example_inputs):
        i = len(graphs)
        graphs.append(gm)

        def run(*args):
            runs[i] += 1
            return gm.forward(*args)
        return run

    compiled = torch.compile(model, backend=backend)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            runs.clear()
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device == "cuda"):
                compiled(x, x)[1].backward()
    torch._dynamo.reset()
    return len(graphs), sum(runs.values()), [str(w.message) for w in caught if "token permutation" in str(w.message)]


def test_permutations_made_before_compiling_spare_the_graph_breaks() -> None:
    """Made inside a compiled call, each layer's permutation is a graph break
    that dynamo keeps after it is cached (and the module warns); made before
    by prepare_ffns, those breaks are gone."""
    graphs_late, runs_late, warned = _compiled_graph_runs(prepare=False, device="cpu")
    graphs_early, runs_early, quiet = _compiled_graph_runs(prepare=True, device="cpu")
    assert warned and "prepare_ffns" in warned[0] and not quiet
    # the CPU's masked-dense path breaks for other reasons too; the permutation's breaks go
    assert graphs_early < graphs_late and runs_early < runs_late


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_compiled_2_4_model_is_one_graph_on_the_gpu() -> None:
    """On the GPU's fast path, with the permutations made first, the whole model is one graph."""
    graphs, runs, warned = _compiled_graph_runs(prepare=True, device="cuda")
    assert (graphs, runs, warned) == (1, 1, [])


def test_warmup_count_survives_a_state_dict_round_trip() -> None:
    ffn = Sparse24FFN(8, 16, "naive", dense_warmup_steps=2)
    ffn.step()
    ffn.step()
    assert ffn.sparse and int(ffn.steps) == 2
    fresh = Sparse24FFN(8, 16, "naive", dense_warmup_steps=2)
    assert not fresh.sparse
    fresh.load_state_dict(ffn.state_dict())
    assert fresh.sparse  # the host copy of the count is restored with the buffer


def test_ffn_module_collects_stats_when_asked() -> None:
    ffn = Sparse24FFN(8, 16, "transposable", dense_warmup_steps=0).double()
    x = torch.randn(2, 6, 8, dtype=torch.float64)
    ffn(x)
    assert ffn.last_stats == {} and ffn.last_backend == "masked_dense"
    ffn.track_stats = True
    ffn(x)
    assert set(ffn.last_stats) == {"activation_sparsity", "groups_already_24", "pruned_beyond_relu"}


def test_fast_path_statistics_helper_against_the_torch_mask(monkeypatch: pytest.MonkeyPatch) -> None:
    """The fast paths' statistics (the packing kernel's dense view; CPU:
    Triton's interpreter) count what the plain-torch transposable mask gives
    on the first STATS_TOKENS tokens, also inside a compiled function, where
    they are one node: fullgraph=True fails on any graph break."""
    from sparsetrain.sparse24 import ffn as ffn_module
    from sparsetrain.sparse24 import packing
    from sparsetrain.sparse24.ffn import fast_path_stats

    if packing.triton is None:
        pytest.skip("triton not installed")
    monkeypatch.setattr(ffn_module, "STATS_TOKENS", 64)
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31 - 1, ())))
    x = torch.randn(128, 64, generator=g).bfloat16()
    w = (torch.randn(128, 64, generator=g) / 8).bfloat16()
    a = torch.relu(F.linear(x[:64], w).float()).square().bfloat16()
    want = sparsity_stats(a, a * packing.transposable_mask(a))
    torch._dynamo.reset()
    compiled = torch.compile(lambda x, w: fast_path_stats(x, w), backend="eager", fullgraph=True)
    for got in (fast_path_stats(x, w), compiled(x, w)):
        assert set(got) == set(want)
        for k in want:
            assert float(got[k]) == pytest.approx(float(want[k]), abs=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fast_path_statistics_eager_and_compiled_on_gpu() -> None:
    """On a fast path, a logged step's statistics are 0-dim tensors, the same
    eager and compiled, and equal to the counts from the plain-torch
    transposable mask of relu(u)^2 on the same permuted tokens. Compiled, the
    FFN is one graph with them (fullgraph=True), and switching them on and off
    as the trainer does on log steps compiles one more graph, not one per
    logged step (a graph break there once recompiled at every logged step)."""
    from sparsetrain.sparse24 import packing, prepare_ffns

    torch.manual_seed(int(torch.randint(0, 2**31 - 1, ())))
    ffn = Sparse24FFN(128, 512, method="transposable", dense_warmup_steps=0).cuda()
    x = torch.randn(2, 128, 128, device="cuda")
    prepare_ffns(ffn, 256)
    ffn.track_stats = True
    with torch.autocast("cuda", dtype=torch.bfloat16):
        ffn(x)
        eager = dict(ffn.last_stats)
        graphs: list = []

        def backend(gm, example_inputs):
            graphs.append(gm)
            return gm.forward

        torch._dynamo.reset()
        compiled_ffn = torch.compile(ffn, backend=backend, fullgraph=True)
        compiled_ffn(x)
        compiled = dict(ffn.last_stats)
        for i in range(12):
            ffn.track_stats = i % 3 == 0
            compiled_ffn(x).sum().backward()
    torch._dynamo.reset()
    assert len(graphs) == 2
    assert ffn.last_backend in ("masked_kernel", "cusparselt")
    assert set(eager) == {"activation_sparsity", "groups_already_24", "pruned_beyond_relu"}
    assert all(v.dim() == 0 for v in eager.values())
    perm, _ = ffn._perms[256]
    u = F.linear(x.reshape(-1, 128).bfloat16()[perm], ffn.up.weight.bfloat16())
    a = torch.relu(u.float()).square().bfloat16()
    want = sparsity_stats(a, a * packing.transposable_mask(a))
    for k in want:
        assert float(eager[k]) == float(compiled[k])
        assert float(eager[k]) == pytest.approx(float(want[k]), abs=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cusparselt_path_equals_masked_dense_in_bf16() -> None:
    from sparsetrain.sparse24 import cusparselt

    if not cusparselt.cusparselt_available():
        pytest.skip("no cuSPARSELt")
    torch.manual_seed(0)
    N, d, h = 512, 256, 1024
    x = torch.randn(N, d, device="cuda", dtype=torch.bfloat16)
    w_up = torch.randn(h, d, device="cuda") / d**0.5
    w_down = torch.randn(d, h, device="cuda") / h**0.5
    dy = torch.randn(N, d, device="cuda", dtype=torch.bfloat16)
    errs = _errors_against_masked_dense(cusparselt.sparse24_ffn_cusparselt, x, w_up, w_down, dy)
    assert max(errs) < 3e-2, errs


def _errors_against_masked_dense(path, x, w_up, w_down, dy) -> list[float]:
    """Relative errors of ``path(x, w_up, w_down)``'s output and three gradients
    against the masked-dense transposable reference, both in bf16."""
    a = [t.clone().requires_grad_(True) for t in (x, w_up, w_down)]
    y = path(*a)
    y.backward(dy)
    b = [t.clone().requires_grad_(True) for t in (x, w_up, w_down)]
    y_ref = _Sparse24FFN.apply(b[0], b[1].bfloat16(), b[2].bfloat16(), "transposable", 1.0, None, False, 0.0, None)
    y_ref.backward(dy)

    def rel(p, q):
        return float((p.float() - q.float()).norm() / q.float().norm())

    return [rel(y, y_ref)] + [rel(got.grad, want.grad) for got, want in zip(a, b)]


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_masked_kernel_path_equals_masked_dense(device: str) -> None:
    """The transposable method on dense GEMMs with the Triton kernel's dense
    2:4 activation (CPU: Triton's interpreter) against the masked-dense
    reference, bf16 both; and on the GPU the FFN picks it below the kernel
    policy's cuSPARSELt width."""
    from sparsetrain import kernels
    from sparsetrain.sparse24 import packing
    from sparsetrain.sparse24.ffn import Sparse24FFN, sparse24_ffn_masked_kernel

    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    if packing.triton is None:
        pytest.skip("triton not installed")
    g = torch.Generator(device=device).manual_seed(int(torch.randint(0, 2**31 - 1, ())))
    N, d, h = 128, 64, 192
    x = torch.randn(N, d, device=device, generator=g).bfloat16()
    w_up = torch.randn(h, d, device=device, generator=g) / d**0.5
    w_down = torch.randn(d, h, device=device, generator=g) / h**0.5
    dy = torch.randn(N, d, device=device, generator=g).bfloat16()
    errs = _errors_against_masked_dense(sparse24_ffn_masked_kernel, x, w_up, w_down, dy)
    assert max(errs) < 1e-2, errs
    if device == "cuda":
        ffn = Sparse24FFN(d, h, method="transposable", dense_warmup_steps=0).cuda()
        assert d < kernels.current().cusparselt_min_width
        with torch.autocast("cuda", dtype=torch.bfloat16):
            ffn(torch.randn(2, 64, d, device="cuda"))
        assert ffn.last_backend == "masked_kernel"


def test_transposable_random_is_a_uniform_transposable_pattern_whatever_the_values() -> None:
    from sparsetrain.sparse24.packing import TRANSPOSABLE_PATTERNS, _pattern_mask
    from sparsetrain.sparse24.sparsify import transposable_random_24

    seed = int(torch.randint(0, 2**31 - 1, ()))
    x = torch.randn(160, 256, dtype=torch.float64)
    out, mask = transposable_random_24(x, torch.Generator().manual_seed(seed))
    assert is_24(out) and is_24(out.t()) and torch.equal(out, x * mask)
    assert (mask.reshape(40, 4, 64, 4).sum((1, 3)) == 8).all()  # 8 of 16 kept in every tile
    _, again = transposable_random_24(-3 * x, torch.Generator().manual_seed(seed))
    assert torch.equal(mask, again)  # the values play no part
    # every tile is one of the 90 patterns, each drawn about equally often:
    # 2560 tiles, 28.4 expected per pattern; chi-square with 89 dof stays below 150 with p > 0.9999
    tiles = mask.reshape(40, 4, 64, 4).permute(0, 2, 1, 3).reshape(-1, 16)
    patterns = torch.stack([torch.tensor(_pattern_mask(p)).flatten() for p in TRANSPOSABLE_PATTERNS])
    hits = (tiles[:, None, :] == patterns[None]).all(-1)
    assert (hits.sum(1) == 1).all()
    counts = hits.sum(0).double()
    expected = tiles.shape[0] / 90
    assert float(((counts - expected) ** 2 / expected).sum()) < 150


def test_fast_paths_are_custom_ops_that_compile_without_a_graph_break() -> None:
    """The masked-kernel path is a custom op pair (Triton's interpreter on CPU):
    torch.library.opcheck passes (schema, fake tensors, autograd registration),
    and torch.compile traces it whole (fullgraph) with the same outputs and
    gradients as eager."""
    from sparsetrain.sparse24 import packing
    from sparsetrain.sparse24.ffn import sparse24_ffn_masked_kernel

    if packing.triton is None:
        pytest.skip("triton not installed")
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31 - 1, ())))
    x = torch.randn(64, 64, generator=g).bfloat16()
    w_up = (torch.randn(128, 64, generator=g) / 8).requires_grad_(True)
    w_down = (torch.randn(64, 128, generator=g) / 11).requires_grad_(True)
    torch.library.opcheck(sparse24_ffn_masked_kernel.op, (x, w_up, w_down),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))

    def run(fn):
        xg = x.clone().requires_grad_(True)
        y = fn(xg, w_up, w_down)
        grads = torch.autograd.grad(y.float().square().sum(), (xg, w_up, w_down))
        return (y, *grads)

    eager = run(sparse24_ffn_masked_kernel)
    compiled = run(torch.compile(sparse24_ffn_masked_kernel, backend="eager", fullgraph=True))
    for a, b in zip(eager, compiled):
        assert torch.equal(a, b)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_sparse_ffn_module_compiles_whole_on_gpu() -> None:
    """On CUDA the relu2_24 module (transposable, either fast path) compiles with
    fullgraph=True: no graph break anywhere in its forward; same output as eager.
    The path follows the kernel policy the module was given."""
    from sparsetrain.kernels import KernelPolicy
    from sparsetrain.sparse24.cusparselt import cusparselt_available

    torch.manual_seed(int(torch.randint(0, 2**31 - 1, ())))
    for min_width in ((0, 1 << 30) if cusparselt_available() else (1 << 30,)):
        ffn = Sparse24FFN(128, 512, method="transposable", dense_warmup_steps=0,
                          policy=KernelPolicy(cusparselt_min_width=min_width)).cuda()
        x = torch.randn(2, 128, 128, device="cuda")
        with torch.autocast("cuda", dtype=torch.bfloat16):
            want = ffn(x)  # eager first: the token permutation is made and cached
            torch._dynamo.reset()
            got = torch.compile(ffn, fullgraph=True)(x)
        assert ffn.last_backend == ("cusparselt" if min_width == 0 else "masked_kernel")
        assert torch.allclose(got.float(), want.float(), rtol=1e-2, atol=1e-2)


def test_cuda_graph_modes_need_the_cached_plans(monkeypatch: pytest.MonkeyPatch) -> None:
    """CUDA-graph compile modes with the transposable FFN are refused (ConfigError,
    exit 2 from the CLI) exactly where cuSPARSELt would run through torch's op."""
    from sparsetrain.config import build_config
    from sparsetrain.errors import ConfigError
    from sparsetrain.build import build_model
    from sparsetrain.sparse24 import cslt_plans, cusparselt
    from sparsetrain.trainer import prepare_sparse24

    cfg = build_config("tiny", overrides={"ffn": "relu2_24", "activation_sparse_method": "transposable",
                                          "compile": True, "compile_mode": "reduce-overhead"})
    model = build_model(cfg.model)
    cuda = torch.device("cuda")
    prepare_sparse24(cfg, model, torch.device("cpu"))  # no cuSPARSELt on the CPU: nothing to refuse
    monkeypatch.setattr(cusparselt, "cusparselt_available", lambda: True)
    monkeypatch.setattr(cslt_plans, "load", lambda: object())
    prepare_sparse24(cfg, model, cuda)
    monkeypatch.setattr(cslt_plans, "load", lambda: None)
    with pytest.raises(ConfigError, match="compile_mode reduce-overhead .* cached cuSPARSELt plans"):
        prepare_sparse24(cfg, model, cuda)
    cfg.compile_mode = "max-autotune-no-cudagraphs"
    prepare_sparse24(cfg, model, cuda)
    cfg.compile_mode = "reduce-overhead"
    dense = build_model(build_config("tiny", overrides={"ffn": "relu2"}).model)
    prepare_sparse24(cfg, dense, cuda)  # no 2:4 FFN, nothing to refuse


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_sparse_ffn_on_cusparselt_runs_under_cuda_graphs(monkeypatch: pytest.MonkeyPatch) -> None:
    """torch.compile's reduce-overhead mode (CUDA graph trees: warm-up, record,
    then replays) gives eager's output and gradients on the cuSPARSELt path,
    also when the graphed call comes first in the process: the packing kernel's
    pattern table, made by prepare_ffns, is not left untracked in the graphs'
    memory pool (made in the warm-up, it stopped the d20 step with "Detected 1
    tensor(s) in the cudagraph pool not tracked as outputs")."""
    from sparsetrain import kernels
    from sparsetrain.sparse24 import cslt_plans, packing, prepare_ffns
    from sparsetrain.sparse24.cusparselt import cusparselt_available

    if not cusparselt_available() or cslt_plans.load() is None:
        pytest.skip("needs cuSPARSELt and the cached-plan extension")
    torch.manual_seed(int(torch.randint(0, 2**31 - 1, ())))
    ffn = Sparse24FFN(128, 512, method="transposable", dense_warmup_steps=0,
                      policy=kernels.current().replace(cusparselt_min_width=0)).cuda()  # cuSPARSELt at any width
    packing.pattern_table.cache_clear()
    prepare_ffns(ffn, 2 * 128)
    assert packing.pattern_table.cache_info().currsize == 1
    torch._dynamo.reset()
    graphed = torch.compile(ffn, mode="reduce-overhead", fullgraph=True)

    def run(fn, x):
        x = x.clone().requires_grad_(True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = fn(x)
        grads = torch.autograd.grad(y.float().square().sum(), (x, ffn.up.weight, ffn.down.weight))
        return [t.detach().clone() for t in (y, *grads)]

    for _ in range(4):
        x = torch.randn(2, 128, 128, device="cuda")
        got, want = run(graphed, x), run(ffn, x)
        assert ffn.last_backend == "cusparselt"
        for a, b in zip(got, want):
            assert torch.allclose(a.float(), b.float(), rtol=2e-2, atol=2e-2)
