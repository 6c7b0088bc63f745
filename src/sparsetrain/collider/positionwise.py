"""The exact compact backward of any position-wise map, by recomputation.

A position-wise map (an FFN, a norm, hyper-connection mixing: each token's
output depends on that token's input only) has, at the kept rows, the
gradient of the same map applied to the kept rows alone. :func:`rows_vjp`
recomputes the map's forward on the kept rows under autograd and
back-propagates the compact gradient rows through it: ``[K, ...]`` in,
``[K, ...]`` and the parameters' gradients out. It is what every part of a
block without a hand-written compact backward gets.

The recomputation runs on detached copies of the parameters put in the
modules' places for its duration, so it touches neither ``.grad`` nor
parameter hooks: the gradients it returns are handed to autograd by the
block's own node, once. A module whose forward has side effects may define
``recompute_context()``, a context manager under which a forward leaves them
alone (:class:`~sparsetrain.sparse24.ffn.Sparse24FFN`: its statistics).

A map that is not exactly position-wise in its backward gets the backward of
the map applied to the kept rows as its batch (``relu2_24``'s token-wise 2:4
pruning of the weight gradients groups kept rows; see README.md).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence

import torch
import torch.nn as nn

ParamSlot = tuple[nn.Module, str]  # a parameter, as where it is registered: (module, name)


def parameter_slots(*modules: nn.Module) -> list[ParamSlot]:
    """Every ``(module, name)`` that registers a parameter requiring grad, in
    ``modules`` and their children (a parameter registered twice, as tied
    weights are, appears twice)."""
    out: list[ParamSlot] = []
    seen: set[int] = set()
    for top in modules:
        for m in top.modules():
            if id(m) in seen:
                continue
            seen.add(id(m))
            out.extend((m, n) for n, p in m._parameters.items() if p is not None and p.requires_grad)
    return out


@contextlib.contextmanager
def _substituted(slots: Sequence[ParamSlot], values: dict[int, torch.Tensor]) -> Iterator[None]:
    """Each slot's parameter replaced by ``values[id(parameter)]`` for the block's duration."""
    old = [m._parameters[n] for m, n in slots]
    try:
        for (m, n), p in zip(slots, old):
            m._parameters[n] = values[id(p)]
        yield
    finally:
        for (m, n), p in zip(slots, old):
            m._parameters[n] = p


@contextlib.contextmanager
def _recomputing(modules: Sequence[nn.Module]) -> Iterator[None]:
    with contextlib.ExitStack() as stack:
        seen: set[int] = set()
        for top in modules:
            for m in top.modules():
                if id(m) not in seen and hasattr(m, "recompute_context"):
                    seen.add(id(m))
                    stack.enter_context(m.recompute_context())
        yield


def rows_vjp(fn: Callable[..., torch.Tensor], inputs: Sequence[torch.Tensor], grad: torch.Tensor,
             modules: Sequence[nn.Module] = (), slots: Sequence[ParamSlot] | None = None,
             autocast: contextlib.AbstractContextManager | None = None
             ) -> tuple[list[torch.Tensor | None], dict[int, torch.Tensor]]:
    """Gradients of the position-wise ``fn(*inputs)`` for output gradient ``grad``.

    ``inputs``: the kept rows ``[K, ...]`` of each input; ``grad``: the kept
    rows of the output's gradient. ``fn`` reads the parameters of ``modules``
    (or exactly those of ``slots``), which are swapped for detached leaves
    while it runs; ``autocast``: the context the map ran under in the forward
    (so the recomputation rounds as it did). Returns the inputs' gradients
    (None for inputs that do not take one) and ``{id(parameter): gradient}``
    for the parameters ``fn`` used.
    """
    slots = parameter_slots(*modules) if slots is None else list(slots)
    params = {id(p): p for p in (m._parameters[n] for m, n in slots)}
    leaves = {k: p.detach().requires_grad_(True) for k, p in params.items()}
    xs = [t.detach().requires_grad_(t.is_floating_point()) for t in inputs]
    with torch.enable_grad(), _substituted(slots, leaves), _recomputing(modules), \
            (autocast if autocast is not None else contextlib.nullcontext()):
        out = fn(*xs)
    wrt = [x for x in xs if x.requires_grad] + list(leaves.values())
    got = torch.autograd.grad(out, wrt, grad.to(out.dtype), allow_unused=True)
    it = iter(got)
    x_grads = [next(it) if x.requires_grad else None for x in xs]
    p_grads = {k: g for k, g in zip(leaves, it) if g is not None}
    return x_grads, p_grads
