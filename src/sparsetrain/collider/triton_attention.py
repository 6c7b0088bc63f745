"""Attention backward for kept queries only (Triton), causal by original positions.

Kept tokens are packed in ``kidx`` order (sorted by batch row, then position);
``cu[b]:cu[b+1]`` are batch row ``b``'s kept tokens. Two kernels:

* ``_dq_kernel`` -- one program per (tile of kept queries, batch row, head):
  first the log-sum-exp of each kept query over its causal keys, then
  ``dq = scale * sum_j dS_ij k_j`` with ``P = exp(S - lse)``,
  ``dS = P * (dP - delta)``, ``dP = dO v^T``, ``delta = rowsum(dO * O)``.
  Its loop covers keys ``0 .. max position`` of the tile: about half the
  dense work at keep 0.5, for three of the five matrix products.
* ``_dkdv_kernel`` -- one program per (tile of kept keys, batch row, head):
  ``dv = sum_i P_ij dO_i`` and ``dk = scale * sum_i dS_ij q_i`` over kept
  queries ``i`` at or after the key. Dropped keys need no gradient (they are
  constants), so this loop is kept x kept: a quarter of the dense work at 0.5.

Recomputing the log-sum-exp keeps this independent of how the forward kernel
(cuDNN or flash) stores its own. Tested against the dense reference through
Triton's interpreter on the CPU and natively on the GPU.
"""

from __future__ import annotations

import math

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = None


def available() -> bool:
    return triton is not None


if triton is not None:

    @triton.jit
    def _program_range(CU, H):
        """This program's tile index, batch row, head, and the row's kept-token range."""
        b = tl.program_id(1) // H
        lo = tl.load(CU + b)
        return tl.program_id(0), b, tl.program_id(1) % H, lo, tl.load(CU + b + 1) - lo

    @triton.jit
    def _dq_kernel(
        Q, DO, O, POS, CU, Kf, Vf, DQ, LSE, DELTA,
        s_qt, s_qh,  # packed [K, H, hd] strides; head dim contiguous
        s_kb, s_kh, s_kt,  # full keys [B, H, T, hd] strides
        s_vb, s_vh, s_vt,  # full values, likewise
        H, T, scale,
        HD: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
    ):
        tile, b, h, lo, n = _program_range(CU, H)
        if tile * BM >= n:
            return
        rows = tile * BM + tl.arange(0, BM)
        rmask = rows < n
        tok = lo + rows
        d = tl.arange(0, HD)
        qp = tok[:, None] * s_qt + h * s_qh + d[None, :]
        q = tl.load(Q + qp, mask=rmask[:, None], other=0.0)
        do = tl.load(DO + qp, mask=rmask[:, None], other=0.0)
        o = tl.load(O + qp, mask=rmask[:, None], other=0.0)
        delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
        qpos = tl.load(POS + tok, mask=rmask, other=-1)
        hi = tl.max(qpos, 0) + 1
        kbase = Kf + b * s_kb + h * s_kh
        vbase = Vf + b * s_vb + h * s_vh
        # pass 1: log-sum-exp of each kept query over its causal keys
        m_i = tl.full((BM,), float("-inf"), tl.float32)
        l_i = tl.zeros((BM,), tl.float32)
        for start in range(0, hi, BN):
            kpos = start + tl.arange(0, BN)
            kmask = kpos < T
            k = tl.load(kbase + kpos[:, None] * s_kt + d[None, :], mask=kmask[:, None], other=0.0)
            s = tl.dot(q, tl.trans(k)) * scale
            ok = (kpos[None, :] <= qpos[:, None]) & kmask[None, :]
            s = tl.where(ok, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            l_i = l_i * tl.exp(m_i - m_safe) + tl.sum(tl.exp(s - m_safe[:, None]), 1)
            m_i = m_new
        lse = tl.where(rmask, m_i + tl.log(tl.where(rmask, l_i, 1.0)), 0.0)  # padded rows: no log(0)
        # pass 2: dq
        dq = tl.zeros((BM, HD), tl.float32)
        for start in range(0, hi, BN):
            kpos = start + tl.arange(0, BN)
            kmask = kpos < T
            k = tl.load(kbase + kpos[:, None] * s_kt + d[None, :], mask=kmask[:, None], other=0.0)
            v = tl.load(vbase + kpos[:, None] * s_vt + d[None, :], mask=kmask[:, None], other=0.0)
            s = tl.dot(q, tl.trans(k)) * scale
            ok = (kpos[None, :] <= qpos[:, None]) & kmask[None, :] & rmask[:, None]
            p = tl.where(ok, tl.exp(s - lse[:, None]), 0.0)
            dp = tl.dot(do, tl.trans(v))
            ds = p * (dp - delta[:, None])
            dq += tl.dot(ds.to(k.dtype), k)
        tl.store(DQ + qp, (dq * scale).to(DQ.dtype.element_ty), mask=rmask[:, None])
        tl.store(LSE + tok * H + h, lse, mask=rmask)
        tl.store(DELTA + tok * H + h, delta, mask=rmask)

    @triton.jit
    def _dkdv_kernel(
        Q, DO, Kk, Vk, POS, CU, LSE, DELTA, DK, DV,
        s_qt, s_qh,
        H, scale,
        HD: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
    ):
        tile, b, h, lo, n = _program_range(CU, H)
        if tile * BN >= n:
            return
        cols = tile * BN + tl.arange(0, BN)
        cmask = cols < n
        ktok = lo + cols
        d = tl.arange(0, HD)
        kp = ktok[:, None] * s_qt + h * s_qh + d[None, :]
        k = tl.load(Kk + kp, mask=cmask[:, None], other=0.0)
        v = tl.load(Vk + kp, mask=cmask[:, None], other=0.0)
        kpos = tl.load(POS + ktok, mask=cmask, other=2**30)
        dk = tl.zeros((BN, HD), tl.float32)
        dv = tl.zeros((BN, HD), tl.float32)
        # kept queries are sorted by position: those at or after this tile's
        # first key start at the tile's own index
        for start in range((tile * BN) // BM * BM, n, BM):
            rows = start + tl.arange(0, BM)
            rmask = rows < n
            qtok = lo + rows
            qp = qtok[:, None] * s_qt + h * s_qh + d[None, :]
            q = tl.load(Q + qp, mask=rmask[:, None], other=0.0)
            do = tl.load(DO + qp, mask=rmask[:, None], other=0.0)
            lse = tl.load(LSE + qtok * H + h, mask=rmask, other=0.0)
            delta = tl.load(DELTA + qtok * H + h, mask=rmask, other=0.0)
            qpos = tl.load(POS + qtok, mask=rmask, other=-1)
            st = tl.dot(k, tl.trans(q)) * scale  # [BN, BM]
            ok = (kpos[:, None] <= qpos[None, :]) & rmask[None, :] & cmask[:, None]
            pt = tl.where(ok, tl.exp(st - lse[None, :]), 0.0)
            dv += tl.dot(pt.to(do.dtype), do)
            dpt = tl.dot(v, tl.trans(do))
            dst = pt * (dpt - delta[None, :])
            dk += tl.dot(dst.to(q.dtype), q)
        tl.store(DK + kp, (dk * scale).to(DK.dtype.element_ty), mask=cmask[:, None])
        tl.store(DV + kp, dv.to(DV.dtype.element_ty), mask=cmask[:, None])


def kept_attention_backward(
    q_k: torch.Tensor, o_k: torch.Tensor, do_k: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    k_k: torch.Tensor, v_k: torch.Tensor, kidx: torch.Tensor, B: int, T: int,
    block_m: int = 64, block_n: int = 64, num_warps: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Collider attention gradients for the kept tokens only.

    ``q_k, o_k, do_k, k_k, v_k``: kept tokens' rows ``[K, H, hd]`` (packed in
    ``kidx`` order, sorted); ``k, v``: all keys and values ``[B, H, T, hd]``.
    Returns ``(dq_k, dk_k, dv_k)`` ``[K, H, hd]`` in the dtype of ``q_k``.
    """
    if triton is None:
        raise RuntimeError("Triton is not installed")
    K, H, hd = q_k.shape
    if hd & (hd - 1) or hd < 16:
        raise ValueError(f"head_dim must be a power of two >= 16 for the Triton kernel, got {hd}")
    kb = kidx // T
    counts = torch.bincount(kb, minlength=B)
    cu = torch.zeros(B + 1, dtype=torch.int32, device=kidx.device)
    cu[1:] = torch.cumsum(counts, 0)
    pos = (kidx % T).to(torch.int32)
    n_max = int(counts.max())
    q_k, o_k, do_k, k_k, v_k = (t.contiguous() for t in (q_k, o_k, do_k, k_k, v_k))
    if k.stride(-1) != 1:
        k = k.contiguous()
    if v.stride(-1) != 1:
        v = v.contiguous()
    dq = torch.empty_like(q_k)
    dk = torch.empty_like(q_k)
    dv = torch.empty_like(q_k)
    lse = torch.empty(K, H, dtype=torch.float32, device=q_k.device)
    delta = torch.empty(K, H, dtype=torch.float32, device=q_k.device)
    scale = 1.0 / math.sqrt(hd)
    num_warps = num_warps or (8 if hd >= 128 else 4)
    grid_m = (triton.cdiv(n_max, block_m), B * H)
    _dq_kernel[grid_m](q_k, do_k, o_k, pos, cu, k, v, dq, lse, delta,
                       q_k.stride(0), q_k.stride(1), k.stride(0), k.stride(1), k.stride(2),
                       v.stride(0), v.stride(1), v.stride(2),
                       H, T, scale, HD=hd, BM=block_m, BN=block_n, num_warps=num_warps)
    grid_n = (triton.cdiv(n_max, block_n), B * H)
    _dkdv_kernel[grid_n](q_k, do_k, k_k, v_k, pos, cu, lse, delta, dk, dv,
                         q_k.stride(0), q_k.stride(1), H, scale, HD=hd, BM=block_m, BN=block_n, num_warps=num_warps)
    return dq, dk, dv
