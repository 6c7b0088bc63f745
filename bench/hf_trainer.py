"""``python -m bench hf_trainer``: the Hugging Face ``Trainer``'s own step time,
dense against :class:`sparsetrain.hf_trainer.ColliderTrainer`.

Where ``python -m bench hf`` times the bare step (forward, backward, AdamW),
this suite times what a fine-tuner runs: ``trainer.train()`` on packed
fixed-length batches of random tokens (a ``labels`` column equal to
``input_ids``), its data loading, gradient clipping, fused AdamW, scheduler and
callbacks included. Variants:

* ``trainer_dense``: ``transformers.Trainer`` (``torch_compile`` with
  ``--compile``), the baseline;
* ``trainer_collider_<drop>``: ``ColliderTrainer`` at ``--drop`` (top-k on the
  ``collider`` score; the engine's pieces compiled with ``--compile``);
* ``trainer_collider_<drop>_graph``: the same with ``cuda_graph=True`` (CUDA
  only): each micro-batch's forward and backward replayed from a CUDA graph.

A step's time is the wall-clock between consecutive ``on_step_end`` callbacks,
each after a device synchronisation (the synchronisation itself costs every
variant alike). Each run trains ``--warmup`` untimed steps (compilation, the
graph's warm-up and capture) and ``--repeats`` timed ones; every variant runs
twice in A B C C B A order after ``--heat-seconds`` of heating, and a row
holds both runs' timed steps. A row's ``extra``: the start-up (the untimed
steps' seconds), peak memory on CUDA, ``collider_graph_steps`` (replayed
micro-steps) for the graph variant, the loss at the last log.
"""

from __future__ import annotations

import argparse
import gc
import tempfile
import time
from typing import Any

import torch

from sparsetrain.step_graph import EAGER_STEPS

from .hf import LEARNING_RATE, MODELS, build_model, collider_name, make_batch
from .options import BenchError, describe_shapes, parse_cases
from .results import Result
from .timing import abba_order, gib, heat_gpu, sync

SHARED_DEFAULTS = {"repeats": {"cuda": 20, "cpu": 3}, "warmup": {"cuda": 8, "cpu": 2}, "shapes": "",
                   "compile": {"cuda": True, "cpu": False}, "heat_seconds": {"cuda": 10.0, "cpu": 0.0}}
SHARED_MEANING = {"repeats": "timed optimizer steps per run (each variant runs twice)",
                  "warmup": "untimed optimizer steps at the start of each run (compilation, the graph's capture)",
                  "compile": "torch.compile: the dense Trainer's model (torch_compile) and the Collider engine's pieces"}
SHAPES = {"hf_trainer": MODELS}
DEFAULT = ["hf_trainer:smollm-360m"]
RUNS_PER_VARIANT = 2


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--drop", type=float, default=0.5, help="fraction of the targets Collider drops (default 0.5)")
    p.add_argument("--variants", default="",
                   help="comma list of dense, collider, collider_graph (default: all three on CUDA, the first two "
                        "on the CPU)")


def file_label(args: argparse.Namespace) -> str:
    return args.shapes.replace("hf_trainer:", "").replace(",", ".") if args.shapes else "default"


def variant_name(kind: str, drop: float) -> str:
    return {"dense": "trainer_dense", "collider": f"trainer_{collider_name(drop)}",
            "collider_graph": f"trainer_{collider_name(drop)}_graph"}[kind]


class _StepClock:
    """Seconds between consecutive optimizer steps' ends, the device synchronised at each."""

    def __init__(self, device: torch.device) -> None:
        from transformers import TrainerCallback

        clock = self

        class Callback(TrainerCallback):
            def on_train_begin(self, args, state, control, **kwargs):  # noqa: D102 - TrainerCallback hook
                sync(device)
                clock.last = time.perf_counter()

            def on_step_end(self, args, state, control, **kwargs):  # noqa: D102 - TrainerCallback hook
                sync(device)
                now = time.perf_counter()
                clock.seconds.append(now - clock.last)
                clock.last = now

        self.seconds: list[float] = []
        self.last = 0.0
        self.callback = Callback()


def _dataset(shape: str, rows: int) -> list[dict[str, torch.Tensor]]:
    """``rows`` packed sequences of the shape's length: its bench batch repeated (the
    same tokens as ``python -m bench hf``), labels equal to the inputs. A plain list,
    which the Trainer takes as a map-style dataset: the bench needs no ``datasets``."""
    ids = make_batch(shape, "cpu")
    reps = -(-rows // ids.shape[0])
    data = ids.repeat(reps, 1)[:rows]
    return [{"input_ids": row, "labels": row} for row in data]


def train_once(shape: str, kind: str, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """One run of a variant: a fresh model (the bench's seed), ``warmup + repeats``
    optimizer steps; its step seconds and what else it recorded."""
    from transformers import Trainer, TrainingArguments, default_data_collator

    from sparsetrain.hf_trainer import ColliderArguments, ColliderTrainer

    spec = MODELS[shape]
    steps = args.warmup + args.repeats
    cuda = device.type == "cuda"
    model = build_model(shape, device)
    clock = _StepClock(device)
    with tempfile.TemporaryDirectory() as out:
        targs = TrainingArguments(
            output_dir=out, max_steps=steps, per_device_train_batch_size=spec["batch"], learning_rate=LEARNING_RATE,
            lr_scheduler_type="constant", logging_steps=steps, report_to=[], save_strategy="no", bf16=cuda,
            use_cpu=not cuda, optim="adamw_torch_fused" if cuda else "adamw_torch", dataloader_num_workers=0,
            torch_compile=args.compile and kind == "dense", disable_tqdm=True, seed=0)
        common = dict(model=model, args=targs, train_dataset=_dataset(shape, spec["batch"] * steps),
                      data_collator=default_data_collator, callbacks=[clock.callback])
        if kind == "dense":
            trainer = Trainer(**common)
        else:
            trainer = ColliderTrainer(**common, collider=ColliderArguments(
                drop_ratio=args.drop, compile=args.compile, cuda_graph=kind == "collider_graph"))
        from transformers.trainer_callback import PrinterCallback

        trainer.remove_callback(PrinterCallback)  # the Trainer prints every log without a progress bar
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        trainer.train()
        logs = [h for h in trainer.state.log_history if "loss" in h]
        graph_steps = sum(h.get("collider_graph_steps", 0) for h in logs) if kind == "collider_graph" else None
        if graph_steps is not None and graph_steps != steps - EAGER_STEPS:
            raise RuntimeError(f"the graph replayed {graph_steps} of {steps} steps, not every step after its "
                               f"{EAGER_STEPS} eager warm-up steps: its times would not be the graph's")
        run = {"seconds": clock.seconds, "startup_s": sum(clock.seconds[:args.warmup]),
               "peak_memory_gib": gib(torch.cuda.max_memory_allocated()) if cuda else None,
               "loss_last_log": logs[-1]["loss"] if logs else None, "collider_graph_steps": graph_steps,
               "kept_fraction": logs[-1].get("collider_kept_fraction") if logs else None}
    del trainer, model
    return run


def run_shape(shape: str, kinds: list[str], args: argparse.Namespace) -> list[Result]:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    spec = MODELS[shape]
    label = f"{shape}:full"
    mode = {"compile": args.compile, "autocast": "bf16" if device.type == "cuda" else None, "drop": args.drop,
            "optimizer": f"AdamW (fused on CUDA) lr {LEARNING_RATE:g}, clip 1.0", "selection": "collider score, topk",
            "warmup_steps": args.warmup, "timed_steps_per_run": args.repeats, "runs": RUNS_PER_VARIANT}
    heat = heat_gpu(args.heat_seconds)
    runs: dict[str, list[dict[str, Any]]] = {k: [] for k in kinds}
    for kind in abba_order(kinds, RUNS_PER_VARIANT):
        print(f"hf_trainer {label}: {variant_name(kind, args.drop)}, run {len(runs[kind]) + 1}", flush=True)
        try:
            runs[kind].append(train_once(shape, kind, args, device))
        except BenchError:
            raise
        except Exception as e:  # noqa: BLE001 - out of memory, a compile error: recorded, the other variants run
            runs[kind].append({"error": f"{type(e).__name__}: {e}"[:500]})
        finally:
            gc.collect()
            torch._dynamo.reset()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    results = []
    baseline = variant_name(kinds[0], args.drop)
    for kind in kinds:
        name = variant_name(kind, args.drop)
        base = None if kind == kinds[0] else baseline
        errors = [r["error"] for r in runs[kind] if "error" in r]
        if errors:
            results.append(Result(name, label, [], baseline=base, extra={"mode": mode, "spec": spec}, error=errors[0]))
            continue
        times = [1e3 * s for r in runs[kind] for s in r["seconds"][args.warmup:]]
        extra = {"mode": mode, "spec": spec, "heat": heat, "tokens_per_step": spec["batch"] * spec["seq"],
                 "per_run": [{k: v for k, v in r.items() if k != "seconds"} for r in runs[kind]]}
        results.append(Result(name, label, times, baseline=base, extra=extra))
    return results


def _check(args: argparse.Namespace) -> tuple[list[str], list[str]]:
    if args.shapes == "list":
        print(describe_shapes(SHAPES, DEFAULT))
        raise SystemExit(0)
    if not 0 < args.drop < 1:
        raise BenchError(f"--drop must lie strictly between 0 and 1, got {args.drop}")
    if args.repeats < 1 or args.warmup < 0:
        raise BenchError(f"--repeats must be >= 1 and --warmup >= 0, got {args.repeats} and {args.warmup}")
    cuda = torch.cuda.is_available()
    kinds = [k.strip() for k in args.variants.split(",") if k.strip()] if args.variants else (
        ["dense", "collider", "collider_graph"] if cuda else ["dense", "collider"])
    for k in kinds:
        if k not in ("dense", "collider", "collider_graph"):
            raise BenchError(f"--variants: no variant {k!r} (dense, collider, collider_graph)")
    if "collider_graph" in kinds and not cuda:
        raise BenchError("--variants collider_graph needs a CUDA device (CUDA graphs)")
    if "collider_graph" in kinds and args.warmup < EAGER_STEPS + 1:
        raise BenchError(f"--warmup must be >= {EAGER_STEPS + 1} with collider_graph (its {EAGER_STEPS} eager "
                         f"warm-up steps and the capture are start-up), got {args.warmup}")
    if len(set(kinds)) != len(kinds):
        raise BenchError(f"--variants names a variant twice: {args.variants}")
    shapes = [s for _, s in parse_cases(args.shapes, SHAPES, DEFAULT)]
    return shapes, kinds


def run(args: argparse.Namespace) -> list[Result]:
    shapes, kinds = _check(args)
    print(f"hf_trainer plan: {len(shapes)} shape(s) x {len(kinds)} variant(s) x {RUNS_PER_VARIANT} runs, each "
          f"{args.warmup} untimed + {args.repeats} timed optimizer steps, order {' '.join(abba_order(kinds, 2))}",
          flush=True)
    results: list[Result] = []
    for shape in shapes:
        results += run_shape(shape, kinds, args)
        args.save_partial(results)
    return results
