"""Step timing for ``sparsetrain bench step``, and the run environment.

Every speed number sparsetrain reports comes from :func:`time_fn` (median of
repeats after warm-up, CUDA events on the GPU) and is stored with
:func:`environment` so a reader knows what produced it. The benchmark suites
under ``bench/`` build on these; their own helpers (interleaved rounds, GPU
heating and clock readings, profiles) live there.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any

import torch
from torch.profiler import record_function

from .config import ModelConfig, build_config
from .data import load_corpus, train_batch
from .build import build_model
from .optim import step_counted
from .optimizers import make_adamw
from .sparse24.ffn import prepare_ffns

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


def time_fn(fn: Callable[[], Any], warmup: int = 3, repeats: int = 10, calls_per_sample: int = 1) -> list[float]:
    """Wall-clock milliseconds of ``fn()`` for each of ``repeats`` samples after
    ``warmup`` untimed calls. On CUDA each sample is bracketed by events and
    synchronized. ``calls_per_sample > 1``: a sample is that many calls queued
    back to back (ms per call), so the host's launch time only counts where the
    GPU runs dry, as in a training loop that syncs once per log window."""
    cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(calls_per_sample):
                fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / calls_per_sample)
        else:
            t0 = time.perf_counter()
            for _ in range(calls_per_sample):
                fn()
            times.append((time.perf_counter() - t0) * 1e3 / calls_per_sample)
    return times


def cuda_ms_per_call(fn: Callable[[], Any], calls: int = 5, warmup: int = 1, sleep_cycles: int = 0) -> float:
    """GPU milliseconds per call of ``fn()``: ``warmup`` untimed calls, then
    ``calls`` queued back to back between two CUDA events, so the host's launch
    time does not count where the GPU stays busy (kernel timing and tuning).
    ``sleep_cycles``: first queue a ``torch.cuda._sleep`` of that many cycles,
    untimed, so the host launches the timed calls far ahead of the GPU."""
    for _ in range(warmup):
        fn()
    if sleep_cycles:
        torch.cuda._sleep(sleep_cycles)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(calls):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / calls


def summarize(times_ms: list[float]) -> dict[str, float]:
    """Median, min, max and count of a list of step times."""
    return {
        "median_ms": statistics.median(times_ms),
        "min_ms": min(times_ms),
        "max_ms": max(times_ms),
        "repeats": len(times_ms),
    }


def default_optimizer(model: torch.nn.Module) -> torch.optim.Optimizer:
    """AdamW as the trainer builds it (fused on CUDA), at the step benches' settings."""
    device = next(model.parameters()).device
    return make_adamw(model, 1e-4, 0.1, (0.9, 0.95), device.type)


def make_train_step(
    preset: str = "nano-125m",
    seq_len: int = 2048,
    batch_size: int = 8,
    compile: bool = False,
    device: str | None = None,
    model_overrides: dict[str, Any] | None = None,
    compile_mode: str | None = None,
    prepare: Callable[[torch.nn.Module], None] | None = None,
    tokens: str = "random",
    data: str = "",
    optimizer: Callable[[torch.nn.Module], torch.optim.Optimizer] = default_optimizer,
) -> tuple[Callable[[], None], torch.nn.Module]:
    """``(step, model)``: one training step (forward, backward, optimizer) on one
    fixed batch of the model the preset and ``model_overrides`` build, as
    :func:`bench_train_step` times it (arguments as there). ``tokens``:
    ``"random"`` (uniform token ids) or ``"corpus"`` (the trainer's first batch
    of ``data``, the embedded corpus when empty; tokenized into
    ``$SPARSETRAIN_CACHE``): GPU power, and so the clock under the power limit,
    depends on the data. ``optimizer(model)`` gives the optimizer the step
    calls, once the model is built and ``prepare`` ran (models whose
    ``prepare`` gave them another model's parameters can share its optimizer,
    and so its state's memory)."""
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cfg = build_config(preset=preset, overrides={"seq_len": seq_len, **(model_overrides or {})})
    mcfg: ModelConfig = cfg.model
    torch.manual_seed(0)
    model = build_model(mcfg).to(dev)
    model.train()
    if prepare is not None:
        prepare(model)
    prepare_ffns(model, batch_size * seq_len)  # 2:4 FFNs: before compiling, as the trainer does
    opt = optimizer(model)
    compile = compile or compile_mode is not None
    step_model = torch.compile(model, mode=compile_mode) if compile else model
    aux_loss = getattr(model, "aux_loss", None)
    # counted after each optimizer step as the trainer counts them, so that a compiled
    # model which recompiles when a count changes shows it here too
    counted = step_counted(model)
    if tokens == "corpus":
        corpus = load_corpus(data, vocab_size=mcfg.vocab_size, cache_dir=os.environ.get("SPARSETRAIN_CACHE", ""),
                             verbose=False)
        x, y = (t.to(dev) for t in train_batch(corpus.train, batch_size, seq_len, seed=0, step=0))
    elif tokens == "random":
        x = torch.randint(0, mcfg.vocab_size, (batch_size, seq_len), device=dev)
        y = torch.randint(0, mcfg.vocab_size, (batch_size, seq_len), device=dev)
    else:
        raise ValueError(f"tokens must be 'random' or 'corpus', got {tokens!r}")
    amp = torch.autocast(device_type="cuda", dtype=torch.bfloat16) if dev.type == "cuda" else None

    def step() -> None:
        # the phase ranges let a profile charge the GPU's idle time to forward, backward or optimizer
        with record_function("phase:forward"):
            if amp is not None:
                with amp:
                    _, loss = step_model(x, y)
            else:
                _, loss = step_model(x, y)
            aux = aux_loss() if aux_loss is not None else None
        with record_function("phase:backward"):
            (loss if aux is None else loss + aux).backward()
        with record_function("phase:optimizer"):
            opt.step()
            opt.zero_grad(set_to_none=True)
            for m in counted:
                m.step()

    return step, model


def bench_train_step(
    preset: str = "nano-125m",
    seq_len: int = 2048,
    batch_size: int = 8,
    compile: bool = False,
    warmup: int = 5,
    repeats: int = 20,
    device: str | None = None,
    model_overrides: dict[str, Any] | None = None,
    compile_mode: str | None = None,
    prepare: Callable[[torch.nn.Module], None] | None = None,
) -> dict[str, Any]:
    """Time full training steps (forward, backward, AdamW) on random tokens, of
    the model the preset and ``model_overrides`` build (a GPT, or ResNet-BK with
    ``arch="resnet_bk"``, whose sparsity loss joins the backward as in training).

    Returns tokens/s, the step-time summary, FLOPs per token and, on a GPU
    with a known datasheet peak, MFU. ``compile_mode``: torch.compile's mode (``compile`` implied), e.g.
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
    if hasattr(model, "sparsity_stats"):  # ResNet-BK: what the learned mask skipped in the last step
        out["sparsity_stats"] = model.sparsity_stats()
    return out
