"""Attention backward for kept queries only (Triton), causal by original positions.

Kept tokens are given by ``kidx`` (flat ``b * T + t``, sorted); ``cu[b]:cu[b+1]``
are batch row ``b``'s kept tokens and ``pos`` their positions. The kernels read
k, v and the forward output in place (any ``[B, H, T, hd]`` strides with a
contiguous head dim); only the kept rows of q are gathered once, so that the
dk/dv kernel's inner loop reads plain row ranges. Two kernels:

* ``_dq_kernel`` -- one program per (tile of kept queries, batch row, head):
  ``dq = scale * sum_j dS_ij k_j`` over the causal keys of each query, with
  ``P = exp(S - lse)``, ``dS = P * (dP - delta)``, ``dP = dO v^T`` and
  ``delta = rowsum(dO * O)``. It reuses the forward kernel's log-sum-exp when
  given one (else it recomputes it in a first pass). Its loop covers keys
  ``0 .. max position`` of the tile: half the dense work at keep 0.5, for
  three of the dense backward's five matrix products. Key blocks that every
  query of the tile sees run without the causal mask.
* ``_dkdv_kernel`` -- one program per (tile of kept keys, batch row, head):
  ``dv = sum_i P_ij dO_i`` and ``dk = scale * sum_i dS_ij q_i`` over kept
  queries ``i`` at or after the key. Dropped keys need no gradient (they are
  constants), so this loop is kept x kept: a quarter of the dense work at 0.5.

Tested against a float64 dense reference through Triton's interpreter on the
CPU and natively on the GPU.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import torch

from ..triton_util import interpreting

try:
    import triton
    import triton.language as tl
    from triton.runtime.errors import OutOfResources
except ImportError:  # pragma: no cover
    triton = None

LOG2E = 1.4426950408889634


def available() -> bool:
    return triton is not None


def other_specialization_count(kept: int, total: int) -> int | None:
    """A kept count for which the kept-query kernels compile apart from ``kept``, or
    None where none fits in ``total``. Triton specialises an integer argument on
    whether it is divisible by 16 (the kernels take the kept count, ``KT``, as one), so
    a count of the other kind compiles both kernels again: the nearest count above
    ``kept`` of the other kind (``kept + 1`` for a multiple of 16, else the next
    multiple). Priming runs it once, so a warmup's counts compile nothing more."""
    twin = kept + 1 if kept % 16 == 0 else kept + (16 - kept % 16)
    return twin if twin <= total else None


if triton is not None:

    @triton.jit
    def _dq_block(q, do, delta, lse2, qpos, kbase, vbase, start, d, s_kt, s_vt, T, scale2,
                  MASKED: tl.constexpr, BN: tl.constexpr, PREC: tl.constexpr):
        """One key block's share of dq (unscaled): ``dS k`` with ``P = exp2(q k^T scale2 - lse2)``."""
        kpos = start + tl.arange(0, BN)
        if MASKED:  # the causal diagonal, possibly past T
            k = tl.load(kbase + kpos[:, None] * s_kt + d[None, :], mask=kpos[:, None] < T, other=0.0)
            v = tl.load(vbase + kpos[:, None] * s_vt + d[None, :], mask=kpos[:, None] < T, other=0.0)
        else:
            k = tl.load(kbase + kpos[:, None] * s_kt + d[None, :])
            v = tl.load(vbase + kpos[:, None] * s_vt + d[None, :])
        p = tl.math.exp2(tl.dot(q, tl.trans(k), input_precision=PREC) * scale2 - lse2[:, None])
        if MASKED:
            p = tl.where(kpos[None, :] <= qpos[:, None], p, 0.0)
        ds = p * (tl.dot(do, tl.trans(v), input_precision=PREC) - delta[:, None])
        return tl.dot(ds.to(k.dtype), k, input_precision=PREC)

    @triton.jit
    def _dkdv_block(k, v, kpos, QK, DO, POS, LSE, DELTA, lo, n, start, h, d, KT, s_dt, s_dh, scale2,
                    MASKED: tl.constexpr, BM: tl.constexpr, PREC: tl.constexpr):
        """One block of kept queries' share of (dk unscaled, dv). ``QK`` and ``DO``
        are the kept rows ``[K, H, hd]``, so the loads are plain row ranges. Rows
        past ``n`` load q = dO = 0 and so add nothing."""
        rows = start + tl.arange(0, BM)
        rmask = rows < n
        qtok = lo + rows
        rp = qtok[:, None] * s_dt + h * s_dh + d[None, :]
        q = tl.load(QK + rp, mask=rmask[:, None], other=0.0)
        do = tl.load(DO + rp, mask=rmask[:, None], other=0.0)
        lse2 = tl.load(LSE + h * KT + qtok, mask=rmask, other=0.0)  # [H, K]: contiguous along the block
        delta = tl.load(DELTA + h * KT + qtok, mask=rmask, other=0.0)
        pt = tl.math.exp2(tl.dot(k, tl.trans(q), input_precision=PREC) * scale2 - lse2[None, :])  # [BN, BM]
        if MASKED:
            qpos = tl.load(POS + qtok, mask=rmask, other=-1)
            pt = tl.where(kpos[:, None] <= qpos[None, :], pt, 0.0)
        dv = tl.dot(pt.to(do.dtype), do, input_precision=PREC)
        dst = pt * (tl.dot(v, tl.trans(do), input_precision=PREC) - delta[None, :])
        return tl.dot(dst.to(q.dtype), q, input_precision=PREC), dv

    @triton.jit
    def _store_rows(OUT, offs, x, COS, SIN, pos, rmask, s_rope,
                    ROPE: tl.constexpr, R: tl.constexpr, HD: tl.constexpr):
        """Store rows ``x`` [R, HD] (float32) at ``OUT + offs[:, None] + column``.
        With ``ROPE``, first undo the rotate-half RoPE at each row's position
        ``pos`` (the gradient before RoPE: rotation by the opposite angle)."""
        if ROPE:
            x1, x2 = tl.split(tl.permute(tl.reshape(x, (R, 2, HD // 2)), (0, 2, 1)))  # first, second half
            dh = tl.arange(0, HD // 2)
            rp = pos[:, None] * s_rope + dh[None, :]
            c = tl.load(COS + rp, mask=rmask[:, None], other=0.0).to(tl.float32)
            sn = tl.load(SIN + rp, mask=rmask[:, None], other=0.0).to(tl.float32)
            tl.store(OUT + offs[:, None] + dh[None, :], (x1 * c + x2 * sn).to(OUT.dtype.element_ty), mask=rmask[:, None])
            tl.store(OUT + offs[:, None] + HD // 2 + dh[None, :], (x2 * c - x1 * sn).to(OUT.dtype.element_ty),
                     mask=rmask[:, None])
        else:
            d = tl.arange(0, HD)
            tl.store(OUT + offs[:, None] + d[None, :], x.to(OUT.dtype.element_ty), mask=rmask[:, None])

    @triton.jit
    def _dq_kernel(
        Q, K, V, O, DO, LSE_IN, POS, CU, DQ, LSE, DELTA, COS, SIN,
        s_qb, s_qh, s_qt, s_kb, s_kh, s_kt, s_vb, s_vh, s_vt, s_ob, s_oh, s_ot,
        s_lb, s_lh, s_lt,  # LSE_IN [B, H, T] strides (unused without HAS_LSE)
        s_dt, s_dh,  # DO packed [K, H, hd] strides
        s_gt, s_gh,  # DQ / DK / DV [K, (3,) H, hd] strides
        s_rope,  # COS / SIN [T, hd/2] row stride (unused without ROPE)
        H, G, T, KT, n_tiles, scale2,
        HD: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, HAS_LSE: tl.constexpr, PREC: tl.constexpr,
        ROPE: tl.constexpr,
    ):
        # late tiles (late positions, long loops) first: better load balance
        tile = n_tiles - 1 - tl.program_id(0)
        b = tl.program_id(1) // H
        h = tl.program_id(1) % H
        lo = tl.load(CU + b)
        n = tl.load(CU + b + 1) - lo
        if tile * BM >= n:
            return
        rows = tile * BM + tl.arange(0, BM)
        rmask = rows < n
        tok = lo + rows
        d = tl.arange(0, HD)
        qpos = tl.load(POS + tok, mask=rmask, other=0)
        q = tl.load(Q + b * s_qb + h * s_qh + qpos[:, None] * s_qt + d[None, :], mask=rmask[:, None], other=0.0)
        o = tl.load(O + b * s_ob + h * s_oh + qpos[:, None] * s_ot + d[None, :], mask=rmask[:, None], other=0.0)
        dp_ptr = tok[:, None] * s_dt + h * s_dh + d[None, :]
        do = tl.load(DO + dp_ptr, mask=rmask[:, None], other=0.0)
        delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
        hi = tl.max(tl.where(rmask, qpos, -1), 0) + 1
        # key blocks ending at or before the tile's first query need no causal mask
        full_end = (tl.min(tl.where(rmask, qpos, T), 0) + 1) // BN * BN
        kbase = K + b * s_kb + (h // G) * s_kh  # grouped-query: G query heads share a key/value head
        vbase = V + b * s_vb + (h // G) * s_vh
        if HAS_LSE:
            lse2 = tl.load(LSE_IN + b * s_lb + h * s_lh + qpos * s_lt, mask=rmask, other=0.0) * 1.4426950408889634
        else:  # the forward's log-sum-exp is not at hand: recompute it (online, base 2)
            m_i = tl.full((BM,), float("-inf"), tl.float32)
            l_i = tl.zeros((BM,), tl.float32)
            for start in range(0, hi, BN):
                kpos = start + tl.arange(0, BN)
                k = tl.load(kbase + kpos[:, None] * s_kt + d[None, :], mask=kpos[:, None] < T, other=0.0)
                s = tl.dot(q, tl.trans(k), input_precision=PREC) * scale2
                s = tl.where(kpos[None, :] <= qpos[:, None], s, float("-inf"))
                m_new = tl.maximum(m_i, tl.max(s, 1))
                m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
                l_i = l_i * tl.math.exp2(m_i - m_safe) + tl.sum(tl.math.exp2(s - m_safe[:, None]), 1)
                m_i = m_new
            lse2 = tl.where(rmask, m_i + tl.math.log2(tl.where(rmask, l_i, 1.0)), 0.0)  # padded rows: no log(0)
        dq = tl.zeros((BM, HD), tl.float32)
        for start in range(0, full_end, BN):
            dq += _dq_block(q, do, delta, lse2, qpos, kbase, vbase, start, d, s_kt, s_vt, T, scale2, False, BN, PREC)
        for start in range(full_end, hi, BN):
            dq += _dq_block(q, do, delta, lse2, qpos, kbase, vbase, start, d, s_kt, s_vt, T, scale2, True, BN, PREC)
        _store_rows(DQ, tok * s_gt + h * s_gh, dq * (scale2 / 1.4426950408889634), COS, SIN, qpos, rmask, s_rope,
                    ROPE, BM, HD)
        tl.store(LSE + h * KT + tok, lse2, mask=rmask)
        tl.store(DELTA + h * KT + tok, delta, mask=rmask)

    @triton.jit
    def _dkdv_kernel(
        QK, K, V, DO, POS, CU, LSE, DELTA, DK, DV, COS, SIN,
        s_kb, s_kh, s_kt, s_vb, s_vh, s_vt,
        s_dt, s_dh,  # QK / DO packed [K, H, hd] strides
        s_gt, s_gh,  # DK / DV [K, (3,) H, hd] strides
        s_rope, HKV, G, KT, scale2,
        HD: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, PREC: tl.constexpr, ROPE: tl.constexpr,
    ):
        # one program per (key tile, batch row, key/value head): it sums over the
        # G query heads that share the key/value head
        tile = tl.program_id(0)
        b = tl.program_id(1) // HKV
        hk = tl.program_id(1) % HKV
        lo = tl.load(CU + b)
        n = tl.load(CU + b + 1) - lo
        if tile * BN >= n:
            return
        cols = tile * BN + tl.arange(0, BN)
        cmask = cols < n
        ktok = lo + cols
        d = tl.arange(0, HD)
        kpos = tl.load(POS + ktok, mask=cmask, other=2**30)
        k = tl.load(K + b * s_kb + hk * s_kh + kpos[:, None] * s_kt + d[None, :], mask=cmask[:, None], other=0.0)
        v = tl.load(V + b * s_vb + hk * s_vh + kpos[:, None] * s_vt + d[None, :], mask=cmask[:, None], other=0.0)
        dk = tl.zeros((BN, HD), tl.float32)
        dv = tl.zeros((BN, HD), tl.float32)
        # kept queries are sorted by position: those at or after this tile's first
        # key start at the tile's own index; past the tile's last key, no mask
        first = (tile * BN) // BM * BM
        unmasked = tl.minimum(((tile + 1) * BN + BM - 1) // BM * BM, n)
        for g in range(G):
            h = hk * G + g
            for start in range(first, unmasked, BM):
                dk_, dv_ = _dkdv_block(k, v, kpos, QK, DO, POS, LSE, DELTA, lo, n, start, h, d, KT, s_dt, s_dh, scale2,
                                       True, BM, PREC)
                dk += dk_
                dv += dv_
            for start in range(unmasked, n, BM):
                dk_, dv_ = _dkdv_block(k, v, kpos, QK, DO, POS, LSE, DELTA, lo, n, start, h, d, KT, s_dt, s_dh, scale2,
                                       False, BM, PREC)
                dk += dk_
                dv += dv_
        kp = ktok * s_gt + hk * s_gh
        _store_rows(DK, kp, dk * (scale2 / 1.4426950408889634), COS, SIN, kpos, cmask, s_rope, ROPE, BN, HD)
        _store_rows(DV, kp, dv, COS, SIN, kpos, cmask, s_rope, False, BN, HD)


# (BM, BN, num_warps, num_stages) tried on first use per shape on the GPU. For
# the dq kernel BM is the query tile; for dk/dv, BN is the key tile and BM the
# query block. Each candidate is a Triton compile, so the lists stay short:
# they hold the winners measured on the H200 at head sizes 64 and 128
# (bench/results/collider_step_sync_free_h200.json: dq (128, 64, 8, 3), dk/dv
# (32, 64, 4, 3); before the [H, K] scratch layout, (32, 128, 8, 3)) and their
# neighbours.
DQ_CONFIGS = [(128, 64, 8, 3), (128, 64, 8, 2), (128, 64, 4, 3), (64, 64, 4, 3), (128, 32, 4, 3), (64, 128, 8, 3)]
KV_CONFIGS = [(32, 64, 4, 3), (32, 128, 8, 3), (32, 128, 4, 3), (64, 64, 4, 3), (16, 128, 4, 3), (64, 128, 8, 3)]
_tuned: dict[tuple, tuple[tuple, tuple]] = {}
TUNING_FILE = "kept_attention_tuning.json"  # in the sparsetrain cache folder ($SPARSETRAIN_CACHE)


def _launch(args: dict, cfg_dq: tuple, cfg_kv: tuple) -> None:
    a = args
    B, H, T, hd = a["q"].shape
    bm, bn, warps, stages = cfg_dq
    n_tiles = triton.cdiv(T, bm)
    _dq_kernel[(n_tiles, B * H)](
        a["q"], a["k"], a["v"], a["out"], a["do"], a["lse_in"], a["pos"], a["cu"], a["dq"], a["lse"], a["delta"],
        a["cos"], a["sin"],
        *a["q"].stride()[:3], *a["k"].stride()[:3], *a["v"].stride()[:3], *a["out"].stride()[:3], *a["lse_strides"],
        a["do"].stride(0), a["do"].stride(1), a["dq"].stride(0), a["dq"].stride(1), a["cos"].stride(0),
        H, a["groups"], T, a["do"].shape[0], n_tiles, a["scale2"],
        HD=hd, BM=bm, BN=bn, HAS_LSE=a["has_lse"], PREC=a["prec"], ROPE=a["rope"], num_warps=warps, num_stages=stages)
    bm, bn, warps, stages = cfg_kv  # here BN is the key tile and BM the query block
    _dkdv_kernel[(triton.cdiv(T, bn), B * (H // a["groups"]))](
        a["q_k"], a["k"], a["v"], a["do"], a["pos"], a["cu"], a["lse"], a["delta"], a["dk"], a["dv"], a["cos"], a["sin"],
        *a["k"].stride()[:3], *a["v"].stride()[:3], a["do"].stride(0), a["do"].stride(1),
        a["dk"].stride(0), a["dk"].stride(1), a["cos"].stride(0), H // a["groups"], a["groups"], a["do"].shape[0],
        a["scale2"],
        HD=hd, BM=bm, BN=bn, PREC=a["prec"], ROPE=a["rope"], num_warps=warps, num_stages=stages)


def _tuning_path() -> Path:
    from ..data import default_cache_dir

    return default_cache_dir() / TUNING_FILE


def _tuning_key(args: dict) -> str:
    """Which tuning applies: the GPU, Triton's version, the shapes and the candidate lists."""
    B, H, T, hd = args["q"].shape
    lists = hashlib.sha1(repr((DQ_CONFIGS, KV_CONFIGS)).encode()).hexdigest()[:12]
    dev = args["q"].device
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else dev.type
    groups = args.get("groups", 1)
    return (f"{name}|triton {triton.__version__}|hd {hd}|T {T}|"
            f"{args['q'].dtype}|lse {args['has_lse']}|rope {args['rope']}|{lists}"
            + (f"|groups {groups}" if groups != 1 else ""))


def _load_tuning(path: Path) -> dict:
    try:
        table = json.loads(path.read_text())
    except (OSError, ValueError):  # none yet, or unreadable: tune again
        return {}
    return table if isinstance(table, dict) else {}


def _store_tuning(path: Path, key: str, choice: tuple[tuple, tuple]) -> None:
    """Add ``key`` to the tuning file, atomically (a half-written file is never read)."""
    from ..checkpoint import atomic_write_text

    table = _load_tuning(path)
    table[key] = [list(choice[0]), list(choice[1])]
    try:
        atomic_write_text(path, json.dumps(table, indent=1))
    except OSError:  # a read-only cache folder: keep the choice for this process only
        pass


def _tune(args: dict, timer=None) -> tuple[tuple, tuple]:
    """Fastest (dq config, dk/dv config) for these shapes: read from the tuning
    file when this GPU, Triton and shape were tuned before (each candidate costs
    a Triton compile, which on a fresh machine took about a minute of a 1B
    run's start-up: bench/results/collider_quality_1b_90s_h200.json), else
    timed once and written there. ``timer(launch) -> ms`` replaces the CUDA
    timing (tests)."""
    B, H, T, hd = args["q"].shape
    groups = args.get("groups", 1)
    key = (hd, T, args["q"].dtype, args["has_lse"], args["rope"], groups)
    if key in _tuned:
        return _tuned[key]
    path, disk_key = _tuning_path(), _tuning_key(args)
    hit = _load_tuning(path).get(disk_key)
    if (isinstance(hit, list) and len(hit) == 2 and all(isinstance(c, list) for c in hit)
            and tuple(hit[0]) in DQ_CONFIGS and tuple(hit[1]) in KV_CONFIGS):
        _tuned[key] = (tuple(hit[0]), tuple(hit[1]))
        return _tuned[key]
    if timer is None:
        from ..benchmark import cuda_ms_per_call as timer

    def cost(cfg_dq: tuple, cfg_kv: tuple) -> float:
        try:
            return timer(lambda: _launch(args, cfg_dq, cfg_kv))
        except OutOfResources:  # too much shared memory for this GPU
            return math.inf

    best_dq = min(DQ_CONFIGS, key=lambda c: cost(c, KV_CONFIGS[0]))
    best_kv = min(KV_CONFIGS, key=lambda c: cost(best_dq, c))
    _tuned[key] = (best_dq, best_kv)
    _store_tuning(path, disk_key, _tuned[key])
    return _tuned[key]


def _kept_rows(t: torch.Tensor, kidx: torch.Tensor) -> torch.Tensor:
    """Kept tokens' rows ``[K, H, hd]`` (contiguous) of a ``[B, H, T, hd]`` tensor:
    the dk/dv kernel then reads its query blocks as plain row ranges."""
    B, H, T, hd = t.shape
    return t.transpose(1, 2).reshape(B * T, H, hd).index_select(0, kidx)


def kept_rows_meta(kidx: torch.Tensor, B: int, T: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(pos, cu)``: each kept token's position (int32), and where each batch
    row's kept tokens start in ``kidx`` (int32 ``[B + 1]``). No host sync
    (``bincount`` would wait for the GPU to size its output)."""
    starts = torch.arange(B + 1, device=kidx.device) * T
    return (kidx % T).to(torch.int32), torch.searchsorted(kidx, starts).to(torch.int32)


def kept_attention_backward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, do_k: torch.Tensor, kidx: torch.Tensor,
    lse: torch.Tensor | None = None, config: tuple[int, int, int, int] | None = None,
    rows_meta: tuple[torch.Tensor, torch.Tensor] | None = None,
    rope: tuple[torch.Tensor, torch.Tensor] | None = None, grads: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Collider attention gradients for the kept tokens only.

    ``q, out``: all tokens, ``[B, H, T, hd]``; ``k, v``: all tokens,
    ``[B, Hkv, T, hd]`` with ``Hkv`` dividing ``H`` (grouped-query attention:
    query head ``h`` reads key/value head ``h // (H // Hkv)``, as Hugging
    Face's ``repeat_kv``); the forward's tensors, any strides with a contiguous
    head dim. ``do_k``: the kept tokens' output
    gradient ``[K, H, hd]`` in ``kidx`` order; ``lse``: the forward kernel's
    log-sum-exp of the scaled scores ``[B, H, T]`` (natural log), or None to
    recompute it. ``rows_meta``: :func:`kept_rows_meta` of ``kidx``, to compute
    once for all layers. ``config``: ``(BM, BN, num_warps, num_stages)`` for both
    kernels; by default tuned once per shape on the GPU.

    ``rope``: the ``(cos, sin)`` tables ``[>= T, hd/2]`` that rotated q and k
    (rotate-half): dq and dk then come out as gradients before RoPE, undone in
    the kernels' epilogue instead of in a pass of their own. ``grads``: a
    contiguous ``[K, H + 2 * Hkv, hd]`` buffer (``[K, 3, H, hd]`` also when
    ``Hkv == H``) to write (dq, dk, dv) into, laid out as the QKV projection's
    output rows, so the caller's weight-gradient GEMM reads it as
    ``[K, (H + 2 * Hkv) * hd]`` directly.

    Returns ``(dq_k, dk_k, dv_k)``: ``[K, H, hd]``, ``[K, Hkv, hd]``,
    ``[K, Hkv, hd]`` in the dtype of ``q`` (views into ``grads`` when given).
    """
    if triton is None:
        raise RuntimeError("Triton is not installed")
    B, H, T, hd = q.shape
    K = kidx.numel()
    if hd & (hd - 1) or hd < 16:
        raise ValueError(f"head_dim must be a power of two >= 16 for the Triton kernel, got {hd}")
    if any(t.stride(-1) != 1 for t in (q, k, v, out)):
        raise ValueError("q, k, v and out need a contiguous head dim")
    Hkv = k.shape[1]
    if H % Hkv or any(t.shape[1] != Hkv or t.shape[0] != B or t.shape[2:] != (T, hd) for t in (k, v)):
        raise ValueError(f"k and v must be [B, Hkv, T, hd] with Hkv dividing the {H} query heads, got "
                         f"{tuple(k.shape)} and {tuple(v.shape)}")
    width = H + 2 * Hkv
    if grads is None:
        grads = torch.empty(K, width, hd, dtype=q.dtype, device=q.device)
    elif (grads.shape != (K, width, hd) and not (Hkv == H and grads.shape == (K, 3, H, hd))
          or not grads.is_contiguous() or grads.dtype != q.dtype):
        raise ValueError(f"grads must be a contiguous {q.dtype} [{K}, {width}, {hd}] tensor, got "
                         f"{grads.dtype} {tuple(grads.shape)}")
    grads = grads.view(K, width, hd)
    if rope is not None:
        cos, sin = rope
        if cos.shape[0] < T or cos.shape[-1] != hd // 2 or cos.stride(-1) != 1 or cos.stride() != sin.stride():
            raise ValueError(f"rope tables must be [>= {T}, {hd // 2}] with a contiguous last dim, got {tuple(cos.shape)}")
    else:
        cos = sin = q  # unused (ROPE off)
    do_k = do_k.reshape(K, H, hd).to(q.dtype).contiguous()  # the same [K, H, hd] strides as the kept q rows
    pos, cu = rows_meta if rows_meta is not None else kept_rows_meta(kidx, B, T)
    if lse is not None:
        lse = lse.reshape(B, H, T)
    args = {
        "q": q, "k": k, "v": v, "out": out, "do": do_k, "pos": pos, "cu": cu,
        "lse_in": lse if lse is not None else q, "lse_strides": lse.stride() if lse is not None else (0, 0, 0),
        "has_lse": lse is not None, "q_k": _kept_rows(q, kidx),
        "dq": grads[:, :H], "dk": grads[:, H:H + Hkv], "dv": grads[:, H + Hkv:], "groups": H // Hkv,
        "cos": cos, "sin": sin, "rope": rope is not None,
        "lse": torch.empty(H, K, dtype=torch.float32, device=q.device),
        "delta": torch.empty(H, K, dtype=torch.float32, device=q.device), "scale2": LOG2E / math.sqrt(hd),
        # float32 inputs: true float32 products (tl.dot would round them to TF32 on the GPU)
        "prec": "ieee" if q.dtype == torch.float32 else "tf32",
    }
    if config is not None:
        cfg_dq = cfg_kv = config
    elif interpreting() or not q.is_cuda:
        cfg_dq = cfg_kv = (16, 16, 4, 1)
    else:
        cfg_dq, cfg_kv = _tune(args)
    _launch(args, cfg_dq, cfg_kv)
    return args["dq"], args["dk"], args["dv"]
