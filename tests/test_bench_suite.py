"""The benchmark suites (``python -m bench``): the result schema and its math,
the timing orders, the option parsing, and each suite's CPU path end to end."""

from __future__ import annotations

import copy
import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import bench.timing as timing
from bench.__main__ import main as bench_main
from bench.options import BenchError, parse_cases, parse_overrides
from bench.results import SCHEMA, Result, output_path, result_rows, run_document, summarize_times, validate
from sparsetrain.errors import ConfigError


def fresh_rng() -> random.Random:
    return random.Random(int(torch.randint(0, 2**31 - 1, ())))


def run_bench(args: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str, str]:
    try:
        code = bench_main(args)
    except SystemExit as e:  # argparse usage errors
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def only_file(folder: Path) -> dict:
    files = list(folder.glob("*.json"))
    assert len(files) == 1, files
    return json.loads(files[0].read_text())


# ---------------------------------------------------------------- schema and math


@pytest.mark.parametrize("n", [1, 2, 3, 4, 7, 20, 51])
def test_median_and_spread_match_numpy(n: int) -> None:
    rng = fresh_rng()
    times = [rng.lognormvariate(0, 1) for _ in range(n)]
    s = summarize_times(times)
    q1, med, q3 = np.percentile(times, [25, 50, 75])
    assert s["median_ms"] == pytest.approx(float(np.median(times)), rel=1e-12)
    assert s["median_ms"] == pytest.approx(float(med), rel=1e-12)
    assert s["spread"] == pytest.approx({"min_ms": min(times), "q1_ms": float(q1), "q3_ms": float(q3),
                                         "max_ms": max(times), "iqr_ms": float(q3 - q1)}, rel=1e-12)
    assert s["repeats"] == n


def test_rows_give_each_variant_its_speedup_over_its_baseline_at_the_same_shape() -> None:
    rng = fresh_rng()
    base_a, base_b = [rng.uniform(5, 10) for _ in range(5)], [rng.uniform(5, 10) for _ in range(5)]
    fast = [rng.uniform(1, 4) for _ in range(5)]
    rows = result_rows("steps", [Result("dense", "a", base_a), Result("dense", "b", base_b),
                                 Result("fast", "b", fast, baseline="dense"),
                                 Result("broken", "b", [], baseline="dense", error="OutOfMemoryError: ...")])
    assert rows[2]["speedup_vs_baseline"] == pytest.approx(float(np.median(base_b) / np.median(fast)))
    assert rows[0]["speedup_vs_baseline"] is None and rows[3]["median_ms"] is None
    with pytest.raises(ValueError, match="'dense' was not measured"):
        result_rows("steps", [Result("fast", "a", fast, baseline="dense")])


def _doc() -> dict:
    rng = fresh_rng()
    return run_document("kernels", [Result("reference", "rope:tiny", [rng.uniform(1, 2) for _ in range(3)]),
                                    Result("fused", "rope:tiny", [rng.uniform(0.1, 1) for _ in range(3)],
                                           baseline="reference", extra={"max_abs_diff": 0.0})],
                        {"repeats": 3}, ["kernels", "--shapes", "rope:tiny"])


def test_a_run_document_follows_the_schema_and_each_fault_is_named() -> None:
    doc = _doc()
    assert validate(doc) == [] and doc["schema"] == SCHEMA
    assert doc["command"] == "python -m bench kernels --shapes rope:tiny"
    assert set(doc["versions"]) == {"python", "torch", "cuda", "triton", "cusparselt"} and doc["versions"]["torch"] == torch.__version__
    faults = {
        "median_ms": lambda d: d["results"][0].update(median_ms="fast"),
        "spread is not ordered": lambda d: d["results"][1]["spread"].update(min_ms=1e9),
        "baseline": lambda d: d["results"][1].update(baseline="nothing"),
        "not UTC": lambda d: d.update(date="2026-12-05T10:00:00+02:00"),
        "suite": lambda d: d["results"][0].update(suite="steps"),
        "versions": lambda d: d["versions"].pop("cusparselt"),
        "schema": lambda d: d.update(schema="other/1"),
        "error row": lambda d: d["results"][0].update(error="boom"),
    }
    for needle, break_it in faults.items():
        bad = copy.deepcopy(doc)
        break_it(bad)
        problems = validate(bad)
        assert problems and any(needle in p for p in problems), (needle, problems)


def test_the_commit_comes_from_the_variable_where_set(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                     capsys) -> None:
    """A copied working tree says its commit in ``SPARSETRAIN_GIT_COMMIT`` (dirty
    unknown), also where the copy carries a ``.git`` of another commit; a value
    that is no hash is one line and exit 2 before anything runs. Without the
    variable, git's own answer, or none outside a checkout."""
    import subprocess

    import bench.results as results
    from sparsetrain.benchmark import environment
    from sparsetrain.race import git_commit

    real_root = results.REPO_ROOT
    monkeypatch.setattr(results, "REPO_ROOT", tmp_path)
    monkeypatch.delenv(results.COMMIT_VARIABLE, raising=False)
    assert results.git_state() == (None, None)
    sha = f"{fresh_rng().getrandbits(160):040x}"
    monkeypatch.setenv(results.COMMIT_VARIABLE, sha)
    assert results.git_state() == (sha, None)
    doc = _doc()
    assert doc["git_commit"] == sha and doc["git_dirty"] is None and validate(doc) == []
    monkeypatch.setenv(results.COMMIT_VARIABLE, "HEAD")
    code, out, err = run_bench(["steps", "--shapes", "dense:tiny", "--out", str(tmp_path)], capsys)
    assert code == 2 and err.strip() == ("python -m bench steps: error: SPARSETRAIN_GIT_COMMIT='HEAD' is not a commit "
                                         "hash (7 to 40 hex digits)") and not out and not list(tmp_path.glob("*.json"))
    with pytest.raises(ConfigError, match="SPARSETRAIN_GIT_COMMIT='HEAD' is not a commit hash"):
        git_commit()
    monkeypatch.setattr(results, "REPO_ROOT", real_root)
    if (real_root / ".git").exists():
        monkeypatch.setenv(results.COMMIT_VARIABLE, sha)  # the variable wins over the checkout's .git
        assert results.git_state() == (sha, None) and git_commit() == sha
        assert environment()["git_commit"] == sha  # what eval, grpo and export reports carry
        monkeypatch.setenv(results.COMMIT_VARIABLE, "HEAD")
        assert environment()["git_commit"] is None  # unknown, not a made-up value
        monkeypatch.delenv(results.COMMIT_VARIABLE)
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=real_root, capture_output=True, text=True).stdout
        assert results.git_state()[0] == head.strip() and git_commit().startswith(head.strip())


def test_output_names(tmp_path: Path) -> None:
    device = "cpu" if not torch.cuda.is_available() else output_path(str(tmp_path), "x", "y").stem.split("_")[-1]
    assert output_path(str(tmp_path), "steps", "collider-1b.sparse24:d4096") == \
        tmp_path / f"steps_collider-1b.sparse24-d4096_{device}.json"
    assert output_path(str(tmp_path / "mine.json"), "steps", "headline") == tmp_path / "mine.json"
    assert output_path(None, "kernels", "default").parent == Path(__file__).parents[1] / "bench" / "results"


# ---------------------------------------------------------------- timing orders


def test_interleaved_schedule_warms_up_then_alternates_rounds() -> None:
    calls: list[str] = []
    times = timing.time_interleaved({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")},
                                    rounds=3, warmup=2, repeats=6)
    assert calls[:4] == ["a", "a", "b", "b"]  # warm-up
    # each round: one untimed call, then 6 // 3 = 2 timed calls, per variant in turn
    assert calls[4:] == (["a"] * 3 + ["b"] * 3) * 3
    assert {k: len(v) for k, v in times.items()} == {"a": 6, "b": 6} and all(t >= 0 for v in times.values() for t in v)


@pytest.mark.parametrize("rounds, repeats", [(3, 7), (3, 2), (4, 21), (1, 5)])
def test_interleaved_schedule_times_each_variant_exactly_repeats_times(rounds: int, repeats: int) -> None:
    order = timing.interleaved_schedule(["a", "b", "c"], rounds, warmup=1, repeats=repeats)
    assert order[:3] == [("a", False), ("b", False), ("c", False)]
    for name in "abc":
        assert sum(1 for n, t in order if n == name and t) == repeats
    timed = [n for n, t in order if t]
    if min(rounds, repeats) > 1:  # in rounds: some of c's samples come before some of a's
        assert timed.index("c") < len(timed) - 1 - timed[::-1].index("a")
    else:
        assert timed == sorted(timed)


@pytest.mark.parametrize("names, repeats, want", [
    (["a", "b"], 2, "abba"), (["a", "b"], 3, "abbaab"), (["a", "b", "c"], 2, "abccba"), (["a", "b"], 1, "ab")])
def test_abba_order(names: list[str], repeats: int, want: str) -> None:
    assert "".join(timing.abba_order(names, repeats)) == want


def test_abba_cancels_a_linear_drift() -> None:
    """Run i takes base + drift * i: with an even number of repeats every
    variant's mean run time carries the same drift."""
    rng = fresh_rng()
    names = [f"v{i}" for i in range(rng.randint(2, 5))]
    order = timing.abba_order(names, 2 * rng.randint(1, 3))
    drift = rng.uniform(0.1, 1.0)
    means = {n: np.mean([drift * i for i, m in enumerate(order) if m == n]) for n in names}
    assert max(means.values()) - min(means.values()) == pytest.approx(0, abs=1e-9)


def mark_timed_samples(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """Wrap ``timing.time_fn`` so that the returned flag's ``[0]`` is true exactly
    while a timed sample runs."""
    inside = [False]
    real = timing.time_fn

    def sample(fn, **kw):
        inside[0] = True
        try:
            return real(fn, **kw)
        finally:
            inside[0] = False

    monkeypatch.setattr(timing, "time_fn", sample)
    return inside


def test_step_flags_mark_exactly_the_calls_inside_timed_samples(monkeypatch: pytest.MonkeyPatch) -> None:
    """The step phases are medians over the calls the step suite marks as
    timed: those must be the calls that ran inside a timed sample."""
    import argparse

    inside = mark_timed_samples(monkeypatch)
    rng = fresh_rng()
    args = argparse.Namespace(warmup=rng.randint(0, 3), rounds=rng.randint(1, 4), repeats=rng.randint(1, 9),
                              queued=rng.randint(1, 3))
    seen: dict[str, list[bool]] = {"a": [], "b": []}
    calls = {n: (lambda n=n: seen[n].append(inside[0])) for n in seen}
    for call in calls.values():
        for _ in range(args.warmup):
            call()
    timing.time_interleaved(calls, rounds=args.rounds, warmup=0, repeats=args.repeats, calls_per_sample=args.queued)
    assert timing.call_flags(list(calls), args.warmup, args.rounds, args.repeats, args.queued) == seen


def test_prime_heat_time_primes_then_times_and_flags_the_timed_calls(monkeypatch: pytest.MonkeyPatch) -> None:
    """The shared measuring order: each variant's first ``warmup`` calls are its
    priming (recorded apart), the rest interleaved rounds; ``flags`` marks
    exactly the calls that ran inside a timed sample, ``repeats`` per variant."""
    inside = mark_timed_samples(monkeypatch)
    rng = fresh_rng()
    warmup, rounds, repeats, queued = rng.randint(1, 3), rng.randint(1, 4), rng.randint(1, 9), rng.randint(1, 3)
    seen: dict[str, list[bool]] = {"a": [], "b": [], "c": []}
    calls = {n: (lambda n=n: seen[n].append(inside[0])) for n in seen}
    m = timing.prime_heat_time(calls, torch.device("cpu"), warmup, 0.0, rounds, repeats, queued)
    assert m.flags == seen
    assert all(s[:warmup] == [False] * warmup for s in seen.values())
    assert {n: len(t) for n, t in m.times.items()} == {n: repeats for n in seen}
    assert {n: s["graphs_compiled"] for n, s in m.startup.items()} == {n: 0 for n in seen}
    assert m.graphs_compiled_while_timed == 0 and m.timed_peak_memory_gib is None and m.heat == {}
    assert set(m.wall_s) == {"prime", "heat", "timed"}


def test_gpu_clock_monitor_takes_medians_of_what_it_reads(monkeypatch: pytest.MonkeyPatch) -> None:
    """The monitor's medians over made-up readings, and the first and last
    temperature; no readings (no nvidia-smi) give 0 samples."""
    import time as _time

    readings = iter([(1980.0, 600.0, 41.0), (1755.0, 700.0, 58.0), (1830.0, 650.0, 55.0)])
    monkeypatch.setattr(timing, "_query_gpu", lambda device_index: next(readings, None))
    with timing.gpu_clock_monitor(interval_s=0.001) as got:
        _time.sleep(0.2)
    assert got == {"samples": 3, "sm_clock_mhz": 1830.0, "power_w": 650.0, "temperature_c": 55.0,
                   "temperature_c_first_last": [41.0, 55.0]}
    monkeypatch.setattr(timing, "_query_gpu", lambda device_index: None)
    with timing.gpu_clock_monitor() as none:
        pass
    assert none == {"samples": 0}
    assert timing.heat_gpu(0) == {}


def test_gpu_idle_by_phase_on_a_made_up_trace() -> None:
    """Gaps between GPU kernels, charged to the host phase that launched the kernel
    after each gap; overlapping kernels leave no gap. Times in microseconds."""
    from bench.profiling import gpu_idle_by_phase

    def kernel(ts, dur, corr, name):
        return {"cat": "kernel", "ts": ts, "dur": dur, "name": name, "args": {"correlation": corr}}

    def launch(ts, corr):
        return {"cat": "cuda_driver", "ts": ts, "name": "cuLaunchKernel", "args": {"correlation": corr}}

    events = [{"cat": "user_annotation", "ts": 0, "dur": 100, "name": "phase:forward"},
              {"cat": "user_annotation", "ts": 100, "dur": 200, "name": "phase:backward"},
              launch(1, 1), launch(50, 2), launch(60, 3), launch(150, 4),
              kernel(10, 20, 1, "a"),        # busy 10..30
              kernel(40, 30, 2, "b"),        # 10 us idle, launched in forward
              kernel(50, 40, 3, "c"),        # overlaps b: no gap; busy until 90
              kernel(390, 10, 4, "d")]       # 300 us idle, launched in backward
    idle = gpu_idle_by_phase({"traceEvents": events}, steps=2)
    assert idle["ms_per_step_by_phase"] == pytest.approx({"forward": 0.005, "backward": 0.15})
    assert idle["total_ms_per_step"] == pytest.approx(0.155)
    assert idle["largest"][0] == (0.3, "backward", "c", "d")


# ---------------------------------------------------------------- options


def test_parse_overrides() -> None:
    assert parse_overrides("d20;;d20:d_model=4096,n_head=32,ffn=relu2") == [
        ("d20", "d20", {}),
        ("d20:d_model=4096,n_head=32,ffn=relu2", "d20", {"d_model": 4096, "n_head": 32, "ffn": "relu2"}),
    ]
    assert parse_overrides("collider:use_collider=True,collider_sparsity=0.5,out_dir=a.b") == [
        ("collider:use_collider=True,collider_sparsity=0.5,out_dir=a.b", "collider",
         {"use_collider": True, "collider_sparsity": 0.5, "out_dir": "a.b"}),
    ]
    with pytest.raises(BenchError, match="key=value"):
        parse_overrides("a:ffn")


def test_parse_cases() -> None:
    shapes = {"x": {"tiny": {}, "big": {}, "huge": {}}, "y": {"tiny": {}, "big": {}}, "z": {"other": {}}}
    default = ["x:big", "y:big", "x:huge"]
    assert parse_cases("", shapes, default) == [("x", "big"), ("y", "big"), ("x", "huge")]
    assert parse_cases("tiny", shapes, default) == [("x", "tiny"), ("y", "tiny")]
    assert parse_cases("x, y:tiny,x:big", shapes, default) == [("x", "big"), ("x", "huge"), ("y", "tiny")]
    for bad, needle in (("x:small", "no shape 'small'"), ("w:tiny", "no bench 'w'"), ("small", "no bench or shape")):
        with pytest.raises(BenchError, match=needle):
            parse_cases(bad, shapes, default)


@pytest.mark.parametrize("args, needle", [
    (["quality", "--repeats", "3"], "--repeats does not apply"),
    (["steps", "--repeats", "0"], "--repeats must be >= 1"),
    (["steps", "--shapes", "collider:2b"], "collider has no shape '2b'"),
    (["steps", "--headline", "--compile"], "--headline fixes the shapes and modes; drop --compile"),
    (["steps", "--headline", "--shapes", "dense"], "no bench or shape of that name"),
    (["steps", "--shapes", "optimizers:tiny", "--profile"], "needs a CUDA device" if not torch.cuda.is_available()
     else "--profile applies to the interleaved benches only"),
    (["steps", "--shapes", "collider:tiny", "--drops", "1.5"], "--drops and --skip"),
    (["trainer", "--runs", "a:ffn"], "key=value"),
    (["steps", "--shapes", "collider:tiny", "--capture", "--cuda-graphs"], "needs a CUDA device" if not torch.cuda.is_available()
     else "--capture captures"),
    (["gradient_error", "--methods", "a=best/loss"], "give NAME=METHOD/SCORE"),
    (["gradient_error", "--draws", "1"], "--draws must be >= 2"),
    (["gradient_error", "--drop", "1"], "--drop must be in (0, 1)"),
    (["nosuch"], "no suite 'nosuch'"),
])
def test_bad_input_is_one_line_and_exit_2(args: list[str], needle: str, tmp_path: Path, capsys) -> None:
    code, _, err = run_bench(args + (["--out", str(tmp_path)] if args[0] in ("steps", "trainer", "quality") else []), capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and needle in lines[0], err
    assert not list(tmp_path.glob("*.json"))


@pytest.mark.parametrize("present", [True, False])
def test_race_hands_its_arguments_to_sparsetrain_race(present: bool, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    """With ``sparsetrain.race`` in the checkout, ``python -m bench race ARGS``
    runs ``sparsetrain race ARGS``; without it, one line and exit code 2."""
    import importlib.util

    import sparsetrain.cli

    got = []
    real_find_spec = importlib.util.find_spec

    def find_spec(name, *a):
        if name == "sparsetrain.race":
            return object() if present else None
        return real_find_spec(name, *a)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    monkeypatch.setattr(sparsetrain.cli, "main", lambda argv: got.append(argv) or 0)
    code, _, err = run_bench(["race", "--budget", "60", "x"], capsys)
    if present:
        assert code == 0 and got == [["race", "--budget", "60", "x"]]
    else:
        assert code == 2 and not got and len(err.strip().splitlines()) == 1 and "sparsetrain.race" in err


def test_race_suite_runs_a_tiny_race_on_the_cpu(make_cfg, tmp_path: Path, capsys) -> None:
    """``python -m bench race`` at tiny settings: a dense arm and a Collider arm
    (topk, half the tokens back-propagated) race for the same seconds; the
    race's own report is written, and a bad arm is one line and exit code 2."""
    cfg = make_cfg()
    common = ["race", "--preset", "tiny", "--data", cfg.data, "--cache-dir", cfg.cache_dir, "--vocab-size", "320",
              "--seq-len", "32", "--n-layer", "1", "--d-model", "32", "--n-head", "2", "--batch-size", "2",
              "--eval-batches", "1", "--val-fraction", "0.1", "--device", "cpu", "--out-dir", str(tmp_path / "r"),
              "--seconds", "0.3"]
    code, out, err = run_bench(common + ["--arm", "dense:", "--arm", "collider50:drop_ratio=0.5,collider_method=topk"],
                               capsys)
    assert code == 0, err
    report = json.loads((tmp_path / "r" / "race.json").read_text())
    assert set(report["arms"]) == {"dense", "collider50"} and "race report:" in out
    for name, arm in report["arms"].items():
        run = arm["runs"][0]
        assert run["steps"] >= 1 and run["tokens_forwarded"] == run["steps"] * 2 * 32
        share = 1.0 if name == "dense" else 0.5
        assert run["tokens_backpropagated"] == pytest.approx(share * run["tokens_forwarded"], rel=0.02)
    code, _, err = run_bench(common + ["--arm", "dense"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "must be NAME:KEY=VALUE" in err


# ---------------------------------------------------------------- the suites on the CPU


def _check_run(doc: dict, suite: str, cases: set[str]) -> list[dict]:
    assert validate(doc) == [], validate(doc)
    assert doc["suite"] == suite and doc["command"].startswith(f"python -m bench {suite}")
    rows = doc["results"]
    assert {r["shape"] for r in rows} == cases
    assert all(r["error"] is None or missing_package(r["error"]) for r in rows), [r["error"] for r in rows if r["error"]]
    return rows


def missing_package(error: str) -> bool:
    """The error names an optional package that this environment really lacks."""
    import importlib.util
    import re

    m = re.search(r"needs the (\S+) package, which is not installed", error)
    module = {"lion-pytorch": "lion_pytorch", "galore-torch": "galore_torch"}.get(m.group(1), m.group(1)) if m else None
    return module is not None and importlib.util.find_spec(module) is None


def test_steps_suite_runs_every_tiny_shape_on_the_cpu(tmp_path: Path, capsys) -> None:
    code, out, err = run_bench(["steps", "--shapes", "tiny", "--repeats", "2", "--warmup", "1", "--rounds", "2",
                                "--out", str(tmp_path)], capsys)
    assert code == 0, err
    from bench.steps import SHAPES

    rows = _check_run(only_file(tmp_path), "steps", {f"{b}:tiny" for b in SHAPES})
    by = {(r["shape"], r["variant"]): r for r in rows}
    collider = by[("collider:tiny", "collider_0.5")]
    assert collider["baseline"] == "dense"
    assert list(collider["extra"]["phase_ms"]) == ["forward", "select", "loss", "backward", "optimizer"]
    assert list(by[("collider:tiny", "dense")]["extra"]["phase_ms"]) == ["forward", "backward", "optimizer"]
    assert collider["extra"]["backward_vs_baseline"] == pytest.approx(
        collider["extra"]["phase_ms"]["backward"] / by[("collider:tiny", "dense")]["extra"]["phase_ms"]["backward"])
    assert by[("sparse24:tiny", "relu2_24")]["baseline"] == "relu2"
    assert by[("bk_step:tiny", "sparse_0.5")]["extra"]["sparsity_stats"]["target_sparsity"] == 0.5
    for r in rows:
        assert r["repeats"] == 2 and r["extra"]["tokens_per_s"] == pytest.approx(r["extra"]["tokens_per_call"] / r["median_ms"] * 1e3)
        startup = r["extra"]["startup"]  # the priming, recorded apart from the timed steps
        assert 0 < startup["first_call_s"] <= startup["prime_s"] and startup["graphs_compiled"] == 0  # eager
    assert "steps plan: 7 shape(s)" in out and "collider:tiny" in out.split("steps plan")[1].splitlines()[2]
    assert out.strip().splitlines()[-1].startswith("wrote ")


def test_optimizers_bench_measures_each_optimizer_alone_and_names_a_missing_package(
        tmp_path: Path, capsys, monkeypatch: pytest.MonkeyPatch) -> None:
    """One row per optimizer: the state bytes of AdamW (two float32 moments per
    parameter and a float32 step count per tensor) and of Muon, Lion and 8-bit
    AdamW (fewer); an optimizer whose package is missing gets a row whose error
    names the package, and the others still run."""
    import sys

    from bench.steps import SHAPES

    from sparsetrain.build import build_model
    from sparsetrain.config import OPTIMIZERS, build_config

    monkeypatch.setitem(sys.modules, "lion_pytorch", None)  # as if not installed
    code, out, err = run_bench(["steps", "--shapes", "optimizers:tiny", "--repeats", "2", "--warmup", "1",
                                "--rounds", "1", "--out", str(tmp_path)], capsys)
    assert code == 0, err
    doc = only_file(tmp_path)
    assert validate(doc) == []
    by = {r["variant"]: r for r in doc["results"]}
    assert list(by) == list(OPTIMIZERS) and all(r["shape"] == "optimizers:tiny" for r in by.values())
    lion = by["lion"]
    assert lion["median_ms"] is None and "lion-pytorch" in lion["error"] and "not installed" in lion["error"]
    assert all(r["error"] is None or missing_package(r["error"]) for n, r in by.items() if n != "lion"), \
        [r["error"] for r in by.values()]
    spec = SHAPES["optimizers"]["tiny"]
    params = list(build_model(build_config(spec["preset"], overrides=spec["overrides"]).model).parameters())
    n = sum(p.numel() for p in params)
    state = {name: r["extra"]["state_bytes"] for name, r in by.items() if r["error"] is None}
    assert by["adamw"]["extra"]["params"] == n and state["adamw"] == 8 * n + 4 * len(params)
    assert 0 < state["muon"] < state["adamw"]
    assert "adamw8bit" not in state or 0 < state["adamw8bit"] < state["adamw"]
    assert "galore_adamw" not in state or state["galore_adamw"] > 0
    for name, r in by.items():
        if r["error"] is None:
            assert r["baseline"] == (None if name == "adamw" else "adamw") and r["repeats"] == 2
            assert list(r["extra"]["phase_ms"]) == ["forward", "backward", "optimizer"]
            if torch.cuda.is_available():
                assert r["extra"]["peak_memory_gib"] >= r["extra"]["resident_memory_gib"] > 0


def test_prime_records_start_up_apart_and_counts_the_graphs_it_compiled() -> None:
    from bench.timing import prime

    compiled = torch.compile(lambda x: (x.sin() * 2).sum(), backend="eager")  # dynamo only: fast on the CPU
    x = torch.randn(8)
    calls = {"compiled": lambda: compiled(x), "eager": lambda: x.cos().sum()}
    got = prime(calls, 3, torch.device("cpu"))
    assert got["compiled"]["graphs_compiled"] == 1 and got["eager"]["graphs_compiled"] == 0
    assert all(0 < s["first_call_s"] <= s["prime_s"] for s in got.values())
    assert prime(calls, 0, torch.device("cpu"))["eager"] == {"first_call_s": None, "prime_s": pytest.approx(0, abs=1e-2),
                                                            "graphs_compiled": 0}


def test_phase_clock_takes_each_phases_median_over_the_flagged_calls(monkeypatch: pytest.MonkeyPatch) -> None:
    """On a fake host clock, steps whose phases take known times: each phase's
    figure is the median of its durations over the flagged calls only."""
    import bench.train_steps as ts

    now = [0.0]
    monkeypatch.setattr(ts.time, "perf_counter", lambda: now[0])
    rng = fresh_rng()
    clock = ts.PhaseClock(torch.device("cpu"))
    phases = ("forward", "select", "loss", "backward", "optimizer")
    durations = []
    for _ in range(9):
        durations.append({p: rng.uniform(1, 50) for p in phases})
        for p in phases:
            clock(p)
            now[0] += durations[-1][p] / 1e3
        clock("end")
    which = [rng.random() < 0.5 for _ in range(8)]  # flags for the first 8 of the 9 calls
    which[rng.randrange(8)] = True
    want = {p: float(np.median([d[p] for d, w in zip(durations, which) if w])) for p in phases}
    got = clock.phase_ms(which)
    assert list(got) == list(phases) and got == pytest.approx(want)
    with pytest.raises(ValueError, match="10 flags for 9 calls"):
        clock.phase_ms([True] * 10)


def test_kernels_suite_runs_every_tiny_kernel_on_the_cpu(tmp_path: Path, capsys) -> None:
    """Without CUDA the Triton variants run in Triton's interpreter (set by conftest)."""
    code, out, err = run_bench(["kernels", "--shapes", "tiny", "--repeats", "1", "--warmup", "0", "--out", str(tmp_path)], capsys)
    assert code == 0, err
    from bench.kernels import BENCHES

    rows = _check_run(only_file(tmp_path), "kernels", {f"{b}:tiny" for b in BENCHES})
    by = {(r["shape"], r["variant"]): r for r in rows}
    assert by[("packing:tiny", "pack_forward")]["extra"]["equal_to_reference"] is True
    assert by[("cross_entropy:tiny", "fused")]["extra"]["grad_max_abs_diff"] < 1e-5
    assert by[("rope:tiny", "fused")]["extra"]["max_abs_diff"] < 1e-5
    assert max(by[("bk_core:tiny", "triton")]["extra"]["max_rel_err_vs_float64"].values()) < 1e-3


def test_kept_loss_bench_runs_each_variant_under_the_kernel_policy_it_names(monkeypatch: pytest.MonkeyPatch) -> None:
    """The plain-torch variant runs with the policy's fused cross-entropy off (the
    old module flag ``cross_entropy.FUSED`` is read-only: assigning it changed
    nothing the loss reads and shadowed the policy for every later reader), the
    policy is restored after the call, and the kept rows' gradient it leaves for
    the engine is the float64 ``(softmax - onehot) / kept`` of those rows."""
    from bench import kernels as kb

    from sparsetrain import cross_entropy as ce
    from sparsetrain import kernels
    from sparsetrain.collider import loss as kept_loss

    seen: list[bool] = []
    real = kept_loss._fused
    monkeypatch.setattr(kept_loss, "_fused", lambda logits2d: seen.append(kernels.current().fused_cross_entropy)
                        or real(logits2d))
    before = kernels.current()
    bench = kb.kept_loss(kb.NAMED_SHAPES["tiny"], torch.device("cpu"))
    bench.calls["torch_eager"]()
    assert seen == [False]
    assert kernels.current() is before and "FUSED" not in vars(ce)
    assert bench.check is not None and bench.check()["grad_max_abs_diff_vs_float64"] < 1e-6


def test_trainer_suite_primes_each_run_then_times_abba(corpus_dir, cache_dir, tmp_path: Path, capsys,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Every run trained once untimed (--prime-steps) before any timed run, the
    timed runs in the order A B B A, and each run's figure the median (here the
    mean) of its two runs' median windows."""
    import bench.trainer as tt

    calls = []
    real_train = tt.train

    def train(cfg, verbose=True):
        calls.append((cfg.model.ffn, cfg.max_steps))
        return real_train(cfg, verbose=verbose)

    monkeypatch.setattr(tt, "train", train)
    monkeypatch.setenv("SPARSETRAIN_CACHE", str(cache_dir))
    common = f"data={corpus_dir},vocab_size=320,n_layer=1,d_model=32,n_head=2,device=cpu,seq_len=32,batch_size=2"
    code, _, err = run_bench(["trainer", "--shapes", "tiny", "--steps", "4", "--log-every", "2", "--prime-steps", "1",
                              "--warmup", "0", "--runs", f"a:ffn=relu2,{common};b:ffn=relu2_24,activation_dense_warmup_steps=0,{common}",
                              "--out", str(tmp_path)], capsys)
    assert code == 0, err
    assert calls == [("relu2", 1), ("relu2_24", 1), ("relu2", 4), ("relu2_24", 4), ("relu2_24", 4), ("relu2", 4)]
    rows = _check_run(only_file(tmp_path), "trainer", {"trainer:tiny"})
    a, b = rows
    assert [r["order"] for r in a["extra"]["runs"]] == [0, 3] and [r["order"] for r in b["extra"]["runs"]] == [1, 2]
    assert b["baseline"] == "a" and a["baseline"] is None
    for row in rows:
        per_run = [row["extra"]["tokens_per_step"] / float(np.median(r["tokens_per_s_by_window"])) * 1e3
                   for r in row["extra"]["runs"]]
        assert row["median_ms"] == pytest.approx(float(np.mean(per_run)))
    assert b["speedup_vs_baseline"] == pytest.approx(a["median_ms"] / b["median_ms"])


def test_quality_suite_runs_a_set_on_the_cpu(corpus_dir, cache_dir, tmp_path: Path, capsys,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SPARSETRAIN_CACHE", str(cache_dir))
    common = (f"data={corpus_dir},vocab_size=320,n_layer=1,d_model=32,n_head=2,device=cpu,seq_len=32,batch_size=2,"
              "eval_every=2,eval_batches=1,log_every=2,warmup_steps=1")
    code, _, err = run_bench(["quality", "--set", "collider_topk", "--runs", "dense,collider_0.5", "--shapes", "tiny",
                              "--steps", "4", "--overrides", common, "--out", str(tmp_path)], capsys)
    assert code == 0, err
    rows = _check_run(only_file(tmp_path), "quality", {"quality:tiny"})
    dense, collider = rows
    assert collider["baseline"] == "dense" and dense["extra"]["steps"] == 4
    assert dense["extra"]["val_loss_final"] == dense["extra"]["val_loss"]["4"]
    assert collider["extra"]["mean_kept_fraction"] == pytest.approx(0.5, abs=0.05)


def test_gradient_error_suite_measures_bias_and_variance_on_the_cpu(corpus_dir, cache_dir, tmp_path: Path, capsys,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Keeping every token reproduces the dense gradient; top-k is deterministic (all
    bias: its streamed variance is 0), random and importance scatter."""
    monkeypatch.setenv("SPARSETRAIN_CACHE", str(cache_dir))
    common = (f"data={corpus_dir},vocab_size=320,n_layer=2,d_model=32,n_head=2,device=cpu,seq_len=32,batch_size=2,"
              "warmup_steps=1")
    code, _, err = run_bench(["gradient_error", "--shapes", "tiny", "--warm-steps", "3", "--draws", "4", "--methods",
                              "random=random/loss,importance=importance/gradnorm,topk=topk/loss",
                              "--overrides", common, "--out", str(tmp_path)], capsys)
    assert code == 0, err
    rows = {r["variant"]: r["extra"] for r in _check_run(only_file(tmp_path), "gradient_error", {"gradient_error:tiny"})}
    assert list(rows) == ["keepall", "random", "importance", "topk"]
    assert rows["keepall"]["mse"] < 1e-10 and rows["keepall"]["cosine"] == pytest.approx(1.0, abs=1e-6)
    assert rows["topk"]["variance"] < 1e-12 and rows["topk"]["mse"] == pytest.approx(rows["topk"]["bias2"], rel=1e-9)
    for name in ("random", "importance"):
        r = rows[name]
        assert r["draws"] == 4 and r["variance"] > 1e-4 and -1 <= r["cosine"] <= 1 and r["mse"] >= r["bias2"]


def test_every_quality_run_is_a_valid_config() -> None:
    """Every run of every set builds a valid config at every shape (a GPU run once died on a bad head count)."""
    from bench.quality import RUN_SETS, SHAPES

    from sparsetrain.config import build_config

    for shape in SHAPES["quality"].values():
        for runs in RUN_SETS.values():
            for overrides in runs.values():
                ov = {k: v for k, v in overrides.items() if k != "equal_time_to"}
                build_config(shape["preset"], overrides={**shape["overrides"], **ov, "keep_ratio": 0.5})


def test_plot_reads_the_schema(tmp_path: Path) -> None:
    from bench.plot import curves

    doc = run_document("quality", [Result("dense", "quality:tiny", [1.0], extra={"val_loss": {"2": 5.0}, "val_seconds": {"2": 1.0}}),
                                   Result("timing_only", "quality:tiny", [1.0])], {}, ["quality"])
    assert curves(doc) == {"dense": {"val_loss": {"2": 5.0}, "val_seconds": {"2": 1.0}}}


def test_shared_variants_step_one_set_of_weights_with_one_optimizer() -> None:
    """Dense relu2 and the 2:4 FFN built to share parameters: the second model's
    parameters are the first one's tensors, one AdamW holds state for exactly
    those (none for the second model's own initial weights), and each step runs
    its own model and a full optimizer step."""
    from bench.train_steps import SPARSE24_OVERRIDES, SharedOptimizer, share_parameters

    from sparsetrain.bench_step import make_train_step
    from sparsetrain.sparse24 import Sparse24FFN

    small = {"n_layer": 1, "d_model": 32, "n_head": 2, "vocab_size": 320}
    kw = dict(preset="tiny", seq_len=32, batch_size=2, device="cpu")
    opt = SharedOptimizer()
    step_a, dense = make_train_step(**kw, model_overrides={**small, "ffn": "relu2"}, optimizer=opt)
    step_b, sparse = make_train_step(**kw, model_overrides={**small, **SPARSE24_OVERRIDES}, optimizer=opt,
                                     prepare=lambda m: share_parameters(m, dense))
    a, b = dict(dense.named_parameters()), dict(sparse.named_parameters())
    assert a.keys() == b.keys() and all(a[k] is b[k] for k in a)
    before = {k: p.detach().clone() for k, p in a.items()}
    step_a()
    step_b()
    state = opt.optimizer.state
    assert len(state) == len(a) and all(int(state[p]["step"]) == 2 for p in a.values())
    assert all(not torch.equal(before[k], p) for k, p in a.items() if p.requires_grad)
    assert [f.last_backend for f in sparse.modules() if isinstance(f, Sparse24FFN)] != ["dense"]
    with pytest.raises(ValueError, match="exactly its parameters"):  # a model that does not share them
        make_train_step(**kw, model_overrides=small, optimizer=opt)
    swiglu = make_train_step(**kw, model_overrides={**small, "ffn": "swiglu"})[1]
    with pytest.raises(ValueError, match="first difference"):
        share_parameters(swiglu, dense)


def _headline_args(shapes: str = "") -> Any:
    import argparse

    return argparse.Namespace(shapes=shapes, compile=False, cuda_graphs=False, drops=None, skip=None, headline=True,
                              rounds=3, queued=1, profile=False, tokens="random", warmup=3, repeats=15, heat_seconds=20.0)


def test_headline_is_the_three_comparisons_each_in_its_own_mode() -> None:
    from bench import steps

    args = _headline_args()
    cases = steps._check(args)
    assert cases == [("collider", "1b", True, False), ("sparse24", "d4096", False, False),
                     ("bk_layer", "64k", True, True)]
    assert args.drops == [0.5] and args.skip == 0.5 and steps.file_label(args) == "headline"
    # the plan: each case's variants and mode, every variant compiled once where compiled, and the totals
    plan = steps.plan(cases, args).splitlines()
    assert "collider:1b" in plan[1] and "compiled " in plan[1] and "dense, collider_0.5" in plan[1]
    assert "sparse24:d4096" in plan[2] and "eager" in plan[2] and "relu2, relu2_24" in plan[2]
    assert "bk_layer:64k" in plan[3] and "compiled + CUDA graphs" in plan[3] and "dense, sparse_0.5;" in plan[3]
    per_variant = 3 + 15 + 3  # priming, timed, one untimed switch call per round
    assert f"{per_variant} call(s) each" in plan[1]
    assert plan[4].strip() == f"total: 6 variant(s), 4 compiled once each, {6 * per_variant} step call(s), 60 s of heating"
    # --shapes picks headline cases, in their headline modes; anything else is refused
    some = _headline_args("bk_layer,collider:1b")
    assert steps._check(some) == [("collider", "1b", True, False), ("bk_layer", "64k", True, True)]
    assert steps.file_label(some) == "headline-bk_layer.collider-1b"
    with pytest.raises(BenchError, match="collider has no shape 'tiny'"):
        steps._check(_headline_args("collider:tiny"))
    one_b = steps.SHAPES["collider"]["1b"]
    assert (one_b["seq"], one_b["batch"]) == (2048, 8) and one_b["overrides"]["d_model"] == 2048
    assert steps.SHAPES["bk_layer"]["64k"]["batch"] * steps.SHAPES["bk_layer"]["64k"]["seq"] == 65536


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("method", ["topk", "random", "importance"])
def test_captured_step_replays_what_eager_steps_do(method: str) -> None:
    """A Collider step captured in a CUDA graph: 3 warm-up calls, the capture (which
    runs nothing) and 2 replays train the weights as 5 eager steps do (top-k: the
    same tokens every step); with a random draw, each replay draws anew (the
    selector's generator is registered with the graph)."""
    from sparsetrain.bench_step import make_train_step

    from bench.steps import _selector_generators
    from bench.timing import capture_step

    over = {"use_collider": True, "collider_sparsity": 0.5, "collider_method": method, "n_layer": 2, "d_model": 64,
            "n_head": 2, "vocab_size": 512, "dtype": "float32",
            "collider_score": "gradnorm" if method == "importance" else "collider"}
    eager, eager_model = make_train_step("tiny", seq_len=64, batch_size=4, device="cuda", model_overrides=over)
    graphed, graphed_model = make_train_step("tiny", seq_len=64, batch_size=4, device="cuda", model_overrides=over)
    graphed.x.copy_(eager.x)
    graphed.y.copy_(eager.y)
    graphed_model.load_state_dict(eager_model.state_dict())
    replay = capture_step(graphed, [graphed.optimizer], lambda: _selector_generators(graphed.objective), warmup=3)
    replay()
    first = graphed.objective.selector.last_mask.clone()
    replay()
    torch.cuda.synchronize()
    if method != "topk":
        assert not torch.equal(first, graphed.objective.selector.last_mask)
        return
    for _ in range(5):
        eager()
    for (name, a), b in zip(eager_model.named_parameters(), graphed_model.parameters()):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6), name


def test_a_model_step_runs_under_its_configs_kernel_policy() -> None:
    """A variant changes a kernel choice with an override: every phase of its step sees
    the policy of its own config's [kernels] section, and the process's policy is the
    same before and after the call."""
    from sparsetrain import kernels
    from sparsetrain.bench_step import make_train_step

    small = {"n_layer": 1, "d_model": 32, "n_head": 2, "vocab_size": 320}
    seen: list[kernels.KernelPolicy] = []
    before = kernels.current()
    step, _ = make_train_step(preset="tiny", seq_len=16, batch_size=2, device="cpu",
                              model_overrides={**small, "fused_cross_entropy": False,
                                               "fused_hyper_mixing_compiled": False},
                              mark=lambda phase: seen.append(kernels.current()))
    step()
    assert len(seen) >= 4
    assert all(not p.fused_cross_entropy and not p.fused_hyper_mixing_compiled for p in seen)
    assert kernels.current() == before and before.fused_cross_entropy and before.fused_hyper_mixing_compiled
