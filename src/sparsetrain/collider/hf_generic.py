"""Collider's generic path for Hugging Face causal LMs: exact for any model
built on the transformers attention registry whose positions mix only in
attention, but not the engine's speed (:func:`sparsetrain.collider.apply` takes
it when a layer has no block adapter, and refuses a model with another token
mixer: :func:`positions_mixed_outside_attention`).

The same objective as the engine: the loss is the mean over kept tokens, and
in every attention layer the keys and values of dropped positions are
constants. Two swaps make that hold and make it cheaper:

* **attention**: a registered attention function (``sparsetrain_collider``)
  calls the model's SDPA attention, with gradient hooks on the key and value
  tensors that zero the rows of dropped positions. With the loss on kept
  tokens only, no gradient then reaches a dropped position in any layer;
* **linear layers**: every ``nn.Linear`` of the model keeps its weights (the
  state dict is unchanged) but gets a backward that gathers the kept rows of
  its input and output gradient and runs its two GEMMs on ``[kept, features]``:
  exact, because the dropped rows of the output gradient are zero. The LM
  head's backward takes the compact ``[K, V]`` rows that
  :func:`~sparsetrain.collider.masked_cross_entropy` leaves for it.

Each forward of the swapped model makes a :class:`_Forward` (a forward
pre-hook on the model); the swapped layers capture it when they run, and the
logits carry its slot, which the kept-rows loss fills with its mask and rows.
So the keep mask travels with the loss, as in the engine (keep.py): no
process-wide state is needed, and ``collider.filter(keep)``, if given, must
agree with the loss's mask. With no kept-rows loss and no filter the backward
is the ordinary dense one.

Layers run outside such a forward behave densely, so activation
checkpointing's recomputation would lose the filter: hf.py refuses gradient
checkpointing on this path. The attention backward runs densely, and the
gathers are per linear layer rather than once per block.
"""

from __future__ import annotations

import threading
import types
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from .keep import KeepResolver, KeptRows
from .loss import SLOT_ATTR, RowGradSlot

ATTENTION_NAME = "sparsetrain_collider"


class _Forward:
    """One forward of an applied model: the slot its loss fills, and the keep
    mask its layers' backward resolve from it."""

    def __init__(self) -> None:
        self.slot = RowGradSlot()
        self.keep = KeepResolver(self.slot)
        self.shape: tuple[int, int] | None = None
        self.device: torch.device | None = None

    def saw(self, x: torch.Tensor) -> None:
        """A layer input ``[B, T, ...]``: the batch shape, from the first one seen."""
        if self.shape is None and x.dim() >= 3:
            self.shape, self.device = (int(x.shape[0]), int(x.shape[1])), x.device

    def kept(self, n_rows: int | None = None) -> KeptRows | None:
        """The backward's kept rows, or None for a dense backward (no mask anywhere)."""
        if self.shape is None:
            return None
        kept = self.keep.resolve(self.shape, self.device)
        if kept.keep is None:
            return None
        if n_rows is not None and n_rows != kept.tokens:
            raise ValueError(f"Collider keep mask has {kept.tokens} entries but the layer sees {n_rows} rows")
        return kept


_local = threading.local()  # the applied models' forwards running on this thread, innermost last


def _current() -> _Forward | None:
    stack = getattr(_local, "forwards", None)
    return stack[-1] if stack else None


def _push(module: nn.Module, args) -> None:
    if not hasattr(_local, "forwards"):
        _local.forwards = []
    _local.forwards.append(_Forward())


def _pop(module: nn.Module, args, output) -> None:
    _local.forwards.pop()


class _KeptRowsLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,  # type: ignore[override]
                fwd: _Forward | None) -> torch.Tensor:
        return _linear_forward(ctx, x, weight, bias, fwd)

    @staticmethod
    def backward(ctx, g: torch.Tensor):  # type: ignore[override]
        x, w = ctx.saved_tensors
        dt = ctx.compute_dtype
        g2 = g.reshape(-1, g.shape[-1]).to(dt)
        x2 = x.reshape(-1, x.shape[-1]).to(dt)
        kept = ctx.fwd.kept(g2.shape[0]) if ctx.fwd is not None else None
        if kept is not None:  # dropped rows of g are zero: both GEMMs on the kept rows only
            g_k, x_k = g2.index_select(0, kept.kidx), x2.index_select(0, kept.kidx)
            dx = torch.zeros_like(x2).index_copy_(0, kept.kidx, g_k @ w.to(dt))
        else:
            g_k, x_k = g2, x2
            dx = g2 @ w.to(dt)
        return _linear_grads(ctx, dx.view(x.shape).to(x.dtype), g_k, x_k, w)


def _linear_forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                    fwd: "_Forward | None") -> torch.Tensor:
    """``x @ weight.T + bias`` (under autocast: the autocast dtype, as nn.Linear
    would), saving what both kept-rows backwards read."""
    y = F.linear(x, weight, bias)
    ctx.save_for_backward(x, weight)
    ctx.has_bias, ctx.compute_dtype, ctx.fwd = bias is not None, y.dtype, fwd
    return y


def _linear_grads(ctx, dx: torch.Tensor, g_k: torch.Tensor, x_k: torch.Tensor, w: torch.Tensor):
    dw = (g_k.t() @ x_k).to(w.dtype)
    db = g_k.sum(0).to(w.dtype) if ctx.has_bias else None
    return dx, dw, db, None


class _KeptRowsHead(torch.autograd.Function):
    """The LM head: its backward starts the model's backward, taking the keep mask
    and the compact logit rows from the loss (see the module docstring)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,  # type: ignore[override]
                fwd: _Forward) -> torch.Tensor:
        return _linear_forward(ctx, x, weight, bias, fwd)

    @staticmethod
    def backward(ctx, g: torch.Tensor):  # type: ignore[override]
        x, w = ctx.saved_tensors
        dt, fwd = ctx.compute_dtype, ctx.fwd
        fwd.saw(x)
        fwd.keep.begin(fwd.shape, fwd.device)  # a backward starts here: the loss's mask, else filter's
        kept = fwd.kept()
        x2 = x.reshape(-1, x.shape[-1]).to(dt)
        if kept is None:
            g_k, x_k = g.reshape(-1, g.shape[-1]).to(dt), x2
            dx = g_k @ w.to(dt)
        else:
            g_k, x_k = fwd.keep.logit_rows(g, dt), x2.index_select(0, kept.kidx)
            dx = torch.zeros_like(x2).index_copy_(0, kept.kidx, g_k @ w.to(dt))
        return _linear_grads(ctx, dx.view(x.shape).to(x.dtype), g_k, x_k, w)


def _kept_rows_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    fwd = _current()
    if fwd is not None:
        fwd.saw(x)
    return _KeptRowsLinear.apply(x, self.weight, self.bias, fwd)


def _kept_rows_head_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    fwd = _current()
    if fwd is None:
        return _KeptRowsLinear.apply(x, self.weight, self.bias, None)
    fwd.saw(x)
    y = _KeptRowsHead.apply(x, self.weight, self.bias, fwd)
    setattr(y, SLOT_ATTR, fwd.slot)  # masked_cross_entropy leaves its mask and rows here
    return y


def _dropped_rows_zeroed(fwd: _Forward):
    """Gradient hook for ``[B, heads, T, hd]`` keys/values of one forward: zero
    dropped positions' rows."""
    def hook(grad: torch.Tensor) -> torch.Tensor:
        kept = fwd.kept()
        if kept is None or kept.keep is None:
            return grad
        return grad * kept.keep[:, None, :, None].to(grad.dtype)
    return hook


def collider_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                       attention_mask: torch.Tensor | None, **kwargs):
    """The model's SDPA attention with dropped positions' keys and values made
    constant in the backward of the forward it runs in."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    fwd = _current()
    if fwd is not None:
        for t in (key, value):
            if t.requires_grad:
                t.register_hook(_dropped_rows_zeroed(fwd))
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


# attention kinds of a config's ``layer_types`` that go through the attention registry
_ATTENTION_LAYER_TYPES = {"full_attention", "sliding_attention", "chunked_attention", "attention"}
# module names of sequence mixers that run outside it (state-space, linear-attention, recurrent)
_MIXER_NAMES = ("mamba", "ssm", "deltanet", "linearattention", "rwkv", "retention", "shortconv", "hyena")


def positions_mixed_outside_attention(model: nn.Module) -> str | None:
    """Where ``model`` mixes positions other than through registered attention (a
    convolution over the sequence, a state-space or linear-attention layer), in one
    line; None when attention is its only token mixer. The generic path is exact only
    then: it cuts dropped positions' gradients in attention and drops the dropped rows
    of every linear layer's output gradient, which such a mixer fills."""
    kinds = getattr(getattr(model, "config", None), "layer_types", None) or ()
    other = sorted({str(k) for k in kinds if str(k) not in _ATTENTION_LAYER_TYPES})
    if other:
        return f"{type(model).__name__} has {', '.join(other)} layers (config.layer_types)"
    for name, m in model.named_modules():
        cls = type(m).__name__
        # Conv1d: over the sequence (LFM2, Mamba); a vision tower's patch convolutions are 2-D or 3-D
        if isinstance(m, nn.Conv1d) or any(k in cls.lower() for k in _MIXER_NAMES):
            return f"{type(model).__name__} mixes positions in {name} ({cls}), outside attention"
    return None


@dataclass
class GenericSwap:
    """What :func:`swap_in` changed, for :func:`swap_out`."""

    attn_implementation: str | None
    linears: list[nn.Linear] = field(default_factory=list)
    hooks: list = field(default_factory=list)


def swap_in(model: nn.Module) -> GenericSwap:
    """Swap the attention implementation and every ``nn.Linear``'s backward of
    ``model`` (in place; the state dict is unchanged)."""
    try:
        from transformers import AttentionInterface
    except ImportError as e:  # pragma: no cover - depends on the install
        raise ImportError("sparsetrain.collider.apply needs transformers") from e
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError("collider.apply found no nn.Linear layers to swap")
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    swap = GenericSwap(getattr(model.config, "_attn_implementation", None), linears)
    AttentionInterface.register(ATTENTION_NAME, collider_attention)
    _set_attention(model, ATTENTION_NAME)
    for module in linears:
        fn = _kept_rows_head_forward if module is head else _kept_rows_forward
        module.forward = types.MethodType(fn, module)
    swap.hooks = [model.register_forward_pre_hook(_push), model.register_forward_hook(_pop, always_call=True)]
    return swap


def swap_out(model: nn.Module, swap: GenericSwap) -> None:
    """Undo :func:`swap_in`: the linear layers' own forward, the attention
    implementation the model had, no hooks."""
    for h in swap.hooks:
        h.remove()
    for module in swap.linears:
        module.__dict__.pop("forward", None)
    if swap.attn_implementation is not None:
        _set_attention(model, swap.attn_implementation)


def _set_attention(model: nn.Module, name: str) -> None:
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(name)
    else:  # older transformers
        model.config._attn_implementation = name
