"""``python -m bench gradient_error``: how far each token selection's gradient is from dense's.

A selection that back-propagates a part of the tokens gives a gradient that
differs from the full batch's in two ways: its mean over draws may be off
(bias: top-k, and Collider's detached keys and values of dropped tokens) and
each draw scatters around that mean (variance: random and importance). Both
cost training progress, and which costs more decides whether a score can beat
the random control. This suite measures them directly.

Per shape: the model trains dense for ``--warm-steps`` (the trainer, the
shape's preset and settings), so the losses are those of a model part-way
through training; then on one held-back training batch (float32, no
autocast) it takes the dense gradient ``g`` (mean cross-entropy over every
target) and, for each selection in ``--methods``, the Collider gradient of
``--draws`` draws at ``--drop``, each from its own selector seed. A row per
selection, relative to ``||g||^2``: ``bias2`` = ``||mean - g||^2``, ``variance`` =
the mean of ``||draw - mean||^2``, ``mse`` = the mean of ``||draw - g||^2``
(= bias2 + variance; ``mse_sem`` its standard error over the draws), and ``cosine`` = the mean cosine between a draw and ``g``.
Its times are each draw's selection, forward and backward.

Methods are ``NAME=METHOD/SCORE`` (e.g. ``importance=importance/gradnorm``);
``keepall`` (every token kept: the engine's gradient equals dense's up to
rounding) is the check that the measurement itself is exact.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import torch
import torch.nn.functional as F

from sparsetrain import build_config
from sparsetrain.collider import ColliderModel, masked_cross_entropy
from sparsetrain.data import train_batch
from sparsetrain.selection import METHODS, SCORES, TokenSelector
from sparsetrain.trainer import Trainer

from .options import BenchError, describe_shapes, parse_cases, parse_overrides
from .results import Result

SHARED_DEFAULTS = {"shapes": "", "compile": False}
SHAPES = {"gradient_error": {
    "tiny": {"preset": "tiny", "overrides": {}},
    "nano-125m": {"preset": "nano-125m", "overrides": {"seq_len": 1024, "batch_size": 8, "lr": 1e-3,
                                                       "warmup_steps": 50}},
    # the time-to-quality protocol's model (docs/time_to_quality.md)
    "m320": {"preset": "nano-125m", "overrides": {"n_layer": 24, "d_model": 1024, "n_head": 16, "seq_len": 2048,
                                                  "batch_size": 8, "lr": 6e-4, "warmup_steps": 50}},
}}
DEFAULT = ["gradient_error:tiny"]
METHOD_DEFAULT = "random=random/loss,importance=importance/gradnorm,importance_loss=importance/loss,topk=topk/loss," \
                 "topk_collider=topk/collider"
HELD_BACK_STEP = 10**7  # the batch the gradients are measured on: a step no warm-up reaches


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--methods", default=METHOD_DEFAULT, help=f"NAME=METHOD/SCORE,... (default {METHOD_DEFAULT})")
    p.add_argument("--drop", type=float, default=0.5, help="fraction of the targets each selection drops (default 0.5)")
    p.add_argument("--draws", type=int, default=32, help="selector seeds per method (default 32)")
    p.add_argument("--warm-steps", type=int, default=150, help="dense training steps before measuring (default 150)")
    p.add_argument("--overrides", default="", help="'key=value,...' config overrides (e.g. data=DIR)")


def file_label(args: argparse.Namespace) -> str:
    return f"{(args.shapes or 'tiny').replace(',', '.')}-drop{args.drop:g}"


def parse_methods(spec: str) -> list[tuple[str, str, str]]:
    out = []
    for entry in filter(None, (e.strip() for e in spec.split(","))):
        name, _, rest = entry.partition("=")
        method, _, score = rest.partition("/")
        if not name or method not in METHODS or score not in SCORES:
            raise BenchError(f"--methods entry {entry!r}: give NAME=METHOD/SCORE with METHOD one of "
                             f"{', '.join(METHODS)} and SCORE one of {', '.join(SCORES)}")
        out.append((name, method, score))
    return out


def flat_grad(model: torch.nn.Module) -> torch.Tensor:
    """Every parameter's gradient in one float64 vector (zeros where none), then cleared."""
    parts = [(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).double() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    return torch.cat(parts)


def run_shape(shape: str, args: argparse.Namespace, methods: list[tuple[str, str, str]]) -> list[Result]:
    spec = SHAPES["gradient_error"][shape]
    extra_overrides = parse_overrides("all:" + args.overrides)[0][2] if args.overrides else {}
    with tempfile.TemporaryDirectory() as tmp:
        overrides = {**spec["overrides"], "max_steps": max(args.warm_steps, 1), "out_dir": f"{tmp}/warm",
                     "save_checkpoints": False, "compile": False, "dtype": "float32",
                     "cache_dir": os.environ.get("SPARSETRAIN_CACHE", f"{tmp}/cache"), **extra_overrides}
        cfg = build_config(spec["preset"], overrides=overrides)
        t = Trainer(cfg, verbose=False)
        for _ in range(args.warm_steps):
            t.train_step()
        model = t.model.eval()  # no dropout in the GPT; eval() only so no training-time statistic moves
        x, y = train_batch(t.corpus.train, cfg.batch_size, cfg.model.seq_len, seed=cfg.seed, step=HELD_BACK_STEP,
                           micro=0, rank=0, world_size=1)
        x, y = x.to(t.device), y.to(t.device)
        n_valid = int((y != -100).sum())
        logits = model(x)[0]
        dense_loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), y.reshape(-1), ignore_index=-100)
        dense_loss.backward()
        g = flat_grad(model)
        gg = float(g @ g)
        cm = ColliderModel(model)
        results = []
        for name, method, score in [("keepall", "topk", "loss"), *methods]:
            keep_ratio = 1.0 if name == "keepall" else 1.0 - args.drop
            total, sq_errs, cosines, times = torch.zeros_like(g), [], [], []  # streaming: one vector per draw in memory
            n_draws = 1 if name == "keepall" else args.draws
            for d in range(n_draws):
                t0 = time.perf_counter()
                sel = TokenSelector(score=score, method=method, keep_ratio=keep_ratio, seed=1000 + d)
                out = cm(x)
                keep, stats = sel(out.detach(), y, n_valid=n_valid)
                masked_cross_entropy(out, y, keep, stats.weights).backward()
                draw = flat_grad(model)
                if t.device.type == "cuda":
                    torch.cuda.synchronize()
                times.append((time.perf_counter() - t0) * 1e3)
                total += draw
                sq_errs.append(float((draw - g) @ (draw - g)) / gg)
                cosines.append(float(draw @ g) / (float(draw.norm()) * gg ** 0.5))
            mean = total / n_draws
            bias2 = float((mean - g) @ (mean - g)) / gg
            mse = sum(sq_errs) / n_draws
            # the standard error of mse over draws: whether two selections' errors differ by more than chance
            mse_sem = (sum((e - mse) ** 2 for e in sq_errs) / max(n_draws - 1, 1) / n_draws) ** 0.5
            variance = max(mse - bias2, 0.0)  # mean ||draw - g||^2 = ||mean - g||^2 + mean ||draw - mean||^2
            cosine = sum(cosines) / n_draws
            extra = {"method": method, "score": score, "keep_ratio": keep_ratio, "draws": n_draws,
                     "bias2": bias2, "variance": variance, "mse": mse, "mse_sem": mse_sem, "cosine": cosine,
                     "warm_steps": args.warm_steps, "dense_loss": float(dense_loss.detach()), "targets": n_valid,
                     "preset": spec["preset"], "overrides": {k: v for k, v in overrides.items() if k != "out_dir"}}
            results.append(Result(name, f"gradient_error:{shape}", times, extra=extra))
            print(f"gradient_error {shape} {name:<16} bias2 {bias2:.4f}  variance {variance:.4f}  mse {mse:.4f} "
                  f"± {mse_sem:.4f}  "
                  f"cosine {cosine:.4f}", flush=True)
        t.close_loader()
    return results


def run(args: argparse.Namespace) -> list[Result]:
    if args.shapes == "list":
        print(describe_shapes(SHAPES, DEFAULT))
        raise SystemExit(0)
    if not 0 < args.drop < 1:
        raise BenchError(f"--drop must be in (0, 1), got {args.drop}")
    if args.draws < 2:
        raise BenchError(f"--draws must be >= 2 (a variance needs two), got {args.draws}")
    if args.warm_steps < 0:
        raise BenchError(f"--warm-steps must be >= 0, got {args.warm_steps}")
    methods = parse_methods(args.methods)
    results: list[Result] = []
    for _, shape in parse_cases(args.shapes, SHAPES, DEFAULT):
        results += run_shape(shape, args, methods)
        args.save_partial(results)
    return results
