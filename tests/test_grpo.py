"""Training-free GRPO: advantages, pruning, the sampling distribution (chi-square),
save/load, a corrupt library file, one round with a scripted generator, the CLI."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from sparsetrain.cli import main
from sparsetrain.errors import DataError
from sparsetrain.grpo import ExperienceLibrary, arithmetic_prompts, group_advantages, run_round, verify_number


def test_group_advantages() -> None:
    r = [1.0, 0.0, 0.0, 1.0, 1.0]
    adv = group_advantages(r)
    assert adv == pytest.approx([0.4, -0.6, -0.6, 0.4, 0.4]) and sum(adv) == pytest.approx(0.0)
    std = (sum(a * a for a in adv) / 5) ** 0.5
    assert group_advantages(r, normalize_std=True) == pytest.approx([a / (std + 1e-6) for a in adv])
    assert group_advantages([1.0, 1.0]) == [0.0, 0.0]


def test_pruning_by_age_and_size() -> None:
    lib = ExperienceLibrary(max_size=2, max_age=3)
    lib.add("old", 9.0, round=0)
    lib.add("a", 0.5, round=4)
    lib.add("b", 0.9, round=5)
    lib.add("c", 0.7, round=5)
    lib.prune(current_round=5)
    assert [e.text for e in lib.items] == ["b", "c"]  # "old" too old, "a" the weakest


def test_sampling_follows_softmax_chi_square() -> None:
    lib = ExperienceLibrary(max_size=10, temperature=0.5)
    advs = [0.1, 0.4, 0.2, 0.9, 0.5]
    for i, a in enumerate(advs):
        lib.add(f"e{i}", a, 0)
    p = lib.probabilities()
    assert sum(p) == pytest.approx(1.0)
    n = 20_000
    rng = random.Random(int(random.SystemRandom().random() * 1e9))
    counts = {e.text: 0 for e in lib.items}
    for e in lib.sample(n, rng):
        counts[e.text] += 1
    chi2 = sum((counts[f"e{i}"] - n * p[i]) ** 2 / (n * p[i]) for i in range(5))
    assert chi2 < 18.47  # chi-square, 4 degrees of freedom, p = 0.001


def test_save_load_round_trip_and_corrupt_file(tmp_path: Path) -> None:
    lib = ExperienceLibrary(max_size=5, max_age=2, temperature=0.7)
    lib.add("x = 1 + 1\nprint(x)  # 2\n", 0.5, 3)
    lib.save(tmp_path / "lib.json")
    again = ExperienceLibrary.load(tmp_path / "lib.json")
    assert again == lib
    (tmp_path / "bad.json").write_text('{"max_size": 5, "items": [')
    before = (tmp_path / "bad.json").read_bytes()
    with pytest.raises(DataError, match="bad.json is corrupt"):
        ExperienceLibrary.load(tmp_path / "bad.json")
    assert (tmp_path / "bad.json").read_bytes() == before
    with pytest.raises(DataError, match="not found"):
        ExperienceLibrary.load(tmp_path / "none.json")


def test_round_keeps_only_positive_advantage_rollouts() -> None:
    prompts = arithmetic_prompts(3, seed=1)
    answers = {p: a for p, a in prompts}

    def generate(text: str, n: int) -> list[str]:  # right on the first rollout only
        prompt = next(p for p in answers if text.endswith(p))
        return [f"{answers[prompt]}\n"] + ["999\n"] * (n - 1)

    lib = ExperienceLibrary(max_size=10)
    r = run_round(generate, lib, prompts, group_size=4, round=0, rng=random.Random(0))
    assert r == pytest.approx(0.25)
    assert len(lib.items) == 3 and all(e.advantage == pytest.approx(0.75) for e in lib.items)
    assert all(verify_number(e.text.split("# ")[-1], answers[e.text.split("# ")[0] + "# "]) == 1.0 for e in lib.items)


def test_grpo_cli_smoke(make_cfg, tmp_path: Path, capsys) -> None:
    from sparsetrain.trainer import train

    train(make_cfg(out_dir=str(tmp_path / "run"), max_steps=2), verbose=False)
    code = main(["grpo", "--ckpt", str(tmp_path / "run"), "--library", str(tmp_path / "lib.json"), "--rounds", "1",
                 "--train-prompts", "2", "--test-prompts", "2", "--group-size", "2"])
    assert code == 0 and "held-out mean reward" in capsys.readouterr().out
    assert ExperienceLibrary.load(tmp_path / "lib.json").max_size == 64
    (tmp_path / "lib.json").write_text("garbage")
    assert main(["grpo", "--ckpt", str(tmp_path / "run"), "--library", str(tmp_path / "lib.json")]) == 2
