"""mHC-lite: H_res doubly stochastic, symmetry broken at init, analysis numbers by hand."""

from __future__ import annotations

import math

import pytest
import torch

from sparsetrain.build import build_model
from sparsetrain.config import ModelConfig
from sparsetrain.hyper import HyperConnection, analyze_layer, analyze_model, report, stream_divergence
from sparsetrain.model import GPT


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
    idx = torch.randint(0, 300, (4, 16))
    model.zero_grad(set_to_none=True)
    model(idx, torch.randint(0, 300, (4, 16)))[1].backward()


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
    assert layer["h_pre_gain"] == pytest.approx(1.0) and layer["h_post_gain"] == pytest.approx(2.0)
    assert layer["stream_divergence"] == pytest.approx(math.sqrt(2.0))
    assert torch.allclose(hcs[0].h_res(), torch.tensor([[0.75, 0.25], [0.25, 0.75]]))
    rep = analyze_model(hcs, [streams, streams])
    assert rep["composed_res_gain"] == pytest.approx(1.0, abs=1e-6)
    assert rep["composed_res_distance_from_identity"] == pytest.approx(0.75, abs=1e-6)  # ||H^2 - I||_F
    assert rep["healthy"]
    assert stream_divergence(torch.stack([streams[0], streams[0]])) == 0.0
    hcs[1].res_logits.data = torch.tensor([30.0, 0.0])  # collapsed onto the identity
    assert not analyze_model(hcs)["healthy"]


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
