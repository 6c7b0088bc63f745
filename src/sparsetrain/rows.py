"""Row moves whose backward is a plain gather or scatter, never an atomic add.

``x.index_select(0, index)`` is differentiable as is, but its backward is an
``index_add``: an atomic scatter-add that on an H200 took 0.28 ms for one
16k x 2048 bf16 gradient in a compiled ResNet-BK layer
(bench/results/bk_profile_compiled_bf16_h200.json), several times a gather's
cost. When no row is picked twice, each gradient row has exactly one
destination, and a plain ``index_copy`` (or, for a permutation, a gather by
the inverse) gives the same result with no atomics.
"""

from __future__ import annotations

import torch


@torch.library.custom_op("sparsetrain::gather_rows", mutates_args=())
def _gather_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    # a custom op rather than an autograd.Function: dynamo cannot trace an
    # autograd.Function whose inputs' sizes derive from a float (the top-k
    # keep count of a BK layer), while a custom op's autograd goes through
    # AOTAutograd like any aten op
    return x.index_select(0, index)


@_gather_rows.register_fake
def _(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    return x.new_empty((index.shape[0], *x.shape[1:]))


def _gather_rows_setup(ctx, inputs, output) -> None:
    x, index = inputs
    ctx.save_for_backward(index)
    ctx.rows = x.shape[0]


def _gather_rows_backward(ctx, grad: torch.Tensor):
    (index,) = ctx.saved_tensors
    # rows that were not picked get 0; when every row was picked, each is overwritten
    out = grad.new_empty if index.shape[0] == ctx.rows else grad.new_zeros
    return out((ctx.rows, *grad.shape[1:])).index_copy_(0, index, grad), None


_gather_rows.register_autograd(_gather_rows_backward, setup_context=_gather_rows_setup)


def gather_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``x.index_select(0, index)`` for an ``index`` with no repeats (not
    checked: a repeated row would get one of its gradients, not their sum).
    The backward scatters each row's gradient back with ``index_copy``."""
    return _gather_rows(x, index)


class _PermuteRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, perm: torch.Tensor, inv: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(inv)
        return x.index_select(0, perm)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        (inv,) = ctx.saved_tensors
        return grad.index_select(0, inv), None, None


def permute_rows(x: torch.Tensor, perm: torch.Tensor, inv: torch.Tensor) -> torch.Tensor:
    """``x[perm]`` along the rows for a permutation ``perm`` with inverse ``inv``
    (``inv[perm] = arange``): a gather forward and a gather by ``inv`` backward."""
    return _PermuteRows.apply(x, perm, inv)
