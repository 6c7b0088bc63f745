"""AdamW with decoupled weight decay on matrices only, and the LR schedule."""

from __future__ import annotations

import math

import torch
import torch.nn as nn


def make_optimizer(
    model: nn.Module, lr: float, weight_decay: float, betas: tuple[float, float], device_type: str
) -> torch.optim.AdamW:
    """AdamW with decay on matrices except embeddings; never on norms' gains or
    biases. The grouping lives in :mod:`sparsetrain.optimizers` (where
    :func:`~sparsetrain.optimizers.build_optimizer` picks any optimizer from a
    config)."""
    from .optimizers import make_adamw  # imported here: optimizers reads the model, which builds on this module

    return make_adamw(model, lr, weight_decay, betas, device_type)


def lr_at(step: int, peak: float, warmup_steps: int, max_steps: int, min_lr_ratio: float) -> float:
    """Linear warmup over ``warmup_steps`` (step 0 gets peak/warmup), then cosine
    decay from ``peak`` to ``min_lr_ratio * peak`` at ``max_steps``."""
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    span = max(1, max_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    floor = peak * min_lr_ratio
    return floor + (peak - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


class StepCounted(nn.Module):
    """A module whose behaviour follows the optimizer step count (a dense warmup,
    a sparsity ramp). The count lives twice: in a saved buffer, so a resumed run
    continues where it stopped, and in a host int, since reading a CUDA buffer
    every forward would be a host sync (and a graph break under torch.compile).

    The forward must not read that int either: torch.compile takes an int
    attribute for a constant, so a compiled model recompiled at every step and,
    past dynamo's recompile limit (8), ran the module eagerly for good (the
    compiled d20 2:4 trainer ran at 0.82x dense, bench/results/trainer_throughput_d20_compiled_before_h200.json).
    Subclasses derive what the forward reads in :meth:`_count_changed`, a value
    that changes only where the behaviour does (a warmup's end), so a compiled
    model recompiles there and nowhere else. They name the buffer in
    ``STEP_BUFFER`` and call :meth:`init_step_count` in ``__init__`` once the
    attributes :meth:`_count_changed` reads are set."""

    STEP_BUFFER = "steps"

    def init_step_count(self) -> None:
        self.register_buffer(self.STEP_BUFFER, torch.zeros((), dtype=torch.long))
        self._steps = 0  # the host copy
        self._count_changed()

    def step(self) -> None:
        """Count one optimizer step."""
        self._steps += 1
        getattr(self, self.STEP_BUFFER).fill_(self._steps)
        self._count_changed()

    def _count_changed(self) -> None:
        """Recompute what the forward reads from the count (nothing by default)."""

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:  # type: ignore[override]
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if prefix + self.STEP_BUFFER in state_dict:
            self._steps = int(state_dict[prefix + self.STEP_BUFFER])
            self._count_changed()


def step_counted(model: nn.Module) -> list[StepCounted]:
    """The modules of ``model`` whose :meth:`StepCounted.step` a training loop
    calls after each optimizer step."""
    return [m for m in model.modules() if isinstance(m, StepCounted)]
