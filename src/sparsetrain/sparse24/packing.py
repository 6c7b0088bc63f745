"""Transposable 2:4 selection and cuSPARSELt packing in one pass.

The FFN's 2:4 operand ``s = S(relu(u)^2)`` [tokens, hidden] is needed packed
twice: as ``s`` (2:4 along hidden) for ``y = s W_down^T`` and as ``s^T`` (2:4
along tokens) for ``dW_down = dy^T s``; the backward needs ``du`` and ``du^T``
with the same support. :func:`pack_transposable` reads ``u`` once, picks each
aligned 4x4 tile's pattern, and writes both packed operands, ready for
``torch._cslt_sparse_mm``: no dense ``s``, no bitmask, no separate compression.

**The pattern.** A transposable 2:4 pattern keeps exactly two entries in each
row and each column of a 4x4 tile; there are 90 such patterns
(:data:`TRANSPOSABLE_PATTERNS`). The tile keeps the one with the largest sum
of scores, ties to the first in that list. Sums are formed in float32 in one
fixed order (row-pair sums, then rows 0+1, +2, +3), in the kernel and in
:func:`transposable_mask` alike, so both choose the same pattern bit for bit.

**The packed layout** (cuSPARSELt 0.8, bf16/fp16, row-major ``[M, K]``, as
``torch._cslt_compress`` writes it): the ``M*K/2`` kept values, row-major,
then one 4-bit code ``i0 | i1 << 2`` per group of four (its kept indices,
``i0 < i1``). The codes come in tiles of 64 rows x 8 groups, tiles in
row-major order; inside a tile the nibble index has, lowest bit first, the
bits ``r3 g2 g0 g1 r0 r1 r2 r4 r5`` of the row ``r`` and group ``g``
(decoded by bench/cusparselt_layout_probe.py + cusparselt_layout_decode.py;
``tests/test_sparse24_packing.py`` checks :func:`pack_24_reference` against
``_cslt_compress``'s own output on random inputs, saved from the GPU).
torch's ``_sparse_semi_structured_tile`` orders the codes differently, which
is why its packing multiplies wrongly on this cuSPARSELt.
"""

from __future__ import annotations

import functools
import itertools

import torch

from ..triton_util import interpreting

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None

PAIRS = tuple(itertools.combinations(range(4), 2))  # the 6 ways to keep 2 of 4, (0,1) ... (2,3)


def _enumerate_patterns() -> tuple[tuple[int, int, int, int], ...]:
    """The 90 transposable 4x4 patterns as one pair index per row, in the order
    the kernel visits them (rows 0, 1, 2 ascending; row 3 is then forced)."""
    out = []
    for p0, p1, p2 in itertools.product(range(6), repeat=3):
        used = [0] * 4
        for p in (p0, p1, p2):
            for c in PAIRS[p]:
                used[c] += 1
        rest = tuple(c for c in range(4) if used[c] == 1)
        if max(used) <= 2 and len(rest) == 2 and sum(used) == 6:
            out.append((p0, p1, p2, PAIRS.index(rest)))
    return tuple(out)


TRANSPOSABLE_PATTERNS = _enumerate_patterns()
assert len(TRANSPOSABLE_PATTERNS) == 90


def _pattern_mask(pattern: tuple[int, ...]) -> list[list[bool]]:
    return [[c in PAIRS[p] for c in range(4)] for p in pattern]


@functools.cache
def _pattern_table(device: torch.device) -> torch.Tensor:
    """int32 [90, 2]: per pattern, the 4-bit codes of its rows (row r at bits
    4r..4r+3) and of its columns (the kept rows of column c, likewise)."""
    rows = []
    for pat in TRANSPOSABLE_PATTERNS:
        m = _pattern_mask(pat)
        codes_r = codes_c = 0
        for r in range(4):
            i0, i1 = (c for c in range(4) if m[r][c])
            codes_r |= (i0 | i1 << 2) << 4 * r
        for c in range(4):
            i0, i1 = (r for r in range(4) if m[r][c])
            codes_c |= (i0 | i1 << 2) << 4 * c
        rows.append((codes_r, codes_c))
    return torch.tensor(rows, dtype=torch.int32, device=device)


# ----------------------------------------------------------------------------- torch reference


def transposable_mask(scores: torch.Tensor) -> torch.Tensor:
    """Bool mask [R, C] (R, C multiples of 4): per aligned 4x4 tile, the
    transposable pattern with the largest float32 sum of ``scores``."""
    R, C = scores.shape
    if R % 4 or C % 4:
        raise ValueError(f"transposable 2:4 needs both sizes to be multiples of 4, got {tuple(scores.shape)}")
    t = scores.float().reshape(R // 4, 4, C // 4, 4).permute(0, 2, 1, 3).reshape(-1, 4, 4)  # [T, row, col]
    pair = torch.stack([t[:, :, a] + t[:, :, b] for a, b in PAIRS], -1)  # [T, row, pair]
    best = torch.full(t.shape[:1], -float("inf"), device=t.device)
    best_id = torch.zeros(t.shape[:1], dtype=torch.long, device=t.device)
    for i, (p0, p1, p2, p3) in enumerate(TRANSPOSABLE_PATTERNS):  # the kernel's order and additions
        s = ((pair[:, 0, p0] + pair[:, 1, p1]) + pair[:, 2, p2]) + pair[:, 3, p3]
        better = s > best
        best = torch.where(better, s, best)
        best_id = torch.where(better, i, best_id)
    masks = torch.tensor([_pattern_mask(p) for p in TRANSPOSABLE_PATTERNS], dtype=torch.bool, device=t.device)
    keep = masks[best_id]  # [T, 4, 4]
    return keep.reshape(R // 4, C // 4, 4, 4).permute(0, 2, 1, 3).reshape(R, C)


def _nibble_index(M: int, G: int, device: torch.device) -> torch.Tensor:
    """[M, G] position of each group's code among the metadata nibbles."""
    r = torch.arange(M, device=device).view(M, 1)
    g = torch.arange(G, device=device).view(1, G)

    def bit(t: torch.Tensor, k: int) -> torch.Tensor:
        return (t >> k) & 1

    within = (bit(r, 3) | bit(g, 2) << 1 | bit(g, 0) << 2 | bit(g, 1) << 3 | bit(r, 0) << 4 | bit(r, 1) << 5
              | bit(r, 2) << 6 | bit(r, 4) << 7 | bit(r, 5) << 8)
    return ((r // 64) * (G // 8) + g // 8) * 512 + within


def pack_24_reference(dense: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """cuSPARSELt's packing of ``dense`` [M, K] (bf16/fp16) keeping ``mask``
    (exactly two per group of four), as ``[M, K/2 + K/16]`` like ``_cslt_compress``.
    Needs M % 64 == 0 and K % 32 == 0."""
    M, K = dense.shape
    if M % 64 or K % 32:
        raise ValueError(f"cuSPARSELt packing needs rows % 64 == 0 and columns % 32 == 0, got {tuple(dense.shape)}")
    G = K // 4
    m = mask.reshape(M, G, 4)
    if not bool((m.sum(-1) == 2).all()):
        raise ValueError("the mask must keep exactly two values in every group of four")
    vals = dense[mask].reshape(M, K // 2)
    ar = torch.arange(4, device=dense.device)
    i0 = torch.where(m, ar, 4).amin(-1)
    i1 = torch.where(m, ar, -1).amax(-1)
    nib = torch.zeros(M * G, dtype=torch.int32, device=dense.device)
    nib[_nibble_index(M, G, dense.device).flatten()] = (i0 | i1 << 2).flatten().to(torch.int32)
    meta = (nib[0::2] | nib[1::2] << 4).to(torch.uint8)
    return torch.cat([vals.flatten().view(torch.uint8), meta]).view(dense.dtype).view(M, K // 2 + K // 16)


def _activation(u: torch.Tensor, ds: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(scores, values) as the kernel forms them: ``a = relu(u)^2`` rounded to
    u's dtype; values ``a`` (forward) or ``ds * 2 relu(u)`` (backward), rounded."""
    a = torch.relu(u.float()).square().to(u.dtype)
    if ds is None:
        return a, a
    return a, (ds.float() * (2.0 * torch.relu(u.float()))).to(u.dtype)


def pack_transposable_reference(u: torch.Tensor, ds: torch.Tensor | None = None
                                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Plain-torch :func:`pack_transposable`: ``(packed, packed_t, mask)``."""
    scores, vals = _activation(u, ds)
    mask = transposable_mask(scores)
    return pack_24_reference(vals, mask), pack_24_reference(vals.t().contiguous(), mask.t().contiguous()), mask


# ----------------------------------------------------------------------------- Triton kernel


def triton_ok(u: torch.Tensor) -> bool:
    """Can :func:`pack_transposable` run the Triton kernel on ``u``?"""
    return triton is not None and (u.is_cuda or interpreting()) and u.dtype == torch.bfloat16


# 64 x 64 blocks of u per program, and warps: set from bench/sparse24_ffn.py's sweep
KERNEL_CONFIG = {"blocks": 1, "num_warps": 4}


def pack_transposable(u: torch.Tensor, ds: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Pack ``S(relu(u)^2)`` (or, given ``ds``, ``S(ds * 2 relu(u))`` on the
    pattern chosen from ``u``) and its transpose for cuSPARSELt, in one pass.

    ``u``, ``ds``: [M, K], M and K multiples of 64; the kernel takes bf16, other
    dtypes run the reference. Returns
    ``(packed [M, K/2 + K/16], packed_t [K, M/2 + M/16])``, equal bit for bit
    to :func:`pack_transposable_reference` (which runs where Triton cannot).
    """
    _check_shapes("pack_transposable", u, ds)
    if not triton_ok(u):
        packed, packed_t, _ = pack_transposable_reference(u, ds)
        return packed, packed_t
    M, K = u.shape
    packed = torch.empty(M, K // 2 + K // 16, dtype=u.dtype, device=u.device)
    packed_t = torch.empty(K, M // 2 + M // 16, dtype=u.dtype, device=u.device)
    _launch(u, ds, packed.view(torch.int32), packed_t.view(torch.int32), dense=False)
    return packed, packed_t


def _check_shapes(name: str, u: torch.Tensor, ds: torch.Tensor | None) -> None:
    if u.shape[0] % 64 or u.shape[1] % 64:
        raise ValueError(f"{name} needs both sizes to be multiples of 64, got {tuple(u.shape)}")
    if ds is not None and ds.shape != u.shape:
        raise ValueError(f"ds shape {tuple(ds.shape)} does not match u {tuple(u.shape)}")


def _launch(u: torch.Tensor, ds: torch.Tensor | None, out: torch.Tensor, out_t: torch.Tensor, dense: bool) -> None:
    """Run the select+pack kernel over ``u`` (and ``ds``) into ``out``/``out_t``."""
    M, K = u.shape
    u = u.contiguous()
    ds_ = u if ds is None else ds.contiguous().to(u.dtype)
    nb = next(n for n in (KERNEL_CONFIG["blocks"], 2, 1) if (K // 64) % n == 0)
    _pack_transposable_kernel[(M // 64, K // (64 * nb))](u, ds_, out, out_t, _pattern_table(u.device), M, K,
                                                          HAS_DS=ds is not None, NB=nb, DENSE=dense,
                                                          num_warps=KERNEL_CONFIG["num_warps"])


def mask_transposable(u: torch.Tensor, ds: torch.Tensor | None = None) -> torch.Tensor:
    """The same selection as :func:`pack_transposable`, written densely: ``[M, K]``
    with the kept values of ``relu(u)^2`` (or of ``ds * 2 relu(u)``) and zeros.

    For the masked-dense path (dense GEMMs on the 2:4 activation) at widths where
    cuSPARSELt's products lose to cuBLAS's: one pass instead of the plain-torch
    pattern search. Equal bit for bit to the reference (``_activation`` values
    times :func:`transposable_mask` of the scores).
    """
    _check_shapes("mask_transposable", u, ds)
    if not triton_ok(u):
        scores, vals = _activation(u, ds)
        return vals * transposable_mask(scores)
    out = torch.empty_like(u, memory_format=torch.contiguous_format)
    _launch(u, ds, out.view(torch.int16), out, dense=True)  # out_t unused when dense
    return out


if triton is not None:

    @triton.jit
    def _pick(i, v0, v1, v2, v3):
        """``[v0, v1, v2, v3][i]`` elementwise."""
        return tl.where(i == 0, v0, tl.where(i == 1, v1, tl.where(i == 2, v2, v3)))

    @triton.jit
    def _pair_bits(i0, i1, v0, v1, v2, v3):
        """The kept values ``v[i0], v[i1]`` (bf16 bit patterns) as one int32, the first in the low half."""
        return _pick(i0, v0, v1, v2, v3) | (_pick(i1, v0, v1, v2, v3) << 16)

    @triton.jit
    def _bf16_bits(x):
        """float32 -> bf16 bit pattern (in an int32), rounded to nearest even. By
        hand because the Triton interpreter that runs the CPU tests truncates."""
        b = x.to(tl.int32, bitcast=True)
        return ((b + 0x7FFF + ((b >> 16) & 1)) >> 16) & 0xFFFF

    @triton.jit
    def _pair_sum(t0, t1, t2, t3, p: tl.constexpr):
        """Sum of the entries ``PAIRS[p]`` of ``(t0, t1, t2, t3)``."""
        if p == 0:
            r = t0 + t1
        elif p == 1:
            r = t0 + t2
        elif p == 2:
            r = t0 + t3
        elif p == 3:
            r = t1 + t2
        elif p == 4:
            r = t1 + t3
        else:
            r = t2 + t3
        return r

    @triton.jit
    def _entry(u_ptr, ds_ptr, off, HAS_DS: tl.constexpr):
        """(score, value bits) of one tile entry: ``a = bf16(relu(u)^2)`` as float32,
        and the bf16 bits of ``a`` or of ``ds * 2 relu(u)``."""
        u = tl.load(u_ptr + off).to(tl.float32)
        r = tl.maximum(u, 0.0)
        a = _bf16_bits(r * r)
        if HAS_DS:
            v = _bf16_bits(tl.load(ds_ptr + off).to(tl.float32) * (2.0 * r))
        else:
            v = a
        return (a << 16).to(tl.float32, bitcast=True), v

    @triton.jit
    def _store_row(out_ptr, code, v0, v1, v2, v3, val_idx, meta_base, widx, shift, AXIS: tl.constexpr):
        """One tile row's two kept values (at ``val_idx``), and the metadata words
        that gather the 8 nibble slots along ``AXIS`` (word indices ``widx``)."""
        i0 = code & 3
        i1 = code >> 2
        tl.store(out_ptr + val_idx, _pair_bits(i0, i1, v0, v1, v2, v3))
        tl.store(out_ptr + meta_base + widx, tl.sum(code << shift, axis=AXIS))

    @triton.jit
    def _store_dense_row(out_ptr, code, v0, v1, v2, v3, off):
        """One tile row, densely: the two kept values (``code``'s indices) and zeros."""
        i0 = code & 3
        i1 = code >> 2
        tl.store(out_ptr + off, tl.where((i0 == 0) | (i1 == 0), v0, 0).to(tl.int16))
        tl.store(out_ptr + off + 1, tl.where((i0 == 1) | (i1 == 1), v1, 0).to(tl.int16))
        tl.store(out_ptr + off + 2, tl.where((i0 == 2) | (i1 == 2), v2, 0).to(tl.int16))
        tl.store(out_ptr + off + 3, tl.where((i0 == 3) | (i1 == 3), v3, 0).to(tl.int16))

    @triton.jit
    def _pack_transposable_kernel(u_ptr, ds_ptr, out_ptr, out_t_ptr, table_ptr, M, K,
                                  HAS_DS: tl.constexpr, NB: tl.constexpr, DENSE: tl.constexpr):
        # DENSE: write the masked values densely ([M, K] bf16 bits through an
        # int16 view at out_ptr) instead of the two packed layouts
        # One program: 64 rows x (64 * NB) columns of u, i.e. 16 x (16 * NB) tiles of
        # 4x4, indexed [X, J, JT]: J = (row bit 3, col bit 4, col bit 2) is the
        # nibble slot of a tile's codes in s's metadata words, JT = (col bit 3, row
        # bit 4, row bit 2) their slot in s^T's, X = (row bit 5, col bit 5, block).
        X: tl.constexpr = 4 * NB
        x = tl.arange(0, X)[:, None, None]
        j = tl.arange(0, 8)[None, :, None]
        jt = tl.arange(0, 8)[None, None, :]
        r2, r3, r4, r5 = (jt >> 2) & 1, j & 1, (jt >> 1) & 1, x & 1
        c2, c3, c4, c5, cb = (j >> 2) & 1, jt & 1, (j >> 1) & 1, (x >> 1) & 1, x >> 2
        pid_r = tl.program_id(0)
        pid_c = tl.program_id(1)
        row = pid_r * 64 + 4 * (r2 + 2 * r3 + 4 * r4 + 8 * r5)  # the tile's first row of u
        col = pid_c * 64 * NB + 64 * cb + 4 * (c2 + 2 * c3 + 4 * c4 + 8 * c5)  # and first column
        base = row.to(tl.int64) * K + col

        a0, v0 = _entry(u_ptr, ds_ptr, base, HAS_DS)
        a1, v1 = _entry(u_ptr, ds_ptr, base + 1, HAS_DS)
        a2, v2 = _entry(u_ptr, ds_ptr, base + 2, HAS_DS)
        a3, v3 = _entry(u_ptr, ds_ptr, base + 3, HAS_DS)
        a4, v4 = _entry(u_ptr, ds_ptr, base + K, HAS_DS)
        a5, v5 = _entry(u_ptr, ds_ptr, base + K + 1, HAS_DS)
        a6, v6 = _entry(u_ptr, ds_ptr, base + K + 2, HAS_DS)
        a7, v7 = _entry(u_ptr, ds_ptr, base + K + 3, HAS_DS)
        a8, v8 = _entry(u_ptr, ds_ptr, base + 2 * K, HAS_DS)
        a9, v9 = _entry(u_ptr, ds_ptr, base + 2 * K + 1, HAS_DS)
        a10, v10 = _entry(u_ptr, ds_ptr, base + 2 * K + 2, HAS_DS)
        a11, v11 = _entry(u_ptr, ds_ptr, base + 2 * K + 3, HAS_DS)
        a12, v12 = _entry(u_ptr, ds_ptr, base + 3 * K, HAS_DS)
        a13, v13 = _entry(u_ptr, ds_ptr, base + 3 * K + 1, HAS_DS)
        a14, v14 = _entry(u_ptr, ds_ptr, base + 3 * K + 2, HAS_DS)
        a15, v15 = _entry(u_ptr, ds_ptr, base + 3 * K + 3, HAS_DS)

        # the best of the 90 patterns, visited in TRANSPOSABLE_PATTERNS' order: rows
        # 0..2 take any pair, row 3 the two columns then used once (else no pattern)
        best = tl.full([X, 8, 8], -float("inf"), tl.float32)
        best_id = tl.zeros([X, 8, 8], tl.int32)
        pid = 0
        for p0 in tl.static_range(6):
            s0 = _pair_sum(a0, a1, a2, a3, p0)
            for p1 in tl.static_range(6):
                s01 = s0 + _pair_sum(a4, a5, a6, a7, p1)
                for p2 in tl.static_range(6):
                    # how often each column is used, as 2-bit fields (pair p = (a, b) with
                    # a = p//3 + p//5 and b = p + 1 - 2(p//3) - p//5)
                    used = ((1 << 2 * (p0 // 3 + p0 // 5)) + (1 << 2 * (p0 + 1 - 2 * (p0 // 3) - p0 // 5))
                            + (1 << 2 * (p1 // 3 + p1 // 5)) + (1 << 2 * (p1 + 1 - 2 * (p1 // 3) - p1 // 5))
                            + (1 << 2 * (p2 // 3 + p2 // 5)) + (1 << 2 * (p2 + 1 - 2 * (p2 // 3) - p2 // 5)))
                    n0 = used & 3
                    n1 = (used >> 2) & 3
                    n2 = (used >> 4) & 3
                    n3 = (used >> 6) & 3
                    # valid: no column used 3 times and exactly two used once
                    if n0 // 3 + n1 // 3 + n2 // 3 + n3 // 3 == 0:
                        if (n0 & 1) + (n1 & 1) + (n2 & 1) + (n3 & 1) == 2:
                            q0 = (1 - (n0 & 1)) * (2 - (n1 & 1))  # first column used once
                            q1 = 3 - (1 - (n3 & 1)) * (2 - (n2 & 1))  # last one
                            p3 = q0 * (7 - q0) // 2 + q1 - q0 - 1  # the index of (q0, q1) in PAIRS
                            s = (s01 + _pair_sum(a8, a9, a10, a11, p2)) + _pair_sum(a12, a13, a14, a15, p3)
                            better = s > best
                            best = tl.where(better, s, best)
                            best_id = tl.where(better, pid, best_id)
                            pid += 1

        codes_r = tl.load(table_ptr + 2 * best_id)  # 4-bit codes of the pattern's rows
        if DENSE:
            drow = row.to(tl.int64) * K + col
            _store_dense_row(out_ptr, codes_r & 15, v0, v1, v2, v3, drow)
            _store_dense_row(out_ptr, (codes_r >> 4) & 15, v4, v5, v6, v7, drow + K)
            _store_dense_row(out_ptr, (codes_r >> 8) & 15, v8, v9, v10, v11, drow + 2 * K)
            _store_dense_row(out_ptr, (codes_r >> 12) & 15, v12, v13, v14, v15, drow + 3 * K)
            return
        codes_c = tl.load(table_ptr + 2 * best_id + 1)  # and of its columns
        G4 = K // 4  # int32 words per row of s's values
        GT4 = M // 4  # and of s^T's
        # metadata words: s's indexed by (x, JT), s^T's by (x, J)
        x2 = tl.arange(0, X)[:, None]
        k2 = tl.arange(0, 8)[None, :]
        tile_s = pid_r * (K // 32) + pid_c * 2 * NB + 2 * (x2 >> 2) + ((x2 >> 1) & 1)
        widx_s = tile_s * 64 + (k2 & 1) + 8 * ((k2 >> 2) & 1) + 16 * ((k2 >> 1) & 1) + 32 * (x2 & 1)
        tile_t = (pid_c * NB + (x2 >> 2)) * (M // 32) + pid_r * 2 + (x2 & 1)
        widx_t = tile_t * 64 + (k2 & 1) + 8 * ((k2 >> 2) & 1) + 16 * ((k2 >> 1) & 1) + 32 * ((x2 >> 1) & 1)
        meta_s = M.to(tl.int64) * G4
        meta_t = K.to(tl.int64) * GT4
        # tile row q -> s row `row + q`; tile column q -> s^T row `col + q`; q's bits
        # are bits 1 and 2 of the word index in both
        _store_row(out_ptr, codes_r & 15, v0, v1, v2, v3, row.to(tl.int64) * G4 + col // 4, meta_s, widx_s, 4 * j, 1)
        _store_row(out_ptr, (codes_r >> 4) & 15, v4, v5, v6, v7, (row + 1).to(tl.int64) * G4 + col // 4, meta_s,
                   widx_s + 2, 4 * j, 1)
        _store_row(out_ptr, (codes_r >> 8) & 15, v8, v9, v10, v11, (row + 2).to(tl.int64) * G4 + col // 4, meta_s,
                   widx_s + 4, 4 * j, 1)
        _store_row(out_ptr, (codes_r >> 12) & 15, v12, v13, v14, v15, (row + 3).to(tl.int64) * G4 + col // 4, meta_s,
                   widx_s + 6, 4 * j, 1)
        _store_row(out_t_ptr, codes_c & 15, v0, v4, v8, v12, col.to(tl.int64) * GT4 + row // 4, meta_t, widx_t,
                   4 * jt, 2)
        _store_row(out_t_ptr, (codes_c >> 4) & 15, v1, v5, v9, v13, (col + 1).to(tl.int64) * GT4 + row // 4, meta_t,
                   widx_t + 2, 4 * jt, 2)
        _store_row(out_t_ptr, (codes_c >> 8) & 15, v2, v6, v10, v14, (col + 2).to(tl.int64) * GT4 + row // 4, meta_t,
                   widx_t + 4, 4 * jt, 2)
        _store_row(out_t_ptr, (codes_c >> 12) & 15, v3, v7, v11, v15, (col + 3).to(tl.int64) * GT4 + row // 4, meta_t,
                   widx_t + 6, 4 * jt, 2)
