"""Optimizer construction (sparsetrain.optimizers): which parameters go where,
Muon against a float64 Newton–Schulz reference and torch's own Muon, Lion and
GaLore against their update rules written naively in float64, exact resume
through a checkpoint, DDP, Collider, and one-line refusals."""

from __future__ import annotations

import copy
import importlib.util
import io
import math
import os
import re
import socket
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn as nn

from sparsetrain import optimizers as O
from sparsetrain.config import OPTIMIZERS, build_config
from sparsetrain.errors import CheckpointError, ConfigError
from sparsetrain.build import build_model
from sparsetrain.mtp import MTPHeads, naive_loss
from sparsetrain.optim import lr_at
from sparsetrain.optimizers import make_adamw

from conftest import fresh_seed

NS_COEFFS = (3.4445, -4.7750, 2.0315)  # torch.optim.Muon's defaults (Keller Jordan's quintic)
SMALL = dict(vocab_size=300, seq_len=16, n_layer=2, n_head=2, d_model=32, warmup_steps=2, max_steps=6)


def cfg_of(**overrides):
    return build_config("tiny", overrides={**SMALL, **overrides})


def seed_torch() -> int:
    """Seed torch's global generator with a fresh seed, and return it."""
    seed = fresh_seed()
    torch.manual_seed(seed)
    return seed


@pytest.fixture
def offline_hub(monkeypatch):
    """bitsandbytes' import asks the Hugging Face hub for a CPU kernel on some
    CPUs; tests stay off the network."""
    try:
        import huggingface_hub.constants as hub
    except ImportError:
        return
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)


needs_muon = pytest.mark.skipif(not hasattr(torch.optim, "Muon"), reason="needs torch >= 2.9 (torch.optim.Muon)")


def needs(module: str):
    """Skip without ``module``; found without importing it (see offline_hub)."""
    return pytest.mark.skipif(importlib.util.find_spec(module) is None, reason=f"needs {module}")


# ----------------------------------------------------------------------------- grouping


def roles_by_name(model: nn.Module) -> dict[str, str]:
    return {name: role for name, _, role in O.parameter_roles(model)}


def expected_gpt_roles(cfg, prefix: str = "") -> dict[str, str]:
    """Written out from the architecture, independently of parameter_roles."""
    m = cfg.model
    out = {f"{prefix}embed.weight": "embedding", f"{prefix}norm.weight": "vector"}
    if not m.tie_embeddings:
        out[f"{prefix}lm_head.weight"] = "head"
    if m.hyper_connections:
        out[f"{prefix}hyper_in"] = out[f"{prefix}hyper_out"] = "vector"
    for i in range(m.n_layer):
        b = f"{prefix}blocks.{i}."
        out[b + "attn_norm.weight"] = out[b + "ffn_norm.weight"] = "vector"
        for w in ["attn.qkv", "attn.proj", "ffn.up", "ffn.down"] + (["ffn.gate"] if m.ffn == "swiglu" else []):
            out[b + w + ".weight"] = "hidden"
        if m.hyper_connections:
            for hc in ("hc_attn", "hc_ffn"):
                for k in ("res_logits", "pre_logits", "post_logits"):
                    out[f"{b}{hc}.{k}"] = "vector"
    return out


@pytest.mark.parametrize("overrides", [dict(ffn="swiglu"), dict(ffn="relu2"), dict(ffn="relu2_24", activation_dense_warmup_steps=0),
                                       dict(hyper_connections=2), dict(tie_embeddings=True)])
def test_gpt_roles(overrides) -> None:
    cfg = cfg_of(**overrides)
    model = build_model(cfg.model)
    assert roles_by_name(model) == expected_gpt_roles(cfg)


def test_mtp_head_projections_are_hidden_matrices() -> None:
    cfg = cfg_of(ffn="swiglu")
    model = build_model(cfg.model)
    both = nn.ModuleList([model, MTPHeads(model, 3)])
    expected = expected_gpt_roles(cfg, "0.")
    for k in range(3):
        expected[f"1.heads.{k}.proj.weight"] = "hidden"
        expected[f"1.heads.{k}.norm.weight"] = "vector"
    assert roles_by_name(both) == expected


def test_resnet_bk_roles() -> None:
    cfg = cfg_of(arch="resnet_bk", bk_sparsity=0.5)
    roles = roles_by_name(build_model(cfg.model))
    expected = {"embed.weight": "embedding", "norm.weight": "vector", "lm_head.weight": "head"}
    for i in range(cfg.model.n_layer):
        b = f"blocks.{i}."
        expected.update({b + "norm.weight": "vector", b + "layer.bk_scale": "vector",
                         b + "layer.moe.up": "hidden", b + "layer.moe.down": "hidden",  # [E, out, in] expert stacks
                         b + "layer.moe.router.weight": "hidden", b + "layer.feature_proj.weight": "hidden",
                         b + "layer.predictor.0.weight": "hidden",
                         b + "layer.v_proj.weight": "other_matrix", b + "layer.predictor.2.weight": "other_matrix",  # one output
                         b + "layer.interp.weight": "other_matrix"})  # a conv kernel
        for bias in ("v_proj", "feature_proj", "predictor.0", "predictor.2", "interp"):
            expected[f"{b}layer.{bias}.bias"] = "vector"
    assert roles == expected


def group_sets(opt) -> list[tuple[frozenset, float]]:
    return [(frozenset(id(p) for p in g["params"]), g["weight_decay"]) for g in opt.param_groups]


@needs_muon
@pytest.mark.parametrize("arch", ["gpt", "resnet_bk"])
@pytest.mark.parametrize("fallback", ["adamw", "lion"])
def test_muon_groups_follow_roles(arch, fallback) -> None:
    if fallback == "lion":
        pytest.importorskip("lion_pytorch")
    cfg = cfg_of(arch=arch, optimizer="muon", muon_fallback=fallback, muon_weight_decay=0.05, ffn="relu2")
    model = build_model(cfg.model)
    opt = O.build_optimizer(model, cfg, "cpu")
    by_role: dict[str, set] = {r: set() for r in O.ROLES}
    for _, p, role in O.parameter_roles(model):
        by_role[role].add(id(p))
    groups = group_sets(opt)
    assert groups == [(frozenset(by_role["head"] | by_role["other_matrix"]), cfg.weight_decay),
                      (frozenset(by_role["embedding"] | by_role["vector"]), 0.0),
                      (frozenset(by_role["hidden"]), 0.05)]
    assert set(opt.parts) == {fallback, "muon"}
    assert sorted(id(p) for g in opt.param_groups for p in g["params"]) == sorted(id(p) for p in model.parameters())
    assert opt.param_groups[2]["lr_scale"] == pytest.approx(cfg.muon_lr / cfg.lr)
    assert opt.param_groups[0]["lr"] == cfg.lr  # group 0 (what the trainer logs) carries the schedule's lr


def legacy_adamw(model: nn.Module, lr: float, wd: float, betas) -> torch.optim.AdamW:
    """make_adamw as make_optimizer was before the optimizers module: the reference for AdamW."""
    embed = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decay = [p for p in model.parameters() if p.dim() >= 2 and id(p) not in embed]
    no_decay = [p for p in model.parameters() if not (p.dim() >= 2 and id(p) not in embed)]
    return torch.optim.AdamW([{"params": decay, "weight_decay": wd}, {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=betas)


@pytest.mark.parametrize("arch", ["gpt", "resnet_bk"])
def test_adamw_unchanged_from_the_legacy_grouping(arch) -> None:
    """optimizer = adamw (and optimizers.make_adamw) step exactly as before."""
    seed_torch()
    cfg = cfg_of(arch=arch, ffn="relu2", tie_embeddings=arch == "gpt")
    model = build_model(cfg.model)
    ref_model = copy.deepcopy(model)
    opt = O.build_optimizer(model, cfg, "cpu")
    assert type(opt) is torch.optim.AdamW
    assert group_sets(opt) == group_sets(make_adamw(model, cfg.lr, cfg.weight_decay, (cfg.beta1, cfg.beta2), "cpu"))
    ref = legacy_adamw(ref_model, cfg.lr, cfg.weight_decay, (cfg.beta1, cfg.beta2))
    for _ in range(3):
        for p, q in zip(model.parameters(), ref_model.parameters()):
            p.grad = torch.randn_like(p)
            q.grad = p.grad.clone()
        opt.step()
        ref.step()
    for p, q in zip(model.parameters(), ref_model.parameters()):
        assert torch.equal(p, q)


# ----------------------------------------------------------------------------- Muon


def ns_float64(g: torch.Tensor, steps: int = 5, coeffs: tuple[float, float, float] = NS_COEFFS, eps: float = 1e-7) -> torch.Tensor:
    """Newton–Schulz orthogonalisation of one matrix as torch.optim.Muon runs it
    (wide orientation, Frobenius normalisation clamped at eps, the quintic), in float64."""
    a, b, c = coeffs
    x = g.double()
    tall = x.shape[0] > x.shape[1]
    if tall:
        x = x.T
    x = x / x.norm().clamp(min=eps)
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.T if tall else x


def muon_float64(w0: torch.Tensor, grads: list[torch.Tensor], lrs: list[float], momentum: float, wd: float, adjust: str) -> torch.Tensor:
    """Muon's update (torch's EMA momentum, Nesterov, decoupled decay, shape scale) in float64."""
    w, buf = w0.double(), torch.zeros_like(w0, dtype=torch.float64)
    rows, cols = w0.shape
    scale = math.sqrt(max(1.0, rows / cols)) if adjust == "original" else 0.2 * math.sqrt(max(rows, cols))
    for g, lr in zip(grads, lrs):
        g = g.double()
        buf = momentum * buf + (1 - momentum) * g
        w = w * (1 - lr * wd) - lr * scale * ns_float64((1 - momentum) * g + momentum * buf)
    return w


@needs_muon
@pytest.mark.parametrize("shape", [(64, 32), (32, 64), (48, 48)])
@pytest.mark.parametrize("adjust", ["original", "match_rms_adamw"])
def test_muon_matches_float64_newton_schulz(shape, adjust) -> None:
    seed_torch()
    cfg = cfg_of(optimizer="muon", muon_weight_decay=0.1, muon_adjust_lr=adjust)
    layer = nn.Linear(shape[1], shape[0], bias=False)
    opt = O.build_optimizer(layer, cfg, "cpu")
    w0 = layer.weight.detach().clone()
    grads, lrs = [torch.randn(shape) for _ in range(3)], []
    for t, g in enumerate(grads):
        lr = lr_at(t, cfg.lr, cfg.warmup_steps, cfg.max_steps, cfg.min_lr_ratio)
        for group in opt.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        lrs.append(lr * cfg.muon_lr / cfg.lr)
        layer.weight.grad = g.clone()
        opt.step()
    ref = muon_float64(w0, grads, lrs, cfg.muon_momentum, 0.1, adjust)
    err = (layer.weight.double() - ref).norm() / (ref - w0.double()).norm()
    assert err < 4e-2  # torch orthogonalises in bfloat16
    # the update direction is nearly orthogonal: singular values near 1 (the
    # quintic lands them in about [0.7, 1.2]), where the gradient's spread 30x
    layer2 = nn.Linear(shape[1], shape[0], bias=False)
    opt2 = O.build_optimizer(layer2, cfg_of(optimizer="muon", muon_adjust_lr="original"), "cpu")
    before = layer2.weight.detach().clone()
    k = min(shape)
    u, v = torch.linalg.qr(torch.randn(shape[0], k))[0], torch.linalg.qr(torch.randn(shape[1], k))[0]
    g = u @ torch.diag(torch.logspace(0, -1.5, k)) @ v.T  # condition number 30
    layer2.weight.grad = g
    opt2.step()
    step = (before - layer2.weight.detach()) / (opt2.param_groups[-1]["lr"] * math.sqrt(max(1, shape[0] / shape[1])))
    sv = torch.linalg.svdvals(step.double())
    assert sv.min() > 0.6 and sv.max() < 1.3, sv
    sv_g = torch.linalg.svdvals(g.double())
    assert sv_g.min() / sv_g.max() < 0.05  # the input was far from orthogonal


@needs_muon
@pytest.mark.parametrize("adjust", ["original", "match_rms_adamw"])
def test_muon_part_equals_torch_muon_and_rest_equals_adamw(adjust) -> None:
    """The combined optimizer, driven like the trainer (scheduled lr times
    lr_scale), equals torch.optim.Muon on the hidden matrices and AdamW on
    the rest, run separately, bitwise."""
    seed_torch()
    cfg = cfg_of(optimizer="muon", ffn="swiglu", muon_weight_decay=0.05, muon_momentum=0.9, muon_adjust_lr=adjust)
    model = build_model(cfg.model)
    ref_model = copy.deepcopy(model)
    opt = O.build_optimizer(model, cfg, "cpu")
    roles = {name: role for name, _, role in O.parameter_roles(ref_model)}
    named = dict(ref_model.named_parameters())
    hidden = [named[n] for n, r in roles.items() if r == "hidden"]
    decay = [named[n] for n, r in roles.items() if r in ("head", "other_matrix")]
    no_decay = [named[n] for n, r in roles.items() if r in ("embedding", "vector")]
    ref_muon = torch.optim.Muon(hidden, lr=cfg.muon_lr, weight_decay=0.05, momentum=0.9, nesterov=True, adjust_lr_fn=adjust)
    ref_adamw = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
                                  lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))
    for t in range(4):
        lr = lr_at(t, cfg.lr, cfg.warmup_steps, cfg.max_steps, cfg.min_lr_ratio)
        for group in opt.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        for group in ref_adamw.param_groups:
            group["lr"] = lr
        for group in ref_muon.param_groups:
            group["lr"] = lr * cfg.muon_lr / cfg.lr
        for p, q in zip(model.parameters(), ref_model.parameters()):
            p.grad = torch.randn_like(p)
            q.grad = p.grad.clone()
        opt.step()
        ref_muon.step()
        ref_adamw.step()
        opt.zero_grad(set_to_none=True)
        assert all(p.grad is None for p in model.parameters())
    for (name, p), q in zip(model.named_parameters(), ref_model.parameters()):
        assert torch.equal(p, q), name


@needs_muon
def test_expert_stack_slices_step_like_separate_matrices() -> None:
    """A [E, out, in] stack under Muon equals E separate 2-D parameters under
    torch's Muon: orthogonalised, shape-scaled and decayed one by one."""
    seed_torch()
    stack = nn.Parameter(torch.randn(3, 24, 10))
    alone = [nn.Parameter(stack.detach()[e].clone()) for e in range(3)]
    opt = O._muon_class()([stack], lr=0.02, weight_decay=0.1, momentum=0.95, nesterov=True)
    ref = torch.optim.Muon(alone, lr=0.02, weight_decay=0.1, momentum=0.95, nesterov=True)
    for _ in range(3):
        g = torch.randn_like(stack)
        stack.grad = g.clone()
        for e in range(3):
            alone[e].grad = g[e].clone()
        opt.step()
        ref.step()
    for e in range(3):
        assert torch.equal(stack[e], alone[e])
        assert torch.equal(opt.state[stack]["momentum_buffer"][e], ref.state[alone[e]]["momentum_buffer"])
    with pytest.raises(ValueError, match="shape"):
        O._muon_class()([nn.Parameter(torch.randn(4))])


@pytest.mark.parametrize("shape", [(5, 16, 40), (4, 40, 16), (3, 24, 24), (1, 7, 3)])  # wide, tall, square, one
@pytest.mark.parametrize("steps,coeffs", [(5, NS_COEFFS), (3, (2.0, -1.5, 0.5))])
@pytest.mark.parametrize("use_addmm", [True, False])
def test_newton_schulz_batch_equals_each_matrix_in_float64(shape, steps, coeffs, use_addmm) -> None:
    """The batched Newton–Schulz is, matrix by matrix, the per-matrix formula
    (fused as baddbmm or not): each matrix normalised by its own norm (one below
    eps is divided by eps), tall ones orientated wide and back. float64 on both
    sides: what is left is summation order (bmm against mm), ~1e-15."""
    seed_torch()
    scales = torch.logspace(-10, 2, shape[0], dtype=torch.float64) if shape[0] > 1 else torch.ones(1, dtype=torch.float64)
    g = torch.randn(shape, dtype=torch.float64) * scales.view(-1, 1, 1)  # the first one's norm is below eps = 1e-7
    out = O.newton_schulz(g, steps, coeffs, 1e-7, dtype=torch.float64, use_addmm=use_addmm)
    assert out.dtype == torch.float64 and out.shape == g.shape
    ref = torch.stack([ns_float64(m, steps, coeffs, 1e-7) for m in g])
    err = (out - ref).flatten(1).norm(dim=1) / ref.flatten(1).norm(dim=1)
    assert (err < 1e-12).all(), err
    assert O.newton_schulz(g, steps, coeffs, 1e-7).dtype == torch.bfloat16  # torch's Muon orthogonalises in bfloat16


@pytest.fixture
def float64_newton_schulz(monkeypatch):
    """Newton–Schulz in float64 on both sides: sparsetrain's Muon through its
    ``ns_dtype``, torch's (per matrix) by making ``.bfloat16()`` -- its only cast
    -- a float64 one. Then the two agree to summation order, not bf16 rounding.
    The cast copies, as a cast of a float32 tensor to bf16 does: torch divides
    its result in place, which must not reach a float64 momentum buffer."""
    monkeypatch.setattr(O._muon_class(), "ns_dtype", torch.float64)
    monkeypatch.setattr(torch.Tensor, "bfloat16", lambda self, *args, **kwargs: self.to(torch.float64, copy=True))
    assert torch.ones(1).bfloat16().dtype == torch.float64


def moved_apart(p: torch.Tensor, q: torch.Tensor, p0: torch.Tensor) -> float:
    """|p - q| relative to how far q moved from p0."""
    return float((p.double() - q.double()).norm() / (q.double() - p0.double()).norm())


@needs_muon
@pytest.mark.parametrize("precision", ["bfloat16", "float64"])
@pytest.mark.parametrize("nesterov,adjust", [(True, None), (True, "match_rms_adamw"), (False, "original")])
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA"))])
def test_batched_muon_equals_torch_muon_per_matrix(precision, nesterov, adjust, device, request) -> None:
    """Muon over shape groups (several matrices of one shape, matrices of other
    shapes, an [E, out, in] stack joining the matrices of its slices' shape, two
    param groups with their own lr / decay / momentum, a parameter without a
    gradient on one step) equals torch.optim.Muon over the same matrices one by
    one -- the stack's slices as E separate 2-D parameters -- over 3 steps."""
    if precision == "float64":
        request.getfixturevalue("float64_newton_schulz")
    dtype = torch.float64 if precision == "float64" else torch.float32
    seed_torch()
    shapes = [(24, 10), (16, 16), (24, 10), (10, 24), (16, 16), (24, 10), (7, 40)]
    mats = [nn.Parameter(torch.randn(s, dtype=dtype, device=device)) for s in shapes]
    stack = nn.Parameter(torch.randn(3, 24, 10, dtype=dtype, device=device))
    ref_mats = [nn.Parameter(p.detach().clone()) for p in mats]
    alone = [nn.Parameter(stack.detach()[e].clone()) for e in range(3)]
    start = [p.detach().clone() for p in mats] + [stack.detach()[e].clone() for e in range(3)]
    hyper = dict(lr=0.02, weight_decay=0.1, momentum=0.95, nesterov=nesterov, adjust_lr_fn=adjust)
    second = dict(lr=0.01, weight_decay=0.0, momentum=0.9)
    opt = O._muon_class()([{"params": mats[:4] + [stack]}, {"params": mats[4:], **second}], **hyper)
    ref = torch.optim.Muon([{"params": ref_mats[:4] + alone}, {"params": ref_mats[4:], **second}], **hyper)
    for t in range(3):
        for g_opt, g_ref in zip(opt.param_groups, ref.param_groups):
            g_opt["lr"] = g_ref["lr"] = (0.02, 0.015, 0.005)[t] * (1 if g_opt is opt.param_groups[0] else 0.5)
        for p, q in zip(mats, ref_mats):
            p.grad = None if (t == 1 and p is mats[2]) else torch.randn_like(p)  # skipped: no momentum step either
            q.grad = None if p.grad is None else p.grad.clone()
        stack.grad = torch.randn_like(stack)
        for e in range(3):
            alone[e].grad = stack.grad[e].clone()
        opt.step()
        ref.step()
    ours = list(mats) + [stack[e] for e in range(3)]
    theirs = ref_mats + alone
    bufs = [opt.state[p]["momentum_buffer"] for p in mats] + [opt.state[stack]["momentum_buffer"][e] for e in range(3)]
    ref_bufs = [ref.state[q]["momentum_buffer"] for q in theirs]
    # float64: the same arithmetic up to summation order. bfloat16: both
    # orthogonalise in bf16 (8-bit mantissa, ~0.4% a rounding); where a batched
    # matmul rounds differently from the per-matrix one (cuBLAS picks other
    # kernels for bmm than mm; on CPU they agree bit for bit, which
    # test_muon_part_equals_torch_muon_and_rest_equals_adamw holds), five NS
    # steps can carry a ~1% difference into an update, so the parameters must
    # agree within 3% of how far they moved. The momentum never goes through
    # bf16: it agrees to float rounding either way.
    tol = 1e-10 if precision == "float64" else 3e-2
    for i, (p, q, p0) in enumerate(zip(ours, theirs, start)):
        assert moved_apart(p, q, p0) < tol, (i, moved_apart(p, q, p0))
    for b, rb in zip(bufs, ref_bufs):
        assert torch.allclose(b, rb, rtol=1e-6 if dtype == torch.float32 else 1e-12, atol=0)


@needs_muon
def test_muon_state_dict_round_trips_with_torch_muon(float64_newton_schulz, tmp_path) -> None:
    """The state is torch.optim.Muon's (one "momentum_buffer" a parameter, torch's
    group options): a state saved by sparsetrain's Muon resumes in torch's and
    one saved by torch's in sparsetrain's, each ending where 4 straight steps
    end (float64 Newton–Schulz, so a wrongly restored momentum would show)."""
    seed_torch()
    shapes = [(24, 10), (24, 10), (10, 24), (16, 16)]
    start = [torch.randn(s, dtype=torch.float64) for s in shapes]
    grads = [[torch.randn(s, dtype=torch.float64) for s in shapes] for _ in range(4)]
    hyper = dict(lr=0.02, weight_decay=0.1, momentum=0.95, nesterov=True, adjust_lr_fn="original")

    def make(cls):
        params = [nn.Parameter(w.clone()) for w in start]
        return params, cls(params, **hyper)

    def run(params, opt, ts):
        for t in ts:
            for p, g in zip(params, grads[t]):
                p.grad = g.clone()
            opt.step()

    def through_disk(opt, name):
        torch.save(opt.state_dict(), tmp_path / name)
        return torch.load(tmp_path / name, weights_only=True)

    straight = make(O._muon_class())
    run(*straight, range(4))
    for first_cls, then_cls in [(O._muon_class(), torch.optim.Muon), (torch.optim.Muon, O._muon_class())]:
        first = make(first_cls)
        run(*first, range(2))
        sd = through_disk(first[1], "muon.pt")
        assert [sorted(s) for s in sd["state"].values()] == [["momentum_buffer"]] * len(shapes)
        then = make(then_cls)
        assert sorted(sd["param_groups"][0]) == sorted(then[1].state_dict()["param_groups"][0])
        then[1].load_state_dict(sd)
        for p, w in zip(then[0], first[0]):
            p.data.copy_(w)
        run(*then, range(2, 4))
        for p, q, p0 in zip(then[0], straight[0], start):
            assert moved_apart(p, q, p0) < 1e-10


# ----------------------------------------------------------------------------- Lion, GaLore, 8-bit


@needs("lion_pytorch")
def test_lion_matches_the_paper_update_in_float64() -> None:
    """Lion (Chen et al. 2023, Algorithm 2): c = b1 m + (1-b1) g;
    w -= lr (sign(c) + wd w); m = b2 m + (1-b2) g -- decay on matrices only."""
    seed_torch()
    cfg = cfg_of(optimizer="lion", lr=1e-3, weight_decay=0.3, beta1=0.9, beta2=0.99)
    model = build_model(cfg.model).double()
    opt = O.build_optimizer(model, cfg, "cpu")
    roles = {id(p): role for _, p, role in O.parameter_roles(model)}
    ref = {id(p): (p.detach().clone(), torch.zeros_like(p)) for p in model.parameters()}
    for _ in range(4):
        for p in model.parameters():
            g = torch.randn_like(p)
            g.view(-1)[0] = 0.0  # sign(0) = 0: no move from the sign term
            p.grad = g
            w, m = ref[id(p)]
            wd = cfg.weight_decay if roles[id(p)] in O.DECAYED_ROLES else 0.0
            c = cfg.beta1 * m + (1 - cfg.beta1) * g
            ref[id(p)] = (w - cfg.lr * (torch.sign(c) + wd * w), cfg.beta2 * m + (1 - cfg.beta2) * g)
        opt.step()
    for p in model.parameters():
        assert torch.allclose(p, ref[id(p)][0], rtol=0, atol=1e-15)


def galore_float64(w0: torch.Tensor, grads: list[torch.Tensor], lr: float, betas, eps: float, wd: float, rank: int,
                   gap: int, scale: float) -> torch.Tensor:
    """GaLore-AdamW (Zhao et al. 2024) on one matrix with rows >= cols: the
    gradient projected on its top-``rank`` right singular vectors (refreshed
    every ``gap`` steps), Adam in that space, projected back times ``scale``,
    then the weight decay."""
    w = w0.double()
    m = v = proj = None
    for t, g in enumerate(grads):
        if t % gap == 0:
            # from the float32 gradient as GaLore takes it: singular vectors' signs are
            # arbitrary, and the moments carry over a refresh, so they must match
            proj = torch.linalg.svd(g.float(), full_matrices=False)[2][:rank].double()  # [rank, cols]
        g = g.double()
        low = g @ proj.T
        m = low * (1 - betas[0]) if m is None else betas[0] * m + (1 - betas[0]) * low
        v = low * low * (1 - betas[1]) if v is None else betas[1] * v + (1 - betas[1]) * low * low
        step = lr * math.sqrt(1 - betas[1] ** (t + 1)) / (1 - betas[0] ** (t + 1))
        w = w - step * ((m / (v.sqrt() + eps)) @ proj) * scale
        w = w - lr * wd * w
    return w


@needs("galore_torch")
def test_galore_matches_its_update_rule(offline_hub) -> None:
    seed_torch()
    cfg = cfg_of(optimizer="galore_adamw", galore_rank=4, galore_update_proj_gap=2, galore_scale=0.5, weight_decay=0.1)
    layer = nn.Linear(16, 40, bias=False)
    opt = O.build_optimizer(layer, cfg, "cpu")
    assert opt.param_groups[0]["rank"] == 4  # the hidden matrix is in the projected group
    w0 = layer.weight.detach().clone()
    grads = [torch.randn(40, 16) for _ in range(5)]
    for g in grads:
        layer.weight.grad = g.clone()
        opt.step()
    ref = galore_float64(w0, grads, cfg.lr, (cfg.beta1, cfg.beta2), 1e-8, 0.1, 4, 2, 0.5)
    assert torch.allclose(layer.weight.double(), ref, rtol=1e-4, atol=1e-6)
    assert not torch.allclose(layer.weight.double(), w0.double(), atol=1e-3)


@needs("bitsandbytes")
def test_adamw8bit_runs_on_cpu_close_to_adamw(offline_hub) -> None:
    """bitsandbytes >= 0.49 runs its 8-bit AdamW on CPU too: a large matrix's
    moments are uint8, and the steps stay close to AdamW's."""
    seed_torch()
    cfg = cfg_of(optimizer="adamw8bit", lr=1e-2)
    layer = nn.Linear(128, 128)
    ref_layer = copy.deepcopy(layer)
    w0 = layer.weight.detach().clone()
    opt = O.build_optimizer(layer, cfg, "cpu")
    ref = legacy_adamw(ref_layer, cfg.lr, cfg.weight_decay, (cfg.beta1, cfg.beta2))
    for _ in range(5):
        for p, q in zip(layer.parameters(), ref_layer.parameters()):
            p.grad = torch.randn_like(p)
            q.grad = p.grad.clone()
        opt.step()
        ref.step()
    assert opt.state[layer.weight]["state1"].dtype == torch.uint8
    err = (layer.weight - ref_layer.weight).norm() / (ref_layer.weight - w0).norm()
    assert err < 0.04  # 8-bit moments: about 1% off AdamW's moves


# ----------------------------------------------------------------------------- exact resume


RESUMABLE = [("adamw", "adamw"), ("muon", "adamw"), ("muon", "lion"), ("lion", "adamw"),
             ("adamw8bit", "adamw"), ("galore_adamw", "adamw")]
NEEDS = {"lion": "lion_pytorch", "adamw8bit": "bitsandbytes", "galore_adamw": "galore_torch"}


def train_steps(model, heads, opt, cfg, steps: range, batches) -> None:
    """The trainer's step: scheduled lr times lr_scale, MTP loss, clipping over the groups."""
    for t in steps:
        lr = lr_at(t, cfg.lr, cfg.warmup_steps, cfg.max_steps, cfg.min_lr_ratio)
        for group in opt.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        x, y = batches[t]
        loss, _ = naive_loss(model, heads, x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)


@pytest.mark.parametrize("kind,fallback", RESUMABLE)
def test_exact_resume_through_a_checkpoint(kind, fallback, tmp_path, offline_hub) -> None:
    """4 steps, checkpoint (torch.save, loaded weights_only), a fresh model and
    optimizer, 2 more steps == 6 straight steps, bitwise."""
    for k in (kind, fallback):
        if k in NEEDS:
            pytest.importorskip(NEEDS[k])
    if kind == "muon" and not hasattr(torch.optim, "Muon"):
        pytest.skip("needs torch >= 2.9 (torch.optim.Muon)")
    from sparsetrain.checkpoint import load_checkpoint, save_checkpoint

    seed = seed_torch()
    cfg = cfg_of(optimizer=kind, muon_fallback=fallback, ffn="swiglu", galore_rank=4, galore_update_proj_gap=5)
    batches = [tuple(torch.randint(0, 300, (2, 16)) for _ in range(2)) for _ in range(6)]

    def build():
        torch.manual_seed(seed)
        model = build_model(cfg.model)
        heads = MTPHeads(model, 2)
        return model, heads, O.build_optimizer(nn.ModuleList([model, heads]), cfg, "cpu")

    straight = build()
    train_steps(*straight, cfg, range(6), batches)

    first = build()
    train_steps(*first, cfg, range(4), batches)
    save_checkpoint(tmp_path / "ckpt.pt", {"model": first[0].state_dict(), "model_config": {}, "mtp": first[1].state_dict(),
                                           "optimizer": first[2].state_dict()})
    state = load_checkpoint(tmp_path / "ckpt.pt")
    resumed = build()
    resumed[0].load_state_dict(state["model"])
    resumed[1].load_state_dict(state["mtp"])
    resumed[2].load_state_dict(state["optimizer"])
    train_steps(*resumed, cfg, range(4, 6), batches)

    moved = False
    for (name, p), q, p0 in zip(straight[0].named_parameters(), resumed[0].parameters(), build()[0].parameters()):
        assert torch.equal(p, q), name
        moved |= not torch.equal(p, p0)
    for p, q in zip(straight[1].parameters(), resumed[1].parameters()):
        assert torch.equal(p, q)
    assert moved


@needs_muon
def test_muon_resume_on_resnet_bk_expert_stacks(tmp_path) -> None:
    """The same for Muon over ResNet-BK, whose expert stacks hold 3-D momentum."""
    seed = seed_torch()
    cfg = cfg_of(arch="resnet_bk", ffn="relu2", optimizer="muon", n_layer=1)
    batches = [tuple(torch.randint(0, 300, (2, 16)) for _ in range(2)) for _ in range(4)]

    def build():
        torch.manual_seed(seed)
        model = build_model(cfg.model)
        return model, O.build_optimizer(model, cfg, "cpu")

    def steps(model, opt, ts):
        for t in ts:
            for group in opt.param_groups:
                group["lr"] = lr_at(t, cfg.lr, cfg.warmup_steps, cfg.max_steps, cfg.min_lr_ratio) * group.get("lr_scale", 1.0)
            x, y = batches[t]
            model(x, y)[1].backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

    straight = build()
    steps(*straight, range(4))
    first = build()
    steps(*first, range(2))
    buf = io.BytesIO()
    torch.save({"model": first[0].state_dict(), "optimizer": first[1].state_dict()}, buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    resumed = build()
    resumed[0].load_state_dict(state["model"])
    resumed[1].load_state_dict(state["optimizer"])
    steps(*resumed, range(2, 4))
    for (name, p), q in zip(straight[0].named_parameters(), resumed[0].parameters()):
        assert torch.equal(p, q), name
    stack = straight[0].blocks[0].layer.moe.up
    assert straight[1].state[stack]["momentum_buffer"].shape == stack.shape


@needs_muon
def test_muon_state_from_a_torch_with_other_options_loads() -> None:
    """A Muon state saved by a torch version whose Muon lacked one of this
    version's options (or had one more) loads and steps with this one's default."""
    cfg = cfg_of(optimizer="muon")
    model = build_model(cfg.model)
    opt = O.build_optimizer(model, cfg, "cpu")
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    opt.step()
    sd = copy.deepcopy(opt.state_dict())
    group = sd["combined"]["muon"]["param_groups"][0]
    del group["ns_steps"]
    group["an_option_of_another_version"] = True
    fresh = O.build_optimizer(model, cfg, "cpu")
    fresh.load_state_dict(sd)
    assert fresh.param_groups[-1]["ns_steps"] == opt.param_groups[-1]["ns_steps"]
    fresh.step()


@needs_muon
def test_param_groups_stay_live_after_load_state_dict() -> None:
    """torch's load_state_dict replaces a part's group dicts: the lr the
    trainer writes after a resume must still reach the parts."""
    cfg = cfg_of(optimizer="muon")
    model = build_model(cfg.model)
    opt = O.build_optimizer(model, cfg, "cpu")
    opt.load_state_dict(copy.deepcopy(opt.state_dict()))
    for group in opt.param_groups:
        group["lr"] = 0.123 * group["lr_scale"]
    assert [g["lr"] for part in opt.parts.values() for g in part.param_groups] == [0.123, 0.123, 0.123 * opt.param_groups[2]["lr_scale"]]
    assert opt.param_groups[2]["lr_scale"] == pytest.approx(cfg.muon_lr / cfg.lr)


@needs_muon
@pytest.mark.parametrize("saved_kind,run_kind", [("adamw", "muon"), ("muon", "adamw"), ("adamw", "lion"), ("lion", "muon")])
def test_resume_with_another_optimizer_is_refused(saved_kind, run_kind) -> None:
    if "lion" in (saved_kind, run_kind):
        pytest.importorskip("lion_pytorch")
    model = build_model(cfg_of().model)
    saved = O.build_optimizer(model, cfg_of(optimizer=saved_kind), "cpu")
    run = O.build_optimizer(model, cfg_of(optimizer=run_kind), "cpu")
    with pytest.raises(CheckpointError) as e:
        run.load_state_dict(saved.state_dict())
    assert "\n" not in str(e.value) and saved_kind in str(e.value) and run_kind in str(e.value)


def test_legacy_adamw_state_loads() -> None:
    """An AdamW state saved before groups carried ``kind`` still resumes."""
    model = build_model(cfg_of().model)
    old = legacy_adamw(model, 1e-3, 0.1, (0.9, 0.95))
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    old.step()
    opt = O.build_optimizer(model, cfg_of(), "cpu")
    opt.load_state_dict(old.state_dict())
    assert len(opt.state) == len(list(model.parameters()))


# ----------------------------------------------------------------------------- state, FIRE


@needs_muon
def test_state_clear_and_state_bytes() -> None:
    """``state.clear()`` (what FIRE does) empties every part; state_bytes counts
    AdamW's two moments (+ its step) and Muon's one momentum buffer."""
    cfg = cfg_of(optimizer="muon")
    model = build_model(cfg.model)
    opt = O.build_optimizer(model, cfg, "cpu")
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    opt.step()
    hidden = [p for _, p, r in O.parameter_roles(model) if r == "hidden"]
    rest = [p for _, p, r in O.parameter_roles(model) if r != "hidden"]
    assert len(opt.state) == len(hidden) + len(rest)
    assert O.state_bytes(opt) == sum(4 * p.numel() for p in hidden) + sum(8 * p.numel() + 4 for p in rest)
    assert opt.state[hidden[0]]["momentum_buffer"].shape == hidden[0].shape
    opt.state.clear()
    assert len(opt.state) == 0 and all(len(part.state) == 0 for part in opt.parts.values())
    opt.step()  # starts over from zero moments
    assert len(opt.state) == len(hidden) + len(rest)


# ----------------------------------------------------------------------------- Collider, DDP


@needs_muon
def test_collider_step() -> None:
    """Muon after a Collider backward (gradients through kept rows only) equals
    torch's Muon and AdamW run on the same gradients."""
    from sparsetrain.collider import ColliderModel, filter as collider_filter, masked_cross_entropy

    seed_torch()
    cfg = cfg_of(optimizer="muon")
    model = build_model(cfg.model)
    ref_model = copy.deepcopy(model)
    opt = O.build_optimizer(model, cfg, "cpu")
    x, y = torch.randint(0, 300, (2, 16)), torch.randint(0, 300, (2, 16))
    keep = torch.rand(2, 16) < 0.5
    keep[:, 0] = True
    logits = ColliderModel(model)(x)
    with collider_filter(keep):
        masked_cross_entropy(logits, y, keep).backward()
    roles = {name: role for name, _, role in O.parameter_roles(ref_model)}
    named = dict(ref_model.named_parameters())
    ref_muon = torch.optim.Muon([named[n] for n, r in roles.items() if r == "hidden"], lr=cfg.muon_lr, weight_decay=0.0)
    ref_adamw = torch.optim.AdamW([{"params": [named[n] for n, r in roles.items() if r == "head"], "weight_decay": cfg.weight_decay},
                                   {"params": [named[n] for n, r in roles.items() if r in ("embedding", "vector")], "weight_decay": 0.0}],
                                  lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))
    for p, q in zip(model.parameters(), ref_model.parameters()):
        q.grad = p.grad.clone()
    opt.step()
    ref_muon.step()
    ref_adamw.step()
    for (name, p), q in zip(model.named_parameters(), ref_model.parameters()):
        assert torch.equal(p, q), name


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world: int, port: int, seed: int, batch: tuple, out: str) -> None:
    from torch.nn.parallel import DistributedDataParallel as DDP

    from sparsetrain.distributed import shutdown_distributed, track_ddp

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    ok = False
    try:
        cfg = cfg_of(optimizer="muon")
        torch.manual_seed(seed)
        model = build_model(cfg.model)
        ddp = track_ddp(DDP(model))
        opt = O.build_optimizer(model, cfg, "cpu")
        x, y = batch
        n = x.shape[0] // world
        for _ in range(2):
            ddp(x[rank * n:(rank + 1) * n], y[rank * n:(rank + 1) * n])[1].backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        torch.save({k: v.clone() for k, v in model.state_dict().items()}, Path(out) / f"muon{rank}.pt")
        ok = True
    finally:
        shutdown_distributed(synchronize=ok)  # ordered teardown, no os._exit (docs/scaling.md)


@needs_muon
def test_muon_under_ddp_keeps_replicas_equal(tmp_path) -> None:
    """Two gloo ranks, each half the batch: after two Muon steps both replicas
    are bitwise equal and match one process stepping on the whole batch."""
    seed = seed_torch()
    x, y = torch.randint(0, 300, (4, 16)), torch.randint(0, 300, (4, 16))
    mp.spawn(_ddp_worker, args=(2, _free_port(), seed, (x, y), str(tmp_path)), nprocs=2, join=True)
    r0 = torch.load(tmp_path / "muon0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "muon1.pt", weights_only=True)
    cfg = cfg_of(optimizer="muon")
    torch.manual_seed(seed)
    model = build_model(cfg.model)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    opt = O.build_optimizer(model, cfg, "cpu")
    for _ in range(2):
        model(x, y)[1].backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    for k, v in model.state_dict().items():
        assert torch.equal(r0[k], r1[k]), k
        # all-reduced half-batch gradients differ from the whole batch's in the last
        # bits; bfloat16 Newton-Schulz amplifies that in a few entries, not in the whole
        assert (r0[k] - v).norm() <= 0.05 * (v - start[k]).norm() + 1e-7, k


# ----------------------------------------------------------------------------- refusals, config


@pytest.mark.parametrize("kind,fallback,module,package", [
    ("lion", "adamw", "lion_pytorch", "lion-pytorch"),
    ("muon", "lion", "lion_pytorch", "lion-pytorch"),
    ("adamw8bit", "adamw", "bitsandbytes", "bitsandbytes"),
    ("galore_adamw", "adamw", "galore_torch", "galore-torch"),
])
def test_missing_package_is_one_line(kind, fallback, module, package, monkeypatch) -> None:
    if kind == "muon" and not hasattr(torch.optim, "Muon"):
        pytest.skip("needs torch >= 2.9 (torch.optim.Muon)")
    for name in [m for m in sys.modules if m == module or m.startswith(module + ".")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, module, None)  # import fails as if not installed
    cfg = cfg_of(optimizer=kind, muon_fallback=fallback)
    with pytest.raises(ConfigError) as e:
        O.build_optimizer(build_model(cfg.model), cfg, "cpu")
    msg = str(e.value)
    assert "\n" not in msg and f"needs the {package} package" in msg and f"pip install {package}" in msg


@needs("galore_torch")
def test_galore_names_its_missing_dependency(monkeypatch) -> None:
    """galore-torch imports bitsandbytes: the line names that package."""
    for name in [m for m in sys.modules if m.split(".")[0] in ("galore_torch", "bitsandbytes")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    cfg = cfg_of(optimizer="galore_adamw")
    with pytest.raises(ConfigError, match=r"needs the bitsandbytes package"):
        O.build_optimizer(build_model(cfg.model), cfg, "cpu")


def test_galore_refuses_resnet_bk(monkeypatch) -> None:
    """GaLore projects 2-D gradients only: ResNet-BK (whose expert stacks are
    ``[E, out, in]``) is refused with one line when the config is validated, and
    a ResNet-BK model handed to build_optimizer under another arch's config is
    refused alike, before galore-torch is imported; other optimizers take it."""
    monkeypatch.setitem(sys.modules, "galore_torch", None)  # the refusal is not a missing-package error
    with pytest.raises(ConfigError) as e:
        cfg_of(arch="resnet_bk", optimizer="galore_adamw")
    msg = str(e.value)
    assert "\n" not in msg and "optimizer = galore_adamw" in msg and "model.arch = resnet_bk" in msg
    model = build_model(cfg_of(arch="resnet_bk").model)
    with pytest.raises(ConfigError) as e:
        O.build_optimizer(model, cfg_of(optimizer="galore_adamw"), "cpu")
    assert str(e.value) == msg
    for kind in OPTIMIZERS:
        if kind != "galore_adamw":
            assert cfg_of(arch="resnet_bk", optimizer=kind).optimizer == kind


def test_muon_without_torch_muon_is_one_line(monkeypatch) -> None:
    monkeypatch.delattr(torch.optim, "Muon")
    monkeypatch.setattr(O, "_MUON_CLASS", None)
    cfg = cfg_of(optimizer="muon")
    with pytest.raises(ConfigError, match=re.escape("needs torch >= 2.9")):
        O.build_optimizer(build_model(cfg.model), cfg, "cpu")


@pytest.mark.parametrize("key,value,fragment", [
    ("optimizer", "sgd", "training.optimizer must be one of"),
    ("muon_fallback", "muon", "training.muon_fallback must be one of"),
    ("muon_lr", 0.0, "training.muon_lr must be a positive number"),
    ("muon_momentum", 1.0, "training.muon_momentum must be in [0, 1)"),
    ("muon_weight_decay", -0.1, "training.muon_weight_decay must be >= 0"),
    ("muon_adjust_lr", "spectral", "training.muon_adjust_lr must be one of"),
    ("galore_rank", 0, "training.galore_rank must be >= 1"),
    ("galore_update_proj_gap", 0, "training.galore_update_proj_gap must be >= 1"),
    ("galore_scale", -1.0, "training.galore_scale must be a positive number"),
])
def test_bad_optimizer_config_is_one_line(key, value, fragment) -> None:
    with pytest.raises(ConfigError) as e:
        cfg_of(**{key: value})
    assert fragment in str(e.value) and str(value) in str(e.value) and "\n" not in str(e.value)


def test_optimizer_keys_from_toml(tmp_path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('[training]\noptimizer = "muon"\nmuon_fallback = "lion"\nmuon_lr = 0.01\nmuon_momentum = 0.9\n')
    cfg = build_config("tiny", config_file=path)
    assert (cfg.optimizer, cfg.muon_fallback, cfg.muon_lr, cfg.muon_momentum) == ("muon", "lion", 0.01, 0.9)


# ----------------------------------------------------------------------------- the trainer


@needs_muon
def test_trainer_runs_muon_with_mtp_and_resumes_exactly(make_cfg, tmp_path) -> None:
    from test_trainer import interrupted_run_matches

    from sparsetrain.trainer import Trainer

    kw = dict(optimizer="muon", use_mtp=True, max_steps=6, eval_every=3)
    interrupted_run_matches(make_cfg, tmp_path, stop_at=3, **kw)
    t = Trainer(make_cfg(out_dir=str(tmp_path / "c"), **kw), verbose=False)
    t.train_step()
    assert isinstance(t.optimizer, O.CombinedOptimizer)
    lr = lr_at(0, t.cfg.lr, t.cfg.warmup_steps, t.cfg.max_steps, t.cfg.min_lr_ratio)
    assert [g["lr"] for g in t.optimizer.param_groups] == [lr * g["lr_scale"] for g in t.optimizer.param_groups]
    assert t.optimizer.param_groups[-1]["lr"] == pytest.approx(lr * t.cfg.muon_lr / t.cfg.lr)
    mtp_proj = t.mtp.heads[0].proj.weight
    assert "momentum_buffer" in t.optimizer.state[mtp_proj]


@needs_muon
def test_trainer_fire_clears_every_part(make_cfg) -> None:
    from sparsetrain.trainer import Trainer

    t = Trainer(make_cfg(optimizer="muon", fire_at_step=2, max_steps=3, eval_every=0), verbose=False)
    t.train_step()
    n_params = sum(len(g["params"]) for g in t.optimizer.param_groups)
    assert len(t.optimizer.state) == n_params
    t.train_step()  # FIRE after this step restarts the moments of both parts
    assert len(t.optimizer.state) == 0 and all(len(part.state) == 0 for part in t.optimizer.parts.values())
    t.train_step()
    assert len(t.optimizer.state) == n_params


def _bitsandbytes_runs_on_cpu() -> bool:
    """bitsandbytes runs its 8-bit optimizers on CPU tensors from 0.49 on (read
    from the package metadata: importing it may reach for the network)."""
    import importlib.metadata

    try:
        version = importlib.metadata.version("bitsandbytes")
    except importlib.metadata.PackageNotFoundError:
        return False
    return tuple(int(v) for v in re.findall(r"\d+", version)[:2]) >= (0, 49)


@pytest.mark.parametrize("kind", ["adamw8bit", "galore_adamw"])
def test_trainer_steps_with_8bit_adamw_and_galore(kind, make_cfg, offline_hub) -> None:
    """Three Trainer steps on CPU (the tiny preset, shrunk): finite losses, every
    parameter moved, and the optimizer state is the kind's own. 8-bit AdamW: uint8
    moments with block scales and quantisation maps for every tensor of at least
    ``min_8bit_size`` elements, fp32 moments below. GaLore: each ``hidden`` matrix
    has a projector of rank ``galore_rank`` and Adam moments of the projected
    shape, and (no weight decay, one projection in three steps) its whole update
    lies in the projector's subspace; the rest has plain AdamW moments."""
    if importlib.util.find_spec(NEEDS[kind]) is None:
        pytest.skip(f"needs {NEEDS[kind]}")
    if kind == "adamw8bit" and not _bitsandbytes_runs_on_cpu():
        pytest.skip("bitsandbytes < 0.49 has no CPU 8-bit AdamW")
    from sparsetrain.trainer import Trainer

    rank = 4
    t = Trainer(make_cfg(optimizer=kind, galore_rank=rank, weight_decay=0.0, max_steps=3, eval_every=0), verbose=False)
    start = {n: p.detach().clone() for n, p in t.model.named_parameters()}
    result = t.fit()
    assert len(result.train_losses) == 3 and all(math.isfinite(v) for v in result.train_losses.values())
    for n, p in t.model.named_parameters():
        assert not torch.equal(p, start[n]), f"{n} did not move"
    opt = t.optimizer
    assert sum(len(g["params"]) for g in opt.param_groups) == len(start) == len(opt.state)
    if kind == "adamw8bit":
        quantised = 0
        for n, p in t.model.named_parameters():
            s = opt.state[p]
            if p.numel() >= opt.args.min_8bit_size:
                assert s["state1"].dtype == s["state2"].dtype == torch.uint8 and s["state1"].shape == p.shape, n
                assert {"absmax1", "absmax2", "qmap1", "qmap2"} <= set(s), n
                quantised += 1
            else:
                assert s["state1"].dtype == s["state2"].dtype == torch.float32, n
        assert quantised >= 2  # the embedding and the LM head at least
        return
    low_rank = opt.param_groups[0]
    assert low_rank["rank"] == rank
    hidden = [(n, p) for n, p, role in O.parameter_roles(t.model) if role == "hidden"]
    assert [id(p) for p in low_rank["params"]] == [id(p) for _, p in hidden]
    for n, p in hidden:
        s = opt.state[p]
        q = s["projector"].ortho_matrix
        delta = (p - start[n]).double()
        if p.shape[0] >= p.shape[1]:  # projected on the right: [out, rank] moments, Q is [rank, in]
            assert q.shape == (rank, p.shape[1]) and s["exp_avg"].shape == (p.shape[0], rank), n
            inside = delta @ q.double().T @ q.double()
        else:  # on the left: [rank, in] moments, Q is [out, rank]
            assert q.shape == (p.shape[0], rank) and s["exp_avg"].shape == (rank, p.shape[1]), n
            inside = q.double() @ q.double().T @ delta
        assert (delta - inside).norm() <= 1e-3 * delta.norm(), n
    for g in opt.param_groups[1:]:
        for p in g["params"]:
            assert "projector" not in opt.state[p] and opt.state[p]["exp_avg"].shape == p.shape


@pytest.mark.parametrize("fn", [None, "original", "match_rms_adamw"])
@pytest.mark.parametrize("shape", [(24, 10), (10, 24), (16, 16)])
def test_muon_lr_scale_fallback_is_torchs(fn, shape) -> None:
    """The batched Muon takes torch's per-shape lr scale, or its own copy of the formulas
    on a torch without the helper: the two agree."""
    import torch.optim._muon as torch_muon

    if not hasattr(torch_muon, "_adjust_lr"):
        pytest.skip("this torch has no _adjust_lr to compare with")
    assert O._muon_adjust_lr(0.02, fn, torch.Size(shape)) == pytest.approx(
        torch_muon._adjust_lr(0.02, fn, torch.Size(shape)), rel=1e-15)
