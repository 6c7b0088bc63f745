"""Tokenizer round trip, deterministic split, cache rebuild, batch sampling."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch

from sparsetrain.data import (
    discover_text_files,
    is_val_file,
    load_corpus,
    split_documents,
    train_batch,
    val_batches,
)
from sparsetrain.errors import DataError
from sparsetrain.tokenizer import BPETokenizer

from conftest import write_corpus


def _random_text(rng: random.Random, n: int) -> str:
    pools = ["abc xyz\n\t", "äöü€漢字🙂", "{}[]()=+-*/\\\"'", "\x00\x07\r"]
    return "".join(rng.choice(rng.choice(pools)) for _ in range(n))


def test_tokenizer_round_trip_any_text(tmp_path: Path) -> None:
    rng = random.Random()
    train = [_random_text(rng, 400) for _ in range(20)] + ["def f(x):\n    return x + 1\n"] * 5
    tok = BPETokenizer.train(train, vocab_size=400)
    for _ in range(50):  # unseen strings, including characters never trained on
        s = _random_text(rng, rng.randint(0, 200)) + chr(rng.randint(0x4E00, 0x9FFF))
        assert tok.decode(tok.encode(s)) == s
    assert tok.encode_batch(["ab", "def f"]) == [tok.encode("ab"), tok.encode("def f")]
    tok.save(tmp_path / "t.json")
    again = BPETokenizer.load(tmp_path / "t.json")
    assert again.encode("return x + 1") == tok.encode("return x + 1")
    assert again.eot_id == tok.eot_id
    assert tok.vocab_size <= 400


def test_end_of_text_spelled_in_a_document_is_text(tmp_path: Path) -> None:
    """A document that spells ``<|endoftext|>`` (tokenizer code does) gets ordinary
    tokens for it, not the separator: no document boundary where the text has none,
    and bits per byte count its 13 bytes (byte_lengths gives the separator 0)."""
    from sparsetrain.tokenizer import EOT

    text = f'SEP = "{EOT}"\nprint(SEP)\n'
    tok = BPETokenizer.train(["def f(x):\n    return x\n", text] * 5, vocab_size=300)
    for t in (tok, BPETokenizer.load((tok.save(tmp_path / "t.json"), tmp_path / "t.json")[1])):
        ids = t.encode(text)
        assert t.eot_id not in ids and t.decode(ids) == text
        lengths = t.byte_lengths()
        assert sum(lengths[i] for i in ids) == len(text.encode()) and lengths[t.eot_id] == 0
        assert t.encode_batch([text]) == [ids]
        assert t.encode_offsets(text)[0] == ids


def test_split_is_deterministic_and_order_independent() -> None:
    names = [f"lib/mod{i}.py" for i in range(500)]
    docs = {n: n.upper() for n in names}
    train, val = split_documents(docs, 0.1)
    shuffled = dict(random.sample(list(docs.items()), len(docs)))
    assert split_documents(shuffled, 0.1) == (train, val)
    assert 25 <= len(val) <= 75  # ~10% of 500 by hash
    # a file's side depends only on its own path
    more = dict(docs, **{"lib/new.py": "NEW"})
    train2, val2 = split_documents(more, 0.1)
    assert set(val) <= set(val2) and set(train) <= set(train2)
    assert all(is_val_file(n, 0.1) == (docs[n] in val) for n in names)


def test_single_file_is_split_by_characters() -> None:
    train, val = split_documents({"a.txt": "x" * 900 + "y" * 100}, 0.1)
    assert train == ["x" * 900] and val == ["y" * 100]


def test_few_files_are_cut_each_on_its_own() -> None:
    # names the hash split puts all on one side, so the split cuts characters instead
    rng = random.Random()
    names = [f"f{i}.txt" for i in range(200) if not is_val_file(f"f{i}.txt", 0.25)][:3]
    docs = {n: "".join(rng.choice("abc") for _ in range(rng.randrange(8, 400))) for n in names}
    train, val = split_documents(docs, 0.25)
    expected = [(docs[n][: int(len(docs[n]) * 0.75)], docs[n][int(len(docs[n]) * 0.75):]) for n in sorted(docs)]
    assert train == [t for t, _ in expected] and val == [v for _, v in expected]
    # a file added (on the same side) leaves the other files' cuts where they were
    extra = next(f"g{i}.txt" for i in range(200) if not is_val_file(f"g{i}.txt", 0.25))
    train2, val2 = split_documents(dict(docs, **{extra: "z" * 1000}), 0.25)
    assert set(train) < set(train2) and set(val) < set(val2) and "z" * 750 in train2


def test_stdlib_corpus_excludes_site_packages() -> None:
    root, files = discover_text_files(None)
    assert len(files) > 500
    assert all(f.suffix == ".py" for f in files)
    assert not any("site-packages" in f.parts for f in files)
    assert (root / "os.py") in files


def test_folder_corpus_skips_hidden_and_binary(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("hello")
    (tmp_path / ".hidden.txt").write_text("secret")
    (tmp_path / "blob.bin").write_bytes(b"\x00\x01\x02")
    _, files = discover_text_files(tmp_path)
    assert [f.name for f in files] == ["a.txt"]


def test_cache_reused_and_rebuilt_when_corpus_changes(tmp_path: Path) -> None:
    data = write_corpus(tmp_path / "c", n_files=12, seed=3)
    cache = tmp_path / "cache"
    c1 = load_corpus(str(data), 300, 0.2, cache, verbose=False)
    assert len(list(cache.iterdir())) == 1
    c2 = load_corpus(str(data), 300, 0.2, cache, verbose=False)
    assert np.array_equal(c1.train, c2.train) and len(list(cache.iterdir())) == 1
    first = sorted(data.rglob("*.py"))[0]
    first.write_text(first.read_text() + "\nchanged = True\n")
    c3 = load_corpus(str(data), 300, 0.2, cache, verbose=False)
    assert len(list(cache.iterdir())) == 2
    assert not np.array_equal(np.asarray(c1.train), np.asarray(c3.train)) or c1.val.size != c3.val.size
    # the cached tokens are exactly the documents, each preceded by end-of-text
    tok = c3.tokenizer
    eot = np.flatnonzero(np.asarray(c3.train) == tok.eot_id)
    assert eot[0] == 0
    text = tok.decode(np.asarray(c3.train[1 : eot[1]]).tolist())
    assert text.endswith("\n") and len(text) > 10


def test_empty_and_missing_corpus_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        load_corpus(str(tmp_path / "nope"), 300, 0.1, tmp_path, verbose=False)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "blank.txt").write_text("  \n")
    with pytest.raises(DataError, match="empty"):
        load_corpus(str(tmp_path / "empty"), 300, 0.1, tmp_path, verbose=False)


def test_a_corpus_too_small_to_split_is_refused_before_the_cache_is_written(tmp_path: Path) -> None:
    """One character (or one per file) leaves a split empty: one line naming the data,
    and no cache folder (an empty token file there broke every later load)."""
    cache = tmp_path / "cache"
    (tmp_path / "one.txt").write_text("x")
    (tmp_path / "two").mkdir()
    for name in ("a.txt", "b.txt"):
        (tmp_path / "two" / name).write_text("y")
    for data in (tmp_path / "one.txt", tmp_path / "two"):
        with pytest.raises(DataError, match=f"{data} is too small to split.*train split empty"):
            load_corpus(str(data), 300, 0.1, cache, verbose=False)
    assert not any(cache.glob("corpus-*"))


def test_bin_tokens(tmp_path: Path) -> None:
    tokens = np.random.randint(0, 1000, size=5000).astype(np.uint16)
    tokens[np.random.randint(5000)] = 999  # the out-of-vocabulary check below needs the id present (absent 0.7% of draws)
    tokens.tofile(tmp_path / "t.bin")
    c = load_corpus(str(tmp_path / "t.bin"), 1000, 0.1, tmp_path, "uint16")
    assert c.train.size == 4500 and c.val.size == 500
    assert np.array_equal(np.concatenate([c.train, c.val]), tokens)
    with pytest.raises(DataError, match="token id 999"):
        load_corpus(str(tmp_path / "t.bin"), 999, 0.1, tmp_path, "uint16")
    big = np.random.randint(0, 70000, size=300).astype(np.uint32)
    big.tofile(tmp_path / "u.bin")
    assert load_corpus(str(tmp_path / "u.bin"), 70000, 0.1, tmp_path, "uint32").train.max() == big[:270].max()
    (tmp_path / "odd.bin").write_bytes(b"\x01\x02\x03")
    with pytest.raises(DataError, match="whole number"):
        load_corpus(str(tmp_path / "odd.bin"), 1000, 0.1, tmp_path, "uint16")


def test_train_batch_is_pure_shifted_and_sharded() -> None:
    tokens = np.arange(10_000, dtype=np.uint32)
    x, y = train_batch(tokens, 8, 16, seed=5, step=3, micro=1)
    x2, y2 = train_batch(tokens, 8, 16, seed=5, step=3, micro=1)
    assert torch.equal(x, x2) and torch.equal(y, y2)
    assert x.dtype == torch.int64 and x.shape == (8, 16)
    assert torch.equal(y[:, :-1], x[:, 1:]) and torch.equal(y[:, -1], x[:, -1] + 1)
    assert not torch.equal(x, train_batch(tokens, 8, 16, seed=5, step=4, micro=1)[0])
    for rank in range(3):  # each rank stays inside its own contiguous shard
        xr, yr = train_batch(tokens, 64, 16, seed=5, step=0, rank=rank, world_size=3)
        lo, hi = rank * 10_000 // 3, (rank + 1) * 10_000 // 3
        assert xr.min() >= lo and yr.max() < hi
    with pytest.raises(DataError, match="fewer than seq_len"):
        train_batch(tokens[:10], 2, 16, seed=0, step=0)


def test_val_batches_fixed_and_split_across_ranks() -> None:
    tokens = np.arange(3000, dtype=np.uint16)
    full = val_batches(tokens, 4, 2, 10)
    assert len(full) == 4
    r0, r1 = val_batches(tokens, 4, 2, 10, 0, 2), val_batches(tokens, 4, 2, 10, 1, 2)
    assert [b[0].tolist() for b in r0 + r1] == [full[i][0].tolist() for i in (0, 2, 1, 3)]
    assert full[-1][1].max().item() == 2999


def test_uint32_tokens_read_as_uint16_are_refused(tmp_path: Path, corpus_dir: Path, capsys) -> None:
    """A uint32 file read as uint16 is every id followed by a 0 (the high half, little-endian):
    ids all inside the vocabulary, so the vocabulary check alone lets it through."""
    from sparsetrain.cli import main

    rng = np.random.default_rng(0)
    ids = rng.integers(1, 1000, size=5000).astype(np.uint32)
    path = tmp_path / "u32.bin"
    ids.tofile(path)
    with pytest.raises(DataError) as e:
        load_corpus(str(path), 1000, 0.1, tmp_path, "uint16")
    assert str(path) in str(e.value) and "--token-dtype uint32" in str(e.value) and "\n" not in str(e.value)
    assert np.array_equal(np.asarray(load_corpus(str(path), 1000, 0.1, tmp_path, "uint32").train), ids[:4500])
    wide = rng.integers(0, 70000, size=5000).astype(np.uint32)  # a vocabulary past 2**16: high halves 0 or 1
    wide.tofile(tmp_path / "wide.bin")
    with pytest.raises(DataError, match="--token-dtype uint32"):
        load_corpus(str(tmp_path / "wide.bin"), 70000, 0.1, tmp_path, "uint16")
    # genuine uint16 files: real text tokens, and ids with many (not all) zeros at odd positions
    text = load_corpus(str(corpus_dir), 320, 0.1, tmp_path / "cache", verbose=False)
    np.asarray(text.train, dtype=np.uint16).tofile(tmp_path / "text.bin")
    assert load_corpus(str(tmp_path / "text.bin"), 320, 0.1, tmp_path, "uint16").train.size == int(text.train.size * 0.9)
    zeros = rng.integers(1, 1000, size=5000).astype(np.uint16)
    zeros[1::2] = 0
    zeros[1] = 7
    zeros.tofile(tmp_path / "zeros.bin")
    assert load_corpus(str(tmp_path / "zeros.bin"), 1000, 0.1, tmp_path, "uint16").val.size == 500
    # the CLI: one line, exit 2
    code = main(["train", "--data", str(path), "--vocab-size", "1000", "--seq-len", "16", "--n-layer", "1",
                 "--d-model", "32", "--n-head", "2", "--device", "cpu", "--max-steps", "1",
                 "--out-dir", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and str(path) in err[0] and "--token-dtype uint32" in err[0], err


def test_bin_token_ids_past_the_tokenizer_are_refused(tmp_path: Path) -> None:
    tok = BPETokenizer.train(["def f(x):\n    return x + 1\n"] * 5, vocab_size=270)
    tok.save(tmp_path / "tokenizer.json")
    tokens = np.random.default_rng(1).integers(0, tok.vocab_size, size=2000).astype(np.uint16)
    tokens.tofile(tmp_path / "ok.bin")
    c = load_corpus(str(tmp_path / "ok.bin"), 320, 0.1, tmp_path, "uint16", str(tmp_path / "tokenizer.json"))
    assert c.tokenizer.vocab_size == tok.vocab_size
    tokens[100] = tok.vocab_size + 5  # inside model.vocab_size 320, past the tokenizer's ids
    tokens.tofile(tmp_path / "bad.bin")
    with pytest.raises(DataError, match=f"token id {tok.vocab_size + 5}, outside the {tok.vocab_size} tokens of "
                                        f"tokenizer {tmp_path / 'tokenizer.json'}"):
        load_corpus(str(tmp_path / "bad.bin"), 320, 0.1, tmp_path, "uint16", str(tmp_path / "tokenizer.json"))


def test_batches_too_large_for_memory_are_one_line() -> None:
    from sparsetrain.errors import ConfigError

    tokens = np.arange(10_000, dtype=np.uint16)
    for build in (lambda: val_batches(tokens, 8, 10**12, 16), lambda: train_batch(tokens, 10**12, 16, seed=0, step=0)):
        with pytest.raises(ConfigError) as e:
            build()
        message = str(e.value)
        assert "training.batch_size = 1000000000000" in message and "model.seq_len = 16" in message, message
        assert "\n" not in message
