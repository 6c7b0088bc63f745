"""Triton kernels for BK-Core: the recurrences of ``core.py``, one lane per row.

The recurrences are sequential along the sequence, so the parallelism is over
rows (batch x channels): a program owns ``BLOCK`` rows and walks the N
positions, reading one contiguous ``[BLOCK]`` slice of the ``[N, R]`` layout per
step. Each step is latency-bound (one dependent global load per position);
a chunked variant that loads ``[16, BLOCK]`` tiles and steps through them
in registers is slower (register pressure of the masked in-register selects),
so this simple form serves the bidirectional mode. The causal mode (the LM's) runs as two parallel scans instead: the
forward ratios are prefix products of 2x2 Moebius matrices, the backward
adjoint an affine recurrence scanned from the end (``_bk_causal_scan_*``),
one program per row with the row in registers, for N up to ``SCAN_MAX_N``. Complex numbers are carried as (re, im) float32 pairs; ``1/x`` is
``conj(x)/|x|^2``, safe because ``|x| >= |Im z|`` (see ``core.py``) and inputs
are bounded by ``check_inputs``. Tested against the torch loop on random
inputs (on the CPU through ``TRITON_INTERPRET=1``).
"""

from __future__ import annotations

import torch

from .. import kernels

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None

BLOCK = 32  # rows per program


triton_available = kernels.triton_available  # decided once for the process, a constant to torch.compile


if triton is not None:

    # Complex numbers are (re, im) float32 pairs; r/s/G/A buffers are interleaved
    # complex64 [N, R] (view_as_real: [N, R, 2]), so entry `lin` sits at 2 * lin.

    @triton.jit
    def _cmul(ar, ai, br, bi):
        return ar * br - ai * bi, ar * bi + ai * br

    @triton.jit
    def _cdot2(ar, ai, br, bi, cr, ci, dr, di):
        """a b + c d for complex a, b, c, d."""
        x_r, x_i = _cmul(ar, ai, br, bi)
        y_r, y_i = _cmul(cr, ci, dr, di)
        return x_r + y_r, x_i + y_i

    @triton.jit
    def _recip(x_re, x_im):
        d = x_re * x_re + x_im * x_im
        return x_re / d, -x_im / d

    @triton.jit
    def _inv_sq(x_re, x_im):
        """(1/x)^2 for x = x_re + i x_im."""
        i_re, i_im = _recip(x_re, x_im)
        return i_re * i_re - i_im * i_im, 2.0 * i_re * i_im

    @triton.jit
    def _load_c(ptr, lin, m, other_re):
        return tl.load(ptr + 2 * lin, mask=m, other=other_re), tl.load(ptr + 2 * lin + 1, mask=m, other=0.0)

    @triton.jit
    def _store_c(ptr, lin, re, im, m):
        tl.store(ptr + 2 * lin, re, mask=m)
        tl.store(ptr + 2 * lin + 1, im, mask=m)

    @triton.jit
    def _load_w(gre_ptr, gim_ptr, lin, m):
        """w = g_re - i g_im, the upstream gradient as one complex number."""
        return tl.load(gre_ptr + lin, mask=m, other=0.0), -tl.load(gim_ptr + lin, mask=m, other=0.0)

    @triton.jit
    def _load_inv_sq(ptr, lin, m):
        """1 / x^2 for the complex x stored at ``lin`` (masked lanes: x = 1)."""
        x_re, x_im = _load_c(ptr, lin, m, 1.0)
        return _inv_sq(x_re, x_im)

    @triton.jit
    def _bk_forward_kernel(v_ptr, r_ptr, s_ptr, g_ptr, N, R, z_re, z_im,
                           CAUSAL: tl.constexpr, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        m = offs < R
        inv_re = tl.zeros((BLOCK,), tl.float32)  # 1 / r_{i-1}; 0 before the first position
        inv_im = tl.zeros((BLOCK,), tl.float32)
        for i in range(N):
            lin = i * R + offs
            v = tl.load(v_ptr + lin, mask=m, other=0.0)
            x_re = v - 2.0 - z_re - inv_re
            x_im = -z_im - inv_im
            inv_re, inv_im = _recip(x_re, x_im)
            _store_c(r_ptr, lin, x_re, x_im, m)
            if CAUSAL:
                _store_c(g_ptr, lin, inv_re, inv_im, m)
        if not CAUSAL:
            inv_re = tl.zeros((BLOCK,), tl.float32)
            inv_im = tl.zeros((BLOCK,), tl.float32)
            for k in range(N):
                lin = (N - 1 - k) * R + offs
                v = tl.load(v_ptr + lin, mask=m, other=0.0)
                az_re = v - 2.0 - z_re
                x_re = az_re - inv_re
                x_im = -z_im - inv_im
                _store_c(s_ptr, lin, x_re, x_im, m)
                # G_ii = 1 / (r_i + s_i - (a_i - z))
                rr, ri = _load_c(r_ptr, lin, m, 1.0)
                g_re, g_im = _recip(rr + x_re - az_re, ri + x_im + z_im)
                _store_c(g_ptr, lin, g_re, g_im, m)
                inv_re, inv_im = _recip(x_re, x_im)

    @triton.jit
    def _bk_backward_kernel(gre_ptr, gim_ptr, g_ptr, r_ptr, s_ptr, a_ptr, out_ptr, N, R,
                            CAUSAL: tl.constexpr, BLOCK: tl.constexpr):
        # see core.py for the recurrences
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        m = offs < R
        if CAUSAL:
            l_re = tl.zeros((BLOCK,), tl.float32)
            l_im = tl.zeros((BLOCK,), tl.float32)
            for k in range(N):
                lin = (N - 1 - k) * R + offs
                w_re, w_im = _load_w(gre_ptr, gim_ptr, lin, m)
                q_re, q_im = _load_inv_sq(r_ptr, lin, m)
                l_re, l_im = _cmul(l_re - w_re, l_im - w_im, q_re, q_im)
                tl.store(out_ptr + lin, l_re, mask=m)
        else:
            # A_j = w_j + A_{j-1} / r_{j-1}^2, stored in a_ptr
            a_re = tl.zeros((BLOCK,), tl.float32)
            a_im = tl.zeros((BLOCK,), tl.float32)
            q_re = tl.zeros((BLOCK,), tl.float32)
            q_im = tl.zeros((BLOCK,), tl.float32)
            for j in range(N):
                lin = j * R + offs
                w_re, w_im = _load_w(gre_ptr, gim_ptr, lin, m)
                t_re, t_im = _cmul(a_re, a_im, q_re, q_im)
                a_re = w_re + t_re
                a_im = w_im + t_im
                _store_c(a_ptr, lin, a_re, a_im, m)
                q_re, q_im = _load_inv_sq(r_ptr, lin, m)
            # B_j = (w_{j+1} + B_{j+1}) / s_{j+1}^2; grad_j = Re(-G_jj^2 (A_j + B_j))
            b_re = tl.zeros((BLOCK,), tl.float32)
            b_im = tl.zeros((BLOCK,), tl.float32)
            wn_re = tl.zeros((BLOCK,), tl.float32)  # w_{j+1}
            wn_im = tl.zeros((BLOCK,), tl.float32)
            qs_re = tl.zeros((BLOCK,), tl.float32)  # 1 / s_{j+1}^2
            qs_im = tl.zeros((BLOCK,), tl.float32)
            for k in range(N):
                lin = (N - 1 - k) * R + offs
                b_re, b_im = _cmul(wn_re + b_re, wn_im + b_im, qs_re, qs_im)
                a_re, a_im = _load_c(a_ptr, lin, m, 0.0)
                g_re, g_im = _load_c(g_ptr, lin, m, 0.0)
                gg_re, gg_im = _cmul(g_re, g_im, g_re, g_im)
                c_re, _c_im = _cmul(gg_re, gg_im, a_re + b_re, a_im + b_im)
                tl.store(out_ptr + lin, -c_re, mask=m)
                wn_re, wn_im = _load_w(gre_ptr, gim_ptr, lin, m)
                qs_re, qs_im = _load_inv_sq(s_ptr, lin, m)

    # ---- causal mode as parallel scans (one program per row, the whole row in registers)
    # r_i = (a_i - z) - 1/r_{i-1} is the Moebius map of M_i = [[a_i - z, -1], [1, 0]]:
    # [theta_i, theta_{i-1}] = M_i ... M_1 [1, 0], so r_i = P00 / P10 of the prefix
    # product P. Products are rescaled by their largest entry (a Moebius map does
    # not change when its matrix is scaled), so nothing overflows.

    @triton.jit
    def _mobius_combine(a00r, a00i, a01r, a01i, a10r, a10i, a11r, a11i,
                        b00r, b00i, b01r, b01i, b10r, b10i, b11r, b11i):
        # later (b) after earlier (a): C = B @ A
        c00r, c00i = _cdot2(b00r, b00i, a00r, a00i, b01r, b01i, a10r, a10i)
        c01r, c01i = _cdot2(b00r, b00i, a01r, a01i, b01r, b01i, a11r, a11i)
        c10r, c10i = _cdot2(b10r, b10i, a00r, a00i, b11r, b11i, a10r, a10i)
        c11r, c11i = _cdot2(b10r, b10i, a01r, a01i, b11r, b11i, a11r, a11i)
        sc = tl.maximum(tl.maximum(tl.maximum(tl.abs(c00r), tl.abs(c00i)), tl.maximum(tl.abs(c01r), tl.abs(c01i))),
                        tl.maximum(tl.maximum(tl.abs(c10r), tl.abs(c10i)), tl.maximum(tl.abs(c11r), tl.abs(c11i))))
        inv = 1.0 / sc
        return (c00r * inv, c00i * inv, c01r * inv, c01i * inv, c10r * inv, c10i * inv, c11r * inv, c11i * inv)

    @triton.jit
    def _affine_combine(a_ar, a_ai, a_br, a_bi, b_ar, b_ai, b_br, b_bi):
        # later (b) after earlier (a): x -> alpha_b (alpha_a x + beta_a) + beta_b
        al_r, al_i = _cmul(b_ar, b_ai, a_ar, a_ai)
        t_r, t_i = _cmul(b_ar, b_ai, a_br, a_bi)
        return al_r, al_i, t_r + b_br, t_i + b_bi

    @triton.jit
    def _bk_causal_scan_forward(v_ptr, r_ptr, g_ptr, N, R, z_re, z_im, BLOCK_N: tl.constexpr):
        row = tl.program_id(0)
        idx = tl.arange(0, BLOCK_N)
        m = idx < N
        v = tl.load(v_ptr + idx * R + row, mask=m, other=0.0)
        one = tl.full((BLOCK_N,), 1.0, tl.float32)
        zero = tl.zeros((BLOCK_N,), tl.float32)
        c_re = v - 2.0 - z_re
        c_im = zero - z_im
        p = tl.associative_scan((c_re, c_im, -one, zero, one, zero, zero, zero), 0, _mobius_combine)
        p00r, p00i, p10r, p10i = p[0], p[1], p[4], p[5]
        r_re, r_im = _cmul(p00r, p00i, *_recip(p10r, p10i))  # r = P00 / P10
        g_re, g_im = _recip(r_re, r_im)
        _store_c(r_ptr, idx * R + row, r_re, r_im, m)
        _store_c(g_ptr, idx * R + row, g_re, g_im, m)

    @triton.jit
    def _bk_causal_scan_backward(gre_ptr, gim_ptr, r_ptr, out_ptr, N, R, BLOCK_N: tl.constexpr):
        # lam_j = q_j (lam_{j+1} - w_j): affine maps scanned from the end (positions read reversed)
        row = tl.program_id(0)
        idx = tl.arange(0, BLOCK_N)
        m = idx < N
        lin = (N - 1 - idx) * R + row
        w_re, w_im = _load_w(gre_ptr, gim_ptr, lin, m)
        q_re, q_im = _load_inv_sq(r_ptr, lin, m)
        b_re, b_im = _cmul(q_re, q_im, -w_re, -w_im)
        res = tl.associative_scan((q_re, q_im, b_re, b_im), 0, _affine_combine)
        tl.store(out_ptr + lin, res[2], mask=m)



def _grid(R: int) -> tuple[int]:
    return (triton.cdiv(R, BLOCK),)


SCAN_MAX_N = 4096  # longer rows use the sequential kernels (a row must fit in registers)


def _scan_warps(N: int) -> int:
    return 4 if N <= 1024 else 8


def forward_triton(v_nr: torch.Tensor, z: complex, causal: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Same contract as :func:`core.forward_torch` (float32 ``v[N, R]``)."""
    N, R = v_nr.shape
    v_nr = v_nr.contiguous()
    r = torch.empty((N, R), dtype=torch.complex64, device=v_nr.device)
    G = torch.empty_like(r)
    if causal and N <= SCAN_MAX_N:
        _bk_causal_scan_forward[(R,)](v_nr, torch.view_as_real(r), torch.view_as_real(G), N, R, float(z.real), float(z.imag),
                                      BLOCK_N=triton.next_power_of_2(N), num_warps=_scan_warps(N))
        return G, r, None
    s = None if causal else torch.empty_like(r)
    rv, gv = torch.view_as_real(r), torch.view_as_real(G)
    sv = rv if s is None else torch.view_as_real(s)  # unused in causal mode
    _bk_forward_kernel[_grid(R)](v_nr, rv, sv, gv, N, R, float(z.real), float(z.imag), CAUSAL=causal, BLOCK=BLOCK, num_warps=1)
    return G, r, s


def backward_triton(g_re: torch.Tensor, g_im: torch.Tensor, G: torch.Tensor, r: torch.Tensor, s: torch.Tensor | None) -> torch.Tensor:
    """Same contract as :func:`core.backward_torch` with ``w = g_re - i g_im``."""
    N, R = g_re.shape
    out = torch.empty((N, R), dtype=torch.float32, device=g_re.device)
    causal = s is None
    if causal and N <= SCAN_MAX_N:
        _bk_causal_scan_backward[(R,)](g_re.contiguous(), g_im.contiguous(), torch.view_as_real(r), out, N, R,
                                       BLOCK_N=triton.next_power_of_2(N), num_warps=_scan_warps(N))
        return out
    a = torch.empty((1, 1, 2) if causal else (N, R, 2), dtype=torch.float32, device=g_re.device)
    rv = torch.view_as_real(r)
    sv = rv if causal else torch.view_as_real(s)
    _bk_backward_kernel[_grid(R)](g_re.contiguous(), g_im.contiguous(), torch.view_as_real(G), rv, sv, a, out, N, R,
                                  CAUSAL=causal, BLOCK=BLOCK, num_warps=1)
    return out
