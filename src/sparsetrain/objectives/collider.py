"""Collider as a training objective: a dense forward, the selector's keep mask,
the mean cross-entropy over kept tokens, and a backward filtered to the kept
rows in every layer (the keep mask travels with the kept-rows loss); with MTP
heads, their loss on the kept rows too."""

from __future__ import annotations

import torch
import torch.nn as nn

from ..collider import masked_cross_entropy
from ..config import TrainConfig, require
from ..model import CausalLM
from ..mtp import MTPHeads, kept_rows_loss
from ..selection import NONNEGATIVE_SCORES, REFERENCE_SCORES, SCORES, TokenSelector
from .base import Objective, ObjectiveOutput
from .cggr import ReferenceNLL

METHODS = ("threshold", "topk", "random", "importance")


def check_config(cfg: TrainConfig) -> None:
    """The ``collider_*`` fields, and what Collider does not combine with."""
    require(0 <= cfg.collider_sparsity < 1, f"training.collider_sparsity must be in [0, 1), got {cfg.collider_sparsity}")
    require(cfg.collider_span >= 1, f"training.collider_span must be >= 1, got {cfg.collider_span}")
    if not cfg.use_collider:
        return
    require(cfg.model.arch == "gpt", f"model.arch = {cfg.model.arch} trains with the plain loss: "
                                     "use_collider, selection and use_mtp need arch = gpt")
    require(cfg.compile_mode == "default",
            "use_collider compiles its own pieces; compile_mode other than default is not available with it")
    require(cfg.collider_score in SCORES, f"training.collider_score must be one of {', '.join(SCORES)}, got {cfg.collider_score!r}")
    require(cfg.collider_method in METHODS,
            f"training.collider_method must be threshold, topk, random or importance, got {cfg.collider_method!r}")
    if cfg.collider_method == "importance":
        require(cfg.collider_score in NONNEGATIVE_SCORES, "training.collider_method = importance samples in "
                f"proportion to the score: collider_score must be one of {', '.join(NONNEGATIVE_SCORES)}, "
                f"got {cfg.collider_score!r}")
        require(not cfg.use_mtp, "training.collider_method = importance weighs the kept rows' loss; "
                                 "the MTP heads' kept-rows loss takes no weights: use topk or random with use_mtp")
    require(cfg.collider_method == "threshold" or cfg.collider_sparsity > 0,
            f"training.collider_method = {cfg.collider_method} needs collider_sparsity > 0")
    require(cfg.selection == "none", "use_collider and selection (CGGR) are exclusive: pick one token filter")
    if cfg.collider_score in REFERENCE_SCORES:
        require(bool(cfg.reference_ckpt or cfg.reference_losses),
                f"training.collider_score = {cfg.collider_score} needs training.reference_ckpt or reference_losses")


def make_selector(cfg: TrainConfig, seed: int) -> TokenSelector:
    """Collider's selector: the adaptive threshold holds ``collider_sparsity`` (a
    fixed ``collider_threshold`` when it is 0), ``topk`` and ``random`` keep exactly
    ``1 - collider_sparsity``."""
    adaptive = cfg.collider_method == "threshold" and cfg.collider_sparsity > 0
    return TokenSelector(
        score=cfg.collider_score, method=cfg.collider_method, keep_ratio=1.0 - cfg.collider_sparsity,
        warmup_steps=cfg.selection_warmup_steps, threshold=cfg.collider_threshold,
        target_sparsity=cfg.collider_sparsity if adaptive else None, seed=seed, span=cfg.collider_span,
    )


class ColliderLoss(Objective):
    """``net``: a :class:`~sparsetrain.collider.ColliderModel` (``net(x,
    return_trunk=True)`` gives logits and the trunk output). With ``heads``, every
    MTP head adds its weighted loss on the primary head's kept rows
    (:func:`~sparsetrain.mtp.kept_rows_loss`); the reported loss is the primary one."""

    kept_count_shapes = True  # the backward's GEMMs, compiled pieces and attention kernels run on the kept rows

    def __init__(self, net: nn.Module, selector: TokenSelector, reference_nll: ReferenceNLL | None = None,
                 heads: MTPHeads | None = None, model: CausalLM | None = None) -> None:
        super().__init__()
        if heads is not None and model is None:
            raise ValueError("MTP heads need the model whose norm and LM head they share")
        self.net = net
        self.selector = selector
        self.reference_nll = reference_nll
        self.heads = heads
        self._model = [model]  # read, not owned: net holds it

    def forward(self, x: torch.Tensor, y: torch.Tensor, n_valid: int) -> ObjectiveOutput:  # type: ignore[override]
        logits, trunk = self.net(x, return_trunk=True)
        ref = self.reference_nll(x, y) if self.reference_nll is not None else None
        keep, stats = self.selector(logits.detach(), y, ref, n_valid=n_valid)
        loss = masked_cross_entropy(logits, y, keep, stats.weights)
        metrics = {"kept": stats.unread("kept"), "total": stats.unread("total")}  # device counts stay unread
        total = loss
        if self.heads is not None:  # every head uses the primary head's keep mask, on kept rows only
            extra, head_losses = kept_rows_loss(self._model[0], self.heads, trunk, y, keep)
            total = loss + extra
            metrics["mtp_losses"] = head_losses
        return ObjectiveOutput(total, loss.detach(), metrics, keep)

    def set_step(self, step: int) -> None:
        self.selector.set_step(step)
