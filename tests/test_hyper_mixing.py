"""The hyper-connection stream mixing (sparsetrain.hyper_mixing), plain torch and the
Triton kernels (Triton's interpreter on CPU), against the mHC-lite formulas written
out term by term in float64: outputs and every gradient.

Every output and gradient is a sum of products of the inputs, so the same formulas
on the inputs' absolute values (and the output gradients') give each one's sum of
|terms|: the scale that floating-point rounding is bounded by (Higham ch. 4)."""

from __future__ import annotations

import pytest
import torch

from sparsetrain import hyper_mixing
from sparsetrain.hyper_mixing import read, read_through, write, write_then_read

from conftest import fresh_seed

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
OPERATIONS = ("read", "read_through", "write", "write_then_read")
# the most machine epsilons of the streams' dtype, times the sum of |terms|, an output
# or gradient may be off by: a few roundings per term, and sums of up to a tile of terms
# (in float32 registers) or of n + 1 terms in the streams' dtype (plain torch)
ROUNDINGS = {torch.float64: 16, torch.float32: 16, torch.bfloat16: 4}


def fresh_generator() -> torch.Generator:
    return torch.Generator().manual_seed(fresh_seed())


def formula(op: str, X: torch.Tensor, f: torch.Tensor, H: torch.Tensor, q: torch.Tensor, p: torch.Tensor
            ) -> list[torch.Tensor]:
    """The operation's outputs by the mHC-lite formulas, one term at a time:
    ``Y_i = sum_j H_ij X_j + q_i f`` (or ``Y = X`` for the reads) and ``a = sum_i p_i Y_i``."""
    n = X.shape[-2]
    if op in ("write", "write_then_read"):
        Y = torch.stack([sum(H[i, j] * X[..., j, :] for j in range(n)) + q[i] * f for i in range(n)], dim=-2)
    else:
        Y = X
    a = sum(p[i] * Y[..., i, :] for i in range(n))
    return {"read": [a], "read_through": [a, Y], "write": [Y], "write_then_read": [Y, a]}[op]


def run(op: str, X, f, H, q, p) -> list[torch.Tensor]:
    if op == "read":
        return [read(X, p)]
    if op == "read_through":
        return list(read_through(X, p))
    if op == "write":
        return [write(X, f, H, q)]
    return list(write_then_read(X, f, H, q, p))


def inputs(n: int, dtype: torch.dtype, g: torch.Generator, rows: tuple[int, ...] = (2, 5), D: int = 300,
           out_dtype: torch.dtype | None = None):
    """Streams ``[*rows, n, D]`` in ``dtype`` and a sublayer output in ``out_dtype`` (default
    ``dtype``); the mixing weights as the model makes them: float32 (float64 for float64
    streams), positive."""
    wdt = torch.float64 if dtype == torch.float64 else torch.float32
    X = torch.randn(*rows, n, D, generator=g).to(DEVICE, dtype)
    f = torch.randn(*rows, D, generator=g).to(DEVICE, out_dtype or dtype)
    H = torch.rand(n, n, generator=g).to(DEVICE, wdt)
    q = (2 * torch.rand(n, generator=g)).to(DEVICE, wdt)
    p = torch.rand(n, generator=g).to(DEVICE, wdt)
    return X, f, H, q, p


def coarser(a: torch.dtype, b: torch.dtype) -> torch.dtype:
    return a if torch.finfo(a).eps >= torch.finfo(b).eps else b


# (streams, sublayer output): one precision throughout, and the model's under autocast
DTYPES = [(torch.float64, torch.float64), (torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
          (torch.float32, torch.bfloat16)]


@pytest.mark.parametrize("dtypes", DTYPES, ids=lambda d: f"{str(d[0])[6:]}-{str(d[1])[6:]}")
@pytest.mark.parametrize("n", [1, 2, 3, 4])
@pytest.mark.parametrize("op", OPERATIONS)
def test_operation_matches_the_formulas(op: str, n: int, dtypes: tuple[torch.dtype, torch.dtype], mixing_path: str) -> None:
    """Outputs and the gradients of the streams, the sublayer output and the three
    weights; 2 x 5 rows and D = 300: rows and columns over several tiles, partly masked.
    Each within its rounding bound: the streams' dtype's, or its own where coarser."""
    dtype, out_dtype = dtypes
    g = fresh_generator()
    args = inputs(n, dtype, g, out_dtype=out_dtype)
    leaves = [t.detach().requires_grad_() for t in args]
    got = run(op, *leaves)
    ups = [torch.randn(t.shape, generator=g).to(DEVICE, t.dtype) for t in got]
    names = {"read": "Xp", "read_through": "Xp", "write": "XfHq", "write_then_read": "XfHqp"}[op]
    used = [t for t, name in zip(leaves, "XfHqp") if name in names]
    got_grads = torch.autograd.grad(sum((t.double() * u.double()).sum() for t, u in zip(got, ups)), used)

    def exact(values, upstream):
        xs = [t.detach().double().requires_grad_() for t in values]
        out = formula(op, *xs)
        grads = torch.autograd.grad(sum((t * u.double()).sum() for t, u in zip(out, upstream)),
                                    [x for x, leaf in zip(xs, leaves) if any(leaf is u for u in used)])
        return [t.detach() for t in out], list(grads)

    want, want_grads = exact(args, ups)
    scale, scale_grads = exact([t.abs() for t in args], [u.abs() for u in ups])  # the sums of |terms|
    # The weights' gradients (float32 leaves) sum products that are exact in float32 of
    # values held in the streams' dtype: their own dtype bounds them, except where they
    # read a rounded intermediate (write_then_read's read sees the stored Y, and its
    # gradient reaches H and q through Y).
    weight_names = [name for name in "XfHqp" if name in names and name in "Hqp"]
    rounded_intermediate = op == "write_then_read"
    kinds = ["out"] * len(got) + [name if name in "Hqp" else "grad" for name in "XfHqp" if name in names]
    for name, a, w, s in zip(kinds, got + list(got_grads), want + want_grads, scale + scale_grads):
        assert a.shape == w.shape, (name, a.shape, w.shape)
        rounding = a.dtype if name in weight_names and not rounded_intermediate else coarser(dtype, a.dtype)
        bound = ROUNDINGS[rounding] * torch.finfo(rounding).eps
        err = (a.double() - w).abs()
        assert (err <= bound * s + 1e-300).all(), (name, float(err.max()), float((err / s.clamp(min=1e-300)).max()))
    for t in got:  # the streams and the read keep the streams' dtype
        assert t.dtype == dtype
    for gr, leaf in zip(got_grads, used):
        assert gr.dtype == leaf.dtype


@pytest.mark.parametrize("op", ["read", "write"])
def test_bfloat16_streams_are_summed_in_float32_and_rounded_once(op: str, mixing_path: str) -> None:
    """``model.hyper_stream_dtype = bfloat16``: every path sums in float32 and rounds its
    result to bfloat16 once, so each output is the float64 formula correctly rounded
    (within half a bfloat16 ulp, plus float32's sum error where the value lies near a
    tie) and equal to it to the bit almost everywhere. Sums in bfloat16 would be off by
    several ulps."""
    g = fresh_generator()
    X, f, H, q, p = inputs(4, torch.bfloat16, g, rows=(3, 7), D=300)
    got = read(X, p) if op == "read" else write(X, f, H, q)
    want = formula(op, *(t.double() for t in (X, f, H, q, p)))[0]
    scale = formula(op, *(t.double().abs() for t in (X, f, H, q, p)))[0]  # the sums of |terms|
    assert got.dtype == torch.bfloat16
    err = (got.double() - want).abs()
    assert (err <= 2.0**-8 * want.abs() + 2.0**-20 * scale).all(), float((err / want.abs().clamp(min=1e-30)).max())
    exact = (got == want.to(torch.float32).to(torch.bfloat16)).double().mean()
    assert exact >= 0.99, float(exact)


@pytest.mark.parametrize("mixing_path", ["kernel", "kernel_op"], indirect=True)  # plain torch runs them apart itself
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_write_then_read_is_the_write_and_the_read_bit_for_bit(dtype: torch.dtype, mixing_path: str) -> None:
    """The fused kernel gives the streams and the read that the two operations' kernels
    give one after the other (the read sees the streams as stored): the model's block
    and Collider's recomputation, which runs them apart, agree exactly."""
    X, f, H, q, p = inputs(4, dtype, fresh_generator())
    y, a = write_then_read(X, f, H, q, p)
    y_apart = write(X, f, H, q)
    assert torch.equal(y, y_apart)
    assert torch.equal(a, read(y_apart, p))
    a_through, same = read_through(X, p)
    assert torch.equal(a_through, read(X, p)) and torch.equal(same, X)


def test_gradient_reaching_the_passed_through_streams_is_added_to_the_reads(mixing_path: str) -> None:
    """``read_through``'s streams output carries its gradient back to the input."""
    X, _, _, _, p = inputs(2, torch.float64, fresh_generator())
    X.requires_grad_()
    a, same = read_through(X, p)
    up = torch.randn(same.shape, dtype=X.dtype, device=DEVICE)
    (dx,) = torch.autograd.grad((a.sum() + (same * up).sum()), X)
    want = up + p[:, None]  # d(sum a)/dX_i = p_i, plus the gradient that reached the streams
    assert torch.allclose(dx, want.expand_as(dx), rtol=1e-12, atol=1e-12)


def test_no_rows(mixing_path: str) -> None:
    """No rows (a Collider step that keeps no token): empty outputs, zero weight gradients."""
    X, f, H, q, p = (t.detach().requires_grad_() for t in inputs(4, torch.float32, fresh_generator(), rows=(0,)))
    y, a = write_then_read(X, f, H, q, p)
    assert y.shape == (0, 4, 300) and a.shape == (0, 300)
    grads = torch.autograd.grad((y.sum() + a.sum()), (X, f, H, q, p))
    assert all(float(gr.abs().sum()) == 0.0 for gr in grads)


def test_kernel_policy_chooses_the_path(monkeypatch) -> None:
    """The kernels run in eager mode unless ``fused_hyper_mixing`` turns them off, and
    inside torch.compile only where ``fused_hyper_mixing_compiled`` turns them on (as the
    custom op there); CPU tensors (outside the interpreter's tests) take plain torch."""
    from sparsetrain import kernels

    compiling = [False]
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: compiling[0])
    for eager_flag in (True, False):
        for compiled_flag in (True, False):
            with kernels.using(fused_hyper_mixing=eager_flag, fused_hyper_mixing_compiled=compiled_flag):
                compiling[0] = False
                assert hyper_mixing.policy_allows_kernel() == eager_flag and not hyper_mixing.as_custom_op()
                compiling[0] = True
                assert hyper_mixing.policy_allows_kernel() == compiled_flag and hyper_mixing.as_custom_op()
                assert not hyper_mixing.uses_kernel(torch.zeros(2, 2, 4))  # CPU
    compiling[0] = False
    assert kernels.KernelPolicy().fused_hyper_mixing_compiled  # on by default: measured faster than inductor's fusion
    if torch.cuda.is_available() and hyper_mixing.triton is not None:
        assert hyper_mixing.uses_kernel(torch.zeros(2, 2, 4, device="cuda"))


def _op_cases() -> dict[str, tuple]:
    """Inputs of each node kind, streams in several dtypes and layouts, rows from none up."""
    cases = {}
    for dtype, out_dtype in ((torch.float32, torch.bfloat16), (torch.float64, torch.float64),
                             (torch.bfloat16, torch.bfloat16)):
        for rows in ((2, 3), (0,)):
            X, f, H, q, p = (t.detach().requires_grad_() for t in
                             inputs(3, dtype, fresh_generator(), rows=rows, D=40, out_dtype=out_dtype))
            tag = f"{str(dtype)[6:]}-{str(out_dtype)[6:]}-{rows[0]}rows"
            cases[f"read-{tag}"] = (X, None, None, None, p)
            cases[f"write-{tag}"] = (X, f, H, q, None)
            cases[f"write_then_read-{tag}"] = (X, f, H, q, p)
    X, f, H, q, p = inputs(3, torch.float32, fresh_generator(), rows=(3, 2), D=40)
    Xt = X.detach().transpose(0, 1).requires_grad_()  # streams that are not contiguous
    cases["write_then_read-noncontiguous"] = (Xt, f.detach().transpose(0, 1).requires_grad_(),
                                              H.requires_grad_(), q.requires_grad_(), p.requires_grad_())
    return cases


OP_CASES = _op_cases() if hyper_mixing.triton is not None else {}


@pytest.mark.skipif(hyper_mixing.triton is None, reason="triton not installed")
@pytest.mark.parametrize("case", list(OP_CASES))
def test_custom_ops_pass_opcheck(case: str) -> None:
    """The op pair's schemas, fake (meta) functions and autograd registration agree with
    what the kernels do (torch.library.opcheck): the forward op on each node kind, and the
    backward op on the forward's outputs' gradients."""
    args = OP_CASES[case]
    torch.library.opcheck(hyper_mixing._mix_forward_op, args)
    X, f, H, q, p = args
    y, a = hyper_mixing._mix_forward_op(*args)
    dy = torch.randn_like(y) if H is not None else None
    da = torch.randn_like(a) if p is not None else None
    torch.library.opcheck(hyper_mixing._mix_backward_op, (dy, da, *(t.detach() if t is not None else None
                                                                   for t in args)))


@pytest.mark.skipif(hyper_mixing.triton is None, reason="triton not installed")
@pytest.mark.parametrize("dtypes", [(torch.float32, torch.float32), (torch.float64, torch.float64),
                                    (torch.float32, torch.bfloat16), (torch.bfloat16, torch.bfloat16)],
                         ids=["float32", "float64", "float32-bfloat16", "bfloat16"])
def test_compiled_block_with_the_custom_op_matches_plain_torch(dtypes, monkeypatch) -> None:
    """A block's mixing (read_through, write_then_read, write) under torch.compile, with
    the kernels as the custom op pair (found in the forward and backward graphs), against
    the same function in plain torch: outputs and every gradient, to the rounding of the
    streams' and the sublayer output's dtypes. The graphs go through AOT autograd, as
    inductor's do, without inductor's code generation (the CPU runs the kernels in
    Triton's interpreter)."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    dtype, out_dtype = dtypes
    monkeypatch.setattr(hyper_mixing, "uses_kernel", hyper_mixing.kernel_ok)
    X, f, H, q, p = inputs(4, dtype, fresh_generator(), rows=(3, 7), D=96, out_dtype=out_dtype)
    g = torch.randn(X.shape[:-2] + X.shape[-1:]).to(DEVICE, out_dtype)

    def block(X, f, H, q, p):
        a, X = read_through(X, p)
        X, a2 = write_then_read(X, f * torch.tanh(a).to(f.dtype), H, q, p)
        return write(X, f * torch.tanh(a2).to(f.dtype) + g, H, q)

    ops: dict[str, set[str]] = {"forward": set(), "backward": set()}

    def recorder(kind: str):
        def compiler(gm: torch.fx.GraphModule, example_inputs):
            ops[kind] |= {str(node.target) for node in gm.graph.nodes if node.op == "call_function"}
            return make_boxed_func(gm.forward)
        return compiler

    leaves = [t.detach().requires_grad_() for t in (X, f, H, q, p)]
    torch._dynamo.reset()
    compiled = torch.compile(block, backend=aot_autograd(fw_compiler=recorder("forward"),
                                                         bw_compiler=recorder("backward")), fullgraph=True)
    got = compiled(*leaves)
    up = torch.randn(got.shape, dtype=torch.float64).to(DEVICE, got.dtype)
    got_grads = torch.autograd.grad((got * up).sum(), leaves)
    torch._dynamo.reset()
    assert "sparsetrain.hyper_mix.default" in ops["forward"], ops["forward"]
    assert "sparsetrain.hyper_mix_backward.default" in ops["backward"], ops["backward"]
    monkeypatch.setattr(hyper_mixing, "uses_kernel", lambda streams: False)
    ref_leaves = [t.detach().requires_grad_() for t in (X, f, H, q, p)]
    want = block(*ref_leaves)
    want_grads = torch.autograd.grad((want * up).sum(), ref_leaves)
    tol = {torch.float64: 1e-12, torch.float32: 1e-5}[dtype] if out_dtype != torch.bfloat16 else 2e-2
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)
    for name, a, w in zip("XfHqp", got_grads, want_grads):
        torch.testing.assert_close(a, w, rtol=tol, atol=tol * 10, msg=lambda m: f"d{name}: {m}")


@pytest.mark.skipif(not torch.cuda.is_available() or hyper_mixing.triton is None, reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("mode", ["reduce-overhead", "max-autotune"])
def test_custom_op_under_cuda_graph_compile_modes_matches_plain_torch(mode: str, monkeypatch) -> None:
    """The kernels as the custom op pair inside inductor's CUDA graphs (``compile_mode``
    reduce-overhead and max-autotune): the graph is recorded once and replayed, so the
    op must neither allocate outside the graph's pool nor keep a pointer from the
    recording. Three calls on fresh inputs (warm-up, recording, replay), each against
    the same block compiled without CUDA graphs (the same kernels: equal to the bit
    under reduce-overhead) and against plain torch in float32, outputs and every
    gradient. A stale pointer would return another call's values, far outside both.
    Inductor skips CUDA graphs (and still runs) where it cannot take them, so the test
    also asserts it skipped none and that the op is in the graph it compiled."""
    from torch._dynamo.utils import counters
    from torch._inductor.utils import run_and_get_code

    monkeypatch.setattr(hyper_mixing, "uses_kernel", hyper_mixing.kernel_ok)

    def block(X, f, H, q, p):
        a, X = read_through(X, p)
        X, a2 = write_then_read(X, f * torch.tanh(a), H, q, p)
        return write(X, f * torch.tanh(a2), H, q)

    def outputs_and_grads(fn, tensors, up):
        leaves = [t.detach().requires_grad_() for t in tensors]
        out = fn(*leaves)
        grads = torch.autograd.grad((out * up).sum(), leaves)
        return [out.detach().clone()] + [g.clone() for g in grads]  # copied out of a graph's pool

    torch._dynamo.reset()
    counters.clear()
    graphed = torch.compile(block, mode=mode, fullgraph=True)
    plain_compiled = torch.compile(block, mode="default", fullgraph=True)
    for call in range(3):
        tensors = inputs(4, torch.float32, fresh_generator(), rows=(2, 64), D=256)
        up = torch.randn(2, 64, 4, 256, device=DEVICE)
        if call == 0:  # the first call compiles: its generated code names the op
            _, code = run_and_get_code(lambda: graphed(*[t.detach().requires_grad_() for t in tensors]))
            assert "sparsetrain.hyper_mix" in "\n".join(code)
        got = outputs_and_grads(graphed, tensors, up)
        same_kernels = outputs_and_grads(plain_compiled, tensors, up)
        with monkeypatch.context() as m:
            m.setattr(hyper_mixing, "uses_kernel", lambda streams: False)
            want = outputs_and_grads(block, tensors, up)
        for name, a, b, w in zip(["out"] + [f"d{c}" for c in "XfHqp"], got, same_kernels, want):
            if mode == "reduce-overhead":
                assert torch.equal(a, b), name
            torch.testing.assert_close(a, w, rtol=1e-4, atol=1e-4, msg=lambda msg: f"{name}: {msg}")
    assert counters["inductor"]["cudagraph_skips"] == 0, dict(counters["inductor"])
    torch._dynamo.reset()
