"""The linear maps of a Hugging Face decoder layer as Collider reads them:
a weight, an optional bias, and the LoRA terms PEFT adds.

PEFT wraps an ``nn.Linear`` in ``lora.Linear``, whose forward (training, no
merged weights) is ``y = base(x) + sum_i s_i * B_i(A_i(dropout_i(x)))`` over
the active adapters. :func:`linear_parts` reads that into :class:`LinearParts`
at every forward (adapters may be enabled, disabled, merged or added between
steps), and the pure functions here compute the forward on all tokens and the
backward on the kept rows:

* frozen weights (the base under LoRA) get no weight-gradient GEMM at all;
* LoRA's ``A`` and ``B`` get their gradients from the kept rows only;
* a dropout mask is drawn on all tokens from a seed kept with the layer's
  activations, and drawn again from that seed in the backward (its kept rows
  are the ones the forward used), so no ``[N, in]`` mask lives between the two.

The LoRA products run in the compute dtype (under autocast, autocast's; else
the base weight's), as the base GEMM does.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from .compact import rows, wgrad, wgrad_in_float32


class UnsupportedLayer(ValueError):
    """A layer the Collider engine cannot run exactly (the message says why, in one line)."""


@dataclass
class LoraTerm:
    """One active LoRA adapter of a linear map: ``s * B(A(dropout(x)))``."""

    a: nn.Parameter  # [r, in]
    b: nn.Parameter  # [out, r]
    scale: float
    p: float  # dropout probability in force (0 outside training)


@dataclass
class LinearParts:
    """``y = x W^T + bias + sum of the LoRA terms``."""

    weight: nn.Parameter
    bias: nn.Parameter | None
    loras: list[LoraTerm] = field(default_factory=list)

    def parameters(self) -> list[nn.Parameter]:
        out = [self.weight] + ([self.bias] if self.bias is not None else [])
        for t in self.loras:
            out += [t.a, t.b]
        return out


def _lora_linear_class():
    try:
        from peft.tuners.lora.layer import Linear
    except ImportError:  # peft is optional
        return None
    return Linear


def linear_parts(module: nn.Module, name: str) -> LinearParts:
    """The parts of ``module`` (a plain ``nn.Linear`` or PEFT's ``lora.Linear``
    around one); :class:`UnsupportedLayer` for anything else (``name`` says which)."""
    if type(module) is nn.Linear:
        return LinearParts(module.weight, module.bias)
    lora_linear = _lora_linear_class()
    if lora_linear is None or not isinstance(module, lora_linear) or type(module).forward is not lora_linear.forward:
        raise UnsupportedLayer(f"{name} is a {type(module).__name__}, not nn.Linear or PEFT's LoRA Linear")
    base = module.get_base_layer()
    if type(base) is not nn.Linear:
        raise UnsupportedLayer(f"{name} wraps a {type(base).__name__} (quantised or custom), not nn.Linear")
    parts = LinearParts(base.weight, base.bias)
    if module.disable_adapters or module.merged:
        return parts
    for adapter in module.active_adapters:
        if adapter not in module.lora_A:
            continue
        if adapter in getattr(module, "lora_variant", {}):
            raise UnsupportedLayer(f"{name} uses a LoRA variant (DoRA or another) for adapter {adapter!r}: "
                                   "only plain LoRA is supported")
        lora_a, lora_b = module.lora_A[adapter], module.lora_B[adapter]
        if type(lora_a) is not nn.Linear or type(lora_b) is not nn.Linear or lora_a.bias is not None \
                or lora_b.bias is not None:
            raise UnsupportedLayer(f"{name}: LoRA adapter {adapter!r} has biases or non-linear factors")
        drop = module.lora_dropout[adapter]
        p = float(drop.p) if isinstance(drop, nn.Dropout) and drop.training else 0.0
        if not isinstance(drop, (nn.Dropout, nn.Identity)):
            raise UnsupportedLayer(f"{name}: LoRA dropout is a {type(drop).__name__}")
        parts.loras.append(LoraTerm(lora_a.weight, lora_b.weight, float(module.scaling[adapter]), p))
    return parts


# ----------------------------------------------------------------------------- dropout masks


def keep_mask(shape: tuple[int, ...], p: float, seed: int, device: torch.device) -> torch.Tensor:
    """The dropout keep mask (bool) drawn from ``seed``: the same on every call."""
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    return torch.rand(shape, generator=g, device=device) >= p


def new_seed() -> int:
    """A seed from torch's default CPU generator (no device sync; follows ``torch.manual_seed``)."""
    return int(torch.randint(0, 2**62, ()).item())


# ----------------------------------------------------------------------------- pure maths
# A LoRA term as the pieces take it: (A, B, scale, mask, inv_keep, need_a, need_b, f32)
# with A and B in the compute dtype, ``mask`` the keep mask of the rows at hand
# (bool, or None without dropout) and ``inv_keep`` = 1 / (1 - p).


def dropped(x: torch.Tensor, mask: torch.Tensor | None, inv_keep: float) -> torch.Tensor:
    """Dropout with a given keep mask (one rounding, as torch's dropout kernel)."""
    return x if mask is None else torch.where(mask, x, 0) * inv_keep


def lora_forward(y: torch.Tensor, x: torch.Tensor, terms: tuple) -> torch.Tensor:
    """``y`` plus every LoRA term applied to ``x``."""
    for a, b, s, mask, inv_keep, *_ in terms:
        y = y + F.linear(F.linear(dropped(x, mask, inv_keep), a), b) * s
    return y


def linear_forward(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, terms: tuple) -> torch.Tensor:
    return lora_forward(F.linear(x, w, bias), x, terms)


def lora_rows(terms: tuple, kidx: torch.Tensor) -> tuple:
    """The terms with their masks cut to the kept rows (``[B, T, in]`` -> ``[K, in]``)."""
    return tuple((a, b, s, rows(m, kidx) if m is not None else None, inv_keep, *rest)
                 for a, b, s, m, inv_keep, *rest in terms)


def lora_backward(dx: torch.Tensor, dy: torch.Tensor, x: torch.Tensor, terms: tuple
                  ) -> tuple[torch.Tensor, list[tuple[torch.Tensor | None, torch.Tensor | None]]]:
    """Add the LoRA terms' input gradient to ``dx`` and return each term's
    ``(dA, dB)``; ``dy`` [K, out] and ``x`` [K, in] are kept rows (compute dtype)."""
    grads = []
    for a, b, s, mask, inv_keep, need_a, need_b, f32 in terms:
        xd = dropped(x, mask, inv_keep)
        dh = (dy @ b) * s  # [K, r]
        d_b = wgrad(dy, F.linear(xd, a), f32) * s if need_b else None
        d_a = wgrad(dh, xd, f32) if need_a else None
        dx = dx + dropped(dh @ a, mask, inv_keep)
        grads.append((d_a, d_b))
    return dx, grads


def bias_grad(dy: torch.Tensor) -> torch.Tensor:
    """A bias gradient: the column sums of ``dy``, accumulated in float32 or wider."""
    return dy.sum(0, dtype=torch.float64 if dy.dtype == torch.float64 else torch.float32)


def linear_backward(dy: torch.Tensor, x: torch.Tensor, w: torch.Tensor, terms: tuple, need_w: bool, need_b: bool,
                    f32: bool) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, list]:
    """``(dx, dW, dbias, lora grads)`` of :func:`linear_forward` at the kept rows."""
    dx, grads = lora_backward(dy @ w, dy, x, terms)
    return dx, wgrad(dy, x, f32) if need_w else None, bias_grad(dy) if need_b else None, grads


# ----------------------------------------------------------------------------- casting for the pieces


def cast_cat(tensors: list[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """``torch.cat(tensors).to(dtype)`` in one pass (each written once, cast on the way)."""
    if len(tensors) == 1:
        return tensors[0].to(dtype)
    out = torch.empty(sum(t.shape[0] for t in tensors), *tensors[0].shape[1:], dtype=dtype, device=tensors[0].device)
    i = 0
    for t in tensors:
        out[i:i + t.shape[0]].copy_(t)
        i += t.shape[0]
    return out


def piece_terms(parts: LinearParts, dtype: torch.dtype, masks: list[torch.Tensor | None]) -> tuple:
    """``parts``' LoRA terms as the pieces take them, in the compute dtype, with ``masks`` (one per term)."""
    return tuple((t.a.to(dtype), t.b.to(dtype), t.scale, m, 1.0 / (1.0 - t.p) if t.p > 0 else 1.0,
                  t.a.requires_grad, t.b.requires_grad, wgrad_in_float32(t.a, dtype))
                 for t, m in zip(parts.loras, masks))


__all__ = ["LinearParts", "LoraTerm", "UnsupportedLayer", "cast_cat", "keep_mask", "linear_backward",
           "linear_forward", "linear_parts", "lora_backward", "lora_forward", "lora_rows", "new_seed", "piece_terms"]
