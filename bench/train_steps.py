"""Training steps built side by side for timing, with one copy of the weights where the variants allow it.

Variants of one model whose parameters have the same names and shapes (dense
``relu2`` and the 2:4 ``relu2_24`` FFN, a model eager and compiled) share one
set of parameters and one optimizer: timing them in interleaved rounds needs
every variant alive at once, and two copies of a 2B-parameter model's
weights, gradients and AdamW state do not fit one 80 GB GPU. Each step still
runs its own forward, backward and a full optimizer step, so it costs what it
costs alone.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from sparsetrain.bench_step import default_optimizer, make_train_step

# A 2:4 model as the step benches time it: the transposable method (cuSPARSELt
# or the masked kernel by width), sparse from the first step.
SPARSE24_OVERRIDES = {"ffn": "relu2_24", "activation_sparse_method": "transposable", "activation_dense_warmup_steps": 0}


def share_parameters(model: torch.nn.Module, source: torch.nn.Module) -> None:
    """Make every parameter of ``model`` the same tensor as ``source``'s of the same name.
    Raises ValueError when the two models' parameter names or shapes differ."""
    mine = dict(model.named_parameters())
    theirs = dict(source.named_parameters())
    if mine.keys() != theirs.keys() or any(mine[k].shape != theirs[k].shape for k in mine):
        diff = sorted(set(mine) ^ set(theirs)) or [k for k in mine if mine[k].shape != theirs[k].shape]
        raise ValueError(f"cannot share parameters between different models (first difference: {diff[0]})")
    for name, param in theirs.items():
        owner, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(owner) if owner else model, leaf, param)


class SharedOptimizer:
    """The ``optimizer`` argument of :func:`make_train_step` for models that share
    parameters: the first model gets a new AdamW, every later one the same
    optimizer (whose parameters must then be exactly the model's)."""

    def __init__(self) -> None:
        self.optimizer: torch.optim.Optimizer | None = None

    def __call__(self, model: torch.nn.Module) -> torch.optim.Optimizer:
        if self.optimizer is None:
            self.optimizer = default_optimizer(model)
            return self.optimizer
        held = {id(p) for group in self.optimizer.param_groups for p in group["params"]}
        if {id(p) for p in model.parameters()} != held:
            raise ValueError("a model sharing the optimizer must have exactly its parameters")
        return self.optimizer


def _then(first: Callable[[torch.nn.Module], None] | None,
          second: Callable[[torch.nn.Module], None]) -> Callable[[torch.nn.Module], None]:
    def both(model: torch.nn.Module) -> None:
        if first is not None:
            first(model)
        second(model)
    return both


def build_steps(variants: dict[str, dict[str, Any]], share: bool = False) -> dict[str, tuple[Callable[[], None], torch.nn.Module]]:
    """``name -> (step, model)`` of :func:`make_train_step` for each variant's
    keyword arguments; ``share``: every model after the first takes the first
    one's parameters and optimizer (:func:`share_parameters`)."""
    out: dict[str, tuple[Callable[[], None], torch.nn.Module]] = {}
    optimizer = SharedOptimizer()
    first: torch.nn.Module | None = None
    for name, kwargs in variants.items():
        kwargs = dict(kwargs)
        if share:
            if first is not None:
                kwargs["prepare"] = _then(kwargs.get("prepare"), lambda m, src=first: share_parameters(m, src))
            kwargs["optimizer"] = optimizer
        step, model = make_train_step(**kwargs)
        first = first if first is not None else model
        out[name] = (step, model)
    return out


def pin_bk_skip_rate(sparsity: float) -> Callable[[torch.nn.Module], None]:
    """A ``prepare`` that makes every learned-sparse ResNet-BK layer skip a
    fraction ``sparsity`` of positions at random: the threshold mask's rate is
    learned in training, so for timing each predictor's last layer starts at
    weight 0 and bias ``logit(1 - sparsity)`` (a position is computed when its
    logistic noise exceeds ``-bias``, with probability ``1 - sparsity``)."""
    def prepare(model: torch.nn.Module) -> None:
        for layer in getattr(model, "sparse_layers", list)():
            last = layer.predictor[-1]
            torch.nn.init.zeros_(last.weight)
            torch.nn.init.constant_(last.bias, math.log((1 - sparsity) / sparsity))
    return prepare
