"""The block protocol: how Collider runs one kind of transformer block.

The engine (engine.py) runs each block as an autograd node of its own and
asks the block's adapter for the math:

* :meth:`BlockAdapter.forward` -- the block on all tokens (the model's own
  numerics), returning the output and whatever the compact backward needs;
* :meth:`BlockAdapter.backward` -- given the gradient at the block output on
  the kept rows only (:class:`RowGrad`, ``[K, *features]``), the gradient at
  the block input on the same rows and the gradients of the block's parameters.

Adapters are found by the block's class (its MRO, so a class wrapped by a
subclass, as FSDP2 does, still finds its adapter) in a registry:
:func:`register_block_adapter`. The sparsetrain GPT block's adapter is in
``gpt_block.py``. Another architecture (a Hugging Face Llama, Qwen2 or Mistral
decoder layer) registers its own without touching the engine: its forward
reads the rotary tables from ``run.rope`` (whatever form its attention takes,
e.g. HF's ``position_embeddings``), and its backward composes the pieces the
engine offers: :func:`~sparsetrain.collider.attention.kept_rows_backward` for
the attention, hand-written kept-row GEMMs (:mod:`~sparsetrain.collider.compact`)
where speed matters, and :func:`~sparsetrain.collider.positionwise.rows_vjp`
(exact, by recomputation on the kept rows) for any position-wise part
(SwiGLU with biases, RMSNorm with a weight, hyper-connection mixing).
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn

if TYPE_CHECKING:
    from .engine import ColliderPass


@dataclass
class RowGrad:
    """A gradient at the kept rows only: ``rows`` ``[K, *features]`` in the residual
    stream's precision, and, when the kernel that wrote them also wrote it, the
    same rows in the compute dtype (``rows_c``: the next GEMMs read it without a
    cast kernel of their own)."""

    rows: torch.Tensor
    rows_c: torch.Tensor | None = None

    def compute(self, dtype: torch.dtype) -> torch.Tensor:
        """The rows in ``dtype`` (the compute dtype of the next GEMM)."""
        if self.rows_c is not None and self.rows_c.dtype == dtype:
            return self.rows_c
        return self.rows.to(dtype)


class BlockAdapter(abc.ABC):
    """Collider's view of one block module (``self.block``)."""

    def __init__(self, block: nn.Module) -> None:
        self.block = block
        # where the block registers parameters, found once; what is registered
        # there is read at each call (FSDP2 swaps sharded and unsharded ones)
        self._slots = [(m, n) for m in block.modules() for n in m._parameters] if block is not None else []

    def parameters(self) -> list[nn.Parameter]:
        """The parameters the block's node takes as inputs and returns gradients
        for: every trainable parameter of the block, as registered at call time."""
        out: dict[int, nn.Parameter] = {}
        for m, n in self._slots:
            p = m._parameters[n]
            if p is not None and p.requires_grad:
                out.setdefault(id(p), p)
        return list(out.values())

    @abc.abstractmethod
    def forward(self, x: torch.Tensor, run: ColliderPass) -> tuple[torch.Tensor, Any]:
        """The block on all tokens, without autograd: ``(output, saved)``."""

    @abc.abstractmethod
    def backward(self, saved: Any, grad: RowGrad, run: ColliderPass) -> tuple[RowGrad, dict[int, torch.Tensor]]:
        """From the output gradient at the kept rows (``run.kept``) to the input
        gradient at the same rows and ``{id(parameter): gradient}``."""


_ADAPTERS: dict[type, Callable[[nn.Module], BlockAdapter]] = {}


def register_block_adapter(block_type: type, factory: Callable[[nn.Module], BlockAdapter]) -> None:
    """Collider runs blocks of ``block_type`` (and its subclasses) through ``factory(block)``."""
    _ADAPTERS[block_type] = factory


def block_adapter(block: nn.Module) -> BlockAdapter:
    """The adapter for ``block``, by the first class of its MRO that has one."""
    for cls in type(block).__mro__:
        if cls in _ADAPTERS:
            return _ADAPTERS[cls](block)
    raise ValueError(f"Collider has no block adapter for {type(block).__name__}: "
                     "register one with sparsetrain.collider.register_block_adapter")
