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
``SPARSETRAIN_ATTENTION_IMPL`` (``cudnn``, ``flash``, ``recompute``) forces one.

This backward runs over all query rows (zeros included). The Triton kernels
in ``triton_attention.py`` visit kept queries only; the engine picks between
the two (``ColliderModel(attention=...)``).
"""

from __future__ import annotations

import concurrent.futures
import os
import threading
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class AttentionSaved:
    q: torch.Tensor  # [B, H, T, hd], after RoPE
    k: torch.Tensor
    v: torch.Tensor
    out: torch.Tensor  # [B, H, T, hd]
    flash: tuple | None  # ("cudnn" | "flash", lse, ...) for the fused backward, or None: recompute


_cudnn_ok: bool | None = None  # None: not tried yet on this process


def _fused_ok(q: torch.Tensor) -> bool:
    return q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)


def attention_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, AttentionSaved]:
    """Causal SDPA, as fast as the dense model's, plus what the backward needs.

    On CUDA: cuDNN's or flash attention (see the module docstring); both
    return the log-sum-exp the backward reuses.
    """
    global _cudnn_ok
    aten = torch.ops.aten
    impl = os.environ.get("SPARSETRAIN_ATTENTION_IMPL", "auto")  # auto (cudnn, else flash), cudnn, flash, recompute
    if _fused_ok(q) and impl != "recompute":
        if impl in ("auto", "cudnn") and _cudnn_ok is not False and hasattr(aten, "_scaled_dot_product_cudnn_attention"):
            try:
                res = aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, True, False)
                out, lse, cum_q, cum_k, max_q, max_k, seed, offset = res[:8]
                return out, AttentionSaved(q, k, v, out, ("cudnn", lse, cum_q, cum_k, max_q, max_k, seed, offset))
            except RuntimeError:
                _cudnn_ok = False
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
    ``fn`` directly when already there, so the engine can move its whole
    backward onto this thread (one hand-off per step, not one per layer)."""
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
    global _cudnn_ok
    aten = torch.ops.aten
    if saved.flash is not None:
        kind, lse, cum_q, cum_k, max_q, max_k, seed, offset = saved.flash
        if kind == "cudnn":
            d_out = _like(d_out, saved.out)
            try:
                dq, dk, dv = on_own_thread(lambda: aten._scaled_dot_product_cudnn_attention_backward(
                    d_out, saved.q, saved.k, saved.v, saved.out, lse, seed, offset, None, cum_q, cum_k, max_q, max_k,
                    0.0, True))
                _cudnn_ok = True
                return dq, dk, dv
            except RuntimeError:  # this torch's cuDNN backward cannot be called so: recompute below
                _cudnn_ok = False
        else:
            return aten._scaled_dot_product_flash_attention_backward(
                d_out, saved.q, saved.k, saved.v, saved.out, lse, cum_q, cum_k, max_q, max_k, 0.0, True, seed, offset)
    with torch.enable_grad():
        q = saved.q.detach().requires_grad_(True)
        k = saved.k.detach().requires_grad_(True)
        v = saved.v.detach().requires_grad_(True)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        dq, dk, dv = torch.autograd.grad(out, (q, k, v), d_out)
    return dq, dk, dv
