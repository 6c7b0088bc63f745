"""Training objectives: what one micro-batch's forward computes, under one interface.

``objective(x, y, n_valid)`` returns an :class:`ObjectiveOutput` (the loss to
back-propagate, the reported next-token loss and this micro-step's metrics);
``objective.set_step(step)`` advances its own schedules. The trainer runs every
objective the same way::

    out = objective(x, y, n_valid)              # under autocast; DDP wraps the objective
    (out.loss * scale).backward()

========================= =====================================================
:class:`NextTokenLoss`    dense next-token cross-entropy
:class:`SelectiveLoss`    CGGR, ``selection = "loss"``: loss over kept tokens
:class:`BatchSplitLoss`   CGGR, ``selection = "batch"``: the kept sequences only
:class:`ColliderLoss`     Collider (``use_collider``), with MTP heads if asked
:class:`MultiTokenLoss`   MTP with the dense loss (``use_mtp``)
:class:`AuxiliaryLoss`    any of them plus the network's own auxiliary loss (ResNet-BK)
========================= =====================================================

Each technique owns its config checks; importing this package registers them
with :mod:`sparsetrain.config`.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ..collider import ColliderModel
from ..config import TrainConfig, register_train_check, require
from ..model import CausalLM
from ..mtp import MTPHeads
from ..selection import REFERENCE_SCORES, TokenSelector, create_truncated_router
from . import cggr, collider, multi_token
from .base import Objective, ObjectiveOutput
from .collider import ColliderLoss
from .multi_token import MultiTokenLoss, Trunk
from .next_token import AuxiliaryLoss, NextTokenLoss
from .cggr import BatchSplitLoss, ReferenceNLL, SelectiveLoss

__all__ = ["AuxiliaryLoss", "BatchSplitLoss", "ColliderLoss", "MultiTokenLoss", "NextTokenLoss", "Objective",
           "ObjectiveOutput", "ReferenceNLL", "SelectiveLoss", "Trunk", "build_objective", "make_selector"]


def check_reference(cfg: TrainConfig) -> None:
    """A reference (``reference_ckpt`` or ``reference_losses``) is read only by a
    score of ``REFERENCE_SCORES``; set without one it would be loaded (and, as a
    run, forwarded every micro-batch) for nothing, so it is refused."""
    given = "reference_ckpt" if cfg.reference_ckpt else "reference_losses" if cfg.reference_losses else ""
    if not given:
        return
    score_field = "collider_score" if cfg.use_collider else "selection_score" if cfg.selection != "none" else ""
    require(bool(score_field), f"training.{given} is read by a token filter's {' or '.join(REFERENCE_SCORES)} "
                               "score; no filter is on (use_collider or selection): drop it")
    score = getattr(cfg, score_field)
    require(score in REFERENCE_SCORES, f"training.{given} is read by the {' and '.join(REFERENCE_SCORES)} scores "
                                       f"only; {score_field} is {score!r}: drop {given} or pick one of them")


register_train_check("reference", check_reference)
register_train_check("selection", cggr.check_config)
register_train_check("collider", collider.check_config)
register_train_check("mtp", multi_token.check_config)


def make_selector(cfg: TrainConfig, seed: int) -> TokenSelector | None:
    """The token selector ``cfg``'s objective uses (Collider's or CGGR's), or None."""
    if cfg.use_collider:
        return collider.make_selector(cfg, seed)
    if cfg.selection != "none":
        return cggr.make_selector(cfg, seed)
    return None


def build_objective(cfg: TrainConfig, model: CausalLM, heads: MTPHeads | None = None,
                    selector: TokenSelector | None = None, reference_nll: ReferenceNLL | None = None) -> Objective:
    """The objective ``cfg`` names, around ``model`` (trained in place).

    With ``cfg.compile``, the network piece the objective calls is compiled
    (the model, or its trunk for MTP); Collider compiles its own pieces instead
    (its autograd node is not traced whole). ``heads``: the MTP heads when
    ``use_mtp``; ``selector``: :func:`make_selector`'s; ``reference_nll``: the
    reference model's per-token losses for the ``excess`` score."""
    if (heads is not None) != cfg.use_mtp:
        raise ValueError("pass MTP heads exactly when cfg.use_mtp")
    if (selector is not None) != (cfg.use_collider or cfg.selection != "none"):
        raise ValueError("pass a selector exactly when cfg uses Collider or CGGR selection")

    def compiled(module: nn.Module) -> nn.Module:
        if not cfg.compile:
            return module
        # reduce-overhead: CUDA graphs of the compiled pieces (what the sync-free
        # ResNet-BK parked path allows; bench/results/bk_step_0.5_h200.json)
        return torch.compile(module, mode=None if cfg.compile_mode == "default" else cfg.compile_mode)

    objective: Objective
    if cfg.use_collider:
        objective = ColliderLoss(ColliderModel(model, compile=cfg.compile), selector, reference_nll, heads, model)
    elif cfg.use_mtp:
        objective = MultiTokenLoss(compiled(Trunk(model)), model, heads)
    elif cfg.selection == "loss":
        objective = SelectiveLoss(compiled(model), selector, reference_nll)
    elif cfg.selection == "batch":
        # the router scores with the raw model's first layers, without gradient;
        # the kept sequences go through the (compiled) model
        objective = BatchSplitLoss(compiled(model), create_truncated_router(model, cfg.router_layers), selector)
    else:
        objective = NextTokenLoss(compiled(model))
    if callable(getattr(model, "aux_loss", None)):  # a sparse ResNet-BK also learns its sparsity target
        objective = AuxiliaryLoss(objective, model)
    return objective
