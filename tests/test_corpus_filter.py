"""``sparsetrain corpus filter``: each train document's mean reference loss
against a loop over documents tokenized one by one; the documents left out
against a naive greedy choice; the copy's held-out split against the source's."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from sparsetrain.cli import main
from sparsetrain.corpora import MANIFEST_NAME, CorpusSpec, build_corpus
from sparsetrain.corpus_filter import document_losses, filter_corpus
from sparsetrain.data import is_val_file, load_corpus
from sparsetrain.reference_losses import SIDECAR_FORMAT, header_path, tokens_fingerprint

from conftest import write_corpus
from conftest import fresh_seed

VAL = 0.1


@pytest.fixture(scope="module")
def noisy(tmp_path_factory) -> tuple[Path, object]:
    """A corpus with 30 % noise documents and its token cache (a BPE trained on it)."""
    root = tmp_path_factory.mktemp("filter")
    src = write_corpus(root / "src", n_files=40, seed=3)
    out = root / "noisy"
    build_corpus(CorpusSpec(src=str(src), out=str(out), val_fraction=VAL, noise_fraction=0.3, seed=0,
                            noise_kinds=("table", "boilerplate", "random")), verbose=False)  # the files do not parse
    return out, load_corpus(str(out), 320, VAL, str(root / "cache"), verbose=False)


def _sidecar(path: Path, tokens: np.ndarray, values: np.ndarray) -> Path:
    values.astype(np.float16).tofile(path)
    header_path(path).write_text(json.dumps({"format": SIDECAR_FORMAT, "n_tokens": int(tokens.size),
                                             "tokens_fingerprint": tokens_fingerprint(tokens), "seq_len": 32}))
    return path


def _naive_means(corpus, losses: np.ndarray) -> dict[str, tuple[int, float]]:
    """{train document: (tokens with its separator, mean loss of its own tokens)}, each encoded on its own."""
    root = Path(corpus.text_root)
    out, pos = {}, 0
    for name in corpus.train_doc_names:
        text = (root / name).read_bytes().decode("utf-8", errors="replace")
        n = len(corpus.tokenizer.encode(text))
        own = [float(losses[i]) for i in range(pos, pos + n)]  # entry i: the loss of token i + 1
        out[name] = (n + 1, sum(own) / n)
        pos += n + 1
    assert pos == corpus.train.size
    return out


def test_the_hardest_documents_are_left_out_and_the_val_split_is_kept(noisy, tmp_path) -> None:
    folder, corpus = noisy
    seed = fresh_seed()
    rng = np.random.default_rng(seed)
    losses = rng.gamma(2.0, 1.5, corpus.train.size).astype(np.float16)
    sidecar = _sidecar(tmp_path / "ref.f16", corpus.train, losses)
    drop = float(rng.uniform(0.15, 0.6))
    record = filter_corpus(corpus, sidecar, drop, tmp_path / "out", verbose=False)

    means = _naive_means(corpus, losses.astype(np.float64))
    docs = document_losses(corpus, losses)
    assert docs.names == tuple(means)
    np.testing.assert_allclose(docs.mean_loss, [m for _, m in means.values()], rtol=1e-12, err_msg=str(seed))
    assert docs.tokens.tolist() == [n for n, _ in means.values()]
    total = sum(n for n, _ in means.values())
    want, gone = set(), 0
    for name in sorted(means, key=lambda k: (-means[k][1], k)):  # greedy, hardest first
        if gone >= drop * total:
            break
        want.add(name)
        gone += means[name][0]
    assert record["left_out_documents"] == len(want) and record["left_out_tokens"] == gone, seed
    files = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}
    copied = {p.relative_to(tmp_path / "out").as_posix() for p in (tmp_path / "out").rglob("*") if p.is_file()}
    assert copied == files - want, seed
    for rel in copied - {MANIFEST_NAME}:
        assert (tmp_path / "out" / rel).read_bytes() == (folder / rel).read_bytes()
    assert all(not is_val_file(n, VAL) for n in want)

    manifest = json.loads((tmp_path / "out" / MANIFEST_NAME).read_text())
    source = json.loads((folder / MANIFEST_NAME).read_text())
    assert set(manifest["generated"]) == set(source["generated"]) - want
    assert manifest["filtered"]["drop"] == drop and manifest["filtered"]["seconds"] >= 0
    # the same held-out tokens; the train tokens are the kept documents'
    again = load_corpus(str(tmp_path / "out"), 320, VAL, str(tmp_path / "cache"),
                        tokenizer=str(corpus.tokenizer_path), verbose=False)
    assert np.array_equal(np.asarray(again.val), np.asarray(corpus.val))
    assert again.train.size == total - gone
    kinds = {n: source["generated"].get(n, {"kind": "clean"})["kind"] for n in means}
    for kind, share in manifest["filtered"]["kept_share_by_kind"].items():
        of = [n for n in means if kinds[n] == kind]
        kept = sum(means[n][0] for n in of if n not in want) / sum(means[n][0] for n in of)
        assert share == pytest.approx(kept, abs=1e-4), (kind, seed)


def test_the_random_control_leaves_out_the_same_share_in_whole_documents(noisy, tmp_path, capsys) -> None:
    """``--random-seed``: documents in the order of the seed's permutation until the
    share is reached (a naive loop over documents tokenized one by one), the val
    files all kept, the same choice for the same seed and another for another."""
    folder, corpus = noisy
    seed = fresh_seed()
    drop = float(np.random.default_rng(seed).uniform(0.15, 0.6))
    sizes = _naive_means(corpus, np.zeros(corpus.train.size))
    names = list(sizes)
    total = sum(n for n, _ in sizes.values())
    want, gone = set(), 0
    for i in np.random.default_rng(seed).permutation(len(names)):
        if gone >= drop * total:
            break
        want.add(names[i])
        gone += sizes[names[i]][0]
    args = ["corpus", "filter", "--corpus", str(folder), "--tokenizer", str(corpus.tokenizer_path),
            "--val-fraction", str(VAL), "--drop", str(drop), "--random-seed", str(seed)]
    assert main(args + ["--out", str(tmp_path / "a")]) == 0
    assert f"taken at random, seed {seed}" in capsys.readouterr().out
    record = json.loads((tmp_path / "a" / MANIFEST_NAME).read_text())["filtered"]
    assert record["left_out_tokens"] == gone >= drop * total and record["reference_losses"] is None, seed
    assert record["random_seed"] == seed and "mean_loss_kept" not in record
    files = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}
    copied = {p.relative_to(tmp_path / "a").as_posix() for p in (tmp_path / "a").rglob("*") if p.is_file()}
    assert copied == files - want and all(not is_val_file(n, VAL) for n in want), seed
    assert main(args + ["--out", str(tmp_path / "b")]) == 0
    again = {p.relative_to(tmp_path / "b").as_posix() for p in (tmp_path / "b").rglob("*") if p.is_file()}
    assert again == copied, seed  # the same seed, the same documents
    filter_corpus(corpus, None, drop, tmp_path / "c", verbose=False, random_seed=seed + 1)
    other = {p.relative_to(tmp_path / "c").as_posix() for p in (tmp_path / "c").rglob("*") if p.is_file()}
    assert other != copied, seed  # another seed, another choice (40 files: a repeat is vanishingly rare)
    assert json.loads((tmp_path / "b" / MANIFEST_NAME).read_text())["filtered"]["left_out_tokens"] == gone


def test_noise_the_reference_finds_hard_goes_first(noisy, tmp_path) -> None:
    """Losses high on every noise token, low on clean ones: a drop of the noise's share leaves out only noise."""
    folder, corpus = noisy
    manifest = json.loads((folder / MANIFEST_NAME).read_text())
    means = _naive_means(corpus, np.zeros(corpus.train.size))
    losses, pos = np.empty(corpus.train.size), 0
    rng = np.random.default_rng(fresh_seed())
    noise_tokens = 0
    for name, (n, _) in means.items():
        noise = name in manifest["generated"]
        losses[pos:pos + n] = rng.uniform(6, 8, n) if noise else rng.uniform(1, 3, n)
        noise_tokens += n * noise
        pos += n
    record = filter_corpus(corpus, _sidecar(tmp_path / "ref.f16", corpus.train, losses),
                           0.9 * noise_tokens / corpus.train.size, tmp_path / "out", verbose=False)
    assert record["kept_share_by_kind"]["clean"] == 1.0
    assert record["mean_loss_left_out"] > 6 and record["mean_loss_kept"] < 6.5


def test_bad_input_is_one_line(noisy, tmp_path, capsys) -> None:
    folder, corpus = noisy
    sidecar = _sidecar(tmp_path / "ref.f16", corpus.train, np.ones(corpus.train.size))
    base = ["corpus", "filter", "--corpus", str(folder), "--tokenizer", str(corpus.tokenizer_path),
            "--reference-losses", str(sidecar), "--val-fraction", str(VAL)]
    for extra, needle in [(["--drop", "0", "--out", str(tmp_path / "a")], "--drop must be in (0, 1), got 0.0"),
                          (["--drop", "0.3", "--out", str(folder)], f"--out {folder} exists and is not an empty folder"),
                          (["--drop", "0.3", "--out", str(folder / "sub")], "is inside the corpus"),
                          (["--drop", "0.3", "--out", str(tmp_path / "b"), "--val-fraction", "0.02"],
                           "was computed for other train tokens"),
                          (["--drop", "0.3", "--out", str(tmp_path / "c"), "--random-seed", "1"],
                           "give one of --reference-losses FILE")]:
        assert main(base + extra) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("sparsetrain: error:") and needle in err[0], err
    assert main(base + ["--drop", "0.3", "--out", str(tmp_path / "ok")]) == 0
    assert "left out" in capsys.readouterr().out
    control = ["corpus", "filter", "--corpus", str(folder), "--val-fraction", str(VAL), "--drop", "0.3",
               "--out", str(tmp_path / "d")]
    for extra, needle in [(["--random-seed", "-1", "--tokenizer", str(corpus.tokenizer_path)],
                           "--random-seed must be >= 0, got -1"),
                          (["--random-seed", "1"], "--random-seed needs --tokenizer"),
                          (["--random-seed", "1", "--scorer", str(tmp_path)], "give one of --reference-losses FILE")]:
        assert main(control + extra) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("sparsetrain: error:") and needle in err[0], err


def test_kept_shares_count_the_noise_inside_files(tmp_path) -> None:
    """Noise spliced inside clean files: each kind's kept share counts its tokens (found by decoding each
    kept and left-out document's tokens one prefix at a time), not the files' kinds."""
    src = write_corpus(tmp_path / "src", n_files=30, seed=4)
    folder = tmp_path / "inside"
    source = build_corpus(CorpusSpec(src=str(src), out=str(folder), val_fraction=VAL, noise_fraction=0.3, seed=1,
                                     noise_kinds=("table", "random"), noise_placement="inside"), verbose=False)
    corpus = load_corpus(str(folder), 320, VAL, str(tmp_path / "cache"), verbose=False)
    seed = fresh_seed()
    rng = np.random.default_rng(seed)
    losses = rng.gamma(2.0, 1.5, corpus.train.size).astype(np.float16)
    record = filter_corpus(corpus, _sidecar(tmp_path / "ref.f16", corpus.train, losses), 0.3, tmp_path / "out",
                           verbose=False)
    gone = set(source["generated"]) | set(corpus.train_doc_names)
    gone -= {p.relative_to(tmp_path / "out").as_posix() for p in (tmp_path / "out").rglob("*") if p.is_file()}
    total: dict[str, int] = {}
    kept: dict[str, int] = {}
    for name in corpus.train_doc_names:
        text = (folder / name).read_bytes().decode("utf-8", errors="replace")
        spans = source["generated"].get(name, {}).get("inserted", [])
        ids = corpus.tokenizer.encode(text)
        kinds = ["clean"]  # the separator before the document
        for i in range(len(ids)):
            first = len(corpus.tokenizer.decode(ids[:i]))
            kinds.append(next((k for s, e, k in spans if s <= first < e), "clean"))
        for k in kinds:
            total[k] = total.get(k, 0) + 1
            kept[k] = kept.get(k, 0) + (name not in gone)
    assert set(record["kept_share_by_kind"]) == {"clean", "table", "random"} == set(total)
    for k, share in record["kept_share_by_kind"].items():
        assert share == pytest.approx(kept[k] / total[k], abs=1e-4), (k, seed)


def test_a_plain_folders_copy_carries_the_record(tmp_path) -> None:
    """A folder that no corpus build wrote: its filtered copy gets a manifest of the filter's record alone
    (what a race reads the one-time cost from), and its tokens all count as clean."""
    from sparsetrain.token_labels import train_token_labels

    src = write_corpus(tmp_path / "plain", n_files=30, seed=5)
    corpus = load_corpus(str(src), 320, VAL, str(tmp_path / "cache"), verbose=False)
    losses = np.random.default_rng(fresh_seed()).gamma(2.0, 1.5, corpus.train.size).astype(np.float16)
    record = filter_corpus(corpus, _sidecar(tmp_path / "ref.f16", corpus.train, losses), 0.3, tmp_path / "out",
                           verbose=False)
    manifest = json.loads((tmp_path / "out" / MANIFEST_NAME).read_text())
    assert manifest == {"format": 1, "generated": {}, "filtered": record} and record["seconds"] >= 0
    again = load_corpus(str(tmp_path / "out"), 320, VAL, str(tmp_path / "cache"),
                        tokenizer=str(corpus.tokenizer_path), verbose=False)
    labels = train_token_labels(again)
    assert labels.names == ("clean",) and not labels.codes.any()


def test_a_scorer_run_filters_as_its_sidecar_does(noisy, tmp_path, capsys) -> None:
    """--scorer RUN: the run's losses of every train token (each read once) written beside --out, then the filter;
    the same sidecar, the same copy and record as reference-losses --context 0 followed by --reference-losses."""
    from sparsetrain.config import build_config
    from sparsetrain.trainer import train

    folder, corpus = noisy
    run = tmp_path / "scorer"
    flags = dict(data=str(folder), cache_dir=str(tmp_path / "cache"), vocab_size=320, seq_len=32, n_layer=1, n_head=2,
                 d_model=32, batch_size=4, max_steps=4, warmup_steps=1, eval_every=0, eval_batches=1,
                 val_fraction=VAL, device="cpu", lr=1e-2, seed=fresh_seed())
    train(build_config("tiny", overrides={**flags, "out_dir": str(run)}), verbose=False)
    drop = 0.3
    assert main(["corpus", "filter", "--corpus", str(folder), "--scorer", str(run), "--drop", str(drop),
                 "--out", str(tmp_path / "a"), "--val-fraction", str(VAL), "--device", "cpu", "--batch-size", "3"]) == 0
    argv = ["reference-losses", "--ckpt", str(run), "--out", str(tmp_path / "s.f16"), "--preset", "tiny", "--context", "0"]
    for k, v in flags.items():
        argv += [f"--{k.replace('_', '-')}", str(v)]
    assert main(argv) == 0
    before = (run / "ckpt.pt").read_bytes()
    for clash, needle in ((run / "ckpt.pt", "is a file of the run"), (run, "is a run folder")):  # the run's own files
        clashing = list(argv)
        clashing[clashing.index("--out") + 1] = str(clash)
        assert main(clashing) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and needle in err[0], err
    assert (run / "ckpt.pt").read_bytes() == before
    assert main(["corpus", "filter", "--corpus", str(folder), "--tokenizer", str(run / "tokenizer.json"),
                 "--reference-losses", str(tmp_path / "s.f16"), "--drop", str(drop), "--out", str(tmp_path / "b"),
                 "--val-fraction", str(VAL)]) == 0
    capsys.readouterr()
    assert (tmp_path / "a.losses.f16").read_bytes() == (tmp_path / "s.f16").read_bytes()
    header = json.loads((tmp_path / "a.losses.f16.json").read_text())
    assert header["context"] == 0 and header["reference"] == str((run / "ckpt.pt").resolve())
    files = {d: sorted(p.relative_to(tmp_path / d).as_posix() for p in (tmp_path / d).rglob("*") if p.is_file())
             for d in ("a", "b")}
    assert files["a"] == files["b"] and len(files["a"]) < sum(1 for p in folder.rglob("*") if p.is_file())
    ra, rb = (json.loads((tmp_path / d / MANIFEST_NAME).read_text())["filtered"] for d in ("a", "b"))
    assert ra["reference_losses"] == str(tmp_path / "a.losses.f16")
    for k in ("seconds", "reference_losses"):
        ra.pop(k), rb.pop(k)
    assert ra == rb

    base = ["corpus", "filter", "--corpus", str(folder), "--drop", "0.3", "--val-fraction", str(VAL)]
    for extra, needle in [(["--out", str(tmp_path / "c")], "give one of --reference-losses FILE"),
                          (["--scorer", str(run), "--reference-losses", str(tmp_path / "s.f16"), "--out",
                            str(tmp_path / "c")], "give one of --reference-losses FILE"),
                          (["--reference-losses", str(tmp_path / "s.f16"), "--out", str(tmp_path / "c")],
                           "--reference-losses needs --tokenizer"),
                          (["--scorer", str(tmp_path / "nope"), "--out", str(tmp_path / "c")], "no checkpoint at"),
                          (["--scorer", str(run), "--batch-size", "0", "--out", str(tmp_path / "c")],
                           "--batch-size must be >= 1, got 0"),
                          (["--scorer", str(run), "--device", "tpu", "--out", str(tmp_path / "c")],
                           "--device must be auto, cpu, cuda or cuda:N, got 'tpu'")]:
        assert main(base + extra) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("sparsetrain: error:") and needle in err[0], (extra, err)
    assert not (tmp_path / "c").exists()
    # a scorer of another vocabulary than the corpus's tokenizer, and one of the same size but another tokenizer
    other = tmp_path / "other"
    train(build_config("tiny", overrides={**flags, "vocab_size": 300, "out_dir": str(other)}), verbose=False)
    tok = ["--tokenizer", str(run / "tokenizer.json")]
    assert main(base + ["--scorer", str(other), *tok, "--out", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"scorer {other} has vocab_size 300, fewer than the corpus's 320" in err[0], err
    same_size = tmp_path / "same_size"
    # another split (a smaller val_fraction: the built corpus refuses a larger one) trains another BPE
    train(build_config("tiny", overrides={**flags, "val_fraction": 0.05, "out_dir": str(same_size)}), verbose=False)
    assert main(base + ["--scorer", str(same_size), *tok, "--out", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"scorer {same_size} was trained with another tokenizer than this corpus" in err[0], err
    assert not (tmp_path / "c").exists()
    # a run whose vocab_size is larger than its BPE learned (a small corpus): scores with its own tokenizer
    large = tmp_path / "large"
    train(build_config("tiny", overrides={**flags, "vocab_size": 4096, "out_dir": str(large)}), verbose=False)
    from sparsetrain.tokenizer import BPETokenizer

    assert BPETokenizer.load(large / "tokenizer.json").vocab_size < 4096  # what was refused before
    assert main(base + ["--scorer", str(large), "--out", str(tmp_path / "d")]) == 0, capsys.readouterr().err
    assert (tmp_path / "d" / MANIFEST_NAME).is_file()


def test_a_drop_that_would_leave_no_train_document_is_refused() -> None:
    """Two documents, the smaller one hardest: a drop of 0.5 takes it (0.1 of the tokens),
    then the other, and nothing would be left to train on: refused, naming the drop;
    the other order leaves the small one in."""
    from sparsetrain.corpus_filter import DocumentLosses, choose_left_out
    from sparsetrain.errors import DataError

    rng = np.random.default_rng(fresh_seed())
    small, large = int(rng.integers(5, 20)), int(rng.integers(60, 200))
    docs = DocumentLosses(names=("a.py", "b.py"), tokens=np.array([small, large]), mean_loss=np.array([5.0, 1.0]))
    with pytest.raises(DataError, match=r"--drop 0.5 leaves out every one of the 2 train documents"):
        choose_left_out(docs, 0.5)
    flipped = DocumentLosses(names=docs.names, tokens=docs.tokens, mean_loss=np.array([1.0, 5.0]))
    assert choose_left_out(flipped, 0.5).tolist() == [False, True]


def test_a_filtered_copy_is_refused_at_a_larger_val_fraction(noisy, tmp_path, capsys) -> None:
    """Files held out at a larger val_fraction than the filter's were train files to it and
    may be gone: loading the copy at one is refused in one line; at the filter's own or a
    smaller one it loads, with the source's held-out tokens at the filter's."""
    folder, corpus = noisy
    seed = fresh_seed()
    filter_corpus(corpus, None, 0.4, tmp_path / "out", verbose=False, random_seed=seed, val_fraction=VAL)
    assert json.loads((tmp_path / "out" / MANIFEST_NAME).read_text())["filtered"]["val_fraction"] == VAL
    from sparsetrain.errors import DataError

    with pytest.raises(DataError, match=rf"filtered at val_fraction {VAL}: training it at val_fraction 0.3 "):
        load_corpus(str(tmp_path / "out"), 320, 0.3, str(tmp_path / "cache"), tokenizer=str(corpus.tokenizer_path),
                    verbose=False)
    same = load_corpus(str(tmp_path / "out"), 320, VAL, str(tmp_path / "cache"), tokenizer=str(corpus.tokenizer_path),
                       verbose=False)
    assert np.array_equal(np.asarray(same.val), np.asarray(corpus.val))
    load_corpus(str(tmp_path / "out"), 320, VAL / 2, str(tmp_path / "cache"), tokenizer=str(corpus.tokenizer_path),
                verbose=False)
    code = main(["train", "--preset", "tiny", "--device", "cpu", "--data", str(tmp_path / "out"), "--tokenizer",
                 str(corpus.tokenizer_path), "--val-fraction", "0.3", "--max-steps", "1",
                 "--out-dir", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2 and "val_fraction 0.3" in err and len(err.strip().splitlines()) == 1, err


def test_empty_or_nameless_paths_are_refused(noisy, tmp_path, monkeypatch, capsys) -> None:
    """``--corpus ''`` is no folder (Path('') is the current one); an ``--out`` of '' or . names no new folder."""
    folder, corpus = noisy
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.chdir(empty)  # an empty current folder: what '' and . stand for passes the --out checks
    base = ["corpus", "filter", "--tokenizer", str(corpus.tokenizer_path), "--random-seed", "1", "--drop", "0.3",
            "--val-fraction", str(VAL)]
    for extra, needle in [(["--corpus", "", "--out", str(tmp_path / "a")], "--corpus must not be empty"),
                          (["--corpus", str(folder), "--out", ""], "--out must not be empty"),
                          (["--corpus", str(folder), "--out", "."], "--out . names no folder of its own")]:
        assert main(base + extra) == 2, extra
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("sparsetrain: error:") and needle in err[0], err
    assert not list(empty.iterdir()) and not (tmp_path / "a").exists()
