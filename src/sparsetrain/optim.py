"""AdamW with decoupled weight decay on matrices only, and the LR schedule."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from .config import SCHEDULE_KINDS




def cosine_to_floor(progress: float, start: float, floor: float) -> float:
    """Half a cosine from ``start`` (progress 0) to ``floor`` (progress 1 and beyond)."""
    progress = min(1.0, max(0.0, progress))
    return floor + (start - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def lr_at(step: int, peak: float, warmup_steps: int, max_steps: int, min_lr_ratio: float) -> float:
    """Linear warmup over ``warmup_steps`` (step 0 gets peak/warmup), then cosine
    decay from ``peak`` to ``min_lr_ratio * peak`` at ``max_steps``."""
    return LRSchedule.from_settings("steps", peak, warmup_steps, min_lr_ratio, max_steps).lr(step, 0.0)


@dataclass
class LRSchedule:
    """Warmup over steps times a decay over steps or training seconds, extendable.

    ``lr(step, seconds) = decay(x) * min(1, (step + 1) / warmup_steps)`` and ``x`` is the step
    (``by = "steps"``) or the training seconds at the end of the step
    (``by = "time"``). The decay is a list of segments ``(start, end, start_lr)``,
    each a half cosine from ``start_lr`` at ``start`` to the floor at ``end``;
    ``x`` before the first segment decays nothing (``peak``). By steps the
    first segment starts when the warmup ends, which is the classic warmup-then-
    cosine; by time it starts at 0, so the warmup (in steps, since it steadies
    AdamW's moment estimates, which count updates) overlaps the first seconds of
    the decay and the floor falls exactly on the budget.

    Resuming with another end (``--resume RUN --max-steps N``) calls
    :meth:`extend`, which appends a segment from the lr the next step had under the
    old schedule to the floor at the new end: the lr never jumps, and a run that had
    finished (at its floor) continues at the floor. The segments are saved in the
    checkpoint, so a resume continues exactly.
    """

    by: str
    peak: float
    warmup_steps: int
    min_lr_ratio: float
    segments: list[tuple[float, float, float]] = field(default_factory=list)

    @classmethod
    def from_settings(cls, by: str, peak: float, warmup_steps: int, min_lr_ratio: float, end: float) -> "LRSchedule":
        """The schedule of a fresh run ending at ``end`` (max_steps, or max_seconds by time)."""
        if by not in SCHEDULE_KINDS:
            raise ValueError(f"schedule by {by!r}, not one of {SCHEDULE_KINDS}")
        start = float(warmup_steps) if by == "steps" else 0.0
        return cls(by, peak, warmup_steps, min_lr_ratio, [(start, float(end), peak)])

    @property
    def floor(self) -> float:
        return self.peak * self.min_lr_ratio

    @property
    def end(self) -> float:
        """Where the lr reaches its floor (a step, or training seconds)."""
        return self.segments[-1][1]

    def decay(self, x: float) -> float:
        """The decay factor's lr at ``x`` (a step or training seconds), warmup aside."""
        current = None
        for seg in self.segments:  # the last segment starting at or before x rules
            if seg[0] <= x:
                current = seg
        if current is None:
            return self.peak
        start, end, start_lr = current
        # by steps, a schedule shorter than its warmup still divides by 1 (as it always has)
        return cosine_to_floor((x - start) / max(1.0 if self.by == "steps" else 1e-12, end - start), start_lr, self.floor)

    def lr(self, step: int, seconds: float) -> float:
        """The lr of the update at ``step``; ``seconds`` (the training seconds at the
        end of that update) is read only by a time schedule."""
        lr = self.decay(float(step) if self.by == "steps" else seconds)
        return lr * (step + 1) / self.warmup_steps if step < self.warmup_steps else lr

    def extend(self, at: float, new_end: float) -> str | None:
        """Move the floor to ``new_end``, continuing from ``at`` (the next step, or the
        training seconds so far). Returns a one-line description, or None where the end
        is unchanged or nothing is left to train."""
        if new_end == self.end or new_end <= at:
            return None
        start = max(at, self.segments[-1][0])
        from_lr = self.decay(start)
        self.segments.append((start, float(new_end), from_lr))
        unit = "step" if self.by == "steps" else "s"
        if start >= new_end:  # only by steps: a run shorter than its warmup, whose decay never starts
            return (f"lr schedule extended: the end moves to step {new_end:g} (was step {self.segments[-2][1]:g}), "
                    f"still inside the {self.warmup_steps}-step warmup: the lr keeps warming up")
        return (f"lr schedule extended: from {from_lr:.3g} at {start:g} {unit} to the floor {self.floor:.3g} "
                f"at {new_end:g} {unit} (was {self.segments[-2][1]:g} {unit})")

    def check_same_shape(self, by: str, peak: float, warmup_steps: int, min_lr_ratio: float) -> str | None:
        """Name the first setting a resumed config changes from this saved schedule (None if none):
        a resume keeps the schedule it was saved with, only its end may move."""
        for name, saved, wanted in (("schedule_by", self.by, by), ("lr", self.peak, peak),
                                    ("warmup_steps", self.warmup_steps, warmup_steps),
                                    ("min_lr_ratio", self.min_lr_ratio, min_lr_ratio)):
            if saved != wanted:
                return f"{name}={saved!r} there vs {wanted!r} here"
        return None

    def state_dict(self) -> dict:
        return {"by": self.by, "peak": self.peak, "warmup_steps": self.warmup_steps,
                "min_lr_ratio": self.min_lr_ratio, "segments": [list(s) for s in self.segments]}

    @classmethod
    def from_state_dict(cls, d: dict) -> "LRSchedule":
        return cls(d["by"], float(d["peak"]), int(d["warmup_steps"]), float(d["min_lr_ratio"]),
                   [tuple(map(float, s)) for s in d["segments"]])


class StepCounted(nn.Module):
    """A module whose behaviour follows the optimizer step count (a dense warmup,
    a sparsity ramp). The count lives twice: in a saved buffer, so a resumed run
    continues where it stopped, and in a host int, since reading a CUDA buffer
    every forward would be a host sync (and a graph break under torch.compile).

    The forward must not read that int either: torch.compile takes an int
    attribute for a constant, so a compiled model would recompile at every step and,
    past dynamo's recompile limit (8), run the module eagerly for good
    (bench/results/trainer_throughput_d20_compiled_recompiling_h200.json).
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
        self.set_step(self._steps + 1)

    def set_step(self, step: int) -> None:
        """Put the schedule at optimizer step ``step`` (the trainer sets every
        module from its own step count, so there is one counter; a resumed run
        sets it from the checkpoint's step)."""
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        if step == self._steps:
            return
        self._steps = step
        getattr(self, self.STEP_BUFFER).fill_(step)
        self._count_changed()

    def _count_changed(self) -> None:
        """Recompute what the forward reads from the count (nothing by default)."""

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:  # type: ignore[override]
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if prefix + self.STEP_BUFFER in state_dict:
            self._steps = int(state_dict[prefix + self.STEP_BUFFER])
            self._count_changed()


def step_counted(model: nn.Module) -> list[StepCounted]:
    """The modules of ``model`` whose schedule a training loop advances after each
    optimizer step (:meth:`StepCounted.set_step` or :meth:`StepCounted.step`)."""
    return [m for m in model.modules() if isinstance(m, StepCounted)]
