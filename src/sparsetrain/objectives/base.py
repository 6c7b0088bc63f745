"""What every training objective returns, and the interface the trainer calls."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn


@dataclass
class ObjectiveOutput:
    """One micro-batch's result.

    ``loss``: what the trainer back-propagates (it scales it for gradient
    accumulation); ``lm_loss``: the next-token loss the run reports, comparable
    across objectives (detached); ``metrics``: this micro-step's numbers for
    metrics.jsonl, device tensors left unread (see :mod:`sparsetrain.metrics` for
    the keys and how a log window reduces them); ``keep``: for an objective that
    filters tokens one by one, its selector's keep mask (bool, the targets' shape,
    on the device), which the trainer counts per kind of document
    (:mod:`sparsetrain.token_labels`); None otherwise."""

    loss: torch.Tensor
    lm_loss: torch.Tensor
    metrics: dict[str, Any] = field(default_factory=dict)
    keep: torch.Tensor | None = None


class Objective(nn.Module):
    """A training objective: ``forward(x, y, n_valid)`` -> :class:`ObjectiveOutput`.

    The module holds every trainable module the loss reads (the network, extra
    heads), so wrapping it in DDP synchronises all of their gradients. ``x``,
    ``y``: one micro-batch's inputs and aligned targets ``[B, T]``; ``n_valid``:
    how many targets are not ignored, counted on the host by the caller so that
    token selection needs no sync to size its budget.

    ``kept_count_shapes``: whether the number of tokens its selector keeps
    shapes the work it compiles or tunes (Collider's kept-row backward, batch
    splitting's kept sequences), so that the trainer primes it at start-up
    (``Trainer._prime_objective``)."""

    kept_count_shapes: bool = False

    def forward(self, x: torch.Tensor, y: torch.Tensor, n_valid: int) -> ObjectiveOutput:  # type: ignore[override]
        raise NotImplementedError

    def set_step(self, step: int) -> None:
        """Put the objective's own schedules (a selection warmup) at optimizer step ``step``.
        The trainer calls it after every optimizer step and after a resume."""
