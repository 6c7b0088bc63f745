"""Timing helpers and the dense training-step benchmark.

Every speed number sparsetrain reports comes from :func:`time_fn` (median of
repeats after warm-up, CUDA events on the GPU) and is stored with
:func:`environment` so a reader knows what produced it.
"""

from __future__ import annotations

import platform
import statistics
import time
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any

import torch

from .config import ModelConfig, build_config
from .model import build_model
from .optim import make_optimizer
from .sparse24.ffn import prepare_permutations

# Dense bf16 tensor-core peak from NVIDIA's datasheets (SXM parts), used for MFU.
DATASHEET_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}


def environment() -> dict[str, Any]:
    """Device, library versions and date, stored with every result."""
    env: dict[str, Any] = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cuda_available": torch.cuda.is_available(),
    }
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        env.update(
            device=torch.cuda.get_device_name(0),
            cuda=torch.version.cuda,
            sm=f"{p.major}.{p.minor}",
            multiprocessors=p.multi_processor_count,
            gpu_memory_gib=round(p.total_memory / 2**30, 1),
            cusparselt=_cusparselt_version(),
        )
    else:
        env["device"] = f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    return env


def _cusparselt_version() -> int | None:
    try:
        if torch.backends.cusparselt.is_available():
            return int(torch.backends.cusparselt.version())
    except (AttributeError, RuntimeError):
        pass
    return None


def peak_bf16_tflops(device_name: str) -> float | None:
    for key, value in DATASHEET_BF16_TFLOPS.items():
        if key in device_name:
            return value
    return None


def time_fn(fn: Callable[[], Any], warmup: int = 3, repeats: int = 10) -> list[float]:
    """Wall-clock milliseconds of ``fn()`` for each of ``repeats`` calls after
    ``warmup`` untimed calls. On CUDA each call is bracketed by events."""
    cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return times


def time_interleaved(fns: dict[str, Callable[[], Any]], rounds: int = 3, warmup: int = 3,
                     repeats: int = 21) -> dict[str, list[float]]:
    """Milliseconds per call of each ``fns`` entry (:func:`time_fn`), timed in
    ``rounds`` interleaved rounds of ``repeats // rounds`` calls (one untimed
    call first in each), after ``warmup`` untimed calls of each. Clocks and the
    host drift over a run: timed one after another, two identical compiled
    layers once differed by 8% (bench/results/bk_relu_rows_sequential_bf16_h200.json);
    interleaved, every variant sees the same drift."""
    for fn in fns.values():
        time_fn(fn, warmup=warmup, repeats=0)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            times[name] += time_fn(fn, warmup=1, repeats=max(1, repeats // rounds))
    return times


def cuda_ms_per_call(fn: Callable[[], Any], calls: int = 5) -> float:
    """GPU milliseconds per call of ``fn()``: one untimed call, then ``calls``
    queued back to back between two CUDA events, so the host's launch time
    does not count where the GPU stays busy (kernel timing and tuning)."""
    fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(calls):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / calls


def profile_top_kernels(fn: Callable[[], Any], steps: int = 3, top: int = 25) -> dict[str, Any]:
    """Profile ``steps`` calls of ``fn()`` (already warmed up): GPU-busy and host
    milliseconds per call, and the ``top`` entries by self GPU time and by self
    host time as ``(name, ms per call, calls per call)``."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            fn()
        torch.cuda.synchronize()
    events = prof.key_averages()
    dev = lambda e: getattr(e, "self_device_time_total", getattr(e, "self_cuda_time_total", 0))  # noqa: E731
    per = 1e3 * steps
    return {"gpu_busy_ms_per_step": round(sum(dev(e) for e in events) / per, 3),
            "cpu_ms_per_step": round(sum(e.self_cpu_time_total for e in events) / per, 3),
            "top_self_cpu": [(e.key[:50], round(e.self_cpu_time_total / per, 3), e.count // steps)
                             for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[:top]],
            "top_self_gpu": [(e.key[:50], round(dev(e) / per, 3), e.count // steps)
                             for e in sorted(events, key=lambda e: -dev(e))[:top]]}


def parse_step_entries(spec: str) -> list[tuple[str, str, dict[str, Any]]]:
    """``"d20;d20:d_model=4096,n_head=32"`` -> ``[(entry, preset, model overrides), ...]``:
    the ``--steps`` argument of the step benchmarks (integers parsed as ints)."""
    out = []
    for entry in filter(None, spec.split(";")):
        preset, _, extra = entry.partition(":")
        pairs = (kv.split("=", 1) for kv in filter(None, extra.split(",")))
        out.append((entry, preset, {k: int(v) if v.isdigit() else v for k, v in pairs}))
    return out


def summarize(times_ms: list[float]) -> dict[str, float]:
    return {
        "median_ms": statistics.median(times_ms),
        "min_ms": min(times_ms),
        "max_ms": max(times_ms),
        "repeats": len(times_ms),
    }


def matmul_tflops(n: int = 8192, dtype: torch.dtype = torch.bfloat16) -> float:
    """Measured dense GEMM ceiling on random data (the honest MFU denominator)."""
    a = torch.randn(n, n, device="cuda", dtype=dtype)
    b = torch.randn(n, n, device="cuda", dtype=dtype)
    ms = statistics.median(time_fn(lambda: a @ b, warmup=5, repeats=20))
    return 2 * n**3 / (ms * 1e-3) / 1e12


def make_train_step(
    preset: str = "nano-125m",
    seq_len: int = 2048,
    batch_size: int = 8,
    compile: bool = False,
    device: str | None = None,
    model_overrides: dict[str, Any] | None = None,
    compile_mode: str | None = None,
    prepare: Callable[[torch.nn.Module], None] | None = None,
) -> tuple[Callable[[], None], torch.nn.Module]:
    """``(step, model)``: one training step (forward, backward, AdamW) on fixed
    random tokens of the model the preset and ``model_overrides`` build, as
    :func:`bench_train_step` times it (arguments as there)."""
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cfg = build_config(preset=preset, overrides={"seq_len": seq_len, **(model_overrides or {})})
    mcfg: ModelConfig = cfg.model
    torch.manual_seed(0)
    model = build_model(mcfg).to(dev)
    model.train()
    if prepare is not None:
        prepare(model)
    prepare_permutations(model, batch_size * seq_len)  # 2:4 FFNs: before compiling, as the trainer does
    opt = make_optimizer(model, 1e-4, 0.1, (0.9, 0.95), dev.type)
    compile = compile or compile_mode is not None
    step_model = torch.compile(model, mode=compile_mode) if compile else model
    aux_loss = getattr(model, "aux_loss", None)
    x = torch.randint(0, mcfg.vocab_size, (batch_size, seq_len), device=dev)
    y = torch.randint(0, mcfg.vocab_size, (batch_size, seq_len), device=dev)
    amp = torch.autocast(device_type="cuda", dtype=torch.bfloat16) if dev.type == "cuda" else None

    def step() -> None:
        if amp is not None:
            with amp:
                _, loss = step_model(x, y)
        else:
            _, loss = step_model(x, y)
        aux = aux_loss() if aux_loss is not None else None
        (loss if aux is None else loss + aux).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step, model


def bench_train_steps_interleaved(variants: dict[str, dict[str, Any]], rounds: int = 3, warmup: int = 5,
                                  repeats: int = 20) -> dict[str, dict[str, float]]:
    """Step-time summaries of several models timed in interleaved rounds
    (:func:`time_interleaved`; ``repeats`` steps each in all). ``variants``:
    name -> :func:`make_train_step` keyword arguments. All models live at once."""
    steps = {name: make_train_step(**kw)[0] for name, kw in variants.items()}
    times = time_interleaved(steps, rounds=rounds, warmup=warmup, repeats=repeats)
    return {name: summarize(t) for name, t in times.items()}


def bench_train_step(
    preset: str = "nano-125m",
    seq_len: int = 2048,
    batch_size: int = 8,
    compile: bool = False,
    warmup: int = 5,
    repeats: int = 20,
    device: str | None = None,
    model_overrides: dict[str, Any] | None = None,
    profile_top: int = 0,
    compile_mode: str | None = None,
    prepare: Callable[[torch.nn.Module], None] | None = None,
) -> dict[str, Any]:
    """Time full training steps (forward, backward, AdamW) on random tokens, of
    the model the preset and ``model_overrides`` build (a GPT, or ResNet-BK with
    ``arch="resnet_bk"``, whose sparsity loss joins the backward as in training).

    Returns tokens/s, the step-time summary, FLOPs per token and, on a GPU
    with a known datasheet peak, MFU; with ``profile_top``, also that many top
    kernels of three profiled steps (:func:`profile_top_kernels`).
    ``compile_mode``: torch.compile's mode (``compile`` implied), e.g.
    ``"reduce-overhead"`` for CUDA graphs. ``prepare(model)`` runs once after
    the model is built (e.g. to pin a learned mask's rate for timing).
    """
    step, model = make_train_step(preset, seq_len, batch_size, compile, device, model_overrides, compile_mode, prepare)
    dev = next(model.parameters()).device
    compile = compile or compile_mode is not None
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    times = time_fn(step, warmup=warmup, repeats=repeats)
    s = summarize(times)
    tokens = batch_size * seq_len
    flops_tok = model.flops_per_token(seq_len)
    out: dict[str, Any] = {
        "preset": preset,
        "params": model.num_params(),
        "seq_len": seq_len,
        "batch_size": batch_size,
        "tokens_per_step": tokens,
        "compile": compile,
        "compile_mode": compile_mode,
        "dtype": "bf16 autocast" if dev.type == "cuda" else "float32",
        "step": s,
        "tokens_per_s": tokens / (s["median_ms"] * 1e-3),
        "flops_per_token": flops_tok,
        "achieved_tflops": flops_tok * tokens / (s["median_ms"] * 1e-3) / 1e12,
    }
    if dev.type == "cuda":
        out["peak_memory_gib"] = round(torch.cuda.max_memory_allocated(dev) / 2**30, 2)
        peak = peak_bf16_tflops(torch.cuda.get_device_name(dev))
        if peak:
            out["mfu_vs_datasheet"] = out["achieved_tflops"] / peak
        if profile_top:
            out["profile"] = profile_top_kernels(step, steps=3, top=profile_top)
    if hasattr(model, "sparsity_stats"):  # ResNet-BK: what the learned mask skipped in the last step
        out["sparsity_stats"] = model.sparsity_stats()
    return out
