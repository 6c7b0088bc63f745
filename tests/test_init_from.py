"""init_from: a new run starts from another run's weights, with a fresh optimizer,
step counter and lr schedule; a resume of that run continues from its own checkpoint."""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from sparsetrain.build import build_model, weights_differences
from sparsetrain.cli import main
from sparsetrain.config import ModelConfig, build_config
from sparsetrain.data import join_documents, load_corpus, read_documents, discover_text_files, split_documents
from sparsetrain.errors import CheckpointError, DataError
from sparsetrain.optim import lr_at
from sparsetrain.tokenizer import BPETokenizer
from sparsetrain.trainer import Trainer, train

# the run A's shape and data as flags (the conftest corpus, as make_cfg sets it up)
FLAGS = {"vocab_size": 320, "seq_len": 32, "n_layer": 2, "n_head": 2, "d_model": 32, "batch_size": 4,
         "eval_batches": 2, "val_fraction": 0.1, "warmup_steps": 2, "log_every": 1, "device": "cpu"}
A_STEPS = 6


def _cfg(corpus_dir: Path, cache_dir: Path, out: Path, **kw):
    return build_config("tiny", overrides={"data": str(corpus_dir), "cache_dir": str(cache_dir), "out_dir": str(out),
                                           "max_steps": 4, "eval_every": 2, **FLAGS, **kw})


def _argv(corpus_dir: Path, cache_dir: Path, **kw) -> list[str]:
    out = ["--data", str(corpus_dir), "--cache-dir", str(cache_dir)]
    for k, v in {**FLAGS, **kw}.items():
        flag = k.replace("_", "-")
        out += [f"--{flag}" if v is True else f"--no-{flag}"] if isinstance(v, bool) else [f"--{flag}", str(v)]
    return out


def _rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def run_a(corpus_dir: Path, cache_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run trained a few steps at a high lr, far from any fresh initialisation."""
    out = tmp_path_factory.mktemp("base") / "a"
    train(_cfg(corpus_dir, cache_dir, out, max_steps=A_STEPS, eval_every=3, lr=1e-2), verbose=False)
    return out


@pytest.fixture
def cfg(corpus_dir: Path, cache_dir: Path, tmp_path: Path):
    def make(out: str = "b", **kw):
        return _cfg(corpus_dir, cache_dir, tmp_path / out, **kw)

    return make


@pytest.mark.parametrize("given", ["run directory", "ckpt.pt", "model.safetensors"])
def test_new_run_starts_from_the_final_weights_with_a_fresh_optimizer_step_and_schedule(run_a, cfg, given, capsys) -> None:
    init = {"run directory": run_a, "ckpt.pt": run_a / "ckpt.pt", "model.safetensors": run_a / "model.safetensors"}[given]
    # the reference: A's final weights as its checkpoint files hold them, read without sparsetrain
    final = torch.load(run_a / "ckpt.pt", weights_only=True)
    assert final["step"] == A_STEPS
    assert all(torch.equal(v, load_file(run_a / "model.safetensors")[k]) for k, v in final["model"].items())

    b = Trainer(cfg(init_from=str(init), max_steps=1, lr=1e-3), verbose=True)
    got = b.model.state_dict()
    assert got.keys() == final["model"].keys()
    for k, v in final["model"].items():
        assert torch.equal(got[k], v), k
    fresh = Trainer(cfg("fresh"), verbose=False).model.state_dict()  # the same seed without init_from
    assert not torch.equal(fresh["embed.weight"], got["embed.weight"])
    assert b.step == 0 and len(b.optimizer.state) == 0  # no moments, no step count before the first step
    b.fit()
    said = capsys.readouterr().out
    source = init if given != "run directory" else run_a / "model.safetensors"
    assert f"init: weights from {source} (step {A_STEPS} of that run)\n" in said

    out = Path(b.cfg.out_dir)
    saved = torch.load(out / "ckpt.pt", weights_only=True)
    assert saved["step"] == 1
    assert {int(s["step"]) for s in saved["optimizer"]["state"].values()} == {1}  # AdamW counted one step, not A_STEPS + 1
    train_rows = [r for r in _rows(out) if r["kind"] == "train"]
    assert [r["step"] for r in train_rows] == [1]
    assert train_rows[0]["lr"] == pytest.approx(lr_at(0, 1e-3, 2, 1, 0.1))  # the warmup's first lr: a new schedule
    # the step-0 evaluation is A's last one: the same weights on the same held-out windows
    a_last = [r for r in _rows(run_a) if r["kind"] == "eval"][-1]
    b_first = [r for r in _rows(out) if r["kind"] == "eval"][0]
    assert (a_last["step"], b_first["step"]) == (A_STEPS, 0)
    assert b_first["val_loss"] == a_last["val_loss"]
    assert f'init_from = "{init}"' in (out / "config.toml").read_text()  # recorded: --config on it starts B again


def test_seq_len_may_differ(run_a, cfg) -> None:
    final = torch.load(run_a / "ckpt.pt", weights_only=True)["model"]
    b = Trainer(cfg(init_from=str(run_a), seq_len=16, max_steps=1), verbose=False)
    assert all(torch.equal(b.model.state_dict()[k], v) for k, v in final.items())
    assert b.fit().steps_done == 1  # RoPE tables are rebuilt for the new length, no weight holds them


def test_step_counted_modules_restart_at_step_0(cfg) -> None:
    """A 2:4 FFN saves its step count with the weights; the new run's dense warmup starts again."""
    s24 = dict(ffn="relu2_24", activation_dense_warmup_steps=2, eval_every=0)
    train(cfg("s24", max_steps=4, **s24), verbose=False)
    saved = torch.load(Path(cfg("s24").out_dir) / "ckpt.pt", weights_only=True)["model"]
    assert int(saved["blocks.0.ffn.steps"]) == 4
    b = Trainer(cfg(init_from=cfg("s24").out_dir, **s24), verbose=False)
    assert [(m._steps, int(m.steps), m.sparse) for m in b.sparse_ffns] == [(0, 0, False)] * 2
    assert torch.equal(b.model.blocks[0].ffn.up.weight, saved["blocks.0.ffn.up.weight"])


def assert_one_line_error(code: int, err: str, *needles: str) -> None:
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("sparsetrain: error:") and "Traceback" not in err
    for n in needles:
        assert n in lines[0], lines[0]


@pytest.mark.parametrize("change, needle", [
    ({"d_model": 64, "n_head": 4}, "n_head=2 there vs 4 here, d_model=32 there vs 64 here"),
    ({"n_layer": 3}, "n_layer=2 there vs 3 here"),
    ({"n_head": 4}, "n_head=2 there vs 4 here"),  # the same matrices, split into other heads
    ({"ffn": "swiglu"}, "ffn='relu2' there vs 'swiglu' here"),
    ({"ffn_hidden": 64}, "ffn_hidden=0 (= 128) there vs 64 here"),
    ({"tie_embeddings": True}, "tie_embeddings=False there vs True here"),
])
def test_another_model_is_refused_in_one_line(run_a, corpus_dir, cache_dir, tmp_path, change, needle, capsys) -> None:
    out = tmp_path / "b"
    code = main(["train", *_argv(corpus_dir, cache_dir, **change), "--init-from", str(run_a), "--out-dir", str(out)])
    assert_one_line_error(code, capsys.readouterr().err, f"init_from {run_a} is from another model: {needle}")
    assert not out.exists()  # refused before anything is written


def test_refusal_in_a_real_process_has_no_traceback(run_a, corpus_dir, cache_dir, tmp_path) -> None:
    proc = subprocess.run([sys.executable, "-m", "sparsetrain", "train", *_argv(corpus_dir, cache_dir, d_model=64),
                           "--init-from", str(run_a), "--out-dir", str(tmp_path / "b")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.strip() == (f"sparsetrain: error: init_from {run_a} is from another model: "
                                   "d_model=32 there vs 64 here")


def test_missing_or_empty_init_from_is_refused(corpus_dir, cache_dir, tmp_path, capsys) -> None:
    argv = ["train", *_argv(corpus_dir, cache_dir), "--out-dir", str(tmp_path / "b")]
    code = main(argv + ["--init-from", str(tmp_path / "no" / "such")])
    assert_one_line_error(code, capsys.readouterr().err,
                          f"init_from {tmp_path / 'no' / 'such'}: no such run directory or checkpoint file")
    (tmp_path / "empty").mkdir()
    code = main(argv + ["--init-from", str(tmp_path / "empty")])
    assert_one_line_error(code, capsys.readouterr().err, f"init_from {tmp_path / 'empty'}: no checkpoint at")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    code = main(argv + ["--init-from", str(tmp_path / "junk.pt")])
    assert_one_line_error(code, capsys.readouterr().err, "cannot read checkpoint")
    assert not (tmp_path / "b").exists()


def test_another_tokenizer_is_refused_and_the_base_runs_tokenizer_is_reused(run_a, cfg, tmp_path, capsys) -> None:
    # another split of the corpus trains another BPE: the base's token ids would mean other text
    with pytest.raises(CheckpointError, match=f"init_from {run_a} was trained with another tokenizer") as e:
        Trainer(cfg(init_from=str(run_a), val_fraction=0.2), verbose=False)
    assert str(e.value).endswith(f"(--tokenizer {run_a / 'tokenizer.json'})")  # the fix, named
    # tokenized with the base run's tokenizer.json instead, the corpus reads as the base model's ids
    b = Trainer(cfg(init_from=str(run_a), val_fraction=0.2, tokenizer=str(run_a / "tokenizer.json"), max_steps=1),
                verbose=False)
    b.fit()
    assert (Path(b.cfg.out_dir) / "tokenizer.json").read_bytes() == (run_a / "tokenizer.json").read_bytes()


def test_text_corpus_tokenized_with_a_given_tokenizer(run_a, corpus_dir, tmp_path) -> None:
    tok = BPETokenizer.load(run_a / "tokenizer.json")
    corpus = load_corpus(str(corpus_dir), 320, 0.2, tmp_path / "cache", tokenizer=str(run_a / "tokenizer.json"),
                         verbose=False)
    train_docs, val_docs = split_documents(read_documents(*discover_text_files(str(corpus_dir))), 0.2)
    for got, docs in ((corpus.train, train_docs), (corpus.val, val_docs)):
        want = join_documents([tok.encode(d) for d in docs], tok.eot_id, np.uint16)
        assert np.array_equal(np.asarray(got), want)
    assert corpus.tokenizer_path.read_bytes() == (run_a / "tokenizer.json").read_bytes()
    trained = load_corpus(str(corpus_dir), 320, 0.2, tmp_path / "cache", verbose=False)  # its own cache, its own BPE
    assert trained.tokenizer_path != corpus.tokenizer_path
    assert trained.tokenizer_path.read_bytes() != corpus.tokenizer_path.read_bytes()
    with pytest.raises(DataError, match="has 320 tokens, more than model.vocab_size 300"):
        load_corpus(str(corpus_dir), 300, 0.2, tmp_path / "cache", tokenizer=str(run_a / "tokenizer.json"), verbose=False)
    with pytest.raises(DataError, match="tokenizer file does not exist"):
        load_corpus(str(corpus_dir), 320, 0.2, tmp_path / "cache", tokenizer=str(tmp_path / "none.json"), verbose=False)


def test_resume_continues_from_its_own_checkpoint_not_the_base(run_a, cfg, tmp_path) -> None:
    # the base in a folder of its own, deleted before the resume: a resume must not read it
    base = tmp_path / "base"
    shutil.copytree(run_a, base)
    kw = dict(init_from=str(base), max_steps=6, eval_every=3)
    straight = train(cfg("straight", **kw), verbose=False)
    t = Trainer(cfg(**kw), verbose=False)
    while t.step < 3:
        t.train_step()
    t.save()  # as a killed job leaves it
    del t
    own = torch.load(tmp_path / "b" / "ckpt.pt", weights_only=True)
    a_final = torch.load(run_a / "ckpt.pt", weights_only=True)["model"]
    assert not torch.equal(own["model"]["embed.weight"], a_final["embed.weight"])
    shutil.rmtree(base)

    resumed = Trainer(cfg(**kw), resume=tmp_path / "b", verbose=False)
    assert resumed.step == 3
    for k, v in own["model"].items():
        assert torch.equal(resumed.model.state_dict()[k], v), k
    assert {int(s["step"]) for s in resumed.optimizer.state_dict()["state"].values()} == {3}
    rest = resumed.fit()
    for s in (4, 5, 6):  # exactly the run that was never interrupted
        assert rest.train_losses[s] == pytest.approx(straight.train_losses[s], rel=1e-6, abs=1e-7)


def test_resume_with_another_init_from_is_refused(run_a, corpus_dir, cache_dir, tmp_path, capsys) -> None:
    out = tmp_path / "b"
    argv = _argv(corpus_dir, cache_dir, max_steps=2)
    assert main(["train", *argv, "--init-from", str(run_a), "--out-dir", str(out)]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    capsys.readouterr()
    code = main(["train", "--resume", str(out), "--max-steps", "3", "--init-from", str(tmp_path / "other")])
    assert_one_line_error(code, capsys.readouterr().err, f"cannot resume {out} with init_from",
                          f"it started from '{run_a}'")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert main(["train", "--resume", str(out), "--max-steps", "3"]) == 0  # its own init_from, recorded: fine


def test_race_arms_start_from_the_same_weights(run_a, corpus_dir, cache_dir, tmp_path, capsys) -> None:
    out = tmp_path / "race"
    argv = ["race", "--preset", "tiny", *_argv(corpus_dir, cache_dir), "--init-from", str(run_a), "--out-dir", str(out),
            "--seconds", "0.3", "--arm", "dense:", "--arm", "lowlr:lr=1e-3", "--arm", "scratch:init_from="]
    assert main(argv) == 0
    capsys.readouterr()
    a_final = [r for r in _rows(run_a) if r["kind"] == "eval"][-1]["val_loss"]
    start = {arm: next(r for r in _rows(out / arm / "seed1337") if r["kind"] == "eval") for arm in ("dense", "lowlr", "scratch")}
    assert start["dense"]["step"] == start["lowlr"]["step"] == 0
    assert start["dense"]["val_loss"] == start["lowlr"]["val_loss"] == a_final
    assert start["scratch"]["val_loss"] > a_final + 0.2  # an arm may start fresh: about ln(320) there
    report = json.loads((out / "race.json").read_text())
    assert report["settings"]["base_config"]["training"]["init_from"] == str(run_a)


def test_init_from_an_fsdp_runs_sharded_checkpoint(corpus_dir, cache_dir, tmp_path) -> None:
    """A run that FSDP processes saved (sharded, no ckpt.pt) gives its weights consolidated."""
    from test_fsdp import CKPT_CONFIG, _save_worker, fresh_model, run_workers

    run = tmp_path / "sharded"
    run_workers(2, _save_worker, CKPT_CONFIG, fresh_model(CKPT_CONFIG).state_dict(), str(run))
    saved = torch.load(run / "reference.pt", weights_only=True)["saved"]["model"]  # the full state at the save
    shape = {k: getattr(CKPT_CONFIG, k) for k in ("vocab_size", "seq_len", "n_layer", "n_head", "d_model", "tie_embeddings")}
    b = Trainer(_cfg(corpus_dir, cache_dir, tmp_path / "b", init_from=str(run), **shape), verbose=False)
    assert b.init_note == f"init: weights from {run} (step 1 of that run)"
    got = b.model.state_dict()
    for k, v in saved.items():  # saved in float64, trained here in float32
        assert torch.equal(got[k], v.float()), k


def test_weights_differences_cover_every_field_that_changes_the_weights() -> None:
    """For each model field: a value that changes the state dict's names or shapes is named
    by weights_differences; one that changes neither loads as it is (except n_head and
    tie_embeddings, which change what the same tensors hold)."""
    base = ModelConfig(vocab_size=300, seq_len=16, n_layer=2, n_head=2, d_model=32)
    other = dict(arch="resnet_bk", vocab_size=320, seq_len=32, n_layer=3, n_head=4, d_model=64, ffn="swiglu",
                 ffn_hidden=96, rope_theta=5000.0, norm_eps=1e-5, activation_sparse_method="soft_threshold",
                 activation_dense_warmup_steps=5, activation_dense_fraction=0.1, hyper_connections=2, bk_num_experts=2,
                 bk_sparsity=0.5, bk_sparsity_loss="l1", bk_sparsity_loss_weight=0.2, bk_sparsity_warmup_steps=3,
                 bk_tau=0.5, tie_embeddings=True, init_std=0.01, hyper_write_init="next_stream",
                 hyper_stream_dtype="bfloat16")
    assert set(other) == {f.name for f in dataclasses.fields(ModelConfig)}, "a new model field: give it a value here"

    def layout(c: ModelConfig) -> dict:
        return {k: tuple(v.shape) for k, v in build_model(c).state_dict().items()}

    same_layout_but_other_meaning = {"n_head", "tie_embeddings"}
    for name, value in other.items():
        # each field where it acts: the 2:4 FFN's on a relu2_24 model, ResNet-BK's on that network,
        # the hyper-connections' init and stream dtype on a model with them
        start = (dataclasses.replace(base, ffn="relu2_24") if name.startswith("activation_")
                 else dataclasses.replace(base, arch="resnet_bk") if name.startswith("bk_")
                 else dataclasses.replace(base, hyper_connections=2) if name.startswith("hyper_") and name != "hyper_connections"
                 else base)
        changed = dataclasses.replace(start, **{name: value})
        diffs = weights_differences(start, changed)
        if layout(start) != layout(changed) or name in same_layout_but_other_meaning:
            assert diffs and diffs[0].startswith(f"{name}="), (name, diffs)
        else:
            assert diffs == [], (name, diffs)
    assert weights_differences(base, dataclasses.replace(base, ffn_hidden=128)) == []  # 0 resolves to 4 * 32
