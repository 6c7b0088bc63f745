"""Reliability: the metric log never lags a checkpoint, checkpoints carry a
checksum and fall back to the previous one, run folders are never written
into by another run, saved configs are reusable, bad input is one line, the
weights-only file serves generate, divergence keeps the last good
checkpoint, and logging goes to TensorBoard / W&B on request."""

from __future__ import annotations

import importlib.machinery
import json
import os
import re
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

from sparsetrain import checkpoint
from sparsetrain.errors import DivergedError
from sparsetrain.trainer import Trainer, train
from test_cli import SMALL, assert_one_line_error, run_main

REPO = Path(__file__).resolve().parents[1]

# Runs a CLI command in a fresh process and SIGKILLs it right after the n-th os.replace
# that puts a file named TARGET in place (with TARGET = ckpt.pt: right after a checkpoint).
KILL_AFTER_REPLACE = """
import os, signal, sys
target, n = sys.argv[1], int(sys.argv[2])
real, seen = os.replace, [0]
def replace(src, dst, *a, **k):
    real(src, dst, *a, **k)
    if os.path.basename(dst) == target:
        seen[0] += 1
        if seen[0] == n:
            os.kill(os.getpid(), signal.SIGKILL)
os.replace = replace
from sparsetrain.cli import main
sys.exit(main(sys.argv[3:]))
"""


def rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def train_steps(run: Path) -> list[int]:
    return [r["step"] for r in rows(run) if r["kind"] == "train"]


@pytest.fixture
def common(corpus_dir: Path, cache_dir: Path) -> list[str]:
    return SMALL + ["--data", str(corpus_dir), "--cache-dir", str(cache_dir), "--log-every", "1"]


def reference(common: list[str], tmp_path: Path, capsys, *extra: str) -> dict[int, float]:
    """Train losses of an uninterrupted run with these flags."""
    run = tmp_path / "reference"
    assert run_main(["train", *common, *extra, "--out-dir", str(run)], capsys)[0] == 0
    return {r["step"]: r["loss"] for r in rows(run) if r["kind"] == "train"}


# ----------------------------------------------------------------------------- 1: log vs checkpoint


def test_rows_up_to_the_checkpoint_survive_a_kill(common: list[str], tmp_path: Path, capsys) -> None:
    """Killed right after the step-6 checkpoint (evals at 4 and 8): rows 5-6 must be on disk."""
    flags = ["--max-steps", "10", "--ckpt-every", "3", "--eval-every", "4"]
    run = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    proc = subprocess.run([sys.executable, "-c", KILL_AFTER_REPLACE, "ckpt.pt", "2", "train", *common, *flags,
                           "--out-dir", str(run)], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr
    assert checkpoint.load_checkpoint(run)["step"] == 6
    assert train_steps(run) == list(range(1, 7))  # nothing past the checkpoint was fsynced late, nothing before lost
    code, out, _ = run_main(["train", "--resume", str(run)], capsys)
    assert code == 0 and "steps 6 -> 10" in out
    assert train_steps(run) == list(range(1, 11))
    want = reference(common, tmp_path, capsys, *flags)
    got = {r["step"]: r["loss"] for r in rows(run) if r["kind"] == "train"}
    assert got == pytest.approx(want, rel=1e-5)
    assert [r["step"] for r in rows(run) if r["kind"] == "eval"] == [0, 4, 8, 10]


def test_torn_last_metrics_line_is_dropped_on_resume(common: list[str], tmp_path: Path, capsys) -> None:
    run = tmp_path / "run"
    assert run_main(["train", *common, "--max-steps", "4", "--eval-every", "2", "--out-dir", str(run)], capsys)[0] == 0
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"kind": "train", "step": 5, "lo')  # a write cut short by a crash
    code, _, err = run_main(["train", "--resume", str(run), "--max-steps", "6"], capsys)
    assert code == 0 and "warning" not in err
    assert train_steps(run) == list(range(1, 7))


# ----------------------------------------------------------------------------- 2, 3: damaged checkpoints


def test_empty_checkpoint_is_one_line(common: list[str], tmp_path: Path, capsys) -> None:
    run = tmp_path / "run"
    assert run_main(["train", *common, "--max-steps", "2", "--out-dir", str(run)], capsys)[0] == 0
    (run / "ckpt.pt").write_bytes(b"")  # a full disk
    (run / "ckpt.prev.pt").unlink(missing_ok=True)
    code, _, err = run_main(["train", "--resume", str(run)], capsys)
    assert_one_line_error(code, err, "ckpt.pt")
    code, _, err = run_main(["generate", "--ckpt", str(run / "ckpt.pt")], capsys)
    assert_one_line_error(code, err, "ckpt.pt")


def test_empty_checkpoint_outside_a_checksummed_run_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "ckpt.pt").write_bytes(b"")
    with pytest.raises(checkpoint.CheckpointError, match="cannot read checkpoint"):
        checkpoint.load_checkpoint(tmp_path / "ckpt.pt")


def zero_block(path: Path, offset_fraction: float = 0.5, size: int = 4096) -> None:
    data = bytearray(path.read_bytes())
    start = int(len(data) * offset_fraction)
    data[start : start + size] = bytes(min(size, len(data) - start))
    path.write_bytes(bytes(data))


def test_damaged_checkpoint_falls_back_to_the_previous(common: list[str], tmp_path: Path, capsys) -> None:
    run = tmp_path / "run"
    flags = ["--eval-every", "2"]
    assert run_main(["train", *common, *flags, "--max-steps", "4", "--out-dir", str(run)], capsys)[0] == 0
    zero_block(run / "ckpt.pt")  # 4 KiB of zeros inside the step-4 checkpoint
    code, out, err = run_main(["train", "--resume", str(run), "--max-steps", "6"], capsys)
    assert code == 0, err
    warnings = [ln for ln in err.splitlines() if "warning" in ln]
    assert len(warnings) == 1 and "checksum mismatch" in warnings[0] and "step 2" in warnings[0], err
    assert "steps 2 -> 6" in out
    assert train_steps(run) == list(range(1, 7))
    want = reference(common, tmp_path, capsys, *flags, "--max-steps", "6")
    got = {r["step"]: r["loss"] for r in rows(run) if r["kind"] == "train"}
    assert got == pytest.approx(want, rel=1e-5)  # the resumed run is the uninterrupted one
    assert checkpoint.verify_file(run / "ckpt.pt") is None and checkpoint.verify_file(run / "ckpt.prev.pt") is None


def test_both_checkpoints_damaged_is_one_line(common: list[str], tmp_path: Path, capsys) -> None:
    run = tmp_path / "run"
    assert run_main(["train", *common, "--eval-every", "2", "--max-steps", "4", "--out-dir", str(run)], capsys)[0] == 0
    zero_block(run / "ckpt.pt")
    zero_block(run / "ckpt.prev.pt", 0.0, 64)
    before = (run / "metrics.jsonl").read_bytes()
    code, _, err = run_main(["train", "--resume", str(run)], capsys)
    assert_one_line_error(code, err, "no intact checkpoint", "ckpt.pt", "ckpt.prev.pt")
    assert (run / "metrics.jsonl").read_bytes() == before


def test_checksum_file_matches_sha256sum(common: list[str], tmp_path: Path, capsys) -> None:
    run = tmp_path / "run"
    assert run_main(["train", *common, "--eval-every", "2", "--max-steps", "4", "--out-dir", str(run)], capsys)[0] == 0
    import hashlib

    listed = checkpoint.read_checksums(run)
    assert set(listed) == {"ckpt.pt", "ckpt.prev.pt", "model.safetensors"}
    for name, digest in listed.items():
        assert hashlib.sha256((run / name).read_bytes()).hexdigest() == digest
    assert torch.load(run / "ckpt.prev.pt", weights_only=True)["step"] == 2


def test_save_keeps_the_previous_until_the_new_one_verifies(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "ckpt.pt"
    checkpoint.save_checkpoint(path, {"model": {"w": torch.ones(3)}, "model_config": {}, "step": 1})
    real_sha = checkpoint.file_sha256
    monkeypatch.setattr(checkpoint, "file_sha256", lambda p: "0" * 64 if str(p).endswith(".tmp") else real_sha(p))
    with pytest.raises(checkpoint.CheckpointError, match="did not verify"):
        checkpoint.save_checkpoint(path, {"model": {"w": torch.zeros(3)}, "model_config": {}, "step": 2})
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checksums.sha256", "ckpt.pt"]
    assert checkpoint.load_checkpoint(tmp_path)["step"] == 1


def test_a_damaged_latest_is_never_kept_as_the_previous(tmp_path: Path, capsys) -> None:
    path = tmp_path / "ckpt.pt"
    for step in (1, 2):
        checkpoint.save_checkpoint(path, {"model": {"w": torch.full((512,), float(step))}, "model_config": {}, "step": step})
    zero_block(path, 0.3, 256)
    checkpoint.save_checkpoint(path, {"model": {"w": torch.full((512,), 3.0)}, "model_config": {}, "step": 3})
    assert checkpoint.load_checkpoint(tmp_path)["step"] == 3
    assert checkpoint.load_checkpoint(tmp_path / "ckpt.prev.pt")["step"] == 1  # not the damaged step 2


# ----------------------------------------------------------------------------- 5, 6: run folders


def test_folder_of_a_run_without_checkpoint_is_refused(common: list[str], tmp_path: Path, capsys) -> None:
    run = tmp_path / "run"
    args = ["train", *common, "--max-steps", "2", "--no-save-checkpoints", "--out-dir", str(run)]
    assert run_main(args, capsys)[0] == 0
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    code, _, err = run_main(args, capsys)
    assert_one_line_error(code, err, str(run), "not empty", "config.toml")
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before
    code, _, err = run_main(["train", "--resume", str(run)], capsys)
    assert_one_line_error(code, err, "no ckpt.pt")


def _interrupt_at(monkeypatch: pytest.MonkeyPatch, step: int) -> None:
    """Ctrl-C as the trainer starts step ``step`` + 1."""
    real = Trainer.train_step

    def train_step(self) -> None:
        if self.step == step:
            raise KeyboardInterrupt
        real(self)

    monkeypatch.setattr(Trainer, "train_step", train_step)


def test_ctrl_c_before_the_first_checkpoint_leaves_a_run_that_resume_starts_over(
        common: list[str], tmp_path: Path, capsys, monkeypatch: pytest.MonkeyPatch) -> None:
    """Interrupted before any checkpoint, the message says so (it claimed a checkpoint was
    intact) and ``--resume`` trains the run from step 0 in its own folder, as if uninterrupted."""
    flags = ["--max-steps", "6", "--ckpt-every", "4", "--eval-every", "3"]
    run = tmp_path / "run"
    with monkeypatch.context() as m:
        _interrupt_at(m, 2)
        code, _, err = run_main(["train", *common, *flags, "--out-dir", str(run)], capsys)
    assert code == 130
    assert err.count("\n") == 1 and "before its first checkpoint" in err and f"--resume {run}" in err, err
    assert not (run / "ckpt.pt").exists()
    code, out, err = run_main(["train", "--resume", str(run)], capsys)
    assert code == 0, err
    assert "no checkpoint yet" in out
    assert train_steps(run) == list(range(1, 7))
    assert [r["step"] for r in rows(run) if r["kind"] == "eval"] == [0, 3, 6]
    want = reference(common, tmp_path, capsys, *flags)
    assert {r["step"]: r["loss"] for r in rows(run) if r["kind"] == "train"} == pytest.approx(want, rel=1e-5)


def test_ctrl_c_after_a_checkpoint_names_it(common: list[str], tmp_path: Path, capsys,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    run = tmp_path / "run"
    with monkeypatch.context() as m:
        _interrupt_at(m, 5)
        code, _, err = run_main(["train", *common, "--max-steps", "8", "--ckpt-every", "4", "--out-dir", str(run)], capsys)
    assert code == 130 and err.count("\n") == 1, err
    assert "step-4 checkpoint" in err and f"--resume {run}" in err, err
    assert run_main(["train", "--resume", str(run)], capsys)[0] == 0
    assert train_steps(run) == list(range(1, 9))


def test_an_empty_or_new_out_dir_is_fine(make_cfg, tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    assert train(make_cfg(out_dir=str(tmp_path / "empty"), max_steps=1), verbose=False).steps_done == 1
    assert train(make_cfg(out_dir=str(tmp_path / "new" / "deeper"), max_steps=1), verbose=False).steps_done == 1


def test_saved_config_starts_a_new_run(common: list[str], tmp_path: Path, capsys, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    run = tmp_path / "first"
    assert run_main(["train", *common, "--max-steps", "2", "--lr", "0.004", "--out-dir", str(run)], capsys)[0] == 0
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    code, out, err = run_main(["train", "--config", str(run / "config.toml")], capsys)
    assert code == 0, err
    new = [p for p in (tmp_path / "runs").iterdir()]
    assert len(new) == 1 and re.fullmatch(r"tiny-\d{8}-\d{6}", new[0].name)
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before
    again = checkpoint.load_checkpoint(new[0])["train_config"]
    first = checkpoint.load_checkpoint(run)["train_config"]
    assert again["training"] == first["training"] and again["model"] == first["model"]  # same settings, lr included


# ----------------------------------------------------------------------------- 7: bad input


def test_single_binary_data_file_is_refused(tmp_path: Path, capsys) -> None:
    blob = tmp_path / "model.onnx"
    blob.write_bytes(bytes(range(256)) * 64)
    code, _, err = run_main(["train", "--data", str(blob), "--cache-dir", str(tmp_path), "--out-dir", str(tmp_path / "r")], capsys)
    assert_one_line_error(code, err, str(blob), "not text")
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("flags, needle", [(["--temperature", "-1"], "--temperature"), (["--temperature", "nan"], "--temperature"),
                                           (["--top-k", "-3"], "--top-k"), (["--max-new-tokens", "0"], "--max-new-tokens")])
def test_generate_refuses_meaningless_sampling(common: list[str], tmp_path: Path, capsys, flags: list[str], needle: str) -> None:
    run = tmp_path / "run"
    assert run_main(["train", *common, "--max-steps", "1", "--out-dir", str(run)], capsys)[0] == 0
    code, _, err = run_main(["generate", "--ckpt", str(run), *flags], capsys)
    assert_one_line_error(code, err, needle, flags[1])


# ----------------------------------------------------------------------------- 10: help and version


def test_train_help_shows_every_default_in_groups(capsys) -> None:
    code, out, _ = run_main(["train", "--help"], capsys)
    assert code == 0
    from sparsetrain.config import ModelConfig, TrainConfig, build_config
    import dataclasses

    tiny = build_config("tiny")
    names = [f.name for f in dataclasses.fields(ModelConfig)] + [f.name for f in dataclasses.fields(TrainConfig) if f.name != "model"]
    entries: dict[str, str] = {}  # first option string -> its whole (unwrapped) help entry
    for line in out.splitlines():
        if line.startswith("  -"):
            current = line.split()[0].rstrip(",")
            entries[current] = line
        elif line.startswith("      ") and entries:
            entries[current] += " " + line.strip()
    for name in names:
        flag = "--" + name.replace("_", "-")
        value = getattr(tiny.model, name) if hasattr(tiny.model, name) else getattr(tiny, name)
        shown = ("on" if value else "off") if isinstance(value, bool) else repr(value) if value == "" else str(value)
        m = re.search(r"\(default: ([^)]*)\)$", entries[flag])
        assert m and m.group(1) == shown, (flag, entries[flag], shown)
    headings = [ln for ln in out.splitlines() if ln and not ln.startswith(" ") and ln.endswith(":")]
    assert len(headings) >= 8 and all(h.count("[") == 1 for h in headings if h != "options:"), headings
    assert len(out.splitlines()[0]) < 110  # the usage line is not the 78-flag list


def test_version(capsys) -> None:
    import sparsetrain

    code, out, _ = run_main(["--version"], capsys)
    assert code == 0 and out.strip() == f"sparsetrain {sparsetrain.__version__}"


def test_generate_options_have_help(capsys) -> None:
    code, out, _ = run_main(["generate", "--help"], capsys)
    assert code == 0
    for flag in ("--ckpt", "--prompt", "--max-new-tokens", "--temperature", "--top-k", "--seed", "--device"):
        line = next(ln for ln in out.splitlines() if ln.strip().startswith(flag))
        assert len(line.split(None, 2)) == 3 or flag == "--ckpt", line  # flag, metavar, help


def test_errors_name_the_toml_key_when_it_came_from_a_file(tmp_path: Path, capsys) -> None:
    f = tmp_path / "c.toml"
    f.write_text("[training]\nlr = -2.0\n")
    code, _, err = run_main(["train", "--config", str(f), "--dry-run"], capsys)
    assert_one_line_error(code, err, "training.lr must be", "-2.0")
    code, _, err = run_main(["train", "--config", str(f), "--lr", "-3", "--dry-run"], capsys)
    assert_one_line_error(code, err, "--lr must be", "-3.0")


def test_dry_run_prints_the_config_and_writes_nothing(tmp_path: Path, capsys, monkeypatch: pytest.MonkeyPatch) -> None:
    import tomllib

    monkeypatch.chdir(tmp_path)
    code, out, _ = run_main(["train", "--dry-run", "--lr", "0.0123", "--n-layer", "3"], capsys)
    assert code == 0
    data = tomllib.loads(out)
    assert data["training"]["lr"] == 0.0123 and data["model"]["n_layer"] == 3
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- 11: weights-only file


def test_generate_reads_the_weights_only_file(common: list[str], tmp_path: Path, capsys) -> None:
    run = tmp_path / "run"
    assert run_main(["train", *common, "--max-steps", "3", "--out-dir", str(run)], capsys)[0] == 0
    w = checkpoint.load_weights(run / "model.safetensors")
    full = checkpoint.load_checkpoint(run)
    assert w.step == full["step"] == 3 and w.model_config == full["model_config"]
    assert w.tensors.keys() == full["model"].keys()
    for k, v in full["model"].items():
        assert torch.equal(w.tensors[k], v), k
    assert (run / "model.safetensors").stat().st_size < 0.5 * (run / "ckpt.pt").stat().st_size  # no AdamW moments
    sample = ["generate", "--prompt", "def", "--max-new-tokens", "10", "--seed", "3"]
    code, from_full, _ = run_main([*sample, "--ckpt", str(run / "ckpt.pt")], capsys)
    assert code == 0
    (run / "ckpt.pt").unlink()
    (run / "ckpt.prev.pt").unlink(missing_ok=True)
    code, from_weights, err = run_main([*sample, "--ckpt", str(run)], capsys)
    assert code == 0 and from_weights == from_full, err


def test_damaged_weights_file_falls_back_to_the_checkpoint(common: list[str], tmp_path: Path, capsys) -> None:
    run = tmp_path / "run"
    assert run_main(["train", *common, "--max-steps", "2", "--out-dir", str(run)], capsys)[0] == 0
    sample = ["generate", "--ckpt", str(run), "--max-new-tokens", "8"]
    code, good, _ = run_main(sample, capsys)
    zero_block(run / "model.safetensors", 0.6, 512)
    code, out, err = run_main(sample, capsys)
    assert code == 0 and out == good
    assert len(err.strip().splitlines()) == 1 and "model.safetensors is damaged" in err


def test_tied_embeddings_round_trip_through_the_weights_file(make_cfg, tmp_path: Path) -> None:
    from sparsetrain.generate import load_model

    cfg = make_cfg(max_steps=1, tie_embeddings=True)
    train(cfg, verbose=False)
    a = load_model(cfg.out_dir)
    b = load_model(Path(cfg.out_dir) / "ckpt.pt")
    for (k, v), (_, u) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(v, u), k


# ----------------------------------------------------------------------------- NaN / Inf


def poison(monkeypatch: pytest.MonkeyPatch, at_step: int, how: str) -> None:
    """Before the step that starts at ``at_step``, make the weights (``weights``) or the
    gradients (``grads``) NaN."""
    real = Trainer.train_step

    def step(self):
        if self.step == at_step:
            p = next(self.model.parameters())
            if how == "weights":
                with torch.no_grad():
                    p.view(-1)[0] = float("nan")
            else:
                p.register_hook(lambda g: g * float("nan"))
        return real(self)

    monkeypatch.setattr(Trainer, "train_step", step)


@pytest.mark.parametrize("how, bad", [("weights", "loss nan"), ("grads", "grad norm nan")])
def test_divergence_names_the_step_and_keeps_the_last_good_checkpoint(
        common: list[str], tmp_path: Path, capsys, monkeypatch: pytest.MonkeyPatch, how: str, bad: str) -> None:
    run = tmp_path / "run"
    poison(monkeypatch, 5, how)
    code, _, err = run_main(["train", *common, "--max-steps", "8", "--ckpt-every", "2", "--out-dir", str(run)], capsys)
    assert_one_line_error(code, err, bad, "at step 6", "last good checkpoint (step 4)")
    state = checkpoint.load_checkpoint(run)
    assert state["step"] == 4
    assert all(torch.isfinite(v).all() for v in state["model"].values())
    assert checkpoint.load_weights(run / "model.safetensors").step == 4
    monkeypatch.undo()
    code, out, _ = run_main(["train", "--resume", str(run)], capsys)
    assert code == 0 and "steps 4 -> 8" in out
    assert train_steps(run) == list(range(1, 9))


def test_nan_weights_are_never_saved(make_cfg) -> None:
    t = Trainer(make_cfg(max_steps=4), verbose=False)
    t.train_step()
    t.save()
    with torch.no_grad():
        next(t.model.parameters()).view(-1)[0] = float("inf")
    t.step += 1
    with pytest.raises(DivergedError, match=r"weights hold NaN or Inf after step 2.*last good checkpoint \(step 1\)"):
        t.save()
    assert checkpoint.load_checkpoint(t.out_dir)["step"] == 1


# ----------------------------------------------------------------------------- 12: TensorBoard, W&B


def test_report_to_missing_package_is_one_line(common: list[str], tmp_path: Path, capsys,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    from sparsetrain import reporting

    real = reporting.importlib.util.find_spec
    monkeypatch.setattr(reporting.importlib.util, "find_spec", lambda name: None if name in ("tensorboard", "wandb") else real(name))
    for choice, package in (("tensorboard", "tensorboard"), ("wandb", "wandb"), ("all", "tensorboard")):
        run = tmp_path / choice
        code, _, err = run_main(["train", *common, "--max-steps", "1", "--report-to", choice, "--out-dir", str(run)], capsys)
        assert_one_line_error(code, err, f"--report-to {choice} needs", f"pip install {package}")
        assert not run.exists()


def test_tensorboard_gets_every_logged_row(common: list[str], tmp_path: Path, capsys) -> None:
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    code, _, err = run_main(["train", *common, "--max-steps", "4", "--eval-every", "2", "--report-to", "tensorboard",
                             "--out-dir", str(run)], capsys)
    assert code == 0, err
    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    loss = {e.step: e.value for e in acc.Scalars("train/loss")}
    val = {e.step: e.value for e in acc.Scalars("eval/val_loss")}
    want = {r["step"]: r["loss"] for r in rows(run) if r["kind"] == "train"}
    assert loss == pytest.approx(want, rel=1e-6)  # float32 in the event file
    assert val == pytest.approx({r["step"]: r["val_loss"] for r in rows(run) if r["kind"] == "eval"}, rel=1e-6)
    assert {e.step for e in acc.Scalars("train/lr")} == set(want)
    zero_block(run / "ckpt.pt")  # resumed from step 2: the rows after it are dropped from the log, and from TensorBoard
    assert run_main(["train", "--resume", str(run), "--max-steps", "6"], capsys)[0] == 0
    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    steps = [e.step for e in acc.Scalars("train/loss")]
    assert sorted(steps) == list(range(1, 7)) == train_steps(run)
    assert {e.step: e.value for e in acc.Scalars("train/loss")} == pytest.approx(
        {r["step"]: r["loss"] for r in rows(run) if r["kind"] == "train"}, rel=1e-6)


def fake_wandb(monkeypatch: pytest.MonkeyPatch) -> list:
    """A stand-in ``wandb`` module that records what the reporter asks of it."""
    calls: list = []

    class Run:
        def log(self, data, step):
            calls.append(("log", step, data))

        def finish(self):
            calls.append(("finish",))

    mod = types.ModuleType("wandb")
    mod.__spec__ = importlib.machinery.ModuleSpec("wandb", None)
    mod.init = lambda **kw: calls.append(("init", kw)) or Run()
    monkeypatch.setitem(sys.modules, "wandb", mod)
    return calls


def test_wandb_offline_without_key_and_same_run_on_resume(common: list[str], tmp_path: Path, capsys,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    calls = fake_wandb(monkeypatch)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    run = tmp_path / "run"
    code, _, err = run_main(["train", *common, "--max-steps", "4", "--eval-every", "2", "--report-to", "wandb",
                             "--out-dir", str(run)], capsys)
    assert code == 0, err
    init = calls[0][1]
    assert init["mode"] == "offline" and init["dir"] == str(run) and init["config"]["training"]["max_steps"] == 4
    logged = [c for c in calls if c[0] == "log"]
    assert len(logged) == len(rows(run)) and calls[-1] == ("finish",)
    train_logged = {c[1]: c[2]["train/loss"] for c in logged if "train/loss" in c[2]}
    assert train_logged == {r["step"]: r["loss"] for r in rows(run) if r["kind"] == "train"}
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    calls.clear()
    assert run_main(["train", "--resume", str(run), "--max-steps", "5"], capsys)[0] == 0
    assert calls[0][1]["id"] == init["id"] and calls[0][1]["resume"] == "allow" and calls[0][1]["mode"] == "online"


def test_scalars_flatten_nested_rows() -> None:
    from sparsetrain.reporting import scalars

    row = {"kind": "train", "step": 3, "loss": 2.5, "sparse24": {"kept": 0.5, "backend": "cslt"},
           "mtp_losses": [1.0, float("nan")], "healthy": True}
    assert scalars(row) == {"train/loss": 2.5, "train/sparse24/kept": 0.5, "train/mtp_losses/1": 1.0}


# ----------------------------------------------------------------------------- selection: NaN / Inf logits


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_selection_refuses_non_finite_logits(bad: float) -> None:
    from sparsetrain.selection import CGGRLoss, TokenSelector, score_tokens

    logits = torch.randn(2, 5, 11)
    targets = torch.randint(0, 11, (2, 5))
    logits[1, 2, 4] = bad
    with pytest.raises(DivergedError, match=r"1 of 10 scored tokens"):
        score_tokens("loss", logits, targets)
    with pytest.raises(DivergedError, match="NaN or Inf"):
        TokenSelector(score="entropy", method="topk", keep_ratio=0.5)(logits, targets)
    with pytest.raises(DivergedError, match="NaN or Inf"):
        CGGRLoss(scoring="combined", selection="stratified", warmup_steps=0)(logits, targets)


def test_selection_accepts_masked_vocab_and_ignores_ignored_rows() -> None:
    """-inf entries (a masked vocabulary) are legitimate; a NaN row whose target is ignored is never scored."""
    from sparsetrain.selection import score_tokens

    logits = torch.randn(3, 7, dtype=torch.float64)
    logits[:, 5] = float("-inf")
    targets = torch.tensor([0, 1, -100])
    logits[2] = float("nan")
    scores, _ = score_tokens("loss", logits, targets)
    ref = -torch.log_softmax(logits[:2], -1).gather(1, targets[:2, None]).squeeze(1)
    assert torch.allclose(scores[:2], ref) and scores[2] == float("-inf")


def test_deferred_nonfinite_count_raises_on_the_first_read() -> None:
    """On CUDA the count stays on the device (no sync in the step); reading the stats raises."""
    from sparsetrain.selection import SelectionStats

    stats = SelectionStats(kept=torch.tensor(3), total=10, avg_entropy=torch.tensor(1.5), nonfinite=torch.tensor(2))
    with pytest.raises(DivergedError, match="NaN or Inf in 2 of 10 scored tokens"):
        stats.avg_entropy
    fine = SelectionStats(kept=torch.tensor(3), total=10, avg_entropy=torch.tensor(1.5), nonfinite=torch.tensor(0))
    assert fine.kept == 3 and fine.avg_entropy == 1.5


def test_ctrl_c_in_a_race_names_the_interrupted_runs_checkpoint(common: list[str], tmp_path: Path, capsys,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """Ctrl-C in a race's arm says which run was cut short and the step of the checkpoint
    it keeps (what the race's next start continues from), then how to continue the race."""
    out = tmp_path / "race"
    argv = ["race", *common, "--seconds", "60", "--max-steps", "6", "--schedule-by", "steps", "--ckpt-every", "2", "--out-dir", str(out),
            "--arm", "a:", "--arm", "b:lr=1e-3"]
    with monkeypatch.context() as m:
        _interrupt_at(m, 3)
        code, _, err = run_main(argv, capsys)
    assert code == 130 and err.count("\n") == 1, err
    first = out / "a" / "seed1337"
    assert (f"the interrupted run in {first} keeps its step-2 checkpoint; the finished runs in {out} are kept; "
            f"the same race with --out-dir {out} continues it") in err, err
