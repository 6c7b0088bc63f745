"""Multi-token prediction (Gloeckle et al. 2024) with a memory-efficient backward.

Head ``k`` (``k = 1 .. n``) predicts the token ``k`` places after the main
head's: at position ``t`` the main head predicts ``x[t+1]`` and head ``k``
predicts ``x[t+1+k]``. Each head is a small residual block on the trunk's final
hidden state (RMSNorm -> Linear(d, d) -> SiLU, added back), followed by the
model's own final norm and LM head (shared, so a head adds d^2 + d parameters).

    loss = main + mtp_weight * sum_k decay^(k-1) * L_k

The sequential backward runs forward and backward through one head at a time
and accumulates the gradient at the trunk output, so only one ``[N, V]``
logits tensor is alive at once; the trunk's backward then runs once.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from .cross_entropy import cross_entropy
from .model import GPT, IGNORE_INDEX, RMSNorm
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
    """``n`` extra heads for a :class:`~sparsetrain.model.GPT`."""

    def __init__(self, model: GPT, n_tokens: int, weight: float = 0.2, decay: float = 0.5) -> None:
        super().__init__()
        if not 1 <= n_tokens <= 8:
            raise ValueError(f"n_tokens must be in [1, 8], got {n_tokens}")
        self.heads = nn.ModuleList(MTPHead(model.config.d_model, model.config.norm_eps) for _ in range(n_tokens))
        self.weight, self.decay = weight, decay

    def head_weight(self, k: int) -> float:
        return self.weight * self.decay ** (k - 1)

    def head_loss(self, model: GPT, trunk: torch.Tensor, targets: torch.Tensor, k: int) -> torch.Tensor:
        return lm_loss(model, self.heads[k - 1](trunk), head_targets(targets, k))


def lm_loss(model: GPT, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the model's final norm and LM head applied to ``x``."""
    logits = model.lm_head(model.norm(x))
    return cross_entropy(logits.flatten(0, 1), targets.flatten())


def naive_loss(model: GPT, heads: MTPHeads, idx: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, list[float]]:
    """Reference: every head's logits alive at once, one summed loss."""
    trunk = model.trunk(idx)
    main = lm_loss(model, trunk, targets)
    extra = [heads.head_loss(model, trunk, targets, k) for k in range(1, len(heads.heads) + 1)]
    total = main + sum(heads.head_weight(k) * l for k, l in enumerate(extra, 1))
    return total, [float(main.detach())] + [float(l.detach()) for l in extra]


def sequential_backward(
    model: GPT, heads: MTPHeads, idx: torch.Tensor, targets: torch.Tensor, scale: float = 1.0,
    amp: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
) -> tuple[torch.Tensor, list[float]]:
    """Backward of ``scale * loss``, one head at a time; returns (total loss, [main, L_1, ..., L_n]).

    ``amp()`` wraps each forward piece (bf16 autocast in the trainer); the
    backward passes run outside it.
    """
    with amp():
        trunk = model.trunk(idx)
    h = trunk.detach().requires_grad_(True)
    with amp():
        main = lm_loss(model, h, targets)
    (scale * main).backward()  # frees the main logits
    losses = [main.detach()]
    for k in range(1, len(heads.heads) + 1):
        with amp():
            lk = heads.head_loss(model, h, targets, k)
        (scale * heads.head_weight(k) * lk).backward()  # frees this head's logits before the next
        losses.append(lk.detach())
    trunk.backward(h.grad)
    total = losses[0] + sum(heads.head_weight(k) * l for k, l in enumerate(losses[1:], 1))
    return total.detach(), [float(l) for l in losses]


def kept_rows_loss(model: GPT, heads: MTPHeads, trunk: torch.Tensor, targets: torch.Tensor,
                   keep: torch.Tensor) -> tuple[torch.Tensor, list[float]]:
    """The extra heads' weighted loss on the kept rows only (Collider with MTP).

    Every head sees the primary head's keep mask: rows are gathered first, so
    the heads' forward and backward run on ``[kept, D]`` and dropped rows get no
    gradient through any head. Returns (weighted sum, [L_1, ..., L_n])."""
    D = trunk.shape[-1]
    kidx = kept_indices(keep)
    h = trunk.reshape(-1, D).index_select(0, kidx)
    total = trunk.new_zeros((), dtype=torch.float32)
    losses = []
    for k in range(1, len(heads.heads) + 1):
        t = head_targets(targets, k).reshape(-1).index_select(0, kidx)
        if bool((t != IGNORE_INDEX).any()):
            lk = lm_loss(model, heads.heads[k - 1](h)[:, None], t[:, None])
        else:  # no kept row has a target this far ahead
            lk = h.sum() * 0.0
        total = total + heads.head_weight(k) * lk
        losses.append(float(lk.detach()))
    return total, losses
