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

from ..model import GPT, apply_rope, rms_norm, upcast
from ..selection.select import kept_indices
from . import triton_attention
from .attention import AttentionSaved, attention_backward, attention_forward, on_own_thread
from .loss import SLOT_ATTR, RowGradSlot
from .triton_attention import kept_attention_backward

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


# ----------------------------------------------------------------------------- pure pieces
# Each is a function of tensors only, so ``ColliderModel(compile=True)`` can hand
# it to torch.compile (fusing the float32 norm/RoPE/activation arithmetic that
# dominates an eager step); attention kernels and gathers stay outside.


def _qkv_rope(x, norm_w, qkv_w, cos, sin, eps: float, n_head: int):
    """q, k (after RoPE), v as [B, H, T, hd] views of token-major [B, T, H, hd]
    tensors: the attention output and gradients then come out token-major too,
    so kept-row gathers and scatters are plain row copies of [B*T, D]."""
    B, T, D = x.shape
    qkv = F.linear(rms_norm(x, norm_w, eps).to(qkv_w.dtype), qkv_w).view(B, T, 3, n_head, D // n_head)
    q, k = (apply_rope(qkv[:, :, i], cos, sin, seq_dim=1).transpose(1, 2) for i in (0, 1))
    return q, k, qkv[:, :, 2].contiguous().transpose(1, 2)


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


def _rows(t: torch.Tensor, kidx: torch.Tensor) -> torch.Tensor:
    """Kept tokens' rows of a token-major ``[B, T, ...]`` tensor: ``[K, ...]``.
    Inside the compiled pieces this gather fuses into the kernel that reads it."""
    return t.flatten(0, 1).index_select(0, kidx)


def _wgrad(dy: torch.Tensor, x: torch.Tensor, f32: bool) -> torch.Tensor:
    """A weight's gradient ``dy^T x``; with ``f32`` (16-bit CUDA operands, float32
    master weights) cuBLAS writes it in float32 directly. Casting afterwards
    took a separate copy kernel per weight: 2.8 ms of a 1B backward on the H200
    (bench/results/collider_step_compact_1b_rerun_h200.json, direct_copy_kernel)."""
    return torch.mm(dy.t(), x, out_dtype=torch.float32) if f32 else dy.t() @ x


def _head_backward(dl, h, kidx, norm_w, head_w, eps: float, f32: bool):
    h_k = _rows(h, kidx)
    hn = rms_norm(h_k, norm_w, eps).to(head_w.dtype)
    d_head = _wgrad(dl, hn, f32)
    dx, d_norm = rmsnorm_backward(dl @ head_w, h_k, norm_w, eps)
    return dx, dx.to(head_w.dtype), d_head, d_norm


# Each piece that ends a residual-gradient update returns it twice: float32 for
# the residual stream and in the compute dtype for the next piece's GEMMs, the
# cast fused into the kernel that writes it (a separate cast kernel took 0.76 ms
# of the 1B backward: bench/results/collider_step_sync_free_h200.json).


def _ffn_backward(dx, dxc, x1, u, g, kidx, norm_w, up_w, gate_w, down_w, eps: float, f32: bool):
    cdt = up_w.dtype
    x1_k, u_k = _rows(x1, kidx), _rows(u, kidx)
    b = rms_norm(x1_k, norm_w, eps).to(cdt)
    if gate_w is not None:
        g_k = _rows(g, kidx)
        gf, uf = upcast(g_k), upcast(u_k)
        sig = torch.sigmoid(gf)
        f = F.silu(g_k) * u_k  # as the forward computed it
    else:
        f = F.relu(u_k).square()
    d_down = _wgrad(dxc, f, f32)
    df = upcast(dxc @ down_w)  # activation derivatives in float32
    d_gate = None
    if gate_w is not None:
        du = (df * gf * sig).to(cdt)
        dg = (df * uf * sig * (1 + gf * (1 - sig))).to(cdt)
        d_gate = _wgrad(dg, b, f32)
        db = dg @ gate_w + du @ up_w
    else:
        du = (df * 2 * F.relu(upcast(u_k))).to(cdt)
        db = du @ up_w
    d_up = _wgrad(du, b, f32)
    dxn, d_norm = rmsnorm_backward(db, x1_k, norm_w, eps)
    dx = dx + dxn
    return dx, dx.to(cdt), d_down, d_up, d_gate, d_norm


def _proj_backward(dxc, o2, kidx, proj_w, f32: bool):
    return _wgrad(dxc, _rows(o2, kidx).to(proj_w.dtype), f32), dxc @ proj_w


def _post_attention_backward(dx, dxc, x1, u, g, o2, kidx, norm_w, up_w, gate_w, down_w, proj_w, eps: float, f32: bool):
    """FFN then output projection: one compiled call per layer instead of two
    (host time per call matters on small models)."""
    dx, dxc, d_down, d_up, d_gate, d_norm = _ffn_backward(dx, dxc, x1, u, g, kidx, norm_w, up_w, gate_w, down_w, eps, f32)
    d_proj, do2 = _proj_backward(dxc, o2, kidx, proj_w, f32)
    return dx, d_down, d_up, d_gate, d_norm, d_proj, do2


def _qkv_grad_rows(dq, dk, dv, kidx, cos_k, sin_k, dtype: torch.dtype):
    """The QKV projection's output gradient at the kept rows, ``[K, 3 * D]``,
    from the dense attention backward's token-major ``[B, T, H, hd]`` gradients
    (after RoPE for q and k: undone here). The kept-query kernel writes this
    directly (``kept_attention_backward(rope=..., grads=...)``)."""
    dq, dk, dv = _rows(dq, kidx), _rows(dk, kidx), _rows(dv, kidx)
    dqkv = torch.stack((rope_inverse(dq, cos_k, sin_k), rope_inverse(dk, cos_k, sin_k), dv), 1)
    return dqkv.reshape(dq.shape[0], -1).to(dtype)


def _qkv_backward(dx, dqkv, x, kidx, norm_w, qkv_w, eps: float, f32: bool):
    """``dqkv``: the QKV projection's output gradient at the kept rows, ``[K, 3 * D]``."""
    x_k = _rows(x, kidx)
    dqkv = dqkv.to(qkv_w.dtype)
    a = rms_norm(x_k, norm_w, eps).to(qkv_w.dtype)
    dxa, d_norm = rmsnorm_backward(dqkv @ qkv_w, x_k, norm_w, eps)
    dx = dx + dxa
    return dx, dx.to(qkv_w.dtype), _wgrad(dqkv, a, f32), d_norm


_PIECES = {"qkv_rope": _qkv_rope, "post_attention": _post_attention, "head_backward": _head_backward,
           "post_attention_backward": _post_attention_backward, "qkv_backward": _qkv_backward,
           "qkv_grad_rows": _qkv_grad_rows}
_compiled: dict[str, object] = {}


def _piece(name: str, compile: bool):
    """The named piece, compiled on first use when asked.

    Backward pieces see a new kept count K most steps. torch.compile's default
    (automatic dynamic) recompiles once with K symbolic and every other size
    and stride fixed. ``dynamic=True`` would make the widths and strides
    symbolic as well, and the fused kept-row gathers then lose their vector
    loads: on the H200 the 1B compiled backward took 83.2 ms that way against
    71-73 ms (bench/results/collider_step_dynamic_shapes_h200.json)."""
    if not compile:
        return _PIECES[name]
    if name not in _compiled:
        _compiled[name] = torch.compile(_PIECES[name])
    return _compiled[name]


# auto picks the kept-query kernel up to this kept fraction. H200, 1B shapes
# (bench/results/collider_step_sync_free_h200.json): alone, calls queued back
# to back, it takes 0.68x cuDNN's dense backward at keep 0.5, 0.81x at 0.6 and
# 1.06x at 0.75; in the 1B compiled step (it also undoes RoPE in its epilogue)
# the backward is 0.64x dense with it at drop 0.4 against 0.69x with cuDNN.
KEPT_KERNEL_MAX_KEEP = 0.65


def _kept_kernel_ok(q: torch.Tensor, mode: str, keep_fraction: float) -> bool:
    """Use the kept-query Triton attention backward? ``mode``: auto, kept or dense."""
    if mode == "dense":
        return False
    hd = q.shape[-1]
    ok = triton_attention.available() and hd >= 16 and not hd & (hd - 1)
    if mode == "kept":
        if not ok:
            raise RuntimeError("the kept-query attention kernel needs Triton and a power-of-two head_dim >= 16")
        return True
    # auto: on the GPU in 16-bit, when few enough queries are kept to beat the fused dense backward
    return ok and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and keep_fraction <= KEPT_KERNEL_MAX_KEEP


def _token_major(t: torch.Tensor) -> bool:
    """Is this [B, H, T, hd] tensor laid out as [B, T, H, hd] (rows = tokens)?"""
    return t.transpose(1, 2).is_contiguous()


def _scatter_heads(rows_: torch.Tensor, like: torch.Tensor, kidx, kb, kt,
                   buf: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A zero [B, H, T, hd] tensor laid out like ``like`` with ``rows_`` [K, D] at
    the kept tokens, and the [B*T, D] buffer behind it when token-major.

    Pass that buffer back in for the next layer: the kept rows are the same in
    every layer, so they are overwritten and the dropped rows stay zero, and
    the buffer is zero-filled once per backward instead of once per layer."""
    B, H, T, hd = like.shape
    if _token_major(like):  # a plain row copy into a [B*T, D] buffer
        if buf is None or buf.dtype != like.dtype:
            buf = torch.zeros(B * T, H * hd, dtype=like.dtype, device=like.device)
        buf.index_copy_(0, kidx, rows_.to(like.dtype))
        return buf.view(B, T, H, hd).transpose(1, 2), buf
    out = torch.zeros_like(like)
    out[kb, :, kt] = rows_.view(-1, H, hd).to(like.dtype)
    return out, buf


def _kept_logit_grads(dlogits: torch.Tensor, items: list, keep: torch.Tensor | None, kidx: torch.Tensor,
                      cdt: torch.dtype) -> torch.Tensor:
    """The logits' gradient at the kept rows, ``[K, V]``: autograd's ``dlogits``
    (skipped when it is the stride-0 zero a kept-rows loss returns) plus the
    compact rows that :func:`~sparsetrain.collider.loss.masked_cross_entropy`
    left in the slot. Rows of another mask are mapped onto ``kidx`` (rows
    outside it are dropped, as everywhere else)."""
    N, V = dlogits.shape[:-1].numel(), dlogits.shape[-1]
    K = kidx.numel()
    dl = None if all(s == 0 for s in dlogits.stride()) else dlogits.reshape(N, V).index_select(0, kidx).to(cdt)
    for keep_l, kidx_l, rows in items:
        if keep_l is not keep:
            slot_of = torch.full((N,), K, dtype=torch.long, device=kidx.device)  # K: a scratch row
            slot_of[kidx] = torch.arange(K, device=kidx.device)
            rows = torch.zeros(K + 1, V, dtype=rows.dtype, device=rows.device).index_add_(0, slot_of[kidx_l], rows)[:K]
        dl = rows.to(cdt) if dl is None else dl + rows.to(cdt)
    return dl if dl is not None else torch.zeros(K, V, dtype=cdt, device=dlogits.device)


def _forward(model: GPT, idx: torch.Tensor, compile: bool = False, attention: str = "auto") -> tuple[torch.Tensor, dict]:
    """Dense forward of ``model`` on all tokens, numerically the model's own
    (under autocast: bf16 GEMMs, float32 residual stream and norms)."""
    cfg = model.config
    T = idx.shape[1]
    cdt = _compute_dtype(model, idx.device)
    cos, sin = model.rope_cos[:T], model.rope_sin[:T]
    blocks = []
    w: dict[int, torch.Tensor] = {}  # compute-dtype weights, cast once and reused by the backward

    def W(lin: nn.Linear | None) -> torch.Tensor | None:
        if lin is None:
            return None
        if id(lin.weight) not in w:
            w[id(lin.weight)] = lin.weight.to(cdt)
        return w[id(lin.weight)]

    qkv_rope, post_attention = _piece("qkv_rope", compile), _piece("post_attention", compile)
    with torch.autocast(idx.device.type, enabled=False):
        x = model.embed(idx)
        for blk in model.blocks:
            q, k, v = qkv_rope(x, blk.attn_norm.weight, W(blk.attn.qkv), cos, sin, cfg.norm_eps, cfg.n_head)
            o, att = attention_forward(q, k, v)
            ffn = blk.ffn
            o2, x1, u, g, x2 = post_attention(x, o, W(blk.attn.proj), blk.ffn_norm.weight, W(ffn.up), W(ffn.gate),
                                              W(ffn.down), cfg.norm_eps)
            blocks.append(_BlockSaved(x=x, att=att, o2=o2, x1=x1, u=u, g=g))
            x = x2
        logits = F.linear(rms_norm(x, model.norm.weight, cfg.norm_eps).to(cdt), W(model.lm_head))
    return logits, {"blocks": blocks, "h": x, "idx": idx, "cdt": cdt, "w": w, "compile": compile, "attention": attention}


def _backward(model: GPT, saved: dict, dlogits: torch.Tensor, keep: torch.Tensor | None,
              dtrunk: torch.Tensor | None = None) -> dict[int, torch.Tensor]:
    """Compact backward over kept rows. Returns ``{id(param): grad}``.
    ``dtrunk``: gradient reaching the trunk output from other heads (only its kept rows are used)."""
    cfg = model.config
    idx, cdt, w, compile = saved["idx"], saved["cdt"], saved["w"], saved["compile"]
    B, T = idx.shape
    N, H, hd = B * T, cfg.n_head, cfg.head_dim
    if keep is not None and keep.shape != idx.shape:
        raise ValueError(f"keep mask shape {tuple(keep.shape)} does not match the batch {tuple(idx.shape)}")
    items, saved["slot"].items = saved["slot"].items, []
    shared = [kidx_l for keep_l, kidx_l, _ in items if keep_l is keep]
    if keep is None:
        kidx = torch.arange(N, device=idx.device)
    else:  # the kept-rows loss already took the same mask's indices: reuse them
        kidx = shared[0] if shared else kept_indices(keep)
    K = kidx.numel()
    if K == 0:
        raise ValueError("Collider keep mask keeps no token: nothing to learn from in this batch")
    dl = _kept_logit_grads(dlogits, items, keep, kidx, cdt)
    grads: dict[int, torch.Tensor] = {}

    def W(lin: nn.Linear | None) -> torch.Tensor | None:
        return None if lin is None else w[id(lin.weight)]

    def acc(p: torch.Tensor, g: torch.Tensor | None) -> None:
        if g is None:
            return
        g = g.to(p.dtype)
        grads[id(p)] = grads[id(p)] + g if id(p) in grads else g

    kb, kt = kidx // T, kidx % T  # batch row and position of each kept token
    cos = sin = None  # [K, 1, hd/2] at the kept positions, for the dense attention backward's RoPE
    eps = cfg.norm_eps
    post_bwd = _piece("post_attention_backward", compile)
    qkv_bwd, head_bwd = _piece("qkv_backward", compile), _piece("head_backward", compile)
    qkv_rows = _piece("qkv_grad_rows", compile)

    # weight gradients straight to float32 under autocast (see _wgrad)
    f32 = idx.is_cuda and cdt in (torch.float16, torch.bfloat16) and model.lm_head.weight.dtype == torch.float32
    dx, dxc, d_head, d_norm = head_bwd(dl, saved["h"], kidx, model.norm.weight, W(model.lm_head), eps, f32)
    acc(model.lm_head.weight, d_head)
    acc(model.norm.weight, d_norm)
    if dtrunk is not None:
        dx = dx + _rows(dtrunk, kidx).to(dx.dtype)
        dxc = dx.to(cdt)
    do_buf = None  # dO over all rows for the fused attention backward; dropped rows stay zero
    rows_meta = None  # kept positions and per-row starts, for the kept-query kernel
    for blk, sv in zip(reversed(model.blocks), reversed(saved["blocks"])):
        ffn = blk.ffn
        dx, d_down, d_up, d_gate, d_norm, d_proj, do2 = post_bwd(
            dx, dxc, sv.x1, sv.u, sv.g, sv.o2, kidx, blk.ffn_norm.weight, W(ffn.up), W(ffn.gate), W(ffn.down),
            W(blk.attn.proj), eps, f32)
        acc(ffn.down.weight, d_down)
        acc(ffn.up.weight, d_up)
        acc(ffn.gate.weight if ffn.gate is not None else None, d_gate)
        acc(blk.ffn_norm.weight, d_norm)
        acc(blk.attn.proj.weight, d_proj)
        att = sv.att
        if _kept_kernel_ok(att.q, saved["attention"], K / N):
            # only kept queries, and only kept keys' dk/dv: ~half the dense work at keep 0.5
            lse = att.flash[1] if att.flash is not None else None  # the forward kernel's log-sum-exp
            if rows_meta is None:
                rows_meta = triton_attention.kept_rows_meta(kidx, B, T)
            # writes [K, 3, H, hd] rows with RoPE undone: the QKV weight gradient's input as it is
            dqkv = torch.empty(K, 3, H, hd, dtype=att.q.dtype, device=idx.device)
            kept_attention_backward(att.q, att.k, att.v, att.out, do2.view(K, H, hd), kidx, lse,
                                    rows_meta=rows_meta, rope=(model.rope_cos, model.rope_sin), grads=dqkv)
            dqkv = dqkv.view(K, 3 * H * hd)
        else:
            d_out, do_buf = _scatter_heads(do2, att.out, kidx, kb, kt, do_buf)
            dq, dk, dv = (t.transpose(1, 2) for t in attention_backward(att, d_out))  # token-major views
            if cos is None:
                cos, sin = model.rope_cos[kt][:, None, :], model.rope_sin[kt][:, None, :]
            dqkv = qkv_rows(dq, dk, dv, kidx, cos, sin, cdt)
        dx, dxc, d_qkv, d_norm = qkv_bwd(dx, dqkv, sv.x, kidx, blk.attn_norm.weight, W(blk.attn.qkv), eps, f32)
        acc(blk.attn.qkv.weight, d_qkv)
        acc(blk.attn_norm.weight, d_norm)

    d_embed = torch.zeros_like(model.embed.weight)
    d_embed.index_add_(0, idx.reshape(-1).index_select(0, kidx), dx.to(d_embed.dtype))
    acc(model.embed.weight, d_embed)
    return grads


class _ColliderFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, idx: torch.Tensor, model: GPT, compile: bool, attention: str, slot: RowGradSlot,  # type: ignore[override]
                *params: torch.Tensor):
        logits, saved = _forward(model, idx, compile, attention)
        saved["slot"] = slot
        ctx.model, ctx.saved, ctx.params = model, saved, params
        # the trunk output too (pre final norm): extra heads (MTP) read it, and
        # their gradient at kept rows joins the LM head's in the compact backward
        return logits, saved["h"].detach()

    @staticmethod
    def backward(ctx, dlogits: torch.Tensor, dtrunk: torch.Tensor | None):  # type: ignore[override]
        keep = current_keep()
        run = lambda: _backward(ctx.model, ctx.saved, dlogits, keep, dtrunk)  # noqa: E731
        # CUDA: the whole backward on the engine's own thread, where its cuDNN
        # attention backward must run anyway (attention.py): one thread hand-off
        # per step instead of one per layer
        grads = on_own_thread(run) if dlogits.is_cuda else run()
        ctx.saved = None  # free activations as soon as possible
        return (None, None, None, None, None, *[grads.get(id(p)) for p in ctx.params])


class ColliderModel(nn.Module):
    """Wrap a :class:`~sparsetrain.model.GPT` for Collider training.

    ``forward(idx)`` returns the logits of all tokens (dense forward). Call
    ``loss.backward()`` inside ``with filter(keep):`` to backpropagate through
    the kept tokens only. Wrap this module (not the GPT) in DDP.
    ``compile=True`` runs the elementwise-heavy pieces of the forward and
    backward through ``torch.compile``. ``attention``: ``dense`` (the fused
    dense attention backward with zero rows for dropped queries), ``kept``
    (the Triton kernel that skips dropped queries) or ``auto`` (``kept`` on
    the GPU in 16-bit when at most :data:`KEPT_KERNEL_MAX_KEEP` of the tokens
    are kept, else ``dense``).
    """

    def __init__(self, model: GPT, compile: bool = False, attention: str = "auto") -> None:
        super().__init__()
        if attention not in ("auto", "kept", "dense"):
            raise ValueError(f"attention must be auto, kept or dense, got {attention!r}")
        self.model = model
        self.compile = compile
        self.attention = attention

    def forward(self, idx: torch.Tensor, return_trunk: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Logits ``[B, T, V]``; with ``return_trunk`` also the trunk output
        ``[B, T, D]`` (before the final norm), for extra heads such as MTP's:
        the gradient they send back is used at kept rows only."""
        if not torch.is_grad_enabled():
            if return_trunk:
                trunk = self.model.trunk(idx)
                return self.model.lm_head(self.model.norm(trunk)), trunk
            return self.model(idx)[0]
        params = [p for p in self.model.parameters() if p.requires_grad]
        slot = RowGradSlot(self.compile)
        logits, trunk = _ColliderFunction.apply(idx, self.model, self.compile, self.attention, slot, *params)
        setattr(logits, SLOT_ATTR, slot)  # masked_cross_entropy hands its kept rows' gradient through it
        return (logits, trunk) if return_trunk else logits
