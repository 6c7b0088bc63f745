"""What a resumed run may change and what it must refuse, each in one line: a
technique turned on trains on from the checkpoint; a checkpoint's MTP heads, its
tokenizer and its optimizer's settings are kept or refused by name (never a
traceback, never a silent swap)."""

from __future__ import annotations

from pathlib import Path

import pytest

from sparsetrain.cli import main
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
