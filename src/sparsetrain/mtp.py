"""Multi-token prediction (Gloeckle et al. 2024) with a memory-efficient loss.

Head ``k`` (``k = 1 .. n``) predicts the token ``k`` places after the main
head's: at position ``t`` the main head predicts ``x[t+1]`` and head ``k``
predicts ``x[t+1+k]``. Each head is a small residual block on the trunk's final
hidden state (RMSNorm -> Linear(d, d) -> SiLU, added back), followed by the
model's own final norm and LM head (shared, so a head adds d^2 + d parameters).

    loss = main + mtp_weight * sum_k decay^(k-1) * L_k

:func:`sequential_loss` is that loss as one differentiable function of the
trunk output, computed head by head so that only one ``[N, V]`` logits tensor
is alive at a time (see :class:`_SequentialHeads`); the caller back-propagates
it like any loss, so MTP runs through the same DDP and compiled trunk as
every other objective. :func:`naive_loss` is the plain reference.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from .cross_entropy import cross_entropy
from .model import CausalLM, RMSNorm
from .numerics import IGNORE_INDEX
from .selection.select import kept_indices


def head_targets(targets: torch.Tensor, k: int, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Targets of head ``k``: ``targets`` shifted left by ``k`` (``targets[:, t]``
    is the main head's target ``x[t+1]``); the last ``k`` positions have none."""
    out = torch.full_like(targets, ignore_index)
    if k < targets.shape[-1]:
        out[..., : targets.shape[-1] - k] = targets[..., k:]
    return out


class MTPHead(nn.Module):
    def __init__(self, d_model: int, eps: float) -> None:
        super().__init__()
        self.norm = RMSNorm(d_model, eps)
        self.proj = nn.Linear(d_model, d_model, bias=False)
        nn.init.zeros_(self.proj.weight)  # starts as the identity: head k begins as the main head

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + F.silu(self.proj(self.norm(h)))


class MTPHeads(nn.Module):
    """``n`` extra heads for a :class:`~sparsetrain.model.GPT` (any :class:`~sparsetrain.model.CausalLM`)."""

    def __init__(self, model: CausalLM, n_tokens: int, weight: float = 0.2, decay: float = 0.5) -> None:
        super().__init__()
        if not 1 <= n_tokens <= 8:
            raise ValueError(f"n_tokens must be in [1, 8], got {n_tokens}")
        self.heads = nn.ModuleList(MTPHead(model.config.d_model, model.config.norm_eps) for _ in range(n_tokens))
        self.weight, self.decay = weight, decay

    def head_weight(self, k: int) -> float:
        return self.weight * self.decay ** (k - 1)

    def head_loss(self, model: CausalLM, trunk: torch.Tensor, targets: torch.Tensor, k: int) -> torch.Tensor:
        return lm_loss(model, self.heads[k - 1](trunk), head_targets(targets, k))


def lm_loss(model: CausalLM, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the model's final norm and LM head applied to ``x``."""
    logits = model.lm_head(model.norm(x))
    return cross_entropy(logits.flatten(0, 1), targets.flatten())


def naive_loss(model: CausalLM, heads: MTPHeads, idx: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, list[float]]:
    """Reference: every head's logits alive at once, one summed loss."""
    trunk = model.trunk(idx)
    main = lm_loss(model, trunk, targets)
    extra = [heads.head_loss(model, trunk, targets, k) for k in range(1, len(heads.heads) + 1)]
    total = main + sum(heads.head_weight(k) * l for k, l in enumerate(extra, 1))
    return total, [float(main.detach())] + [float(l.detach()) for l in extra]


class _SequentialHeads(torch.autograd.Function):
    """``sum_j w_j CE(lm_head(norm(f_j(h))), t_j)`` over output heads ``f_j`` (the
    identity for the main head), as one node of the autograd graph.

    Memory: the forward runs each head's forward *and* backward
    (``torch.autograd.grad``) before the next head starts, so each head's
    ``[N, V]`` logits and cross-entropy intermediates are freed before the next
    are made: the peak is one head's ``[N, V]`` working set (the logits, and on
    the plain-torch path their float32 log-softmax and gradient) plus the
    gradients it keeps, ``[N, D]`` at ``h`` and one per parameter of the norm,
    LM head and heads (``O(V D + n D^2)``), where the naive loss holds
    ``n + 1`` logits tensors at once. The loss is a scalar, so the gradient the
    backward receives only scales what the forward computed: the backward
    multiplies the kept gradients and recomputes nothing.

    The parameters are inputs of the node, and their gradients leave through
    its backward like any other op's: autograd (and DDP's hooks) accumulate
    them once, together with any other use of the same tensor (a tied
    embedding), and nothing is written to ``.grad`` behind the engine's back.
    """

    @staticmethod
    def forward(ctx, h: torch.Tensor, targets: torch.Tensor, plan: "_HeadsPlan",  # type: ignore[override]
                *params: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        need_h = ctx.needs_input_grad[0]
        need_params = [i for i, need in enumerate(ctx.needs_input_grad[3:]) if need]
        grad_h = torch.zeros_like(h) if need_h else None
        grad_params: list[torch.Tensor | None] = [None] * len(params)
        losses = []
        for head, weight, t in zip(plan.heads, plan.weights, targets.unbind(0)):
            with torch.enable_grad():
                x = h.detach().requires_grad_(need_h)
                loss = plan.head_loss(head, x, t)
                wanted = ([x] if need_h else []) + [params[i] for i in need_params]
                grads = torch.autograd.grad(weight * loss, wanted, allow_unused=True) if wanted else ()
            if need_h:
                grad_h += grads[0]
                grads = grads[1:]
            for i, g in zip(need_params, grads):
                if g is not None:
                    grad_params[i] = g if grad_params[i] is None else grad_params[i] + g
            losses.append(loss.detach())
        losses_t = torch.stack(losses)
        total = sum(weight * loss for weight, loss in zip(plan.weights, losses))  # Python weights: no host-to-device copy
        ctx.grad_h, ctx.grad_params = grad_h, grad_params
        ctx.mark_non_differentiable(losses_t)
        return total, losses_t

    @staticmethod
    def backward(ctx, grad_total: torch.Tensor, _grad_losses: torch.Tensor):  # type: ignore[override]
        def scaled(g: torch.Tensor | None) -> torch.Tensor | None:
            return None if g is None else g * grad_total.to(g.dtype)

        grad_h, grad_params = scaled(ctx.grad_h), [scaled(g) for g in ctx.grad_params]
        ctx.grad_h = ctx.grad_params = None
        return (grad_h, None, None, *grad_params)


class _HeadsPlan:
    """What :class:`_SequentialHeads` runs: the output heads (``None``: the main
    head, the identity), their weights, and the model's norm and LM head."""

    def __init__(self, model: CausalLM, heads: list[nn.Module | None], weights: list[float]) -> None:
        self.model, self.heads, self.weights = model, heads, weights

    def parameters(self) -> list[torch.Tensor]:
        """Every parameter the heads read, once each (a tied LM head is the embedding)."""
        seen: dict[int, torch.Tensor] = {}
        modules = [self.model.norm, self.model.lm_head] + [h for h in self.heads if h is not None]
        for m in modules:
            for p in m.parameters():
                seen.setdefault(id(p), p)
        return list(seen.values())

    def head_loss(self, head: nn.Module | None, h: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy of one head over its rows with a target; 0 (not NaN) when none has one."""
        x = h if head is None else head(h)
        logits = self.model.lm_head(self.model.norm(x))
        flat = targets.reshape(-1)
        loss = cross_entropy(logits.reshape(-1, logits.shape[-1]), flat)
        return torch.where((flat != IGNORE_INDEX).any(), loss, torch.zeros_like(loss))  # on the device: no sync


@torch.compiler.disable  # runs torch.autograd.grad in its forward: a clean graph break under torch.compile
def _heads_loss(plan: _HeadsPlan, h: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return _SequentialHeads.apply(h, targets, plan, *plan.parameters())


def sequential_loss(model: CausalLM, heads: MTPHeads, h: torch.Tensor,
                    targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The MTP loss of trunk output ``h`` ``[B, T, D]`` (before the final norm)
    against the main head's ``targets`` ``[B, T]``, one head at a time
    (:class:`_SequentialHeads`). Returns ``(loss, losses)``: the weighted total,
    differentiable with respect to ``h`` and every parameter involved, and the
    per-head losses ``[main, L_1, ..., L_n]`` (detached, on the device)."""
    n = len(heads.heads)
    stacked = torch.stack([head_targets(targets, k) for k in range(n + 1)])
    plan = _HeadsPlan(model, [None, *heads.heads], [1.0] + [heads.head_weight(k) for k in range(1, n + 1)])
    return _heads_loss(plan, h, stacked)


def sequential_backward(
    model: CausalLM, heads: MTPHeads, idx: torch.Tensor, targets: torch.Tensor, scale: float = 1.0,
    amp: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
) -> tuple[torch.Tensor, list[float]]:
    """``(scale * loss).backward()`` of :func:`sequential_loss` on ``model.trunk(idx)``,
    for callers outside the trainer; returns (total loss, [main, L_1, ..., L_n]
    as floats, read after the backward). ``amp()`` wraps the forward."""
    with amp():
        total, losses = sequential_loss(model, heads, model.trunk(idx), targets)
    (scale * total).backward()
    return total.detach(), losses.tolist()


def kept_rows_loss(model: CausalLM, heads: MTPHeads, trunk: torch.Tensor, targets: torch.Tensor,
                   keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The extra heads' weighted loss on the kept rows only (Collider with MTP).

    Every head sees the primary head's keep mask: rows are gathered first, so
    the heads' forward and backward run on ``[kept, D]`` (one head at a time,
    :class:`_SequentialHeads`) and dropped rows get no gradient through any head.
    A head none of whose kept rows has a target that far ahead adds 0.
    Returns (weighted sum, ``[L_1, ..., L_n]`` detached, on the device)."""
    D = trunk.shape[-1]
    kidx = kept_indices(keep)
    h = trunk.reshape(-1, D).index_select(0, kidx)
    n = len(heads.heads)
    stacked = torch.stack([head_targets(targets, k).reshape(-1).index_select(0, kidx) for k in range(1, n + 1)])
    plan = _HeadsPlan(model, list(heads.heads), [heads.head_weight(k) for k in range(1, n + 1)])
    return _heads_loss(plan, h, stacked)
