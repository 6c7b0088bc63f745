"""Dense and Collider training steps of one model, each split into timed phases.

Both variants of a shape step the same model (Collider wraps it) and the same
AdamW, on the same random batch, under bf16 autocast on CUDA. A step marks
the ends of its phases (CUDA events on the GPU, the host clock on the CPU):

* ``forward``: the model on all tokens (dense: with its loss);
* ``select``: scoring and exact top-k keep mask (``collider`` score, ``topk``:
  no host sync, fixed shapes), Collider only;
* ``backward``: the loss on the kept rows and the backward through them
  (dense: the whole backward);
* ``optimizer``: AdamW and zeroing the gradients.

``torch.compile`` compiles the dense model whole, and Collider's own
elementwise pieces (its autograd node is not traced whole).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch
from torch.profiler import record_function

from sparsetrain.bench_step import default_optimizer
from sparsetrain.collider import ColliderModel, filter as collider_filter, masked_cross_entropy
from sparsetrain.config import build_config
from sparsetrain.build import build_model
from sparsetrain.selection import TokenSelector

PHASES = ("forward", "select", "backward", "optimizer")


def _marker(device: torch.device) -> tuple[Callable[[], object], Callable[[object, object], float]]:
    """``(mark, ms_between)``: CUDA events on the GPU, the host clock elsewhere."""
    if device.type == "cuda":
        def mark() -> object:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            return e
        return mark, lambda a, b: a.elapsed_time(b)  # type: ignore[attr-defined]
    return time.perf_counter, lambda a, b: (b - a) * 1e3  # type: ignore[operator]


class PhasedStep:
    """One training step (``kind``: ``"dense"`` or ``"collider"``), callable with
    no arguments; each call appends its phase marks to ``marks``."""

    def __init__(self, kind: str, model: torch.nn.Module, run: Callable, optimizer: torch.optim.Optimizer,
                 x: torch.Tensor, y: torch.Tensor, drop: float | None = None) -> None:
        self.kind, self.model, self.run, self.optimizer, self.x, self.y = kind, model, run, optimizer, x, y
        self.selector = TokenSelector(score="collider", method="topk", keep_ratio=1.0 - drop) if drop else None
        self.n_valid = y.numel()  # known on the host: the selector sizes its budget without a sync
        self.amp = x.device.type == "cuda"
        self.mark, self.ms_between = _marker(x.device)
        self.marks: list[tuple[object, ...]] = []

    def __call__(self) -> None:
        m0 = self.mark()
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.amp), record_function("phase:forward"):
            if self.kind == "dense":
                _, loss = self.run(self.x, self.y)
            else:
                logits = self.run(self.x)
        m1 = self.mark()
        keep = None
        if self.selector is not None:
            with record_function("phase:select"):
                keep, _ = self.selector(logits.detach(), self.y, n_valid=self.n_valid)
        m2 = self.mark()
        with record_function("phase:backward"):
            if keep is not None:
                with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.amp):
                    loss = masked_cross_entropy(logits, self.y, keep)
            with collider_filter(keep):
                loss.backward()
        m3 = self.mark()
        with record_function("phase:optimizer"):
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        m4 = self.mark()
        self.marks.append((m0, m1, m2, m3, m4))

    def phase_ms(self, which: list[bool]) -> dict[str, float]:
        """Median milliseconds of each phase over the calls flagged in ``which`` (one flag per call, in order)."""
        if self.amp:
            torch.cuda.synchronize()
        picked = [m for m, keep in zip(self.marks, which) if keep]
        return {name: statistics.median(self.ms_between(m[i], m[i + 1]) for m in picked)
                for i, name in enumerate(PHASES)}


def build_collider_steps(preset: str, overrides: dict, seq_len: int, batch_size: int, drops: list[float],
                         compile: bool, device: torch.device) -> tuple[dict[str, PhasedStep], torch.nn.Module]:
    """``({"dense": ..., "collider_<drop>": ...}, model)``: the phased steps of
    one model of the preset (with ``overrides``) on one random batch."""
    cfg = build_config(preset, overrides={"seq_len": seq_len, **overrides}).model
    torch.manual_seed(0)
    model = build_model(cfg).to(device).train()
    optimizer = default_optimizer(model)
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randint(0, cfg.vocab_size, (batch_size, seq_len), device=device, generator=g)
    y = torch.randint(0, cfg.vocab_size, (batch_size, seq_len), device=device, generator=g)
    dense_run = torch.compile(model) if compile else model
    steps = {"dense": PhasedStep("dense", model, dense_run, optimizer, x, y)}
    collider = ColliderModel(model, compile=compile)
    for drop in drops:
        steps[f"collider_{drop}"] = PhasedStep("collider", model, collider, optimizer, x, y, drop)
    return steps, model
