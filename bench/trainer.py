"""``python -m bench trainer``: tokens/s as the trainer itself reports it, variants against the first.

Each run trains ``--steps`` steps on the embedded corpus (or ``data=`` in
``--runs``) and logs every ``--log-every``; the trainer syncs the GPU once per
log window, so its tokens/s per window is the end-to-end rate a user sees
(data, queued steps, optimizer). A run's figure is its median window after the
first ``--warmup`` windows (compilation, warm-up).

Before any run is timed, every run is trained ``--prime-steps`` steps untimed
(compiling it and filling the compile caches the timed run reads: a first
compilation idles the GPU long enough to cool it), then the GPU is heated for
``--heat-seconds``. The timed runs go in ABBA order (:func:`bench.timing.abba_order`,
``--repeats`` runs of each), so a drift linear in time falls on every run
alike; a run's sample is its median window (ms per step), and the median over
its repeats (for two, their mean) is its figure. Each run records the SM
clock, power and temperature while it trained.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import shutil
import statistics
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch

from sparsetrain import build_config, train
from sparsetrain.trainer import Trainer

from .options import BenchError, describe_shapes, parse_cases, parse_overrides
from .results import Result
from .timing import abba_order, gpu_clock_monitor, heat_gpu
from .train_steps import SPARSE24_OVERRIDES

SHARED_DEFAULTS = {"repeats": 2, "warmup": 2, "shapes": "", "compile": False, "heat_seconds": {"cuda": 60.0, "cpu": 0.0}}
SHARED_MEANING = {"repeats": "timed runs of each variant, in ABBA order (2: A B B A)",
                  "warmup": "logged windows left out of each run's median (compilation, warm-up)"}

SHAPES = {"trainer": {
    "tiny": {"preset": "tiny", "overrides": {}},
    "nano-125m": {"preset": "nano-125m", "overrides": {"seq_len": 2048, "batch_size": 8}},
    "m320": {"preset": "nano-125m", "overrides": {"seq_len": 2048, "batch_size": 8, "n_layer": 24, "d_model": 1024,
                                                  "n_head": 16}},  # the time-to-quality protocol's model
    "d20": {"preset": "d20", "overrides": {"seq_len": 2048, "batch_size": 8}},
    "d4096": {"preset": "d20", "overrides": {"seq_len": 2048, "batch_size": 8, "d_model": 4096, "n_head": 32, "n_layer": 8}},
}}
DEFAULT = ["trainer:d20"]
DEFAULT_RUNS = "relu2:ffn=relu2;relu2_24:" + ",".join(f"{k}={v}" for k, v in SPARSE24_OVERRIDES.items())


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--runs", default=DEFAULT_RUNS,
                   help="'name:key=value,...' entries (config overrides) separated by ';'; the first is the baseline")
    p.add_argument("--steps", type=int, default=80, help="training steps of each run")
    p.add_argument("--log-every", type=int, default=10, help="steps per logged window")
    p.add_argument("--prime-steps", type=int, default=3,
                   help="train each run this many steps, untimed, before heating and timing (compiles it; 0: off)")
    p.add_argument("--fixed-batch", action="store_true",
                   help="train every step on the first batch, as the step benches do (is the data path what differs?)")


def file_label(args: argparse.Namespace) -> str:
    return (args.shapes or "d20").replace(",", ".") + ("-compiled" if args.compile else "")


@contextlib.contextmanager
def first_batch_only() -> Iterator[None]:
    """Every Trainer returns the first batch it built, already on its device, at every step."""
    build = Trainer._batch

    def first_batch(self: Trainer, micro: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not hasattr(self, "_bench_batch"):
            self._bench_batch = tuple(t.to(self.device) for t in build(self, micro))
        return self._bench_batch

    Trainer._batch = first_batch
    try:
        yield
    finally:
        Trainer._batch = build


def _release() -> None:
    """Free the last run's GPU memory before the next: a captured step's graph holds its
    activations in a private pool until the run's objects are collected."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _one_run(preset: str, overrides: dict, log_every: int, run_dir: str) -> dict:
    """Train one run; its logged windows' tokens/s and backward ms, the last loss, the GPU's state."""
    with gpu_clock_monitor(interval_s=1.0) as gpu:
        train(build_config(preset, overrides={**overrides, "out_dir": run_dir}), verbose=False)
    _release()
    rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in rows if r["kind"] == "train" and r["step"] % log_every == 0]  # one per window
    shutil.rmtree(run_dir, ignore_errors=True)
    return {"tokens_per_s_by_window": [r["tokens_per_s"] for r in logged],
            "backward_ms_by_window": [r["backward_ms"] for r in logged if "backward_ms" in r],
            "loss_last": next(r["loss"] for r in reversed(rows) if r["kind"] == "train"), "gpu": gpu}


def run_shape(shape: str, args: argparse.Namespace) -> list[Result]:
    spec = SHAPES["trainer"][shape]
    runs = {name: ov for _, name, ov in parse_overrides(args.runs)}
    base = dict(max_steps=args.steps, log_every=args.log_every, eval_every=10 * args.steps, eval_batches=2,
                save_checkpoints=False, warmup_steps=10, compile=args.compile,
                cache_dir=os.environ.get("SPARSETRAIN_CACHE", "/tmp/sparsetrain-cache"), **spec["overrides"])
    configs = {name: build_config(spec["preset"], overrides={**base, **ov}) for name, ov in runs.items()}  # checked first
    tokens_per_step = {name: c.batch_size * c.model.seq_len * c.grad_accum for name, c in configs.items()}
    repeats: dict[str, list[dict]] = {name: [] for name in runs}
    with tempfile.TemporaryDirectory() as tmp, (first_batch_only() if args.fixed_batch else contextlib.nullcontext()):
        for name in runs if args.prime_steps > 0 else ():
            prime = {**base, **runs[name], "max_steps": args.prime_steps, "log_every": 1}
            train(build_config(spec["preset"], overrides={**prime, "out_dir": f"{tmp}/prime_{name}"}), verbose=False)
            _release()
        heat = heat_gpu(args.heat_seconds)
        for i, name in enumerate(abba_order(list(runs), args.repeats)):
            print(f"trainer {shape}: run {i} ({name})", flush=True)
            r = _one_run(spec["preset"], {**base, **runs[name]}, args.log_every, f"{tmp}/{i}_{name}")
            windows = r["tokens_per_s_by_window"][args.warmup:] or r["tokens_per_s_by_window"][-1:]
            r.update(order=i, median_tokens_per_s=statistics.median(windows))
            repeats[name].append(r)
    first = next(iter(runs))
    results = []
    for name, reps in repeats.items():
        times = [tokens_per_step[name] / r["median_tokens_per_s"] * 1e3 for r in reps]  # ms per step, one per run
        extra = {"preset": spec["preset"], "overrides": {**spec["overrides"], **runs[name]},
                 "tokens_per_step": tokens_per_step[name],
                 "tokens_per_s": statistics.mean(r["median_tokens_per_s"] for r in reps), "runs": reps, "heat": heat}
        results.append(Result(name, f"trainer:{shape}", times, baseline=None if name == first else first, extra=extra))
    return results


def run(args: argparse.Namespace) -> list[Result]:
    if args.shapes == "list":
        print(describe_shapes(SHAPES, DEFAULT))
        raise SystemExit(0)
    for name in ("steps", "log_every"):
        if getattr(args, name) < 1:
            raise BenchError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.prime_steps < 0:
        raise BenchError(f"--prime-steps must be >= 0, got {args.prime_steps}")
    if not parse_overrides(args.runs):
        raise BenchError(f"--runs {args.runs!r}: no run")
    results: list[Result] = []
    for _, shape in parse_cases(args.shapes, SHAPES, DEFAULT):
        results += run_shape(shape, args)
        args.save_partial(results)
    return results
