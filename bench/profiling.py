"""Kernel profiles of a timed call: top kernels, and where the GPU waited for the host."""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch


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
      ``top`` kernels alone (names to 100 characters), the list to diff two
      variants by;
    * ``gpu_idle``: where the GPU waited (:func:`gpu_idle_by_phase`, by the
      ``phase:*`` ranges that the training steps mark)."""
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
