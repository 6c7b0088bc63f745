"""Training steps as the step benches build and time them.

A variant is :func:`sparsetrain.bench_step.make_train_step`'s step of the
preset with some config overrides: the trainer's objective (the dense loss,
Collider, the ResNet-BK auxiliary loss), its backward and the optimizer.
Variants of one architecture can share one copy of the weights and one
optimizer (:func:`build_steps` with ``share``): a pair then needs one model's
weights, gradients and AdamW state, not two. Each step marks its phases on a
:class:`PhaseClock`.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from sparsetrain.bench_step import TrainStep, default_optimizer, make_train_step

# A 2:4 model as the step benches time it: the transposable method (cuSPARSELt
# or the masked kernel by width), sparse from the first step.
SPARSE24_OVERRIDES = {"ffn": "relu2_24", "activation_sparse_method": "transposable", "activation_dense_warmup_steps": 0}


def collider_overrides(drop: float) -> dict[str, Any]:
    """Collider as the step benches time it: the collider score, exactly ``1 - drop``
    of the tokens kept (``topk``: no host sync, the same kept count every step)."""
    return {"use_collider": True, "collider_score": "collider", "collider_method": "topk", "collider_sparsity": drop}


class PhaseClock:
    """The ``mark`` of :func:`make_train_step`: when each phase of each call
    began (CUDA events on the GPU, the host clock elsewhere)."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.calls: list[list[tuple[str, Any]]] = []  # per call: (phase, its start), then ("end", ...)

    def __call__(self, phase: str) -> None:
        if self.cuda:
            stamp: Any = torch.cuda.Event(enable_timing=True)
            stamp.record()
        else:
            stamp = time.perf_counter()
        if phase == "forward":  # a step begins
            self.calls.append([])
        self.calls[-1].append((phase, stamp))

    def _ms(self, a: Any, b: Any) -> float:
        return a.elapsed_time(b) if self.cuda else (b - a) * 1e3

    def phase_ms(self, which: list[bool]) -> dict[str, float]:
        """Median milliseconds of each phase over the calls flagged in ``which``
        (one flag per call, in call order, for the first ``len(which)`` calls)."""
        if len(which) > len(self.calls):
            raise ValueError(f"{len(which)} flags for {len(self.calls)} calls")
        if self.cuda:
            torch.cuda.synchronize()
        picked = [marks for marks, timed in zip(self.calls, which) if timed]
        if not picked:
            return {}
        names = [name for name, _ in picked[0][:-1]]
        return {name: statistics.median(self._ms(m[i][1], m[i + 1][1]) for m in picked)
                for i, name in enumerate(names)}


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


@dataclass
class BuiltStep:
    """One variant: its step, the model it trains, and the clock its phases are marked on."""

    step: TrainStep
    model: torch.nn.Module
    clock: PhaseClock


def build_steps(variants: dict[str, dict[str, Any]], share: bool = False, marks: bool = True) -> dict[str, BuiltStep]:
    """:func:`make_train_step` of each variant's keyword arguments, each marking
    its phases on a clock of its own (``marks=False``: none, for a step that is
    captured in a CUDA graph); ``share``: every model after the first takes the
    first one's parameters and optimizer (:func:`share_parameters`)."""
    out: dict[str, BuiltStep] = {}
    optimizer = SharedOptimizer()
    first: torch.nn.Module | None = None
    for name, kwargs in variants.items():
        kwargs = dict(kwargs)
        if share:
            if first is not None:
                kwargs["prepare"] = _then(kwargs.get("prepare"), lambda m, src=first: share_parameters(m, src))
            kwargs["optimizer"] = optimizer
        device = torch.device(kwargs.get("device") or ("cuda" if torch.cuda.is_available() else "cpu"))
        clock = PhaseClock(device)
        step, model = make_train_step(**kwargs, **({"mark": clock} if marks else {}))
        first = first if first is not None else model
        out[name] = BuiltStep(step, model, clock)
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
