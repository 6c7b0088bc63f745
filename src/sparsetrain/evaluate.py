"""Evaluating a trained run: held-out loss, bits per byte, and how often sampled
code continuations compile.

Held-out loss covers every token of the held-out stream once: the stream is cut
into consecutive windows of ``seq_len + 1`` tokens overlapping by one, so each
token after the first is predicted exactly once, from the context since its
window's start. (The trainer's val loss reads a fixed sample of windows; this
reads them all.) ``loss`` is the mean over all predicted tokens, end-of-text
separators included, as the trainer's.

Bits per byte is ``sum(nats) / (ln 2 * bytes)`` over the predicted tokens that
are text: end-of-text separators carry no bytes and are left out of both sums.
A token's bytes are the UTF-8 bytes it decodes to (byte-level BPE: one byte per
character of its vocabulary string), so the bytes of a document's tokens are
its text's UTF-8 bytes exactly -- the file's size for a file in valid UTF-8
(invalid bytes are read as U+FFFD, three bytes).

The compile rate samples continuations of held-out Python files: each prompt is
a file cut just after a block header (``def``, ``if``, ``for``, ... ending with
``:``) inside a top-level ``def`` or ``class``; the model writes on until a line
starts at column 0 with code (a dedent to the top level: the end of that
definition), an end-of-text, or ``max_new_tokens``; then ``compile(prompt +
continuation, "exec")`` judges. A prompt is used only if the file's own text,
cut by the same rule, compiles, so every prompt has a correct answer.
"""

from __future__ import annotations

import ast
import math
import random
import statistics
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .config import TrainConfig, build_config, read_toml
from .data import (DATA_RECORD_NAME, data_record_changes, discover_text_files, held_out_record, is_val_file,
                   join_documents, load_corpus, read_bin_tokens, read_data_record, read_documents, require_text,
                   split_documents)
from .errors import CheckpointError, DataError, SparsetrainError
from .generate import load_model, run_directory, sample_prompts
from .model import CausalLM, upcast
from .tokenizer import BPETokenizer

Sampler = Callable[[str, int], str]
"""``sampler(prompt, max_new_tokens) -> continuation text``."""

WILSON_Z = statistics.NormalDist().inv_cdf(0.975)
SAMPLE_CHUNK = 16  # tokens sampled between checks for the stopping line
PROMPT_TRIES = 64  # random cut points tried per sample before the sample is given up


# ----------------------------------------------------------------------------- held-out loss


@dataclass
class HeldOutLoss:
    """Held-out loss (nats/token) and bits per byte (``None`` without a tokenizer)."""

    loss: float
    n_tokens: int
    bits_per_byte: float | None
    n_text_tokens: int
    n_bytes: int
    source: str


def token_byte_lengths(tokenizer_json: str | Path, vocab_size: int) -> np.ndarray:
    """UTF-8 bytes each token id decodes to: the length of its byte-level string
    (one character per byte); 0 for special tokens and ids past the tokenizer's."""
    from tokenizers import pre_tokenizers

    from .export import read_bpe_vocab

    vocab = read_bpe_vocab(tokenizer_json, vocab_size)
    alphabet = set(pre_tokenizers.ByteLevel.alphabet())
    lengths = np.zeros(vocab_size, dtype=np.int64)
    for i, text in enumerate(vocab.tokens[: vocab.n_tokenizer]):
        if i in vocab.special_ids:
            continue
        if not set(text) <= alphabet:
            raise SparsetrainError(f"token {i} ({text!r}) of {tokenizer_json} is not byte-level BPE")
        lengths[i] = len(text)
    return lengths


@torch.no_grad()
def token_nats(model: CausalLM, tokens: np.ndarray, batch_size: int = 8) -> np.ndarray:
    """Cross-entropy (nats, float64) of every token of ``tokens`` after the first,
    predicted from consecutive windows of ``seq_len`` inputs (see the module docstring)."""
    if tokens.size < 2:
        raise DataError(f"{tokens.size} held-out tokens: nothing to predict")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    T = model.config.seq_len
    starts = list(range(0, tokens.size - 1, T))
    out = np.empty(tokens.size - 1, dtype=np.float64)
    try:
        full = [s for s in starts if s + T + 1 <= tokens.size]
        for i in range(0, len(full), batch_size):
            group = full[i : i + batch_size]
            idx = np.asarray(group)[:, None] + np.arange(T + 1)[None, :]
            chunk = torch.from_numpy(np.asarray(tokens[idx], dtype=np.int64)).to(device)
            logits, _ = model(chunk[:, :-1])
            nats = F.cross_entropy(upcast(logits).flatten(0, 1), chunk[:, 1:].flatten(), reduction="none")
            nats = nats.view(len(group), T).double().cpu().numpy()
            for row, s in zip(nats, group):
                out[s : s + T] = row
        tail = starts[len(full):]  # at most one window, shorter than seq_len
        for s in tail:
            chunk = torch.from_numpy(np.asarray(tokens[s:], dtype=np.int64)).to(device)[None]
            logits, _ = model(chunk[:, :-1])
            out[s:] = F.cross_entropy(upcast(logits)[0], chunk[0, 1:], reduction="none").double().cpu().numpy()
    finally:
        model.train(was_training)
    return out


def held_out_loss(model: CausalLM, tokens: np.ndarray, byte_lengths: np.ndarray | None,
                  batch_size: int = 8, source: str = "") -> HeldOutLoss:
    """Loss and bits per byte of ``model`` on the token stream ``tokens``
    (``byte_lengths[id]``: bytes of each token id, 0 for separators; ``None``: no bits per byte).
    Bits per byte are every target's nats over the text's bytes, as the trainer's ``val_bpb``:
    a separator has no bytes, but predicting where a document ends costs nats."""
    nats = token_nats(model, tokens, batch_size)
    targets = np.asarray(tokens[1:], dtype=np.int64)
    bpb, n_text, n_bytes = None, 0, 0
    if byte_lengths is not None:
        nbytes = byte_lengths[targets]
        text = nbytes > 0
        n_text, n_bytes = int(text.sum()), int(nbytes.sum())
        if n_bytes:
            bpb = float(nats.sum() / (math.log(2) * n_bytes))
    return HeldOutLoss(float(nats.mean()), int(nats.size), bpb, n_text, n_bytes, source)


@dataclass
class HeldOutData:
    """The held-out token stream of a run and the whole held-out files (for the compile rate)."""

    tokens: np.ndarray
    files: list[Path]
    source: str


def held_out_code_files(data: str, val_fraction: float, include: str = "", exclude: str = "",
                        max_bytes: int = 0) -> list[Path]:
    """The ``.py`` files of a text corpus's val split (``data`` and the selection as in
    the config: empty = the stdlib). Empty when the split cut the files instead of holding
    out whole files (too few files; see :func:`sparsetrain.data.split_documents`)."""
    root, files = discover_text_files(data or None, include, exclude, max_bytes)
    names = sorted(read_documents(root, files))
    val = [n for n in names if is_val_file(n, val_fraction)]
    if not val or len(val) == len(names):
        return []
    return [root / n for n in val if n.endswith(".py")]


def held_out_data(cfg: TrainConfig, tokenizer: BPETokenizer | None, data: str = "") -> HeldOutData:
    """The run's val split (``data`` empty), tokenized with the run's tokenizer
    exactly as :func:`sparsetrain.data.load_corpus` builds it, or the whole of
    ``data`` (a text file or folder, or a ``.bin`` of the run's token dtype)."""
    source = data or cfg.data
    if source.endswith(".bin"):
        if data:
            tokens, _ = read_bin_tokens(data, cfg.token_dtype, cfg.model.vocab_size, tokenizer)
            return HeldOutData(tokens, [], f"{data} (all {tokens.size:,} tokens)")
        corpus = load_corpus(cfg.data, cfg.model.vocab_size, cfg.val_fraction, cfg.cache_dir, cfg.token_dtype,
                             cfg.tokenizer, verbose=False)
        return HeldOutData(corpus.val, [], f"val split of {cfg.data}")
    if tokenizer is None:
        raise CheckpointError("the run has no tokenizer.json: text data cannot be tokenized")
    selection = () if data else (cfg.data_include, cfg.data_exclude, cfg.data_max_bytes)  # the run's own files
    root, files = discover_text_files(source or None, *selection)
    docs = read_documents(root, files)
    require_text(docs, source or str(root))
    if data:
        texts, code = [docs[n] for n in sorted(docs)], [root / n for n in sorted(docs) if n.endswith(".py")]
        what = f"{data} ({len(texts)} files, all held out)"
    else:
        texts = split_documents(docs, cfg.val_fraction)[1]
        code = held_out_code_files(cfg.data, cfg.val_fraction, *selection)
        what = f"val split of {cfg.data or 'the Python standard library'} ({len(texts)} documents)"
    dtype = np.uint16 if cfg.model.vocab_size <= 2**16 else np.uint32
    return HeldOutData(join_documents(tokenizer.encode_batch(texts), tokenizer.eot_id, dtype), code, what)


# ----------------------------------------------------------------------------- compile rate


class NoCodePromptError(DataError):
    """No held-out Python file offers a block to complete."""


@dataclass
class CodePrompt:
    """A held-out file cut after a block header: ``prompt`` ends at that line's end
    (without its newline); ``reference`` is the file's own continuation to the stopping line."""

    file: str
    line: int  # 1-based number of the header's last line
    prompt: str
    reference: str


@dataclass
class CompileRate:
    """Compile rate of ``n`` sampled continuations with its Wilson 95% interval."""

    n: int
    compiled: int
    rate: float
    low: float
    high: float
    stopped_at_boundary: int
    samples: list[dict] = field(default_factory=list)


def wilson_interval(successes: int, n: int, z: float = WILSON_Z) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion (95% for the default ``z``)."""
    if n < 1 or not 0 <= successes <= n:
        raise ValueError(f"need 0 <= successes <= n and n >= 1, got {successes} of {n}")
    p = successes / n
    denom = 1 + z * z / n
    center = (p + z * z / (2 * n)) / denom
    half = z / denom * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, center - half), min(1.0, center + half)


def cut_at_boundary(continuation: str) -> tuple[str, bool]:
    """The continuation up to its stopping line, and whether one was found.

    Its first line finishes the prompt's last line and is always kept. A later
    line stops it when it starts at column 0 with code (anything but whitespace
    or ``#``): a dedent to the top level. Without one, an unfinished last line
    (no newline: the token budget ran out in it) is dropped."""
    first = continuation.find("\n")
    if first < 0:
        return "", False
    pos = first + 1
    while pos < len(continuation):
        end = continuation.find("\n", pos)
        line = continuation[pos:] if end < 0 else continuation[pos : end + 1]
        if line.strip() and line[0] not in " \t\f#":
            return continuation[:pos], True
        if end < 0:
            return continuation[:pos], False
        pos = end + 1
    return continuation, False


def compiles(source: str) -> bool:
    """Whether ``compile(source, "<sample>", "exec")`` accepts it (warnings silenced)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            compile(source, "<sample>", "exec", dont_inherit=True)
        except (SyntaxError, ValueError, RecursionError, MemoryError, OverflowError):
            return False
    return True


def _parse(source: str) -> ast.Module | None:
    try:
        return ast.parse(source)
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return None


def _statement_blocks(root: ast.AST) -> list[tuple[int, list[ast.stmt]]]:
    """``(header's first line, statements)`` of every block under ``root`` (itself
    included, a module excepted) whose body holds statements."""
    blocks = []
    for node in ast.walk(root):
        body = getattr(node, "body", None)
        if isinstance(node, ast.mod) or not (isinstance(body, list) and body and isinstance(body[0], ast.stmt)):
            continue
        start = node.pattern.lineno if isinstance(node, ast.match_case) else node.lineno  # a case has no lineno
        blocks.append((start, body))
    return blocks


def block_header_lines(source: str) -> list[int]:
    """1-based numbers of the last line of every block header inside a top-level
    ``def`` or ``class`` (that definition's own header included) whose block starts
    on a later line. Empty if ``source`` does not parse."""
    tree = _parse(source)
    if tree is None:
        return []
    lines = set()
    for top in tree.body:
        if isinstance(top, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            lines.update(body[0].lineno - 1 for start, body in _statement_blocks(top) if body[0].lineno > start)
    return sorted(lines)


def opened_block(source: str, line: int) -> tuple[int, list[ast.stmt]] | None:
    """The block whose header ends on line ``line`` of ``source`` (a prompt's cut
    line, completed): ``(its header's first line, its statements)``, the innermost
    block whose header starts at or before ``line`` and whose first statement is on
    or after it. ``None`` if ``source`` does not parse or no block opens there."""
    tree = _parse(source)
    if tree is None:
        return None
    found = [(start, body) for start, body in _statement_blocks(tree) if start <= line <= body[0].lineno]
    return max(found, key=lambda block: block[0]) if found else None


def _prompt_at(name: str, text: str, line: int) -> CodePrompt:
    starts = [0]
    for i, ch in enumerate(text):
        if ch == "\n":
            starts.append(i + 1)
            if len(starts) > line:
                break
    cut = starts[line] - 1  # the newline ending line `line`
    rest = text[cut:] if text.endswith("\n") else text[cut:] + "\n"
    return CodePrompt(name, line, text[:cut], cut_at_boundary(rest)[0])


def code_prompts(files: Sequence[str | Path], n: int, seed: int = 0) -> list[CodePrompt]:
    """``n`` prompts (a deterministic function of ``files``, ``n`` and ``seed``;
    prompt ``i`` does not depend on ``n``): for each, a file drawn uniformly among
    those with a usable cut point, then a cut uniformly among its block headers,
    kept if the file's own continuation compiles (redrawn otherwise)."""
    candidates: list[tuple[str, str, list[int]]] = []
    for f in sorted(map(str, files)):
        try:
            text = Path(f).read_bytes().decode("utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        lines = block_header_lines(text)
        if lines and compiles(text):
            candidates.append((f, text, lines))
    if not candidates:
        raise NoCodePromptError(f"none of the {len(files)} held-out Python files has a block to complete")
    prompts = []
    for i in range(n):
        rng = random.Random(f"{seed}:{i}")
        for _ in range(PROMPT_TRIES):
            name, text, lines = rng.choice(candidates)
            p = _prompt_at(name, text, rng.choice(lines))
            if compiles(p.prompt + p.reference):
                prompts.append(p)
                break
        else:
            raise NoCodePromptError(f"no cut point with a compiling reference in {PROMPT_TRIES} draws (sample {i})")
    return prompts


class ModelSampler:
    """A :data:`Sampler` that continues the prompt with ``model`` (context: end-of-text
    + the prompt's tokens, cropped to ``seq_len`` by :func:`sparsetrain.generate.sample`),
    stopping at the stopping line, an end-of-text (the file ends there: its last
    line counts as finished) or ``max_new_tokens``. Call ``i`` samples from the
    generator seeded ``(seed, i)``; :meth:`many` makes the next ``n`` calls on one
    prompt as one batch (:func:`~sparsetrain.generate.sample_prompts`)."""

    def __init__(self, model: CausalLM, tokenizer: BPETokenizer, temperature: float = 0.8, top_k: int = 50,
                 seed: int = 0) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.temperature, self.top_k, self.seed = temperature, top_k, seed
        self.calls = 0

    def __call__(self, prompt: str, max_new_tokens: int) -> str:
        return self.batch([prompt], max_new_tokens)[0]

    def many(self, prompt: str, max_new_tokens: int, n: int) -> list[str]:
        """The next ``n`` calls' continuations of one ``prompt``."""
        return self.batch([prompt] * n, max_new_tokens)

    def batch(self, prompts: Sequence[str], max_new_tokens: int, batch_size: int | None = None) -> list[str]:
        """The next ``len(prompts)`` calls, one per prompt, decoded ``batch_size`` at a
        time (all at once by default; :func:`~sparsetrain.generate.sample_prompts`):
        what the calls one by one give."""
        if batch_size is not None and len(prompts) > batch_size:
            return [t for i in range(0, len(prompts), batch_size)
                    for t in self.batch(prompts[i : i + batch_size], max_new_tokens)]
        device = next(self.model.parameters()).device
        gens = [torch.Generator(device=device).manual_seed(self.seed * 1_000_003 + self.calls + r)
                for r in range(len(prompts))]
        self.calls += len(prompts)
        tok = self.tokenizer

        def finished(new: list[int]) -> bool:
            return tok.eot_id in new or cut_at_boundary(tok.decode(new))[1]

        rows = sample_prompts(self.model, [[tok.eot_id] + tok.encode(p) for p in prompts], gens, max_new_tokens,
                              self.temperature, self.top_k, stop=finished, check_every=SAMPLE_CHUNK)
        return [self._text(new) for new in rows]

    def _text(self, new: list[int]) -> str:
        if self.tokenizer.eot_id in new:
            text = self.tokenizer.decode(new[: new.index(self.tokenizer.eot_id)])
            return text if text.endswith("\n") else text + "\n"
        return self.tokenizer.decode(new)


def model_sampler(model: CausalLM, tokenizer: BPETokenizer, temperature: float = 0.8, top_k: int = 50,
                  seed: int = 0) -> ModelSampler:
    """:class:`ModelSampler` of ``model``."""
    return ModelSampler(model, tokenizer, temperature, top_k, seed)


def code_compile_rate(
    model: CausalLM | None,
    tokenizer: BPETokenizer | None,
    files: Sequence[str | Path],
    n: int,
    *,
    max_new_tokens: int = 128,
    temperature: float = 0.8,
    top_k: int = 50,
    seed: int = 0,
    sampler: Sampler | None = None,
    batch_size: int = 16,
) -> CompileRate:
    """Fraction of ``n`` sampled continuations of held-out Python ``files`` that
    compile, with its Wilson 95% interval (see the module docstring).

    Deterministic for a given ``seed`` and ``batch_size`` (the model's prompts
    decoded ``batch_size`` at a time, :meth:`ModelSampler.batch`); other batch
    sizes give the same samples up to the rounding of batched products (exactly
    in float64).
    ``sampler`` replaces the model (then ``model`` and ``tokenizer`` may be
    ``None``). The model is put in eval mode for the sampling and restored after.
    Raises :class:`DataError` when no file has a block to complete
    (:class:`NoCodePromptError`)."""
    if n < 1:
        raise SparsetrainError(f"the compile rate needs n >= 1 samples, got {n}")
    if sampler is None:
        if model is None or tokenizer is None:
            raise SparsetrainError("code_compile_rate needs a model and a tokenizer, or a sampler")
        sampler = model_sampler(model, tokenizer, temperature, top_k, seed)
    if batch_size < 1:
        raise SparsetrainError(f"the compile rate's batch_size must be >= 1, got {batch_size}")
    prompts = code_prompts(files, n, seed)
    was_training = model.training if model is not None else False
    if model is not None:
        model.eval()
    records = []
    try:
        if getattr(sampler, "batch", None) is not None:  # a ModelSampler: the prompts decoded in batches
            texts = sampler.batch([p.prompt for p in prompts], max_new_tokens, batch_size)
        else:
            texts = [sampler(p.prompt, max_new_tokens) for p in prompts]
        for p, text in zip(prompts, texts):
            continuation, stopped = cut_at_boundary(text)
            records.append({"file": p.file, "line": p.line, "compiled": compiles(p.prompt + continuation),
                            "stopped_at_boundary": stopped, "continuation": continuation})
    finally:
        if model is not None:
            model.train(was_training)
    ok = sum(r["compiled"] for r in records)
    low, high = wilson_interval(ok, n)
    return CompileRate(n, ok, ok / n, low, high, sum(r["stopped_at_boundary"] for r in records), records)


# ----------------------------------------------------------------------------- a run


@dataclass
class EvalReport:
    """What ``sparsetrain eval`` prints."""

    loss: HeldOutLoss
    compile_rate: CompileRate | None
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        h = self.loss
        lines = [f"held-out loss {h.loss:.4f} nats/token over {h.n_tokens:,} tokens ({h.source})"]
        if h.bits_per_byte is not None:
            lines.append(f"bits per byte {h.bits_per_byte:.4f} over {h.n_bytes:,} bytes ({h.n_text_tokens:,} text tokens)")
        c = self.compile_rate
        if c is not None:
            lines.append(f"compile rate {c.rate:.3f} ({c.compiled}/{c.n}), Wilson 95% [{c.low:.3f}, {c.high:.3f}]; "
                         f"{c.stopped_at_boundary}/{c.n} stopped at a top-level line")
        return "\n".join(lines + self.notes)

    def to_dict(self) -> dict:
        return {"held_out": asdict(self.loss),
                "compile_rate": asdict(self.compile_rate) if self.compile_rate is not None else None,
                "notes": self.notes}


@dataclass
class LoadedRun:
    """A trained run as evaluation reads it: its config, model and tokenizer."""

    cfg: TrainConfig
    model: CausalLM
    tokenizer: BPETokenizer | None  # None for a run on .bin tokens without a tokenizer.json
    tokenizer_path: Path


def load_run(ckpt: str | Path, device: str = "cpu") -> LoadedRun:
    """The run directory of ``ckpt`` (the directory or its ``ckpt.pt``): its
    ``config.toml`` (it names the data), model (in eval mode) and tokenizer."""
    run = run_directory(ckpt)
    if not (run / "config.toml").is_file():
        raise CheckpointError(f"no config.toml in {run}: evaluation needs the run directory (it names the data)")
    cfg = build_config(None, None, {}, base=read_toml(run / "config.toml"))
    tok_path = run / "tokenizer.json"
    tokenizer = BPETokenizer.load(tok_path) if tok_path.is_file() else None
    return LoadedRun(cfg, load_model(ckpt, device), tokenizer, tok_path)


def held_out_split_notes(run: Path, val: np.ndarray) -> list[str]:
    """A note when ``val`` (the run's held-out split, tokenized now) is not the split
    the run recorded in its ``data.json`` at training: the files, their selection or
    the split's rule changed since, so the loss does not compare with the run's own
    evals. A run from before the record gets a note that it could not be checked."""
    saved = read_data_record(run)
    if not saved:
        return [f"held-out split not checked: {run} has no readable {DATA_RECORD_NAME} (a run from before it was recorded)"]
    changes = data_record_changes(saved, held_out_record(val))
    if not changes:
        return []
    return [f"held-out split differs from the one this run trained beside ({'; '.join(changes)}): the corpus, its "
            "selection or the split changed since, so this loss does not compare with the run's own evals"]


def evaluate_run(ckpt: str | Path, data: str = "", samples: int = 20, max_new_tokens: int = 128,
                 max_tokens: int = 0, batch_size: int = 8, temperature: float = 0.8, top_k: int = 50,
                 seed: int = 0, device: str = "cpu") -> EvalReport:
    """Held-out loss, bits per byte and (``samples`` > 0) the compile rate of a run
    directory; ``data`` replaces the run's val split by a whole file or folder;
    ``max_tokens`` > 0 keeps the first that many tokens of the stream for the loss."""
    loaded = load_run(ckpt, device)
    cfg, model, tokenizer, tok_path = loaded.cfg, loaded.model, loaded.tokenizer, loaded.tokenizer_path
    held = held_out_data(cfg, tokenizer, data)
    tokens = held.tokens[: max_tokens + 1] if max_tokens else held.tokens
    lengths = token_byte_lengths(tok_path, cfg.model.vocab_size) if tokenizer is not None else None
    notes = [] if lengths is not None else ["bits per byte: n/a (no tokenizer.json in the run)"]
    if not data:
        notes += held_out_split_notes(run_directory(ckpt), held.tokens)
    report = EvalReport(held_out_loss(model, tokens, lengths, batch_size, held.source), None, notes)
    if samples:
        if tokenizer is None:
            report.notes.append("compile rate: n/a (no tokenizer.json in the run)")
        elif not held.files:
            report.notes.append("compile rate: n/a (no held-out Python files)")
        else:
            try:
                report.compile_rate = code_compile_rate(model, tokenizer, held.files, samples, max_new_tokens=max_new_tokens,
                                                        temperature=temperature, top_k=top_k, seed=seed,
                                                        batch_size=batch_size)
            except NoCodePromptError as e:
                report.notes.append(f"compile rate: n/a ({e})")
    return report
