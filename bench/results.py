"""The one result schema of every suite: what a run measured, and what made it.

A run writes one JSON file::

    {"schema": "sparsetrain-bench/1", "suite": "steps",
     "device": "NVIDIA H100 80GB HBM3", "versions": {"python", "torch", "cuda", "triton", "cusparselt"},
     "git_commit": "<sha>" | null, "git_dirty": bool | null, "date": "<UTC ISO>",
     "command": "python -m bench steps --headline", "settings": {...}, "environment": {...},
     "results": [
       {"suite": "steps", "variant": "collider_0.5", "shape": "collider:1b",
        "median_ms": 121.1, "spread": {"min_ms", "q1_ms", "q3_ms", "max_ms", "iqr_ms"}, "repeats": 15,
        "baseline": "dense", "speedup_vs_baseline": 1.43, "error": null, "extra": {...}}, ...]}

Every row shares the file's device, versions, commit, date and command
(``git_commit``: the ``SPARSETRAIN_GIT_COMMIT`` variable's value where set, as
in a copied working tree, else the checkout's HEAD; null without either).
``median_ms`` and ``spread`` come from the row's timed samples;
``speedup_vs_baseline`` is the baseline row's median (same shape) over this
row's: above 1, faster than the baseline. A variant that failed (out of
memory, a compile error) keeps its row, with ``error`` set and no times.
"""

from __future__ import annotations

import math
import re
import shlex
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from sparsetrain.benchmark import COMMIT_VARIABLE, environment
from sparsetrain.benchmark import git_state as _git_state

from .options import BenchError

SCHEMA = "sparsetrain-bench/1"
RESULTS_DIR = Path(__file__).resolve().parent / "results"
REPO_ROOT = Path(__file__).resolve().parents[1]
SPREAD_KEYS = ("min_ms", "q1_ms", "q3_ms", "max_ms", "iqr_ms")
VERSION_KEYS = ("python", "torch", "cuda", "triton", "cusparselt")


@dataclass
class Result:
    """One variant at one shape: its timed samples (milliseconds), the variant
    it is compared with at the same shape, and whatever else the suite
    measured (``extra``: tokens/s, peak memory, GPU clocks, val loss, ...)."""

    variant: str
    shape: str
    times_ms: list[float]
    baseline: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    error: str | None = None


def quantile(values: list[float], q: float) -> float:
    """The ``q`` quantile of ``values``, interpolating linearly between the two
    nearest order statistics (numpy's default method)."""
    s = sorted(values)
    pos = q * (len(s) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def summarize_times(times_ms: list[float]) -> dict[str, Any]:
    """``median_ms``, ``spread`` (min, quartiles, max, interquartile range) and ``repeats`` of a list of samples."""
    q1, q3 = quantile(times_ms, 0.25), quantile(times_ms, 0.75)
    return {"median_ms": quantile(times_ms, 0.5),
            "spread": {"min_ms": min(times_ms), "q1_ms": q1, "q3_ms": q3, "max_ms": max(times_ms), "iqr_ms": q3 - q1},
            "repeats": len(times_ms)}


def result_rows(suite: str, results: list[Result]) -> list[dict[str, Any]]:
    """The rows of a run file, medians, spreads and speedups worked out."""
    rows = []
    for r in results:
        row: dict[str, Any] = {"suite": suite, "variant": r.variant, "shape": r.shape}
        if r.error is None and r.times_ms:
            row.update(summarize_times(r.times_ms))
        else:
            row.update(median_ms=None, spread=None, repeats=len(r.times_ms))
        row.update(baseline=r.baseline, speedup_vs_baseline=None, error=r.error, extra=r.extra)
        rows.append(row)
    by_key = {(row["shape"], row["variant"]): row for row in rows}
    for row in rows:
        if row["baseline"] is None:
            continue
        base = by_key.get((row["shape"], row["baseline"]))
        if base is None:
            raise ValueError(f"{row['variant']} at {row['shape']}: its baseline {row['baseline']!r} was not measured there")
        if row["median_ms"] and base["median_ms"]:
            row["speedup_vs_baseline"] = base["median_ms"] / row["median_ms"]
    return rows


def git_state() -> tuple[str | None, bool | None]:
    """``(commit, dirty)`` of the checkout the suites run from
    (:func:`sparsetrain.benchmark.git_state`: ``$SPARSETRAIN_GIT_COMMIT`` when set,
    as in a copied working tree, else git's answer). Raises :class:`BenchError`
    for a variable that is not a commit hash."""
    try:
        return _git_state(REPO_ROOT)
    except ValueError as e:
        raise BenchError(str(e)) from None


def run_document(suite: str, results: list[Result], settings: dict[str, Any], argv: list[str]) -> dict[str, Any]:
    """The whole JSON of one run: the rows and what made them."""
    env = environment()
    commit, dirty = git_state()
    return {"schema": SCHEMA, "suite": suite, "device": env["device"],
            "versions": {k: env.get(k) for k in VERSION_KEYS}, "git_commit": commit, "git_dirty": dirty,
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "command": " ".join(["python", "-m", "bench", *map(shlex.quote, argv)]),
            "settings": settings, "environment": env, "results": result_rows(suite, results)}


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def validate(doc: dict[str, Any]) -> list[str]:
    """What is wrong with a run file (empty: it follows the schema)."""
    problems = []
    for key, kind in (("schema", str), ("suite", str), ("device", str), ("versions", dict), ("date", str),
                      ("command", str), ("settings", dict), ("results", list)):
        if not isinstance(doc.get(key), kind):
            problems.append(f"{key}: missing or not a {kind.__name__}")
    if doc.get("schema") != SCHEMA:
        problems.append(f"schema: {doc.get('schema')!r}, expected {SCHEMA!r}")
    if not isinstance(doc.get("git_commit"), (str, type(None))) or not isinstance(doc.get("git_dirty"), (bool, type(None))):
        problems.append("git_commit / git_dirty: not a string / bool or null")
    if isinstance(doc.get("versions"), dict) and set(doc["versions"]) != set(VERSION_KEYS):
        problems.append(f"versions: keys {sorted(doc['versions'])}, expected {sorted(VERSION_KEYS)}")
    if isinstance(doc.get("date"), str):
        try:
            date = datetime.fromisoformat(doc["date"])
            if date.utcoffset() is None or date.utcoffset().total_seconds() != 0:
                problems.append(f"date: {doc['date']} is not UTC")
        except ValueError:
            problems.append(f"date: {doc['date']!r} is not ISO 8601")
    rows = doc.get("results") if isinstance(doc.get("results"), list) else []
    keys = {(r.get("shape"), r.get("variant")) for r in rows if isinstance(r, dict)}
    for i, r in enumerate(rows):
        where = f"results[{i}]"
        if not isinstance(r, dict):
            problems.append(f"{where}: not an object")
            continue
        for key in ("suite", "variant", "shape"):
            if not isinstance(r.get(key), str) or not r.get(key):
                problems.append(f"{where}.{key}: missing or empty")
        if r.get("suite") != doc.get("suite"):
            problems.append(f"{where}.suite: {r.get('suite')!r} in a {doc.get('suite')!r} run")
        if not isinstance(r.get("extra"), dict):
            problems.append(f"{where}.extra: not an object")
        if r.get("error") is not None:
            if not isinstance(r["error"], str) or r.get("median_ms") is not None:
                problems.append(f"{where}: an error row has a median or a non-text error")
            continue
        spread = r.get("spread")
        if not _number(r.get("median_ms")) or not isinstance(spread, dict) or set(spread) != set(SPREAD_KEYS):
            problems.append(f"{where}: median_ms and spread {SPREAD_KEYS} must be numbers")
            continue
        if not all(_number(spread[k]) for k in SPREAD_KEYS) or not (
                spread["min_ms"] <= spread["q1_ms"] <= r["median_ms"] <= spread["q3_ms"] <= spread["max_ms"]):
            problems.append(f"{where}: spread is not ordered min <= q1 <= median <= q3 <= max")
        if not isinstance(r.get("repeats"), int) or r["repeats"] < 1:
            problems.append(f"{where}.repeats: not a positive count")
        if r.get("baseline") is not None:
            if (r.get("shape"), r["baseline"]) not in keys:
                problems.append(f"{where}.baseline: {r['baseline']!r} has no row at {r.get('shape')!r}")
            if r.get("speedup_vs_baseline") is not None and not _number(r["speedup_vs_baseline"]):
                problems.append(f"{where}.speedup_vs_baseline: not a number")
    return problems


def device_slug() -> str:
    """The device part of a result file's name: ``h100``, ``h200``, ``a100``..., or ``cpu``."""
    if not torch.cuda.is_available():
        return "cpu"
    m = re.search(r"\b([A-Z]{1,2}\d{2,4})\b", torch.cuda.get_device_name(0))
    return m.group(1).lower() if m else "gpu"


def output_path(out: str | None, suite: str, what: str) -> Path:
    """Where a run is written: ``out`` when it names a ``.json`` file, else
    ``<suite>_<what>_<device>.json`` in the folder ``out`` (default bench/results)."""
    if out and out.endswith(".json"):
        return Path(out)
    what = re.sub(r"[^A-Za-z0-9.-]+", "-", what).strip("-")[:80] or "run"
    return Path(out or RESULTS_DIR) / f"{suite}_{what}_{device_slug()}.json"


def format_table(doc: dict[str, Any]) -> str:
    """The short table printed after a run."""
    lines = [f"{doc['suite']} on {doc['device']}, torch {doc['versions']['torch']}, {doc['date']}",
             f"{'shape':<22} {'variant':<30} {'median ms':>10} {'IQR ms':>8} {'n':>3} {'speedup':>8}  baseline"]
    for r in doc["results"]:
        if r["error"] is not None:
            lines.append(f"{r['shape']:<22} {r['variant']:<30} error: {r['error'][:120]}")
            continue
        speedup = f"{r['speedup_vs_baseline']:7.3f}x" if r["speedup_vs_baseline"] is not None else f"{'':>8}"
        lines.append(f"{r['shape']:<22} {r['variant']:<30} {r['median_ms']:10.3f} {r['spread']['iqr_ms']:8.3f} "
                     f"{r['repeats']:>3} {speedup}  {r['baseline'] or ''}")
    return "\n".join(lines)
