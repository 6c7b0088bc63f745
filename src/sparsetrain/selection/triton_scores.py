"""Fused Triton kernel for :class:`~sparsetrain.selection.scores.RowStats`.

One program per row streams the vocabulary once in ``BLOCK`` chunks, keeping
in registers an online max ``m``, lane-wise ``s = sum exp(x - m)``,
``t = sum exp(x - m) x`` and each lane's two largest logits; the target logit
is a single load. So the logits are read exactly once and no ``[N, V]``
float32 intermediate exists:

    lse = m + log s,  H = lse - t / s,  p1 = exp(top1 - lse),  p2 = exp(top2 - lse)

The torch path in ``scores.py`` is the reference it is tested against (on the
GPU, and on the CPU through Triton's interpreter, ``TRITON_INTERPRET=1``).
"""

from __future__ import annotations

import torch

from .. import kernels
from ..numerics import IGNORE_INDEX
from .row_stats import RowStats

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None


triton_available = kernels.triton_available  # decided once for the process


if triton is not None:

    @triton.jit
    def _row_stats_kernel(
        logits_ptr, targets_ptr, rows_ptr, lse_ptr, nll_ptr, ent_ptr, p1_ptr, p2_ptr,
        V, stride_row, ignore_index,
        BLOCK: tl.constexpr, GATHER: tl.constexpr,
    ):
        # Per-lane accumulators: the only cross-lane reduction inside the loop is
        # the block max (the shared rescaling reference); sums and the top-2 stay
        # lane-wise and are reduced once after the loop. One exp per element.
        row = tl.program_id(0).to(tl.int64)
        # GATHER: program i reads logits row rows[i] (and its target) and writes output i
        if GATHER:
            src = tl.load(rows_ptr + row).to(tl.int64)
        else:
            src = row
        base = logits_ptr + src * stride_row
        offs = tl.arange(0, BLOCK)
        m = tl.full((), float("-inf"), tl.float32)
        s_vec = tl.zeros((BLOCK,), tl.float32)
        t_vec = tl.zeros((BLOCK,), tl.float32)
        top1 = tl.full((BLOCK,), float("-inf"), tl.float32)
        top2 = tl.full((BLOCK,), float("-inf"), tl.float32)
        for start in range(0, V, BLOCK):
            cols = start + offs
            inb = cols < V
            x = tl.load(base + cols, mask=inb, other=float("-inf")).to(tl.float32)
            top2 = tl.maximum(top2, tl.minimum(top1, x))
            top1 = tl.maximum(top1, x)
            m_new = tl.maximum(m, tl.max(x, 0))
            scale = tl.exp(m - m_new)
            e = tl.where(inb, tl.exp(x - m_new), 0.0)
            s_vec = s_vec * scale + e
            t_vec = t_vec * scale + e * tl.where(inb, x, 0.0)  # 0 * -inf would be NaN
            m = m_new
        s = tl.sum(s_vec, 0)
        t = tl.sum(t_vec, 0)
        # top-2 over lanes: the best lane's runner-up competes with every other lane's best
        b1 = tl.max(top1, 0)
        i1 = tl.argmax(top1, 0)
        b2 = tl.maximum(tl.max(tl.where(offs == i1, float("-inf"), top1), 0), tl.max(tl.where(offs == i1, top2, float("-inf")), 0))
        lse = m + tl.log(s)
        tgt = tl.load(targets_ptr + src).to(tl.int64)
        valid = tgt != ignore_index
        x_t = tl.load(base + tl.where(valid, tgt, 0)).to(tl.float32)
        tl.store(lse_ptr + row, lse)
        tl.store(nll_ptr + row, tl.where(valid, lse - x_t, 0.0))
        tl.store(ent_ptr + row, lse - t / s)
        tl.store(p1_ptr + row, tl.exp(b1 - lse))
        tl.store(p2_ptr + row, tl.exp(b2 - lse))


def row_stats_triton(
    logits: torch.Tensor,
    targets: torch.Tensor,
    ignore_index: int = IGNORE_INDEX,
    block: int | None = None,
    num_warps: int | None = None,
    rows: torch.Tensor | None = None,
) -> RowStats:
    """The fused kernel. ``logits [..., V]`` (any float dtype, last dim contiguous).
    ``rows``: a 1-D index into the flattened rows; then the stats are those of
    ``logits.reshape(-1, V)[rows]`` (shape ``[len(rows)]``), read in place
    without gathering the rows first."""
    if triton is None:
        raise RuntimeError("Triton is not installed")
    shape = logits.shape[:-1]
    V = logits.shape[-1]
    flat = logits.reshape(-1, V)
    if flat.stride(-1) != 1:
        flat = flat.contiguous()
    tgt = targets.reshape(-1).contiguous()
    if tgt.numel() != flat.shape[0]:
        raise ValueError(f"targets {tuple(targets.shape)} do not match logits {tuple(logits.shape)}")
    if rows is not None:
        rows = rows.reshape(-1).contiguous()
        shape = rows.shape
    n = shape.numel()
    outs = [torch.empty(n, device=logits.device, dtype=torch.float32) for _ in range(5)]
    if n:
        BLOCK = block or min(1024, triton.next_power_of_2(V))  # the measured best: bench/results/scoring_kernel_h200.json
        _row_stats_kernel[(n,)](flat, tgt, rows if rows is not None else tgt, *outs, V, flat.stride(0), ignore_index,
                                BLOCK=BLOCK, GATHER=rows is not None, num_warps=num_warps or 4)
    lse, nll, ent, p1, p2 = (o.view(shape) for o in outs)
    kept_targets = targets.reshape(-1).index_select(0, rows) if rows is not None else targets
    return RowStats(lse=lse, nll=nll, entropy=ent, p1=p1, p2=p2, valid=(kept_targets != ignore_index).view(shape))
