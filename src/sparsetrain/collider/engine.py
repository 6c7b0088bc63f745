"""Collider's engine: each block an autograd node, compact gradients between them.

A Collider forward runs densely on all tokens, one autograd node per block
(:class:`_BlockNode`, the block's parameters among its inputs), so autograd
calls each block's backward in turn and accumulates that block's parameter
gradients as soon as it returns them: parameter hooks, module hooks (the
block is called through its own ``__call__``) and DDP's bucket all-reduces
happen block by block.

Between blocks the gradient exists only at the kept rows, ``[K, *features]``
(:class:`~sparsetrain.collider.blocks.RowGrad`). It travels in the forward's
:class:`ColliderPass`, a side channel keyed by boundary (block ``i`` reads
boundary ``i + 1`` and writes boundary ``i``); autograd carries a stride-0
zero tensor in its place, so no ``[N, D]`` gradient is ever written. A real
gradient arriving at a boundary as well (extra heads reading the trunk, a
loss on hidden states) is added at the kept rows: the channel tells it from
its own zero by identity.

The keep mask comes with the loss (keep.py): the first backward node of the
forward takes it from the slot the logits carry, and the last clears it.

Exact semantics, with ``keep`` the tokens whose loss counts:

* dropped positions' keys and values are constants in every attention layer
  (stop-gradient), so dropped positions receive no gradient anywhere;
* kept positions and all weights get the exact gradient of that objective;
* keep-all reproduces dense training's gradients.

``tests/test_collider.py`` checks all three against a float64 reference that
detaches dropped keys and values in an ordinary autograd forward.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn as nn

from .attention import CudnnFallback
from .blocks import BlockAdapter, RowGrad
from .keep import KeepResolver, KeptRows
from .loss import RowGradSlot, is_same_tensor
from .positionwise import ParamSlot, parameter_slots, rows_vjp

_TWICE = ("a Collider backward ran twice through one forward; retain_graph is not supported: "
          "run the forward again")


class ColliderPass:
    """One Collider forward and its backward: what the forward's nodes share.

    Forward side: the batch shape, the compute dtype (autocast's, else the
    weights'), the caller's autocast for module calls, whether pieces are
    compiled, the attention backward mode, the engine's cuDNN fallback
    (:class:`~sparsetrain.collider.attention.CudnnFallback`) and the rotary tables. Backward
    side: the kept rows (:attr:`kept`), the compact gradients in transit
    between nodes, and ``scratch``, buffers an adapter shares between its
    layers within one backward (the kept rows are the same in every layer).
    """

    def __init__(self, shape: tuple[int, int], device: torch.device, compute_dtype: torch.dtype,
                 autocast_dtype: torch.dtype | None, compile: bool = False, attention: str = "auto",
                 rope: Any = None, slot: RowGradSlot | None = None, cudnn: CudnnFallback | None = None) -> None:
        self.shape = (int(shape[0]), int(shape[1]))
        self.device = device
        self.compute_dtype = compute_dtype
        self.autocast_dtype = autocast_dtype
        self.compile = compile
        self.attention = attention
        self.cudnn = cudnn
        self.rope = rope
        self.slot = slot if slot is not None else RowGradSlot(compile)
        self.scratch: dict[str, Any] = {}
        self._keep = KeepResolver(self.slot)
        self._rows: dict[int, RowGrad] = {}
        self._markers: dict[int, torch.Tensor] = {}
        self._produced: set[int] = set()  # boundaries a node of this forward wrote (so will read back)
        self._zero: torch.Tensor | None = None  # what the stride-0 zeros handed to autograd expand

    # ------------------------------------------------------------------ forward side

    def module_autocast(self) -> contextlib.AbstractContextManager:
        """The caller's autocast, for module calls (nodes run their own pieces with it off)."""
        return torch.autocast(self.device.type, dtype=self.autocast_dtype or torch.get_autocast_dtype(self.device.type),
                              enabled=self.autocast_dtype is not None)

    def produced(self, key: int) -> None:
        """A node of this forward wrote boundary ``key``."""
        self._produced.add(key)

    # ------------------------------------------------------------------ backward side

    @property
    def kept(self) -> KeptRows:
        """The kept rows of the running backward."""
        return self._keep.resolve(self.shape, self.device)

    def begin(self) -> KeptRows:
        """A backward starts at the logits: take the loss's keep mask afresh."""
        self._rows.clear()
        self._markers.clear()
        self.scratch.clear()
        return self._keep.begin(self.shape, self.device)

    def finish(self) -> None:
        """The backward has passed the first node: drop its state."""
        self._rows.clear()
        self._markers.clear()
        self.scratch.clear()
        self._keep.finish()

    def take(self, key: int, grad: torch.Tensor | None, like: tuple[torch.Size, torch.dtype]) -> RowGrad:
        """The gradient at boundary ``key``, kept rows only: the rows the next node
        left, plus the kept rows of ``grad`` (what autograd brought) when it is
        a real gradient rather than the zero that came with those rows."""
        kept = self.kept
        g = self._rows.pop(key, None)
        marker = self._markers.pop(key, None)
        if grad is not None and not (marker is not None and is_same_tensor(grad, marker)):
            real = kept.rows(grad)
            g = RowGrad(real) if g is None else RowGrad(g.rows + real.to(g.rows.dtype))
        if g is None:  # no gradient reached this boundary
            shape, dtype = like
            g = RowGrad(torch.zeros(kept.count, *shape[2:], dtype=dtype, device=self.device))
        return g

    def give(self, key: int, grad: RowGrad, like: tuple[torch.Size, torch.dtype], needed: bool) -> torch.Tensor | None:
        """Hand the gradient at boundary ``key`` (kept rows) on: to the node of
        this forward that wrote it, through the channel, with a stride-0 zero
        for autograd; to anything else as a full gradient (zero at dropped rows).
        The first node of the chain ends the backward."""
        shape, dtype = like
        if not needed or key not in self._produced:
            out = None
            if needed:
                kept = self.kept
                out = torch.zeros(kept.tokens, *shape[2:], dtype=dtype, device=self.device)
                out = out.index_copy_(0, kept.kidx, grad.rows.to(dtype)).view(shape)
            self.finish()
            return out
        if self._zero is None or self._zero.dtype != dtype:  # one scalar per forward: no fill kernel per block
            self._zero = torch.zeros((), dtype=dtype, device=self.device)
        marker = self._zero.expand(shape)
        self._rows[key] = grad
        self._markers[key] = marker
        return marker

    def logit_rows(self, dlogits: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
        """The logits' gradient at the kept rows (:meth:`KeepResolver.logit_rows`)."""
        self._keep.resolve(self.shape, self.device)
        return self._keep.logit_rows(dlogits, dtype)


def _meta(t: torch.Tensor) -> tuple[torch.Size, torch.dtype]:
    return t.shape, t.dtype


def parameter_grads(params: Sequence[torch.Tensor], grads: dict[int, torch.Tensor], needs: Sequence[bool]
                    ) -> list[torch.Tensor | None]:
    """Each parameter's gradient from ``grads`` in its own dtype (None where not needed)."""
    out: list[torch.Tensor | None] = []
    for p, need in zip(params, needs):
        g = grads.get(id(p)) if need else None
        out.append(g if g is None or g.dtype == p.dtype else g.to(p.dtype))
    return out


class _BlockNode(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, run: ColliderPass, key: int, adapter: BlockAdapter,  # type: ignore[override]
                *params: torch.Tensor) -> torch.Tensor:
        ctx.set_materialize_grads(False)
        y, saved = adapter.forward(x, run)
        ctx.run, ctx.key, ctx.adapter, ctx.saved, ctx.params = run, key, adapter, saved, params
        ctx.x_meta, ctx.y_meta = _meta(x), _meta(y)
        run.produced(key + 1)
        return y

    @staticmethod
    def backward(ctx, dy: torch.Tensor | None):  # type: ignore[override]
        if ctx.saved is None:
            raise RuntimeError(_TWICE)
        run = ctx.run
        grad = run.take(ctx.key + 1, dy, ctx.y_meta)
        grad_in, grads = ctx.adapter.backward(ctx.saved, grad, run)
        ctx.saved = None  # free activations as soon as possible
        dx = run.give(ctx.key, grad_in, ctx.x_meta, ctx.needs_input_grad[0])
        return (dx, None, None, None, *parameter_grads(ctx.params, grads, ctx.needs_input_grad[4:]))


def call_with_forward(module: nn.Module, forward: Callable[..., Any], *args: Any,
                      call: Callable[..., Any] | None = None) -> Any:
    """``module(*args)`` with ``forward`` as its forward for this call: the
    module's ``__call__`` runs, so its forward pre-hooks run before ``forward``
    reads any parameter and its forward hooks see what ``forward`` returns.

    This is how the engine's nodes meet the hooks data parallelism puts on
    modules: FSDP2's pre-forward hook unshards the module's parameters (and
    registers its post-backward on the forward inputs that require grad), its
    post-forward hook reshards them and registers its pre-backward unshard on
    the outputs. A node that takes the parameters registered at call time as
    inputs then returns its gradients to the unsharded parameters, which
    FSDP2's post-backward reduce-scatters. ``call``: how to call the module
    instead of its own ``__call__`` (``nn.Module.__call__`` for a class whose
    ``__call__`` does more, such as checkpointing the layer)."""
    # set in the instance dict directly (nn.Module.__setattr__'s checks cost more than the call)
    d = module.__dict__
    had, old = "forward" in d, d.get("forward")
    d["forward"] = forward
    try:
        return module(*args) if call is None else call(module, *args)
    finally:
        if had:
            d["forward"] = old
        else:
            del d["forward"]


def run_block(block: nn.Module | None, adapter: BlockAdapter, x: torch.Tensor, run: ColliderPass, key: int,
              call: Callable[[nn.Module, torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """``block`` on ``x`` as a Collider node reading boundary ``key`` and writing
    ``key + 1``. The block is called through its ``__call__`` with the node as
    its forward (:func:`call_with_forward`), so its forward hooks and full
    backward hooks fire as for an ordinary call, once per forward and once per
    backward, and the parameters are read after its pre-forward hooks ran.
    ``block=None``: a node without a module (the adapter alone). ``call``: as
    for :func:`call_with_forward` (the adapter recomputes what it needs itself)."""
    def node(x_: torch.Tensor) -> torch.Tensor:
        return _BlockNode.apply(x_, run, key, adapter, *adapter.parameters())

    if block is None:
        return node(x)
    return call_with_forward(block, node, x, call=call)


class PositionwiseAdapter(BlockAdapter):
    """A position-wise map as a node of its own: ``fn(x)`` reading the
    parameters of ``modules`` (or exactly ``slots``), with the exact compact
    backward of :func:`~sparsetrain.collider.positionwise.rows_vjp`."""

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor], modules: Sequence[nn.Module] = (),
                 slots: Sequence[ParamSlot] | None = None) -> None:
        super().__init__(None)  # type: ignore[arg-type]
        self.fn, self.modules = fn, tuple(modules)
        self.slots = list(slots) if slots is not None else None

    def _param_slots(self) -> list[ParamSlot]:
        return self.slots if self.slots is not None else parameter_slots(*self.modules)

    def parameters(self) -> list[nn.Parameter]:
        return list({id(p): p for p in (m._parameters[n] for m, n in self._param_slots())}.values())

    def forward(self, x: torch.Tensor, run: ColliderPass) -> tuple[torch.Tensor, Any]:
        with run.module_autocast():
            return self.fn(x), x

    def backward(self, saved: Any, grad: RowGrad, run: ColliderPass) -> tuple[RowGrad, dict[int, torch.Tensor]]:
        (dx,), grads = rows_vjp(self.fn, [run.kept.rows(saved)], grad.rows, self.modules, self._param_slots(),
                                run.module_autocast())
        return RowGrad(dx), grads


__all__ = ["ColliderPass", "PositionwiseAdapter", "call_with_forward", "parameter_grads", "run_block"]
