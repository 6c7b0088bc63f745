"""Triton kernels for BK-Core: the recurrences of ``core.py``, one lane per row.

The recurrences are sequential along the sequence, so the parallelism is over
rows (batch x channels): a program owns ``BLOCK`` rows and walks the N
positions, reading one contiguous ``[BLOCK]`` slice of the ``[N, R]`` layout per
step. Complex numbers are carried as (re, im) float32 pairs; ``1/x`` is
``conj(x)/|x|^2``, safe because ``|x| >= |Im z|`` (see ``core.py``) and inputs
are bounded by ``check_inputs``. Tested against the torch loop on random
inputs (on the CPU through ``TRITON_INTERPRET=1``).
"""

from __future__ import annotations

import functools

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None

BLOCK = 32  # rows per program (one warp: a lane per row)
CHUNK = 16  # positions per tile load


@functools.cache
def triton_available() -> bool:
    return triton is not None


if triton is not None:

    # Each program owns BLOCK rows and walks the sequence in chunks of CHUNK
    # positions: one [CHUNK, BLOCK] tile load per chunk, then CHUNK recurrence
    # steps on registers (a position is picked out of the tile with a masked
    # in-thread sum), then one tile store. The recurrence itself is a short
    # dependent chain of FMAs and one reciprocal, so moving the memory latency
    # out of the per-position loop is what makes it fast.

    @triton.jit
    def _take(tile, i, CHUNK: tl.constexpr):
        sel = (tl.arange(0, CHUNK) == i)[:, None]
        return tl.sum(tl.where(sel, tile, 0.0), axis=0)

    @triton.jit
    def _put(tile, i, val, CHUNK: tl.constexpr):
        sel = (tl.arange(0, CHUNK) == i)[:, None]
        return tl.where(sel, val[None, :], tile)

    @triton.jit
    def _recip(x_re, x_im):
        d = x_re * x_re + x_im * x_im
        return x_re / d, -x_im / d

    @triton.jit
    def _bk_forward_kernel(v_ptr, r_ptr, s_ptr, g_ptr, N, R, z_re, z_im,
                           CAUSAL: tl.constexpr, BLOCK: tl.constexpr, CHUNK: tl.constexpr):
        # r_ptr/s_ptr/g_ptr are interleaved complex64 [N, R] (view_as_real: [N, R, 2]).
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        m = offs < R
        ci = tl.arange(0, CHUNK)
        inv_re = tl.zeros((BLOCK,), tl.float32)  # 1 / r_{i-1}; 0 before the first position
        inv_im = tl.zeros((BLOCK,), tl.float32)
        for c0 in range(0, N, CHUNK):
            pos = c0 + ci
            tm = (pos < N)[:, None] & m[None, :]
            lin = pos[:, None] * R + offs[None, :]
            vt = tl.load(v_ptr + lin, mask=tm, other=0.0)
            r_re = tl.zeros((CHUNK, BLOCK), tl.float32)
            r_im = tl.zeros((CHUNK, BLOCK), tl.float32)
            g_re = tl.zeros((CHUNK, BLOCK), tl.float32)
            g_im = tl.zeros((CHUNK, BLOCK), tl.float32)
            for i in tl.static_range(CHUNK):
                v = _take(vt, i, CHUNK)
                x_re = v - 2.0 - z_re - inv_re
                x_im = -z_im - inv_im
                inv_re, inv_im = _recip(x_re, x_im)
                r_re = _put(r_re, i, x_re, CHUNK)
                r_im = _put(r_im, i, x_im, CHUNK)
                if CAUSAL:
                    g_re = _put(g_re, i, inv_re, CHUNK)
                    g_im = _put(g_im, i, inv_im, CHUNK)
            tl.store(r_ptr + 2 * lin, r_re, mask=tm)
            tl.store(r_ptr + 2 * lin + 1, r_im, mask=tm)
            if CAUSAL:
                tl.store(g_ptr + 2 * lin, g_re, mask=tm)
                tl.store(g_ptr + 2 * lin + 1, g_im, mask=tm)
        if not CAUSAL:
            inv_re = tl.zeros((BLOCK,), tl.float32)
            inv_im = tl.zeros((BLOCK,), tl.float32)
            n_chunks = tl.cdiv(N, CHUNK)
            for cc in range(0, n_chunks):
                c0 = (n_chunks - 1 - cc) * CHUNK
                pos = c0 + ci
                tm = (pos < N)[:, None] & m[None, :]
                lin = pos[:, None] * R + offs[None, :]
                vt = tl.load(v_ptr + lin, mask=tm, other=0.0)
                rt_re = tl.load(r_ptr + 2 * lin, mask=tm, other=1.0)
                rt_im = tl.load(r_ptr + 2 * lin + 1, mask=tm, other=0.0)
                s_re = tl.zeros((CHUNK, BLOCK), tl.float32)
                s_im = tl.zeros((CHUNK, BLOCK), tl.float32)
                g_re = tl.zeros((CHUNK, BLOCK), tl.float32)
                g_im = tl.zeros((CHUNK, BLOCK), tl.float32)
                for k in tl.static_range(CHUNK):
                    i = CHUNK - 1 - k
                    valid = c0 + i < N  # the last chunk's padding must not touch the state
                    az_re = _take(vt, i, CHUNK) - 2.0 - z_re
                    x_re = az_re - inv_re
                    x_im = -z_im - inv_im
                    s_re = _put(s_re, i, x_re, CHUNK)
                    s_im = _put(s_im, i, x_im, CHUNK)
                    # G_ii = 1 / (r_i + s_i - (a_i - z))
                    e_re = _take(rt_re, i, CHUNK) + x_re - az_re
                    e_im = _take(rt_im, i, CHUNK) + x_im + z_im
                    q_re, q_im = _recip(e_re, e_im)
                    g_re = _put(g_re, i, q_re, CHUNK)
                    g_im = _put(g_im, i, q_im, CHUNK)
                    n_re, n_im = _recip(x_re, x_im)
                    inv_re = tl.where(valid, n_re, inv_re)
                    inv_im = tl.where(valid, n_im, inv_im)
                tl.store(s_ptr + 2 * lin, s_re, mask=tm)
                tl.store(s_ptr + 2 * lin + 1, s_im, mask=tm)
                tl.store(g_ptr + 2 * lin, g_re, mask=tm)
                tl.store(g_ptr + 2 * lin + 1, g_im, mask=tm)

    @triton.jit
    def _inv_sq(x_re, x_im):
        """(1/x)^2 for x = x_re + i x_im."""
        i_re, i_im = _recip(x_re, x_im)
        return i_re * i_re - i_im * i_im, 2.0 * i_re * i_im

    @triton.jit
    def _bk_backward_kernel(gre_ptr, gim_ptr, g_ptr, r_ptr, s_ptr, a_ptr, out_ptr, N, R,
                            CAUSAL: tl.constexpr, BLOCK: tl.constexpr, CHUNK: tl.constexpr):
        # w = g_re - i g_im; see core.py for the recurrences.
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        m = offs < R
        ci = tl.arange(0, CHUNK)
        n_chunks = tl.cdiv(N, CHUNK)
        if CAUSAL:
            l_re = tl.zeros((BLOCK,), tl.float32)
            l_im = tl.zeros((BLOCK,), tl.float32)
            for cc in range(0, n_chunks):
                c0 = (n_chunks - 1 - cc) * CHUNK
                pos = c0 + ci
                tm = (pos < N)[:, None] & m[None, :]
                lin = pos[:, None] * R + offs[None, :]
                wt_re = tl.load(gre_ptr + lin, mask=tm, other=0.0)
                wt_im = -tl.load(gim_ptr + lin, mask=tm, other=0.0)
                rt_re = tl.load(r_ptr + 2 * lin, mask=tm, other=1.0)
                rt_im = tl.load(r_ptr + 2 * lin + 1, mask=tm, other=0.0)
                out = tl.zeros((CHUNK, BLOCK), tl.float32)
                for k in tl.static_range(CHUNK):
                    j = CHUNK - 1 - k
                    valid = c0 + j < N
                    q_re, q_im = _inv_sq(_take(rt_re, j, CHUNK), _take(rt_im, j, CHUNK))
                    t_re = l_re - _take(wt_re, j, CHUNK)
                    t_im = l_im - _take(wt_im, j, CHUNK)
                    n_re = t_re * q_re - t_im * q_im
                    n_im = t_re * q_im + t_im * q_re
                    l_re = tl.where(valid, n_re, l_re)
                    l_im = tl.where(valid, n_im, l_im)
                    out = _put(out, j, l_re, CHUNK)
                tl.store(out_ptr + lin, out, mask=tm)
        else:
            # A_j = w_j + A_{j-1} / r_{j-1}^2, stored in a_ptr (complex interleaved)
            a_re = tl.zeros((BLOCK,), tl.float32)
            a_im = tl.zeros((BLOCK,), tl.float32)
            q_re = tl.zeros((BLOCK,), tl.float32)
            q_im = tl.zeros((BLOCK,), tl.float32)
            for c0 in range(0, N, CHUNK):
                pos = c0 + ci
                tm = (pos < N)[:, None] & m[None, :]
                lin = pos[:, None] * R + offs[None, :]
                wt_re = tl.load(gre_ptr + lin, mask=tm, other=0.0)
                wt_im = -tl.load(gim_ptr + lin, mask=tm, other=0.0)
                rt_re = tl.load(r_ptr + 2 * lin, mask=tm, other=1.0)
                rt_im = tl.load(r_ptr + 2 * lin + 1, mask=tm, other=0.0)
                at_re = tl.zeros((CHUNK, BLOCK), tl.float32)
                at_im = tl.zeros((CHUNK, BLOCK), tl.float32)
                for j in tl.static_range(CHUNK):
                    n_re = _take(wt_re, j, CHUNK) + a_re * q_re - a_im * q_im
                    n_im = _take(wt_im, j, CHUNK) + a_re * q_im + a_im * q_re
                    a_re = n_re
                    a_im = n_im
                    at_re = _put(at_re, j, a_re, CHUNK)
                    at_im = _put(at_im, j, a_im, CHUNK)
                    q_re, q_im = _inv_sq(_take(rt_re, j, CHUNK), _take(rt_im, j, CHUNK))
                tl.store(a_ptr + 2 * lin, at_re, mask=tm)
                tl.store(a_ptr + 2 * lin + 1, at_im, mask=tm)
            # B_j = (w_{j+1} + B_{j+1}) / s_{j+1}^2; grad_j = Re(-G_jj^2 (A_j + B_j))
            b_re = tl.zeros((BLOCK,), tl.float32)
            b_im = tl.zeros((BLOCK,), tl.float32)
            wn_re = tl.zeros((BLOCK,), tl.float32)  # w_{j+1}
            wn_im = tl.zeros((BLOCK,), tl.float32)
            qs_re = tl.zeros((BLOCK,), tl.float32)  # 1 / s_{j+1}^2
            qs_im = tl.zeros((BLOCK,), tl.float32)
            for cc in range(0, n_chunks):
                c0 = (n_chunks - 1 - cc) * CHUNK
                pos = c0 + ci
                tm = (pos < N)[:, None] & m[None, :]
                lin = pos[:, None] * R + offs[None, :]
                wt_re = tl.load(gre_ptr + lin, mask=tm, other=0.0)
                wt_im = -tl.load(gim_ptr + lin, mask=tm, other=0.0)
                st_re = tl.load(s_ptr + 2 * lin, mask=tm, other=1.0)
                st_im = tl.load(s_ptr + 2 * lin + 1, mask=tm, other=0.0)
                at_re = tl.load(a_ptr + 2 * lin, mask=tm, other=0.0)
                at_im = tl.load(a_ptr + 2 * lin + 1, mask=tm, other=0.0)
                gt_re = tl.load(g_ptr + 2 * lin, mask=tm, other=0.0)
                gt_im = tl.load(g_ptr + 2 * lin + 1, mask=tm, other=0.0)
                out = tl.zeros((CHUNK, BLOCK), tl.float32)
                for k in tl.static_range(CHUNK):
                    j = CHUNK - 1 - k
                    valid = c0 + j < N
                    t_re = wn_re + b_re
                    t_im = wn_im + b_im
                    b_re = t_re * qs_re - t_im * qs_im
                    b_im = t_re * qs_im + t_im * qs_re
                    g_re = _take(gt_re, j, CHUNK)
                    g_im = _take(gt_im, j, CHUNK)
                    gg_re = g_re * g_re - g_im * g_im
                    gg_im = 2.0 * g_re * g_im
                    c_re = _take(at_re, j, CHUNK) + b_re
                    c_im = _take(at_im, j, CHUNK) + b_im
                    out = _put(out, j, -(gg_re * c_re - gg_im * c_im), CHUNK)
                    n_wre = _take(wt_re, j, CHUNK)
                    n_wim = _take(wt_im, j, CHUNK)
                    n_qre, n_qim = _inv_sq(_take(st_re, j, CHUNK), _take(st_im, j, CHUNK))
                    # past the end (padding) the state stays zero: B_{N-1} = 0
                    b_re = tl.where(valid, b_re, 0.0)
                    b_im = tl.where(valid, b_im, 0.0)
                    wn_re = tl.where(valid, n_wre, 0.0)
                    wn_im = tl.where(valid, n_wim, 0.0)
                    qs_re = tl.where(valid, n_qre, 0.0)
                    qs_im = tl.where(valid, n_qim, 0.0)
                tl.store(out_ptr + lin, out, mask=tm)


def _grid(R: int) -> tuple[int]:
    return (triton.cdiv(R, BLOCK),)


def forward_triton(v_nr: torch.Tensor, z: complex, causal: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Same contract as :func:`core.forward_torch` (float32 ``v[N, R]``)."""
    N, R = v_nr.shape
    v_nr = v_nr.contiguous()
    r = torch.empty((N, R), dtype=torch.complex64, device=v_nr.device)
    G = torch.empty_like(r)
    s = None if causal else torch.empty_like(r)
    rv, gv = torch.view_as_real(r), torch.view_as_real(G)
    sv = rv if s is None else torch.view_as_real(s)  # unused in causal mode
    _bk_forward_kernel[_grid(R)](v_nr, rv, sv, gv, N, R, float(z.real), float(z.imag), CAUSAL=causal, BLOCK=BLOCK, CHUNK=CHUNK, num_warps=1)
    return G, r, s


def backward_triton(g_re: torch.Tensor, g_im: torch.Tensor, G: torch.Tensor, r: torch.Tensor, s: torch.Tensor | None) -> torch.Tensor:
    """Same contract as :func:`core.backward_torch` with ``w = g_re - i g_im``."""
    N, R = g_re.shape
    out = torch.empty((N, R), dtype=torch.float32, device=g_re.device)
    causal = s is None
    a = torch.empty((1, 1, 2) if causal else (N, R, 2), dtype=torch.float32, device=g_re.device)
    rv = torch.view_as_real(r)
    sv = rv if causal else torch.view_as_real(s)
    _bk_backward_kernel[_grid(R)](g_re.contiguous(), g_im.contiguous(), torch.view_as_real(G), rv, sv, a, out, N, R,
                                  CAUSAL=causal, BLOCK=BLOCK, CHUNK=CHUNK, num_warps=1)
    return out
