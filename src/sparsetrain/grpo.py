"""Training-free GRPO: an experience library instead of gradient updates.

For each prompt, ``G`` rollouts are sampled from a checkpoint with the prompt
prefixed by experiences drawn from the library; a verifier scores each one;
its group-relative advantage is ``r - mean(r)`` (optionally divided by the
group's std). Rollouts with a positive advantage become experiences. The
library keeps at most ``max_size`` of them, drops those older than
``max_age`` rounds, and samples with probabilities ``softmax(advantage / T)``.
It is saved as JSON atomically; a corrupt file is an error that names it.
"""

from __future__ import annotations

import json
import math
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .checkpoint import atomic_write_text
from .errors import DataError


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
    text: str  # what gets prepended to later prompts
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


# ----------------------------------------------------------------------------- a built-in task


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


def run_round(
    generate: Callable[[str, int], list[str]],
    library: ExperienceLibrary,
    prompts: Sequence[tuple[str, int]],
    group_size: int,
    round: int,
    rng: random.Random,
    n_context: int = 2,
    normalize_std: bool = False,
) -> float:
    """One pass over ``prompts``: sample ``group_size`` rollouts per prompt with
    ``n_context`` experiences prefixed, reward, add positive-advantage rollouts,
    prune. Returns the mean reward. ``generate(prompt, n)`` returns n completions."""
    total, count = 0.0, 0
    for prompt, answer in prompts:
        context = "".join(e.text for e in library.sample(n_context, rng))
        completions = generate(context + prompt, group_size)
        rewards = [verify_number(c, answer) for c in completions]
        for c, adv in zip(completions, group_advantages(rewards, normalize_std)):
            if adv > 0:
                library.add(prompt + c.split("\n")[0] + "\n", adv, round)
        total += sum(rewards)
        count += len(rewards)
    library.prune(round)
    return total / max(count, 1)


def mean_reward(generate: Callable[[str, int], list[str]], prompts: Sequence[tuple[str, int]], group_size: int,
                library: ExperienceLibrary | None, rng: random.Random, n_context: int = 2) -> float:
    """Held-out evaluation, with or without the library's experiences in context."""
    total, count = 0.0, 0
    for prompt, answer in prompts:
        context = "".join(e.text for e in library.sample(n_context, rng)) if library else ""
        rewards = [verify_number(c, answer) for c in generate(context + prompt, group_size)]
        total += sum(rewards)
        count += len(rewards)
    return total / max(count, 1)
