"""``python -m bench quality``: val loss against controls, at equal steps or equal wall-clock.

``--set`` picks the runs (``RUN_SETS``; the first is the baseline), ``--shapes``
the model and training budget (``tiny``: the tiny preset's own settings, the
README's CPU demo; ``nano-125m``; ``1b``: d 2048, 16 layers). ``--max-seconds``
gives every run the same wall-clock instead of the same steps (a constant
learning rate after warm-up: no step count to decay towards). Each row's
``extra`` holds the run's val-loss curve by step and by train seconds, its
final val loss and its tokens/s; its times are the step time of each logged
window. ``python -m bench.plot FILE.json FILE.png`` draws the curves.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

from sparsetrain import build_config, train
from sparsetrain.build import build_model

from .options import BenchError, describe_shapes, parse_cases, parse_overrides
from .results import Result
from .train_steps import SPARSE24_OVERRIDES

SHARED_DEFAULTS = {"shapes": "", "compile": False}

_NANO = dict(max_steps=800, seq_len=1024, batch_size=16, lr=1e-3, warmup_steps=100, eval_every=100, eval_batches=16,
             log_every=50)
SHAPES = {"quality": {
    "tiny": {"preset": "tiny", "overrides": {}},
    "nano-125m": {"preset": "nano-125m", "overrides": _NANO},
    "1b": {"preset": "nano-125m", "overrides": {**_NANO, "seq_len": 2048, "batch_size": 8, "lr": 3e-4,
                                                 "d_model": 2048, "n_layer": 16, "n_head": 16}},
}}
DEFAULT = ["quality:nano-125m"]

RUN_SETS: dict[str, dict[str, dict]] = {
    "dense": {"dense": {}},
    "selection": {  # CGGR selective loss at keep_ratio, the same number of steps
        "dense": {},
        "random": {"selection": "loss", "selection_method": "random"},
        "loss": {"selection": "loss", "selection_score": "loss"},
        "combined": {"selection": "loss", "selection_score": "combined"},
        "collider": {"selection": "loss", "selection_score": "collider"},
    },
    "collider": {  # adaptive threshold on the collider score
        "dense": {},
        "collider_0.4": {"use_collider": True, "collider_sparsity": 0.4},
        "collider_0.5": {"use_collider": True, "collider_sparsity": 0.5},
        "random_0.5": {"use_collider": True, "collider_sparsity": 0.5, "collider_method": "random"},
    },
    "collider_topk": {  # exactly half the tokens (top-k: no host sync), as the step timings run it
        "dense": {},
        "collider_0.5": {"use_collider": True, "collider_sparsity": 0.5, "collider_method": "topk"},
        "random_0.5": {"use_collider": True, "collider_sparsity": 0.5, "collider_method": "random"},
    },
    "mtp": {"dense": {}, "mtp_2": {"use_mtp": True, "mtp_n_tokens": 2}, "mtp_4": {"use_mtp": True, "mtp_n_tokens": 4}},
    "hyper": {"dense": {}, "hyper_2": {"hyper_connections": 2}, "hyper_4": {"hyper_connections": 4}},
    "sparse24": {  # 2:4 after a dense warmup, and the control: the same structure with patterns drawn at random
        "relu2": {},
        "relu2_24": {**SPARSE24_OVERRIDES, "activation_dense_warmup_steps": 100},
        "relu2_24_random": {**SPARSE24_OVERRIDES, "activation_sparse_method": "transposable_random",
                            "activation_dense_warmup_steps": 100},
    },
    # about 59M parameters each at vocab 8192: 6 BK layers of 4 experts against 16 GPT blocks; the GPT
    # gets the dense ResNet-BK's wall-clock (equal_time_to)
    "bk": {
        "resnet_bk": {"arch": "resnet_bk", "d_model": 512, "n_layer": 6, "n_head": 8, "bk_num_experts": 4},
        "resnet_bk_sparse_0.5": {"arch": "resnet_bk", "d_model": 512, "n_layer": 6, "n_head": 8, "bk_num_experts": 4,
                                 "bk_sparsity": 0.5, "bk_sparsity_warmup_steps": 100},
        "gpt_equal_params": {"d_model": 512, "n_layer": 16, "n_head": 8, "equal_time_to": "resnet_bk"},
    },
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--set", dest="run_set", choices=sorted(RUN_SETS), default="selection", help="the runs to compare")
    p.add_argument("--runs", default="", help="comma list: only these runs of the set")
    p.add_argument("--steps", type=int, default=None, help="training steps of each run (default: the shape's)")
    p.add_argument("--max-seconds", type=float, default=0.0, help="wall-clock budget of each run (0: steps only)")
    p.add_argument("--keep-ratio", type=float, default=0.5, help="the selection set's kept fraction")
    p.add_argument("--overrides", default="", help="'key=value,...' config overrides for every run (e.g. data=DIR)")


def file_label(args: argparse.Namespace) -> str:
    return f"{args.run_set}-{(args.shapes or 'nano-125m').replace(',', '.')}" + ("-compiled" if args.compile else "")


def run_shape(shape: str, args: argparse.Namespace) -> list[Result]:
    spec = SHAPES["quality"][shape]
    runs = RUN_SETS[args.run_set]
    names = [n for n in args.runs.split(",") if n] or list(runs)
    unknown = [n for n in names if n not in runs]
    if unknown:
        raise BenchError(f"--runs {unknown[0]}: not a run of the {args.run_set} set ({', '.join(runs)})")
    common = parse_overrides("all:" + args.overrides)[0][2] if args.overrides else {}
    base = {**spec["overrides"], "keep_ratio": args.keep_ratio, "compile": args.compile,
            "cache_dir": os.environ.get("SPARSETRAIN_CACHE", "/tmp/sparsetrain-cache"), **common}
    if args.steps is not None:
        base["max_steps"] = args.steps
    if args.max_seconds:
        base.update(max_steps=max(base.get("max_steps", 0), 100_000), max_seconds=args.max_seconds, min_lr_ratio=1.0)
    train_seconds: dict[str, float] = {}
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            overrides = {**base, **runs[name], "out_dir": f"{tmp}/{name}"}
            if "equal_time_to" in overrides:  # the same wall-clock as another run of this set
                other = overrides.pop("equal_time_to")
                if other not in train_seconds:
                    raise BenchError(f"{name} takes {other}'s wall-clock: run {other} first (--runs)")
                overrides.update(max_steps=100_000, min_lr_ratio=1.0, max_seconds=train_seconds[other])
            cfg = build_config(spec["preset"], overrides=overrides)
            res = train(cfg, verbose=False)
            train_seconds[name] = res.train_seconds
            rows = [json.loads(line) for line in (Path(tmp) / name / "metrics.jsonl").read_text().splitlines()]
            log_every = cfg.log_every
            tokens_per_step = cfg.batch_size * cfg.model.seq_len * cfg.grad_accum
            windows = [r["tokens_per_s"] for r in rows if r["kind"] == "train" and r["step"] % log_every == 0]
            times = [tokens_per_step / tps * 1e3 for tps in windows if tps > 0] or [res.train_seconds / res.steps_done * 1e3]
            trained = [r for r in rows if r["kind"] == "train"]
            extra = {
                "preset": spec["preset"], "overrides": {k: v for k, v in overrides.items() if k != "out_dir"},
                "val_loss": {str(k): v for k, v in sorted(res.val_losses.items())},
                "val_seconds": {str(r["step"]): r["train_seconds"] for r in rows if r["kind"] == "eval"},
                "val_loss_final": res.val_losses[max(res.val_losses)] if res.val_losses else None,
                "train_seconds": res.train_seconds, "tokens_per_s": res.tokens_per_second, "steps": res.steps_done,
                "params": sum(p.numel() for p in build_model(cfg.model).parameters()),
                "bk_sparsity_last": next((r["bk_sparsity"] for r in reversed(rows) if "bk_sparsity" in r), None),
                "mean_kept_fraction": sum(r.get("kept_fraction", 1.0) for r in trained) / max(1, len(trained)),
            }
            results.append(Result(name, f"quality:{shape}", times, baseline=None if name == names[0] else names[0],
                                  extra=extra))
            print(f"quality {shape} {name}: final val loss {extra['val_loss_final']}, {res.train_seconds:.0f} s", flush=True)
    return results


def run(args: argparse.Namespace) -> list[Result]:
    if args.shapes == "list":
        print(describe_shapes(SHAPES, DEFAULT))
        raise SystemExit(0)
    if args.steps is not None and args.steps < 1:
        raise BenchError(f"--steps must be >= 1, got {args.steps}")
    if args.max_seconds < 0:
        raise BenchError(f"--max-seconds must be >= 0, got {args.max_seconds}")
    results: list[Result] = []
    for _, shape in parse_cases(args.shapes, SHAPES, DEFAULT):
        results += run_shape(shape, args)
        args.save_partial(results)
    return results
