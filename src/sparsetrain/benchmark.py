"""Timing helpers and the dense training-step benchmark.

Every speed number sparsetrain reports comes from :func:`time_fn` (median of
repeats after warm-up, CUDA events on the GPU) and is stored with
:func:`environment` so a reader knows what produced it.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import statistics
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from torch.profiler import record_function

from .config import ModelConfig, build_config
from .data import load_corpus, train_batch
from .build import build_model
from .optim import make_optimizer, step_counted
from .sparse24.ffn import prepare_ffns

# The model overrides of a 2:4 model as the step benches time it: the transposable
# method (cuSPARSELt or the masked kernel by width), sparse from the first step.
SPARSE24_OVERRIDES = {"ffn": "relu2_24", "activation_sparse_method": "transposable", "activation_dense_warmup_steps": 0}

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


def time_interleaved(fns: dict[str, Callable[[], Any]], rounds: int = 3, warmup: int = 3,
                     repeats: int = 21, calls_per_sample: int = 1) -> dict[str, list[float]]:
    """Milliseconds per call of each ``fns`` entry (:func:`time_fn`, ``repeats``
    samples of ``calls_per_sample`` calls), timed in ``rounds`` interleaved
    rounds of ``repeats // rounds`` samples (one untimed call first in each),
    after ``warmup`` untimed calls of each. Clocks and the
    host drift over a run: timed one after another, two identical compiled
    layers once differed by 8% (bench/results/bk_relu_rows_sequential_bf16_h200.json);
    interleaved, every variant sees the same drift."""
    for fn in fns.values():
        time_fn(fn, warmup=warmup, repeats=0)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            times[name] += time_fn(fn, warmup=1, repeats=max(1, repeats // rounds), calls_per_sample=calls_per_sample)
    return times


def _query_gpu(device_index: int) -> tuple[float, float, float] | None:
    """One ``nvidia-smi`` reading of (SM clock MHz, power W, temperature C), or None."""
    cmd = ["nvidia-smi", f"--id={device_index}", "--query-gpu=clocks.sm,power.draw,temperature.gpu",
           "--format=csv,noheader,nounits"]
    try:
        text = subprocess.run(cmd, capture_output=True, text=True, timeout=5, check=True).stdout
        clock, power, temperature = (float(v) for v in text.strip().splitlines()[0].split(","))
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):  # no nvidia-smi, "[N/A]" fields
        return None
    return clock, power, temperature


@contextlib.contextmanager
def gpu_clock_monitor(interval_s: float = 0.1, device_index: int = 0) -> Iterator[dict[str, Any]]:
    """Read the GPU's SM clock, power draw and temperature (``nvidia-smi``,
    every ``interval_s`` from a background thread) while the block runs; the
    yielded dict is filled on exit with ``samples``, ``sm_clock_mhz``,
    ``power_w`` and ``temperature_c`` (medians) and ``temperature_c_first_last``,
    ``samples`` 0 where nothing could be read. For telling kernels that got
    slower from a GPU that clocked down: under the power limit the clock
    falls as the chip warms (the first run of a call on a cool GPU ran 3-5%
    faster than the same run later, session 13)."""
    out: dict[str, Any] = {}
    rows: list[tuple[float, float, float]] = []
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            row = _query_gpu(device_index)
            if row is None:
                return
            rows.append(row)
            stop.wait(interval_s)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield out
    finally:
        stop.set()
        thread.join(timeout=10)
        out["samples"] = len(rows)
        if rows:
            out["sm_clock_mhz"] = statistics.median(r[0] for r in rows)
            out["power_w"] = statistics.median(r[1] for r in rows)
            out["temperature_c"] = statistics.median(r[2] for r in rows)
            out["temperature_c_first_last"] = [rows[0][2], rows[-1][2]]


def heat_gpu(seconds: float, device: torch.device | str = "cuda", n: int = 8192) -> dict[str, Any]:
    """Run bf16 ``n x n`` matmuls for ``seconds`` so the GPU reaches the
    temperature, and so the power-limited clock, of sustained training before
    anything is timed; returns :func:`gpu_clock_monitor`'s readings over it."""
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    deadline = time.perf_counter() + seconds
    with gpu_clock_monitor(interval_s=1.0) as readings:
        while time.perf_counter() < deadline:
            for _ in range(20):
                a @ b
            torch.cuda.synchronize(device)
    return readings


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


def gpu_idle_by_phase(trace: dict, steps: int) -> dict:
    """GPU idle time per step from a chrome trace (``torch.profiler``'s
    ``export_chrome_trace``), by the phase (the ``phase:*`` range on the host)
    that launched the kernel ending each gap, plus the largest gaps with the
    kernels on either side."""
    ev = trace["traceEvents"]
    gpu = sorted((e for e in ev if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")), key=lambda e: e["ts"])
    launch_ts = {e["args"]["correlation"]: e["ts"] for e in ev  # Triton and inductor launch through the driver API
                 if e.get("cat") in ("cuda_runtime", "cuda_driver") and "correlation" in e.get("args", {})}
    phases = sorted((e["ts"], e["ts"] + e["dur"], e["name"][6:]) for e in ev
                    if e.get("cat") == "user_annotation" and e["name"].startswith("phase:"))

    def phase_at(ts: float) -> str:
        inside = [name for a, b, name in phases if a <= ts <= b]
        return inside[-1] if inside else "between"

    by_phase: dict[str, float] = {}
    gaps = []
    end = gpu[0]["ts"] + gpu[0]["dur"]
    for prev, e in zip(gpu, gpu[1:]):
        if e["ts"] > end:
            gap = e["ts"] - end
            ph = phase_at(launch_ts.get(e["args"].get("correlation"), e["ts"]))
            by_phase[ph] = by_phase.get(ph, 0.0) + gap / 1e3 / steps
            gaps.append((round(gap / 1e3, 3), ph, prev["name"][:60], e["name"][:60]))
        end = max(end, e["ts"] + e["dur"])
    return {"ms_per_step_by_phase": by_phase, "total_ms_per_step": sum(by_phase.values()),
            "largest": sorted(gaps, key=lambda g: -g[0])[:25]}


def profile_top_kernels(fn: Callable[[], Any], steps: int = 3, top: int = 25) -> dict[str, Any]:
    """Profile ``steps`` calls of ``fn()`` (already warmed up, queued back to
    back, one sync at the end). Per call:

    * ``gpu_busy_ms_per_step``, ``cpu_ms_per_step``; ``top_self_gpu`` and
      ``top_self_cpu``: the ``top`` entries by self time, as ``(name, ms per
      call, calls per call)``;
    * ``kernel_ms_per_step``: the GPU kernels' time alone (what the call takes
      if the GPU never idles and no kernels overlap), and ``gpu_kernels``: the
      ``top`` kernels alone (no host ops or profiler ranges, names to 100
      characters), the list to diff two variants by;
    * ``gpu_idle``: where the GPU waited (:func:`gpu_idle_by_phase`, by the
      ``phase:*`` ranges that :func:`make_train_step`'s steps mark)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            fn()
        torch.cuda.synchronize()
    with tempfile.TemporaryDirectory() as tmp:
        trace = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(trace))
        idle = gpu_idle_by_phase(json.loads(trace.read_text()), steps=steps)
    kernels: dict[str, list[float]] = {}
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA and not getattr(e, "is_user_annotation", False):
            k = kernels.setdefault(e.name[:100], [0.0, 0])
            k[0] += getattr(e, "device_time", 0.0)
            k[1] += 1
    events = prof.key_averages()
    dev = lambda e: getattr(e, "self_device_time_total", getattr(e, "self_cuda_time_total", 0))  # noqa: E731
    per = 1e3 * steps
    return {"gpu_busy_ms_per_step": round(sum(dev(e) for e in events) / per, 3),
            "kernel_ms_per_step": round(sum(t for t, _ in kernels.values()) / per, 3),
            "cpu_ms_per_step": round(sum(e.self_cpu_time_total for e in events) / per, 3),
            "top_self_cpu": [(e.key[:50], round(e.self_cpu_time_total / per, 3), e.count // steps)
                             for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[:top]],
            "top_self_gpu": [(e.key[:50], round(dev(e) / per, 3), e.count // steps)
                             for e in sorted(events, key=lambda e: -dev(e))[:top]],
            "gpu_idle": idle,
            "gpu_kernels": [(name, round(t / per, 3), n // steps)
                            for name, (t, n) in sorted(kernels.items(), key=lambda kv: -kv[1][0])[:top]]}


def _entry_value(v: str) -> Any:
    """A ``key=value`` value as a Python value: ``True``/``False``, an int, a float, else the string."""
    if v in ("True", "False"):
        return v == "True"
    for kind in (int, float):
        try:
            return kind(v)
        except ValueError:
            pass
    return v


def parse_step_entries(spec: str) -> list[tuple[str, str, dict[str, Any]]]:
    """``"d20;d20:d_model=4096,n_head=32"`` -> ``[(entry, name, overrides), ...]``:
    the ``--steps`` argument of the step benchmarks (name: the preset) and
    ``--runs`` of bench/trainer_throughput.py (name: the run's); values parsed
    as bools, ints and floats where they read as one."""
    out = []
    for entry in filter(None, spec.split(";")):
        preset, _, extra = entry.partition(":")
        pairs = (kv.split("=", 1) for kv in filter(None, extra.split(",")))
        out.append((entry, preset, {k: _entry_value(v) for k, v in pairs}))
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
    tokens: str = "random",
    data: str = "",
) -> tuple[Callable[[], None], torch.nn.Module]:
    """``(step, model)``: one training step (forward, backward, AdamW) on one
    fixed batch of the model the preset and ``model_overrides`` build, as
    :func:`bench_train_step` times it (arguments as there). ``tokens``:
    ``"random"`` (uniform token ids) or ``"corpus"`` (the trainer's first batch
    of ``data``, the embedded corpus when empty; tokenized into
    ``$SPARSETRAIN_CACHE``): GPU power, and so the clock under the power limit,
    depends on the data."""
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cfg = build_config(preset=preset, overrides={"seq_len": seq_len, **(model_overrides or {})})
    mcfg: ModelConfig = cfg.model
    torch.manual_seed(0)
    model = build_model(mcfg).to(dev)
    model.train()
    if prepare is not None:
        prepare(model)
    prepare_ffns(model, batch_size * seq_len)  # 2:4 FFNs: before compiling, as the trainer does
    opt = make_optimizer(model, 1e-4, 0.1, (0.9, 0.95), dev.type)
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
        # the phase ranges name where a profiled step's GPU idled (profile_top_kernels)
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


def bench_train_steps_interleaved(variants: dict[str, dict[str, Any]], rounds: int = 3, warmup: int = 5,
                                  repeats: int = 20, profile_top: int = 0, queued: int = 0,
                                  clock_steps: int = 0) -> dict[str, dict[str, Any]]:
    """Step-time summaries of several models timed in interleaved rounds
    (:func:`time_interleaved`; ``repeats`` steps each in all, each step
    synchronized). ``variants``: name -> :func:`make_train_step` keyword
    arguments. All models live at once.

    ``queued``: also time ``repeats`` samples of that many steps queued back to
    back, one sync per sample, under ``"queued"`` (ms per step). The trainer
    syncs once per log window, so this is the step time it sees; a synchronized
    step also counts the host time before the GPU's first kernel and wherever
    the host falls behind the GPU. ``profile_top``: after the timing, also
    profile three steps of each (:func:`profile_top_kernels`, that many
    entries) under ``"profile"``. ``clock_steps``: also run that many queued
    steps of each under :func:`gpu_clock_monitor`, under ``"gpu_clocks"``."""
    steps = {name: make_train_step(**kw)[0] for name, kw in variants.items()}
    times = time_interleaved(steps, rounds=rounds, warmup=warmup, repeats=repeats)
    out: dict[str, dict[str, Any]] = {name: summarize(t) for name, t in times.items()}
    if queued:
        times = time_interleaved(steps, rounds=rounds, warmup=1, repeats=repeats, calls_per_sample=queued)
        for name, t in times.items():
            out[name]["queued"] = summarize(t)
    if clock_steps:
        for name, step in steps.items():
            with gpu_clock_monitor() as clocks:
                for _ in range(clock_steps):
                    step()
                torch.cuda.synchronize()
            out[name]["gpu_clocks"] = clocks
    if profile_top:
        for name, step in steps.items():
            out[name]["profile"] = profile_top_kernels(step, steps=3, top=profile_top)
    return out


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
