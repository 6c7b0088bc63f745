"""mHC-lite: H_res doubly stochastic, symmetry broken at init, analysis numbers by hand."""

from __future__ import annotations

import math

import pytest
import torch

from sparsetrain.build import build_model
from sparsetrain.config import ModelConfig
from sparsetrain.hyper import HyperConnection, analyze_layer, analyze_model, report, stream_divergence
from sparsetrain.model import GPT

from conftest import fresh_seed


@pytest.mark.parametrize("n", [2, 4])
def test_h_res_is_doubly_stochastic(n: int) -> None:
    hc = HyperConnection(n, 0)
    hc.res_logits.data.normal_(0, 3)
    h = hc.h_res().double()
    assert h.shape == (n, n) and (h >= 0).all()
    assert torch.allclose(h.sum(0), torch.ones(n, dtype=torch.float64), atol=1e-6)
    assert torch.allclose(h.sum(1), torch.ones(n, dtype=torch.float64), atol=1e-6)


def _model(n: int) -> GPT:
    torch.manual_seed(int(torch.randint(0, 2**31 - 1, ())))
    return build_model(ModelConfig(vocab_size=300, seq_len=16, n_layer=2, n_head=2, d_model=32, hyper_connections=n))


def _step(model: GPT) -> None:
    device = model.embed.weight.device
    idx = torch.randint(0, 300, (4, 16), device=device)
    model.zero_grad(set_to_none=True)
    model(idx, torch.randint(0, 300, (4, 16), device=device))[1].backward()


@pytest.mark.parametrize("n", [2, 4])
@pytest.mark.parametrize("write_init", ["every_stream", "next_stream"])
def test_the_write_init_puts_the_output_where_it_says(n: int, write_init: str) -> None:
    """At init a sublayer's write adds its output to every stream with gain 1
    (every_stream), or with gain 2 sigmoid(3) to stream (l + 1) mod n and
    2 sigmoid(-3) to the others (next_stream): the write minus H_res X, in float64,
    against those gains."""
    index = int(torch.randint(0, 2 * 12, ()))
    hc = HyperConnection(n, index, write_init).double()
    X, out = torch.randn(3, 5, n, 16, dtype=torch.float64), torch.randn(3, 5, 16, dtype=torch.float64)
    with torch.no_grad():
        added = hc.write(X, out) - torch.einsum("ij,...jd->...id", hc.h_res(), X)
    if write_init == "every_stream":
        gains = torch.ones(n, dtype=torch.float64)
    else:
        gains = torch.full((n,), 2 / (1 + math.exp(3)), dtype=torch.float64)
        gains[(index + 1) % n] = 2 / (1 + math.exp(-3))
    torch.testing.assert_close(added, gains[:, None] * out[..., None, :], rtol=1e-12, atol=1e-12)


def test_every_stream_init_with_sharp_gains_is_the_plain_residual() -> None:
    """Hyper-Connections' start is a Pre-Norm residual: with every sublayer writing to
    every stream (the every_stream init), ``H_res = I``, one-hot reads, equal entry
    scales and a read-out summing to 1, the model's logits are the plain GPT's with
    the same weights (float64). The next_stream init, sharpened the same way, is
    another network."""
    def logits(write_init: str) -> torch.Tensor:
        torch.manual_seed(seed)
        cfg = ModelConfig(vocab_size=300, seq_len=16, n_layer=3, n_head=2, d_model=32)
        plain = build_model(cfg).double()
        hyper = build_model(ModelConfig(**{**cfg.__dict__, "hyper_connections": 2,
                                           "hyper_write_init": write_init})).double()
        missing, unexpected = hyper.load_state_dict(plain.state_dict(), strict=False)
        assert not unexpected and all("hc_" in k or k.startswith("hyper_") for k in missing), missing
        for hc in (m for m in hyper.modules() if isinstance(m, HyperConnection)):
            hc.res_logits.data = torch.tensor([60.0, 0.0], dtype=torch.float64)  # H_res = I to float64
            hc.pre_logits.data = torch.where(hc.pre_logits.data > 0, 60.0, -60.0).double()  # one-hot reads
            if write_init == "next_stream":  # its own gains sharpened: 2 on one stream, 0 elsewhere
                hc.post_logits.data = torch.where(hc.post_logits.data > 0, 60.0, -60.0).double()
        hyper.hyper_in.data.fill_(1.0)
        hyper.hyper_out.data.fill_(0.5)
        with torch.no_grad():
            return plain(idx)[0], hyper(idx)[0]

    seed = int(torch.randint(0, 2**31 - 1, ()))
    idx = torch.randint(0, 300, (2, 16))
    want, got = logits("every_stream")
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    want, other = logits("next_stream")
    assert float((other - want).abs().max()) > 1e-2


def test_identical_streams_give_the_mixing_no_gradient_and_the_init_breaks_it() -> None:
    model = _model(4)
    hcs = [m for m in model.modules() if isinstance(m, HyperConnection)]
    for hc in hcs:  # a symmetric init: identical streams, every sublayer reads and writes them alike
        for p in (hc.res_logits, hc.pre_logits, hc.post_logits):
            p.data.zero_()
    model.hyper_in.data.fill_(1.0)
    model.hyper_out.data.fill_(0.25)
    _step(model)
    # zero up to rounding: the streams stay identical, and H X = X for any doubly stochastic H
    assert all(float(hc.res_logits.grad.abs().max()) < 1e-7 for hc in hcs)
    model = _model(4)  # sparsetrain's init
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for _ in range(3):
        _step(model)
        opt.step()
    rep = report(model, torch.randint(0, 300, (2, 16)))
    assert all(l["grad_norm"]["res"] > 1e-6 for l in rep["layers"]), [l["grad_norm"]["res"] for l in rep["layers"]]
    assert all(l["stream_divergence"] > 1e-3 for l in rep["layers"])
    assert rep["composed_res_gain"] == pytest.approx(1.0, abs=1e-5)


def test_analysis_matches_hand_computed_case() -> None:
    hcs = [HyperConnection(2, 0), HyperConnection(2, 1)]
    for hc in hcs:
        hc.res_logits.data = torch.tensor([math.log(3.0), 0.0])
        hc.pre_logits.data.zero_()
        hc.post_logits.data.zero_()
    streams = torch.tensor([[1.0, 0.0], [0.0, 1.0]])  # [n=2, D=2]
    layer = analyze_layer(hcs[0], streams)
    assert layer["perm_weights"] == pytest.approx([0.75, 0.25])
    assert layer["perm_entropy"] == pytest.approx(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25)))
    assert layer["read_gain"] == pytest.approx(1.0) and layer["write_gain"] == pytest.approx(1.0)
    assert layer["stream_divergence"] == pytest.approx(math.sqrt(2.0))
    assert torch.allclose(hcs[0].h_res(), torch.tensor([[0.75, 0.25], [0.25, 0.75]]))
    rep = analyze_model(hcs, [streams, streams])
    assert rep["composed_res_gain"] == pytest.approx(1.0, abs=1e-6)
    assert rep["composed_res_distance_from_identity"] == pytest.approx(0.75, abs=1e-6)  # ||H^2 - I||_F
    assert rep["healthy"]
    assert stream_divergence(torch.stack([streams[0], streams[0]])) == 0.0
    hcs[1].res_logits.data = torch.tensor([30.0, 0.0])  # collapsed onto the identity
    assert analyze_model(hcs)["problems"] == ["sublayer 1: H_res collapsed onto one permutation"]
    hcs[1].res_logits.data = torch.tensor([math.log(3.0), 0.0])
    hcs[0].post_logits.data.fill_(-6.0)  # write gain 2 sigmoid(-6) = 0.005: the sublayer's output barely lands
    assert analyze_model(hcs)["problems"] == ["sublayer 0: read or write gain below 0.05 (cut off from the streams)"]


def test_a_run_saved_before_the_write_init_field_resumes_as_it_started() -> None:
    """A hyper-connection run whose saved config predates ``hyper_write_init`` started
    next_stream: resumed from its config.toml it is next_stream, its checkpoint compares
    equal to that, and the new default against it is named as the difference. A run
    without hyper-connections takes today's default (the field does nothing there)."""
    from sparsetrain.config import build_config
    from sparsetrain.errors import CheckpointError
    from sparsetrain.trainer import compare_model_configs

    saved = {k: v for k, v in ModelConfig(hyper_connections=2).__dict__.items() if k != "hyper_write_init"}
    cfg = build_config(base={"model": dict(saved)})
    assert cfg.model.hyper_write_init == "next_stream"
    compare_model_configs(dict(saved), cfg.model, "old")
    with pytest.raises(CheckpointError, match="hyper_write_init='next_stream' there vs 'every_stream' here"):
        compare_model_configs(dict(saved), ModelConfig(hyper_connections=2), "old")
    plain = {k: v for k, v in ModelConfig().__dict__.items() if k != "hyper_write_init"}
    assert build_config(base={"model": plain}).model.hyper_write_init == "every_stream"
    assert ModelConfig().hyper_write_init == "every_stream"


@pytest.mark.parametrize("n", [2, 4])
def test_causality_with_hyper_connections(n: int) -> None:
    model = _model(n).double()
    idx = torch.randint(0, 300, (1, 16))
    base, _ = model(idx)
    changed = idx.clone()
    changed[:, 9:] = torch.randint(0, 300, (1, 7))
    out, _ = model(changed)
    assert torch.equal(out[:, :9], base[:, :9])


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"))])
def test_report_runs_where_the_model_lives(device: str) -> None:
    # the composed residual map is a tiny product computed on the CPU; a CUDA model once broke it
    cfg = ModelConfig(vocab_size=300, seq_len=16, n_layer=2, n_head=2, d_model=16, hyper_connections=2)
    model = build_model(cfg).to(device)
    out = report(model, torch.randint(0, 300, (2, 16), device=device))
    assert math.isfinite(out["composed_res_gain"]) and abs(out["composed_res_gain"] - 1.0) < 1e-6  # doubly stochastic


@pytest.mark.parametrize("n", [2, 4])
def test_mixing_under_autocast_keeps_float32_streams_exact_to_float32(n: int) -> None:
    """Under bf16 autocast the streams stay float32, as the plain residual stream
    does: ``H_res`` doubly stochastic to float32 rounding, the read and the write
    within float32 rounding of the float64 formulas (16-bit einsum GEMMs once
    rounded both to bf16: ``H_res``'s rows summed to 1 within 2^-8 only)."""
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31 - 1, ())))
    hc = HyperConnection(n, 1)
    for p in (hc.res_logits, hc.pre_logits, hc.post_logits):
        p.data = torch.randn(p.shape, generator=g)
    streams = torch.randn(3, 7, n, 64, generator=g)
    out = torch.randn(3, 7, 64, generator=g).bfloat16()  # a sublayer's output under autocast
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
        h = hc.h_res()
        read, written = hc(streams), hc.write(streams, out)
    eps = torch.finfo(torch.float32).eps
    assert h.dtype == torch.float32
    for axis in (0, 1):
        assert float((h.double().sum(axis) - 1).abs().max()) <= 4 * eps
    w = torch.softmax(hc.res_logits.detach().double(), 0)
    H = sum(w[k] * hc.perms[k].double() for k in range(len(w)))
    p, q = torch.sigmoid(hc.pre_logits.detach().double()), 2 * torch.sigmoid(hc.post_logits.detach().double())
    X = streams.double()
    want_read = sum(p[i] * X[..., i, :] for i in range(n))
    want_written = torch.stack([sum(H[i, j] * X[..., j, :] for j in range(n)) + q[i] * out.double()
                                for i in range(n)], dim=-2)
    assert read.dtype == written.dtype == torch.float32
    scale = float(X.abs().max() + out.double().abs().max()) * 2 * n
    assert float((read.double() - want_read).abs().max()) <= 8 * eps * scale
    assert float((written.double() - want_written).abs().max()) <= 8 * eps * scale


DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # where the kernel-path tests run


def _model_with_streams(n: int, stream_dtype: str = "float32", **overrides) -> GPT:
    """A float64 GPT with ``n`` streams (n = 1 too, which the config does not offer),
    stored in ``stream_dtype``, and random mixing parameters."""
    from sparsetrain.hyper import add_hyper_connections

    torch.manual_seed(int(torch.randint(0, 2**31 - 1, ())))
    cfg = ModelConfig(**{"vocab_size": 300, "seq_len": 16, "n_layer": 2, "n_head": 2, "d_model": 32, **overrides})
    model = add_hyper_connections(build_model(cfg), n, stream_dtype=stream_dtype).double().to(DEVICE)
    for hc in (m for m in model.modules() if isinstance(m, HyperConnection)):
        for p in (hc.res_logits, hc.pre_logits, hc.post_logits):
            p.data.normal_(0, 1.5)
    model.hyper_in.data.uniform_(0.5, 1.5)
    model.hyper_out.data.uniform_(0.2, 0.8)
    return model


def formula_logits(model: GPT, idx: torch.Tensor, store=None, mix: torch.dtype | None = None) -> torch.Tensor:
    """The model's logits by the mHC-lite formulas, one term at a time, from its
    parameters (the sublayers, norms and head are the model's own modules). For
    streams stored narrower: every value the streams hold, every read and the read-out
    passed through ``store`` (rounded once), and the sums over the streams taken in
    ``mix`` with the weights in ``mix`` (the sublayer's output added in its own dtype);
    by default neither, every term in the model's dtype."""
    store = store or (lambda t: t)
    n, T = model.hyper_in.numel(), idx.shape[1]
    cos, sin = model.rope_cos[:T], model.rope_sin[:T]
    e = model.embed(idx)
    X = [store(model.hyper_in[i] * e) for i in range(n)]
    to_mix = (lambda t: t) if mix is None else (lambda t: t.to(mix))

    def mixed(weights, values):  # sum_i w_i v_i in the mixing dtype, back in the model's
        return sum(to_mix(w) * to_mix(v) for w, v in zip(weights, values)).to(e.dtype)

    for blk in model.blocks:
        for hc, sublayer in ((blk.hc_attn, lambda a: blk.attn(blk.attn_norm(a), cos, sin)),
                             (blk.hc_ffn, lambda a: blk.ffn(blk.ffn_norm(a)))):
            w = torch.softmax(hc.res_logits, 0)
            H = sum(w[k] * hc.perms[k].to(w.dtype) for k in range(len(w)))
            p, q = torch.sigmoid(hc.pre_logits), 2 * torch.sigmoid(hc.post_logits)
            f = sublayer(store(mixed(p, X)))
            X = [store(mixed(H[i], X) + to_mix(q[i]).to(f.dtype) * f) for i in range(n)]
    return model.lm_head(model.norm(store(mixed(model.hyper_out, X))))


@pytest.mark.parametrize("n", [1, 2, 4])
def test_model_matches_the_formulas_in_float64(n: int, mixing_path: str) -> None:
    """Logits and every parameter's gradient (mixing logits, hyper_in / hyper_out,
    the sublayers) equal the formulas' to float64 rounding."""
    model = _model_with_streams(n)
    idx = torch.randint(0, 300, (2, 16), device=DEVICE)
    up = torch.randn(2, 16, 300, dtype=torch.float64, device=DEVICE)
    want = formula_logits(model, idx)
    (want * up).sum().backward()
    want_grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    got, _ = model(idx)
    (got * up).sum().backward()
    assert float((got - want).detach().abs().max()) <= 1e-10 * float(want.detach().abs().max())
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert float((p.grad - want_grads[name]).norm()) <= 1e-10 * float(want_grads[name].norm()) + 1e-300, name


def _stored_in_bfloat16(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.bfloat16).to(t.dtype)


@pytest.mark.parametrize("n", [2, 4])
def test_bfloat16_streams_are_the_formulas_rounded_where_stored(n: int, mixing_path: str) -> None:
    """``model.hyper_stream_dtype = bfloat16``: a float64 model's logits equal the
    formulas' with each stored value (the streams after entry and after every write,
    each read, the read-out) rounded once to bfloat16, and differ from the unrounded
    formulas by far more; the streams entering each block are bfloat16, the reads the
    model's dtype. The formulas sum in float32, as the storage's contract says: summed
    in float64, values near a bfloat16 tie round the other way and the difference grows
    through the layers as large as the rounding itself."""
    model = _model_with_streams(n, stream_dtype="bfloat16")
    seen: list[torch.dtype] = []
    for blk in model.blocks:
        blk.register_forward_pre_hook(lambda _m, args: seen.append(args[0].dtype))
        blk.attn_norm.register_forward_pre_hook(lambda _m, args: seen.append(args[0].dtype))
    idx = torch.randint(0, 300, (2, 16), device=DEVICE)
    with torch.no_grad():
        got, _ = model(idx)
        seen_by_model = list(seen)
        want = formula_logits(model, idx, store=_stored_in_bfloat16, mix=torch.float32)
        unrounded = formula_logits(model, idx, mix=torch.float32)
    assert got.dtype == torch.float64
    assert seen_by_model == [torch.bfloat16, torch.float64] * 2  # each block's streams, its attention's read
    scale = float(want.abs().max())
    # equal but where a sum's order (or the kernels' float32 copy of the sublayer output) rounds a
    # near-tie the other way: one bfloat16 ulp, rare, carried on
    assert float((got - want).abs().max()) <= 2e-4 * scale
    assert float((got - unrounded).abs().max()) >= 5e-4 * scale  # the rounding is there (2e-3 and more)


@pytest.mark.parametrize("n", [2, 4])
def test_bfloat16_streams_gradients_follow_the_rounded_formulas(n: int, mixing_path: str) -> None:
    """Every parameter's gradient with bfloat16 streams, on each path, against the float64
    formulas: the rest of the model and the writes' gains (``post_logits``) stay within
    a few bfloat16 roundings of the unrounded formulas; ``hyper_out`` (the read-out,
    whose gradient reads the rounded streams and nothing rounded after them) equals the
    rounded formulas' to float64 rounding; the reads, ``H_res`` and ``hyper_in``, whose
    gradients sum products of rounded streams and gradients that cancel, lie no further
    from the unrounded formulas than a few times the rounded formulas do (the backward
    rounds the streams' gradients at places the formulas do not), plus 0.1. Per group,
    all layers' parameters together; bounds from 5 fresh draws per path and n on CPU
    at 1.5x or more the largest seen."""
    model = _model_with_streams(n, stream_dtype="bfloat16")
    idx = torch.randint(0, 300, (2, 16), device=DEVICE)
    up = torch.randn(2, 16, 300, dtype=torch.float64, device=DEVICE)

    def grads(logits) -> dict[str, torch.Tensor]:
        model.zero_grad(set_to_none=True)
        (logits() * up).sum().backward()
        return {name: p.grad.clone() for name, p in model.named_parameters()}

    got = grads(lambda: model(idx)[0])
    rounded = grads(lambda: formula_logits(model, idx, store=_stored_in_bfloat16, mix=torch.float32))
    unrounded = grads(lambda: formula_logits(model, idx, mix=torch.float32))
    from bench.hyper_stream_precision import group

    groups: dict[str, list[str]] = {}
    for name in got:
        groups.setdefault(group(name), []).append(name)
    assert set(groups) == {"other", "hyper_in", "hyper_out", "pre_logits", "post_logits", "res_logits"}

    def off(a: dict, b: dict, names: list[str]) -> float:
        flat = lambda d: torch.cat([d[k].flatten() for k in names])  # noqa: E731
        return float((flat(a) - flat(b)).norm() / flat(b).norm())

    assert off(got, unrounded, groups["other"]) < 2e-2
    assert off(got, unrounded, groups["post_logits"]) < 5e-2
    assert off(got, rounded, groups["hyper_out"]) < 5e-3
    for kind in ("hyper_in", "pre_logits", "res_logits"):
        assert off(got, unrounded, groups[kind]) < 5 * off(rounded, unrounded, groups[kind]) + 0.1, kind
    assert off(got, unrounded, groups["other"]) > 1e-4  # the rounding is there (2e-3 and more)


def test_bfloat16_streams_train_and_are_refused_where_not_built(tmp_path) -> None:
    """A CPU model with bfloat16 streams trains (the loss falls, every parameter gets a
    finite gradient); the setting without hyper-connections, a bad value and Collider
    are one line each."""
    from sparsetrain.config import build_config, refuse_inert_settings
    from sparsetrain.errors import ConfigError

    torch.manual_seed(int(torch.randint(0, 2**31 - 1, ())))
    model = build_model(ModelConfig(vocab_size=300, seq_len=16, n_layer=2, n_head=2, d_model=32, hyper_connections=2,
                                    hyper_stream_dtype="bfloat16"))
    assert model.hyper_stream_dtype is torch.bfloat16  # the field reaches the model
    seen: list[torch.dtype] = []
    model.blocks[0].register_forward_pre_hook(lambda _m, args: seen.append(args[0].dtype))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    idx = torch.randint(0, 300, (8, 16))
    losses = []
    for _ in range(30):
        opt.zero_grad(set_to_none=True)
        loss = model(idx, idx.roll(-1, 1))[1]
        loss.backward()
        assert all(p.grad is not None and bool(p.grad.isfinite().all()) for p in model.parameters())
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.7 * losses[0], losses
    assert set(seen) == {torch.bfloat16}
    from sparsetrain.collider import ColliderModel

    with pytest.raises(ValueError, match="stores them in torch.bfloat16"):
        ColliderModel(model)
    from sparsetrain.hyper import add_hyper_connections

    with pytest.raises(ValueError, match="stream_dtype must be one of float32, bfloat16, got 'float16'"):
        add_hyper_connections(build_model(ModelConfig(vocab_size=300, seq_len=16, n_layer=1, n_head=2, d_model=32)), 2,
                              stream_dtype="float16")
    with pytest.raises(ConfigError, match="model.hyper_stream_dtype must be float32 or bfloat16, got 'float16'"):
        build_config(overrides={"hyper_connections": 2, "hyper_stream_dtype": "float16"})
    with pytest.raises(ConfigError, match="hyper_stream_dtype has no effect while hyper_connections is 0"):
        refuse_inert_settings(build_config(overrides={"hyper_stream_dtype": "bfloat16"}), ["hyper_stream_dtype"])
    with pytest.raises(ConfigError, match="use_collider with model.hyper_stream_dtype = bfloat16 is not available"):
        build_config(overrides={"hyper_connections": 2, "hyper_stream_dtype": "bfloat16", "use_collider": True})


@pytest.mark.parametrize("n", [2, 4])
def test_compiles_without_a_graph_break(n: int) -> None:
    """Dynamo traces the whole model with its streams as one graph (the mixing is plain
    torch under compile, for inductor to fuse)."""
    model = _model(n)
    torch._dynamo.reset()
    explained = torch._dynamo.explain(model)(torch.randint(0, 300, (2, 16)), torch.randint(0, 300, (2, 16)))
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons


def _cpu_inductor_ok() -> bool:
    """Inductor compiles CPU graphs with a C++ compiler; without one the compiled tests use aot_eager."""
    import shutil

    return any(shutil.which(c) for c in ("g++", "c++", "clang++"))


COMPILE_BACKEND = "inductor" if _cpu_inductor_ok() else "aot_eager"


@pytest.mark.parametrize("stream_dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("n", [2, 4])
def test_compiled_training_steps_match_eager_without_breaks_or_recompiles(n: int, stream_dtype: str) -> None:
    """The whole forward and loss as one graph (``fullgraph``), a backward through it, and
    three optimizer steps on new batches of the same shape with no recompilation; loss and
    every gradient as the eager model's, to float32 rounding. With bfloat16 streams,
    inductor's fused kernels round the streams' gradients at other places than eager:
    the loss within 1e-4, the sublayers' gradients within a few bfloat16 ulps, and the
    mixing weights' (sums over every token that cancel, bench.hyper_stream_precision)
    only present and finite."""
    torch.manual_seed(int(torch.randint(0, 2**31 - 1, ())))
    cfg = ModelConfig(vocab_size=300, seq_len=16, n_layer=2, n_head=2, d_model=32, hyper_connections=n,
                      hyper_stream_dtype=stream_dtype)
    loss_tol, grad_tol = (1e-5, 1e-4) if stream_dtype == "float32" else (1e-4, 3e-2)
    model = build_model(cfg)
    for hc in (m for m in model.modules() if isinstance(m, HyperConnection)):
        for p in (hc.res_logits, hc.pre_logits, hc.post_logits):
            p.data.normal_(0, 1.5)
    eager = build_model(cfg)
    eager.load_state_dict(model.state_dict())
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=COMPILE_BACKEND, fullgraph=True)
    opts = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (model, eager)]
    for step in range(3):
        idx, tgt = torch.randint(0, 300, (2, 16)), torch.randint(0, 300, (2, 16))
        with torch._dynamo.config.patch(error_on_recompile=step > 0):
            loss = compiled(idx, tgt)[1]
        want = eager(idx, tgt)[1]
        loss.backward()
        want.backward()
        assert float(loss.detach()) == pytest.approx(float(want.detach()), rel=loss_tol)
        for (name, p), q in zip(model.named_parameters(), eager.parameters()):
            assert p.grad is not None and bool(p.grad.isfinite().all()), name
            if stream_dtype == "bfloat16" and ("hc_" in name or name.startswith("hyper_")):
                continue
            assert float((p.grad - q.grad).norm()) <= grad_tol * float(q.grad.norm()) + 1e-7, name
        for opt in opts:
            opt.step()
            opt.zero_grad(set_to_none=True)


@pytest.mark.parametrize("n", [2, 4])
def test_mixing_weight_gradients_are_summed_per_token_first(n: int) -> None:
    """No reduction in the compiled backward takes a tensor of ``B T D`` elements or more
    straight to the mixing weights' ``<= n^2`` outputs: each such gradient is summed per
    token first (``hyper_mixing.per_token``). Inductor does not split a reduction of that
    shape whose inputs each lack an output index (the gradient of ``h_res``), so one GPU
    block reduced all ``B T D`` terms of each output: milliseconds per sublayer."""
    from functorch.compile import make_boxed_func
    from torch._functorch.aot_autograd import aot_module_simplified

    B, T, D = 2, 16, 32
    graphs: list[torch.fx.GraphModule] = []

    def keep(gm, _inputs):
        graphs.append(gm)
        return make_boxed_func(gm.forward)

    def backend(gm, inputs):
        return aot_module_simplified(gm, inputs, fw_compiler=keep, bw_compiler=keep)

    model = _model(n)
    torch._dynamo.reset()
    torch.compile(model, backend=backend, fullgraph=True)(torch.randint(0, 300, (B, T)),
                                                           torch.randint(0, 300, (B, T)))[1].backward()
    assert len(graphs) == 2
    sums = [node for node in graphs[1].graph.nodes if node.op == "call_function"
            and node.target in (torch.ops.aten.sum.dim_IntList, torch.ops.aten.sum.default)]
    assert sums
    for node in sums:
        src, out = node.args[0].meta["val"], node.meta["val"]
        assert not (src.numel() >= B * T * D and out.numel() <= n * n), (node.format_node(), src.shape, out.shape)


def test_report_is_the_same_on_either_path(monkeypatch) -> None:
    """The analysis hooks each read, so the kernel path's fused nodes step aside while it
    runs: the same batch's backward, then the report, on the plain-torch path and on the
    kernel path give the same stream divergences and mixing gradients' norms."""
    from sparsetrain import hyper_mixing

    if hyper_mixing.triton is None:
        pytest.skip("triton not installed")
    model = _model_with_streams(2)
    idx = torch.randint(0, 300, (2, 16), device=DEVICE)
    tgt = torch.randint(0, 300, (2, 16), device=DEVICE)

    def backward_then_report(uses_kernel) -> dict:
        monkeypatch.setattr(hyper_mixing, "uses_kernel", uses_kernel)
        model.zero_grad(set_to_none=True)
        model(idx, tgt)[1].backward()
        return report(model, idx)

    plain = backward_then_report(lambda streams: False)
    fused = backward_then_report(hyper_mixing.kernel_ok)
    assert len(fused["layers"]) == 2 * len(model.blocks)
    for a, b in zip(plain["layers"], fused["layers"]):
        assert a["stream_divergence"] == pytest.approx(b["stream_divergence"], rel=1e-12)
        assert a["grad_norm"].keys() == b["grad_norm"].keys()
        for name in a["grad_norm"]:
            assert a["grad_norm"][name] > 0, name
            assert b["grad_norm"][name] == pytest.approx(a["grad_norm"][name], rel=1e-4, abs=1e-9), name


@pytest.mark.parametrize("n", [2, 4])
def test_kernel_path_touches_the_streams_only_in_its_kernels(n: int, monkeypatch) -> None:
    """One block, forward and backward, on the kernel path: three mixing kernels each
    way (read, write-then-read, write), and no other operation that reads or writes
    a tensor the size of the streams (no copies, casts, GEMMs, or autograd adding
    two gradients of the streams); only their outputs' allocations."""
    from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes
    from torch.utils._pytree import tree_flatten

    from sparsetrain import hyper_mixing

    if hyper_mixing.triton is None:
        pytest.skip("triton not installed")
    monkeypatch.setattr(hyper_mixing, "uses_kernel", hyper_mixing.kernel_ok)
    B, T, D = 2, 16, 32
    model = _model_with_streams(n, ffn_hidden=3 * D).float()  # no sublayer tensor of the streams' size
    stream_numel = B * T * n * D
    events: list[str] = []

    class Log(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            tensors = [t for t in tree_flatten((args, kwargs, out))[0] if isinstance(t, torch.Tensor)]
            if any(t.numel() == stream_numel for t in tensors):
                events.append(func.overloadpacket.__name__)
            return out

    class Launch:  # a kernel launch as one event (the interpreter's own copies left out)
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                events.append(f"kernel:{self.kernel.fn.__name__}")
                with _disable_current_modes():
                    return self.kernel[grid](*args, **kwargs)
            return launch

    for name in ("_forward_kernel", "_backward_kernel"):
        monkeypatch.setattr(hyper_mixing, name, Launch(getattr(hyper_mixing, name)))
    blk = model.blocks[0]
    cos, sin = model.rope_cos[:T], model.rope_sin[:T]
    x = torch.randn(B, T, n, D, device=DEVICE, requires_grad=True)
    up = torch.randn(B, T, n, D, device=DEVICE)
    with Log():
        y = blk(x, cos, sin)
    forward, events[:] = list(events), []
    with Log():
        y.backward(up)
    backward = list(events)
    allocations = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "detach", "view",
                   "alias", "_unsafe_view"}
    assert [e for e in forward if e not in allocations] == ["kernel:_forward_kernel"] * 3, forward
    assert [e for e in backward if e not in allocations] == ["kernel:_backward_kernel"] * 3, backward
    assert x.grad is not None and x.grad.shape == x.shape


def test_an_unknown_write_init_is_one_line() -> None:
    from sparsetrain.config import build_config
    from sparsetrain.errors import ConfigError

    with pytest.raises(ConfigError, match="model.hyper_write_init must be every_stream or next_stream, got 'bogus'"):
        build_config(overrides={"hyper_connections": 2, "hyper_write_init": "bogus"})
    with pytest.raises(ValueError, match="write_init must be one of every_stream, next_stream, got 'bogus'"):
        HyperConnection(2, 0, "bogus")


def test_stream_precision_bench_measures_against_float64() -> None:
    """``bench.hyper_stream_precision`` on a fresh seed: with float32 streams and no
    autocast every gradient is float64's to float32 rounding; bfloat16 streams move
    every group's gradient by far more than that (the storage's rounding) but stay
    bounded: the rest of the model within a few bfloat16 epsilons, the mixing weights'
    sums (which cancel) within bounds a zero or sign-flipped gradient (error 1 or 2)
    would break. Bounds: at least 1.5 times the largest median over 40 fresh seeds on
    CPU; ``hyper_in`` and ``hyper_out`` are one parameter each whose gradient cancels
    heavily (0.59 and 0.22 seen), so theirs only rule out a lost or flipped gradient."""
    from bench.hyper_stream_precision import measure

    seed = fresh_seed()
    errors = measure(2, seeds=1, first_seed=seed)
    assert set(errors) == {"hyper_in", "hyper_out", "other", "post_logits", "pre_logits", "res_logits"}
    bound = {"other": 0.02, "post_logits": 0.1, "pre_logits": 0.4, "res_logits": 0.3, "hyper_in": 0.9, "hyper_out": 0.9}
    for name, arms in errors.items():
        assert arms["float32 streams"]["max"] < 1e-2 if name.endswith("_logits") else arms["float32 streams"]["max"] < 1e-4
        assert arms["bfloat16 streams"]["median"] > 30 * arms["float32 streams"]["median"], (name, seed)
        for arm in ("bfloat16 streams", "bfloat16 streams, bf16 autocast"):
            assert arms[arm]["median"] < bound[name], (name, arm, arms[arm], seed)
        assert arms["float32 streams, bf16 autocast"]["median"] < min(bound[name], 0.1), (name, arms, seed)
