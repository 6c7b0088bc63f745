"""The stream mixing of hyper-connections, as few passes over the streams as possible.

A sublayer with streams ``X [..., n, D]`` reads ``a = sum_i p_i X_i`` and
writes ``Y = H X + q (outer) f`` (``H [n, n]``, ``p``, ``q`` ``[n]``: per layer,
the same for every token; :mod:`sparsetrain.hyper` owns what they are). Four
operations cover a block:

* :func:`read`: ``a`` alone (the analysis, Collider's recomputation, the read-out);
* :func:`read_through`: ``a`` and ``X`` again, as one autograd node, so the
  gradient that later reaches ``X`` and the read's own are added in the read's
  backward, not by autograd in a pass of their own;
* :func:`write`: ``Y``;
* :func:`write_then_read`: ``Y`` and the next sublayer's read of it, in one
  pass over ``X`` forward and one backward (the next read's ``Y_i`` are never
  read back from memory).

Each takes one of two paths:

* plain torch (CPU, and under ``torch.compile``, where inductor fuses it into
  the kernels around it): broadcast products and sums over the stream axis in
  the streams' dtype (float32 for 16-bit streams, rounded once), no einsum: an
  einsum becomes a batched GEMM with a
  contraction of length ``n`` forward and of length ``B T D`` backward, and
  under autocast it rounds its operands and result to 16 bits. The weights are
  broadcast to every token (:func:`per_token`), so that their gradients are
  summed per token first, a shape inductor splits over the GPU;
* eager CUDA (the ``fused_hyper_mixing`` kernel policy): one Triton kernel per
  operation and direction, ``[BLOCK_M rows, n, BLOCK_D]`` tiles in float32
  registers (float64 for float64 streams), results rounded once to the
  streams' dtype, the mixing weights' gradients as per-tile partial sums
  added up in float64.

Both keep the streams in their own dtype: float32 under autocast, as the plain
residual stream is, or bfloat16 (``model.hyper_stream_dtype``); the sublayer
output ``f`` may be 16-bit.
"""

from __future__ import annotations

import torch

from . import kernels
from .triton_util import interpreting

try:
    import triton
    import triton.language as tl

    from .triton_util import bf16_bits_rne
except ImportError:  # pragma: no cover - depends on the install
    triton = None

KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


# ----------------------------------------------------------------------------- plain torch


def per_token(weights: torch.Tensor, streams: torch.Tensor) -> torch.Tensor:
    """The per-layer ``weights`` (``[n]`` or ``[n, n]``) in the streams' dtype, broadcast to
    every token: ``[..., n]`` or ``[..., n, n]`` for streams ``[..., n, D]`` (a view).

    Forward it changes nothing. Backward it makes autograd sum the weights' gradient
    in two stages: per token over ``D`` (``[..., n(, n)]``), then over the tokens.
    Without it the gradient of ``h_res`` (and of ``h_post``, ``h_pre`` where the
    gradient at the streams is not a buffer of its own) is one reduction of
    ``B T D`` terms into ``n^2`` (``n``) outputs, none of whose inputs is indexed by
    every output dimension (``g[.., i, :]``, ``X[.., j, :]``). Inductor's split
    heuristic (``Reduction.num_splits``) then finds no input to decide by and, in the
    versions without its broadcast-read fallback (torch 2.13 has it), does not split:
    one GPU block per output, each streaming the streams, milliseconds per sublayer
    (what the compiled nano-125m step at 3.7x the plain residual's points to). In two stages each
    reduction has such an input, and the per-token partials are small (``n^2``
    floats a token)."""
    w = weights.to(streams.dtype)
    return w.expand(*streams.shape[:-2], *w.shape)


def _summed(streams: torch.Tensor) -> torch.Tensor:
    """``streams`` in the dtype the mixing sums in: float32 for 16-bit streams (rounded
    once at the end, as the kernels do), else their own."""
    return streams.float() if streams.dtype in (torch.float16, torch.bfloat16) else streams


def read_reference(streams: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``sum_i weights_i streams[..., i, :]`` in the streams' dtype: ``[..., n, D] -> [..., D]``."""
    s = _summed(streams)
    return (s * per_token(weights, s).unsqueeze(-1)).sum(-2).to(streams.dtype)


def write_reference(streams: torch.Tensor, out: torch.Tensor, h_res: torch.Tensor, h_post: torch.Tensor
                    ) -> torch.Tensor:
    """``h_res @ streams + h_post (outer) out`` per token, in the streams' dtype:
    ``[..., n, D]``, ``[..., D] -> [..., n, D]``."""
    s = _summed(streams)
    mixed = (per_token(h_res, s).unsqueeze(-1) * s.unsqueeze(-3)).sum(-2)
    return (mixed + per_token(h_post, s).unsqueeze(-1) * out.unsqueeze(-2)).to(streams.dtype)


def spread(x: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """The streams at their entry: ``scales_i x``, ``[..., D] -> [..., n, D]`` in ``x``'s dtype
    (the scales' gradient summed in two stages, as :func:`per_token` says)."""
    return x.unsqueeze(-2) * per_token(scales, x.unsqueeze(-2)).unsqueeze(-1)


# ----------------------------------------------------------------------------- dispatch


def kernel_ok(streams: torch.Tensor) -> bool:
    """Can the Triton kernels run on ``streams`` (Triton present, a float dtype, on
    CUDA or in Triton's interpreter)?"""
    return triton is not None and streams.dtype in KERNEL_DTYPES and (streams.is_cuda or interpreting())


def uses_kernel(streams: torch.Tensor) -> bool:
    """Do the operations of this module take the kernel path for ``streams``? On CUDA,
    where :func:`kernel_ok` and the kernel policy allow: ``fused_hyper_mixing`` in eager
    mode, ``fused_hyper_mixing_compiled`` inside torch.compile (else the plain-torch
    path, which inductor fuses with its neighbours)."""
    return streams.is_cuda and kernel_ok(streams) and policy_allows_kernel()


def policy_allows_kernel() -> bool:
    """The kernel policy's part of :func:`uses_kernel`: ``fused_hyper_mixing`` in eager
    mode, ``fused_hyper_mixing_compiled`` inside torch.compile."""
    policy = kernels.current()
    return policy.fused_hyper_mixing_compiled if torch.compiler.is_compiling() else policy.fused_hyper_mixing


def as_custom_op() -> bool:
    """Does the kernel path run as the ``sparsetrain::hyper_mix`` custom op pair (inside
    torch.compile, which cannot trace the :class:`_Mix` node's kernel launches but keeps
    an op whole) rather than as the autograd node (eager)?"""
    return torch.compiler.is_compiling()


def read(streams: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``sum_i weights_i streams[..., i, :]``: ``[..., n, D] -> [..., D]`` in the streams' dtype."""
    if uses_kernel(streams):
        if as_custom_op():
            return _mix_forward_op(streams, None, None, None, weights)[1]
        return _mix(streams, None, None, None, weights, through=False)
    return read_reference(streams, weights)


def read_through(streams: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(read(streams, weights), streams)``; as the autograd node (eager kernels) one node
    whose backward adds the gradient reaching the returned streams to the read's. (A
    custom op may not return its input, so there autograd adds the two.)"""
    if uses_kernel(streams) and not as_custom_op():
        a, y = _mix(streams, None, None, None, weights, through=True)
        return a, y
    return read(streams, weights), streams


def write(streams: torch.Tensor, out: torch.Tensor, h_res: torch.Tensor, h_post: torch.Tensor) -> torch.Tensor:
    """``h_res @ streams + h_post (outer) out`` per token: ``[..., n, D]`` in the streams' dtype."""
    if uses_kernel(streams):
        if as_custom_op():
            return _mix_forward_op(streams, out, h_res, h_post, None)[0]
        return _mix(streams, out, h_res, h_post, None, through=False)
    return write_reference(streams, out, h_res, h_post)


def write_then_read(streams: torch.Tensor, out: torch.Tensor, h_res: torch.Tensor, h_post: torch.Tensor,
                    weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(y, read(y, weights))`` for ``y = write(streams, out, h_res, h_post)``, in one pass
    over the streams on the kernel path."""
    if uses_kernel(streams):
        if as_custom_op():
            y, a = _mix_forward_op(streams, out, h_res, h_post, weights)
            return y, a
        y, a = _mix(streams, out, h_res, h_post, weights, through=False)
        return y, a
    y = write_reference(streams, out, h_res, h_post)
    return y, read_reference(y, weights)


# ----------------------------------------------------------------------------- the kernels

if triton is not None:

    @triton.jit
    def _round_to_storage(v, ROUND_BF16: tl.constexpr):
        # the interpreter truncates to bf16: round to nearest even first, as the GPU does
        if ROUND_BF16:
            v = (bf16_bits_rne(v) << 16).to(tl.float32, bitcast=True)
        return v

    @triton.jit
    def _forward_kernel(x_ptr, f_ptr, y_ptr, a_ptr, h_ptr, q_ptr, p_ptr, M, D,
                        N: tl.constexpr, NP: tl.constexpr, WRITE: tl.constexpr, READ: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, ROUND_BF16: tl.constexpr):
        ACC = h_ptr.dtype.element_ty
        rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
        cols = (tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)).to(tl.int64)
        s = tl.arange(0, NP)
        m2 = (rows[:, None] < M) & (cols[None, :] < D)
        m3 = m2[:, None, :] & (s[None, :, None] < N)
        off3 = rows[:, None, None] * (N * D) + s[None, :, None] * D + cols[None, None, :]
        if WRITE:
            f = tl.load(f_ptr + rows[:, None] * D + cols[None, :], mask=m2, other=0.0).to(ACC)
            y = tl.zeros((BLOCK_M, NP, BLOCK_D), ACC)
            for j in tl.static_range(N):
                xj = tl.load(x_ptr + rows[:, None] * (N * D) + j * D + cols[None, :], mask=m2, other=0.0).to(ACC)
                hj = tl.load(h_ptr + s * N + j, mask=s < N, other=0.0)  # column j of H
                y += hj[None, :, None] * xj[:, None, :]
            q = tl.load(q_ptr + s, mask=s < N, other=0.0)
            y += q[None, :, None] * f[:, None, :]
            y = _round_to_storage(y, ROUND_BF16)
            tl.store(y_ptr + off3, y.to(y_ptr.dtype.element_ty), mask=m3)
            y = y.to(y_ptr.dtype.element_ty).to(ACC)  # the next read sees the streams as stored
        else:
            y = tl.load(x_ptr + off3, mask=m3, other=0.0).to(ACC)
        if READ:
            p = tl.load(p_ptr + s, mask=s < N, other=0.0)
            a = _round_to_storage(tl.sum(y * p[None, :, None], axis=1), ROUND_BF16)
            tl.store(a_ptr + rows[:, None] * D + cols[None, :], a.to(a_ptr.dtype.element_ty), mask=m2)

    @triton.jit
    def _backward_kernel(dy_ptr, da_ptr, x_ptr, f_ptr, dx_ptr, df_ptr, part_ptr, h_ptr, q_ptr, p_ptr, M, D,
                         N: tl.constexpr, NP: tl.constexpr, NPART: tl.constexpr, WRITE: tl.constexpr,
                         READ: tl.constexpr, HAS_DY: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
                         ROUND_BF16: tl.constexpr, ROUND_DF_BF16: tl.constexpr):
        # partial sums of this tile, at part_ptr[tile, :]: dH [N, N] row-major, then dq [N], then dp [N]
        ACC = h_ptr.dtype.element_ty
        tile = tl.program_id(0) * tl.num_programs(1) + tl.program_id(1)
        part = part_ptr + tile.to(tl.int64) * NPART
        rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
        cols = (tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)).to(tl.int64)
        s = tl.arange(0, NP)
        m2 = (rows[:, None] < M) & (cols[None, :] < D)
        m3 = m2[:, None, :] & (s[None, :, None] < N)
        off2 = rows[:, None] * D + cols[None, :]
        off3 = rows[:, None, None] * (N * D) + s[None, :, None] * D + cols[None, None, :]
        # g: the gradient at the written (or passed-through) streams, the read's included
        if HAS_DY:
            g = tl.load(dy_ptr + off3, mask=m3, other=0.0).to(ACC)
        else:
            g = tl.zeros((BLOCK_M, NP, BLOCK_D), ACC)
        if READ:
            da = tl.load(da_ptr + off2, mask=m2, other=0.0).to(ACC)
            p = tl.load(p_ptr + s, mask=s < N, other=0.0)
            g += p[None, :, None] * da[:, None, :]
        if WRITE:
            f = tl.load(f_ptr + off2, mask=m2, other=0.0).to(ACC)
            q = tl.load(q_ptr + s, mask=s < N, other=0.0)
            df = _round_to_storage(tl.sum(g * q[None, :, None], axis=1), ROUND_DF_BF16)
            tl.store(df_ptr + off2, df.to(df_ptr.dtype.element_ty), mask=m2)
            tl.store(part + N * N + s, tl.sum(tl.sum(g * f[:, None, :], axis=2), axis=0), mask=s < N)
            y = tl.zeros((BLOCK_M, NP, BLOCK_D), ACC)  # the written streams, recomputed as the forward did
            for j in tl.static_range(N):
                xj = tl.load(x_ptr + rows[:, None] * (N * D) + j * D + cols[None, :], mask=m2, other=0.0).to(ACC)
                hj = tl.load(h_ptr + s * N + j, mask=s < N, other=0.0)  # column j of H
                dxj = _round_to_storage(tl.sum(g * hj[None, :, None], axis=1), ROUND_BF16)  # (H^T g)_j
                tl.store(dx_ptr + rows[:, None] * (N * D) + j * D + cols[None, :], dxj.to(dx_ptr.dtype.element_ty),
                         mask=m2)
                tl.store(part + s * N + j, tl.sum(tl.sum(g * xj[:, None, :], axis=2), axis=0), mask=s < N)
                if READ:
                    y += hj[None, :, None] * xj[:, None, :]
            if READ:
                y += q[None, :, None] * f[:, None, :]
                y = _round_to_storage(y, ROUND_BF16).to(dx_ptr.dtype.element_ty).to(ACC)
                tl.store(part + N * N + N + s, tl.sum(tl.sum(da[:, None, :] * y, axis=2), axis=0), mask=s < N)
        else:
            tl.store(dx_ptr + off3, _round_to_storage(g, ROUND_BF16).to(dx_ptr.dtype.element_ty), mask=m3)
            if READ:
                x = tl.load(x_ptr + off3, mask=m3, other=0.0).to(ACC)
                tl.store(part + N * N + N + s, tl.sum(tl.sum(da[:, None, :] * x, axis=2), axis=0), mask=s < N)


NUM_WARPS = 8  # 16 elements of each [BLOCK_M, NP, BLOCK_D] tile per thread: the backward holds several at once


def _tiles(n: int, D: int) -> tuple[int, int, int]:
    """(NP, BLOCK_M, BLOCK_D): the stream axis padded to a power of two, and a tile of
    about 4096 elements of ``[BLOCK_M, NP, BLOCK_D]``."""
    np_ = triton.next_power_of_2(n)
    block_d = min(256, triton.next_power_of_2(D))
    return np_, max(1, 4096 // (np_ * block_d)), block_d


def _accumulator(streams: torch.Tensor) -> torch.dtype:
    return torch.float64 if streams.dtype == torch.float64 else torch.float32


def _kernel_weights(streams: torch.Tensor, *weights: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
    """The mixing weights as the kernels read them: contiguous, in the accumulator dtype."""
    acc = _accumulator(streams)
    return tuple(w.to(acc).contiguous() if w is not None else None for w in weights)


def _stand_ins(h: torch.Tensor | None, q: torch.Tensor | None, p: torch.Tensor | None
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(h, q, p)`` with the weights a node lacks replaced by those it has: the kernel
    takes a pointer for each and leaves the missing ones unread."""
    if h is None:
        h = q = p
    if p is None:
        p = h
    return h, q, p


def _launch_forward(x: torch.Tensor, f: torch.Tensor | None, h: torch.Tensor | None, q: torch.Tensor | None,
                    p: torch.Tensor | None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``(Y, a)``: ``Y = H X + q f`` where ``h`` (with ``q``, ``f``) is given, else None;
    ``a = p . Y`` (``p . X`` without a write) where ``p`` is given, else None. ``x`` and
    ``f`` contiguous, the weights contiguous in the accumulator dtype."""
    writes, reads = h is not None, p is not None
    *lead, n, D = x.shape
    M = x.numel() // (n * D)
    h, q, p = _stand_ins(h, q, p)
    y = torch.empty_like(x) if writes else None
    a = torch.empty((*lead, D), dtype=x.dtype, device=x.device) if reads else None
    np_, block_m, block_d = _tiles(n, D)
    if M:
        _forward_kernel[(triton.cdiv(M, block_m), triton.cdiv(D, block_d))](
            x, f if writes else x, y if writes else x, a if reads else x, h, q, p, M, D, N=n, NP=np_, WRITE=writes,
            READ=reads, BLOCK_M=block_m, BLOCK_D=block_d, ROUND_BF16=interpreting() and x.dtype == torch.bfloat16,
            num_warps=NUM_WARPS)
    return y, a


def _launch_backward(dy: torch.Tensor | None, da: torch.Tensor | None, x: torch.Tensor, f: torch.Tensor | None,
                     h: torch.Tensor | None, q: torch.Tensor | None, p: torch.Tensor | None, df_dtype: torch.dtype
                     ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """``(dX, df, sums)`` of the node :func:`_launch_forward` computed (the same
    ``x, f, h, q, p``), given the gradient at its streams ``dy`` (the written ones, or
    the passed-through ones; None: zero) and at its read ``da``; ``sums``: the weights'
    gradients ``[dH (n x n, row-major), dq (n), dp (n)]`` in float64 (those of weights
    the node lacks are garbage)."""
    writes, reads = h is not None, p is not None
    h, q, p = _stand_ins(h, q, p)
    if reads and da is None:
        da = torch.zeros(x.shape[:-2] + x.shape[-1:], dtype=x.dtype, device=x.device)
    *_, n, D = x.shape
    M = x.numel() // (n * D)
    np_, block_m, block_d = _tiles(n, D)
    grid = (triton.cdiv(M, block_m), triton.cdiv(D, block_d))
    npart = n * n + 2 * n
    # zeros: a node without a write (or a read) leaves its tiles' dH and dq (dp) unwritten, and
    # the custom op's output must not be uninitialised memory
    partials = torch.zeros((grid[0] * grid[1], npart), dtype=_accumulator(x), device=x.device)
    dx = torch.empty_like(x)
    df = torch.empty(f.shape, dtype=df_dtype, device=x.device) if writes else None
    if M:
        _backward_kernel[grid](
            dy.contiguous() if dy is not None else x, da.contiguous() if reads else x, x, f if writes else x,
            dx, df if writes else x, partials, h, q, p, M, D, N=n, NP=np_, NPART=npart, WRITE=writes,
            READ=reads, HAS_DY=dy is not None, BLOCK_M=block_m, BLOCK_D=block_d,
            ROUND_BF16=interpreting() and x.dtype == torch.bfloat16,
            ROUND_DF_BF16=interpreting() and df_dtype == torch.bfloat16, num_warps=NUM_WARPS)
    return dx, df, partials.sum(0, dtype=torch.float64)  # the tiles' partial sums, added in float64


def _weight_grads(sums: torch.Tensor, n: int, dtypes: tuple[torch.dtype | None, ...]
                  ) -> tuple[torch.Tensor | None, ...]:
    """The gradients of ``h_res``, ``h_post`` and ``h_pre`` from :func:`_launch_backward`'s
    ``sums``, each in its weight's dtype (``dtypes``; None: the node lacks that weight)."""
    h_dtype, q_dtype, p_dtype = dtypes
    d_h = sums[: n * n].view(n, n).to(h_dtype) if h_dtype is not None else None
    d_q = sums[n * n: n * n + n].to(q_dtype) if q_dtype is not None else None
    d_p = sums[n * n + n:].to(p_dtype) if p_dtype is not None else None
    return d_h, d_q, d_p


def _dtypes(*tensors: torch.Tensor | None) -> tuple[torch.dtype | None, ...]:
    return tuple(t.dtype if t is not None else None for t in tensors)


class _Mix(torch.autograd.Function):
    """One mixing node (eager): ``Y = H X + q f`` (with ``h_res``) or ``Y = X``, and ``a = p . Y``
    (with ``h_pre``). Outputs: ``(Y, a)``, ``Y``, ``(a, Y)`` (``through``) or ``a``."""

    @staticmethod
    def forward(ctx, streams: torch.Tensor, out: torch.Tensor | None,  # type: ignore[override]
                h_res: torch.Tensor | None, h_post: torch.Tensor | None, h_pre: torch.Tensor | None, through: bool):
        writes, reads = h_res is not None, h_pre is not None
        x = streams.contiguous()
        f = out.contiguous() if writes else None
        h, q, p = _kernel_weights(x, h_res, h_post, h_pre)
        y, a = _launch_forward(x, f, h, q, p)
        ctx.save_for_backward(x, f, h, q, p)
        ctx.writes, ctx.reads, ctx.through = writes, reads, through
        ctx.weight_dtypes = _dtypes(h_res, h_post, h_pre)
        ctx.df_dtype = out.dtype if writes else x.dtype
        ctx.set_materialize_grads(False)
        if writes:
            return (y, a) if reads else y
        return (a, x) if through else a

    @staticmethod
    def backward(ctx, *grads: torch.Tensor | None):  # type: ignore[override]
        writes, reads = ctx.writes, ctx.reads
        x, f, h, q, p = ctx.saved_tensors
        if writes:
            dy, da = grads if reads else (grads[0], None)
        else:
            da, dy = grads if ctx.through else (grads[0], None)
        if dy is None and da is None:
            return None, None, None, None, None, None
        dx, df, sums = _launch_backward(dy, da, x, f, h, q, p, ctx.df_dtype)
        return (dx, df, *_weight_grads(sums, x.shape[-2], ctx.weight_dtypes), None)


def _mix(streams: torch.Tensor, out: torch.Tensor | None, h_res: torch.Tensor | None, h_post: torch.Tensor | None,
         h_pre: torch.Tensor | None, through: bool):
    """The eager kernel path: a :class:`_Mix` node (``h_res``, ``h_post``, ``out``: all or none)."""
    return _Mix.apply(streams, out, h_res, h_post, h_pre, through)


# ----------------------------------------------------------------------------- the custom op pair
#
# The same kernels for torch.compile: a forward op and a backward op tied by
# register_autograd. A custom op's outputs may not alias its inputs and their number
# is fixed, so the forward returns (Y, a) always, an empty tensor for the one a node
# lacks, and a read passed through is left to autograd (read_through).


@torch.library.custom_op("sparsetrain::hyper_mix", mutates_args=())
def _mix_forward_op(streams: torch.Tensor, out: torch.Tensor | None, h_res: torch.Tensor | None,
                    h_post: torch.Tensor | None, h_pre: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    h, q, p = _kernel_weights(streams, h_res, h_post, h_pre)
    y, a = _launch_forward(streams.contiguous(), out.contiguous() if out is not None else None, h, q, p)
    return (y if y is not None else streams.new_empty(0)), (a if a is not None else streams.new_empty(0))


@_mix_forward_op.register_fake
def _(streams, out, h_res, h_post, h_pre):
    y = torch.empty_like(streams, memory_format=torch.contiguous_format) if h_res is not None else streams.new_empty(0)
    a = streams.new_empty(streams.shape[:-2] + streams.shape[-1:]) if h_pre is not None else streams.new_empty(0)
    return y, a


@torch.library.custom_op("sparsetrain::hyper_mix_backward", mutates_args=())
def _mix_backward_op(dy: torch.Tensor | None, da: torch.Tensor | None, streams: torch.Tensor,
                     out: torch.Tensor | None, h_res: torch.Tensor | None, h_post: torch.Tensor | None,
                     h_pre: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    h, q, p = _kernel_weights(streams, h_res, h_post, h_pre)
    dx, df, sums = _launch_backward(dy, da, streams.contiguous(), out.contiguous() if out is not None else None,
                                    h, q, p, out.dtype if out is not None else streams.dtype)
    return dx, (df if df is not None else streams.new_empty(0)), sums


@_mix_backward_op.register_fake
def _(dy, da, streams, out, h_res, h_post, h_pre):
    n = streams.shape[-2]
    df = torch.empty_like(out, memory_format=torch.contiguous_format) if out is not None else streams.new_empty(0)
    return (torch.empty_like(streams, memory_format=torch.contiguous_format), df,
            streams.new_empty(n * n + 2 * n, dtype=torch.float64))


def _mix_op_setup(ctx, inputs, output) -> None:
    streams, out, h_res, h_post, h_pre = inputs
    ctx.save_for_backward(streams, out, h_res, h_post, h_pre)


def _mix_op_backward(ctx, dy: torch.Tensor | None, da: torch.Tensor | None):
    streams, out, h_res, h_post, h_pre = ctx.saved_tensors
    if h_res is None:
        dy = None  # the zeros autograd gives the empty placeholder: the kernel would read past them
    dx, df, sums = _mix_backward_op(dy, da if h_pre is not None else None, streams, out, h_res, h_post, h_pre)
    return (dx, df if out is not None else None,
            *_weight_grads(sums, streams.shape[-2], _dtypes(h_res, h_post, h_pre)))


_mix_forward_op.register_autograd(_mix_op_backward, setup_context=_mix_op_setup)
