"""Command line: bad input gives one line naming the problem and exit code 2;
train -> generate works end to end."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from sparsetrain.cli import main

SMALL = ["--vocab-size", "320", "--seq-len", "32", "--n-layer", "1", "--n-head", "2", "--d-model", "32",
         "--batch-size", "2", "--device", "cpu", "--eval-batches", "1", "--val-fraction", "0.1"]


def run_main(args: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str, str]:
    try:
        code = main(args)
    except SystemExit as e:  # argparse usage errors
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code: int, err: str, *needles: str) -> None:
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("sparsetrain") and "error" in lines[0]
    for n in needles:
        assert n in lines[0], lines[0]


def test_train_then_generate_then_resume(corpus_dir: Path, cache_dir: Path, tmp_path: Path, capsys) -> None:
    run = tmp_path / "run"
    common = SMALL + ["--data", str(corpus_dir), "--cache-dir", str(cache_dir)]
    code, out, _ = run_main(["train", *common, "--max-steps", "4", "--out-dir", str(run)], capsys)
    assert code == 0 and "final val loss" in out
    code, out, _ = run_main(["generate", "--ckpt", str(run), "--prompt", "def", "--max-new-tokens", "12"], capsys)
    assert code == 0 and out.startswith("def") and len(out) > 4
    # --num-samples 3 in one batch: sample i is what --seed 5 + i prints alone
    code, many, _ = run_main(["generate", "--ckpt", str(run), "--prompt", "def", "--max-new-tokens", "12",
                              "--num-samples", "3", "--seed", "5"], capsys)
    alone = [run_main(["generate", "--ckpt", str(run), "--prompt", "def", "--max-new-tokens", "12", "--seed", str(5 + i)],
                      capsys)[1] for i in range(3)]
    assert code == 0 and many == "".join(f"--- sample {i} (seed {5 + i}) ---\n{a}" for i, a in enumerate(alone))
    assert len(set(alone)) > 1
    code, out, _ = run_main(["train", "--resume", str(run), "--max-steps", "6"], capsys)
    assert code == 0 and "steps 4 -> 6" in out


def test_resnet_bk_trains_and_generates_from_the_cli(corpus_dir: Path, cache_dir: Path, tmp_path: Path, capsys) -> None:
    run = tmp_path / "bk"
    common = SMALL + ["--data", str(corpus_dir), "--cache-dir", str(cache_dir), "--model", "resnet_bk", "--bk-num-experts", "2"]
    code, out, _ = run_main(["train", *common, "--bk-sparsity", "0.5", "--max-steps", "3", "--out-dir", str(run)], capsys)
    assert code == 0 and "final val loss" in out
    code, out, _ = run_main(["generate", "--ckpt", str(run), "--prompt", "def", "--max-new-tokens", "8"], capsys)
    assert code == 0 and out.startswith("def")


@pytest.mark.parametrize(
    "args, needles",
    [
        (["train", "--preset", "huge"], ["invalid choice", "huge"]),
        (["train", "--lr", "fast"], ["--lr", "fast"]),
        (["train", "--lr", "-1"], ["--lr must be", "-1"]),
        (["train", "--n-head", "3"], ["d_model", "--n-head (3)"]),
        (["train", "--data", "/no/such/path"], ["/no/such/path"]),
        (["train", "--config", "/no/such.toml"], ["/no/such.toml"]),
        (["train", "--resume", "/no/such/run"], ["/no/such/run"]),
        (["generate", "--ckpt", "/no/such/run"], ["/no/such/run"]),
        (["generate", "--ckpt", ".", "--max-new-tokens", "0"], ["--max-new-tokens", "0"]),
        (["bench", "step", "--seq-len", "0"], ["--seq-len", "0"]),
        (["bench", "step", "--batch-size", "99999999999999999999"], ["--batch-size must be in", "99999999999999999999"]),
        (["train", "--seq-len", "99999999999999999999"], ["--seq-len must be <=", "99999999999999999999"]),
        (["train", "--eval-batches", "99999999999999999999"], ["--eval-batches must be <=", "99999999999999999999"]),
        (["race-merge", "--out-dir", "x", "--arms", "a,,", "race.json"], ["--arms 'a,,' has an empty item"]),
        (["frobnicate"], ["frobnicate"]),
        (["train", "--drop-ratio", "1.5"], ["--drop-ratio must be in [0, 1)", "1.5"]),
        (["train", "--model", "rnn"], ["--model", "rnn"]),
        (["train", "--model", "resnet_bk", "--bk-sparsity", "1"], ["--bk-sparsity must be", "1"]),
        (["train", "--model", "resnet_bk", "--drop-ratio", "0.5"], ["--model resnet_bk", "--drop-ratio"]),
        (["train", "--ffn", "relu2_24", "--activation-sparse-method", "random"], ["--activation-sparse-method must be", "random"]),
    ],
)
def test_bad_input_one_line_exit_2(args: list[str], needles: list[str], capsys) -> None:
    code, _, err = run_main(args, capsys)
    assert_one_line_error(code, err, *needles)


def test_bad_config_key_in_file(tmp_path: Path, capsys) -> None:
    f = tmp_path / "c.toml"
    f.write_text("[training]\nlearning_rate = 1e-3\n")
    code, _, err = run_main(["train", "--config", str(f)], capsys)
    assert_one_line_error(code, err, "training.learning_rate", str(f))


def test_empty_corpus(tmp_path: Path, capsys) -> None:
    (tmp_path / "empty").mkdir()
    code, _, err = run_main(["train", "--data", str(tmp_path / "empty"), "--cache-dir", str(tmp_path)], capsys)
    assert_one_line_error(code, err, "empty")


def test_checkpoint_from_another_model_keeps_files(corpus_dir: Path, cache_dir: Path, tmp_path: Path, capsys) -> None:
    run = tmp_path / "run"
    common = SMALL + ["--data", str(corpus_dir), "--cache-dir", str(cache_dir)]
    assert run_main(["train", *common, "--max-steps", "2", "--out-dir", str(run)], capsys)[0] == 0
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    code, _, err = run_main(["train", "--resume", str(run), "--d-model", "64"], capsys)
    assert_one_line_error(code, err, "another model", "d_model=32 there vs 64 here")
    code, _, err = run_main(["train", *common, "--out-dir", str(run)], capsys)
    assert_one_line_error(code, err, "already holds a checkpoint")
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before
    (tmp_path / "fake.pt").write_bytes(b"garbage")
    code, _, err = run_main(["generate", "--ckpt", str(tmp_path / "fake.pt")], capsys)
    assert_one_line_error(code, err, "cannot read checkpoint")


def test_real_process_exit_code_and_no_traceback(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "sparsetrain", "train", "--data", str(tmp_path / "missing")],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip() == f"sparsetrain: error: data path does not exist: {tmp_path / 'missing'}"


@pytest.mark.parametrize("argv", [["info"], ["train", "--help"], ["race-merge", "a.json", "b.json", "--out-dir", "x"]])
def test_a_bad_environment_variable_is_one_line_before_any_command(argv: list[str], monkeypatch, capsys) -> None:
    """The flags' defaults read SPARSETRAIN_* variables while the parser is built, before
    any command (even --help): a bad value is one line naming the variable, exit 2."""
    monkeypatch.setenv("SPARSETRAIN_ATTENTION_IMPL", "fastest")
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines() == [
        "sparsetrain: error: kernels.attention_impl (default: $SPARSETRAIN_ATTENTION_IMPL) must be one of auto, "
        "cudnn, flash, recompute, got 'fastest'"], err


@pytest.mark.parametrize("command", [["bench", "step", "--preset", "tiny"], ["eval", "--ckpt", "RUN"],
                                     ["grpo", "--ckpt", "RUN"]], ids=["bench", "eval", "grpo"])
def test_an_output_file_that_cannot_be_written_is_refused_before_the_work(command: list[str], tmp_path: Path,
                                                                          capsys) -> None:
    """``--json`` is written after the work: a path that is a folder, or whose folder
    cannot be made (a file stands there), is one line before anything runs."""
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    argv = [str(tmp_path / "missing_run") if a == "RUN" else a for a in command]
    assert main([*argv, "--json", str(blocker / "x.json")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"sparsetrain: error: --json {blocker / 'x.json'} cannot be written"), err
    assert main([*argv, "--json", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip() == f"sparsetrain: error: --json {tmp_path} is a folder; give a file path"


@pytest.mark.parametrize("other, flag", [(["--no-use-collider"], "--no-use-collider"),
                                         (["--collider-sparsity", "0.3"], "--collider-sparsity")])
def test_drop_ratio_beside_a_flag_it_would_override_is_refused(other: list[str], flag: str, capsys) -> None:
    """``--drop-ratio R`` sets use_collider and collider_sparsity: beside a flag that sets
    either otherwise it is one line naming the flag, not a silent winner."""
    assert main(["train", "--preset", "tiny", "--dry-run", "--drop-ratio", "0.5", *other]) == 2
    assert capsys.readouterr().err.strip() == ("sparsetrain: error: --drop-ratio 0.5 sets use_collider and "
                                               f"collider_sparsity: drop {flag}")
    assert main(["train", "--preset", "tiny", "--dry-run", "--drop-ratio", "0.5", "--use-collider"]) == 0
    assert "collider_sparsity = 0.5" in capsys.readouterr().out


def test_info_runs(capsys) -> None:
    code, out, _ = run_main(["info"], capsys)
    assert code == 0 and "torch" in out and "cuda_available" in out


@pytest.mark.parametrize("argv, needle", [
    (["generate", "--ckpt", "RUN", "--seed", "99999999999999999999"], "--seed must be in [0, 9223372036854775808)"),
    (["eval", "--ckpt", "RUN", "--seed", "-1"], "--seed must be in [0, 9223372036854775808)"),
    (["grpo", "--ckpt", "RUN", "--seed", str(2**62 - 2), "--seeds", "3"], "--seed must be in [0, 4611686018427387902)"),
    (["eval", "--ckpt", "RUN", "--device", "foo"], "device must be auto, cpu, cuda or cuda:N, got 'foo'"),
    (["generate", "--ckpt", "RUN", "--prompt", "def \udcff"], "--prompt is not UTF-8 text"),
    (["generate", "--ckpt", "RUN", "--num-samples", "0"], "--num-samples must be in [1, 1024], got 0"),
    (["generate", "--ckpt", "RUN", "--num-samples", "5000"], "--num-samples must be in [1, 1024], got 5000"),
    (["generate", "--ckpt", "RUN", "--num-samples", "3", "--seed", str(2**63 - 2)],
     "--seed must be in [0, 9223372036854775806)"),
])
def test_sampling_commands_refuse_bad_seeds_devices_and_prompts(argv: list[str], needle: str, capsys) -> None:
    """Seeds outside what the generators take, an unknown device and a prompt of bytes that
    are not UTF-8 ended in tracebacks (or, for the device, in a line blaming the checkpoint):
    one line each now, before any checkpoint is read (RUN does not exist)."""
    code, _, err = run_main(argv, capsys)
    assert_one_line_error(code, err, needle)


@pytest.mark.parametrize("flags, needle", [(["--out-dir", "elsewhere"], "--out-dir elsewhere with --resume"),
                                           (["--preset", "d20", "--dry-run"], "--preset d20 with --resume")])
def test_resume_refuses_a_new_folder_or_preset(flags: list[str], needle: str, tmp_path: Path, capsys) -> None:
    """--resume trained into the run's folder whatever --out-dir said, and recorded a
    --preset that did not change the model: both refused in one line."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.toml").write_text('[model]\npreset = "tiny"\n')
    code, _, err = run_main(["train", "--resume", str(run), *flags], capsys)
    assert_one_line_error(code, err, needle)
    assert not (tmp_path / "elsewhere").exists()


def test_a_batch_too_large_for_memory_is_one_line(corpus_dir: Path, cache_dir: Path, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    import torch

    import sparsetrain.trainer

    common = [*SMALL, "--data", str(corpus_dir), "--cache-dir", str(cache_dir), "--max-steps", "1"]
    for big in (10**12, 10**20):  # 10**20: past numpy's index range, a ValueError there
        code, _, err = run_main(["train", *common, "--out-dir", str(tmp_path / "a"), "--batch-size", str(big)], capsys)
        assert_one_line_error(code, err, f"--batch-size {big} with --seq-len 32", "do not fit in memory")
    assert "Traceback" not in err

    # the step itself (the model's activations on the device) runs out of memory
    def out_of_memory(self):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB. GPU 0 has a total capacity of "
                                     "79.19 GiB of which 1.2 GiB is free.\nIncluding non-PyTorch memory ...")

    monkeypatch.setattr(sparsetrain.trainer.Trainer, "train_step", out_of_memory)
    code, _, err = run_main(["train", *common, "--out-dir", str(tmp_path / "b"), "--batch-size", "4"], capsys)
    assert_one_line_error(code, err, "--batch-size 4 with --seq-len 32", "step 1 does not fit in memory", "20.00 GiB")

    def unrelated(self):
        raise RuntimeError("expected all tensors to be on the same device")

    monkeypatch.setattr(sparsetrain.trainer.Trainer, "train_step", unrelated)
    with pytest.raises(RuntimeError, match="same device"):  # not taken for a memory error
        main(["train", *common, "--out-dir", str(tmp_path / "c")])

    # memory that runs out outside the step (reading a corpus too large) is not the batch's
    def corpus_too_large(*a, **k):
        raise MemoryError()

    monkeypatch.setattr(sparsetrain.trainer, "load_run_corpus", corpus_too_large)
    code, _, err = run_main(["train", *common, "--out-dir", str(tmp_path / "d")], capsys)
    assert_one_line_error(code, err, "out of memory")
    assert "--batch-size" not in err


@pytest.mark.parametrize("message, expected", [
    ("training.lr must be > 0", "--lr must be > 0"),
    ("lr = 0.5 is too large", "--lr 0.5 is too large"),
    ("the folder holds config.toml, data.json, loss.png", "the folder holds config.toml, data.json, loss.png"),
    ("data /x does not exist; data.val_fraction too", "--data /x does not exist; data.val_fraction too"),
    ("min_lr_ratio and lr.", "min_lr_ratio and --lr."),
    ("data /tmp/data/x.bin and runs/lr/ckpt.pt and C:\\data\\lr", "--data /tmp/data/x.bin and runs/lr/ckpt.pt and C:\\data\\lr"),
    ("arm 'x:lr=1,data=/d' is bad", "arm 'x:lr=1,data=/d' is bad"),
])
def test_errors_name_the_flags_typed_but_not_inside_other_names(message: str, expected: str) -> None:
    """A config key the user typed as a flag is written as that flag; the same letters
    inside a file name (data.json) or a longer key (min_lr_ratio) are left alone."""
    from sparsetrain.cli import name_typed

    assert name_typed(message, {"lr": "--lr", "data": "--data"}) == expected


@pytest.mark.parametrize("flags, named", [
    (["--collider-sparsity", "0.5"], "--collider-sparsity has no effect while use_collider is off"),
    (["--collider-method", "random", "--collider-score", "loss"], "--collider-score, --collider-method have no effect"),
    (["--mtp-n-tokens", "3"], "--mtp-n-tokens has no effect while use_mtp is off"),
    (["--async-n-workers", "4"], "--async-n-workers has no effect while use_async_loader is off"),
    (["--keep-ratio", "0.3"], "--keep-ratio has no effect while selection is none"),
    (["--selection-warmup-steps", "200"], "--selection-warmup-steps has no effect while no token filter is on"),
    (["--muon-lr", "0.05"], "--muon-lr has no effect while optimizer is not muon"),
    (["--optimizer", "muon", "--galore-rank", "64"], "--galore-rank has no effect while --optimizer is not galore_adamw"),
    (["--hyper-write-init", "next_stream"], "--hyper-write-init has no effect while hyper_connections is 0"),
    (["--bk-tau", "2", "--bk-num-experts", "8"], "--bk-num-experts, --bk-tau have no effect while arch is not resnet_bk"),
    (["--compile-mode", "max-autotune"], "--compile-mode has no effect while compile is off"),
    (["--no-save-checkpoints", "--ckpt-every", "5"], "--ckpt-every has no effect while checkpoints are not saved (--no-save-checkpoints)"),
])
def test_a_setting_whose_switch_is_off_is_refused(flags: list[str], named: str, capsys) -> None:
    """A technique's setting typed without the technique on would be ignored (a dense run
    under a name that says Collider): one line naming it and the switch, exit 2."""
    code, out, err = run_main(["train", "--dry-run", *flags], capsys)
    assert_one_line_error(code, err, named)


@pytest.mark.parametrize("flags", [["--drop-ratio", "0.5", "--collider-method", "topk"],
                                   ["--use-collider", "--collider-sparsity", "0.5"], ["--use-mtp", "--mtp-n-tokens", "3"],
                                   ["--selection", "loss", "--keep-ratio", "0.3"], ["--optimizer", "muon", "--muon-lr", "0.05"],
                                   ["--drop-ratio", "0.5", "--selection-warmup-steps", "200"],
                                   ["--hyper-connections", "2", "--hyper-write-init", "next_stream"],
                                   ["--arch", "resnet_bk", "--bk-tau", "2"], ["--compile", "--compile-mode", "max-autotune"],
                                   ["--ckpt-every", "5"]])
def test_a_setting_with_its_switch_on_is_taken(flags: list[str], capsys) -> None:
    code, out, err = run_main(["train", "--dry-run", *flags], capsys)
    assert code == 0 and not err, err
