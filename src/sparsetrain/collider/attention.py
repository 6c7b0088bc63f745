"""Causal attention forward that keeps what its backward needs, and the backward
restricted to kept queries.

Semantics: a dropped position's key and value are constants, and a dropped
query has no gradient coming in. So with ``dO`` zero on dropped query rows,
an ordinary attention backward returns exactly the Collider gradients: ``dq``
at kept rows, and ``dk``/``dv`` whose kept rows collect the contributions of
kept queries only (``dS = P * (dP - rowsum(dO * O))`` vanishes on zero rows).
The rows of ``dk``/``dv`` at dropped positions are discarded by the caller.

CUDA bf16/fp16 uses the fused kernels torch ships; their forward returns the
log-sum-exp the backward reuses. Elsewhere the backward recomputes the forward
under autograd.

cuDNN's fused attention when it runs here (faster than flash on Hopper), else
flash. Torch keeps one cache of cuDNN backward graphs per thread, keyed by the
shapes and the q/k/v strides but *not* by the strides of ``dO``, which the
graph bakes in. Any other code's SDPA backward of the same shapes on the same
thread (autograd's device thread runs every CUDA backward) leaves a graph
built for its own ``dO`` layout, and a later call with another layout reads
``dO`` wrongly: relative error ~1 in every gradient
(bench/results/collider_objective_cudnn_bug_h200.json). So the engine calls
the cuDNN backward on a thread of its own (:func:`on_own_thread`), on the
caller's stream, always with ``dO`` laid out like the forward's output.
The kernel policy's ``attention_impl`` (:mod:`sparsetrain.kernels`; a run's
``[kernels] attention_impl``, ``SPARSETRAIN_ATTENTION_IMPL`` by default) forces one:
``cudnn``, ``flash`` or ``recompute``. Where cuDNN raises, the call falls back to
flash, and an engine that passes its :class:`CudnnFallback` tries cuDNN no more
(other engines in the process still do).

This backward runs over all query rows (zeros included). The Triton kernels
in ``triton_attention.py`` visit kept queries only; :func:`kept_rows_backward`
picks between the two (``ColliderModel(attention=...)``) and returns the QKV
projection's output gradient at the kept rows, whichever ran.
"""

from __future__ import annotations

import concurrent.futures
import threading
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from torch.nn.attention import SDPBackend, sdpa_kernel

from .. import kernels
from ..model import upcast

from . import triton_attention
from .compact import piece, rope_inverse, rows


@dataclass
class CudnnFallback:
    """One engine's memory of cuDNN attention failing (``ColliderModel``, ``HFEngine``,
    one each): after the first failure its forwards run flash (or recompute) instead."""

    failed: bool = False


@dataclass
class AttentionSaved:
    q: torch.Tensor  # [B, H, T, hd], after RoPE
    k: torch.Tensor  # [B, H, T, hd], or [B, Hkv, T, hd] for grouped-query attention (see expand_kv_heads)
    v: torch.Tensor
    out: torch.Tensor  # [B, H, T, hd]
    flash: tuple | None  # ("cudnn" | "flash", lse, ...) for the fused backward, or None: recompute
    cudnn: CudnnFallback | None = None  # the engine's, told when the cuDNN backward fails


def _fused_ok(q: torch.Tensor) -> bool:
    return q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)


def attention_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      cudnn: CudnnFallback | None = None) -> tuple[torch.Tensor, AttentionSaved]:
    """Causal SDPA, as fast as the dense model's, plus what the backward needs.

    On CUDA: cuDNN's or flash attention (see the module docstring); both
    return the log-sum-exp the backward reuses. ``cudnn``: the calling engine's
    fallback state (None: cuDNN is tried at every call, nothing remembered).
    """
    aten = torch.ops.aten
    impl = kernels.current().attention_impl  # auto (cudnn, else flash), cudnn, flash, recompute
    if _fused_ok(q) and impl != "recompute":
        if impl in ("auto", "cudnn") and not (cudnn and cudnn.failed) and kernels.cudnn_attention_available():
            try:
                res = aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, True, False)
                out, lse, cum_q, cum_k, max_q, max_k, seed, offset = res[:8]
                return out, AttentionSaved(q, k, v, out, ("cudnn", lse, cum_q, cum_k, max_q, max_k, seed, offset), cudnn)
            except RuntimeError:
                if cudnn is not None:
                    cudnn.failed = True
        if hasattr(aten, "_scaled_dot_product_flash_attention"):
            try:
                res = aten._scaled_dot_product_flash_attention(q, k, v, 0.0, True, False)
                out, lse, cum_q, cum_k, max_q, max_k, seed, offset = res[:8]
                return out, AttentionSaved(q, k, v, out, ("flash", lse, cum_q, cum_k, max_q, max_k, seed, offset))
            except RuntimeError:  # a shape or GPU flash does not support: the recompute path below
                pass
    out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    return out, AttentionSaved(q, k, v, out, None)


_pool: concurrent.futures.ThreadPoolExecutor | None = None
_THREAD_NAME = "sparsetrain-attention"


def on_own_thread(fn):
    """``fn()`` on the engine's own thread (so its own cuDNN graph cache), on the
    caller's device and stream, with autograd off; blocks until done. Runs
    ``fn`` directly when already there. Only the cuDNN backward needs it: the
    other attention paths run on the calling thread, with no hand-off."""
    global _pool
    if threading.current_thread().name.startswith(_THREAD_NAME):
        return fn()
    if _pool is None:
        _pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix=_THREAD_NAME)
    device, stream = torch.cuda.current_device(), torch.cuda.current_stream()

    def run():
        torch.cuda.set_device(device)
        with torch.cuda.stream(stream), torch.no_grad():
            return fn()

    return _pool.submit(run).result()


def _like(t: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """``t`` with ``ref``'s strides (copied when they differ)."""
    if t.stride() == ref.stride():
        return t
    return torch.empty_strided(ref.shape, ref.stride(), dtype=t.dtype, device=t.device).copy_(t)


def attention_backward(saved: AttentionSaved, d_out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dq, dk, dv)`` for ``d_out`` (laid out like ``saved.out``; zero rows for dropped queries)."""
    aten = torch.ops.aten
    if saved.flash is not None:
        kind, lse, cum_q, cum_k, max_q, max_k, seed, offset = saved.flash
        if kind == "cudnn":
            d_out = _like(d_out, saved.out)
            try:
                dq, dk, dv = on_own_thread(lambda: aten._scaled_dot_product_cudnn_attention_backward(
                    d_out, saved.q, saved.k, saved.v, saved.out, lse, seed, offset, None, cum_q, cum_k, max_q, max_k,
                    0.0, True))
                return dq, dk, dv
            except RuntimeError:  # this torch's cuDNN backward cannot be called so: recompute below
                if saved.cudnn is not None:
                    saved.cudnn.failed = True
        else:
            return aten._scaled_dot_product_flash_attention_backward(
                d_out, saved.q, saved.k, saved.v, saved.out, lse, cum_q, cum_k, max_q, max_k, 0.0, True, seed, offset)
    # on the calling thread (a nested autograd call from another thread would wait
    # for autograd's device thread, which is waiting for it), so never through
    # cuDNN's backward and its per-thread graph cache
    backends = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
    with torch.enable_grad(), sdpa_kernel(backends):
        q = saved.q.detach().requires_grad_(True)
        k = saved.k.detach().requires_grad_(True)
        v = saved.v.detach().requires_grad_(True)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        dq, dk, dv = torch.autograd.grad(out, (q, k, v), d_out)
    return dq, dk, dv


MODES = ("auto", "kept", "dense")


def kept_kernel_ok(q: torch.Tensor, mode: str, keep_fraction: float) -> bool:
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
    return ok and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and keep_fraction <= kernels.current().kept_kernel_max_keep


def _token_major(t: torch.Tensor) -> bool:
    """Is this [B, H, T, hd] tensor laid out as [B, T, H, hd] (rows = tokens)?"""
    return t.transpose(1, 2).is_contiguous()


def scatter_heads(rows_: torch.Tensor, like: torch.Tensor, kidx, kb, kt,
                  buf: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A zero [B, H, T, hd] tensor laid out like ``like`` with ``rows_`` [K, D] at
    the kept tokens, and the [B*T, D] buffer behind it when token-major.

    Pass that buffer back in for the next layer: the kept rows are the same in
    every layer, so they are overwritten and the dropped rows stay zero, and
    the buffer is zero-filled once per backward instead of once per layer."""
    B, H, T, hd = like.shape
    if _token_major(like):  # a plain row copy into a [B*T, D] buffer
        if buf is None or buf.dtype != like.dtype or buf.shape != (B * T, H * hd):
            buf = torch.zeros(B * T, H * hd, dtype=like.dtype, device=like.device)
        buf.index_copy_(0, kidx, rows_.to(like.dtype))
        return buf.view(B, T, H, hd).transpose(1, 2), buf
    out = torch.zeros_like(like)
    out[kb, :, kt] = rows_.view(-1, H, hd).to(like.dtype)
    return out, buf


def expand_kv_heads(t: torch.Tensor, groups: int, buf: torch.Tensor | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Grouped-query keys or values ``[B, Hkv, T, hd]`` (token-major) repeated to
    ``[B, Hkv * groups, T, hd]`` as Hugging Face's ``repeat_kv`` does (query head
    ``h`` reads key/value head ``h // groups``), token-major, for the fused
    attention kernels that take equal head counts; and the ``[B, T, Hkv, groups, hd]``
    buffer behind it, which a later call may pass back in to be overwritten
    (the layers of one backward share one)."""
    B, Hkv, T, hd = t.shape
    if groups == 1:
        return t, buf
    if buf is None or buf.shape != (B, T, Hkv, groups, hd) or buf.dtype != t.dtype or buf.device != t.device:
        buf = torch.empty(B, T, Hkv, groups, hd, dtype=t.dtype, device=t.device)
    buf.copy_(t.transpose(1, 2).unsqueeze(3).expand(B, T, Hkv, groups, hd))
    return buf.view(B, T, Hkv * groups, hd).transpose(1, 2), buf


def _qkv_grad_rows(dq, dk, dv, kidx, cos_k, sin_k, dtype: torch.dtype, groups: int = 1):
    """The QKV projection's output gradient at the kept rows, ``[K, (H + 2 Hkv) hd]``
    (``[K, 3 * D]`` without grouped-query heads), from the dense attention
    backward's token-major ``[B, T, H, hd]`` gradients (after RoPE for q and k:
    undone here). With ``groups`` query heads per key/value head, each
    key/value head's gradient is the sum over its group (in float32). The
    kept-query kernel writes this directly
    (``kept_attention_backward(rope=..., grads=...)``)."""
    dq, dk, dv = rows(dq, kidx), rows(dk, kidx), rows(dv, kidx)
    if groups > 1:
        K, H, hd = dk.shape
        dk, dv = (upcast(t).view(K, H // groups, groups, hd).sum(2) for t in (dk, dv))
    parts = (rope_inverse(dq, cos_k, sin_k), rope_inverse(dk, cos_k, sin_k), dv)
    return torch.cat([p.to(dtype) for p in parts], 1).reshape(dq.shape[0], -1)


def kept_rows_backward(saved: AttentionSaved, do_rows: torch.Tensor, kept, rope: tuple[torch.Tensor, torch.Tensor],
                       mode: str, scratch: dict, compile: bool, dtype: torch.dtype) -> torch.Tensor:
    """The attention backward of one layer at the kept rows: from the output
    gradient ``do_rows`` [K, H * hd] (kept rows, token-major heads) to the QKV
    projection's output gradient ``[K, (H + 2 * Hkv) * hd]`` in ``dtype``, RoPE
    undone. ``saved.k`` and ``saved.v`` may have ``Hkv`` heads, fewer than
    ``H`` (grouped-query attention, see :func:`expand_kv_heads`): the kernel
    reads them so, and the dense backward expands them again (into a buffer
    shared by the layers of one backward).

    ``kept``: the backward's :class:`~sparsetrain.collider.keep.KeptRows`;
    ``rope``: the full ``(cos, sin)`` tables ``[>= T, hd/2]`` that rotated q
    and k; ``mode``: auto, kept or dense (:func:`kept_kernel_ok`); ``scratch``:
    a dict shared by every layer of one backward, for what is the same in all
    of them (the kept-query kernel's row metadata, the zero-filled dO buffer,
    the RoPE tables at the kept positions)."""
    kidx = kept.kidx
    K = kidx.numel()
    B, H, T, hd = saved.q.shape
    Hkv = saved.k.shape[1]
    if kept_kernel_ok(saved.q, mode, K / kept.tokens):
        # only kept queries, and only kept keys' dk/dv: about half the dense work at keep 0.5
        lse = saved.flash[1] if saved.flash is not None else None  # the forward kernel's log-sum-exp
        if "rows_meta" not in scratch:
            scratch["rows_meta"] = triton_attention.kept_rows_meta(kidx, B, T)
        # [K, H + 2 Hkv, hd] rows with RoPE undone: the QKV weight gradient's input as it is
        dqkv = torch.empty(K, H + 2 * Hkv, hd, dtype=saved.q.dtype, device=saved.q.device)
        triton_attention.kept_attention_backward(saved.q, saved.k, saved.v, saved.out, do_rows.reshape(K, H, hd), kidx,
                                                 lse, rows_meta=scratch["rows_meta"], rope=rope, grads=dqkv)
        return dqkv.view(K, (H + 2 * Hkv) * hd).to(dtype)
    kb, kt = kept.positions
    d_out, scratch["do_buf"] = scatter_heads(do_rows, saved.out, kidx, kb, kt, scratch.get("do_buf"))
    if Hkv != H:  # the fused kernels take equal head counts: the forward expanded k and v so, and so does this
        k, scratch["k_buf"] = expand_kv_heads(saved.k, H // Hkv, scratch.get("k_buf"))
        v, scratch["v_buf"] = expand_kv_heads(saved.v, H // Hkv, scratch.get("v_buf"))
        saved = AttentionSaved(saved.q, k, v, saved.out, saved.flash)
    dq, dk, dv = (t.transpose(1, 2) for t in attention_backward(saved, d_out))  # token-major views
    if "rope_kept" not in scratch:
        cos, sin = rope
        scratch["rope_kept"] = (cos[kt][:, None, :], sin[kt][:, None, :])
    cos_k, sin_k = scratch["rope_kept"]
    return piece(_qkv_grad_rows, compile)(dq, dk, dv, kidx, cos_k, sin_k, dtype, H // Hkv)
