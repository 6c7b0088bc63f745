"""Collider: cross-layer token filtering for the sparsetrain GPT.

The forward runs densely on all tokens (the same kernels as the dense model)
and keeps what the backward needs. The whole model is one autograd node; its
backward reads the keep mask set by :func:`filter` and carries *compact*
``[kept, D]`` gradients through every layer, so each backward GEMM (LM head,
FFN, output and QKV projections, embedding) runs dense on the kept rows only.

Exact semantics, with ``keep`` the tokens whose loss counts:

* dropped positions' keys and values are constants in every attention layer
  (stop-gradient), so dropped positions receive no gradient anywhere;
* kept positions and all weights get the exact gradient of that objective;
* keep-all reproduces dense training's gradients.

``tests/test_collider.py`` checks all three against a float64 reference that
detaches dropped keys and values in an ordinary autograd forward.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..model import GPT, IGNORE_INDEX, apply_rope, upcast
from .attention import AttentionSaved, attention_backward, attention_forward

# Process-wide, not thread-local: autograd runs CUDA backward nodes on its own
# worker thread, which would not see a thread-local set by the caller.
_active_keep: list[torch.Tensor | None] = []
_lock = threading.Lock()


@contextlib.contextmanager
def filter(keep: torch.Tensor | None) -> Iterator[None]:
    """Backward passes inside this block keep only the ``keep`` tokens ([B, T] bool).

    ``None`` keeps everything (dense gradients). Nests; restores on exit.
    """
    with _lock:
        _active_keep.append(keep)
    try:
        yield
    finally:
        with _lock:
            _active_keep.pop()


def current_keep() -> torch.Tensor | None:
    return _active_keep[-1] if _active_keep else None


@dataclass
class _BlockSaved:
    x: torch.Tensor  # block input (residual stream)
    att: AttentionSaved
    o2: torch.Tensor  # attention output [B, T, D], input of the output projection
    x1: torch.Tensor  # residual after attention
    u: torch.Tensor  # FFN up-projection (pre-activation)
    g: torch.Tensor | None  # SwiGLU gate pre-activation


def _compute_dtype(model: GPT, device: torch.device) -> torch.dtype:
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return model.embed.weight.dtype


def rmsnorm_backward(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of ``y = x / sqrt(mean(x^2) + eps) * w`` for rows ``x`` [K, D]:
    returns ``(dx, dw)`` in the float32/float64 compute precision."""
    x = upcast(x)
    dy = dy.to(x.dtype)
    r = torch.rsqrt(x.square().mean(-1, keepdim=True) + eps)
    xhat = x * r
    dw = (dy * xhat).sum(0)
    dxhat = dy * weight.to(x.dtype)
    dx = r * (dxhat - xhat * (dxhat * xhat).mean(-1, keepdim=True))
    return dx, dw


def rope_inverse(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Transpose of :func:`apply_rope` (a rotation by the opposite angle)."""
    x1, x2 = upcast(x).chunk(2, dim=-1)
    return torch.cat((x1 * cos + x2 * sin, -x1 * sin + x2 * cos), dim=-1).type_as(x)


def _forward(model: GPT, idx: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """Dense forward of ``model`` on all tokens, numerically the model's own
    (under autocast: bf16 GEMMs, float32 residual stream and norms)."""
    cfg = model.config
    B, T = idx.shape
    H, hd, D = cfg.n_head, cfg.head_dim, cfg.d_model
    cdt = _compute_dtype(model, idx.device)
    cos, sin = model.rope_cos[:T], model.rope_sin[:T]
    blocks = []
    w: dict[int, torch.Tensor] = {}  # compute-dtype weights, cast once and reused by the backward

    def W(lin: nn.Linear) -> torch.Tensor:
        if id(lin.weight) not in w:
            w[id(lin.weight)] = lin.weight.to(cdt)
        return w[id(lin.weight)]

    with torch.autocast(idx.device.type, enabled=False):
        x = model.embed(idx)
        for blk in model.blocks:
            a = blk.attn_norm(x)
            qkv = F.linear(a.to(cdt), W(blk.attn.qkv))
            q, k, v = qkv.view(B, T, 3, H, hd).permute(2, 0, 3, 1, 4)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
            o, att = attention_forward(q, k, v)
            o2 = o.transpose(1, 2).reshape(B, T, D)
            x1 = x + F.linear(o2, W(blk.attn.proj))
            b = blk.ffn_norm(x1).to(cdt)
            ffn = blk.ffn
            u = F.linear(b, W(ffn.up))
            if ffn.gate is not None:
                g = F.linear(b, W(ffn.gate))
                f = F.silu(g) * u
            else:
                g = None
                f = F.relu(u).square()
            x2 = x1 + F.linear(f, W(ffn.down))
            blocks.append(_BlockSaved(x=x, att=att, o2=o2, x1=x1, u=u, g=g))
            x = x2
        logits = F.linear(model.norm(x).to(cdt), W(model.lm_head))
    return logits, {"blocks": blocks, "h": x, "idx": idx, "cdt": cdt, "w": w}


def _backward(model: GPT, saved: dict, dlogits: torch.Tensor, keep: torch.Tensor | None) -> dict[int, torch.Tensor]:
    """Compact backward over kept rows. Returns ``{id(param): grad}``."""
    cfg = model.config
    idx = saved["idx"]
    cdt = saved["cdt"]
    B, T = idx.shape
    N, D, H, hd = B * T, cfg.d_model, cfg.n_head, cfg.head_dim
    if keep is None:
        kidx = torch.arange(N, device=idx.device)
    else:
        if keep.shape != idx.shape:
            raise ValueError(f"keep mask shape {tuple(keep.shape)} does not match the batch {tuple(idx.shape)}")
        kidx = torch.nonzero(keep.reshape(-1)).squeeze(1)
    K = kidx.numel()
    if K == 0:
        raise ValueError("Collider keep mask keeps no token: nothing to learn from in this batch")
    grads: dict[int, torch.Tensor] = {}
    w = saved["w"]

    def W(lin: nn.Linear) -> torch.Tensor:
        return w[id(lin.weight)]

    def acc(p: torch.Tensor, g: torch.Tensor) -> None:
        g = g.to(p.dtype)
        grads[id(p)] = grads[id(p)] + g if id(p) in grads else g

    def rows(t: torch.Tensor) -> torch.Tensor:  # kept rows of a [B, T, ...] activation
        return t.reshape(N, -1).index_select(0, kidx)

    kb, kt = kidx // T, kidx % T  # batch row and position of each kept token
    cos, sin = model.rope_cos[kt][:, None, :], model.rope_sin[kt][:, None, :]  # [K, 1, hd/2]

    # LM head and final norm
    dl = dlogits.reshape(N, -1).index_select(0, kidx).to(cdt)
    h_k = rows(saved["h"])
    hn_k = model.norm(h_k).to(cdt)
    acc(model.lm_head.weight, dl.t() @ hn_k)
    dhn = dl @ W(model.lm_head)
    dx, dw = rmsnorm_backward(dhn, h_k, model.norm.weight, cfg.norm_eps)
    acc(model.norm.weight, dw)

    for blk, sv in zip(reversed(model.blocks), reversed(saved["blocks"])):
        ffn = blk.ffn
        # FFN: x2 = x1 + down(act(up(norm(x1))))
        x1_k = rows(sv.x1)
        b_k = blk.ffn_norm(x1_k).to(cdt)
        u_k = rows(sv.u)
        dxc = dx.to(cdt)
        if ffn.gate is not None:
            g_k = rows(sv.g)
            s = F.silu(g_k)
            f_k = s * u_k
        else:
            f_k = F.relu(u_k).square()
        acc(ffn.down.weight, dxc.t() @ f_k)
        df = upcast(dxc @ W(ffn.down))  # activation derivatives in float32
        if ffn.gate is not None:
            gf, uf = upcast(g_k), upcast(u_k)
            sig = torch.sigmoid(gf)
            du = (df * gf * sig).to(cdt)
            dg = (df * uf * sig * (1 + gf * (1 - sig))).to(cdt)
            acc(ffn.gate.weight, dg.t() @ b_k)
            db = dg @ W(ffn.gate)
        else:
            du = (df * 2 * F.relu(upcast(u_k))).to(cdt)
            db = 0
        acc(ffn.up.weight, du.t() @ b_k)
        db = db + du @ W(ffn.up)
        dxn, dw = rmsnorm_backward(db, x1_k, blk.ffn_norm.weight, cfg.norm_eps)
        acc(blk.ffn_norm.weight, dw)
        dx = dx + dxn

        # attention: x1 = x + proj(attn(rope(q), rope(k), v)), qkv = W norm(x)
        dxc = dx.to(cdt)
        acc(blk.attn.proj.weight, dxc.t() @ rows(sv.o2))
        do2 = dxc @ W(blk.attn.proj)
        d_out = torch.zeros_like(sv.att.out)  # same strides as the forward's output
        d_out[kb, :, kt] = do2.view(K, H, hd).to(d_out.dtype)
        dq, dk, dv = attention_backward(sv.att, d_out)
        dq_k, dk_k, dv_k = (t[kb, :, kt] for t in (dq, dk, dv))  # [K, H, hd], no full-size copy
        dqkv = torch.stack((rope_inverse(dq_k, cos, sin), rope_inverse(dk_k, cos, sin), dv_k), 1).reshape(K, 3 * D)
        x_k = rows(sv.x)
        a_k = blk.attn_norm(x_k).to(cdt)
        dqkv = dqkv.to(cdt)
        acc(blk.attn.qkv.weight, dqkv.t() @ a_k)
        da = dqkv @ W(blk.attn.qkv)
        dxa, dw = rmsnorm_backward(da, x_k, blk.attn_norm.weight, cfg.norm_eps)
        acc(blk.attn_norm.weight, dw)
        dx = dx + dxa

    d_embed = torch.zeros_like(model.embed.weight)
    d_embed.index_add_(0, idx.reshape(-1).index_select(0, kidx), dx.to(d_embed.dtype))
    acc(model.embed.weight, d_embed)
    return grads


class _ColliderFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, idx: torch.Tensor, model: GPT, *params: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        logits, saved = _forward(model, idx)
        ctx.model, ctx.saved, ctx.params = model, saved, params
        return logits

    @staticmethod
    def backward(ctx, dlogits: torch.Tensor):  # type: ignore[override]
        grads = _backward(ctx.model, ctx.saved, dlogits, current_keep())
        ctx.saved = None  # free activations as soon as possible
        return (None, None, *[grads.get(id(p)) for p in ctx.params])


class ColliderModel(nn.Module):
    """Wrap a :class:`~sparsetrain.model.GPT` for Collider training.

    ``forward(idx)`` returns the logits of all tokens (dense forward). Call
    ``loss.backward()`` inside ``with filter(keep):`` to backpropagate through
    the kept tokens only. Wrap this module (not the GPT) in DDP.
    """

    def __init__(self, model: GPT) -> None:
        super().__init__()
        self.model = model

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        if not torch.is_grad_enabled():
            return self.model(idx)[0]
        params = [p for p in self.model.parameters() if p.requires_grad]
        return _ColliderFunction.apply(idx, self.model, *params)


def masked_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over tokens that are kept and have a target."""
    keep = keep & (targets != IGNORE_INDEX)
    if not bool(keep.any()):
        raise ValueError("Collider keep mask keeps no token with a target")
    return F.cross_entropy(upcast(logits[keep]), targets[keep])
