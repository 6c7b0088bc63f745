"""Multi-token prediction with the dense loss: the network's trunk, then the
main head and the MTP heads one at a time (:func:`sparsetrain.mtp.sequential_loss`)."""

from __future__ import annotations

import torch
import torch.nn as nn

from ..config import TrainConfig, require
from ..model import CausalLM
from ..mtp import MTPHeads, sequential_loss
from .base import Objective, ObjectiveOutput


def check_config(cfg: TrainConfig) -> None:
    """The ``mtp_*`` fields, and what MTP does not combine with."""
    require(2 <= cfg.mtp_n_tokens <= 4, f"training.mtp_n_tokens must be 2, 3 or 4, got {cfg.mtp_n_tokens}")
    require(cfg.mtp_weight >= 0, f"training.mtp_weight must be >= 0, got {cfg.mtp_weight}")
    require(0 <= cfg.mtp_decay <= 1, f"training.mtp_decay must be in [0, 1], got {cfg.mtp_decay}")
    if not cfg.use_mtp:
        return
    require(cfg.model.arch == "gpt", f"model.arch = {cfg.model.arch} trains with the plain loss: "
                                     "use_collider, selection and use_mtp need arch = gpt")
    require(cfg.selection == "none", "use_mtp with CGGR selection is not available yet (use_collider composes with it)")


class Trunk(nn.Module):
    """``model.trunk(x)`` as a module's forward, so it can be compiled and wrapped like the model."""

    def __init__(self, model: CausalLM) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.trunk(x)


class MultiTokenLoss(Objective):
    """``net(x)``: the trunk output (a :class:`Trunk`, compiled or not); the loss
    is ``main + sum_k w_k L_k``, reported loss the main head's, ``mtp_losses``
    the heads' ``[L_1, ..., L_n]``."""

    def __init__(self, net: nn.Module, model: CausalLM, heads: MTPHeads) -> None:
        super().__init__()
        self.net = net
        self.heads = heads
        self._model = [model]  # read, not owned: net holds it

    def forward(self, x: torch.Tensor, y: torch.Tensor, n_valid: int) -> ObjectiveOutput:  # type: ignore[override]
        total, losses = sequential_loss(self._model[0], self.heads, self.net(x), y)
        return ObjectiveOutput(total, losses[0], {"mtp_losses": losses[1:]})
