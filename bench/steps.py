"""``python -m bench steps``: whole training steps, each variant against its baseline, at named shapes.

Benches (``--shapes list`` prints their shapes):

* ``dense``: the plain GPT step (forward, backward, AdamW), with tokens/s and MFU;
* ``collider``: dense against Collider at each ``--drops`` ratio, the same
  model, split into forward / select / backward / optimizer phases;
* ``sparse24``: dense ``relu2`` against the 2:4 ``relu2_24`` FFN (transposable,
  sparse from the first step), one shared copy of the weights;
* ``hyper``: no hyper-connections against 2 and 4 streams;
* ``bk_step``: the ResNet-BK step, dense against learned-sparse at ``--skip``;
* ``bk_layer``: one ResNet-BK layer's forward+backward (:mod:`bench.bk_layer`).

Every variant of a shape is built at once, called ``--warmup`` times (which
compiles it), the GPU heated (``--heat-seconds``), and then all are timed in
``--rounds`` interleaved rounds (:func:`bench.timing.time_interleaved`) under
a clock monitor; a sample is one step, or ``--queued`` steps queued back to
back. ``--headline`` runs the three headline comparisons, each in its own
mode: the ~1B Collider step compiled at drop 0.5, the 2:4 step at d 4096
eager, and the BK layer at skip 0.5 and 64k tokens compiled and captured.
"""

from __future__ import annotations

import argparse
import gc
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from sparsetrain.benchmark import peak_bf16_tflops

from .bk_layer import build_layers, layer_calls
from .collider_step import build_collider_steps
from .options import BenchError, describe_shapes, parse_cases
from .profiling import profile_top_kernels
from .results import Result, quantile
from .timing import gpu_clock_monitor, heat_gpu, interleaved_schedule, matmul_tflops, time_interleaved
from .train_steps import SPARSE24_OVERRIDES, build_steps, pin_bk_skip_rate

SHARED_DEFAULTS = {"repeats": 15, "warmup": 3, "shapes": "", "compile": False,
                   "heat_seconds": {"cuda": 20.0, "cpu": 0.0}}

TINY_GPT = {"vocab_size": 512, "n_layer": 2, "n_head": 2, "d_model": 64}
TINY_BK = {"arch": "resnet_bk", "vocab_size": 512, "n_layer": 1, "n_head": 2, "d_model": 32, "ffn_hidden": 64,
           "bk_num_experts": 2}
ONE_B = {"d_model": 2048, "n_layer": 16, "n_head": 16, "vocab_size": 32768}  # ~1B parameters at vocab 32k
D4096 = {"d_model": 4096, "n_head": 32, "n_layer": 8}
BK_16K = {"arch": "resnet_bk", "d_model": 2048, "ffn_hidden": 8192, "n_layer": 4, "n_head": 16, "bk_num_experts": 4}


def _model(preset: str, overrides: dict | None = None, seq: int = 2048, batch: int = 8) -> dict[str, Any]:
    return {"preset": preset, "overrides": overrides or {}, "seq": seq, "batch": batch}


def _layer(batch: int, seq: int, d: int, hidden: int, experts: int) -> dict[str, Any]:
    return {"batch": batch, "seq": seq, "d_model": d, "hidden": hidden, "experts": experts}


SHAPES: dict[str, dict[str, dict[str, Any]]] = {
    "dense": {"tiny": _model("tiny", TINY_GPT, 64, 2), "nano-125m": _model("nano-125m"), "d20": _model("d20")},
    "collider": {"tiny": _model("tiny", TINY_GPT, 64, 2), "nano-125m": _model("nano-125m"),
                 "1b": _model("nano-125m", ONE_B)},
    "sparse24": {"tiny": _model("tiny", TINY_GPT, 64, 2), "d20": _model("d20"), "d4096": _model("d20", D4096)},
    "hyper": {"tiny": _model("tiny", TINY_GPT, 64, 2), "nano-125m": _model("nano-125m")},
    "bk_step": {"tiny": _model("tiny", TINY_BK, 32, 2), "16k": _model("nano-125m", BK_16K)},
    "bk_layer": {"tiny": _layer(2, 32, 32, 64, 2), "16k": _layer(8, 2048, 2048, 8192, 4),
                 "64k": _layer(32, 2048, 2048, 8192, 4)},
}
DEFAULT = ["dense:nano-125m", "dense:d20", "collider:nano-125m", "collider:1b", "sparse24:d20", "sparse24:d4096",
           "hyper:nano-125m", "bk_step:16k", "bk_layer:16k", "bk_layer:64k"]
# (bench, shape, compile, CUDA graphs): each headline figure in the mode it is quoted in
HEADLINE = [("collider", "1b", True, False), ("sparse24", "d4096", False, False), ("bk_layer", "64k", True, True)]
HEADLINE_DROP = 0.5
HEADLINE_SKIP = 0.5


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--headline", action="store_true",
                   help="only the three headline comparisons, each in its own mode (no --shapes, --compile, "
                        "--cuda-graphs, --drops or --skip)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds the timed samples are split into")
    p.add_argument("--queued", type=int, default=1, help="steps per timed sample, queued back to back (ms per step)")
    p.add_argument("--cuda-graphs", action="store_true",
                   help="CUDA graphs: the BK layer captured, the model steps compiled in reduce-overhead mode")
    p.add_argument("--drops", default=None, help="collider: comma list of drop ratios (default 0.5)")
    p.add_argument("--skip", type=float, default=None, help="bk_step, bk_layer: fraction of positions skipped (default 0.5)")
    p.add_argument("--tokens", choices=("random", "corpus"), default="random",
                   help="the timed batch of the model steps: uniform random ids, or the embedded corpus's first batch")
    p.add_argument("--profile", action="store_true", help="CUDA: after timing, profile 3 steps of each variant "
                   "(top kernels, GPU idle by phase) into its extra")


def file_label(args: argparse.Namespace) -> str:
    if args.headline:
        return "headline"
    label = args.shapes.replace(":", "-").replace(",", ".") if args.shapes else "default"
    return label + ("-compiled" if args.compile else "") + ("-graphs" if args.cuda_graphs else "")


@dataclass
class Case:
    """The variants of one shape, built and ready to call."""

    calls: dict[str, Callable[[], None]]
    baseline: str | None
    tokens_per_call: int
    flops_per_token: dict[str, float] = field(default_factory=dict)
    after: Callable[[str, dict[str, list[bool]]], dict[str, Any]] | None = None  # extra per variant, given the timed calls
    keep: list[Any] = field(default_factory=list)  # models the calls need alive
    extra: dict[str, Any] = field(default_factory=dict)  # for every variant's row


def _step_kwargs(spec: dict[str, Any], compile: bool, graphs: bool, device: torch.device, tokens: str) -> dict:
    return {"preset": spec["preset"], "seq_len": spec["seq"], "batch_size": spec["batch"], "device": device.type,
            "compile": compile or graphs, "compile_mode": "reduce-overhead" if graphs else None, "tokens": tokens}


def _model_case(variants: dict[str, dict], spec: dict, baseline: str | None, share: bool,
                after: Callable[[dict], Callable[[str, dict[str, list[bool]]], dict]] | None = None) -> Case:
    built = build_steps(variants, share=share)
    seq = spec["seq"]
    return Case(calls={n: s for n, (s, _) in built.items()}, baseline=baseline, tokens_per_call=spec["batch"] * seq,
                flops_per_token={n: m.flops_per_token(seq) for n, (_, m) in built.items() if hasattr(m, "flops_per_token")},
                after=after(built) if after else None, keep=[m for _, m in built.values()])


def build_case(bench: str, spec: dict[str, Any], compile: bool, graphs: bool, args: argparse.Namespace,
               device: torch.device) -> Case:
    """The variants of ``bench`` at shape ``spec``."""
    kw = _step_kwargs(spec, compile, graphs, device, args.tokens) if "preset" in spec else {}
    over = spec.get("overrides", {})
    if bench == "dense":
        case = _model_case({"dense": {**kw, "model_overrides": over}}, spec, None, share=False)
        if device.type == "cuda":  # the ceiling to read MFU against
            case.extra["measured_bf16_matmul_tflops"] = round(matmul_tflops(), 1)
        return case
    if bench == "sparse24":
        torch._dynamo.config.cache_size_limit = 64  # two models of one class compile side by side
        return _model_case({"relu2": {**kw, "model_overrides": {**over, "ffn": "relu2"}},
                            "relu2_24": {**kw, "model_overrides": {**over, **SPARSE24_OVERRIDES}}},
                           spec, "relu2", share=True)
    if bench == "hyper":
        return _model_case({name: {**kw, "model_overrides": {**over, "hyper_connections": n}}
                            for name, n in (("none", 0), ("hyper_2", 2), ("hyper_4", 4))}, spec, "none", share=False)
    if bench == "bk_step":
        torch._dynamo.config.cache_size_limit = 64
        skip = args.skip
        sparse = {"bk_sparsity": skip, "bk_sparsity_warmup_steps": 0}
        variants = {name: {**kw, "model_overrides": {**over, **extra}, "prepare": pin_bk_skip_rate(skip)}
                    for name, extra in (("dense", {}), (f"sparse_{skip}", sparse))}

        def stats(built: dict) -> Callable[[str, dict[str, list[bool]]], dict]:
            def after(name: str, timed: dict[str, list[bool]]) -> dict:
                model = built[name][1]
                return {"sparsity_stats": model.sparsity_stats()} if model.sparse_layers() else {}
            return after
        return _model_case(variants, spec, "dense", share=False, after=stats)
    if bench == "collider":
        steps, model = build_collider_steps(spec["preset"], over, spec["seq"], spec["batch"], args.drops, compile, device)

        def phases(name: str, timed: dict[str, list[bool]]) -> dict:
            ph = steps[name].phase_ms(timed[name])
            base = steps["dense"].phase_ms(timed["dense"])
            return {"phase_ms": ph, "backward_vs_dense": ph["backward"] / base["backward"]}
        return Case(calls=dict(steps), baseline="dense", tokens_per_call=spec["batch"] * spec["seq"], after=phases,
                    keep=[model])
    if bench == "bk_layer":
        layers = build_layers(spec["d_model"], spec["hidden"], spec["experts"], args.skip, threshold=not args.headline)
        calls = layer_calls(layers, spec["batch"], spec["seq"], device, compile, graphs)

        def stats(name: str, timed: dict[str, list[bool]]) -> dict:
            layer = layers[name]
            return {"last_call_stats": layer.get_sparsity_stats()} if hasattr(layer, "get_sparsity_stats") else {}
        return Case(calls=calls, baseline="dense", tokens_per_call=spec["batch"] * spec["seq"], after=stats,
                    keep=list(layers.values()))
    raise BenchError(f"no bench {bench!r}")


def _flags(names: list[str], args: argparse.Namespace) -> dict[str, list[bool]]:
    """Per variant, one flag per call in call order: the priming calls, then
    the interleaved schedule's (a timed sample is ``--queued`` calls)."""
    flags = {n: [False] * args.warmup for n in names}
    for name, timed in interleaved_schedule(names, args.rounds, 0, args.repeats):
        flags[name] += [timed] * (args.queued if timed else 1)
    return flags


def run_case(bench: str, shape: str, compile: bool, graphs: bool, args: argparse.Namespace) -> list[Result]:
    """Build, prime, heat and time one shape's variants; their rows (error rows if anything failed)."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    label = f"{bench}:{shape}"
    mode = {"compile": compile, "cuda_graphs": graphs, "queued": args.queued, "rounds": args.rounds,
            "warmup": args.warmup, "heat_seconds": args.heat_seconds}
    spec = SHAPES[bench][shape]
    print(f"steps {label}: {spec}, {'compiled' if compile else 'eager'}{' + CUDA graphs' if graphs else ''}", flush=True)
    fallback_random = torch._inductor.config.fallback_random
    case = None
    try:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        case = build_case(bench, spec, compile, graphs, args, device)
        for call in case.calls.values():  # prime: compiles, autotunes, fills caches
            for _ in range(args.warmup):
                call()
        if device.type == "cuda":
            torch.cuda.synchronize()
        heat = heat_gpu(args.heat_seconds)
        with gpu_clock_monitor() as clocks:
            times = time_interleaved(case.calls, rounds=args.rounds, warmup=0, repeats=args.repeats,
                                     calls_per_sample=args.queued)
        flags = _flags(list(case.calls), args)
        shared = {"mode": mode, "spec": spec, "tokens_per_call": case.tokens_per_call, "gpu_clocks": clocks, "heat": heat,
                  **case.extra}
        if device.type == "cuda":
            shared["peak_memory_gib_all_variants"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        results = []
        for name, t in times.items():
            extra = dict(shared)
            extra["tokens_per_s"] = case.tokens_per_call / (quantile(t, 0.5) * 1e-3)
            if name in case.flops_per_token:
                extra["achieved_tflops"] = case.flops_per_token[name] * extra["tokens_per_s"] / 1e12
                peak = peak_bf16_tflops(torch.cuda.get_device_name(0)) if device.type == "cuda" else None
                if peak:
                    extra["mfu_vs_datasheet"] = extra["achieved_tflops"] / peak
            if case.after is not None:
                extra.update(case.after(name, flags))
            if args.profile:
                extra["profile"] = profile_top_kernels(case.calls[name], steps=3, top=40)
            results.append(Result(name, label, t, baseline=None if name == case.baseline else case.baseline, extra=extra))
        return results
    except BenchError:
        raise
    except Exception as e:  # noqa: BLE001 - out of memory, a compile error: recorded, the other shapes still run
        traceback.print_exc(file=sys.stderr)
        names = list(case.calls) if case is not None else ["(build)"]
        return [Result(n, label, [], extra={"mode": mode, "spec": spec}, error=f"{type(e).__name__}: {e}"[:500])
                for n in names]
    finally:
        case = None
        gc.collect()
        torch._dynamo.reset()
        torch._inductor.config.fallback_random = fallback_random
        if device.type == "cuda":
            torch.cuda.empty_cache()


def _check(args: argparse.Namespace) -> list[tuple[str, str, bool, bool]]:
    """The cases to run, with every unsupported combination refused."""
    if args.shapes == "list":
        print(describe_shapes(SHAPES, DEFAULT))
        raise SystemExit(0)
    for name in ("rounds", "queued"):
        if getattr(args, name) < 1:
            raise BenchError(f"--{name} must be >= 1, got {getattr(args, name)}")
    cuda = torch.cuda.is_available()
    if args.headline:
        given = [f for f, v in (("--shapes", args.shapes), ("--compile", args.compile), ("--cuda-graphs", args.cuda_graphs),
                                ("--drops", args.drops), ("--skip", args.skip)) if v]
        if given:
            raise BenchError(f"--headline fixes the shapes and modes; drop {', '.join(given)}")
        args.drops, args.skip = [HEADLINE_DROP], HEADLINE_SKIP
        cases = HEADLINE
    else:
        try:
            args.drops = [float(d) for d in (args.drops or "0.5").split(",")]
        except ValueError:
            raise BenchError(f"--drops {args.drops!r}: a comma list of numbers") from None
        args.skip = 0.5 if args.skip is None else args.skip
        cases = [(b, s, args.compile, args.cuda_graphs) for b, s in parse_cases(args.shapes, SHAPES, DEFAULT)]
    if any(not 0 < d < 1 for d in args.drops) or not 0 < args.skip < 1:
        raise BenchError(f"--drops and --skip must lie strictly between 0 and 1, got {args.drops} and {args.skip}")
    if (args.cuda_graphs or args.profile) and not cuda:
        raise BenchError(f"{'--cuda-graphs' if args.cuda_graphs else '--profile'} needs a CUDA device")
    for bench, shape, _, graphs in cases:
        if bench == "collider" and graphs:
            raise BenchError("collider: --cuda-graphs is not supported (the Collider backward is not captured)")
        if bench in ("collider", "bk_layer") and args.tokens != "random":
            raise BenchError(f"{bench}: --tokens {args.tokens} applies to the model steps only")
        if not cuda and SHAPES[bench][shape].get("seq", 0) * SHAPES[bench][shape].get("batch", 0) > 4096:
            print(f"steps {bench}:{shape}: a GPU shape on the CPU; this will be slow", flush=True)
    return cases


def run(args: argparse.Namespace) -> list[Result]:
    cases = _check(args)
    results: list[Result] = []
    for bench, shape, compile, graphs in cases:
        results += run_case(bench, shape, compile, graphs, args)
        args.save_partial(results)
    return results
