"""``python -m bench hf``: the Hugging Face dense-vs-Collider step suite on the
CPU (shape ``tiny``), its rows against the schema and its losses at the
initial weights against a float64 reference written out here."""

from __future__ import annotations

import importlib.util
import json
import math
import random
import subprocess
from datetime import datetime
from pathlib import Path

import pytest
import torch

from bench.hf import LORA, MODELS, build_model, make_batch
from bench.results import validate
from conftest import requires_cuda
from test_bench_suite import run_bench

pytest.importorskip("transformers")

HAS_PEFT = importlib.util.find_spec("peft") is not None
ROOT = Path(__file__).resolve().parents[1]


def float64_losses(shape: str, keep_ratio: float) -> tuple[float, float, int]:
    """At the suite's initial weights and batch, in float64 through HF's own
    forward: the mean loss over every target, the mean loss over the kept
    targets (the ``ceil(keep_ratio * targets)`` highest per-sequence min-max
    normalised losses of the batch), and how many were kept."""
    model = build_model(shape, "cpu").double()
    ids = make_batch(shape, "cpu")
    with torch.no_grad():
        logits = model(input_ids=ids).logits[:, :-1]
    targets = ids[:, 1:]
    nll = torch.logsumexp(logits, -1) - logits.gather(-1, targets[..., None])[..., 0]  # [B, T-1]
    lo, hi = nll.min(-1, keepdim=True).values, nll.max(-1, keepdim=True).values
    score = (nll - lo) / (hi - lo + 1e-6)
    k = math.ceil(keep_ratio * nll.numel())
    kept = score.flatten().argsort(descending=True)[:k]
    return float(nll.mean()), float(nll.flatten()[kept].mean()), k


def lora_parameter_count(shape: str) -> int:
    """LoRA's trainable parameters: ``r * (in + out)`` per adapted projection."""
    c = MODELS[shape]["config"]
    d, inter = c["hidden_size"], c["intermediate_size"]
    head_dim = c.get("head_dim", d // c["num_attention_heads"])
    q, kv = c["num_attention_heads"] * head_dim, c["num_key_value_heads"] * head_dim
    sizes = {"q_proj": (d, q), "k_proj": (d, kv), "v_proj": (d, kv), "o_proj": (q, d), "gate_proj": (d, inter),
             "up_proj": (d, inter), "down_proj": (inter, d)}
    return c["num_hidden_layers"] * sum(LORA["r"] * sum(sizes[t]) for t in LORA["targets"])


def test_tiny_shape_runs_through_the_cli_and_its_collider_loss_is_the_float64_kept_rows_loss(
        tmp_path: Path, capsys) -> None:
    """Every row follows the schema, names its commit and date, and compares
    with dense at its own case; each variant's loss at the initial weights is
    the float64 reference (Collider: the mean over the kept rows the float64
    scores pick), for LoRA as for full fine-tuning (LoRA's B starts at zero)."""
    rng = random.Random(int(torch.randint(0, 2**31 - 1, ())))
    drop = round(rng.uniform(0.2, 0.8), 3)
    repeats = rng.randint(2, 3)
    lora = "both" if HAS_PEFT else "off"
    code, out, err = run_bench(["hf", "--shapes", "tiny", "--lora", lora, "--drop", str(drop), "--repeats",
                                str(repeats), "--warmup", "1", "--out", str(tmp_path)], capsys)
    assert code == 0, err
    files = list(tmp_path.glob("*.json"))
    assert [f.name for f in files] == [f"hf_tiny-lora-{lora}_cpu.json"]
    doc = json.loads(files[0].read_text())
    assert validate(doc) == [], validate(doc)
    assert doc["suite"] == "hf" and doc["command"].startswith("python -m bench hf --shapes tiny")
    assert datetime.fromisoformat(doc["date"]).utcoffset().total_seconds() == 0
    if (ROOT / ".git").exists():
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
        assert doc["git_commit"] == head
    lines = out.strip().splitlines()
    assert lines[0].startswith(f"hf plan: {2 if HAS_PEFT else 1} case(s)") and lines[-1].startswith("wrote ")

    collider = f"collider_{drop:g}"
    cases = ["tiny:full", "tiny:lora"] if HAS_PEFT else ["tiny:full"]
    rows = {(r["shape"], r["variant"]): r for r in doc["results"]}
    assert set(rows) == {(c, v) for c in cases for v in ("dense", collider)}
    mean_all, mean_kept, k = float64_losses("tiny", 1.0 - drop)
    targets = MODELS["tiny"]["batch"] * (MODELS["tiny"]["seq"] - 1)
    for case in cases:
        dense, col = rows[(case, "dense")], rows[(case, collider)]
        assert dense["error"] is None and col["error"] is None
        assert dense["baseline"] is None and col["baseline"] == "dense"
        assert col["speedup_vs_baseline"] == pytest.approx(dense["median_ms"] / col["median_ms"], rel=1e-12)
        for r in (dense, col):
            e = r["extra"]
            assert r["repeats"] == repeats and e["targets_per_step"] == targets
            assert e["peak_memory_gib"] is None and e["held_memory_gib"] is None  # CUDA only
            assert e["tokens_per_s"] == pytest.approx(e["tokens_per_step"] / r["median_ms"] * 1e3)
        assert col["extra"]["kept_tokens_per_step"] == k and dense["extra"]["kept_tokens_per_step"] == targets
        assert col["extra"]["loss_at_start"] == pytest.approx(mean_kept, rel=2e-6)
        assert dense["extra"]["loss_at_start"] == pytest.approx(mean_all, rel=2e-6)
        # dense is primed first: its first step runs on the initial weights
        assert dense["extra"]["loss_first_step"] == pytest.approx(mean_all, rel=2e-6)
    assert abs(mean_kept - mean_all) > 1e-3  # the two references differ: each check tells its loss apart
    if HAS_PEFT:
        assert rows[("tiny:lora", "dense")]["extra"]["trainable_parameters"] == lora_parameter_count("tiny")
        assert rows[("tiny:lora", "dense")]["extra"]["lora"] == LORA
        full = rows[("tiny:full", "dense")]["extra"]
        assert full["trainable_parameters"] == full["parameters"] and full["lora"] is None


@pytest.mark.parametrize("args, needle", [
    (["--shapes", "nosuch"], "--shapes nosuch: no bench or shape of that name"),
    (["--drop", "1.5"], "--drop must lie strictly between 0 and 1, got 1.5"),
    (["--rounds", "0"], "--rounds must be >= 1"),
    (["--lora", "sometimes"], "invalid choice: 'sometimes'"),
    (["--shapes", "tiny", "--liger"], "needs a CUDA device" if not torch.cuda.is_available() else "liger"),
    (["--shapes", "tiny", "--capture"], "--capture needs a CUDA device"),
])
def test_bad_input_is_one_line_and_exit_2(args: list[str], needle: str, tmp_path: Path, capsys) -> None:
    if "--liger" in args and torch.cuda.is_available() and importlib.util.find_spec("liger_kernel") is not None:
        pytest.skip("--liger is valid here")
    if "--capture" in args and torch.cuda.is_available():
        pytest.skip("--capture is valid here")
    code, _, err = run_bench(["hf", *args, "--out", str(tmp_path)], capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and needle in lines[0], err
    assert not list(tmp_path.glob("*.json"))


@pytest.mark.parametrize("lora", ["on", "both"])
def test_lora_without_peft_is_refused_in_one_line(lora: str, tmp_path: Path, capsys,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "peft" else real(name, *a))
    code, _, err = run_bench(["hf", "--shapes", "tiny", "--lora", lora, "--out", str(tmp_path)], capsys)
    assert code == 2 and err.strip() == f"python -m bench hf: error: --lora {lora} needs the peft package, " \
                                        "which is not installed (or pass --lora off)"


def test_every_gpu_shape_is_a_model_the_collider_engine_runs() -> None:
    """The named shapes build as Llama models the engine takes (on the meta
    device: no memory), with the parameter counts of the models they copy."""
    from sparsetrain.collider.hf_engine import unsupported_reason

    counts = {}
    for shape in MODELS:
        model = build_model(shape, "meta")
        assert unsupported_reason(model) is None
        counts[shape] = sum(p.numel() for p in model.parameters())
    assert round(counts["llama-3.2-1b"] / 1e9, 2) == 1.24  # Llama-3.2-1B: 1.24B with the tied embedding
    assert round(counts["smollm-360m"] / 1e6) == 362  # SmolLM-360M: 362M


@requires_cuda
def test_liger_case_on_the_gpu(tmp_path: Path, capsys) -> None:
    """With liger_kernel: dense_liger against Collider on the patched model,
    whose loss at the initial weights is the unpatched Collider loss."""
    pytest.importorskip("liger_kernel")
    code, _, err = run_bench(["hf", "--shapes", "tiny", "--lora", "off", "--liger", "--repeats", "2", "--out",
                              str(tmp_path)], capsys)
    assert code == 0, err
    doc = json.loads(next(tmp_path.glob("*.json")).read_text())
    assert validate(doc) == []
    row = next(r for r in doc["results"] if r["shape"] == "tiny:full+liger" and r["variant"].endswith("_on_liger"))
    assert row["error"] is None and row["baseline"] == "dense_liger" and row["extra"]["composes"] is True


@requires_cuda
def test_captured_steps_on_the_gpu(tmp_path: Path, capsys) -> None:
    """--capture: both variants' whole steps replayed from CUDA graphs (sharing one
    pool); the Collider loss at the initial weights is the uncaptured run's."""
    code, _, err = run_bench(["hf", "--shapes", "tiny", "--lora", "off", "--capture", "--repeats", "2", "--out",
                              str(tmp_path)], capsys)
    assert code == 0, err
    doc = json.loads(next(tmp_path.glob("*.json")).read_text())
    assert validate(doc) == []
    rows = {r["variant"]: r for r in doc["results"]}
    assert all(r["error"] is None and r["extra"]["mode"]["capture"] for r in rows.values())
    assert all(r["repeats"] >= 2 and r["spread"]["min_ms"] > 0 for r in rows.values())


# ----------------------------------------------------------------------------- python -m bench hf_trainer


def test_hf_trainer_suite_times_every_step_of_both_runs(tmp_path: Path, capsys) -> None:
    """The Trainer suite on the CPU: a row per variant with both runs' timed steps,
    each run's start-up and kept fraction, the schema kept; the dense and Collider
    runs start from the same weights and batches (equal first-log losses would
    need equal objectives, so the Collider loss is checked to be a kept-rows
    loss: the kept fraction is ceil(half) of the targets)."""
    code, out, err = run_bench(["hf_trainer", "--shapes", "tiny", "--repeats", "3", "--warmup", "1",
                                "--out", str(tmp_path / "t.json")], capsys)
    assert code == 0, err
    doc = json.loads((tmp_path / "t.json").read_text())
    assert validate(doc) == []
    rows = {r["variant"]: r for r in doc["results"]}
    assert list(rows) == ["trainer_dense", "trainer_collider_0.5"]
    targets = MODELS["tiny"]["batch"] * (MODELS["tiny"]["seq"] - 1)
    for name, r in rows.items():
        assert r["error"] is None and r["repeats"] == 2 * 3 and r["median_ms"] > 0
        assert len(r["extra"]["per_run"]) == 2 and all(run["startup_s"] > 0 for run in r["extra"]["per_run"])
    assert rows["trainer_collider_0.5"]["baseline"] == "trainer_dense"
    for run in rows["trainer_collider_0.5"]["extra"]["per_run"]:
        assert run["kept_fraction"] == pytest.approx(math.ceil(targets / 2) / targets, abs=1e-4)
    assert "trainer_collider_0.5" in out


def test_hf_trainer_suite_refuses_the_graph_on_the_cpu_in_one_line(tmp_path: Path, capsys) -> None:
    if torch.cuda.is_available():
        pytest.skip("the CPU refusal")
    code, out, err = run_bench(["hf_trainer", "--shapes", "tiny", "--variants", "dense,collider_graph",
                                "--out", str(tmp_path)], capsys)
    assert code == 2 and err.strip() == ("python -m bench hf_trainer: error: --variants collider_graph needs a CUDA "
                                         "device (CUDA graphs)") and not list(tmp_path.glob("*.json"))
    code, out, err = run_bench(["hf_trainer", "--shapes", "tiny", "--variants", "dense,nope", "--out",
                                str(tmp_path)], capsys)
    assert code == 2 and "no variant 'nope'" in err


@requires_cuda
def test_hf_trainer_suite_replays_the_graph_on_the_gpu(tmp_path: Path, capsys) -> None:
    code, out, err = run_bench(["hf_trainer", "--shapes", "tiny", "--repeats", "4", "--warmup", "6",
                                "--heat-seconds", "0", "--out", str(tmp_path / "t.json")], capsys)
    assert code == 0, err
    rows = {r["variant"]: r for r in json.loads((tmp_path / "t.json").read_text())["results"]}
    assert all(r["error"] is None for r in rows.values()), rows
    for run in rows["trainer_collider_0.5_graph"]["extra"]["per_run"]:
        assert run["collider_graph_steps"] == 10 - 3  # every step after the three eager warm-up micro-steps


def test_keep_all_case_trains_every_token_through_the_engine(tmp_path: Path, capsys) -> None:
    """``--keep-all``: the engine with no selector, beside dense HF on the same
    weights and batch: both losses at the start are the float64 mean over every
    target, and every target is kept."""
    code, out, err = run_bench(["hf", "--shapes", "tiny", "--lora", "off", "--keep-all", "--repeats", "2",
                                "--warmup", "1", "--out", str(tmp_path)], capsys)
    assert code == 0, err
    doc = json.loads(next(tmp_path.glob("*.json")).read_text())
    assert validate(doc) == []
    rows = {(r["shape"], r["variant"]): r for r in doc["results"]}
    assert set(rows) >= {("tiny:full+keepall", "dense"), ("tiny:full+keepall", "engine_keep_all")}
    mean_all, _, _ = float64_losses("tiny", 1.0)
    targets = MODELS["tiny"]["batch"] * (MODELS["tiny"]["seq"] - 1)
    keep = rows[("tiny:full+keepall", "engine_keep_all")]
    assert keep["error"] is None and keep["baseline"] == "dense"
    assert keep["extra"]["kept_tokens_per_step"] == targets
    assert keep["extra"]["mode"]["selection"] == "none: every token kept"
    for variant in ("dense", "engine_keep_all"):
        assert rows[("tiny:full+keepall", variant)]["extra"]["loss_at_start"] == pytest.approx(mean_all, rel=2e-6)
