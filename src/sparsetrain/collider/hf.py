"""Collider for Hugging Face causal LMs (Llama, Qwen2, and others built on the
transformers attention registry): ``sparsetrain.collider.apply(model)``.

The same objective as the engine: the loss is the mean over kept tokens, and
in every attention layer the keys and values of dropped positions are
constants. Two swaps make that hold and make it cheaper:

* **attention**: a registered attention function (``sparsetrain_collider``)
  calls the model's SDPA attention, with gradient hooks on the key and value
  tensors that zero the rows of dropped positions when the backward runs
  inside ``collider.filter(keep)``. With the loss on kept tokens only, no
  gradient then reaches a dropped position in any layer (the argument is in
  ``engine.py``);
* **linear layers**: every ``nn.Linear`` of the decoder and the LM head keeps
  its weights (the state dict is unchanged) but gets a backward that gathers
  the kept rows of its input and output gradient and runs its two GEMMs on
  ``[kept, features]``: exact, because the dropped rows of the output gradient
  are zero.

The forward is the model's own (all tokens). Outside ``filter`` the backward
is the ordinary dense one. Tested in float64 against a reference that detaches
dropped keys and values up front (tests/test_collider_hf.py).
"""

from __future__ import annotations

import types

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..selection.select import kept_indices
from .engine import current_keep

ATTENTION_NAME = "sparsetrain_collider"


def _keep_rows(n_rows: int) -> torch.Tensor | None:
    """Flat indices of kept rows, when a filter is active and matches ``n_rows``."""
    keep = current_keep()
    if keep is None:
        return None
    if keep.numel() != n_rows:
        raise ValueError(f"Collider keep mask has {keep.numel()} entries but the layer sees {n_rows} rows")
    return kept_indices(keep)  # cached on the mask: one nonzero per step at most, not one per layer


class _KeptRowsLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:  # type: ignore[override]
        y = F.linear(x, weight, bias)  # under autocast: the autocast dtype, as nn.Linear would
        ctx.save_for_backward(x, weight)
        ctx.has_bias, ctx.compute_dtype = bias is not None, y.dtype
        return y

    @staticmethod
    def backward(ctx, g: torch.Tensor):  # type: ignore[override]
        x, w = ctx.saved_tensors
        dt = ctx.compute_dtype
        g2 = g.reshape(-1, g.shape[-1]).to(dt)
        x2 = x.reshape(-1, x.shape[-1]).to(dt)
        rows = _keep_rows(g2.shape[0])
        if rows is not None:  # dropped rows of g are zero: both GEMMs on the kept rows only
            g_k, x_k = g2.index_select(0, rows), x2.index_select(0, rows)
            dx = torch.zeros_like(x2).index_copy_(0, rows, g_k @ w.to(dt))
        else:
            g_k, x_k = g2, x2
            dx = g2 @ w.to(dt)
        dw = (g_k.t() @ x_k).to(w.dtype)
        db = g_k.sum(0).to(w.dtype) if ctx.has_bias else None
        return dx.view(x.shape).to(x.dtype), dw, db


def _kept_rows_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return _KeptRowsLinear.apply(x, self.weight, self.bias)


def _zero_dropped_rows(grad: torch.Tensor) -> torch.Tensor:
    """Gradient hook for ``[B, heads, T, hd]`` keys/values: zero dropped positions' rows."""
    keep = current_keep()
    if keep is None:
        return grad
    return grad * keep[:, None, :, None].to(grad.dtype)


def collider_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                       attention_mask: torch.Tensor | None, **kwargs):
    """The model's SDPA attention with dropped positions' keys and values made
    constant for backward passes run inside ``collider.filter``."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    for t in (key, value):
        if t.requires_grad:
            t.register_hook(_zero_dropped_rows)
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def apply(model: nn.Module) -> nn.Module:
    """Make a Hugging Face causal LM train with Collider filtering (in place; returns it).

    Use: ``logits = model(ids).logits``; pick ``keep`` [B, T]; the loss is the
    mean cross-entropy over kept tokens (``collider.masked_cross_entropy``);
    ``with collider.filter(keep): loss.backward()``.
    """
    try:
        from transformers import AttentionInterface
    except ImportError as e:  # pragma: no cover - depends on the install
        raise ImportError("sparsetrain.collider.apply needs transformers") from e
    AttentionInterface.register(ATTENTION_NAME, collider_attention)
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(ATTENTION_NAME)
    else:  # older transformers
        model.config._attn_implementation = ATTENTION_NAME
    n = 0
    for module in model.modules():
        if isinstance(module, nn.Linear):
            module.forward = types.MethodType(_kept_rows_forward, module)
            n += 1
    if n == 0:
        raise ValueError("collider.apply found no nn.Linear layers to swap")
    return model
