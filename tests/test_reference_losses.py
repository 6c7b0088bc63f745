"""The reference-loss sidecar: computed once, aligned with the train stream and train_batch windows."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from sparsetrain.cli import main
from sparsetrain.data import train_window_starts
from sparsetrain.errors import ConfigError, DataError
from sparsetrain.generate import load_model
from sparsetrain.reference_losses import ReferenceLosses, header_path, sidecar_windows
from sparsetrain.trainer import Trainer, train

from conftest import fresh_seed


@pytest.mark.parametrize("n, L", [(33, 32), (34, 32), (100, 32), (1000, 32), (257, 16), (1001, 7), (50, 1)])
@pytest.mark.parametrize("context", [None, 0, "max"])
def test_sidecar_windows_cover_every_target_once_with_context(n: int, L: int, context) -> None:
    c = {None: L - max(1, L // 2), 0: 0, "max": L - 1}[context]
    windows = sidecar_windows(n, L) if context is None else sidecar_windows(n, L, c)
    covered = []
    for w, lo, hi in windows:
        assert 0 <= w and w + L <= n - 1 and w <= lo < hi <= w + L  # inputs w..w+L-1, targets up to w+L
        covered += range(lo, hi)
        assert w == 0 or lo - w >= c  # at least c tokens of context
    assert covered == list(range(n - 1))
    for w, _, _ in windows:
        assert all(_naive_window(i, n, L, c) == w for i in range(*next((lo, hi) for v, lo, hi in windows if v == w)))


def test_sidecar_context_out_of_range_is_refused() -> None:
    with pytest.raises(DataError, match=r"--context must be in \[0, 32\) \(the reference's seq_len\), got 32"):
        sidecar_windows(100, 32, 32)
    with pytest.raises(DataError, match="got -1"):
        sidecar_windows(100, 32, -1)


def _naive_window(i: int, n: int, L: int, context: int | None = None) -> int:
    """Where the sidecar's window for position ``i`` starts, derived directly from the rule:
    the first window [0, L) keeps all; the windows at multiples of S = L - context keep
    their last S positions; a final window ending at the stream's end keeps the rest."""
    c = L - max(1, L // 2) if context is None else context
    S = L - c
    if i < L:
        return 0
    w = (i - c) // S * S  # the multiple of S whose last S positions hold i
    return w if w + L <= n - 1 else n - 1 - L


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, corpus_dir, cache_dir):
    from sparsetrain.config import build_config

    out = tmp_path_factory.mktemp("ref") / "run"
    flags = dict(data=str(corpus_dir), cache_dir=str(cache_dir), vocab_size=320, seq_len=32, n_layer=2, n_head=2,
                 d_model=32, batch_size=4, max_steps=8, warmup_steps=2, eval_every=0, eval_batches=2, val_fraction=0.1,
                 device="cpu", lr=1e-2)
    train(build_config("tiny", overrides={**flags, "out_dir": str(out)}), verbose=False)
    sidecar = out.parent / "ref_losses.f16"
    argv = ["reference-losses", "--ckpt", str(out), "--out", str(sidecar), "--preset", "tiny"]
    for k, v in flags.items():
        argv += [f"--{k.replace('_', '-')}", str(v)]
    assert main(argv + ["--batch-size", "3"]) == 0
    return out, sidecar, flags


def test_an_existing_sidecar_is_not_overwritten(reference_run, capsys) -> None:
    """reference-losses refuses an --out that exists (as corpus filter does), in one
    line, before reading anything, and leaves the file as it was."""
    run, sidecar, flags = reference_run
    before = sidecar.read_bytes()
    argv = ["reference-losses", "--ckpt", str(run), "--out", str(sidecar), "--preset", "tiny"]
    for k, v in flags.items():
        argv += [f"--{k.replace('_', '-')}", str(v)]
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"--out {sidecar} exists" in err[0], err
    assert sidecar.read_bytes() == before
    # a sidecar without its header (a run killed between the two writes) is written again
    killed = sidecar.parent / "killed.f16"
    killed.write_bytes(b"\0" * 6)
    argv[argv.index("--out") + 1] = str(killed)
    assert main(argv) == 0
    assert header_path(killed).is_file()
    # the same run's losses (another batch size than the fixture's: equal up to float16 rounding)
    got, want = (np.frombuffer(b, dtype=np.float16).astype(np.float64) for b in (killed.read_bytes(), before))
    assert got.shape == want.shape and np.allclose(got, want, rtol=2e-3, atol=2e-3)


def test_sidecar_equals_an_online_reference_forward(reference_run, make_cfg) -> None:
    run, sidecar, _ = reference_run
    corpus = Trainer(make_cfg(), verbose=False).corpus
    tokens = np.asarray(corpus.train, dtype=np.int64)
    n, L = tokens.size, 32
    losses = np.memmap(sidecar, dtype=np.float16, mode="r")
    header = json.loads(Path(str(sidecar) + ".json").read_text())
    assert losses.size == n == header["n_tokens"] and header["seq_len"] == L and losses[-1] == 0
    assert header["windows"] == len(sidecar_windows(n, L)) and header["seconds"] > 0
    trained = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert header["reference_train_seconds"] == [r for r in trained if "train_seconds" in r][-1]["train_seconds"]
    model = load_model(run).double()

    @torch.no_grad()
    def online(start: int) -> np.ndarray:  # the reference's losses over the window of L inputs at `start`
        x = torch.from_numpy(tokens[start : start + L + 1])
        logits, _ = model(x[None, :-1])
        return F.cross_entropy(logits[0], x[1:], reduction="none").numpy()

    rng = np.random.default_rng(0)
    for i in list(rng.integers(0, n - 1, size=60)) + [0, 1, L - 1, L, n - 2, n - L - 1]:
        w = _naive_window(int(i), n, L)
        assert losses[i] == pytest.approx(online(w)[i - w], rel=2e-3, abs=2e-3), i
    # a train_batch window that starts where a sidecar window does: the online forward over the
    # training window itself gives the sidecar's entries past the first L - H positions
    H = L // 2
    for start in (H * 3, H * 10, 0):
        got, want = losses[start : start + L].astype(np.float64), online(start)
        first = 0 if start == 0 else L - H
        np.testing.assert_allclose(got[first:], want[first:], rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("score", ["excess", "reference"])
def test_trainer_reads_the_sidecar_for_each_micro_batch(reference_run, make_cfg, tmp_path: Path, score: str) -> None:
    _, sidecar, _ = reference_run
    cfg = make_cfg(out_dir=str(tmp_path / "t"), use_collider=True, collider_score=score, collider_sparsity=0.5,
                   collider_method="topk", reference_losses=str(sidecar), grad_accum=2, max_steps=3)
    t = Trainer(cfg, verbose=False)
    losses = np.memmap(sidecar, dtype=np.float16, mode="r")
    tokens = np.asarray(t.corpus.train, dtype=np.int64)
    seen = []
    real_batch, real_ref = t._batch, t.objective.reference_nll  # the objective calls the trainer's reader
    t._batch = lambda micro: seen.append(["batch", t.step, micro, real_batch(micro)]) or seen[-1][3]
    t.objective.reference_nll = lambda x, y: seen.append(["ref", x, y, real_ref(x, y)]) or seen[-1][3]
    t.fit()
    pairs = list(zip(seen[0::2], seen[1::2]))
    assert [(b[1], b[2]) for b, _ in pairs] == [(s, m) for s in range(3) for m in range(2)]
    for (_, step, micro, (x, y)), (_, xr, yr, ref) in pairs:
        assert torch.equal(x, xr) and torch.equal(y, yr)
        starts = train_window_starts(tokens.size, 4, 32, seed=cfg.seed, step=step, micro=micro)
        # the windows the sidecar was read at are the batch's: its targets are the tokens after each position
        assert torch.equal(y, torch.from_numpy(tokens[starts[:, None] + 1 + np.arange(32)]))
        want = torch.from_numpy(losses[starts[:, None] + np.arange(32)].astype(np.float32))
        assert torch.equal(ref, want)


def test_sidecar_for_other_tokens_is_refused(reference_run, make_cfg, tmp_path: Path) -> None:
    _, sidecar, _ = reference_run
    with pytest.raises(DataError, match="computed for other train tokens"):
        ReferenceLosses(sidecar, np.arange(100, dtype=np.uint16))
    with pytest.raises(DataError, match="no such sidecar"):
        ReferenceLosses(tmp_path / "nope", np.arange(100, dtype=np.uint16))
    with pytest.raises(ConfigError, match="two sources of one reference"):
        make_cfg(reference_losses=str(sidecar), reference_ckpt="x", use_collider=True, collider_score="excess")
    for score in ("excess", "reference"):
        with pytest.raises(ConfigError, match=f"collider_score = {score} needs training.reference_ckpt or reference_losses"):
            make_cfg(use_collider=True, collider_score=score)
    with pytest.raises(ConfigError, match="selection_score = reference needs training.reference_ckpt"):
        make_cfg(selection="loss", selection_score="reference")


def test_a_reference_no_score_reads_is_refused(make_cfg, tmp_path: Path, capsys) -> None:
    """A reference set where no token filter's score reads it would be loaded (a run: forwarded every micro-batch)
    for nothing: refused in one line naming the field and the score, in config and on the command line."""
    for source in ({"reference_ckpt": "runs/ref"}, {"reference_losses": str(tmp_path / "ref.f16")}):
        name = next(iter(source))
        with pytest.raises(ConfigError, match=f"training.{name} is read by a token filter's excess or reference score"):
            make_cfg(**source)
        for score in ("loss", "collider", "entropy"):
            with pytest.raises(ConfigError, match=f"training.{name} is read by the excess and reference scores only; "
                                                  f"collider_score is '{score}'"):
                make_cfg(use_collider=True, collider_score=score, collider_sparsity=0.5, **source)
        with pytest.raises(ConfigError, match=f"selection_score is 'loss': drop {name}"):
            make_cfg(selection="loss", selection_score="loss", **source)
        for score in ("excess", "reference"):  # the scores that read it are accepted
            make_cfg(use_collider=True, collider_score=score, collider_sparsity=0.5, **source)
    assert main(["train", "--preset", "tiny", "--reference-losses", "x.f16", "--max-steps", "1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--reference-losses is read by a token filter's" in err


def test_reference_with_another_tokenizer_is_refused(reference_run, tmp_path: Path, capsys) -> None:
    run, _, flags = reference_run
    argv = ["reference-losses", "--ckpt", str(run), "--out", str(tmp_path / "x.f16"), "--preset", "tiny"]
    for k, v in {**flags, "val_fraction": 0.2}.items():  # another split: another BPE
        argv += [f"--{k.replace('_', '-')}", str(v)]
    assert main(argv) == 2
    assert "trained with another tokenizer" in capsys.readouterr().err


def test_sidecar_without_overlap_reads_each_token_once(reference_run, make_cfg, tmp_path: Path) -> None:
    """--context 0: windows side by side (about half as many), each entry the reference's loss in its own
    window, recorded in the header."""
    run, sidecar, flags = reference_run
    out = tmp_path / "once.f16"
    argv = ["reference-losses", "--ckpt", str(run), "--out", str(out), "--preset", "tiny", "--context", "0"]
    for k, v in flags.items():
        argv += [f"--{k.replace('_', '-')}", str(v)]
    assert main(argv) == 0
    header = json.loads(Path(str(out) + ".json").read_text())
    full = json.loads(Path(str(sidecar) + ".json").read_text())
    tokens = np.asarray(Trainer(make_cfg(), verbose=False).corpus.train, dtype=np.int64)
    n, L = tokens.size, 32
    assert header["context"] == 0 and full["context"] == L // 2
    assert header["windows"] == len(sidecar_windows(n, L, 0)) <= full["windows"] // 2 + 2
    model = load_model(run).double()
    losses = np.memmap(out, dtype=np.float16, mode="r")
    rng = np.random.default_rng(fresh_seed())
    for i in list(rng.integers(0, n - 1, size=40)) + [0, L - 1, L, n - 2]:
        w = _naive_window(int(i), n, L, 0)
        x = torch.from_numpy(tokens[w : w + L + 1])
        with torch.no_grad():
            logits, _ = model(x[None, :-1])
        want = F.cross_entropy(logits[0], x[1:], reduction="none").numpy()[i - w]
        assert losses[i] == pytest.approx(want, rel=2e-3, abs=2e-3), i


def test_a_negative_context_is_refused_before_the_corpus_is_read(reference_run, tmp_path: Path, capsys,
                                                                   monkeypatch) -> None:
    """One line naming the value, exit 2, and no corpus built for it."""
    from sparsetrain import trainer

    run, _, flags = reference_run
    monkeypatch.setattr(trainer, "load_run_corpus", lambda cfg: pytest.fail("the corpus was read"))
    argv = ["reference-losses", "--ckpt", str(run), "--out", str(tmp_path / "x.f16"), "--preset", "tiny",
            "--context", "-3"]
    for k, v in flags.items():
        argv += [f"--{k.replace('_', '-')}", str(v)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "--context must be >= 0, got -3" in err and err.count("\n") == 1


def test_a_damaged_sidecar_is_refused_in_one_line(tmp_path: Path, capsys) -> None:
    """A sidecar cut short, or a header that does not parse or lacks its fields, is a
    DataError naming the file (the CLI's one line), not numpy's or json's traceback;
    an intact one reads back the losses written."""
    from sparsetrain.reference_losses import SIDECAR_FORMAT, tokens_fingerprint

    rng = np.random.default_rng(fresh_seed())
    tokens = rng.integers(0, 320, size=257, dtype=np.uint16)
    losses = rng.random(tokens.size).astype(np.float16) * 8
    header = {"format": SIDECAR_FORMAT, "n_tokens": int(tokens.size), "tokens_fingerprint": tokens_fingerprint(tokens)}
    good = tmp_path / "good.f16"
    good.write_bytes(losses.tobytes())
    header_path(good).write_text(json.dumps(header))
    assert np.array_equal(np.asarray(ReferenceLosses(good, tokens).losses), losses)
    cut = tmp_path / "cut.f16"
    cut.write_bytes(losses.tobytes()[: rng.integers(1, 2 * tokens.size)])
    header_path(cut).write_text(json.dumps(header))
    with pytest.raises(DataError, match=f"{cut}.* bytes where its 257 float16 losses take 514: a damaged copy"):
        ReferenceLosses(cut, tokens)
    for name, text, needle in [("garbled", "{", "cannot be read"),
                               ("partial", json.dumps({"format": SIDECAR_FORMAT}), "lacks n_tokens, tokens_fingerprint")]:
        path = tmp_path / f"{name}.f16"
        path.write_bytes(losses.tobytes())
        header_path(path).write_text(text)
        with pytest.raises(DataError, match=needle):
            ReferenceLosses(path, tokens)
