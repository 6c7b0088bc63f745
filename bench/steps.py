"""``python -m bench steps``: whole training steps, each variant against its baseline, at named shapes.

Benches (``--shapes list`` prints their shapes):

* ``dense``: the plain GPT step (forward, backward, AdamW), with tokens/s and MFU;
* ``collider``: dense against Collider at each ``--drops`` ratio, one shared
  copy of the weights, each step split into forward / select / loss /
  backward / optimizer phases;
* ``sparse24``: dense ``relu2`` against the 2:4 ``relu2_24`` FFN (transposable,
  sparse from the first step), one shared copy of the weights;
* ``hyper``: no hyper-connections against 2 and 4 streams, stored in float32 and in
  bfloat16 (``hyper_<n>_bf16``) (compiled: the mixing by the Triton kernels as custom
  ops, the default, and by inductor, ``hyper_<n>_inductor``);
* ``bk_step``: the ResNet-BK step, dense against learned-sparse at ``--skip``;
* ``bk_layer``: one ResNet-BK layer's forward+backward (:mod:`bench.bk_layer`);
* ``optimizers``: one step with each optimizer (:mod:`bench.optimizer_steps`):
  peak memory and optimizer state bytes, each variant built and measured alone.

A model step is the trainer's (:mod:`bench.train_steps`: the objective the
config names, its backward, the optimizer). Every variant of a shape is built
at once, called ``--warmup`` times (its first call compiles it; the start-up
time, the graphs compiled and the peak memory of this priming are recorded
apart from the timed steps), the GPU heated (``--heat-seconds``), and then all
are timed in ``--rounds`` interleaved rounds (:func:`bench.timing.time_interleaved`)
under a clock monitor; a sample is one step, or ``--queued`` steps queued back
to back. ``--headline`` runs the three headline comparisons, each in its own
mode: the ~1B Collider step compiled at drop 0.5, the 2:4 step at d 4096
eager, and the BK layer at skip 0.5 and 64k tokens compiled and captured
(``--shapes`` may pick some of them). Before anything runs the suite prints
its plan: what is built, compiled, primed and timed.
"""

from __future__ import annotations

import argparse
import functools
import gc
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from sparsetrain.benchmark import peak_bf16_tflops
from sparsetrain.config import OPTIMIZERS

from .bk_layer import build_layers, layer_calls, layer_names
from .optimizer_steps import run_optimizers
from .options import BenchError, describe_shapes, parse_cases
from .profiling import profile_top_kernels
from .results import Result, quantile
from .timing import capture_step, gib, matmul_tflops, prime_heat_time, sync
from .train_steps import SPARSE24_OVERRIDES, BuiltStep, build_steps, collider_overrides, pin_bk_skip_rate

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
    "hyper": {"tiny": _model("tiny", TINY_GPT, 64, 2), "nano-125m": _model("nano-125m"), "d20": _model("d20")},
    "bk_step": {"tiny": _model("tiny", TINY_BK, 32, 2), "16k": _model("nano-125m", BK_16K)},
    "bk_layer": {"tiny": _layer(2, 32, 32, 64, 2), "16k": _layer(8, 2048, 2048, 8192, 4),
                 "64k": _layer(32, 2048, 2048, 8192, 4)},
    "optimizers": {"tiny": _model("tiny", TINY_GPT, 64, 2), "d20": _model("d20")},
}
DEFAULT = ["dense:nano-125m", "dense:d20", "collider:nano-125m", "collider:1b", "sparse24:d20", "sparse24:d4096",
           "hyper:nano-125m", "bk_step:16k", "bk_layer:16k", "bk_layer:64k", "optimizers:d20"]
# (bench, shape, compile, CUDA graphs): each headline figure in the mode it is quoted in
HEADLINE = [("collider", "1b", True, False), ("sparse24", "d4096", False, False), ("bk_layer", "64k", True, True)]
HEADLINE_DROP = 0.5
HEADLINE_SKIP = 0.5
ISOLATED = ("optimizers",)  # benches whose variants are built and measured one at a time


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--headline", action="store_true",
                   help="only the three headline comparisons, each in its own mode (--shapes may pick some of them; "
                        "no --compile, --cuda-graphs, --drops or --skip)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds the timed samples are split into")
    p.add_argument("--queued", type=int, default=1, help="steps per timed sample, queued back to back (ms per step)")
    p.add_argument("--cuda-graphs", action="store_true",
                   help="CUDA graphs: the BK layer captured, the model steps compiled in reduce-overhead mode")
    p.add_argument("--capture", action="store_true",
                   help="CUDA: each model step (forward, backward, optimizer) captured whole in one CUDA graph after "
                        "its warm-up, and replayed when timed: dense and Collider alike (no phase breakdown)")
    p.add_argument("--drops", default=None, help="collider: comma list of drop ratios (default 0.5)")
    p.add_argument("--skip", type=float, default=None, help="bk_step, bk_layer: fraction of positions skipped (default 0.5)")
    p.add_argument("--tokens", choices=("random", "corpus"), default="random",
                   help="the timed batch of the model steps: uniform random ids, or the embedded corpus's first batch")
    p.add_argument("--profile", action="store_true", help="CUDA: after timing, profile 3 steps of each variant "
                   "(top kernels, GPU idle by phase) into its extra")


def file_label(args: argparse.Namespace) -> str:
    label = args.shapes.replace(":", "-").replace(",", ".") if args.shapes else ""
    if args.headline:
        return "headline" + (f"-{label}" if label else "")
    return ((label or "default") + ("-compiled" if args.compile else "") + ("-graphs" if args.cuda_graphs else "")
            + ("-captured" if getattr(args, "capture", False) else ""))


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


def model_variants(bench: str, args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """The model-step variants of ``bench``: name -> config overrides (and a
    ``prepare``), on top of the shape's; the first is the baseline."""
    if bench == "dense":
        return {"dense": {}}
    if bench == "collider":
        return {"dense": {}, **{f"collider_{drop}": collider_overrides(drop) for drop in args.drops}}
    if bench == "sparse24":
        return {"relu2": {"ffn": "relu2"}, "relu2_24": dict(SPARSE24_OVERRIDES)}
    if bench == "hyper":
        out: dict[str, dict[str, Any]] = {"none": {"hyper_connections": 0}}
        for n in (2, 4):
            out[f"hyper_{n}"] = {"hyper_connections": n}
            out[f"hyper_{n}_bf16"] = {"hyper_connections": n, "hyper_stream_dtype": "bfloat16"}  # half the traffic
            if args.compile or args.cuda_graphs:  # compiled, the kernels as custom ops (default) or inductor's fusion
                out[f"hyper_{n}_inductor"] = {"hyper_connections": n, "fused_hyper_mixing_compiled": False}
        return out
    if bench == "bk_step":
        sparse = {"bk_sparsity": args.skip, "bk_sparsity_warmup_steps": 0}
        return {name: {**extra, "prepare": pin_bk_skip_rate(args.skip)}
                for name, extra in (("dense", {}), (f"sparse_{args.skip}", sparse))}
    if bench == "optimizers":
        return {kind: {"optimizer": kind} for kind in OPTIMIZERS}
    raise BenchError(f"no model bench {bench!r}")


def variant_names(bench: str, args: argparse.Namespace) -> list[str]:
    """The variants ``bench`` builds, in order (the first is the baseline)."""
    if bench == "bk_layer":
        return layer_names(args.skip, threshold=not args.headline)
    return list(model_variants(bench, args))


def _step_kwargs(spec: dict[str, Any], compile: bool, graphs: bool, device: torch.device, tokens: str) -> dict:
    return {"preset": spec["preset"], "seq_len": spec["seq"], "batch_size": spec["batch"], "device": device.type,
            "compile": compile or graphs, "compile_mode": "reduce-overhead" if graphs else None, "tokens": tokens}


def step_variants(bench: str, spec: dict[str, Any], compile: bool, graphs: bool, args: argparse.Namespace,
                  device: torch.device) -> dict[str, dict[str, Any]]:
    """The :func:`sparsetrain.bench_step.make_train_step` arguments of each of ``bench``'s variants at ``spec``."""
    kw = _step_kwargs(spec, compile, graphs, device, args.tokens)
    out = {}
    for name, over in model_variants(bench, args).items():
        over = dict(over)
        prepare = over.pop("prepare", None)
        out[name] = {**kw, "model_overrides": {**spec["overrides"], **over}, **({"prepare": prepare} if prepare else {})}
    return out


def _model_case(bench: str, spec: dict, compile: bool, graphs: bool, args: argparse.Namespace, device: torch.device,
                share: bool, after: Callable[[dict[str, BuiltStep], str], dict] | None = None) -> Case:
    """A case of model steps: their phases in each row, and ``after(built, name)``'s extra."""
    capture = getattr(args, "capture", False)
    built = build_steps(step_variants(bench, spec, compile, graphs, args, device), share=share, marks=not capture)
    names = list(built)
    seq = spec["seq"]
    calls: dict[str, Callable[[], Any]] = {n: b.step for n, b in built.items()}
    if capture:  # after each one's warm-up, so that what it compiles is compiled outside the graph
        calls = {n: capture_step(b.step, [b.step.optimizer], functools.partial(_selector_generators, b.step.objective))
                 for n, b in built.items()}

    def extra(name: str, timed: dict[str, list[bool]]) -> dict[str, Any]:
        out: dict[str, Any] = {} if capture else {"phase_ms": built[name].clock.phase_ms(timed[name])}
        return {**out, **(after(built, name) if after else {})}
    return Case(calls=calls, baseline=names[0], tokens_per_call=spec["batch"] * seq,
                flops_per_token={n: b.model.flops_per_token(seq) for n, b in built.items()
                                 if hasattr(b.model, "flops_per_token")},
                after=extra, keep=[b.model for b in built.values()])


def _selector_generators(objective: Any) -> list[torch.Generator]:
    """The CUDA generators of the objective's token selector (none for top-k)."""
    selector = getattr(objective, "selector", None)
    return [g for g in (selector.generators() if selector is not None else []) if g.device.type == "cuda"]


def build_case(bench: str, spec: dict[str, Any], compile: bool, graphs: bool, args: argparse.Namespace,
               device: torch.device) -> Case:
    """The variants of ``bench`` at shape ``spec``."""
    if bench == "dense":
        case = _model_case(bench, spec, compile, graphs, args, device, share=False)
        if device.type == "cuda":  # the ceiling to read MFU against
            case.extra["measured_bf16_matmul_tflops"] = round(matmul_tflops(), 1)
        return case
    if bench in ("sparse24", "bk_step"):
        torch._dynamo.config.cache_size_limit = 64  # two models of one class compile side by side
    if bench in ("collider", "sparse24", "hyper"):  # Collider and 2:4 train the same weights as their baseline
        return _model_case(bench, spec, compile, graphs, args, device, share=bench != "hyper")
    if bench == "bk_step":
        def stats(built: dict[str, BuiltStep], name: str) -> dict:
            model = built[name].model
            return {"sparsity_stats": model.sparsity_stats()} if model.sparse_layers() else {}
        return _model_case(bench, spec, compile, graphs, args, device, share=False, after=stats)
    if bench == "bk_layer":
        layers = build_layers(spec["d_model"], spec["hidden"], spec["experts"], args.skip, threshold=not args.headline)
        calls = layer_calls(layers, spec["batch"], spec["seq"], device, compile, graphs)

        def layer_stats(name: str, timed: dict[str, list[bool]]) -> dict:
            layer = layers[name]
            return {"last_call_stats": layer.get_sparsity_stats()} if hasattr(layer, "get_sparsity_stats") else {}
        return Case(calls=calls, baseline="dense", tokens_per_call=spec["batch"] * spec["seq"], after=layer_stats,
                    keep=list(layers.values()))
    raise BenchError(f"no bench {bench!r}")


def run_case(bench: str, shape: str, compile: bool, graphs: bool, args: argparse.Namespace) -> list[Result]:
    """Build, prime, heat and time one shape's variants; their rows (error rows if anything failed)."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    label = f"{bench}:{shape}"
    mode = {"compile": compile, "cuda_graphs": graphs, "capture": args.capture, "queued": args.queued, "rounds": args.rounds,
            "warmup": args.warmup, "heat_seconds": args.heat_seconds}
    spec = SHAPES[bench][shape]
    print(f"steps {label}: {spec}, {_mode_text(compile, graphs)}", flush=True)
    if bench in ISOLATED:
        return run_optimizers(label, step_variants(bench, spec, compile, graphs, args, device), args, device, mode)
    fallback_random = torch._inductor.config.fallback_random
    case = None
    try:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        case = build_case(bench, spec, compile, graphs, args, device)
        sync(device)
        build_s = time.perf_counter() - t0
        build_peak = gib(torch.cuda.max_memory_allocated()) if device.type == "cuda" else None
        m = prime_heat_time(case.calls, device, args.warmup, args.heat_seconds, args.rounds, args.repeats,
                            args.queued)  # priming compiles, autotunes, fills caches
        if m.graphs_compiled_while_timed:
            print(f"steps {label}: {m.graphs_compiled_while_timed} graph(s) compiled while timed: the priming did not "
                  "compile everything", flush=True)
        startup, times, flags = m.startup, m.times, m.flags
        shared = {"mode": mode, "spec": spec, "tokens_per_call": case.tokens_per_call, "gpu_clocks": m.clocks,
                  "heat": m.heat, "wall_s": {"build": build_s, **m.wall_s},
                  "graphs_compiled_while_timed": m.graphs_compiled_while_timed, **case.extra}
        if device.type == "cuda":  # the most the shape needed at once: building, priming or timed
            shared["peak_memory_gib_all_variants"] = max(
                [build_peak, m.timed_peak_memory_gib] + [s["peak_memory_gib"] for s in startup.values()])
        results = []
        for name, t in times.items():
            extra = dict(shared, startup=startup[name])
            extra["tokens_per_s"] = case.tokens_per_call / (quantile(t, 0.5) * 1e-3)
            if name in case.flops_per_token:
                extra["achieved_tflops"] = case.flops_per_token[name] * extra["tokens_per_s"] / 1e12
                peak = peak_bf16_tflops(torch.cuda.get_device_name(0)) if device.type == "cuda" else None
                if peak:
                    extra["mfu_vs_datasheet"] = extra["achieved_tflops"] / peak
            if case.after is not None:
                extra.update(case.after(name, flags))
            results.append(Result(name, label, t, baseline=None if name == case.baseline else case.baseline, extra=extra))
        base = next((r for r in results if r.variant == case.baseline), None)
        for r in results:  # the backward against the baseline's (Collider's point)
            if base is not None and r is not base and "backward" in r.extra.get("phase_ms", {}):
                r.extra["backward_vs_baseline"] = r.extra["phase_ms"]["backward"] / base.extra["phase_ms"]["backward"]
        if args.profile:
            for r in results:
                r.extra["profile"] = profile_top_kernels(case.calls[r.variant], steps=3, top=40)
        return results
    except BenchError:
        raise
    except Exception as e:  # noqa: BLE001 - out of memory, a compile error: recorded, the other shapes still run
        traceback.print_exc(file=sys.stderr)
        names = list(case.calls) if case is not None else variant_names(bench, args)
        return [Result(n, label, [], extra={"mode": mode, "spec": spec}, error=f"{type(e).__name__}: {e}"[:500])
                for n in names]
    finally:
        case = None
        gc.collect()
        torch._dynamo.reset()
        torch._inductor.config.fallback_random = fallback_random
        if device.type == "cuda":
            torch.cuda.empty_cache()


def _mode_text(compile: bool, graphs: bool) -> str:
    return ("compiled" if compile or graphs else "eager") + (" + CUDA graphs" if graphs else "")


def plan(cases: list[tuple[str, str, bool, bool]], args: argparse.Namespace) -> str:
    """What the run will do, before it does it: per shape its variants and mode,
    and the calls each variant gets (priming, which compiles it once, then the
    timed and untimed calls of the interleaved rounds), and the totals."""
    rounds = max(1, min(args.rounds, args.repeats))
    timed_calls, switches = args.repeats * args.queued, rounds
    lines = [f"steps plan: {len(cases)} shape(s). Each variant is built, then primed with {args.warmup} untimed "
             f"call(s) (the first compiles it where compiled; start-up is recorded apart from the timed steps), "
             f"the GPU heated {args.heat_seconds:g} s, then each variant gets {args.repeats} timed sample(s) of "
             f"{args.queued} call(s) in {rounds} interleaved round(s), {switches} untimed switch call(s) between them"
             + ("; optimizers: each variant built, primed, measured (one more step), heated and timed alone"
                if any(b in ISOLATED for b, _, _, _ in cases) else "")]
    totals = {"variants": 0, "compiled": 0, "calls": 0, "heat_s": 0.0}
    width = max(len(f"{b}:{s}") for b, s, _, _ in cases)
    for bench, shape, compile, graphs in cases:
        names = variant_names(bench, args)
        isolated = bench in ISOLATED
        per_variant = args.warmup + timed_calls + switches + (1 if isolated else 0)
        heats = len(names) if isolated else 1
        lines.append(f"  {bench + ':' + shape:<{width}}  {_mode_text(compile, graphs):<22} {len(names)} variant(s): "
                     f"{', '.join(names)}; {per_variant} call(s) each; heat {heats} x {args.heat_seconds:g} s")
        totals["variants"] += len(names)
        totals["compiled"] += len(names) if compile or graphs else 0
        totals["calls"] += len(names) * per_variant
        totals["heat_s"] += heats * args.heat_seconds
    lines.append(f"  total: {totals['variants']} variant(s), {totals['compiled']} compiled once each, "
                 f"{totals['calls']} step call(s), {totals['heat_s']:g} s of heating")
    return "\n".join(lines)


def _check(args: argparse.Namespace) -> list[tuple[str, str, bool, bool]]:
    """The cases to run, with every unsupported combination refused."""
    if args.shapes == "list":
        print(describe_shapes(SHAPES, DEFAULT))
        raise SystemExit(0)
    for name in ("rounds", "queued"):
        if getattr(args, name) < 1:
            raise BenchError(f"--{name} must be >= 1, got {getattr(args, name)}")
    cuda = torch.cuda.is_available()
    args.capture = getattr(args, "capture", False)  # a Namespace made by hand (tests) may lack it
    if args.headline:
        given = [f for f, v in (("--compile", args.compile), ("--cuda-graphs", args.cuda_graphs),
                                ("--drops", args.drops), ("--skip", args.skip)) if v]
        if given:
            raise BenchError(f"--headline fixes the shapes and modes; drop {', '.join(given)}")
        args.drops, args.skip = [HEADLINE_DROP], HEADLINE_SKIP
        cases = HEADLINE
        if args.shapes:
            headline_shapes = {b: {s: SHAPES[b][s]} for b, s, _, _ in HEADLINE}
            picked = parse_cases(args.shapes, headline_shapes, [f"{b}:{s}" for b, s, _, _ in HEADLINE])
            cases = [c for c in HEADLINE if (c[0], c[1]) in picked]
    else:
        try:
            args.drops = [float(d) for d in (args.drops or "0.5").split(",")]
        except ValueError:
            raise BenchError(f"--drops {args.drops!r}: a comma list of numbers") from None
        args.skip = 0.5 if args.skip is None else args.skip
        cases = [(b, s, args.compile, args.cuda_graphs) for b, s in parse_cases(args.shapes, SHAPES, DEFAULT)]
    if any(not 0 < d < 1 for d in args.drops) or not 0 < args.skip < 1:
        raise BenchError(f"--drops and --skip must lie strictly between 0 and 1, got {args.drops} and {args.skip}")
    if (args.cuda_graphs or args.profile or args.capture) and not cuda:
        flag = "--cuda-graphs" if args.cuda_graphs else "--capture" if args.capture else "--profile"
        raise BenchError(f"{flag} needs a CUDA device")
    if args.capture and (args.cuda_graphs or args.headline or args.profile):
        raise BenchError("--capture captures the whole step itself: drop --cuda-graphs, --headline and --profile")
    for bench, shape, _, graphs in cases:
        if bench == "collider" and graphs:
            raise BenchError("collider: --cuda-graphs is not supported (the Collider backward is not captured)")
        if args.capture and bench not in ("dense", "collider", "hyper", "sparse24"):
            raise BenchError(f"{bench}: --capture applies to the model steps (dense, collider, hyper, sparse24)")
        if bench in ISOLATED and args.profile:
            raise BenchError(f"{bench}: --profile applies to the interleaved benches only")
        if bench == "bk_layer" and args.tokens != "random":
            raise BenchError(f"{bench}: --tokens {args.tokens} applies to the model steps only")
        if not cuda and SHAPES[bench][shape].get("seq", 0) * SHAPES[bench][shape].get("batch", 0) > 4096:
            print(f"steps {bench}:{shape}: a GPU shape on the CPU; this will be slow", flush=True)
    return cases


def run(args: argparse.Namespace) -> list[Result]:
    cases = _check(args)
    print(plan(cases, args), flush=True)
    results: list[Result] = []
    t0 = time.perf_counter()
    for bench, shape, compile, graphs in cases:
        results += run_case(bench, shape, compile, graphs, args)
        args.save_partial(results)
    print(f"steps: {len(cases)} shape(s) in {time.perf_counter() - t0:.0f} s", flush=True)
    return results
