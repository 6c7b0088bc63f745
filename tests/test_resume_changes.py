"""What a resumed run may change and what it must refuse, each in one line: a
technique turned on trains on from the checkpoint; a checkpoint's MTP heads, its
tokenizer and its optimizer's settings are kept or refused by name (never a
traceback, never a silent swap)."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from sparsetrain.cli import main
from sparsetrain.data import data_record, data_record_changes, is_val_file
from sparsetrain.errors import CheckpointError
from sparsetrain.trainer import Trainer, train

from conftest import write_corpus


def test_selection_turned_on_at_resume_trains_on(make_cfg, tmp_path: Path) -> None:
    """A run without selection resumed with Collider: nothing of a selector was saved,
    so the new one starts fresh and the run continues from the checkpoint's step."""
    train(make_cfg(out_dir=str(tmp_path / "r"), max_steps=2), verbose=False)
    cfg = make_cfg(out_dir=str(tmp_path / "r"), max_steps=4, use_collider=True, collider_sparsity=0.5,
                   collider_method="random")
    t = Trainer(cfg, resume=tmp_path / "r", verbose=False)
    assert t.step == 2
    assert t.fit().steps_done == 4


def test_an_mtp_checkpoint_resumed_without_mtp_is_refused(make_cfg, tmp_path: Path) -> None:
    train(make_cfg(out_dir=str(tmp_path / "r"), max_steps=2, use_mtp=True, mtp_n_tokens=2), verbose=False)
    with pytest.raises(CheckpointError, match="trained MTP heads; resume with use_mtp") as e:
        Trainer(make_cfg(out_dir=str(tmp_path / "r"), max_steps=4), resume=tmp_path / "r", verbose=False)
    assert "\n" not in str(e.value)


def test_resuming_on_new_data_refuses_a_tokenizer_of_its_own(make_cfg, tmp_path: Path, capsys) -> None:
    """New text data without --tokenizer would get a BPE trained on it, whose ids mean
    other text than the checkpoint's: refused in one line naming the run's own
    tokenizer, with which the resume trains on."""
    train(make_cfg(out_dir=str(tmp_path / "r"), max_steps=2), verbose=False)
    new = write_corpus(tmp_path / "new", n_files=30, seed=int(__import__("torch").randint(1, 10**6, ())))
    with pytest.raises(CheckpointError, match="resumed run .* another tokenizer") as e:
        Trainer(make_cfg(out_dir=str(tmp_path / "r"), max_steps=4, data=str(new)), resume=tmp_path / "r",
                verbose=False)
    assert "\n" not in str(e.value) and "tokenizer.json" in str(e.value)
    own = str(tmp_path / "r" / "tokenizer.json")
    before = Path(own).read_bytes()
    t = Trainer(make_cfg(out_dir=str(tmp_path / "r"), max_steps=4, data=str(new), tokenizer=own),
                resume=tmp_path / "r", verbose=False)
    assert t.fit().steps_done == 4 and Path(own).read_bytes() == before


@pytest.mark.parametrize("flag, value, named", [
    ("--seed", "-1", "--seed must be in [0, 2**63)"),
    ("--seed", str(2**64), "--seed must be in [0, 2**63)"),
    ("--async-prefetch-size", str(10**12), "--async-prefetch-size must be in [1, 4096]"),
])
def test_out_of_range_values_are_one_line(flag: str, value: str, named: str, tmp_path: Path, capsys) -> None:
    code = main(["train", "--preset", "tiny", "--device", "cpu", flag, value, "--out-dir", str(tmp_path / "r"),
                 "--dry-run"])
    err = capsys.readouterr().err
    assert code == 2 and named in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "r").exists()


def test_a_run_that_ended_on_its_time_budget_resumes_as_a_no_op(make_cfg, tmp_path: Path) -> None:
    """As a run that reached max_steps: resumed with the same budget it trains no step
    more (it did one each time, its start-up taking the time) and writes no row."""
    cfg = make_cfg(out_dir=str(tmp_path / "r"), max_steps=0, max_seconds=0.3, schedule_by="time", startup_steps=1)
    first = train(cfg, verbose=False)
    assert first.steps_done >= 2
    rows = (tmp_path / "r" / "metrics.jsonl").read_text()
    again = Trainer(cfg, resume=tmp_path / "r", verbose=False).fit()
    assert again.steps_done == first.steps_done
    assert (tmp_path / "r" / "metrics.jsonl").read_text() == rows


def _rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_a_run_records_its_tokens_and_a_resume_on_other_data_says_so(make_cfg, tmp_path: Path, capsys) -> None:
    """``data.json`` holds both splits' token counts and the held-out tokens' SHA-256
    (checked against hashlib over the cache's own files); a resume on the same data
    logs nothing, one on new files says the change on stdout and in one
    ``resume_change`` row, and rewrites the record."""
    run = tmp_path / "r"
    train(make_cfg(out_dir=str(run), max_steps=2), verbose=False)
    written = json.loads((run / "data.json").read_text())  # by the first run, before any resume
    t = Trainer(make_cfg(out_dir=str(run), max_steps=3), resume=run, verbose=False)
    val = np.asarray(t.corpus.val).astype("<u4")
    assert written == {"n_train_tokens": int(np.asarray(t.corpus.train).size), "n_val_tokens": int(val.size),
                       "val_sha256": hashlib.sha256(val.tobytes()).hexdigest()}
    t.fit()
    assert not [r for r in _rows(run) if r["kind"] == "resume_change"]
    capsys.readouterr()
    new = write_corpus(tmp_path / "new", n_files=30, seed=int(torch.randint(1, 10**6, ())))
    cfg = make_cfg(out_dir=str(run), max_steps=5, data=str(new), tokenizer=str(run / "tokenizer.json"))
    t = Trainer(cfg, resume=run, verbose=True)
    said = capsys.readouterr().out
    assert "step 3: the data changed (train tokens " in said and "val tokens " in said, said
    t.fit()
    changes = [r["changes"] for r in _rows(run) if r["kind"] == "resume_change"]
    assert changes == [{"data": [written, t.data_record]}], changes  # the old and the new record
    assert json.loads((run / "data.json").read_text()) == t.data_record
    # resumed again at the same step (nothing trained since): the row stays and no second one is added
    train(make_cfg(out_dir=str(run), max_steps=5, data=str(new), tokenizer=str(run / "tokenizer.json")), resume=run,
          verbose=False)
    assert [r["changes"] for r in _rows(run) if r["kind"] == "resume_change"] == changes


def test_a_resume_on_new_data_killed_before_its_checkpoint_still_says_so_once(make_cfg, tmp_path: Path,
                                                                               monkeypatch) -> None:
    """The comparison is with the checkpoint's record, not data.json: a resume on new data
    rewrites data.json as it starts, so one killed before its first checkpoint and
    resumed again still finds the change, and the log holds it once."""
    run = tmp_path / "r"
    kw = dict(out_dir=str(run), eval_every=0)
    train(make_cfg(max_steps=3, **kw), verbose=False)
    new = write_corpus(tmp_path / "new", n_files=30, seed=int(torch.randint(1, 10**6, ())))
    cfg = dict(max_steps=8, data=str(new), tokenizer=str(run / "tokenizer.json"), **kw)
    t = Trainer(make_cfg(**cfg), resume=run, verbose=False)
    assert json.loads((run / "data.json").read_text()) == t.data_record  # rewritten as the resume starts
    steps = t.train_step

    def killed() -> None:
        if t.step == 4:
            raise KeyboardInterrupt
        steps()

    monkeypatch.setattr(t, "train_step", killed)
    with pytest.raises(KeyboardInterrupt):
        t.fit()
    train(make_cfg(**cfg), resume=run, verbose=False)
    changes = [r for r in _rows(run) if r["kind"] == "resume_change"]
    assert [(r["step"], sorted(r["changes"])) for r in changes] == [(3, ["data"])], changes


@pytest.mark.parametrize("only_train", [True, False])
def test_a_data_change_row_at_the_checkpoint_step_is_read_back_by_the_next_resume(make_cfg, tmp_path: Path,
                                                                                 only_train: bool) -> None:
    """A resume on other data that trains no step leaves its row at the checkpoint's step;
    the next resume reads that row back against the checkpoint (once a traceback when
    the change was one phrase): not saved in it, so dropped and said again, once."""
    run = tmp_path / "r"
    kw = dict(out_dir=str(run), eval_every=0)
    train(make_cfg(max_steps=3, **kw), verbose=False)
    # a file on the train side only (a name the val split does not take), or a whole new corpus
    if only_train:
        data = tmp_path / "more"
        shutil.copytree(make_cfg().data, data)
        name = next(f"extra{i}.py" for i in range(1000) if not is_val_file(f"extra{i}.py", 0.1))
        (data / name).write_text("def extra():\n    return 1\n")
    else:
        data = write_corpus(tmp_path / "new", n_files=30, seed=int(torch.randint(1, 10**6, ())))
    cfg = dict(max_steps=3, data=str(data), tokenizer=str(run / "tokenizer.json"), **kw)
    for _ in range(2):
        train(make_cfg(**cfg), resume=run, verbose=False)
    rows = [r for r in _rows(run) if r["kind"] == "resume_change"]
    assert [r["step"] for r in rows] == [3], rows
    old, new = rows[0]["changes"]["data"]
    if only_train:
        assert old["val_sha256"] == new["val_sha256"] and old["n_train_tokens"] < new["n_train_tokens"]
    else:
        assert old["val_sha256"] != new["val_sha256"]


def test_data_record_changes_names_each_difference() -> None:
    """Counts that differ are named with both values; a held-out side of the same length
    with other tokens is named too; a record from nowhere compares as unknown."""
    rng = np.random.default_rng()
    train_a, val_a = rng.integers(0, 500, 1000, dtype=np.uint16), rng.integers(0, 500, 100, dtype=np.uint16)
    val_b = val_a.copy()
    val_b[rng.integers(0, 100)] += 1
    a = data_record(train_a, val_a)
    assert data_record_changes(a, data_record(train_a, val_a.astype(np.uint32))) == []  # the dtype does not count
    assert data_record_changes(a, data_record(train_a[:-7], val_a)) == ["train tokens 1,000 -> 993"]
    assert data_record_changes(a, data_record(train_a, val_b)) == ["val tokens changed (same count)"]
    assert data_record_changes(a, data_record(train_a, val_a[:50])) == ["val tokens 100 -> 50"]
    assert data_record_changes({}, a) == ["train tokens ? -> 1,000", "val tokens ? -> 100"]


def test_a_val_split_too_short_for_a_window_is_refused_before_the_run_folder_is_written(make_cfg,
                                                                                       tmp_path: Path) -> None:
    """A held-out split shorter than seq_len + 1 tokens ends the start in one line and
    leaves no run folder behind (its config.toml and data.json were written first)."""
    from sparsetrain.errors import DataError

    data = tmp_path / "corpus"
    data.mkdir()
    (data / "a.py").write_text("x = 1\n" * 400)  # one file: the split cuts its last 10 % off as val
    out = tmp_path / "r"
    seq_len = 512
    with pytest.raises(DataError, match=rf"val split has \d+ tokens, fewer than seq_len \+ 1 = {seq_len + 1}") as e:
        Trainer(make_cfg(out_dir=str(out), data=str(data), seq_len=seq_len), verbose=False)
    assert "\n" not in str(e.value) and not out.exists()


def test_a_checkpoint_from_before_a_model_field_existed_resumes(make_cfg, tmp_path: Path) -> None:
    """A checkpoint's model config lacks the fields added after it was written: those
    compare as their defaults, so it resumes; a field it holds with another value is
    still refused by name."""
    run = tmp_path / "r"
    train(make_cfg(out_dir=str(run), max_steps=2, eval_every=0), verbose=False)
    state = torch.load(run / "ckpt.pt", weights_only=True)
    del state["model_config"]["hyper_connections"], state["model_config"]["norm_eps"]  # as if added since
    from sparsetrain.checkpoint import save_checkpoint

    save_checkpoint(run / "ckpt.pt", state, keep_previous=False)
    assert Trainer(make_cfg(out_dir=str(run), max_steps=3, eval_every=0), resume=run, verbose=False).fit().steps_done == 3
    with pytest.raises(CheckpointError, match=r"from another model: norm_eps=1e-06 there vs 0\.001 here"):
        Trainer(make_cfg(out_dir=str(run), max_steps=4, eval_every=0, norm_eps=1e-3), resume=run, verbose=False)
