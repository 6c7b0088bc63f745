"""Mean cross-entropy over ``[N, V]`` logits with one read of the logits per direction.

The plain-torch loss, ``F.cross_entropy(logits.float(), targets)``, writes a
float32 copy of the logits, a float32 log-softmax that autograd keeps, a
float32 gradient and its cast back: at 16k tokens and the d20 preset's 65k
vocabulary that is 4 GB per float32 tensor and tens of GB of traffic per step.

The two custom ops below run two Triton kernels instead:

* forward: the row-statistics kernel of the token scorers
  (:func:`sparsetrain.selection.triton_scores.row_stats_triton`) streams each
  row once for its log-sum-exp and the target's negative log-likelihood;
* backward: :func:`_ce_grad_kernel` reads each row once more and writes
  ``(softmax - onehot) * grad / n_valid`` straight in the logits' dtype, with
  ``grad`` read from device memory (no host sync), rounded once.

Float32 arithmetic throughout, as the reference; rows whose target is
``IGNORE_INDEX`` give 0 loss and 0 gradient; with no valid row at all the loss
is NaN, as ``F.cross_entropy``'s. The ops are opaque to ``torch.compile``,
which keeps them in its graph; off CUDA the reference runs, and CPU tests run
the kernels in Triton's interpreter.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import kernels
from .numerics import IGNORE_INDEX, upcast
from .triton_util import interpreting

try:
    import triton
    import triton.language as tl

    from .triton_util import bf16_bits_rne
except ImportError:  # pragma: no cover - depends on the install
    triton = None



def __getattr__(name: str):
    """``FUSED``, read-only: the current :class:`~sparsetrain.kernels.KernelPolicy`'s
    ``fused_cross_entropy``, for code that reads it as a module flag (set
    it with ``kernels.using(fused_cross_entropy=...)``)."""
    if name == "FUSED":
        return kernels.current().fused_cross_entropy
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def fused_ok(logits: torch.Tensor) -> bool:
    """Can the fused kernels take ``logits`` ``[N, V]`` (float, on CUDA or in Triton's interpreter)?"""
    return (triton is not None and logits.dim() == 2 and (logits.is_cuda or interpreting())
            and logits.dtype in (torch.bfloat16, torch.float16, torch.float32))


if triton is not None:

    @triton.jit
    def _ce_grad_kernel(logits_ptr, targets_ptr, rows_ptr, lse_ptr, scale_ptr, grad_ptr, V, stride_row, grad_stride,
                        ignore_index, BLOCK: tl.constexpr, ROUND_BF16: tl.constexpr, GATHER: tl.constexpr,
                        PER_ROW: tl.constexpr):
        # one program: BLOCK columns of one output row; GATHER: it reads logits row rows[i];
        # PER_ROW: output row i's scale is scale[i], else scale[0] for every row
        row = tl.program_id(0).to(tl.int64)
        if GATHER:
            src = tl.load(rows_ptr + row).to(tl.int64)
        else:
            src = row
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        inb = cols < V
        tgt = tl.load(targets_ptr + src).to(tl.int64)
        if PER_ROW:
            s = tl.load(scale_ptr + row)
        else:
            s = tl.load(scale_ptr)
        scale = tl.where(tgt != ignore_index, s, 0.0)
        x = tl.load(logits_ptr + src * stride_row + cols, mask=inb, other=0.0).to(tl.float32)
        g = (tl.exp(x - tl.load(lse_ptr + row)) - tl.where(cols == tgt, 1.0, 0.0)) * scale
        if ROUND_BF16:  # the interpreter truncates to bf16: round to nearest even first, as the GPU does
            g = (bf16_bits_rne(g) << 16).to(tl.float32, bitcast=True)
        tl.store(grad_ptr + row * grad_stride + cols, g.to(grad_ptr.dtype.element_ty), mask=inb)


# Two torch custom ops tied by register_autograd, so torch.compile keeps the
# kernels in its graph as opaque nodes instead of lowering F.cross_entropy.
@torch.library.custom_op("sparsetrain::cross_entropy", mutates_args=())
def _ce_forward(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(mean loss, per-row log-sum-exp, number of rows with a target)``."""
    from .selection.triton_scores import row_stats_triton

    stats = row_stats_triton(logits, targets, IGNORE_INDEX)
    count = stats.valid.sum()
    return stats.nll.sum() / count, stats.lse, count


@_ce_forward.register_fake
def _(logits, targets):
    f32 = torch.float32
    return logits.new_empty((), dtype=f32), logits.new_empty(logits.shape[:1], dtype=f32), targets.new_empty((), dtype=torch.int64)


def cross_entropy_grad(logits: torch.Tensor, targets: torch.Tensor, lse: torch.Tensor, scale: torch.Tensor,
                       rows: torch.Tensor | None = None) -> torch.Tensor:
    """``(softmax - onehot) * scale`` of ``logits`` ``[N, V]`` in one read of each row,
    in the logits' dtype; rows whose target is ``IGNORE_INDEX`` get 0. ``lse``: each
    row's log-sum-exp (float32), ``scale``: a 1-element float32 tensor (read on the
    device), or one per output row (a weighted loss). ``rows``: only those rows of ``logits`` (and ``targets``), giving
    ``[len(rows), V]`` and ``lse`` per listed row. Where :func:`fused_ok`;
    :func:`cross_entropy_grad_reference` is the plain-torch equal."""
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    V = logits.shape[1]
    n = logits.shape[0] if rows is None else rows.numel()
    out = torch.empty((n, V), dtype=logits.dtype, device=logits.device)
    block = min(4096, triton.next_power_of_2(V))
    per_row = scale.numel() != 1
    if per_row and scale.numel() != n:
        raise ValueError(f"scale has {scale.numel()} elements for {n} rows (give 1, or one per row)")
    if n:
        targets = targets.contiguous()
        _ce_grad_kernel[(n, triton.cdiv(V, block))](
            logits, targets, rows.contiguous() if rows is not None else targets, lse, scale.reshape(-1).contiguous(), out,
            V, logits.stride(0), out.stride(0), IGNORE_INDEX, BLOCK=block,
            ROUND_BF16=interpreting() and logits.dtype == torch.bfloat16, GATHER=rows is not None, PER_ROW=per_row,
            num_warps=8)
    return out


def cross_entropy_grad_reference(logits: torch.Tensor, targets: torch.Tensor, lse: torch.Tensor,
                                 scale: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`cross_entropy_grad` in plain torch (float32 arithmetic; float64 stays)."""
    if rows is not None:
        logits, targets = logits.index_select(0, rows), targets.index_select(0, rows)
    x = upcast(logits)
    per_row = scale.reshape(-1) if scale.numel() != 1 else scale.reshape(())
    w = torch.where(targets != IGNORE_INDEX, per_row.to(x.dtype), 0.0)[:, None]
    onehot = torch.arange(x.shape[1], device=x.device)[None, :] == targets[:, None]
    return ((torch.exp(x - lse[:, None].to(x.dtype)) - onehot.to(x.dtype)) * w).to(logits.dtype)


@torch.library.custom_op("sparsetrain::cross_entropy_backward", mutates_args=())
def _ce_backward(grad: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor, lse: torch.Tensor,
                 count: torch.Tensor) -> torch.Tensor:
    """``(softmax - onehot) * grad / count`` on rows with a target, 0 elsewhere, in the logits' dtype."""
    return cross_entropy_grad(logits, targets, lse, grad.float() / count)


@_ce_backward.register_fake
def _(grad, logits, targets, lse, count):
    return torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)


def _setup_context(ctx, inputs, output) -> None:
    logits, targets = inputs
    _, lse, count = output
    ctx.save_for_backward(logits, targets, lse, count)


def _grad(ctx, grad, _lse_grad, _count_grad):
    return _ce_backward(grad, *ctx.saved_tensors), None


_ce_forward.register_autograd(_grad, setup_context=_setup_context)


def cross_entropy_reference(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``F.cross_entropy`` in float32 (float64 stays) over rows with a target."""
    return F.cross_entropy(upcast(logits), targets, ignore_index=IGNORE_INDEX)


def fused_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The fused kernels' mean cross-entropy (see the module docstring); where
    :func:`fused_ok`. Targets must lie in ``[0, V)`` or be ``IGNORE_INDEX``:
    checked on the device without a host sync (a device-side assert)."""
    if targets.shape != logits.shape[:1]:
        raise ValueError(f"targets {tuple(targets.shape)} do not match logits {tuple(logits.shape)}")
    targets = targets.contiguous()
    ok = (targets == IGNORE_INDEX) | ((targets >= 0) & (targets < logits.shape[1]))
    torch._assert_async(ok.all(), "cross_entropy: a target is outside [0, vocab_size) and not IGNORE_INDEX")
    return _ce_forward(logits, targets)[0]


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor,
                  policy: kernels.KernelPolicy | None = None) -> torch.Tensor:
    """Mean cross-entropy of ``logits`` ``[N, V]`` against ``targets`` ``[N]``
    (``IGNORE_INDEX`` rows left out), in float32 arithmetic: the fused kernels
    for CUDA tensors (eager or compiled) where ``policy`` (default
    :func:`sparsetrain.kernels.current`) allows, else :func:`cross_entropy_reference`."""
    if (policy or kernels.current()).fused_cross_entropy and logits.is_cuda and fused_ok(logits):
        return fused_cross_entropy(logits, targets)
    return cross_entropy_reference(logits, targets)
