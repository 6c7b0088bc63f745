"""Transposable 2:4 selection and cuSPARSELt packing in one pass.

The FFN's 2:4 operand ``s = S(relu(u)^2)`` [tokens, hidden] is needed packed
twice: as ``s`` (2:4 along hidden) for ``y = s W_down^T`` and as ``s^T`` (2:4
along tokens) for ``dW_down = dy^T s``; the backward needs ``du`` and ``du^T``
with the same support. :func:`pack_transposable` reads ``u`` once, picks each
aligned 4x4 tile's pattern, and writes both packed operands, ready for
``torch._cslt_sparse_mm``: no dense ``s``, no bitmask, no separate compression.
It also returns each tile's pattern id (one byte); given those back, the
backward's call packs ``du`` without searching again.

**The pattern.** A transposable 2:4 pattern keeps exactly two entries in each
row and each column of a 4x4 tile; there are 90 such patterns
(:data:`TRANSPOSABLE_PATTERNS`). The tile keeps the one with the largest sum
of scores. The search goes by the 19 :data:`PATTERN_GROUPS` (a group fixes
how often rows 0-1 use each column, so its best pattern is its best pair of
top rows plus its best pair of bottom rows), with float32 sums in one fixed
order (row-pair sums; top = row 0 + row 1, bottom = row 2 + row 3; top +
bottom) and ties to the first candidate, then the first group, in the kernel
and in :func:`transposable_pattern` alike, so both choose the same pattern
bit for bit.

**The packed layout** (cuSPARSELt 0.8, bf16/fp16, row-major ``[M, K]``, as
``torch._cslt_compress`` writes it): the ``M*K/2`` kept values, row-major,
then one 4-bit code ``i0 | i1 << 2`` per group of four (its kept indices,
``i0 < i1``). The codes come in tiles of 64 rows x 8 groups, tiles in
row-major order; inside a tile the nibble index has, lowest bit first, the
bits ``r3 g2 g0 g1 r0 r1 r2 r4 r5`` of the row ``r`` and group ``g``
(decoded from ``_cslt_compress`` dumps of crafted and random matrices;
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

    from ..triton_util import bf16_bits_rne
except ImportError:  # pragma: no cover - depends on the install
    triton = None

PAIRS = tuple(itertools.combinations(range(4), 2))  # the 6 ways to keep 2 of 4, (0,1) ... (2,3)


def _pair_index(x: int, y: int) -> int:
    """Index in :data:`PAIRS` of the pair ``{x, y}`` (the kernel's formula)."""
    return x + y - 1 + (x * y + 6) // 8


def _pattern_groups() -> tuple[tuple[tuple[tuple[int, int], ...], tuple[tuple[int, int], ...]], ...]:
    """The 90 transposable patterns as 19 groups, in the kernel's order. A group
    fixes how often each column is used by rows 0-1 (then rows 2-3 use each
    column the rest of two times); it lists its candidate row pairs for rows
    0-1 ``(p0, p1)`` and for rows 2-3 ``(p2, p3)``, and every top with every
    bottom is one pattern. So the best pattern is the best top plus the best
    bottom of some group: 19 sums to compare instead of 90.

    * 6 groups: both top rows keep the same pair ``P``, the bottom rows ``5 - P``;
    * 12 groups (two per pair ``{a, b}``): columns ``a`` and ``b`` are used once
      above and once below, column ``d`` twice above and ``z`` twice below;
    * 1 group: the top rows keep complementary pairs, and so do the bottom ones.
    """
    groups = [(((p, p),), ((5 - p, 5 - p),)) for p in range(6)]
    for s in range(6):
        a, b = PAIRS[s]
        for d, z in (PAIRS[5 - s], PAIRS[5 - s][::-1]):
            da, db, za, zb = _pair_index(d, a), _pair_index(d, b), _pair_index(z, a), _pair_index(z, b)
            groups.append((((da, db), (db, da)), ((za, zb), (zb, za))))
    groups.append((tuple((p, 5 - p) for p in range(6)), tuple((p, 5 - p) for p in range(6))))
    return tuple(groups)


PATTERN_GROUPS = _pattern_groups()
# pattern id = the group's first id + top index * len(bottoms) + bottom index
TRANSPOSABLE_PATTERNS = tuple(top + bottom for tops, bottoms in PATTERN_GROUPS for top in tops for bottom in bottoms)
assert len(TRANSPOSABLE_PATTERNS) == 90 and all(_pair_index(*PAIRS[p]) == p for p in range(6))


def _pattern_mask(pattern: tuple[int, ...]) -> list[list[bool]]:
    return [[c in PAIRS[p] for c in range(4)] for p in pattern]


@functools.cache
def pattern_table(device: torch.device) -> torch.Tensor:
    """int32 [90, 2]: per pattern, the 4-bit codes of its rows (row r at bits
    4r..4r+3) and of its columns (the kept rows of column c, likewise); the
    kernel's lookup table, made once per device and kept. Made first inside a
    CUDA-graph warm-up, it would sit in the graphs' memory pool untracked, which
    cudagraph trees refuse; :func:`~sparsetrain.sparse24.ffn.prepare_ffns` makes it before."""
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


def transposable_pattern(scores: torch.Tensor) -> torch.Tensor:
    """uint8 ``[R/4, C/4]`` (R, C multiples of 4): per aligned 4x4 tile, the index in
    :data:`TRANSPOSABLE_PATTERNS` of the pattern with the largest float32 sum of
    ``scores``, found as in the kernel (:data:`PATTERN_GROUPS`: the best top
    plus the best bottom of each group, first wins ties)."""
    R, C = scores.shape
    if R % 4 or C % 4:
        raise ValueError(f"transposable 2:4 needs both sizes to be multiples of 4, got {tuple(scores.shape)}")
    t = scores.float().reshape(R // 4, 4, C // 4, 4).permute(0, 2, 1, 3).reshape(-1, 4, 4)  # [T, row, col]
    pair = [[t[:, q, a] + t[:, q, b] for a, b in PAIRS] for q in range(4)]  # [row][pair] -> [T]

    def best_of(rows: tuple[int, int], cands: tuple[tuple[int, int], ...]) -> tuple[torch.Tensor, torch.Tensor]:
        best, best_i = pair[rows[0]][cands[0][0]] + pair[rows[1]][cands[0][1]], torch.zeros_like(t[:, 0, 0], dtype=torch.long)
        for i, (p, q) in enumerate(cands[1:], 1):  # first wins ties, as in the kernel
            s = pair[rows[0]][p] + pair[rows[1]][q]
            best_i = torch.where(s > best, i, best_i)
            best = torch.maximum(s, best)
        return best, best_i

    best = torch.full(t.shape[:1], -float("inf"), device=t.device)
    best_id = torch.zeros(t.shape[:1], dtype=torch.long, device=t.device)
    first = 0
    for tops, bottoms in PATTERN_GROUPS:  # the kernel's order and additions
        top, top_i = best_of((0, 1), tops)
        bottom, bottom_i = best_of((2, 3), bottoms)
        s = top + bottom
        better = s > best
        best = torch.where(better, s, best)
        best_id = torch.where(better, first + top_i * len(bottoms) + bottom_i, best_id)
        first += len(tops) * len(bottoms)
    return best_id.to(torch.uint8).reshape(R // 4, C // 4)


def pattern_mask(pattern: torch.Tensor) -> torch.Tensor:
    """Bool mask ``[4 R', 4 C']`` of the pattern ids ``[R', C']`` (one per 4x4 tile)."""
    Rt, Ct = pattern.shape
    masks = torch.tensor([_pattern_mask(p) for p in TRANSPOSABLE_PATTERNS], dtype=torch.bool, device=pattern.device)
    return masks[pattern.long()].permute(0, 2, 1, 3).reshape(4 * Rt, 4 * Ct)  # [R', C', 4, 4] -> rows, cols


def transposable_mask(scores: torch.Tensor) -> torch.Tensor:
    """Bool mask [R, C] (R, C multiples of 4): per aligned 4x4 tile, the
    transposable pattern with the largest float32 sum of ``scores``
    (:func:`transposable_pattern`)."""
    return pattern_mask(transposable_pattern(scores))


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


def pack_transposable_reference(u: torch.Tensor, ds: torch.Tensor | None = None, pattern: torch.Tensor | None = None
                                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Plain-torch :func:`pack_transposable`: ``(packed, packed_t, pattern)``."""
    scores, vals = _activation(u, ds)
    if pattern is None:
        pattern = transposable_pattern(scores)
    mask = pattern_mask(pattern)
    return pack_24_reference(vals, mask), pack_24_reference(vals.t().contiguous(), mask.t().contiguous()), pattern


# ----------------------------------------------------------------------------- Triton kernel


def triton_ok(u: torch.Tensor) -> bool:
    """Can :func:`pack_transposable` run the Triton kernel on ``u``?"""
    return triton is not None and (u.is_cuda or interpreting()) and u.dtype == torch.bfloat16


# launch options (one program per 64 x 64 block of u), the best of a sweep of warps and
# register caps (bench/results/sparse24_packing_maxnreg_h200.json): 4 warps, registers capped
# at 96 per thread. Uncapped, the searching forward takes more registers than that, which
# leaves room for fewer programs per SM.
KERNEL_CONFIG: dict[str, int] = {"num_warps": 4, "maxnreg": 96}


def pack_transposable(u: torch.Tensor, ds: torch.Tensor | None = None, pattern: torch.Tensor | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pack ``S(relu(u)^2)`` (or, given ``ds``, ``S(ds * 2 relu(u))`` on the
    pattern chosen from ``u``) and its transpose for cuSPARSELt, in one pass.

    ``u``, ``ds``: [M, K], M and K multiples of 64; the kernel takes bf16, other
    dtypes run the reference. ``pattern``: the tiles' pattern ids as a forward
    call returned them; given, the kernel skips the search (the backward's
    ``du`` has the forward's pattern by definition). Returns ``(packed [M, K/2 +
    K/16], packed_t [K, M/2 + M/16], pattern [M/4, K/4] uint8)``, equal bit for
    bit to :func:`pack_transposable_reference` (which runs where Triton cannot).
    """
    _check_shapes("pack_transposable", u, ds, pattern)
    if not triton_ok(u):
        return pack_transposable_reference(u, ds, pattern)
    M, K = u.shape
    packed = torch.empty(M, K // 2 + K // 16, dtype=u.dtype, device=u.device)
    packed_t = torch.empty(K, M // 2 + M // 16, dtype=u.dtype, device=u.device)
    pattern = _launch(u, ds, pattern, packed.view(torch.int32), packed_t.view(torch.int32), dense=False)
    return packed, packed_t, pattern


def _check_shapes(name: str, u: torch.Tensor, ds: torch.Tensor | None, pattern: torch.Tensor | None) -> None:
    if u.shape[0] % 64 or u.shape[1] % 64:
        raise ValueError(f"{name} needs both sizes to be multiples of 64, got {tuple(u.shape)}")
    if ds is not None and ds.shape != u.shape:
        raise ValueError(f"ds shape {tuple(ds.shape)} does not match u {tuple(u.shape)}")
    if pattern is not None and (pattern.shape != (u.shape[0] // 4, u.shape[1] // 4) or pattern.dtype != torch.uint8):
        raise ValueError(f"pattern must be uint8 of shape {(u.shape[0] // 4, u.shape[1] // 4)}, "
                         f"got {pattern.dtype} {tuple(pattern.shape)}")


def _launch(u: torch.Tensor, ds: torch.Tensor | None, pattern: torch.Tensor | None, out: torch.Tensor,
            out_t: torch.Tensor, dense: bool) -> torch.Tensor:
    """Run the select+pack kernel over ``u`` (and ``ds``) into ``out``/``out_t``;
    returns the pattern ids (``pattern`` if given, else the ones it chose)."""
    M, K = u.shape
    u = u.contiguous()
    ds_ = u if ds is None else ds.contiguous().to(u.dtype)
    use = pattern is not None
    ids = pattern.contiguous() if use else torch.empty(M // 4, K // 4, dtype=torch.uint8, device=u.device)
    _pack_transposable_kernel[(M // 64, K // 64)](u, ds_, ids, out, out_t, pattern_table(u.device), M, K,
                                                  HAS_DS=ds is not None, USE_PATTERN=use, DENSE=dense,
                                                  HW_ROUND=not interpreting(), **KERNEL_CONFIG)
    return ids


def mask_transposable(u: torch.Tensor, ds: torch.Tensor | None = None, pattern: torch.Tensor | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """The same selection as :func:`pack_transposable`, written densely:
    ``(values [M, K], pattern)``, the kept values of ``relu(u)^2`` (or of
    ``ds * 2 relu(u)``) and zeros, and the tiles' pattern ids (``pattern``:
    reuse these instead of searching).

    For the masked-dense path (dense GEMMs on the 2:4 activation) at widths where
    cuSPARSELt's products lose to cuBLAS's: one pass instead of the plain-torch
    pattern search. Equal bit for bit to the reference (``_activation`` values
    times :func:`pattern_mask` of :func:`transposable_pattern` of the scores).
    """
    _check_shapes("mask_transposable", u, ds, pattern)
    if not triton_ok(u):
        scores, vals = _activation(u, ds)
        if pattern is None:
            pattern = transposable_pattern(scores)
        return vals * pattern_mask(pattern), pattern
    out = torch.empty_like(u, memory_format=torch.contiguous_format)
    pattern = _launch(u, ds, pattern, out.view(torch.int16), out, dense=True)  # out_t unused when dense
    return out, pattern


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
    def _bf16_bits(x, HW_ROUND: tl.constexpr):
        """float32 -> bf16 bit pattern (in an int32), rounded to nearest even: one
        conversion on the GPU, by hand in the Triton interpreter (which truncates)."""
        if HW_ROUND:
            r = x.to(tl.bfloat16).to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
        else:
            r = bf16_bits_rne(x)
        return r

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
    def _split_rows(t):
        """``t[..., r1, r0]`` -> its four slices by tile row ``q = 2 r1 + r0``."""
        a, b = tl.split(t)
        q0, q2 = tl.split(a)
        q1, q3 = tl.split(b)
        return q0, q1, q2, q3

    @triton.jit
    def _join_rows(q0, q1, q2, q3):
        """The inverse of :func:`_split_rows`: four slices -> ``[..., r1, r0]``
        (``tl.join`` appends its axis last, so the inner joins pair over r1)."""
        return tl.join(tl.join(q0, q2), tl.join(q1, q3))

    @triton.jit
    def _store_words(ptr, w0, w1, w2, w3, row0, col0, stride, TRANSPOSED: tl.constexpr):
        """Write four ``[X, J, JT]`` int32 slices (one per tile row of s, or per
        tile column for s^T) as a ``[64, 16]`` block of words at ``ptr + (row0 + i)
        * stride + col0 + k``: joined, permuted back to row-major, stored coalesced."""
        w = tl.reshape(_join_rows(w0, w1, w2, w3), (2, 2, 2, 2, 2, 2, 2, 2, 2, 2))
        # axes (c5 r5 c2 c4 r3 r2 r4 c3, then the slice's two bits) -> (rows, words)
        if TRANSPOSED:
            w = tl.permute(w, (0, 3, 7, 2, 8, 9, 1, 6, 4, 5))  # (c5 .. c0), (r5 .. r2)
        else:
            w = tl.permute(w, (1, 6, 4, 5, 8, 9, 0, 3, 7, 2))  # (r5 .. r0), (c5 .. c2)
        w = tl.reshape(w, (64, 16))
        i = tl.arange(0, 64)[:, None]
        k = tl.arange(0, 16)[None, :]
        tl.store(ptr + (row0 + i).to(tl.int64) * stride + col0 + k, w)

    @triton.jit
    def _pack_transposable_kernel(u_ptr, ds_ptr, ids_ptr, out_ptr, out_t_ptr, table_ptr, M, K,
                                  HAS_DS: tl.constexpr, USE_PATTERN: tl.constexpr, DENSE: tl.constexpr,
                                  HW_ROUND: tl.constexpr):
        # DENSE: write the masked values densely ([M, K] bf16 bits through an
        # int16 view at out_ptr) instead of the two packed layouts. USE_PATTERN: read
        # each tile's pattern id from ids_ptr ([M/4, K/4] uint8) instead of
        # searching; else search and write it there.
        # One program: a 64 x 64 block of u, loaded and stored coalesced. Its 16 x 16
        # tiles of 4x4 are worked on as [X, J, JT]: J = (row bit 3, col bit 4, col
        # bit 2) is the nibble slot of a tile's codes in s's metadata words, JT =
        # (col bit 3, row bit 4, row bit 2) their slot in s^T's, X = (col bit 5, row
        # bit 5). The block's bits, most significant first, are (r5 .. r0, c5 .. c0);
        # the tile order (c5 r5 | c2 c4 r3 | r2 r4 c3) then (r1 r0 c1 c0) within a tile.
        pid_r = tl.program_id(0)
        pid_c = tl.program_id(1)
        i64 = tl.arange(0, 64)
        off = (pid_r * 64 + i64)[:, None].to(tl.int64) * K + (pid_c * 64 + i64)[None, :]
        u = tl.load(u_ptr + off).to(tl.float32)
        r = tl.maximum(u, 0.0)
        a = _bf16_bits(r * r, HW_ROUND)  # the score, bf16(relu(u)^2), in the high half; the value in the low half
        if HAS_DS:
            v = _bf16_bits(tl.load(ds_ptr + off).to(tl.float32) * (2.0 * r), HW_ROUND)
        else:
            v = a
        if USE_PATTERN:
            a = tl.zeros_like(a)  # no search, no scores
        w = tl.reshape(tl.permute(tl.reshape((a << 16) | v, (2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2)),
                                  (6, 0, 9, 7, 2, 3, 1, 8, 4, 5, 10, 11)),
                       (4, 8, 8, 2, 2, 2, 2))
        c0, c1 = tl.split(w)  # by tile column: c0 holds columns 0 and 2, c1 columns 1 and 3
        e0, e2 = tl.split(c0)
        e1, e3 = tl.split(c1)
        w0, w4, w8, w12 = _split_rows(e0)  # entry 4 q + c of the tile
        w1, w5, w9, w13 = _split_rows(e1)
        w2, w6, w10, w14 = _split_rows(e2)
        w3, w7, w11, w15 = _split_rows(e3)
        HI: tl.constexpr = -65536
        a0, a1, a2, a3 = (w0 & HI).to(tl.float32, bitcast=True), (w1 & HI).to(tl.float32, bitcast=True), \
            (w2 & HI).to(tl.float32, bitcast=True), (w3 & HI).to(tl.float32, bitcast=True)
        a4, a5, a6, a7 = (w4 & HI).to(tl.float32, bitcast=True), (w5 & HI).to(tl.float32, bitcast=True), \
            (w6 & HI).to(tl.float32, bitcast=True), (w7 & HI).to(tl.float32, bitcast=True)
        a8, a9, a10, a11 = (w8 & HI).to(tl.float32, bitcast=True), (w9 & HI).to(tl.float32, bitcast=True), \
            (w10 & HI).to(tl.float32, bitcast=True), (w11 & HI).to(tl.float32, bitcast=True)
        a12, a13, a14, a15 = (w12 & HI).to(tl.float32, bitcast=True), (w13 & HI).to(tl.float32, bitcast=True), \
            (w14 & HI).to(tl.float32, bitcast=True), (w15 & HI).to(tl.float32, bitcast=True)
        v0, v1, v2, v3 = w0 & 0xFFFF, w1 & 0xFFFF, w2 & 0xFFFF, w3 & 0xFFFF
        v4, v5, v6, v7 = w4 & 0xFFFF, w5 & 0xFFFF, w6 & 0xFFFF, w7 & 0xFFFF
        v8, v9, v10, v11 = w8 & 0xFFFF, w9 & 0xFFFF, w10 & 0xFFFF, w11 & 0xFFFF
        v12, v13, v14, v15 = w12 & 0xFFFF, w13 & 0xFFFF, w14 & 0xFFFF, w15 & 0xFFFF

        # each tile's [X, J, JT] position -> its index among the [M/4, K/4] tiles
        tx = tl.arange(0, 4)[:, None, None]
        tj = tl.arange(0, 8)[None, :, None]
        tjt = tl.arange(0, 8)[None, None, :]
        tile_row = pid_r * 16 + (tjt >> 2) + 2 * (tj & 1) + 4 * ((tjt >> 1) & 1) + 8 * (tx & 1)
        tile_col = pid_c * 16 + (tj >> 2) + 2 * (tjt & 1) + 4 * ((tj >> 1) & 1) + 8 * (tx >> 1)
        ids_off = tile_row.to(tl.int64) * (K // 4) + tile_col
        if USE_PATTERN:
            best_id = tl.load(ids_ptr + ids_off).to(tl.int32)
        else:
            # the best of the 90 patterns, group by group (PATTERN_GROUPS, same order and
            # additions): the best rows 0-1 plus the best rows 2-3 of each group
            best = tl.full([4, 8, 8], -float("inf"), tl.float32)
            best_id = tl.zeros([4, 8, 8], tl.int32)
            for p in tl.static_range(6):  # both top rows keep pair p, both bottom rows 5 - p
                s = (_pair_sum(a0, a1, a2, a3, p) + _pair_sum(a4, a5, a6, a7, p)) \
                    + (_pair_sum(a8, a9, a10, a11, 5 - p) + _pair_sum(a12, a13, a14, a15, 5 - p))
                better = s > best
                best = tl.where(better, s, best)
                best_id = tl.where(better, p, best_id)
            for sp in tl.static_range(6):  # columns (ca, cb) = PAIRS[sp] once above and below
                ca = sp // 3 + sp // 5
                cb = sp + 1 - 2 * (sp // 3) - sp // 5
                d0 = (5 - sp) // 3 + (5 - sp) // 5
                d1 = 6 - sp - 2 * ((5 - sp) // 3) - (5 - sp) // 5
                for o in tl.static_range(2):  # column d twice above, z twice below
                    d = d0 + o * (d1 - d0)
                    z = d1 - o * (d1 - d0)
                    da = d + ca - 1 + (d * ca + 6) // 8  # _pair_index
                    db = d + cb - 1 + (d * cb + 6) // 8
                    za = z + ca - 1 + (z * ca + 6) // 8
                    zb = z + cb - 1 + (z * cb + 6) // 8
                    t0 = _pair_sum(a0, a1, a2, a3, da) + _pair_sum(a4, a5, a6, a7, db)
                    t1 = _pair_sum(a0, a1, a2, a3, db) + _pair_sum(a4, a5, a6, a7, da)
                    b0 = _pair_sum(a8, a9, a10, a11, za) + _pair_sum(a12, a13, a14, a15, zb)
                    b1 = _pair_sum(a8, a9, a10, a11, zb) + _pair_sum(a12, a13, a14, a15, za)
                    s = tl.maximum(t0, t1) + tl.maximum(b0, b1)
                    better = s > best
                    best = tl.where(better, s, best)
                    best_id = tl.where(better, 6 + 4 * (2 * sp + o) + 2 * (t1 > t0).to(tl.int32) + (b1 > b0).to(tl.int32),
                                       best_id)
            top = _pair_sum(a0, a1, a2, a3, 0) + _pair_sum(a4, a5, a6, a7, 5)  # complementary pairs above and below
            bottom = _pair_sum(a8, a9, a10, a11, 0) + _pair_sum(a12, a13, a14, a15, 5)
            top_i = tl.zeros([4, 8, 8], tl.int32)
            bottom_i = tl.zeros([4, 8, 8], tl.int32)
            for p in tl.static_range(1, 6):
                t = _pair_sum(a0, a1, a2, a3, p) + _pair_sum(a4, a5, a6, a7, 5 - p)
                top_i = tl.where(t > top, p, top_i)
                top = tl.maximum(t, top)
                bt = _pair_sum(a8, a9, a10, a11, p) + _pair_sum(a12, a13, a14, a15, 5 - p)
                bottom_i = tl.where(bt > bottom, p, bottom_i)
                bottom = tl.maximum(bt, bottom)
            best_id = tl.where(top + bottom > best, 54 + 6 * top_i + bottom_i, best_id)
            tl.store(ids_ptr + ids_off, best_id.to(tl.uint8))
        codes_r = tl.load(table_ptr + 2 * best_id)  # 4-bit codes of the pattern's rows
        if DENSE:
            d = _join_rows(_join_rows(_kept_row(codes_r & 15, v0, v1, v2, v3, 0),
                                      _kept_row(codes_r & 15, v0, v1, v2, v3, 1),
                                      _kept_row(codes_r & 15, v0, v1, v2, v3, 2),
                                      _kept_row(codes_r & 15, v0, v1, v2, v3, 3)),
                           _join_rows(_kept_row((codes_r >> 4) & 15, v4, v5, v6, v7, 0),
                                      _kept_row((codes_r >> 4) & 15, v4, v5, v6, v7, 1),
                                      _kept_row((codes_r >> 4) & 15, v4, v5, v6, v7, 2),
                                      _kept_row((codes_r >> 4) & 15, v4, v5, v6, v7, 3)),
                           _join_rows(_kept_row((codes_r >> 8) & 15, v8, v9, v10, v11, 0),
                                      _kept_row((codes_r >> 8) & 15, v8, v9, v10, v11, 1),
                                      _kept_row((codes_r >> 8) & 15, v8, v9, v10, v11, 2),
                                      _kept_row((codes_r >> 8) & 15, v8, v9, v10, v11, 3)),
                           _join_rows(_kept_row(codes_r >> 12, v12, v13, v14, v15, 0),
                                      _kept_row(codes_r >> 12, v12, v13, v14, v15, 1),
                                      _kept_row(codes_r >> 12, v12, v13, v14, v15, 2),
                                      _kept_row(codes_r >> 12, v12, v13, v14, v15, 3)))
            # d is [X, J, JT, c1, c0, r1, r0]: each row joined over (c1, c0), then the rows
            d = tl.reshape(d, (2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2))
            d = tl.reshape(tl.permute(d, (1, 6, 4, 5, 10, 11, 0, 3, 7, 2, 8, 9)), (64, 64))  # back to (r5..r0 c5..c0)
            tl.store(out_ptr + off, d.to(tl.int16))
            return
        codes_c = tl.load(table_ptr + 2 * best_id + 1)  # and of its columns
        G4 = K // 4  # int32 words per row of s's values
        GT4 = M // 4  # and of s^T's
        # values: tile row q -> s row `row + q`, tile column q -> s^T row `col + q`
        _store_words(out_ptr, _kept_pair(codes_r & 15, v0, v1, v2, v3), _kept_pair((codes_r >> 4) & 15, v4, v5, v6, v7),
                     _kept_pair((codes_r >> 8) & 15, v8, v9, v10, v11), _kept_pair(codes_r >> 12, v12, v13, v14, v15),
                     pid_r * 64, pid_c * 16, G4, False)
        _store_words(out_t_ptr, _kept_pair(codes_c & 15, v0, v4, v8, v12),
                     _kept_pair((codes_c >> 4) & 15, v1, v5, v9, v13),
                     _kept_pair((codes_c >> 8) & 15, v2, v6, v10, v14), _kept_pair(codes_c >> 12, v3, v7, v11, v15),
                     pid_c * 64, pid_r * 16, GT4, True)
        # metadata words (8 nibbles each, gathered over J for s and over JT for s^T):
        # s's indexed by (x, JT), s^T's by (x, J)
        j = tl.arange(0, 8)[None, :, None]
        jt = tl.arange(0, 8)[None, None, :]
        x2 = tl.arange(0, 4)[:, None]
        k2 = tl.arange(0, 8)[None, :]
        slot = (k2 & 1) + 8 * ((k2 >> 2) & 1) + 16 * ((k2 >> 1) & 1)
        widx_s = (pid_r * (K // 32) + pid_c * 2 + (x2 >> 1)) * 64 + slot + 32 * (x2 & 1)
        widx_t = (pid_c * (M // 32) + pid_r * 2 + (x2 & 1)) * 64 + slot + 32 * (x2 >> 1)
        # (tl.cast, not M.to: torch.compile's mutation analysis of this kernel sees plain ints)
        meta_s = out_ptr + tl.cast(M, tl.int64) * G4
        meta_t = out_t_ptr + tl.cast(K, tl.int64) * GT4
        # tile row (column) q's words sit at word index + 2 q
        for q in tl.static_range(4):
            tl.store(meta_s + widx_s + 2 * q, tl.sum(((codes_r >> 4 * q) & 15) << 4 * j, axis=1))
            tl.store(meta_t + widx_t + 2 * q, tl.sum(((codes_c >> 4 * q) & 15) << 4 * jt, axis=2))

    @triton.jit
    def _kept_pair(code, v0, v1, v2, v3):
        """One tile row's two kept values (``code``'s indices ``i0 < i1``) as one int32, the first in the low half."""
        return _pair_bits(code & 3, code >> 2, v0, v1, v2, v3)

    @triton.jit
    def _kept_row(code, v0, v1, v2, v3, c: tl.constexpr):
        """Entry ``c`` of one tile row, densely: its value if ``code`` keeps it, else 0."""
        if c == 0:
            v = v0
        elif c == 1:
            v = v1
        elif c == 2:
            v = v2
        else:
            v = v3
        return tl.where(((code & 3) == c) | ((code >> 2) == c), v, 0)
