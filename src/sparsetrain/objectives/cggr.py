"""CGGR token selection as training objectives: the selective loss
(``selection = "loss"``: cross-entropy over the kept tokens) and batch
splitting (``selection = "batch"``: forward and backward on the kept
sequences), with the config checks and the selector they share."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn

from ..config import TrainConfig, require
from ..selection import METHODS, NONNEGATIVE_SCORES, REFERENCE_SCORES, SCORES, CGGRLoss, CGGRModel, TokenSelector
from .base import Objective, ObjectiveOutput

ReferenceNLL = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""``(x, y) -> [B, T]`` per-token losses of a reference model (the ``excess`` score)."""


def check_config(cfg: TrainConfig) -> None:
    """The ``selection*`` fields, ``keep_ratio``, ``router_layers`` and the ``excess`` score's reference."""
    require(cfg.selection in ("none", "loss", "batch"), f"training.selection must be none, loss or batch, got {cfg.selection!r}")
    require(cfg.selection_score in SCORES, f"training.selection_score must be one of {', '.join(SCORES)}, got {cfg.selection_score!r}")
    require(cfg.selection_method in METHODS, f"training.selection_method must be one of {', '.join(METHODS)}, got {cfg.selection_method!r}")
    require(0 < cfg.keep_ratio <= 1, f"training.keep_ratio must be in (0, 1], got {cfg.keep_ratio}")
    if cfg.selection_method == "importance":
        require(cfg.selection == "loss", "training.selection_method = importance weighs the selective loss's "
                                         f"tokens: it needs selection = loss, got {cfg.selection!r}")
        require(cfg.selection_score in NONNEGATIVE_SCORES, "training.selection_method = importance samples in "
                f"proportion to the score: selection_score must be one of {', '.join(NONNEGATIVE_SCORES)}, "
                f"got {cfg.selection_score!r}")
        require(not cfg.selection_dynamic, "training.selection_method = importance keeps a fixed ratio: "
                                           "selection_dynamic is not available with it")
    require(cfg.selection_warmup_steps >= 0, f"training.selection_warmup_steps must be >= 0, got {cfg.selection_warmup_steps}")
    require(0 <= cfg.selection_sensitivity <= 1, f"training.selection_sensitivity must be in [0, 1], got {cfg.selection_sensitivity}")
    require(0 <= cfg.selection_target_sparsity < 1,
            f"training.selection_target_sparsity must be in [0, 1), got {cfg.selection_target_sparsity}")
    if cfg.selection == "none":
        return
    require(cfg.model.arch == "gpt", f"model.arch = {cfg.model.arch} trains with the plain loss: "
                                     "use_collider, selection and use_mtp need arch = gpt")
    if cfg.selection == "batch":
        require(1 <= cfg.router_layers <= cfg.model.n_layer,
                f"training.router_layers must be in [1, {cfg.model.n_layer}], got {cfg.router_layers}")
    if cfg.selection_score in REFERENCE_SCORES:
        require(bool(cfg.reference_ckpt or cfg.reference_losses),
                f"training.selection_score = {cfg.selection_score} needs training.reference_ckpt (a reference run) "
                "or reference_losses")
        require(cfg.selection == "loss", f"the {cfg.selection_score} score works with selection = loss "
                                         "(batch splitting scores with its router)")


def make_selector(cfg: TrainConfig, seed: int) -> TokenSelector:
    """The selector of ``cfg.selection`` (loss or batch), with the run's schedule."""
    return TokenSelector(
        score=cfg.selection_score, method=cfg.selection_method, keep_ratio=cfg.keep_ratio,
        warmup_steps=cfg.selection_warmup_steps, dynamic=cfg.selection_dynamic, sensitivity=cfg.selection_sensitivity,
        threshold=cfg.selection_threshold, target_sparsity=cfg.selection_target_sparsity or None, seed=seed,
    )


class SelectiveLoss(Objective):
    """CGGR's selective loss: the network's logits for every token, the selector
    keeps some, the loss is the mean cross-entropy over the kept ones
    (:class:`~sparsetrain.selection.CGGRLoss`)."""

    def __init__(self, net: nn.Module, selector: TokenSelector, reference_nll: ReferenceNLL | None = None) -> None:
        super().__init__()
        self.net = net
        self.selector = selector
        self.criterion = CGGRLoss(selector=selector)  # given the selector: never steps it (set_step does)
        self.reference_nll = reference_nll

    def forward(self, x: torch.Tensor, y: torch.Tensor, n_valid: int) -> ObjectiveOutput:  # type: ignore[override]
        logits, _ = self.net(x)
        ref = self.reference_nll(x, y) if self.reference_nll is not None else None
        loss = self.criterion(logits, y, ref, n_valid=n_valid)
        stats = self.selector.last_stats  # the counts as stored: a device tensor stays unread
        return ObjectiveOutput(loss, loss.detach(), {"kept": stats.unread("kept"), "total": stats.unread("total")},
                               self.selector.last_mask)

    def set_step(self, step: int) -> None:
        self.selector.set_step(step)


class BatchSplitLoss(Objective):
    """CGGR's batch splitting: a truncated router scores the tokens without
    gradient, the selector's ratio picks the hardest sequences, and only those
    go through the network (:class:`~sparsetrain.selection.CGGRModel`)."""

    kept_count_shapes = True  # the (compiled) network's batch is the kept sequences

    def __init__(self, net: nn.Module, router: nn.Module, selector: TokenSelector) -> None:
        super().__init__()
        self.selector = selector
        self.splitter = CGGRModel(net, router=router, selector=selector)  # given the selector: never steps it

    def forward(self, x: torch.Tensor, y: torch.Tensor, n_valid: int) -> ObjectiveOutput:  # type: ignore[override]
        loss = self.splitter(x, targets=y)
        m = self.splitter.last_metrics
        return ObjectiveOutput(loss, loss.detach(), {"kept": m["tokens_selected"], "total": m["tokens_total"]})

    def set_step(self, step: int) -> None:
        self.selector.set_step(step)
