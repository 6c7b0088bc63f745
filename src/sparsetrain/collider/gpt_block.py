"""The Collider adapter of the sparsetrain GPT block (:class:`sparsetrain.model.Block`).

Two paths, one objective:

* **compact** (SwiGLU or relu² :class:`~sparsetrain.model.FeedForward`, one
  residual stream): hand-written kept-row backward in a few pure pieces that
  ``ColliderModel(compile=True)`` hands to torch.compile, fusing the float32
  norm/RoPE/activation arithmetic and the kept-row gathers into the kernels
  that read them; weight gradients written in float32 by cuBLAS.
* **composed** (any other FFN, e.g. ``relu2_24``, or hyper-connections): the
  attention keeps its kept-query backward; every position-wise part around it
  (hyper-connection read and write, the norms, the QKV and output
  projections, the FFN sublayer) gets the exact compact backward of
  :func:`~sparsetrain.collider.positionwise.rows_vjp`, by recomputation on the
  kept rows. With hyper-connections the residual is ``n`` streams, so the
  compact gradient between blocks is ``[K, n, D]``.

Both run the block's forward with the model's own numerics (under autocast:
16-bit GEMMs, float32 residual stream and norms).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ..model import Block, FeedForward, apply_rope, rms_norm, upcast
from .attention import AttentionSaved, attention_forward, kept_rows_backward
from .blocks import BlockAdapter, RowGrad, register_block_adapter
from .compact import piece, rmsnorm_backward, rows, swiglu_backward, wgrad, wgrad_in_float32
from .engine import ColliderPass
from .positionwise import parameter_slots, rows_vjp

# ----------------------------------------------------------------------------- pure pieces
# Each is a function of tensors only, so ``ColliderModel(compile=True)`` can hand
# it to torch.compile; attention kernels stay outside.


def split_heads_rope(qkv: torch.Tensor, cos, sin, n_head: int):
    """q, k (after RoPE), v as [B, H, T, hd] views of token-major [B, T, H, hd]
    tensors, from the QKV projection's output [B, T, 3 D]: the attention output
    and gradients then come out token-major too, so kept-row gathers and
    scatters are plain row copies of [B*T, D]."""
    B, T, D3 = qkv.shape
    qkv = qkv.view(B, T, 3, n_head, D3 // (3 * n_head))
    q, k = (apply_rope(qkv[:, :, i], cos, sin, seq_dim=1).transpose(1, 2) for i in (0, 1))
    return q, k, qkv[:, :, 2].contiguous().transpose(1, 2)


def _qkv_rope(x, norm_w, qkv_w, cos, sin, eps: float, n_head: int):
    return split_heads_rope(F.linear(rms_norm(x, norm_w, eps).to(qkv_w.dtype), qkv_w), cos, sin, n_head)


def _post_attention(x, o, proj_w, norm_w, up_w, gate_w, down_w, eps: float):
    B, T, D = x.shape
    o2 = o.transpose(1, 2).reshape(B, T, D)
    x1 = x + F.linear(o2, proj_w)
    b = rms_norm(x1, norm_w, eps).to(up_w.dtype)
    u = F.linear(b, up_w)
    if gate_w is not None:
        g = F.linear(b, gate_w)
        f = F.silu(g) * u
    else:
        g = None
        f = F.relu(u).square()
    return o2, x1, u, g, x1 + F.linear(f, down_w)


# Each piece that ends a residual-gradient update returns it twice: float32 for
# the residual stream and in the compute dtype for the next piece's GEMMs, the
# cast fused into the kernel that writes it (a cast kernel of its own showed up
# in the 1B backward's profile: bench/results/collider_step_sync_free_h200.json).


def _ffn_backward(dx, dxc, x1, u, g, kidx, norm_w, up_w, gate_w, down_w, eps: float, f32: bool):
    cdt = up_w.dtype
    x1_k, u_k = rows(x1, kidx), rows(u, kidx)
    b = rms_norm(x1_k, norm_w, eps).to(cdt)
    if gate_w is not None:
        g_k = rows(g, kidx)
        f = F.silu(g_k) * u_k  # as the forward computed it
    else:
        f = F.relu(u_k).square()
    d_down = wgrad(dxc, f, f32)
    df = upcast(dxc @ down_w)  # activation derivatives in float32
    d_gate = None
    if gate_w is not None:
        dg, du = swiglu_backward(df, g_k, u_k, cdt)
        d_gate = wgrad(dg, b, f32)
        db = dg @ gate_w + du @ up_w
    else:
        du = (df * 2 * F.relu(upcast(u_k))).to(cdt)
        db = du @ up_w
    d_up = wgrad(du, b, f32)
    dxn, d_norm = rmsnorm_backward(db, x1_k, norm_w, eps)
    dx = dx + dxn
    return dx, dx.to(cdt), d_down, d_up, d_gate, d_norm


def _post_attention_backward(dx, dxc, x1, u, g, o2, kidx, norm_w, up_w, gate_w, down_w, proj_w, eps: float, f32: bool):
    """FFN then output projection: one compiled call per layer instead of two
    (host time per call matters on small models)."""
    dx, dxc, d_down, d_up, d_gate, d_norm = _ffn_backward(dx, dxc, x1, u, g, kidx, norm_w, up_w, gate_w, down_w, eps, f32)
    d_proj, do2 = wgrad(dxc, rows(o2, kidx).to(proj_w.dtype), f32), dxc @ proj_w
    return dx, d_down, d_up, d_gate, d_norm, d_proj, do2


def _qkv_backward(dx, dqkv, x, kidx, norm_w, qkv_w, eps: float, f32: bool):
    """``dqkv``: the QKV projection's output gradient at the kept rows, ``[K, 3 * D]``."""
    x_k = rows(x, kidx)
    dqkv = dqkv.to(qkv_w.dtype)
    a = rms_norm(x_k, norm_w, eps).to(qkv_w.dtype)
    dxa, d_norm = rmsnorm_backward(dqkv @ qkv_w, x_k, norm_w, eps)
    dx = dx + dxa
    return dx, dx.to(qkv_w.dtype), wgrad(dqkv, a, f32), d_norm


# ----------------------------------------------------------------------------- the adapter


@dataclass
class _CompactSaved:
    x: torch.Tensor  # block input (residual stream)
    att: AttentionSaved
    o2: torch.Tensor  # attention output [B, T, D], input of the output projection
    x1: torch.Tensor  # residual after attention
    u: torch.Tensor  # FFN up-projection (pre-activation)
    g: torch.Tensor | None  # SwiGLU gate pre-activation
    w: dict[str, torch.Tensor | None]  # compute-dtype weights, cast once in the forward


@dataclass
class _ComposedSaved:
    x: torch.Tensor  # block input: [B, T, D], or [B, T, n, D] streams
    att: AttentionSaved
    o2: torch.Tensor
    x1: torch.Tensor  # after the attention sublayer


class GPTBlockAdapter(BlockAdapter):
    """:class:`sparsetrain.model.Block` under Collider (see the module docstring).
    Reads the model's RoPE tables ``(cos, sin)`` ``[seq_len, hd/2]`` from ``run.rope``."""

    block: Block

    def __init__(self, block: Block) -> None:
        super().__init__(block)
        self.compact = isinstance(block.ffn, FeedForward) and block.hc_attn is None

    # ------------------------------------------------------------------ forward

    def forward(self, x: torch.Tensor, run: ColliderPass) -> tuple[torch.Tensor, Any]:
        with torch.autocast(x.device.type, enabled=False):
            if self.compact:
                return self._compact_forward(x, run)
            return self._composed_forward(x, run)

    def _compact_forward(self, x: torch.Tensor, run: ColliderPass) -> tuple[torch.Tensor, _CompactSaved]:
        blk, cdt = self.block, run.compute_dtype
        T = x.shape[1]
        cos, sin = run.rope[0][:T], run.rope[1][:T]
        ffn = blk.ffn
        w = {name: (lin.weight.to(cdt) if lin is not None else None)
             for name, lin in (("qkv", blk.attn.qkv), ("proj", blk.attn.proj), ("up", ffn.up), ("gate", ffn.gate),
                               ("down", ffn.down))}
        q, k, v = piece(_qkv_rope, run.compile)(x, blk.attn_norm.weight, w["qkv"], cos, sin, blk.attn_norm.eps,
                                                blk.attn.n_head)
        o, att = attention_forward(q, k, v, run.cudnn)
        o2, x1, u, g, x2 = piece(_post_attention, run.compile)(x, o, w["proj"], blk.ffn_norm.weight, w["up"], w["gate"],
                                                               w["down"], blk.ffn_norm.eps)
        return x2, _CompactSaved(x=x, att=att, o2=o2, x1=x1, u=u, g=g, w=w)

    # the composed path's position-wise maps, exactly as Block.forward computes them

    def _qkv_in(self, x: torch.Tensor) -> torch.Tensor:
        """Block input -> the QKV projection's output ``[..., 3 D]``."""
        blk = self.block
        a = blk.hc_attn(x) if blk.hc_attn is not None else x
        return blk.attn.qkv(blk.attn_norm(a))

    def _attention_out(self, x: torch.Tensor, o2: torch.Tensor) -> torch.Tensor:
        """Block input and attention output -> the residual after the attention sublayer."""
        blk = self.block
        out = blk.attn.proj(o2)
        return blk.hc_attn.write(x, out) if blk.hc_attn is not None else x + out

    def _ffn_sublayer(self, x1: torch.Tensor) -> torch.Tensor:
        blk = self.block
        if blk.hc_ffn is not None:
            return blk.hc_ffn.write(x1, blk.ffn(blk.ffn_norm(blk.hc_ffn(x1))))
        return x1 + blk.ffn(blk.ffn_norm(x1))

    def _composed_forward(self, x: torch.Tensor, run: ColliderPass) -> tuple[torch.Tensor, _ComposedSaved]:
        blk = self.block
        B, T = x.shape[:2]
        cos, sin = run.rope[0][:T], run.rope[1][:T]
        with run.module_autocast():
            qkv = self._qkv_in(x)
        q, k, v = split_heads_rope(qkv, cos, sin, blk.attn.n_head)
        o, att = attention_forward(q, k, v, run.cudnn)
        o2 = o.transpose(1, 2).reshape(B, T, -1)
        with run.module_autocast():
            x1 = self._attention_out(x, o2)
            x2 = self._ffn_sublayer(x1)
        return x2, _ComposedSaved(x=x, att=att, o2=o2, x1=x1)

    # ------------------------------------------------------------------ backward

    def backward(self, saved: Any, grad: RowGrad, run: ColliderPass) -> tuple[RowGrad, dict[int, torch.Tensor]]:
        if self.compact:
            return self._compact_backward(saved, grad, run)
        return self._composed_backward(saved, grad, run)

    def _compact_backward(self, sv: _CompactSaved, grad: RowGrad, run: ColliderPass
                          ) -> tuple[RowGrad, dict[int, torch.Tensor]]:
        blk, w, cdt = self.block, sv.w, run.compute_dtype
        ffn = blk.ffn
        kidx = run.kept.kidx
        f32 = wgrad_in_float32(ffn.up.weight, cdt)
        dx, d_down, d_up, d_gate, d_fnorm, d_proj, do2 = piece(_post_attention_backward, run.compile)(
            grad.rows, grad.compute(cdt), sv.x1, sv.u, sv.g, sv.o2, kidx, blk.ffn_norm.weight, w["up"], w["gate"],
            w["down"], w["proj"], blk.ffn_norm.eps, f32)
        dqkv = kept_rows_backward(sv.att, do2, run.kept, run.rope, run.attention, run.scratch, run.compile, cdt)
        dx, dxc, d_qkv, d_anorm = piece(_qkv_backward, run.compile)(dx, dqkv, sv.x, kidx, blk.attn_norm.weight,
                                                                     w["qkv"], blk.attn_norm.eps, f32)
        grads = {id(ffn.down.weight): d_down, id(ffn.up.weight): d_up, id(blk.ffn_norm.weight): d_fnorm,
                 id(blk.attn.proj.weight): d_proj, id(blk.attn.qkv.weight): d_qkv, id(blk.attn_norm.weight): d_anorm}
        if ffn.gate is not None:
            grads[id(ffn.gate.weight)] = d_gate
        return RowGrad(dx, dxc), grads

    def _composed_backward(self, sv: _ComposedSaved, grad: RowGrad, run: ColliderPass
                           ) -> tuple[RowGrad, dict[int, torch.Tensor]]:
        blk, kept = self.block, run.kept
        grads: dict[int, torch.Tensor] = {}

        def add(more: dict[int, torch.Tensor]) -> None:
            for k, g in more.items():
                grads[k] = grads[k] + g if k in grads else g

        ffn_modules = [m for m in (blk.hc_ffn, blk.ffn_norm, blk.ffn) if m is not None]
        (dx1,), more = rows_vjp(self._ffn_sublayer, [kept.rows(sv.x1)], grad.rows, ffn_modules,
                                autocast=run.module_autocast())
        add(more)
        out_slots = parameter_slots(blk.attn.proj)
        if blk.hc_attn is not None:  # the write's parameters (the read's come with the QKV input below)
            out_slots += [(blk.hc_attn, "res_logits"), (blk.hc_attn, "post_logits")]
            out_slots = [s for s in out_slots if s[0]._parameters[s[1]].requires_grad]
        (dx, do2), more = rows_vjp(self._attention_out, [kept.rows(sv.x), kept.rows(sv.o2)], dx1, slots=out_slots,
                                   autocast=run.module_autocast())
        add(more)
        dqkv = kept_rows_backward(sv.att, do2, kept, run.rope, run.attention, run.scratch, run.compile, sv.o2.dtype)
        in_modules = [m for m in (blk.hc_attn, blk.attn_norm, blk.attn.qkv) if m is not None]
        in_slots = [s for s in parameter_slots(*in_modules) if s not in out_slots]
        (dxa,), more = rows_vjp(self._qkv_in, [kept.rows(sv.x)], dqkv, slots=in_slots, autocast=run.module_autocast())
        add(more)
        return RowGrad(dx + dxa), grads


register_block_adapter(Block, GPTBlockAdapter)
