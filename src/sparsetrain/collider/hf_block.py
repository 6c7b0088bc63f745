"""The Collider adapter of Hugging Face's Llama-family decoder layers:
``LlamaDecoderLayer``, ``MistralDecoderLayer``, ``Qwen2DecoderLayer`` and
``Qwen3DecoderLayer``.

The layer is ``x1 = x + o_proj(attn(rope(qk_norm(q/k/v_proj(rmsnorm(x))))))``,
``x2 = x1 + down(silu(gate(rmsnorm(x1))) * up(rmsnorm(x1)))``, with

* grouped-query heads (``num_key_value_heads`` dividing ``num_attention_heads``):
  the forward expands keys and values for the fused attention kernels and
  keeps them unexpanded for the backward, whose kept-query kernel reads them
  grouped (``attention.kept_rows_backward``);
* RMSNorm with a weight, in Hugging Face's convention (:func:`hf_rms_norm`);
* RoPE with the model's own tables (``run.rope``: the ``rotary_emb`` output
  for the batch's positions, so every rope scaling HF implements applies);
* q/k/v biases (Qwen2; Llama's ``attention_bias``), MLP biases (``mlp_bias``),
  Qwen3's per-head ``q_norm``/``k_norm``;
* any projection a PEFT LoRA ``Linear`` (:mod:`~sparsetrain.collider.hf_linear`).

Forward on all tokens in two pieces around the attention kernel (the q/k/v
weights concatenated once per forward, so one GEMM; gate and up likewise);
backward on the kept rows in two pieces around the attention backward, every
GEMM on ``[K, ...]`` rows, frozen weights skipped. With the layer's gradient
checkpointing on (``model.gradient_checkpointing_enable()``), the forward
keeps only the layer input (and the LoRA dropout seeds) and the backward
runs the forward again first.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..model import apply_rope, upcast
from .attention import AttentionSaved, attention_forward, expand_kv_heads, kept_rows_backward
from .blocks import BlockAdapter, RowGrad, register_block_adapter
from .compact import piece, rmsnorm_backward, rows, swiglu_backward, wgrad_in_float32
from .engine import ColliderPass
from .hf_linear import (LinearParts, UnsupportedLayer, cast_cat, keep_mask, linear_backward, linear_forward,
                        linear_parts, lora_backward, lora_forward, lora_rows, new_seed, piece_terms)

LAYER_CLASSES = (("llama", "LlamaDecoderLayer"), ("mistral", "MistralDecoderLayer"), ("qwen2", "Qwen2DecoderLayer"),
                 ("qwen3", "Qwen3DecoderLayer"))


def hf_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Hugging Face's Llama-family RMSNorm: normalise in float32 (float64 stays),
    round to ``x``'s dtype, then multiply by the weight (in the promoted dtype:
    a float32 weight on 16-bit ``x`` gives float32, as HF's does)."""
    x32 = upcast(x)
    return weight * (x32 * torch.rsqrt(x32.square().mean(-1, keepdim=True) + eps)).to(x.dtype)


# ----------------------------------------------------------------------------- pure pieces


def _attention_in(x, norm_w, eps: float, w_qkv, b_qkv, lora_q, lora_k, lora_v, qn_w, kn_w, qk_eps: float, cos, sin,
                  H: int, Hkv: int, hd: int):
    """Block input -> (q, k, v) as ``[B, heads, T, hd]`` views of token-major
    tensors (q and k rotated; k and v with ``Hkv`` heads), and with q/k norms
    their inputs ``[B, T, heads * hd]`` (the backward's)."""
    B, T, _ = x.shape
    cdt = w_qkv.dtype
    a = hf_rms_norm(x, norm_w, eps).to(cdt)
    q, k, v = F.linear(a, w_qkv, b_qkv).split((H * hd, Hkv * hd, Hkv * hd), -1)
    q, k, v = lora_forward(q, a, lora_q), lora_forward(k, a, lora_k), lora_forward(v, a, lora_v)
    qp, kp = (q, k) if qn_w is not None else (None, None)
    q, k = q.view(B, T, H, hd), k.view(B, T, Hkv, hd)
    if qn_w is not None:
        q, k = hf_rms_norm(q, qn_w, qk_eps), hf_rms_norm(k, kn_w, qk_eps)
    q = apply_rope(q, cos, sin, seq_dim=1).to(cdt).transpose(1, 2)
    k = apply_rope(k, cos, sin, seq_dim=1).to(cdt).transpose(1, 2)
    return q, k, v.reshape(B, T, Hkv, hd).contiguous().transpose(1, 2), qp, kp


def _attention_out_mlp(x, o, w_o, b_o, lora_o, norm_w, eps: float, w_gu, b_gu, lora_g, lora_u, w_d, b_d, lora_d):
    """Attention output -> (its token-major rows, residual after attention, gate
    and up pre-activations, block output)."""
    B, T, _ = x.shape
    o2 = o.transpose(1, 2).reshape(B, T, -1)
    x1 = x + linear_forward(o2, w_o, b_o, lora_o)
    b = hf_rms_norm(x1, norm_w, eps).to(w_gu.dtype)
    g, u = F.linear(b, w_gu, b_gu).chunk(2, -1)
    g, u = lora_forward(g, b, lora_g), lora_forward(u, b, lora_u)
    return o2, x1, g, u, x1 + linear_forward(F.silu(g) * u, w_d, b_d, lora_d)


def _mlp_attention_out_backward(dx, dxc, x1, g, u, o2, kidx, norm_w, eps: float, w_gu, lora_g, lora_u, w_d, lora_d,
                                w_o, lora_o, needs: tuple, f32: tuple):
    """MLP then output projection at the kept rows. ``needs``: whether
    (down W, down b, gate/up W, gate/up b, o W, o b) take gradients; ``f32``:
    whether each weight gradient is written in float32 (down, gate/up, o)."""
    cdt = w_gu.dtype
    x1_k, g_k, u_k = rows(x1, kidx), rows(g, kidx), rows(u, kidx)
    b = hf_rms_norm(x1_k, norm_w, eps).to(cdt)
    f = F.silu(g_k) * u_k  # as the forward computed it
    df, d_wd, d_bd, lg_d = linear_backward(dxc, f, w_d, lora_rows(lora_d, kidx), needs[0], needs[1], f32[0])
    dg, du = swiglu_backward(df, g_k, u_k, cdt)
    dgu = torch.cat((dg, du), -1)
    db, d_wgu, d_bgu, _ = linear_backward(dgu, b, w_gu, (), needs[2], needs[3], f32[1])
    db, lg_g = lora_backward(db, dg, b, lora_rows(lora_g, kidx))
    db, lg_u = lora_backward(db, du, b, lora_rows(lora_u, kidx))
    dxn, d_norm = rmsnorm_backward(db, x1_k, norm_w, eps)
    dx = dx + dxn
    do2, d_wo, d_bo, lg_o = linear_backward(dx.to(cdt), rows(o2, kidx), w_o, lora_rows(lora_o, kidx), needs[4],
                                            needs[5], f32[2])
    return dx, do2, d_norm, (d_wd, d_bd, lg_d), (d_wgu, d_bgu, lg_g, lg_u), (d_wo, d_bo, lg_o)


def _attention_in_backward(dx, dqkv, x, kidx, norm_w, eps: float, w_qkv, lora_q, lora_k, lora_v, qn_w, kn_w,
                           qk_eps: float, qp, kp, H: int, Hkv: int, hd: int, need_w: bool, need_b: bool, f32: bool):
    """``dqkv``: the gradient at the kept rows of q, k, v before RoPE ``[K, (H + 2 Hkv) hd]``."""
    cdt = w_qkv.dtype
    x_k = rows(x, kidx)
    K = x_k.shape[0]
    a = hf_rms_norm(x_k, norm_w, eps).to(cdt)
    dq, dk, dv = dqkv.to(cdt).split((H * hd, Hkv * hd, Hkv * hd), -1)
    d_qn = d_kn = None
    if qn_w is not None:  # per-head norms: their backward on [K * heads, hd] rows
        dq, d_qn = rmsnorm_backward(dq.reshape(K * H, hd), rows(qp, kidx).reshape(K * H, hd), qn_w, qk_eps)
        dk, d_kn = rmsnorm_backward(dk.reshape(K * Hkv, hd), rows(kp, kidx).reshape(K * Hkv, hd), kn_w, qk_eps)
        dq, dk = dq.reshape(K, H * hd).to(cdt), dk.reshape(K, Hkv * hd).to(cdt)
    da, d_wqkv, d_bqkv, _ = linear_backward(torch.cat((dq, dk, dv), -1), a, w_qkv, (), need_w, need_b, f32)
    da, lg_q = lora_backward(da, dq, a, lora_rows(lora_q, kidx))
    da, lg_k = lora_backward(da, dk, a, lora_rows(lora_k, kidx))
    da, lg_v = lora_backward(da, dv, a, lora_rows(lora_v, kidx))
    dxa, d_norm = rmsnorm_backward(da, x_k, norm_w, eps)
    dx = dx + dxa
    return dx, dx.to(cdt), d_norm, d_qn, d_kn, d_wqkv, d_bqkv, (lg_q, lg_k, lg_v)


# ----------------------------------------------------------------------------- reading the layer

_PROJECTIONS = ("q", "k", "v", "o", "gate", "up", "down")


@dataclass
class _Layer:
    """One forward's view of the layer's parameters."""

    lin: dict[str, LinearParts]  # q, k, v, o, gate, up, down
    norm1: torch.Tensor
    norm2: torch.Tensor
    qn: torch.Tensor | None
    kn: torch.Tensor | None


@dataclass
class _Saved:
    x: torch.Tensor
    att: AttentionSaved
    o2: torch.Tensor
    x1: torch.Tensor
    g: torch.Tensor
    u: torch.Tensor
    qp: torch.Tensor | None
    kp: torch.Tensor | None
    w: dict[str, Any]  # compute-dtype weights and LoRA terms, cast once in the forward
    seeds: dict[str, list[int | None]]


@dataclass
class _Checkpointed:
    """With gradient checkpointing: what the backward runs the forward again from."""

    x: torch.Tensor
    seeds: dict[str, list[int | None]]


class HFDecoderLayerAdapter(BlockAdapter):
    """A Llama-family decoder layer under Collider (see the module docstring).
    Reads ``run.rope``: the ``(cos, sin)`` tables ``[T, hd/2]`` of the batch."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__(layer)
        attn, mlp = layer.self_attn, layer.mlp
        cfg = attn.config
        self.H = cfg.num_attention_heads
        self.hd = attn.head_dim
        self.Hkv = cfg.num_key_value_heads
        name = type(layer).__name__
        act = getattr(mlp, "config", cfg).hidden_act
        if act not in ("silu", "swish"):
            raise UnsupportedLayer(f"{name} has hidden_act={act!r}; the Collider engine runs SwiGLU (silu) MLPs")
        if self.H % self.Hkv or self.hd % 2:
            raise UnsupportedLayer(f"{name}: {self.H} heads over {self.Hkv} key/value heads of size {self.hd}")
        if abs(attn.scaling - self.hd ** -0.5) > 1e-12 * self.hd ** -0.5:
            raise UnsupportedLayer(f"{name} scales attention scores by {attn.scaling}, not 1/sqrt(head_dim)")
        if getattr(cfg, "attention_dropout", 0.0):
            raise UnsupportedLayer(f"{name} has attention_dropout={cfg.attention_dropout}")
        self.qk_norm = hasattr(attn, "q_norm")
        self._read()  # an unsupported projection (DoRA, quantised) shows now

    # ------------------------------------------------------------------ parameters

    def parameters(self) -> list[nn.Parameter]:
        """Every trainable parameter of the layer, found at call time (PEFT may
        add LoRA modules after the model was applied)."""
        out: dict[int, nn.Parameter] = {}
        for m in self.block.modules():
            for p in m._parameters.values():
                if p is not None and p.requires_grad:
                    out.setdefault(id(p), p)
        return list(out.values())

    def _read(self) -> _Layer:
        layer = self.block
        attn, mlp = layer.self_attn, layer.mlp
        modules = {"q": attn.q_proj, "k": attn.k_proj, "v": attn.v_proj, "o": attn.o_proj,
                   "gate": mlp.gate_proj, "up": mlp.up_proj, "down": mlp.down_proj}
        lin = {n: linear_parts(m, f"{type(layer).__name__}.{n}_proj") for n, m in modules.items()}
        return _Layer(lin, layer.input_layernorm.weight, layer.post_attention_layernorm.weight,
                      attn.q_norm.weight if self.qk_norm else None, attn.k_norm.weight if self.qk_norm else None)

    def _window(self, T: int) -> None:
        attn = self.block.self_attn
        window = getattr(attn, "sliding_window", getattr(attn.config, "sliding_window", None))
        if window is not None and T > window:
            raise UnsupportedLayer(f"{type(self.block).__name__}: sequence length {T} exceeds the sliding window "
                                   f"{window}; the Collider engine runs full causal attention")

    # ------------------------------------------------------------------ forward

    def _checkpointing(self) -> bool:
        return bool(getattr(self.block, "gradient_checkpointing", False)) and self.block.training

    def forward(self, x: torch.Tensor, run: ColliderPass) -> tuple[torch.Tensor, Any]:
        self._window(x.shape[1])
        x = x.detach()  # the pieces then see one kind of input in every layer (no recompile for the first)
        layer = self._read()
        seeds = {n: [new_seed() if t.p > 0 else None for t in layer.lin[n].loras] for n in _PROJECTIONS}
        with torch.autocast(x.device.type, enabled=False):
            y, saved = self._forward(x, run, layer, seeds)
        if self._checkpointing():
            return y, _Checkpointed(x, seeds)
        return y, saved

    def _masks(self, layer: _Layer, seeds: dict, shapes: dict[str, tuple[int, ...]], device: torch.device) -> dict:
        return {n: [keep_mask(shapes[n], t.p, s, device) if s is not None else None
                    for t, s in zip(layer.lin[n].loras, seeds[n])] for n in _PROJECTIONS}

    def _forward(self, x: torch.Tensor, run: ColliderPass, layer: _Layer, seeds: dict) -> tuple[torch.Tensor, _Saved]:
        blk, cdt = self.block, run.compute_dtype
        attn = blk.self_attn
        B, T, D = x.shape
        H, Hkv, hd = self.H, self.Hkv, self.hd
        lin = layer.lin
        inner = {"q": D, "k": D, "v": D, "o": H * hd, "gate": D, "up": D, "down": lin["down"].weight.shape[1]}
        masks = self._masks(layer, seeds, {n: (B, T, d) for n, d in inner.items()}, x.device)
        w: dict[str, Any] = {n: piece_terms(lin[n], cdt, masks[n]) for n in _PROJECTIONS}
        w["qkv"] = cast_cat([lin[n].weight for n in "qkv"], cdt)
        w["qkv_b"] = _cat_biases([lin[n] for n in "qkv"], cdt)
        w["o_w"], w["o_b"] = lin["o"].weight.to(cdt), _cast(lin["o"].bias, cdt)
        w["gu"] = cast_cat([lin["gate"].weight, lin["up"].weight], cdt)
        w["gu_b"] = _cat_biases([lin["gate"], lin["up"]], cdt)
        w["d_w"], w["d_b"] = lin["down"].weight.to(cdt), _cast(lin["down"].bias, cdt)
        cos, sin = run.rope
        qk_eps = attn.q_norm.variance_epsilon if self.qk_norm else 0.0
        q, k, v, qp, kp = piece(_attention_in, run.compile)(
            x, layer.norm1, blk.input_layernorm.variance_epsilon, w["qkv"], w["qkv_b"], w["q"], w["k"], w["v"],
            layer.qn, layer.kn, qk_eps, cos[:T], sin[:T], H, Hkv, hd)
        o, att = attention_forward(q, expand_kv_heads(k, H // Hkv)[0], expand_kv_heads(v, H // Hkv)[0], run.cudnn)
        att = dataclasses.replace(att, k=k, v=v)  # the backward reads k and v grouped
        o2, x1, g, u, x2 = piece(_attention_out_mlp, run.compile)(
            x, o, w["o_w"], w["o_b"], w["o"], layer.norm2, blk.post_attention_layernorm.variance_epsilon, w["gu"],
            w["gu_b"], w["gate"], w["up"], w["d_w"], w["d_b"], w["down"])
        # the forward's dropout masks are drawn again in the backward, from the seeds
        w = {n: (_without_masks(t) if n in _PROJECTIONS else t) for n, t in w.items()}
        return x2, _Saved(x=x, att=att, o2=o2, x1=x1, g=g, u=u, qp=qp, kp=kp, w=w, seeds=seeds)

    # ------------------------------------------------------------------ backward

    def backward(self, saved: Any, grad: RowGrad, run: ColliderPass) -> tuple[RowGrad, dict[int, torch.Tensor]]:
        layer = self._read()
        with torch.autocast(grad.rows.device.type, enabled=False):
            if isinstance(saved, _Checkpointed):
                with torch.no_grad():
                    saved = self._forward(saved.x, run, layer, saved.seeds)[1]
            return self._backward(saved, grad, run, layer)

    def _backward(self, sv: _Saved, grad: RowGrad, run: ColliderPass, layer: _Layer
                  ) -> tuple[RowGrad, dict[int, torch.Tensor]]:
        blk, cdt, kept = self.block, run.compute_dtype, run.kept
        kidx = kept.kidx
        lin, w = layer.lin, sv.w
        B, T, D = sv.x.shape
        inner = {"q": D, "k": D, "v": D, "o": self.H * self.hd, "gate": D, "up": D, "down": lin["down"].weight.shape[1]}
        masks = self._masks(layer, sv.seeds, {n: (B, T, d) for n, d in inner.items()}, sv.x.device)
        terms = {n: _with_masks(w[n], masks[n]) for n in _PROJECTIONS}

        def need(n: str) -> tuple[bool, bool]:
            p = lin[n]
            return p.weight.requires_grad, p.bias is not None and p.bias.requires_grad

        def f32(n: str) -> bool:
            return wgrad_in_float32(lin[n].weight, cdt)

        gu_needs = (need("gate")[0] or need("up")[0], need("gate")[1] or need("up")[1])
        dx, do2, d_norm2, g_down, g_gu, g_o = piece(_mlp_attention_out_backward, run.compile)(
            grad.rows, grad.compute(cdt), sv.x1, sv.g, sv.u, sv.o2, kidx, layer.norm2,
            blk.post_attention_layernorm.variance_epsilon, w["gu"], terms["gate"], terms["up"], w["d_w"],
            terms["down"], w["o_w"], terms["o"], (*need("down"), *gu_needs, *need("o")),
            (f32("down"), f32("gate"), f32("o")))
        dqkv = kept_rows_backward(sv.att, do2, kept, run.rope, run.attention, run.scratch, run.compile, cdt)
        qkv_needs = [need(n) for n in "qkv"]
        qk_eps = blk.self_attn.q_norm.variance_epsilon if self.qk_norm else 0.0
        dx, dxc, d_norm1, d_qn, d_kn, d_wqkv, d_bqkv, g_lqkv = piece(_attention_in_backward, run.compile)(
            dx, dqkv, sv.x, kidx, layer.norm1, blk.input_layernorm.variance_epsilon, w["qkv"], terms["q"],
            terms["k"], terms["v"], layer.qn, layer.kn, qk_eps, sv.qp, sv.kp, self.H, self.Hkv, self.hd,
            any(n[0] for n in qkv_needs), any(n[1] for n in qkv_needs), f32("q"))

        grads: dict[int, torch.Tensor] = {id(layer.norm1): d_norm1, id(layer.norm2): d_norm2}
        if layer.qn is not None:
            grads[id(layer.qn)], grads[id(layer.kn)] = d_qn, d_kn
        widths = [self.H * self.hd, self.Hkv * self.hd, self.Hkv * self.hd]
        _split_into(grads, [lin[n] for n in "qkv"], d_wqkv, d_bqkv, widths)
        ffn = lin["down"].weight.shape[1]
        _split_into(grads, [lin["gate"], lin["up"]], g_gu[0], g_gu[1], [ffn, ffn])
        _split_into(grads, [lin["down"]], g_down[0], g_down[1], [D])
        _split_into(grads, [lin["o"]], g_o[0], g_o[1], [D])
        for n, lg in (("down", g_down[2]), ("o", g_o[2]), ("gate", g_gu[2]), ("up", g_gu[3]), ("q", g_lqkv[0]),
                      ("k", g_lqkv[1]), ("v", g_lqkv[2])):
            for term, (d_a, d_b) in zip(lin[n].loras, lg):
                if d_a is not None:
                    grads[id(term.a)] = d_a
                if d_b is not None:
                    grads[id(term.b)] = d_b
        return RowGrad(dx, dxc), grads


def _cast(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    return t.to(dtype) if t is not None else None


def _cat_biases(parts: list[LinearParts], dtype: torch.dtype) -> torch.Tensor | None:
    """The concatenated biases (zeros for a map without one), or None when none has one."""
    if all(p.bias is None for p in parts):
        return None
    return cast_cat([p.bias if p.bias is not None else p.weight.new_zeros(p.weight.shape[0]) for p in parts], dtype)


def _without_masks(terms: tuple) -> tuple:
    return tuple((a, b, s, None, *rest) for a, b, s, _, *rest in terms)


def _with_masks(terms: tuple, masks: list) -> tuple:
    return tuple((a, b, s, m, *rest) for (a, b, s, _, *rest), m in zip(terms, masks))


def _split_into(grads: dict[int, torch.Tensor], parts: list[LinearParts], d_w: torch.Tensor | None,
                d_b: torch.Tensor | None, widths: list[int]) -> None:
    """Each map's share (rows ``widths``) of a concatenated weight and bias gradient."""
    i = 0
    for p, n in zip(parts, widths):
        if d_w is not None and p.weight.requires_grad:
            grads[id(p.weight)] = d_w[i:i + n]
        if d_b is not None and p.bias is not None and p.bias.requires_grad:
            grads[id(p.bias)] = d_b[i:i + n]
        i += n


_registered = False


def register_hf_adapters() -> None:
    """Register :class:`HFDecoderLayerAdapter` for the Llama-family layer classes
    this transformers install has (imported here, on first use)."""
    global _registered
    if _registered:
        return
    import importlib

    for module, cls in LAYER_CLASSES:
        try:
            layer_type = getattr(importlib.import_module(f"transformers.models.{module}.modeling_{module}"), cls)
        except (ImportError, AttributeError):  # an older transformers without this family
            continue
        register_block_adapter(layer_type, HFDecoderLayerAdapter)
    _registered = True


__all__ = ["HFDecoderLayerAdapter", "LAYER_CLASSES", "hf_rms_norm", "register_hf_adapters"]
