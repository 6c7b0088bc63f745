"""Folder corpora narrowed by globs and a size cap; bits per byte of the val loss."""

from __future__ import annotations

import fnmatch
import hashlib
import json
import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import write_corpus
from sparsetrain.data import (bits_per_byte, discover_text_files, load_corpus, split_documents, tokens_per_byte,
                              val_batches)
from sparsetrain.errors import ConfigError, DataError


def _tree(root: Path, seed: int) -> dict[str, int]:
    """A random tree of text files (and one binary file); returns relpath -> size."""
    rng = random.Random(seed)
    sizes = {}
    for i in range(60):
        pkg = rng.choice(["alpha", "beta", "beta/tests", "gamma/sub"])
        name = f"{pkg}/{rng.choice(['mod', 'test_mod', 'util'])}{i}.{rng.choice(['py', 'txt', 'md'])}"
        text = "x = 1\n" * rng.randint(1, 400)
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
        sizes[name] = len(text.encode())
    (root / "alpha" / "blob.py").write_bytes(b"\x00binary")
    return sizes


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_include_exclude_and_size_cap_select_files_deterministically(tmp_path: Path, seed: int) -> None:
    sizes = _tree(tmp_path, seed)
    include, exclude = "*.py,*.md", "*/tests/*,*test_*"
    # the naive reference: filter by fnmatch, then take files in salted sha1(path) order while they fit
    matching = [n for n in sorted(sizes) if any(fnmatch.fnmatchcase(n, g) for g in include.split(","))
                and not any(fnmatch.fnmatchcase(n, g) for g in exclude.split(","))]
    cap = sum(sizes[n] for n in matching) // 2
    root, files = discover_text_files(tmp_path, include, exclude, cap)
    got = [f.relative_to(root).as_posix() for f in files]
    want, total = [], 0
    for n in sorted(matching, key=lambda n: hashlib.sha1(b"select:" + n.encode()).digest()):
        if total + sizes[n] <= cap:
            want.append(n)
            total += sizes[n]
    assert got == sorted(want) and 0 < len(got) < len(matching)
    assert sum(sizes[n] for n in got) <= cap
    assert not any("tests/" in n or "test_" in n or n.endswith(".txt") for n in got)
    assert discover_text_files(tmp_path, include, exclude, cap)[1] == files  # deterministic
    assert "alpha/blob.py" not in got  # binary files stay out


def test_size_cap_keeps_the_train_val_split_proportional(tmp_path: Path) -> None:
    """A cap that takes a tenth of the files must not take the held-out ones first: the
    selection order and the val split are independent hashes of the path."""
    for i in range(400):
        (tmp_path / f"pkg{i % 7}" / f"mod{i}.py").parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / f"pkg{i % 7}" / f"mod{i}.py").write_text("x = 1\n" * 10)
    root, files = discover_text_files(tmp_path, "*.py", "", 40 * 60)
    assert len(files) == 40
    docs = {f.relative_to(root).as_posix(): f.read_text() for f in files}
    train, val = split_documents(docs, 0.1)
    # binomial(40, 0.1): 0..12 covers all but ~1e-4 of draws; the shared hash gave 40 of 40 in val
    assert len(val) <= 12 and len(train) >= 28


def test_selection_has_its_own_token_cache(tmp_path: Path) -> None:
    data = write_corpus(tmp_path / "c", n_files=16, seed=4)
    cache = tmp_path / "cache"
    every = load_corpus(str(data), 300, 0.2, cache, verbose=False)
    some = load_corpus(str(data), 300, 0.2, cache, verbose=False, include="pkg1/*,pkg2/*")
    again = load_corpus(str(data), 300, 0.2, cache, verbose=False, include="pkg1/*,pkg2/*")
    assert len(list(cache.iterdir())) == 2  # a second cache for the selection, reused the next time
    assert np.array_equal(some.train, again.train) and some.train.size < every.train.size
    assert "include pkg1/*,pkg2/*" in some.description
    assert all("/pkg1/" in f or "/pkg2/" in f for f in some.train_text_files)
    with pytest.raises(DataError, match="no file under .* is left by data_include='nothing/\\*'"):
        load_corpus(str(data), 300, 0.2, cache, verbose=False, include="nothing/*")


def test_selection_of_a_single_file_is_refused(make_cfg, tmp_path: Path) -> None:
    (tmp_path / "one.txt").write_text("hello " * 100)
    with pytest.raises(ConfigError, match="select files of a folder; data is the file"):
        make_cfg(data=str(tmp_path / "one.txt"), data_include="*.txt")
    with pytest.raises(ConfigError, match="data_max_bytes must be >= 0, got -1"):
        make_cfg(data_max_bytes=-1)


def test_tokens_per_byte_counts_the_utf8_bytes_of_the_val_documents(tmp_path: Path) -> None:
    rng = random.Random(5)
    alphabet = list("abc def ():\n") + ["é", "ß", "日本", "→", "🙂"]
    docs = {f"d{i}.txt": "".join(rng.choice(alphabet) for _ in range(rng.randint(200, 800))) for i in range(30)}
    for name, text in docs.items():
        (tmp_path / "c").mkdir(exist_ok=True)
        (tmp_path / "c" / name).write_text(text, encoding="utf-8")
    corpus = load_corpus(str(tmp_path / "c"), 300, 0.2, tmp_path / "cache", verbose=False)
    _, val_docs = split_documents(docs, 0.2)
    want = corpus.val.size / sum(len(d.encode("utf-8")) for d in val_docs)  # one end-of-text token per document
    assert tokens_per_byte(corpus.val, corpus.tokenizer) == pytest.approx(want, rel=1e-12)
    assert bits_per_byte(2.0, 0.25) == pytest.approx(2.0 * 0.25 / math.log(2), rel=1e-15)


def test_eval_rows_report_bits_per_byte_of_the_eval_windows(make_cfg) -> None:
    from sparsetrain.trainer import train

    cfg = make_cfg(max_steps=3, eval_every=3)
    train(cfg, verbose=False)
    corpus = load_corpus(cfg.data, 320, cfg.val_fraction, cfg.cache_dir, verbose=False)
    tok = corpus.tokenizer
    n_tokens = n_bytes = 0
    for _, y in val_batches(corpus.val, cfg.eval_batches, cfg.batch_size, cfg.model.seq_len):
        for row in y.tolist():  # decode each target row: its text's bytes, end-of-text aside
            n_tokens += len(row)
            n_bytes += len(tok.decode([t for t in row if t != tok.eot_id]).encode("utf-8"))
    rows = [json.loads(l) for l in (Path(cfg.out_dir) / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if r["kind"] == "eval"]
    assert len(evals) == 2
    for r in evals:
        assert r["val_bpb"] == pytest.approx(r["val_loss"] * n_tokens / n_bytes / math.log(2), abs=1e-5)


def test_val_windows_depend_on_the_token_count_not_the_batch_shape() -> None:
    """An arm at half the batch with twice the eval batches evaluates the same
    held-out windows (the race's half-batch control relies on it); each window is
    ``tokens[s : s + seq_len]`` with its shifted targets, checked by slicing."""
    rng = np.random.default_rng()
    tokens = rng.integers(0, 1000, size=int(rng.integers(5000, 9000))).astype(np.int64)
    seq = int(rng.integers(16, 64))

    def windows(n_batches: int, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        xs, ys = zip(*val_batches(tokens, n_batches, batch, seq))
        return torch.cat(xs), torch.cat(ys)

    x8, y8 = windows(8, 8)
    x4, y4 = windows(16, 4)
    assert torch.equal(x8, x4) and torch.equal(y8, y4) and x8.shape == (64, seq)
    for row_x, row_y in zip(x8, y8):
        s = next(i for i in range(tokens.size - seq) if np.array_equal(tokens[i:i + seq], row_x.numpy()))
        assert np.array_equal(tokens[s + 1:s + seq + 1], row_y.numpy())
