"""Token labels by kind of document, and the kept-share audit of token selection.

Labels are checked against an independent reading of the corpus folder (its
files, the manifest, each document encoded on its own); the logged shares
against a recount in numpy of the keep masks the selector handed out."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from test_evaluate import write_python_corpus
from test_objectives import assert_two_steps_read_nothing_back
from sparsetrain import token_labels as TL
from sparsetrain.corpora import MANIFEST_NAME, CorpusSpec, build_corpus, train_only_path
from sparsetrain.data import is_val_file, load_corpus, train_window_starts
from sparsetrain.metrics import MetricWindow
from sparsetrain.race import Arm, format_table, interleave_order, race_report
from sparsetrain.selection import TokenSelector
from sparsetrain.tokenizer import EOT
from sparsetrain.trainer import Trainer, train

VAL = 0.1
KINDS = ("clean", "boilerplate", "duplicate", "minified", "random", "table")
# a train file whose text spells the end-of-text token: the tokenizer makes that token inside the document
MARKED = "marked.py"


def _build(root: Path) -> Path:
    src = write_python_corpus(root / "src", n_files=40, seed=5)
    assert not is_val_file(MARKED, VAL)
    (src / MARKED).write_text(f'SEP = "{EOT}"\n\n\ndef split(text):\n    return text.split(SEP)\n\n\nEND = "x{EOT}{EOT}y"\n')
    out = root / "corpus"
    build_corpus(CorpusSpec(src=str(src), out=str(out), val_fraction=VAL, noise_fraction=0.4, duplicate_fraction=0.1,
                            seed=2), verbose=False)
    return out


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A ``corpus build`` folder: Python files, all four noise kinds, duplicates."""
    return _build(tmp_path_factory.mktemp("labels"))


def reference_documents(folder: Path) -> list[tuple[str, str, str]]:
    """``(relative path, text, kind)`` of the train documents in stream order, read
    independently of the loader: every non-hidden file holding more than
    whitespace, sorted by path, the hash split, the kind from the manifest."""
    generated = json.loads((folder / MANIFEST_NAME).read_text())["generated"]
    docs = []
    for p in sorted(folder.rglob("*"), key=lambda p: p.relative_to(folder).as_posix()):
        rel = p.relative_to(folder).as_posix()
        if p.is_file() and not rel.startswith(".") and not is_val_file(rel, VAL):
            text = p.read_bytes().decode("utf-8", errors="replace")
            if text.strip():
                docs.append((rel, text, generated[rel]["kind"] if rel in generated else "clean"))
    return docs


def reference_labels(folder: Path, tokenizer) -> np.ndarray:
    """Every train token's label code (KINDS order), each document encoded on its own."""
    docs = reference_documents(folder)
    lengths = [len(tokenizer.encode(text)) + 1 for _, text, _ in docs]  # + its end-of-text token
    return np.repeat(np.array([KINDS.index(kind) for _, _, kind in docs], dtype=np.uint8), lengths)


# ----------------------------------------------------------------------------- labels


def test_labels_are_exact(built: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    corpus = load_corpus(str(built), 320, VAL, tmp_path / "cache", verbose=False)
    tok, tokens = corpus.tokenizer, np.asarray(corpus.train)
    docs = reference_documents(built)
    assert list(corpus.train_doc_names) == [rel for rel, _, _ in docs]
    assert {kind for _, _, kind in docs} == set(KINDS)
    # the marked file (and its duplicate, if one was made) spells end-of-text, as text: one separator a document
    assert any(EOT in text for _, text, _ in docs) and (tokens == tok.eot_id).sum() == len(docs)
    with monkeypatch.context() as m:  # the end-of-text scan: only the documents that spell the token are encoded
        m.setattr(tok, "encode_batch", lambda texts: pytest.fail("every document encoded again"))
        encoded: list[str] = []
        m.setattr(tok, "encode", lambda text, encode=tok.encode: encoded.append(text) or encode(text))
        labels = TL.train_token_labels(corpus)
    assert encoded and all(EOT in text for text in encoded)
    assert labels.names == KINDS and labels.codes.dtype == np.uint8 and labels.codes.shape == tokens.shape
    starts = TL.document_starts(tokens, [text for _, text, _ in docs], tok)
    ends = [*starts[1:], tokens.size]
    for (rel, text, kind), a, b in zip(docs, starts, ends):
        assert tokens[a] == tok.eot_id and tok.decode(tokens[a + 1 : b].tolist()) == text, rel
        assert (labels.codes[a:b] == KINDS.index(kind)).all(), rel  # its end-of-text token included
    assert np.array_equal(labels.codes, reference_labels(built, tok))
    # where the count of end-of-text tokens disagrees, every document is encoded again: the same labels
    monkeypatch.setattr(TL, "EOT", "\0not in any text")
    assert np.array_equal(TL.train_token_labels(corpus).codes, labels.codes)


def _char_starts(text: str, ids: list[int], byte_lengths: list[int]) -> list[int]:
    """Where each token of ``text`` starts, in characters: the tokens' byte lengths summed, each byte
    offset mapped to the character holding it (a character split over several tokens: each of them
    starts at that character)."""
    char_of_byte = [i for i, ch in enumerate(text) for _ in ch.encode("utf-8")] + [len(text)]
    starts, pos = [], 0
    for t in ids:
        starts.append(char_of_byte[pos])
        pos += byte_lengths[t]
    assert pos == len(text.encode("utf-8"))
    return starts


def test_labels_of_noise_inside_files_are_exact(tmp_path: Path) -> None:
    """Noise spliced inside clean files: each token of a mixed file gets the kind of the span holding
    its first character, found independently from the tokens' byte lengths; the sources include
    non-ASCII text, CRLF line ends, a byte-order mark and invalid UTF-8."""
    src = write_python_corpus(tmp_path / "src", n_files=30, seed=int(np.random.SeedSequence().entropy % 1000))
    odd = ["\ufeff# café → naïve 🙂\r\nx = 'ß'\r\n" * 400, "def f():\n    return '→'\n" * 600 + "no newline → end"]
    for i, text in enumerate(odd):  # large files, at paths that may receive noise, so they draw most pieces
        (src / train_only_path(f"odd{i}", ".py")).write_text(text, encoding="utf-8", newline="")
    (src / train_only_path("bad", ".py")).write_bytes(b"y = 1\n" * 500 + b"z = '\xff\xc3'\n" * 300)
    out = tmp_path / "corpus"
    manifest = build_corpus(CorpusSpec(src=str(src), out=str(out), val_fraction=VAL, noise_fraction=0.6,
                                       noise_placement="inside", seed=4), verbose=False)
    corpus = load_corpus(str(out), 320, VAL, tmp_path / "cache", verbose=False)
    labels = TL.train_token_labels(corpus)
    tok, tokens = corpus.tokenizer, np.asarray(corpus.train)
    byte_lengths = tok.byte_lengths()
    docs = reference_documents(out)
    assert labels.names == ("clean", "boilerplate", "minified", "random", "table")
    starts = TL.document_starts(tokens, [text for _, text, _ in docs], tok)
    ends = [*starts[1:], tokens.size]
    seen, odd_mixed = set(), 0
    for (rel, text, _), a, b in zip(docs, starts, ends):
        assert labels.codes[a] == 0, rel  # the separator of a clean file
        spans = manifest["generated"].get(rel, {}).get("inserted", [])
        odd_mixed += bool(spans) and any(ord(c) > 127 for c in text)
        for i, first in enumerate(_char_starts(text, tokens[a + 1 : b].tolist(), byte_lengths)):
            kind = next((k for s, e, k in spans if s <= first < e), "clean")
            assert labels.names[labels.codes[a + 1 + i]] == kind, (rel, i)
            seen.add(kind)
    assert seen == set(labels.names)
    assert odd_mixed, "no file with non-ASCII text before a span received noise: the test checks less than it says"


def test_targets_of_windows(built: Path, tmp_path: Path) -> None:
    corpus = load_corpus(str(built), 320, VAL, tmp_path / "cache", verbose=False)
    labels = TL.train_token_labels(corpus)
    starts = train_window_starts(corpus.train.size, 5, 16, seed=3, step=7, micro=1)
    got = labels.targets(starts, 16)
    assert got.dtype == torch.uint8 and got.shape == (5, 16)
    for row, s in zip(got.numpy(), starts):
        assert list(row) == list(labels.codes[s + 1 : s + 17])


def test_no_labels_without_a_manifest(built: Path, corpus_dir: Path, tmp_path: Path) -> None:
    plain = load_corpus(str(corpus_dir), 320, VAL, tmp_path / "cache", verbose=False)
    assert TL.read_manifest(plain) is None and TL.train_token_labels(plain) is None
    # one text file is cut into train and val: no document is a file
    single = load_corpus(str(built / "mod0.py"), 320, VAL, tmp_path / "cache", verbose=False)
    assert single.train_doc_names == () and TL.train_token_labels(single) is None
    np.asarray(plain.train).tofile(tmp_path / "t.bin")
    assert TL.train_token_labels(load_corpus(str(tmp_path / "t.bin"), 320, VAL, verbose=False)) is None


def test_label_counts_and_shares() -> None:
    labels = torch.tensor([[0, 1, 1, 2], [2, 2, 0, 0]], dtype=torch.uint8)
    keep = torch.tensor([[True, False, True, True], [False, False, True, False]])
    counts = TL.label_counts(labels, keep, 4)
    assert counts.tolist() == [1, 1, 2, 0, 2, 1, 1, 0]  # not kept per label, then kept per label
    w = MetricWindow(("clean", "a", "b", "c"))
    w.add({"label_counts": counts, "backward_ms": 1.0})
    w.end_step(1, 1.0, 0.0, 1e-3)
    w.add({"label_counts": TL.label_counts(labels[:1], ~keep[:1], 4), "backward_ms": 1.0})
    w.end_step(2, 1.0, 0.0, 1e-3)
    rows = w.rows(8, 1.0)
    want = {"kept_share/clean": round(2 / 4, 4), "kept_share/a": round(2 / 4, 4), "kept_share/b": round(1 / 4, 4),
            "kept_share/c": None, "batch_share/clean": round(4 / 12, 4), "batch_share/a": round(4 / 12, 4),
            "batch_share/b": round(4 / 12, 4), "batch_share/c": 0.0}
    for row in rows:
        assert {k: row[k] for k in want} == want and "label_counts" not in row


# ----------------------------------------------------------------------------- the trainer's audit


def _rows(cfg) -> list[dict]:
    return [json.loads(l) for l in (Path(cfg.out_dir) / "metrics.jsonl").read_text().splitlines()]


def _share_keys(row: dict) -> list[str]:
    return [k for k in row if k.startswith(("kept_share/", "batch_share/"))]


@pytest.mark.parametrize("objective", [
    {"use_collider": True, "collider_sparsity": 0.5, "collider_method": "topk", "collider_score": "loss"},
    {"selection": "loss", "selection_method": "topk", "keep_ratio": 0.4, "selection_score": "loss"},
])
def test_logged_shares_equal_a_recount(built: Path, make_cfg, monkeypatch: pytest.MonkeyPatch,
                                       objective: dict) -> None:
    calls: list[tuple[torch.Tensor, torch.Tensor]] = []
    original = TokenSelector.__call__

    def recording(self, logits, targets, *args, **kwargs):
        keep, stats = original(self, logits, targets, *args, **kwargs)
        calls.append((targets.detach().clone(), keep.detach().clone()))
        return keep, stats

    monkeypatch.setattr(TokenSelector, "__call__", recording)
    steps, accum, log_every, B, T = 6, 2, 2, 4, 32
    cfg = make_cfg(data=str(built), max_steps=steps, grad_accum=accum, log_every=log_every, eval_every=0, **objective)
    t = Trainer(cfg, verbose=False)
    t.fit()
    assert len(calls) == steps * accum
    codes = reference_labels(built, t.corpus.tokenizer)
    tokens = np.asarray(t.corpus.train)
    kept = np.zeros((steps, len(KINDS)), dtype=np.int64)
    total = np.zeros((steps, len(KINDS)), dtype=np.int64)
    for i, (y, keep) in enumerate(calls):
        step, micro = divmod(i, accum)
        idx = train_window_starts(tokens.size, B, T, seed=cfg.seed, step=step, micro=micro)[:, None] + 1 + np.arange(T)
        assert np.array_equal(tokens[idx], y.numpy())  # the windows the selector saw
        lab, k = codes[idx].ravel(), keep.numpy().ravel()
        kept[step] += np.bincount(lab[k], minlength=len(KINDS))
        total[step] += np.bincount(lab, minlength=len(KINDS))
    train_rows = [r for r in _rows(cfg) if r["kind"] == "train"]
    assert [r["step"] for r in train_rows] == list(range(1, steps + 1))
    for r in train_rows:
        window = slice((r["step"] - 1) // log_every * log_every, ((r["step"] - 1) // log_every + 1) * log_every)
        k, n = kept[window].sum(0).tolist(), total[window].sum(0).tolist()  # Python ints: Python's rounding
        assert sorted(_share_keys(r)) == sorted([f"kept_share/{x}" for x in KINDS] + [f"batch_share/{x}" for x in KINDS])
        for j, kind in enumerate(KINDS):
            assert r[f"kept_share/{kind}"] == (round(k[j] / n[j], 4) if n[j] else None), (r["step"], kind)
            assert r[f"batch_share/{kind}"] == round(n[j] / sum(n), 4), (r["step"], kind)
        assert sum(r[f"batch_share/{x}"] for x in KINDS) == pytest.approx(1.0, abs=1e-3)
        assert r["kept_fraction"] == pytest.approx(sum(kept[r["step"] - 1]) / sum(total[r["step"] - 1]), abs=1e-4)


def test_the_audit_changes_nothing_else(built: Path, make_cfg, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Random selection (the selector's own generator) with and without the audit: the same masks, losses and rows."""
    masks: dict[str, list[torch.Tensor]] = {"on": [], "off": []}
    original = TokenSelector.__call__
    which = ["on"]

    def recording(self, *args, **kwargs):
        keep, stats = original(self, *args, **kwargs)
        masks[which[0]].append(keep.clone())
        return keep, stats

    monkeypatch.setattr(TokenSelector, "__call__", recording)
    kw = dict(data=str(built), max_steps=5, grad_accum=2, use_collider=True, collider_sparsity=0.5,
              collider_method="random")
    on = train(make_cfg(out_dir=str(tmp_path / "on"), **kw), verbose=False)
    which[0] = "off"
    monkeypatch.setattr("sparsetrain.trainer.read_manifest", lambda corpus: None)
    off = train(make_cfg(out_dir=str(tmp_path / "off"), **kw), verbose=False)
    assert on.train_losses == off.train_losses and on.val_losses == off.val_losses
    assert len(masks["on"]) == 10 and all(torch.equal(a, b) for a, b in zip(masks["on"], masks["off"]))
    rows = {name: [r for r in _rows(make_cfg(out_dir=str(tmp_path / name), **kw)) if r["kind"] == "train"]
            for name in ("on", "off")}
    timing = ("tokens_per_s", "backward_ms")
    for a, b in zip(rows["on"], rows["off"]):
        assert _share_keys(a) and not _share_keys(b)
        assert {k: v for k, v in a.items() if k not in timing and k not in _share_keys(a)} == \
            {k: v for k, v in b.items() if k not in timing}


def test_no_shares_for_dense_runs_or_plain_corpora(built: Path, make_cfg, tmp_path: Path) -> None:
    dense = make_cfg(data=str(built), out_dir=str(tmp_path / "dense"), max_steps=3)
    plain = make_cfg(out_dir=str(tmp_path / "plain"), max_steps=3, use_collider=True, collider_sparsity=0.5,
                     collider_method="topk")
    for cfg in (dense, plain):
        t = Trainer(cfg, verbose=False)
        assert t.token_labels is None and t.metric_window.label_names == ()
        t.fit()
    for cfg in (dense, plain):
        rows = [r for r in _rows(cfg) if r["kind"] == "train"]
        assert len(rows) == 3 and not any(_share_keys(r) for r in rows)
        assert all(k in r for r in rows for k in ("loss", "grad_norm", "lr"))


@pytest.mark.parametrize("overrides, why", [
    ({"data_on_the_fly": True}, "data_on_the_fly"),
    ({"use_collider": False, "selection": "batch", "router_layers": 1}, "selection = batch"),
])
def test_the_audit_is_off_where_it_cannot_be_exact(built: Path, make_cfg, capsys, overrides: dict, why: str) -> None:
    base = {"use_collider": True, "collider_sparsity": 0.5, "collider_method": "topk"}
    t = Trainer(make_cfg(data=str(built), **{**base, **overrides}), verbose=True)
    assert t.token_labels is None
    notices = [line for line in capsys.readouterr().out.splitlines() if "kept_share" in line]
    assert len(notices) == 1 and notices[0].startswith("kept_share audit off: ") and why in notices[0]


def test_async_loader_logs_the_same_shares(built: Path, make_cfg, tmp_path: Path) -> None:
    kw = dict(data=str(built), max_steps=4, grad_accum=2, use_collider=True, collider_sparsity=0.5,
              collider_method="topk", eval_every=0)
    sync, asyn = (make_cfg(out_dir=str(tmp_path / name), **kw, **extra)
                  for name, extra in (("s", {}), ("a", {"use_async_loader": True, "async_n_workers": 2})))
    train(sync, verbose=False)
    train(asyn, verbose=False)
    shares = [[{k: r[k] for k in _share_keys(r)} for r in _rows(cfg) if r["kind"] == "train"] for cfg in (sync, asyn)]
    assert shares[0] == shares[1] and all(shares[0])


def test_random_selection_keeps_half_of_every_kind(built: Path, make_cfg) -> None:
    """Random selection keeps each token with probability 1/2 whatever its kind: over the
    run (one log window) each kind's kept share is 1/2 within 4 binomial standard deviations
    (sampling exactly half of each batch without replacement spreads less than that)."""
    steps, B, T = 24, 8, 32
    cfg = make_cfg(data=str(built), max_steps=steps, batch_size=B, log_every=steps, eval_every=0, use_collider=True,
                   collider_sparsity=0.5, collider_method="random")
    train(cfg, verbose=False)
    row = [r for r in _rows(cfg) if r["kind"] == "train"][-1]
    for kind in KINDS:
        n = row[f"batch_share/{kind}"] * steps * B * T
        assert n > 200, (kind, n)  # enough tokens of every kind for the check to mean something
        assert abs(row[f"kept_share/{kind}"] - 0.5) <= 4 * math.sqrt(0.25 / n) + 1e-4, (kind, row[f"kept_share/{kind}"], n)


def test_the_audit_reads_nothing_back_between_log_steps(built: Path, make_cfg, monkeypatch: pytest.MonkeyPatch) -> None:
    """As test_objectives' check: two training steps of an audited run read no tensor on the host."""
    t = Trainer(make_cfg(data=str(built), log_every=3, grad_accum=2, use_collider=True, collider_sparsity=0.5,
                         collider_method="topk"), verbose=False)
    assert t.token_labels is not None
    assert_two_steps_read_nothing_back(t, monkeypatch)


# ----------------------------------------------------------------------------- race


def test_race_reports_the_mean_kept_shares(make_cfg, tmp_path: Path) -> None:
    seeds = [1, 2]
    arms = [Arm("dense", {}), Arm("scored", {"use_collider": "true"})]
    configs = {a.name: {s: make_cfg(out_dir=str(tmp_path / a.name / f"seed{s}"), seed=s) for s in seeds} for a in arms}
    rng = np.random.default_rng(0)
    want: dict[int, dict[str, float]] = {}
    for a in arms:
        for s in seeds:
            out = Path(configs[a.name][s].out_dir)
            out.mkdir(parents=True)
            rows = []
            for step in range(1, 6):
                row = {"kind": "train", "step": step, "loss": 3.0, "lr": 1e-3}
                if a.name == "scored":
                    row.update({"kept_share/clean": float(rng.uniform()), "kept_share/random": float(rng.uniform()),
                                "batch_share/clean": 0.75, "batch_share/random": 0.25})
                    if step == 2:
                        row["kept_share/random"] = None  # a window without a random token
                rows.append(row)
                rows.append({"kind": "eval", "step": step, "val_loss": 3.0 - step / 10, "train_seconds": step,
                             "startup_seconds": 0.0, "train_seconds_after_startup": step})
            (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
            if a.name == "scored":
                train_rows = [r for r in rows if r["kind"] == "train"]
                want[s] = {k: float(np.mean([r[f"kept_share/{k}"] for r in train_rows
                                             if r[f"kept_share/{k}"] is not None])) for k in ("clean", "random")}
    report = race_report(arms, configs, seeds, 5.0, interleave_order(2, 2))
    dense, scored = report["arms"]["dense"], report["arms"]["scored"]
    assert "kept_share" not in dense and all("kept_share" not in r for r in dense["runs"])
    for s, r in zip(seeds, scored["runs"]):
        assert r["kept_share"] == pytest.approx(want[s]) and r["batch_share"] == pytest.approx({"clean": 0.75, "random": 0.25})
    assert scored["kept_share"] == pytest.approx({k: (want[1][k] + want[2][k]) / 2 for k in ("clean", "random")})
    table = format_table(report).splitlines()
    assert table[-2].split() == ["arm", "clean", "random"]
    assert table[-1].split()[0] == "scored" and f"{scored['kept_share']['clean']:.3f}" in table[-1]
    assert json.loads(json.dumps(report))["arms"]["scored"]["kept_share"] == scored["kept_share"]
