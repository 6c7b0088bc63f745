"""Evaluation: held-out loss and bits per byte against a per-position float64
computation and the files' byte counts; the compile rate against stub samplers
whose outcome is known; the Wilson interval against the roots of its quadratic;
``sparsetrain eval`` end to end on a tiny trained run."""

from __future__ import annotations

import json
import math
import random
import shutil
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from sparsetrain.cli import main
from sparsetrain.config import ModelConfig, build_config
from sparsetrain.data import is_val_file, load_corpus
from sparsetrain.errors import DataError, SparsetrainError
from sparsetrain.evaluate import (
    WILSON_Z,
    NoCodePromptError,
    block_header_lines,
    code_compile_rate,
    code_prompts,
    compiles,
    cut_at_boundary,
    held_out_code_files,
    held_out_data,
    held_out_loss,
    model_sampler,
    token_byte_lengths,
    wilson_interval,
)
from sparsetrain.generate import sample
from sparsetrain.model import GPT
from sparsetrain.tokenizer import BPETokenizer
from sparsetrain.trainer import train


def python_source(rng: random.Random, n_functions: int = 4) -> str:
    """A valid Python module: top-level assignments and functions/classes with nested blocks."""
    names = ["alpha", "beta", "gamma", "delta", "value", "total", "item", "count"]
    out = [f"import math\n\nLIMIT = {rng.randint(1, 9)}\n"]
    for f in range(n_functions):
        a, b = rng.sample(names, 2)
        body = [f'    """Return the {a} of {b}."""', f"    {a} = {b} + {rng.randint(1, 5)}"]
        if rng.random() < 0.7:
            body += [f"    if {a} > LIMIT:", f"        for i in range({b}):", f"            {a} = {a} - i",
                     "    else:", f"        {a} = math.sqrt(abs({a}))"]
        if rng.random() < 0.5:
            body += [f"    while {a} > {rng.randint(10, 99)}:", f"        {a} //= 2"]
        body.append(f"    return {a}")
        if rng.random() < 0.3:
            out.append(f"class Thing{f}:\n    def method(self, {b}):\n" + "\n".join("    " + x for x in body) + "\n")
        else:
            out.append(f"def func{f}({b}):\n" + "\n".join(body) + "\n")
    return "\n\n".join(out) + "\nRESULT = func0(1) if 'func0' in dir() else None\n"


def write_python_corpus(folder: Path, n_files: int = 30, seed: int = 0) -> Path:
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n_files):
        (folder / f"mod{i}.py").write_text(python_source(rng, rng.randint(3, 6)))
    return folder


@pytest.fixture(scope="module")
def python_corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_python_corpus(tmp_path_factory.mktemp("pycorpus"))


# ----------------------------------------------------------------------------- bits per byte


def test_token_byte_lengths_are_the_utf8_bytes(tmp_path: Path) -> None:
    rng = random.Random(3)
    alphabet = "abc def\n\t()é€😀ß_:=+"
    texts = ["".join(rng.choice(alphabet) for _ in range(rng.randint(20, 200))) for _ in range(40)]
    tok = BPETokenizer.train(texts, 320)
    tok.save(tmp_path / "tok.json")
    lengths = token_byte_lengths(tmp_path / "tok.json", 400)
    assert lengths[tok.eot_id] == 0 and (lengths[tok.vocab_size:] == 0).all()
    for _ in range(20):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 100)))
        assert int(lengths[tok.encode(text)].sum()) == len(text.encode("utf-8"))


def test_loss_and_bits_per_byte_against_a_per_position_float64_computation(tmp_path: Path) -> None:
    corpus = tmp_path / "data"
    corpus.mkdir()
    for i in range(2):
        (corpus / f"m{i}.py").write_text(python_source(random.Random(i), n_functions=1))
    (corpus / "notes.txt").write_text("naïve café — ünïcode bytes 😀\n" * 3)
    tok = BPETokenizer.train([f.read_text() for f in sorted(corpus.iterdir())], 300)
    tok.save(tmp_path / "tokenizer.json")
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=320, seq_len=16, n_layer=2, n_head=2, d_model=16, ffn="swiglu")).double().eval()
    cfg = build_config("tiny", overrides=dict(vocab_size=320, seq_len=16, data=str(tmp_path / "elsewhere")))
    held = held_out_data(cfg, tok, data=str(corpus))
    tokens = np.asarray(held.tokens, dtype=np.int64)
    assert tokens.size > 3 * 16 and (tokens.size - 1) % 16  # several windows and a partial one
    result = held_out_loss(model, held.tokens, token_byte_lengths(tmp_path / "tokenizer.json", 320), batch_size=3)

    # reference: each target j predicted from the tokens since its window's start, one forward each
    T, nats, text_nats = 16, [], 0.0
    with torch.no_grad():
        for j in range(1, tokens.size):
            s = (j - 1) // T * T
            logits, _ = model(torch.tensor(tokens[s:j])[None])
            nll = -torch.log_softmax(logits[0, -1], -1)[tokens[j]].item()
            nats.append(nll)
            if tokens[j] != tok.eot_id:
                text_nats += nll
    file_bytes = sum(len(f.read_bytes()) for f in corpus.iterdir())
    assert result.n_tokens == tokens.size - 1
    assert result.n_bytes == file_bytes
    assert result.n_text_tokens == int((tokens[1:] != tok.eot_id).sum())
    assert result.loss == pytest.approx(float(np.mean(nats)), rel=1e-12)
    # every target's nats over the text's bytes, as the trainer's val_bpb (separators: nats, no bytes)
    assert result.bits_per_byte == pytest.approx(sum(nats) / (math.log(2) * file_bytes), rel=1e-12)
    assert text_nats < sum(nats)


def test_val_split_is_the_cached_val_tokens(python_corpus: Path, tmp_path: Path) -> None:
    cfg = build_config("tiny", overrides=dict(data=str(python_corpus), cache_dir=str(tmp_path / "cache"),
                                              vocab_size=320, val_fraction=0.2))
    corpus = load_corpus(cfg.data, 320, 0.2, cfg.cache_dir, verbose=False)
    held = held_out_data(cfg, corpus.tokenizer)
    np.testing.assert_array_equal(np.asarray(held.tokens), np.asarray(corpus.val))
    expected = sorted(python_corpus / f.name for f in python_corpus.iterdir() if is_val_file(f.name, 0.2))
    assert held.files == expected and 0 < len(expected) < 30
    assert held_out_code_files(cfg.data, 0.2) == expected


# ----------------------------------------------------------------------------- compile rate


def test_wilson_interval_is_the_roots_of_its_quadratic() -> None:
    rng = random.Random(1)
    cases = [(0, 1), (1, 1), (0, 20), (20, 20), (7, 20)] + [(k, n) for n in rng.sample(range(2, 500), 10)
                                                           for k in [rng.randint(0, n)]]
    for k, n in cases:
        p, z2 = k / n, WILSON_Z**2
        # the interval's ends are the p with (p_hat - p)^2 = z^2 p (1 - p) / n
        roots = np.sort(np.roots([1 + z2 / n, -(2 * p + z2 / n), p * p]).real)
        low, high = wilson_interval(k, n)
        assert low == pytest.approx(max(roots[0], 0.0), abs=1e-12)
        assert high == pytest.approx(min(roots[1], 1.0), abs=1e-12)
    assert WILSON_Z == pytest.approx(1.959963984540054, abs=1e-12)
    with pytest.raises(ValueError):
        wilson_interval(3, 2)


@pytest.mark.parametrize(
    "continuation, kept, stopped",
    [
        ("\n    return 1\n\ndef g():\n", "\n    return 1\n\n", True),
        (" # note\n    x = 1\n# comment at column 0\n    y = 2\nz = 3", " # note\n    x = 1\n# comment at column 0\n    y = 2\n", True),
        ("\n    x = 1\n    y = (", "\n    x = 1\n", False),  # the budget ran out mid-line
        ("\n    x = 1\n", "\n    x = 1\n", False),
        ("no newline at all", "", False),
        ("\nclass C:\n", "\n", True),
    ],
)
def test_cut_at_boundary(continuation: str, kept: str, stopped: bool) -> None:
    assert cut_at_boundary(continuation) == (kept, stopped)


def test_block_headers_of_a_match_statement() -> None:
    """``case`` clauses are block headers too (their node has no line number of its
    own: the pattern's is theirs); ``match`` itself opens case clauses, not statements."""
    source = ("def f(command):\n"        # 1
              "    match command:\n"     # 2
              "        case [x,\n"       # 3
              "              y]:\n"      # 4
              "            return x\n"   # 5
              "        case _:\n"        # 6
              "            return None\n")
    assert block_header_lines(source) == [1, 4, 6]


def test_prompts_end_at_a_block_header_and_have_a_compiling_reference(python_corpus: Path) -> None:
    files = sorted(python_corpus.iterdir())
    prompts = code_prompts(files, 25, seed=4)
    assert code_prompts(files, 10, seed=4) == prompts[:10]  # prompt i does not depend on n
    assert code_prompts(files, 10, seed=5) != prompts[:10]
    for p in prompts:
        text = Path(p.file).read_text()
        assert text.startswith(p.prompt) and p.prompt.endswith(":")
        assert text.startswith(p.prompt + p.reference)
        assert p.line in block_header_lines(text)
        assert not compiles(p.prompt) and compiles(p.prompt + p.reference)


def test_compile_rate_is_exactly_the_fraction_of_good_continuations(python_corpus: Path) -> None:
    files = sorted(python_corpus.iterdir())
    texts = {str(f): f.read_text() for f in files}
    rng = random.Random(7)
    verdicts: list[bool] = []

    def stub(prompt: str, max_new_tokens: int) -> str:
        rest = next(t[len(prompt):] for t in texts.values() if t.startswith(prompt))
        good = rng.random() < 0.6
        verdicts.append(good)
        # good: the file's own rest (runs past the stopping line, which must cut it);
        # bad: a syntax error inside the block, then the true rest
        return rest if good else "\n        x = )(\n" + rest

    result = code_compile_rate(None, None, files, 30, seed=2, sampler=stub)
    assert result.n == 30 and result.compiled == sum(verdicts)
    assert result.rate == sum(verdicts) / 30
    assert (result.low, result.high) == wilson_interval(sum(verdicts), 30)
    assert [r["compiled"] for r in result.samples] == verdicts
    assert all(r["stopped_at_boundary"] for r in result.samples)  # every file has code after each definition


def test_compile_rate_refuses_files_without_a_block(tmp_path: Path) -> None:
    (tmp_path / "flat.py").write_text("x = 1\nprint(x)\n")
    (tmp_path / "broken.py").write_text("def f(:\n    pass\n")
    with pytest.raises(NoCodePromptError, match="2 held-out Python files"):
        code_compile_rate(None, None, sorted(tmp_path.iterdir()), 3, sampler=lambda p, m: "")


def test_model_compile_rate_is_deterministic_and_restores_train_mode(python_corpus: Path, tmp_path: Path) -> None:
    files = sorted(python_corpus.iterdir())[:5]
    tok = BPETokenizer.train([f.read_text() for f in files], 300)
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=320, seq_len=32, n_layer=1, n_head=2, d_model=16)).train()
    a = code_compile_rate(model, tok, files, 3, max_new_tokens=40, seed=1)
    b = code_compile_rate(model, tok, files, 3, max_new_tokens=40, seed=1)
    assert model.training
    assert a == b


def test_compile_rate_is_the_same_whatever_the_batch(python_corpus: Path) -> None:
    """Prompts decoded 16 or 5 at a time (left-padded) give the samples decoded one by
    one, record for record (float64, RoPE tables kept in float64, weights stirred so
    the context matters)."""
    from sparsetrain.model import rope_tables

    files = sorted(python_corpus.iterdir())
    tok = BPETokenizer.train([f.read_text() for f in files], 300)
    torch.manual_seed(random.randrange(2**31))
    cfg = ModelConfig(vocab_size=320, seq_len=480, n_layer=2, n_head=2, d_model=16)  # some prompts fit, some not
    model = GPT(cfg).double().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    model.rope_cos, model.rope_sin = rope_tables(cfg.seq_len, cfg.head_dim, cfg.rope_theta, torch.float64)
    runs = [code_compile_rate(model, tok, files, 9, max_new_tokens=20, temperature=1.0, top_k=0, seed=3, batch_size=b)
            for b in (1, 5, 16)]
    assert runs[0].samples == runs[1].samples == runs[2].samples
    with pytest.raises(SparsetrainError, match="batch_size must be >= 1, got 0"):
        code_compile_rate(model, tok, files, 2, batch_size=0)


def test_model_sampler_is_one_sample_call_in_chunks(python_corpus: Path) -> None:
    files = sorted(python_corpus.iterdir())[:5]
    tok = BPETokenizer.train([f.read_text() for f in files], 300)
    torch.manual_seed(1)
    model = GPT(ModelConfig(vocab_size=320, seq_len=32, n_layer=1, n_head=2, d_model=16)).eval()
    prompt = code_prompts(files, 1, seed=0)[0].prompt
    for seed in range(4):
        text = model_sampler(model, tok, temperature=1.0, top_k=0, seed=seed)(prompt, 40)
        gen = torch.Generator().manual_seed(seed * 1_000_003)
        ref = sample(model, [tok.eot_id] + tok.encode(prompt), 40, 1.0, 0, gen)
        if tok.eot_id in ref:  # the file ends there
            ref = ref[: ref.index(tok.eot_id)]
        stops = [k for k in range(len(ref) + 1) if tok.decode(ref[:k]) in (text, text[:-1])]
        assert stops, (text, ref)
        k = stops[-1]
        # it stops after a 16-token chunk that reaches the stopping line, at an end-of-text or after 40 tokens
        assert k in (16, 32, len(ref)) and (k == len(ref) or cut_at_boundary(tok.decode(ref[:k]))[1])


# ----------------------------------------------------------------------------- the CLI


def test_eval_cli_end_to_end(python_corpus: Path, tmp_path: Path, capsys) -> None:
    run = tmp_path / "run"
    cfg = build_config("tiny", overrides=dict(
        data=str(python_corpus), cache_dir=str(tmp_path / "cache"), out_dir=str(run), vocab_size=320, seq_len=32,
        n_layer=2, n_head=2, d_model=32, batch_size=4, max_steps=8, warmup_steps=2, eval_every=8, eval_batches=2,
        log_every=4, val_fraction=0.2, device="cpu"))
    train(cfg, verbose=False)
    args = ["eval", "--ckpt", str(run), "--samples", "4", "--max-new-tokens", "24", "--seed", "3"]
    assert main(args + ["--json", str(tmp_path / "a.json")]) == 0
    out = capsys.readouterr().out
    assert "held-out loss" in out and "bits per byte" in out and "compile rate" in out
    assert "held-out split" not in out  # the split the run recorded in its data.json
    assert main(args + ["--json", str(tmp_path / "b.json")]) == 0
    a, b = (json.loads((tmp_path / f).read_text()) for f in ("a.json", "b.json"))
    assert a["held_out"] == b["held_out"] and a["compile_rate"] == b["compile_rate"]

    from sparsetrain.generate import load_model

    corpus = load_corpus(cfg.data, 320, 0.2, cfg.cache_dir, verbose=False)
    direct = held_out_loss(load_model(run), corpus.val, token_byte_lengths(run / "tokenizer.json", 320))
    val_bytes = sum(len(f.read_bytes()) for f in python_corpus.iterdir() if is_val_file(f.name, 0.2))
    assert a["held_out"]["loss"] == pytest.approx(direct.loss, rel=1e-6)
    assert a["held_out"]["n_bytes"] == val_bytes
    c = a["compile_rate"]
    assert c["n"] == 4 and 0 <= c["compiled"] <= 4 and len(c["samples"]) == 4
    assert (c["low"], c["high"]) == pytest.approx(wilson_interval(c["compiled"], 4))

    # the same val tokens as a .bin: the same loss and bytes, no code files to sample
    np.asarray(corpus.val, dtype=np.uint16).tofile(tmp_path / "val.bin")
    bin_args = ["eval", "--ckpt", str(run), "--data", str(tmp_path / "val.bin"), "--samples", "2"]
    assert main(bin_args + ["--json", str(tmp_path / "c.json")]) == 0
    assert "compile rate: n/a (no held-out Python files)" in capsys.readouterr().out
    c = json.loads((tmp_path / "c.json").read_text())
    assert c["held_out"]["loss"] == a["held_out"]["loss"] and c["held_out"]["n_bytes"] == val_bytes
    np.asarray([5, 320], dtype=np.uint16).tofile(tmp_path / "bad.bin")
    assert main(["eval", "--ckpt", str(run), "--data", str(tmp_path / "bad.bin")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "320" in err[0] and "vocab_size" in err[0]


def test_eval_says_when_the_held_out_split_is_not_the_one_the_run_recorded(python_corpus: Path, tmp_path: Path,
                                                                         capsys) -> None:
    """Files added to a run's corpus after it trained move tokens into its val split:
    eval still measures it, with a note that the loss does not compare with the run's
    own evals; a run without ``data.json`` (made before it) gets a note that it could
    not be checked; files that are not held out change nothing that is evaluated."""
    data = tmp_path / "corpus"
    shutil.copytree(python_corpus, data)
    run = tmp_path / "run"
    train(build_config("tiny", overrides=dict(
        data=str(data), cache_dir=str(tmp_path / "cache"), out_dir=str(run), vocab_size=320, seq_len=32, n_layer=2,
        n_head=2, d_model=32, batch_size=4, max_steps=2, warmup_steps=1, eval_every=0, eval_batches=2,
        val_fraction=0.2, device="cpu")), verbose=False)
    args = ["eval", "--ckpt", str(run), "--samples", "0"]
    names = [f"extra_{i}.py" for i in range(200)]
    train_name = next(n for n in names if not is_val_file(n, 0.2))
    (data / train_name).write_text("def more():\n    return 1\n")
    assert main(args) == 0 and "held-out split" not in capsys.readouterr().out
    val_name = next(n for n in names if is_val_file(n, 0.2))
    (data / val_name).write_text("def held():\n    return 2\n")
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "held-out split differs from the one this run trained beside (val tokens " in out, out
    (run / "data.json").unlink()
    assert main(args) == 0 and "held-out split not checked" in capsys.readouterr().out


@pytest.mark.parametrize(
    "args, needle",
    [
        (["eval", "--ckpt", "/no/such/run"], "/no/such/run"),
        (["eval", "--ckpt", ".", "--samples", "-1"], "--samples"),
        (["eval", "--ckpt", ".", "--max-new-tokens", "0"], "--max-new-tokens"),
    ],
)
def test_eval_bad_input_one_line_exit_2(args: list[str], needle: str, capsys) -> None:
    try:
        code = main(args)
    except SystemExit as e:
        code = e.code
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and needle in err[0]


def test_held_out_bin_tokens_get_the_training_checks(tmp_path: Path) -> None:
    """``eval --data X.bin`` reads the file as training does: uint32 tokens read as the run's uint16,
    an empty file, ids past model.vocab_size are each one line."""
    cfg = build_config("tiny", overrides=dict(vocab_size=320, seq_len=16))
    np.random.default_rng(0).integers(1, 320, size=500).astype(np.uint32).tofile(tmp_path / "u32.bin")
    (tmp_path / "empty.bin").write_bytes(b"")
    np.asarray([5, 320], dtype=np.uint16).tofile(tmp_path / "bad.bin")
    for name, needle in [("u32.bin", "--token-dtype uint32"), ("empty.bin", "no tokens"),
                         ("bad.bin", "token id 320, outside model.vocab_size 320")]:
        with pytest.raises(DataError, match=re.escape(needle)):
            held_out_data(cfg, None, data=str(tmp_path / name))


@pytest.mark.parametrize("command", ["eval", "generate"])
def test_eval_and_generate_use_the_gpu_when_there_is_one(command: str, tmp_path: Path, monkeypatch) -> None:
    """`sparsetrain eval` defaulted to the CPU: on a GPU machine a nano-125m's compile
    rate ran on the host (minutes for 32 samples). Like `grpo` and `corpus filter`, the
    default is auto: CUDA where there is one."""
    import sparsetrain.evaluate as evaluate_mod
    import sparsetrain.generate as generate_mod

    seen: dict[str, str] = {}

    class Report:
        def summary(self) -> str:
            return "ok"

    def fake_eval(ckpt, **kw):
        seen["device"] = kw["device"]
        return Report()

    def fake_generate(ckpt, prompt, num_samples, n, temperature, top_k, seed, device):
        seen["device"] = device
        return ["ok"] * num_samples

    monkeypatch.setattr(evaluate_mod, "evaluate_run", fake_eval)
    monkeypatch.setattr(generate_mod, "generate_texts", fake_generate)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    argv = [command, "--ckpt", str(tmp_path)] + (["--prompt", "def "] if command == "generate" else [])
    assert main(argv) == 0
    assert seen["device"] == "cuda"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(argv) == 0
    assert seen["device"] == "cpu"
