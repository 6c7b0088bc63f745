"""Does the engine's direct cuDNN attention call give wrong gradients after
ordinary ``F.scaled_dot_product_attention`` calls of the same shapes ran in
the process (a plan cached for another layout)? Model-like layouts: q/k from
RoPE (contiguous), v a permuted view, the gradient token-major.

    PYTHONPATH=src python bench/collider_cudnn_order.py
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
import sparsetrain.collider.attention as A  # noqa: E402


def rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


def inputs(B=16, H=12, T=1024, hd=64, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    qkv = torch.randn(B, T, 3, H, hd, device="cuda", dtype=torch.bfloat16, generator=g)
    q, k, v = qkv.permute(2, 0, 3, 1, 4)
    q, k = q.contiguous(), k.contiguous()  # as apply_rope's torch.cat returns them
    keep = torch.rand(B, T, device="cuda", generator=g) < 0.5
    d = torch.randn(B, T, H * hd, device="cuda", dtype=torch.bfloat16, generator=g) * keep[..., None]
    d_out = d.view(B, T, H, hd).transpose(1, 2)  # token-major, zero rows at dropped queries
    return q, k, v, d_out


def engine_vs_reference(tag: str) -> None:
    q, k, v, d_out = inputs(seed=1)
    qf, kf, vf = (t.float().requires_grad_(True) for t in (q, k, v))
    ref = torch.autograd.grad(F.scaled_dot_product_attention(qf, kf, vf, is_causal=True), (qf, kf, vf), d_out.float())
    for impl in ("cudnn", "flash"):
        os.environ["SPARSETRAIN_ATTENTION_IMPL"] = impl
        A._cudnn_ok = None
        o, saved = A.attention_forward(q, k, v)
        like = A.AttentionSaved(saved.q, saved.k, saved.v, saved.out, saved.flash)
        grads = A.attention_backward(like, d_out if o.transpose(1, 2).is_contiguous() else d_out.contiguous())
        print(f"{tag:<28} {impl:<6} out layout token-major={o.transpose(1, 2).is_contiguous()} "
              + " ".join(f"{n} {rel(a, r):.2e}" for n, a, r in zip(("dq", "dk", "dv"), grads, ref)), flush=True)


def main() -> None:
    engine_vs_reference("fresh process")
    # ordinary SDPA traffic of the same shapes: training (autograd) and eval (no grad)
    q, k, v, d_out = inputs(seed=2)
    qr, kr, vr = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    F.scaled_dot_product_attention(qr, kr, vr, is_causal=True).backward(d_out.contiguous())
    with torch.no_grad():
        F.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.cuda.synchronize()
    engine_vs_reference("after F.sdpa fwd+bwd")


if __name__ == "__main__":
    main()
