"""The train/val split as the loaders see it: a corpus cut in two is not read whole
on the fly, and a built corpus is not loaded at a larger val_fraction than its own."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from sparsetrain.data import MANIFEST_NAME, load_corpus
from sparsetrain.errors import DataError
from sparsetrain.loader import make_loader


def test_on_the_fly_refuses_a_corpus_whose_split_cut_the_text(tmp_path: Path) -> None:
    """A single text file is split by cutting its end off for val: read whole on the fly,
    the held-out tail would be trained on, so the loader refuses it in one line."""
    (tmp_path / "one.txt").write_text("\n".join(f"line {i} of the only file" for i in range(400)))
    corpus = load_corpus(str(tmp_path / "one.txt"), vocab_size=300, cache_dir=tmp_path / "cache")
    assert corpus.train_text_files == ()
    with pytest.raises(DataError, match="split by file") as e:
        make_loader(corpus, 2, 16, 0, 0, 1, 0, 1, torch.device("cpu"), use_async=False, on_the_fly=True)
    assert "\n" not in str(e.value)


def test_a_built_corpus_at_a_larger_val_fraction_is_refused(tmp_path: Path) -> None:
    """``corpus build`` records its val_fraction: its duplicates copy that fraction's train
    files, so loading it with a larger one (files held out whose copies train) is refused;
    the same or a smaller one loads."""
    for i in range(40):
        (tmp_path / "c").mkdir(exist_ok=True)
        (tmp_path / "c" / f"m{i}.py").write_text(f"def f{i}(x):\n    return x + {i}\n" * 20)
    (tmp_path / "c" / MANIFEST_NAME).write_text(json.dumps({"format": 1, "source": {"src": "x"}, "val_fraction": 0.1}))
    with pytest.raises(DataError, match=r"built at val_fraction 0.1: .* use val_fraction <= 0.1"):
        load_corpus(str(tmp_path / "c"), vocab_size=300, val_fraction=0.2, cache_dir=tmp_path / "cache")
    for fraction in (0.1, 0.05):
        assert load_corpus(str(tmp_path / "c"), vocab_size=300, val_fraction=fraction, cache_dir=tmp_path / "cache").val.size


@pytest.mark.parametrize("damage", ["truncated train.bin", "no meta.json"])
def test_a_damaged_token_cache_is_built_again(tmp_path: Path, damage: str, capsys) -> None:
    """A cache whose token file is shorter than its record (a crash before it reached the
    disk), or whose record is missing, is built again with a one-line warning: the corpus
    then equals a fresh build's, not a tenth of it."""
    import numpy as np

    for i in range(30):
        (tmp_path / "c").mkdir(exist_ok=True)
        (tmp_path / "c" / f"m{i}.py").write_text(f"def f{i}(x):\n    return x * {i}\n" * 30)
    fresh = load_corpus(str(tmp_path / "c"), vocab_size=300, cache_dir=tmp_path / "cache", verbose=False)
    want_train, want_val = np.array(fresh.train), np.array(fresh.val)
    (folder,) = (tmp_path / "cache").iterdir()
    if damage == "truncated train.bin":
        data = (folder / "train.bin").read_bytes()
        (folder / "train.bin").write_bytes(data[: len(data) // 10])
    else:
        (folder / "meta.json").unlink()
    capsys.readouterr()
    again = load_corpus(str(tmp_path / "c"), vocab_size=300, cache_dir=tmp_path / "cache", verbose=False)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "damaged" in err and str(folder) in err, err
    assert np.array_equal(np.array(again.train), want_train) and np.array_equal(np.array(again.val), want_val)
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [folder.name]  # nothing left beside it


def test_an_empty_token_file_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "empty.bin").write_bytes(b"")
    with pytest.raises(DataError, match="no tokens in .*empty.bin: the corpus is empty"):
        load_corpus(str(tmp_path / "empty.bin"), vocab_size=300)


def test_a_whitespace_only_folder_is_the_same_line_for_training_and_eval(tmp_path: Path) -> None:
    """load_corpus (train, race) and held_out_data (eval) refuse a folder whose files
    hold only whitespace with the one line data.require_text writes, naming it."""
    from sparsetrain.config import TrainConfig
    from sparsetrain.evaluate import held_out_data
    from sparsetrain.tokenizer import BPETokenizer

    folder = tmp_path / "blank"
    folder.mkdir()
    (folder / "a.py").write_text("  \n\t\n")
    (folder / "b.py").write_text("")
    want = f"no text found in {folder}: the corpus is empty"
    with pytest.raises(DataError) as train_error:
        load_corpus(str(folder), vocab_size=300, cache_dir=tmp_path / "cache", verbose=False)
    with pytest.raises(DataError) as eval_error:
        tokenizer = BPETokenizer.train(["def f(x):\n    return x\n"] * 4, vocab_size=300)
        held_out_data(TrainConfig(data=str(folder)), tokenizer, data=str(folder))
    assert str(train_error.value) == str(eval_error.value) == want
    assert not (tmp_path / "cache").exists()  # refused before a cache folder is made


def test_the_run_files_refused_as_outputs_name_the_sharded_folder() -> None:
    """checkpoint.RUN_FILES spells the sharded checkpoints' folder and the data record
    (it cannot import them)."""
    from sparsetrain.checkpoint import RUN_FILES
    from sparsetrain.data import DATA_RECORD_NAME
    from sparsetrain.sharded_checkpoint import SHARDED_DIR

    assert SHARDED_DIR in RUN_FILES and DATA_RECORD_NAME in RUN_FILES
