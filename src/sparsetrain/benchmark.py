"""Timing and the run environment.

Every speed number sparsetrain reports comes from :func:`time_fn` (median of
repeats after warm-up, CUDA events on the GPU) and is stored with
:func:`environment` so a reader knows what produced it. A leaf: kernels that
tune themselves by timing import it. The training step that ``sparsetrain
bench step`` and the benchmark suites under ``bench/`` time is
:mod:`sparsetrain.bench_step`; the suites' own helpers (interleaved rounds,
GPU heating and clock readings, profiles) live under ``bench/``.
"""

from __future__ import annotations

import os
import platform
import re
import statistics
import subprocess
import time
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any

import torch


# Dense bf16 tensor-core peak from NVIDIA's datasheets (SXM parts), used for MFU.
DATASHEET_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}


COMMIT_VARIABLE = "SPARSETRAIN_GIT_COMMIT"


def git_state(root: str | os.PathLike | None = None) -> tuple[str | None, bool | None]:
    """``(commit, dirty)`` of the sparsetrain source at ``root`` (default: this
    package's folder). ``$SPARSETRAIN_GIT_COMMIT`` (7 to 40 hex digits), when set,
    names the commit and dirty is unknown: it is how a run from a copied working
    tree says what it ran, and such a copy's ``.git``, if it has one, may be
    older than the files. Otherwise git's HEAD and whether tracked files
    differ, or ``(None, None)`` outside a checkout. Raises :class:`ValueError`
    for a variable that is not a commit hash."""
    given = os.environ.get(COMMIT_VARIABLE)
    if given is not None:
        if not re.fullmatch(r"[0-9a-f]{7,40}", given):
            raise ValueError(f"{COMMIT_VARIABLE}={given!r} is not a commit hash (7 to 40 hex digits)")
        return given, None
    where = str(root) if root is not None else os.path.dirname(os.path.abspath(__file__))
    try:
        commit = subprocess.run(["git", "-C", where, "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()
        status = subprocess.run(["git", "-C", where, "status", "--porcelain", "--untracked-files=no"],
                                capture_output=True, text=True, timeout=10, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None, None
    return commit, bool(status.strip())


def git_commit_label() -> str | None:
    """The source's commit as one string, ``+dirty`` with uncommitted changes
    (:func:`git_state`), or None outside a checkout; :class:`ValueError` for a bad
    ``$SPARSETRAIN_GIT_COMMIT``."""
    commit, dirty = git_state()
    return None if commit is None else commit + ("+dirty" if dirty else "")


def environment() -> dict[str, Any]:
    """Device, library versions, the source's commit and the date, stored with every result."""
    try:
        commit = git_commit_label()
    except ValueError:  # a bad $SPARSETRAIN_GIT_COMMIT: refused where a command checks it, unknown here
        commit = None
    env: dict[str, Any] = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "git_commit": commit,
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
