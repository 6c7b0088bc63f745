"""Does the engine's cuDNN attention backward stay right after ordinary
``F.scaled_dot_product_attention`` training of the same shapes in the process?

Torch caches cuDNN backward graphs per thread, keyed without the strides of
``dO``. Ordinary SDPA training runs its backward on autograd's device thread
with its own ``dO`` layout; the engine's backward also runs there (inside an
autograd Function). This script reproduces the failure by calling the engine
on that thread directly (``own_thread=False``) and checks the fix: the engine's
own thread (``attention.on_own_thread``). Layouts are the engine's (token-major
q/k/v); the ordinary traffic passes a head-major ``dO``.

    PYTHONPATH=src python bench/collider_cudnn_order.py --out $OUT/collider_cudnn_order.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
import sparsetrain.collider.attention as A  # noqa: E402
from sparsetrain.benchmark import environment  # noqa: E402


def rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


def inputs(B=16, H=12, T=1024, hd=64, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    q, k, v = (torch.randn(B, T, H, hd, device="cuda", dtype=torch.bfloat16, generator=g).transpose(1, 2) for _ in range(3))
    keep = torch.rand(B, T, device="cuda", generator=g) < 0.5
    d = torch.randn(B, T, H * hd, device="cuda", dtype=torch.bfloat16, generator=g) * keep[..., None]
    return q, k, v, d.view(B, T, H, hd).transpose(1, 2)  # token-major, zero rows at dropped queries


class _EngineOnAutogradThread(torch.autograd.Function):
    """Runs the engine's attention backward where the engine runs it: in a backward."""

    @staticmethod
    def forward(ctx, x, saved, d_out, own_thread):  # type: ignore[override]
        ctx.saved, ctx.d_out, ctx.own_thread = saved, d_out, own_thread
        return x.clone()

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        real = A.on_own_thread
        if not ctx.own_thread:
            A.on_own_thread = lambda fn: fn()  # the old behaviour: the caller's thread
        try:
            ctx.grads = A.attention_backward(ctx.saved, ctx.d_out)
        finally:
            A.on_own_thread = real
        _EngineOnAutogradThread.last = ctx.grads
        return g, None, None, None


def engine_errors(own_thread: bool, seed: int) -> dict:
    q, k, v, d_out = inputs(seed=seed)
    qf, kf, vf = (t.float().requires_grad_(True) for t in (q, k, v))
    ref = torch.autograd.grad(F.scaled_dot_product_attention(qf, kf, vf, is_causal=True), (qf, kf, vf), d_out.float())
    os.environ["SPARSETRAIN_ATTENTION_IMPL"] = "cudnn"
    A._cudnn_ok = None
    _, saved = A.attention_forward(q, k, v)
    x = torch.zeros(1, device="cuda", requires_grad=True)
    _EngineOnAutogradThread.apply(x, saved, d_out, own_thread).sum().backward()
    grads = _EngineOnAutogradThread.last
    return {"kind": saved.flash[0] if saved.flash else "recompute",
            **{n: rel(a, r) for n, a, r in zip(("dq", "dk", "dv"), grads, ref)}}


def ordinary_sdpa_training(seed: int) -> dict:
    """Dense SDPA fwd+bwd (cuDNN) with the engine's q/k/v layout but a head-major dO."""
    q, k, v, d_out = inputs(seed=seed)
    qr, kr, vr = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        F.scaled_dot_product_attention(qr, kr, vr, is_causal=True).backward(d_out.contiguous())
    qf, kf, vf = (t.float().requires_grad_(True) for t in (q, k, v))
    ref = torch.autograd.grad(F.scaled_dot_product_attention(qf, kf, vf, is_causal=True), (qf, kf, vf), d_out.float())
    return {n: rel(t.grad, r) for n, t, r in zip(("dq", "dk", "dv"), (qr, kr, vr), ref)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "collider_cudnn_order.json"))
    args = ap.parse_args()
    res = {"environment": environment(), "checks": []}
    steps = [("engine, fresh process", True), ("ordinary SDPA training", None),
             ("engine, after ordinary training", True), ("engine on autograd's thread (the old way)", False),
             ("ordinary SDPA training again", None)]
    for tag, own in steps:
        r = {"step": tag, "own_thread": own,
             **(ordinary_sdpa_training(seed=2) if own is None else engine_errors(own, seed=1))}
        res["checks"].append(r)
        print(r, flush=True)
    Path(args.out).write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
