"""The ``optimizers`` bench of ``python -m bench steps``: one training step with
each optimizer of ``[training] optimizer`` (adamw, muon, lion, adamw8bit,
galore_adamw), its peak memory and its optimizer state.

Unlike the interleaved benches, each variant is built, measured and freed
before the next (the loop of :mod:`sparsetrain.optimizers`' docstring), so
that no other variant's weights or state count in its memory:

1. build the model and the optimizer the config names (a missing optional
   package gives the variant a row whose ``error`` names it);
2. prime: ``--warmup`` steps (at least one: the first allocates the state;
   its start-up recorded as in the other benches);
3. one more step, measured: ``resident_memory_gib`` before it (weights,
   optimizer state, whatever else stays allocated between steps) and
   ``peak_memory_gib`` during it (CUDA), and ``state_bytes``
   (:func:`sparsetrain.optimizers.state_bytes`) after it;
4. heat the GPU, then ``--repeats`` timed steps in ``--rounds`` rounds.

The times are of whole steps (phases in ``phase_ms``), each variant timed on
its own, not interleaved with the others. GaLore renews its projections
every ``galore_update_proj_gap`` steps (an SVD per matrix): the first step
does, the timed steps do not, so its times leave that cost out.
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
import traceback
from typing import Any

import torch

from sparsetrain.errors import SparsetrainError
from sparsetrain.optimizers import state_bytes

from .results import Result, quantile
from .timing import call_flags, gib, gpu_clock_monitor, heat_gpu, prime, sync, time_interleaved
from .train_steps import build_steps


def measure_one(name: str, kwargs: dict[str, Any], args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """Build, prime, measure and time one optimizer's step: its samples (ms) and extra."""
    t0 = time.perf_counter()
    built = build_steps({name: kwargs})[name]
    sync(device)
    build_s = time.perf_counter() - t0
    warmup = max(1, args.warmup)
    startup = {"build_s": build_s, **prime({name: built.step}, warmup, device)[name]}
    extra: dict[str, Any] = {"optimizer": name, "startup": startup}
    if device.type == "cuda":
        extra["resident_memory_gib"] = gib(torch.cuda.memory_allocated())
        torch.cuda.reset_peak_memory_stats()
    built.step()  # with the state allocated: the step a long run repeats
    sync(device)
    if device.type == "cuda":
        extra["peak_memory_gib"] = gib(torch.cuda.max_memory_allocated())
    params = sum(p.numel() for p in built.model.parameters() if p.requires_grad)
    extra.update(state_bytes=state_bytes(built.step.optimizer), params=params)
    extra["state_bytes_per_param"] = extra["state_bytes"] / params
    extra["heat"] = heat_gpu(args.heat_seconds)
    with gpu_clock_monitor() as clocks:
        times = time_interleaved({name: built.step}, rounds=args.rounds, warmup=0, repeats=args.repeats,
                                 calls_per_sample=args.queued)[name]
    flags = call_flags([name], warmup + 1, args.rounds, args.repeats, args.queued)[name]
    extra.update(gpu_clocks=clocks, phase_ms=built.clock.phase_ms(flags))
    return {"times": times, "extra": extra}


def run_optimizers(label: str, variants: dict[str, dict[str, Any]], args: argparse.Namespace, device: torch.device,
                   mode: dict[str, Any]) -> list[Result]:
    """One row per optimizer (``variants``: name -> :func:`make_train_step`
    arguments, the first the baseline); a variant that cannot be built or run
    gets a row with its ``error``."""
    spec = next(iter(variants.values()))
    tokens_per_call = spec["seq_len"] * spec["batch_size"]
    baseline = next(iter(variants))
    results = []
    for name, kwargs in variants.items():
        base = None if name == baseline else baseline
        shared = {"mode": mode, "spec": {k: v for k, v in kwargs.items() if k != "prepare"},
                  "tokens_per_call": tokens_per_call}
        try:
            got = measure_one(name, kwargs, args, device)
            extra = {**shared, **got["extra"],
                     "tokens_per_s": tokens_per_call / (quantile(got["times"], 0.5) * 1e-3)}
            results.append(Result(name, label, got["times"], baseline=base, extra=extra))
        except SparsetrainError as e:  # a missing optional package: one line, the other optimizers still run
            print(f"steps {label}: {name}: {e}", flush=True)
            results.append(Result(name, label, [], baseline=base, extra=shared, error=f"{type(e).__name__}: {e}"))
        except Exception as e:  # noqa: BLE001 - out of memory: recorded, the other optimizers still run
            traceback.print_exc(file=sys.stderr)
            results.append(Result(name, label, [], baseline=base, extra=shared, error=f"{type(e).__name__}: {e}"[:500]))
        finally:
            gc.collect()
            torch._dynamo.reset()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return results
