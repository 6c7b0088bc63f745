"""How the suites time: priming, interleaved rounds, ABBA orders, GPU heating and clock readings.

A sample is :func:`sparsetrain.benchmark.time_fn`'s (CUDA events around the
call on the GPU, the host clock on the CPU). The helpers here decide which
calls are timed and in what order, and record the state of the GPU while they
run, because clocks and temperature drift over a run:

* variants timed one after another drift apart by more than the effects
  measured; in interleaved rounds every variant sees the same drift;
* under the power limit the SM clock falls as the chip warms, and a first
  compilation idles the GPU long enough to cool it, so whichever variant runs
  first after one looks fast: compile (prime) every variant, then heat the
  GPU, then time.
"""

from __future__ import annotations

import contextlib
import statistics
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from sparsetrain.benchmark import time_fn
from sparsetrain.step_graph import SideStream, StepGraph


def interleaved_schedule(names: list[str], rounds: int, warmup: int, repeats: int) -> list[tuple[str, bool]]:
    """The call order of :func:`time_interleaved` as ``(name, timed)`` pairs:
    ``warmup`` untimed calls of each variant in turn (``a a b b``), then
    ``rounds`` rounds in which each variant gets one untimed call (the switch
    from another variant) and its share of the ``repeats`` timed ones
    (``a a a b b b a a a ...``). The shares differ by at most one, so every
    variant gets exactly ``repeats`` timed calls."""
    rounds = max(1, min(rounds, repeats))
    order: list[tuple[str, bool]] = [(name, False) for name in names for _ in range(warmup)]
    for r in range(rounds):
        timed = repeats // rounds + (r < repeats % rounds)
        for name in names:
            order += [(name, False)] + [(name, True)] * timed
    return order


def time_interleaved(fns: dict[str, Callable[[], Any]], rounds: int = 3, warmup: int = 3, repeats: int = 21,
                     calls_per_sample: int = 1) -> dict[str, list[float]]:
    """Milliseconds per call of each ``fns`` entry, ``repeats`` samples each,
    called in the order of :func:`interleaved_schedule`. A sample is
    ``calls_per_sample`` calls queued back to back (ms per call), so that with
    more than one the host's launch time counts only where the GPU runs dry,
    as in a training loop that syncs once per log window."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for name, timed in interleaved_schedule(list(fns), rounds, warmup, repeats):
        if timed:
            times[name] += time_fn(fns[name], warmup=0, repeats=1, calls_per_sample=calls_per_sample)
        else:
            fns[name]()
    return times


def call_flags(names: list[str], untimed_first: int, rounds: int, repeats: int, calls_per_sample: int = 1
               ) -> dict[str, list[bool]]:
    """Per variant, one flag per call in call order, True for the calls inside a
    timed sample: ``untimed_first`` calls made before timing, then those of
    :func:`time_interleaved` (no warm-up of its own; a timed sample is
    ``calls_per_sample`` calls)."""
    flags = {n: [False] * untimed_first for n in names}
    for name, timed in interleaved_schedule(names, rounds, 0, repeats):
        flags[name] += [timed] * (calls_per_sample if timed else 1)
    return flags


def abba_order(names: list[str], repeats: int) -> list[str]:
    """Run order of ``repeats`` runs of each variant: the list forwards, then
    backwards, and so on (``a b b a`` for two), so that a drift linear in time
    falls on every variant alike once each variant's runs are averaged."""
    order: list[str] = []
    for r in range(repeats):
        order += names if r % 2 == 0 else names[::-1]
    return order


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
def gpu_clock_monitor(interval_s: float = 0.5, device_index: int = 0) -> Iterator[dict[str, Any]]:
    """Read the GPU's SM clock, power draw and temperature (``nvidia-smi``,
    every ``interval_s`` from a background thread) while the block runs; the
    yielded dict is filled on exit with ``samples``, ``sm_clock_mhz``,
    ``power_w`` and ``temperature_c`` (medians) and ``temperature_c_first_last``,
    ``samples`` 0 where nothing could be read. Tells kernels that got slower
    from a GPU that clocked down."""
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


def heat_gpu(seconds: float, n: int = 8192) -> dict[str, Any]:
    """Run bf16 ``n x n`` matmuls for ``seconds`` so the GPU reaches the
    temperature, and so the power-limited clock, of sustained training before
    anything is timed; returns :func:`gpu_clock_monitor`'s readings over it.
    Nothing to do (and ``{}``) without CUDA or with ``seconds <= 0``."""
    if seconds <= 0 or not torch.cuda.is_available():
        return {}
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    deadline = time.perf_counter() + seconds
    with gpu_clock_monitor(interval_s=1.0) as readings:
        while time.perf_counter() < deadline:
            for _ in range(20):
                a @ b
            torch.cuda.synchronize()
    return readings


def matmul_tflops(n: int = 8192, dtype: torch.dtype = torch.bfloat16) -> float:
    """Measured dense GEMM throughput on random data: the ceiling an MFU figure can be read against."""
    a = torch.randn(n, n, device="cuda", dtype=dtype)
    b = torch.randn(n, n, device="cuda", dtype=dtype)
    ms = statistics.median(time_fn(lambda: a @ b, warmup=5, repeats=20))
    return 2 * n**3 / (ms * 1e-3) / 1e12


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op off CUDA), so a host clock reading covers it."""
    if device.type == "cuda":
        torch.cuda.synchronize()


def gib(n: int) -> float:
    """Bytes in GiB, to 0.01 GiB (how the suites record memory)."""
    return round(n / 2**30, 2)


def graphs_compiled() -> int:
    """How many graphs torch.compile has compiled in this process so far (dynamo's
    count); the difference over a stretch of calls tells whether they compiled."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def capture_step(step: Callable[[], Any], optimizers: list[torch.optim.Optimizer] | tuple = (),
                 generators: Callable[[], list[torch.Generator]] = list, warmup: int = 3,
                 pool: Any = None) -> Callable[[], None]:
    """``step`` (forward, backward, optimizer step: device work only) captured whole
    in one CUDA graph; returns its replay.

    ``warmup`` eager calls on a side stream come first (they compile, autotune and
    allocate), as the CUDA graph documentation prescribes for whole-network
    capture. What capture needs from the step: no host sync, fixed shapes, inputs
    that stay in the same memory, and the optimizers' param groups capturable
    (set here; their step counts must already live on the GPU, as the fused
    AdamW keeps them); ``generators``: returns every non-default generator the
    step draws from (a random selection's), registered so each replay draws
    anew; it is called after the warm-up, since a selector makes its generator
    on its first draw. A replay does what one call did, with the same
    Python-side settings (a learning rate read as a number, a step-dependent
    schedule) frozen at capture. ``pool``: as :meth:`StepGraph.capture`'s (the
    trainer's captured step, ``run.cuda_graph``, records the same way)."""
    for opt in optimizers:
        for group in opt.param_groups:
            group["capturable"] = True
    with SideStream(torch.cuda.Stream()):
        for _ in range(warmup):
            step()
    graph = StepGraph(torch.device("cuda", torch.cuda.current_device()))
    graph.capture(step, generators(), pool=pool)
    return graph.graph.replay


def prime(calls: dict[str, Callable[[], None]], warmup: int, device: torch.device) -> dict[str, dict[str, Any]]:
    """Call each variant ``warmup`` times in turn (its first call compiles it)
    and record, per variant, its start-up apart from anything timed later:
    ``first_call_s`` and ``prime_s`` (wall-clock seconds of the first call and
    of all ``warmup``), ``graphs_compiled`` (torch.compile graphs made meanwhile)
    and, on CUDA, ``peak_memory_gib`` (the process's peak while it primed)."""
    out = {}
    for name, call in calls.items():
        sync(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        graphs, t0 = graphs_compiled(), time.perf_counter()
        first = None
        for i in range(warmup):
            call()
            if i == 0:
                sync(device)
                first = time.perf_counter() - t0
        sync(device)
        out[name] = {"first_call_s": first, "prime_s": time.perf_counter() - t0,
                     "graphs_compiled": graphs_compiled() - graphs}
        if device.type == "cuda":
            out[name]["peak_memory_gib"] = gib(torch.cuda.max_memory_allocated())
    return out


@dataclass
class Measured:
    """What :func:`prime_heat_time` measured of a set of variants."""

    times: dict[str, list[float]]  # per variant, its timed samples (ms per call)
    startup: dict[str, dict[str, Any]]  # per variant, :func:`prime`'s record
    flags: dict[str, list[bool]]  # per variant, :func:`call_flags` over every call since priming began
    heat: dict[str, Any]  # :func:`heat_gpu`'s readings
    clocks: dict[str, Any]  # :func:`gpu_clock_monitor`'s readings while timed
    wall_s: dict[str, float]  # seconds of priming (all variants), heating and the timed rounds
    graphs_compiled_while_timed: int  # 0 when the priming compiled everything
    timed_peak_memory_gib: float | None  # on CUDA, the process's peak over the timed rounds


def prime_heat_time(calls: dict[str, Callable[[], Any]], device: torch.device, warmup: int, heat_seconds: float,
                    rounds: int, repeats: int, calls_per_sample: int = 1) -> Measured:
    """The measuring order every interleaved bench follows: prime each variant
    (:func:`prime`, ``warmup`` calls: compiles it), heat the GPU
    (:func:`heat_gpu`), then time all variants in ``rounds`` interleaved rounds
    (:func:`time_interleaved`, ``repeats`` samples of ``calls_per_sample``
    calls each) under :func:`gpu_clock_monitor`."""
    startup = prime(calls, warmup, device)
    t0 = time.perf_counter()
    heat = heat_gpu(heat_seconds)
    heat_s = time.perf_counter() - t0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    graphs, t0 = graphs_compiled(), time.perf_counter()
    with gpu_clock_monitor() as clocks:
        times = time_interleaved(calls, rounds=rounds, warmup=0, repeats=repeats, calls_per_sample=calls_per_sample)
    timed_s, late = time.perf_counter() - t0, graphs_compiled() - graphs
    return Measured(times=times, startup=startup,
                    flags=call_flags(list(calls), warmup, rounds, repeats, calls_per_sample), heat=heat, clocks=clocks,
                    wall_s={"prime": sum(s["prime_s"] for s in startup.values()), "heat": heat_s, "timed": timed_s},
                    graphs_compiled_while_timed=late,
                    timed_peak_memory_gib=gib(torch.cuda.max_memory_allocated()) if device.type == "cuda" else None)
