"""Training-free GRPO: an experience library instead of gradient updates.

For each prompt, ``G`` rollouts are sampled from a checkpoint with experiences
drawn from the library in the context before the prompt; a verifier scores each
one (reward 0 or 1); its group-relative advantage is ``r - mean(r)`` (optionally
divided by the group's std). Rollouts with a positive advantage become
experiences. The library keeps at most ``max_size`` of them, drops those older
than ``max_age`` rounds, and samples with probabilities ``softmax(advantage /
T)``. It is saved as JSON atomically; a corrupt file is an error that names it.

What the library is worth is measured on held-out prompts, each sampled once
without and once with library items in its context (the same random stream for
both, so the two arms differ only by the context): the success rate of each arm
with its Wilson 95% interval, per seed, and their mean and spread over seeds.

Tasks (:class:`Task`): ``compile`` completes a block of a held-out Python file
of the run's corpus (:mod:`sparsetrain.evaluate`'s prompts and stopping rule;
success: the file up to the cut plus the completion compiles, and the block the
header opened holds a statement beyond ``pass``, ``...`` or a docstring);
experiences are such completed blocks, shown to the model as a comment block.
``arithmetic`` asks for the value of ``a +/- b`` in a Python comment. See docs/grpo.md.
"""

from __future__ import annotations

import ast
import json
import math
import random
import re
import statistics
import textwrap
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from .checkpoint import atomic_write_text
from .errors import ConfigError, DataError, SparsetrainError
from .evaluate import (CodePrompt, ModelSampler, NoCodePromptError, code_prompts, compiles, cut_at_boundary,
                       model_sampler, opened_block, wilson_interval)
from .generate import check_sampling
from .model import CausalLM
from .tokenizer import BPETokenizer

Generate = Callable[[str, str, int], list[str]]
"""``generate(context, prompt, n)``: ``n`` sampled continuations of ``prompt`` with ``context`` before it."""

SPLITS = ("library", "test")  # prompts that grow the library; held-out prompts that measure it


def group_advantages(rewards: Sequence[float], normalize_std: bool = False, eps: float = 1e-6) -> list[float]:
    """``r_i - mean(r)``, divided by the group's (population) std when asked."""
    if not rewards:
        return []
    mean = sum(rewards) / len(rewards)
    adv = [r - mean for r in rewards]
    if normalize_std:
        std = math.sqrt(sum(a * a for a in adv) / len(adv))
        adv = [a / (std + eps) for a in adv]
    return adv


@dataclass
class Experience:
    text: str  # what the task renders into later contexts
    advantage: float
    round: int  # when it was added


@dataclass
class ExperienceLibrary:
    """A bounded set of experiences with advantage-weighted sampling."""

    max_size: int = 64
    max_age: int = 0  # rounds; 0 = no age limit
    temperature: float = 1.0
    items: list[Experience] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.max_size < 1 or self.max_age < 0 or self.temperature <= 0:
            raise ValueError(f"need max_size >= 1, max_age >= 0, temperature > 0; got {self.max_size}, "
                             f"{self.max_age}, {self.temperature}")

    def add(self, text: str, advantage: float, round: int) -> None:
        self.items.append(Experience(text, float(advantage), int(round)))

    def prune(self, current_round: int) -> None:
        """Drop experiences older than ``max_age`` rounds, then keep the
        ``max_size`` with the highest advantage (newer first on ties)."""
        if self.max_age:
            self.items = [e for e in self.items if current_round - e.round <= self.max_age]
        if len(self.items) > self.max_size:
            self.items = sorted(self.items, key=lambda e: (-e.advantage, -e.round))[: self.max_size]

    def probabilities(self) -> list[float]:
        """``softmax(advantage / temperature)`` over the library."""
        if not self.items:
            return []
        z = [e.advantage / self.temperature for e in self.items]
        m = max(z)
        w = [math.exp(v - m) for v in z]
        s = sum(w)
        return [v / s for v in w]

    def sample(self, k: int, rng: random.Random) -> list[Experience]:
        """``k`` experiences drawn with replacement from :meth:`probabilities`."""
        if not self.items or k <= 0:
            return []
        return rng.choices(self.items, weights=self.probabilities(), k=k)

    def context_items(self, k: int, rng: random.Random) -> list[str]:
        """The distinct texts of :meth:`sample` ``(k)``, in the order first drawn."""
        return list(dict.fromkeys(e.text for e in self.sample(k, rng)))

    def copy(self) -> "ExperienceLibrary":
        return ExperienceLibrary(self.max_size, self.max_age, self.temperature,
                                 [Experience(e.text, e.advantage, e.round) for e in self.items])

    def save(self, path: str | Path) -> None:
        data = {"max_size": self.max_size, "max_age": self.max_age, "temperature": self.temperature,
                "items": [asdict(e) for e in self.items]}
        atomic_write_text(path, json.dumps(data, indent=1))

    @classmethod
    def load(cls, path: str | Path) -> "ExperienceLibrary":
        p = Path(path)
        try:
            data = json.loads(p.read_text())
            lib = cls(int(data["max_size"]), int(data["max_age"]), float(data["temperature"]))
            lib.items = [Experience(str(e["text"]), float(e["advantage"]), int(e["round"])) for e in data["items"]]
        except FileNotFoundError:
            raise DataError(f"experience library not found: {path}") from None
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            raise DataError(f"experience library {path} is corrupt ({type(e).__name__}: {e}); "
                            "the file was left untouched") from None
        return lib


# ----------------------------------------------------------------------------- tasks


@dataclass(frozen=True)
class Problem:
    """A prompt and what its verifier needs (the answer, or the cut file)."""

    prompt: str
    answer: Any
    where: str = ""  # shown in the per-sample records


class Task(Protocol):
    """A verifiable task: prompts, a 0/1 reward, and how a rewarded completion
    becomes an experience and experiences become context."""

    name: str

    def problems(self, n: int, seed: int, split: str) -> list[Problem]:
        """``n`` prompts of ``split`` (one of :data:`SPLITS`: the two never share a source)."""
        ...

    def reward(self, problem: Problem, completion: str) -> float:
        ...

    def experience(self, problem: Problem, completion: str) -> str:
        ...

    def render(self, experiences: Sequence[str]) -> str:
        ...


def arithmetic_prompts(n: int, seed: int) -> list[tuple[str, int]]:
    """``("x = 12 + 7\\nprint(x)  # ", 19)`` style prompts with verifiable answers,
    in the Python the embedded corpus is made of."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a, b = rng.randint(0, 20), rng.randint(0, 20)
        op = rng.choice("+-")
        out.append((f"x = {a} {op} {b}\nprint(x)  # ", a + b if op == "+" else a - b))
    return out


def verify_number(completion: str, answer: int) -> float:
    """1 if the completion starts with the right integer, else 0."""
    m = re.match(r"\s*(-?\d+)", completion)
    return 1.0 if m and int(m.group(1)) == answer else 0.0


class ArithmeticTask:
    """``x = a +/- b; print(x)  # ?``; experiences are solved prompts, as code."""

    name = "arithmetic"

    def problems(self, n: int, seed: int, split: str) -> list[Problem]:
        offset = SPLITS.index(split) * 10_000  # other draws for the held-out prompts
        return [Problem(p, a) for p, a in arithmetic_prompts(n, seed + offset)]

    def reward(self, problem: Problem, completion: str) -> float:
        return verify_number(completion, problem.answer)

    def experience(self, problem: Problem, completion: str) -> str:
        return problem.prompt + completion.split("\n")[0] + "\n"

    def render(self, experiences: Sequence[str]) -> str:
        return "".join(experiences)


def is_trivial(statement: ast.stmt) -> bool:
    """``pass``, or an expression that is only a constant (a docstring, ``...``)."""
    return isinstance(statement, ast.Pass) or (isinstance(statement, ast.Expr) and isinstance(statement.value, ast.Constant))


@dataclass(frozen=True)
class CompletionVerdict:
    """How a completion of a :class:`~sparsetrain.evaluate.CodePrompt` fares:
    ``compiles``: the prompt plus the completion (cut at the stopping line)
    compiles; ``fills_block``: the block the prompt's header opened holds a
    statement that is not :func:`trivial <is_trivial>`; ``stopped_at_boundary``:
    the completion reached the stopping line (else it was cut at its last full line)."""

    compiles: bool
    fills_block: bool
    stopped_at_boundary: bool
    block: str  # the header and the block the completion wrote, dedented; "" unless it compiles

    @property
    def success(self) -> bool:
        return self.compiles and self.fills_block


def verify_completion(prompt: CodePrompt, completion: str) -> CompletionVerdict:
    """Judge ``completion`` (raw sampled text) as the continuation of ``prompt``.
    The header's name is the prompt's own, so a completion that compiles keeps it."""
    continuation, stopped = cut_at_boundary(completion)
    source = prompt.prompt + continuation
    if not compiles(source):
        return CompletionVerdict(False, False, stopped, "")
    block = opened_block(source, prompt.line)
    if block is None:  # no block spans the cut line: not a prompt code_prompts makes
        return CompletionVerdict(True, False, stopped, "")
    start, body = block
    lines = re.split(r"\r\n?|\n", source)[start - 1 : body[-1].end_lineno]  # the line ends the parser counts
    return CompletionVerdict(True, not all(map(is_trivial, body)), stopped, textwrap.dedent("\n".join(lines)) + "\n")


class CompileTask:
    """Complete a block of a held-out Python file so that it compiles and does
    something (:func:`verify_completion`). The held-out files are split in two,
    alternately in sorted order: the first half grows the library, the second
    measures it. An experience is a completed block (header and body, at most
    ``max_lines`` lines), rendered as a comment block."""

    name = "compile"
    HEADING = "# Blocks completed before:\n"

    def __init__(self, files: Sequence[str | Path], max_lines: int = 12) -> None:
        files = sorted(map(str, files))
        if len(files) < 2:
            raise DataError(f"the compile task needs at least 2 held-out Python files (one to grow the library, "
                            f"one to measure it), got {len(files)}")
        if max_lines < 1:
            raise SparsetrainError(f"an experience needs max_lines >= 1, got {max_lines}")
        self.files = {"library": files[0::2], "test": files[1::2]}
        self.max_lines = max_lines

    def problems(self, n: int, seed: int, split: str) -> list[Problem]:
        try:
            prompts = code_prompts(self.files[split], n, seed)
        except NoCodePromptError as e:
            raise DataError(f"{split} prompts: {e}") from None
        return [Problem(p.prompt, p, f"{p.file}:{p.line}") for p in prompts]

    def reward(self, problem: Problem, completion: str) -> float:
        return float(verify_completion(problem.answer, completion).success)

    def experience(self, problem: Problem, completion: str) -> str:
        block = verify_completion(problem.answer, completion).block
        return "\n".join(block.splitlines()[: self.max_lines]) + "\n"

    def render(self, experiences: Sequence[str]) -> str:
        if not experiences:
            return ""
        blocks = ["".join(f"# {line}".rstrip() + "\n" for line in e.splitlines()) for e in experiences]
        return self.HEADING + "#\n".join(blocks) + "\n"


# ----------------------------------------------------------------------------- the loop


def run_round(task: Task, generate: Generate, library: ExperienceLibrary, problems: Sequence[Problem],
              group_size: int, round: int, rng: random.Random, context_items: int = 2, normalize_std: bool = False) -> float:
    """One pass over ``problems``: sample ``group_size`` rollouts per prompt with
    ``context_items`` library items rendered before it, reward them, add the rollouts
    with a positive advantage, prune. Returns the mean reward."""
    total, count = 0.0, 0
    for problem in problems:
        context = task.render(library.context_items(context_items, rng))
        completions = generate(context, problem.prompt, group_size)
        rewards = [task.reward(problem, c) for c in completions]
        for c, adv in zip(completions, group_advantages(rewards, normalize_std)):
            if adv > 0:
                library.add(task.experience(problem, c), adv, round)
        total += sum(rewards)
        count += len(rewards)
    library.prune(round)
    return total / max(count, 1)


@dataclass
class SuccessRate:
    """Successes of ``n`` held-out samples (one per prompt) with the Wilson 95% interval."""

    successes: int
    n: int
    rate: float
    low: float
    high: float
    samples: list[dict] = field(default_factory=list)

    @classmethod
    def of(cls, outcomes: Sequence[bool], samples: list[dict] | None = None) -> "SuccessRate":
        k, n = sum(outcomes), len(outcomes)
        low, high = wilson_interval(k, n)
        return cls(k, n, k / n, low, high, samples or [])


def held_out_success(task: Task, generate: Generate, problems: Sequence[Problem], library: ExperienceLibrary | None,
                     rng: random.Random, context_items: int = 2) -> SuccessRate:
    """One sample per held-out prompt, with ``context_items`` library items in its
    context (none without a library); success = reward 1."""
    outcomes, records = [], []
    drawn = [library.context_items(context_items, rng) if library is not None else [] for _ in problems]
    pairs = [(task.render(items), problem.prompt) for items, problem in zip(drawn, problems)]
    batch = getattr(generate, "batch", None)
    if batch is not None:  # a ModelGenerate: the prompts decoded in batches, the same samples, fewer forwards
        completions = batch(pairs)
    else:
        completions = [generate(context, prompt, 1)[0] for context, prompt in pairs]
    for problem, items, completion in zip(problems, drawn, completions):
        ok = task.reward(problem, completion) >= 1.0
        outcomes.append(ok)
        records.append({"where": problem.where, "success": ok, "context_items": len(items), "completion": completion})
    return SuccessRate.of(outcomes, records)


@dataclass
class SeedResult:
    """One seed: the library grown from scratch (or the given start), then both arms."""

    seed: int
    rounds: list[dict]
    library_size: int
    without_library: SuccessRate
    with_library: SuccessRate

    @property
    def difference(self) -> float:
        return self.with_library.rate - self.without_library.rate


@dataclass
class GRPOSettings:
    """One seed's work: ``rounds`` over ``train_prompts`` library prompts with
    ``group_size`` rollouts each, then ``test_prompts`` held-out prompts per arm;
    ``context_items`` library items drawn into each context."""

    rounds: int = 3
    train_prompts: int = 32
    test_prompts: int = 64
    group_size: int = 4
    context_items: int = 2
    normalize_std: bool = False

    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the first value out of range."""
        for name in ("train_prompts", "test_prompts", "group_size", "context_items"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.rounds < 0:
            raise ConfigError(f"rounds must be >= 0, got {self.rounds}")


def measure_seed(task: Task, make_generate: Callable[[int], Generate], library: ExperienceLibrary, seed: int,
                 settings: GRPOSettings, on_round: Callable[[dict], None] | None = None) -> SeedResult:
    """Grow ``library`` (in place) for ``settings.rounds`` rounds on the library
    prompts of ``seed``, then measure the held-out prompts of ``seed`` without and
    with it. ``make_generate(stream)`` gives a generator whose randomness is a
    function of ``stream``: the rounds use stream ``2 * seed``, both held-out arms
    a fresh generator of stream ``2 * seed + 1`` (so sample ``i`` of the two arms
    draws the same random numbers)."""
    settings.validate()
    rng = random.Random(seed)
    rounds = []
    if settings.rounds:
        generate = make_generate(2 * seed)
        train = task.problems(settings.train_prompts, seed, "library")
        for rd in range(settings.rounds):
            reward = run_round(task, generate, library, train, settings.group_size, rd, rng, settings.context_items,
                               settings.normalize_std)
            rounds.append({"round": rd, "mean_reward": reward, "library_size": len(library.items)})
            if on_round is not None:
                on_round(rounds[-1])
    test = task.problems(settings.test_prompts, seed, "test")
    without = held_out_success(task, make_generate(2 * seed + 1), test, None, rng, settings.context_items)
    with_lib = held_out_success(task, make_generate(2 * seed + 1), test, library, rng, settings.context_items)
    return SeedResult(seed, rounds, len(library.items), without, with_lib)


def spread(values: Sequence[float]) -> dict[str, float]:
    """Mean, sample standard deviation (0 for one value), min and max."""
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values)}


def summarize(results: Sequence[SeedResult]) -> dict[str, dict]:
    """Each arm's rate over seeds (:func:`spread`, and the Wilson interval of all
    seeds' samples pooled) and the spread of the per-seed difference (with - without)."""
    out: dict[str, dict] = {}
    for arm in ("without_library", "with_library"):
        rates = [getattr(r, arm) for r in results]
        pooled = SuccessRate.of([s["success"] for rate in rates for s in rate.samples])
        out[arm] = {**spread([r.rate for r in rates]), "pooled": {k: v for k, v in asdict(pooled).items() if k != "samples"}}
    out["difference"] = spread([r.difference for r in results])
    return out


# ----------------------------------------------------------------------------- a model as the generator


def fit_lines(text: str, encode: Callable[[str], list[int]], budget: int, keep_end: bool) -> str:
    """The most whole lines of ``text`` from its end (``keep_end``) or its start
    whose encoding holds at most ``budget`` tokens; from the end, if even the last
    line alone is longer, the longest end of that line that fits."""
    if budget < 1 or not text:
        return ""
    if len(encode(text)) <= budget:
        return text
    lines = text.splitlines(keepends=True)
    if not keep_end:
        return "".join(lines[: _most_that_fit(lambda k: "".join(lines[:k]), len(lines), encode, budget)])
    k = _most_that_fit(lambda k: "".join(lines[len(lines) - k :]), len(lines), encode, budget)
    if k:
        return "".join(lines[len(lines) - k :])
    last = lines[-1]  # too long alone: its longest end that fits
    return last[len(last) - _most_that_fit(lambda k: last[len(last) - k :], len(last), encode, budget) :]


def _most_that_fit(piece: Callable[[int], str], n: int, encode: Callable[[str], list[int]], budget: int) -> int:
    """The largest ``k < n`` with ``piece(k)`` within ``budget`` tokens (``piece(k)``
    grows with ``k``; ``piece(0)`` is empty; ``piece(n)``, the whole, does not fit)."""
    lo, hi = 0, n - 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if len(encode(piece(mid))) <= budget:
            lo = mid
        else:
            hi = mid - 1
    return lo


class ModelGenerate:
    """A model's :data:`Generate` (:func:`model_generate`): call ``i`` seeded
    ``(stream, i)``; :meth:`batch` makes the next calls, one per (context, prompt)
    pair, ``batch_size`` prompts decoded at a time."""

    def __init__(self, sampler: ModelSampler, fit: Callable[[str, str], str], autocast_dtype: torch.dtype | None,
                 max_new_tokens: int, batch_size: int) -> None:
        self.sampler, self.fit, self.autocast_dtype = sampler, fit, autocast_dtype
        self.max_new_tokens, self.batch_size = max_new_tokens, batch_size

    def _autocast(self) -> torch.autocast:
        device = next(self.sampler.model.parameters()).device
        return torch.autocast(device.type, dtype=self.autocast_dtype or torch.float32,
                              enabled=self.autocast_dtype is not None)

    def __call__(self, context: str, prompt: str, n: int) -> list[str]:
        with self._autocast():
            return self.sampler.many(self.fit(context, prompt), self.max_new_tokens, n)  # a group in one batch

    def batch(self, pairs: Sequence[tuple[str, str]]) -> list[str]:
        texts = [self.fit(context, prompt) for context, prompt in pairs]
        with self._autocast():
            return self.sampler.batch(texts, self.max_new_tokens, self.batch_size)


def model_generate(model: CausalLM, tokenizer: BPETokenizer, *, context_tokens: int, prompt_tokens: int,
                   max_new_tokens: int, temperature: float = 0.8, top_k: int = 50,
                   autocast_dtype: torch.dtype | None = None, batch_size: int = 16) -> Callable[[int], ModelGenerate]:
    """``make_generate(stream)`` for :func:`measure_seed`: a model's
    :class:`ModelGenerate` over :func:`~sparsetrain.evaluate.model_sampler` (its
    stopping rule; call ``i`` seeded ``(stream, i)``) continuing the first lines of
    the context that fit in ``context_tokens`` followed by the last lines of the
    prompt that fit in ``prompt_tokens``. The prompt's window does not depend on the
    context, so with and without a library the model sees the same end of the file.
    ``autocast_dtype``: the run's autocast (bfloat16 on CUDA), None for float32;
    ``batch_size``: held-out prompts decoded at once."""
    check_sampling(max_new_tokens, temperature, top_k)
    need = 1 + context_tokens + prompt_tokens + max_new_tokens
    if context_tokens < 0 or prompt_tokens < 1:
        raise ConfigError(f"context_tokens must be >= 0 and prompt_tokens >= 1, got {context_tokens} and {prompt_tokens}")
    if need > model.config.seq_len:
        raise ConfigError(f"context_tokens {context_tokens} + prompt_tokens {prompt_tokens} + max_new_tokens "
                          f"{max_new_tokens} + 1 (end-of-text) = {need} must fit the model's seq_len "
                          f"{model.config.seq_len} (lower --context-tokens, --prompt-tokens or --max-new-tokens)")
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")

    def fit(context: str, prompt: str) -> str:
        return (fit_lines(context, tokenizer.encode, context_tokens, keep_end=False)
                + fit_lines(prompt, tokenizer.encode, prompt_tokens, keep_end=True))

    def make_generate(stream: int) -> ModelGenerate:
        return ModelGenerate(model_sampler(model, tokenizer, temperature, top_k, seed=stream), fit, autocast_dtype,
                             max_new_tokens, batch_size)

    return make_generate
