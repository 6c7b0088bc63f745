"""The plain next-token loss, and the auxiliary loss a network may add to it (ResNet-BK's sparsity loss)."""

from __future__ import annotations

import torch
import torch.nn as nn

from .base import Objective, ObjectiveOutput


class NextTokenLoss(Objective):
    """Mean cross-entropy of every target: ``net(x, y)`` returns ``(logits, loss)``
    (a :class:`~sparsetrain.model.CausalLM`, compiled or not)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor, y: torch.Tensor, n_valid: int) -> ObjectiveOutput:  # type: ignore[override]
        _, loss = self.net(x, y)
        return ObjectiveOutput(loss, loss.detach())


class AuxiliaryLoss(Objective):
    """``inner``'s loss plus the network's own auxiliary loss from the same
    forward (``model.aux_loss()``, None when it has none this step); the reported
    loss stays the language-model loss. ``model.sparsity_stats(sync=False)``, when
    the network has it, goes to the metrics as ``bk_sparsity``."""

    def __init__(self, inner: Objective, model: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self._model = [model]  # read, not owned: inner holds it (a second registration would list it twice)

    @property
    def kept_count_shapes(self) -> bool:  # type: ignore[override]
        return self.inner.kept_count_shapes

    def forward(self, x: torch.Tensor, y: torch.Tensor, n_valid: int) -> ObjectiveOutput:  # type: ignore[override]
        out = self.inner(x, y, n_valid)
        model = self._model[0]
        aux = model.aux_loss()
        if aux is None:
            return out
        metrics = dict(out.metrics)
        if hasattr(model, "sparsity_stats"):
            metrics["bk_sparsity"] = model.sparsity_stats(sync=False)  # device values: read at the log step
        return ObjectiveOutput(out.loss + aux, out.lm_loss, metrics, out.keep)

    def set_step(self, step: int) -> None:
        self.inner.set_step(step)
