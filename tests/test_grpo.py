"""Training-free GRPO: advantages, pruning, the sampling distribution (chi-square),
save/load, a corrupt library file; the compile task's verifier on known-good and
known-bad completions; reward and advantage math of a scripted group against
hand-computed values; the library's effect path with a stub generator whose
success depends on a library item being in the context; the model's window;
the measurement's summary against numpy; ``sparsetrain grpo`` end to end."""

from __future__ import annotations

import json
import random
import statistics
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch

from sparsetrain.errors import ConfigError, DataError
from sparsetrain.evaluate import CodePrompt, code_prompts, held_out_code_files, wilson_interval
from sparsetrain.grpo import (ArithmeticTask, CompileTask, ExperienceLibrary, GRPOSettings, Problem, SeedResult,
                              SuccessRate, arithmetic_prompts, fit_lines, group_advantages, measure_seed, model_generate,
                              run_round, summarize, verify_completion, verify_number)
from test_cli import assert_one_line_error, run_main
from test_evaluate import write_python_corpus


@pytest.fixture(autouse=True)
def one_thread():
    """Sampling runs many tiny matrix products one token at a time; on a loaded
    machine, synchronising torch's threads for each costs more than the product."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def python_corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_python_corpus(tmp_path_factory.mktemp("pycorpus"), seed=11)


def body_indent(prompt: CodePrompt) -> str:
    """The indentation of the first line of the prompt's own block."""
    first = prompt.reference.split("\n")[1]
    return first[: len(first) - len(first.lstrip())]


def cut(source: str, line: int) -> CodePrompt:
    """``source`` cut after line ``line`` (1-based), as evaluate's prompts are."""
    lines = source.split("\n")
    return CodePrompt("example.py", line, "\n".join(lines[:line]), "")


AREA = "def area(w, h):\n    return w * h\n\n\nx = 1\n"
NESTED = "class Box:\n    def size(self):\n        if self.full:\n            return 1\n        return 2\n\n\ny = 2\n"


# ----------------------------------------------------------------------------- the library


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
    items = lib.context_items(50, rng)
    assert len(items) == len(set(items)) and set(items) <= set(counts)


def test_save_load_round_trip_and_corrupt_file(tmp_path: Path) -> None:
    lib = ExperienceLibrary(max_size=5, max_age=2, temperature=0.7)
    lib.add("x = 1 + 1\nprint(x)  # 2\n", 0.5, 3)
    lib.save(tmp_path / "lib.json")
    again = ExperienceLibrary.load(tmp_path / "lib.json")
    assert again == lib and lib.copy() == lib and lib.copy().items[0] is not lib.items[0]
    (tmp_path / "bad.json").write_text('{"max_size": 5, "items": [')
    before = (tmp_path / "bad.json").read_bytes()
    with pytest.raises(DataError, match="bad.json is corrupt"):
        ExperienceLibrary.load(tmp_path / "bad.json")
    assert (tmp_path / "bad.json").read_bytes() == before
    with pytest.raises(DataError, match="not found"):
        ExperienceLibrary.load(tmp_path / "none.json")


def test_arithmetic_round_keeps_only_positive_advantage_rollouts() -> None:
    task = ArithmeticTask()
    problems = task.problems(3, seed=1, split="library")
    assert [(p.prompt, p.answer) for p in problems] == arithmetic_prompts(3, 1)
    assert task.problems(3, seed=1, split="test") != problems

    def generate(context: str, prompt: str, n: int) -> list[str]:  # right on the first rollout only
        answer = next(p.answer for p in problems if p.prompt == prompt)
        return [f"{answer}\n"] + ["999\n"] * (n - 1)

    lib = ExperienceLibrary(max_size=10)
    r = run_round(task, generate, lib, problems, group_size=4, round=0, rng=random.Random(0))
    assert r == pytest.approx(0.25)
    assert len(lib.items) == 3 and all(e.advantage == pytest.approx(0.75) for e in lib.items)
    assert all(verify_number(e.text.split("# ")[-1], p.answer) == 1.0 for e, p in zip(lib.items, problems))


# ----------------------------------------------------------------------------- the compile task's verifier


@pytest.mark.parametrize("completion, compiles, fills, block", [
    ("\n    return w * h\n\n\nx = 1\n", True, True, "def area(w, h):\n    return w * h\n"),  # the file's own
    ("\n    s = w * h\n    return s\n", True, True, "def area(w, h):\n    s = w * h\n    return s\n"),
    (" return w\n\nz = 3\n", True, True, "def area(w, h): return w\n"),  # on the header's own line
    ("\n    pass\n", True, False, None),
    ('\n    """Area."""\n    ...\n', True, False, None),  # a docstring and an ellipsis: still a stub
    ("\n    return w * (h\n", False, False, ""),  # a syntax error
    ("\nreturn w\n", False, False, ""),  # a top-level line ends the completion: the block is empty
    ("\n    return w *", False, False, ""),  # the budget ran out mid-line: that line is dropped
    ("", False, False, ""),
])
def test_verify_completion_known_good_and_bad(completion: str, compiles: bool, fills: bool, block: str | None) -> None:
    v = verify_completion(cut(AREA, 1), completion)
    assert (v.compiles, v.fills_block, v.success) == (compiles, fills, compiles and fills)
    if block is not None:
        assert v.block == block


def test_verify_completion_judges_the_block_the_header_opened() -> None:
    """The innermost block whose header is the cut line, dedented to its header;
    a statement after that block (in the enclosing one) does not fill it."""
    prompt = cut(NESTED, 3)  # "        if self.full:"
    v = verify_completion(prompt, "\n            return 1\n        return 2\n\n\ny = 2\n")
    assert v.success and v.stopped_at_boundary and v.block == "if self.full:\n    return 1\n"
    v = verify_completion(prompt, "\n            pass\n        return 2\n")
    assert v.compiles and not v.fills_block
    v = verify_completion(cut(NESTED, 2), "\n        self.full = 1\n")  # the method's header
    assert v.success and v.block == "def size(self):\n    self.full = 1\n"
    v = verify_completion(cut(NESTED, 1), "\n    return 1\n")  # `return` in a class body does not compile
    assert not v.compiles and not v.success


def test_verify_completion_on_held_out_prompts(python_corpus: Path) -> None:
    """Every prompt's own continuation succeeds; a broken line or a bare ``pass``
    in its place does not."""
    files = sorted(python_corpus.iterdir())
    for p in code_prompts(files, 20, seed=3):
        text = Path(p.file).read_text()
        rest = text[len(p.prompt):]
        indent = body_indent(p)
        assert verify_completion(p, rest).success
        assert not verify_completion(p, f"\n{indent}x = )(\n" + rest).compiles
        v = verify_completion(p, f"\n{indent}pass\n")
        assert v.compiles and not v.fills_block


# ----------------------------------------------------------------------------- rewards, advantages, experiences


def test_group_rewards_advantages_and_experiences_by_hand() -> None:
    """One prompt, a scripted group of four: good, broken, stub, good. Rewards
    [1, 0, 0, 1]; advantages r - 0.5 = [0.5, -0.5, -0.5, 0.5] (divided by the
    std 0.5 when asked: [1, -1, -1, 1]); the two good ones join the library as
    their blocks, at advantage 0.5; the mean reward is 0.5."""
    task = CompileTask(["a.py", "b.py"], max_lines=2)
    problem = Problem(cut(AREA, 1).prompt, cut(AREA, 1))
    group = ["\n    return w * h\n", "\n    return (w\n", "\n    pass\n", "\n    s = w * h\n    return s\n"]
    rewards = [task.reward(problem, c) for c in group]
    assert rewards == [1.0, 0.0, 0.0, 1.0]
    assert group_advantages(rewards) == [0.5, -0.5, -0.5, 0.5]
    assert group_advantages(rewards, normalize_std=True) == pytest.approx([0.5 / (0.5 + 1e-6) * s for s in (1, -1, -1, 1)])

    contexts = []

    def generate(context: str, prompt: str, n: int) -> list[str]:
        assert prompt == problem.prompt and n == 4
        contexts.append(context)
        return group

    lib = ExperienceLibrary()
    assert run_round(task, generate, lib, [problem], 4, round=2, rng=random.Random(0)) == 0.5
    assert [(e.text, e.advantage, e.round) for e in lib.items] == [
        ("def area(w, h):\n    return w * h\n", 0.5, 2), ("def area(w, h):\n    s = w * h\n", 0.5, 2)]  # 2 lines kept
    assert contexts == [""]  # an empty library: no context
    expected = task.render(lib.copy().context_items(5, random.Random(0)))
    run_round(task, generate, lib, [problem], 4, round=3, rng=random.Random(0), context_items=5)
    assert contexts[1] == expected and expected.startswith(CompileTask.HEADING) and "#     return w * h\n" in expected
    before = lib.copy()
    group = [group[0]] * 4  # all rewarded: every advantage is 0, nothing is learnt
    assert run_round(task, generate, lib, [problem], 4, round=4, rng=random.Random(0)) == 1.0 and lib == before
    rendered = task.render(["def f():\n    return 1\n", "if x:\n    y = 2\n"])
    assert rendered == ("# Blocks completed before:\n# def f():\n#     return 1\n#\n# if x:\n#     y = 2\n\n")
    assert all(line.startswith("#") for line in rendered.splitlines() if line)


def test_compile_task_splits_the_held_out_files(python_corpus: Path) -> None:
    files = sorted(python_corpus.iterdir())[:7]
    task = CompileTask(files)
    assert task.files["library"] == [str(f) for f in files[0::2]] and task.files["test"] == [str(f) for f in files[1::2]]
    lib_files = {p.answer.file for p in task.problems(20, 0, "library")}
    test_files = {p.answer.file for p in task.problems(20, 0, "test")}
    assert lib_files <= set(task.files["library"]) and test_files <= set(task.files["test"])
    with pytest.raises(DataError, match="at least 2 held-out Python files"):
        CompileTask(files[:1])


# ----------------------------------------------------------------------------- the library's effect path


def stub_maker(task: CompileTask, p_with: float, p_without: float, seen: list[tuple[int, str]]):
    """``make_generate`` of a stub: call ``i`` of stream ``s`` draws ``u`` from
    ``Random((salt, s, i))`` (a fresh salt per stub, the same for every stream);
    it writes a good block (assigning ``trick_value``) when ``u`` < ``p_with`` if
    the context holds ``trick_value``, else ``p_without``; a broken one otherwise."""
    salt = random.SystemRandom().random()
    prompts = {}
    for split in ("library", "test"):
        for seed in range(3):
            for p in task.problems(60, seed, split):
                prompts[p.prompt] = p.answer

    def make(stream: int):
        calls = [0]

        def generate(context: str, prompt: str, n: int) -> list[str]:
            indent = body_indent(prompts[prompt])
            out = []
            for _ in range(n):
                u = random.Random(f"{salt}:{stream}:{calls[0]}").random()
                calls[0] += 1
                p = p_with if "trick_value" in context else p_without
                out.append(f"\n{indent}trick_value = 42\n" if u < p else f"\n{indent}x = )(\n")
            seen.append((stream, context))
            return out

        return generate

    return make


def test_library_in_the_context_raises_held_out_success(python_corpus: Path) -> None:
    """The stub succeeds far more often when a library item (one of its own good
    blocks, grown by the rounds) is in its context: the with-library rate's
    Wilson interval lies above the without-library one; with the same random
    stream for both arms, every prompt solved without the library is solved with it."""
    task = CompileTask(sorted(python_corpus.iterdir()))
    seen: list[tuple[int, str]] = []
    settings = GRPOSettings(rounds=2, train_prompts=20, test_prompts=60, group_size=4, context_items=2)
    for seed in (0, 1):
        lib = ExperienceLibrary()
        r = measure_seed(task, stub_maker(task, 0.9, 0.25, seen), lib, seed, settings)
        assert r.library_size == len(lib.items) > 0 and all("trick_value = 42" in e.text for e in lib.items)
        assert [x["library_size"] for x in r.rounds] == sorted(x["library_size"] for x in r.rounds)
        w, o = r.with_library, r.without_library
        assert w.n == o.n == 60 and w.low > o.high
        assert all(sw["success"] or not so["success"] for sw, so in zip(w.samples, o.samples))
        assert [s["where"] for s in w.samples] == [s["where"] for s in o.samples]
        assert all(s["context_items"] >= 1 for s in w.samples) and all(s["context_items"] == 0 for s in o.samples)
    test_contexts = [c for stream, c in seen if stream % 2 == 1]
    assert "" in test_contexts and all(c == "" or c.startswith(CompileTask.HEADING) for c in test_contexts)


def test_a_context_blind_generator_scores_the_same_in_both_arms(python_corpus: Path) -> None:
    """The control: success independent of the context, the same random stream in
    both arms: identical outcomes, sample by sample."""
    task = CompileTask(sorted(python_corpus.iterdir()))
    r = measure_seed(task, stub_maker(task, 0.4, 0.4, []), ExperienceLibrary(), 2,
                     GRPOSettings(rounds=1, train_prompts=10, test_prompts=40, group_size=4))
    assert r.library_size > 0
    assert [s["success"] for s in r.with_library.samples] == [s["success"] for s in r.without_library.samples]
    assert r.difference == 0.0


def test_summary_against_numpy() -> None:
    rng = np.random.default_rng()
    results = []
    for seed in range(4):
        n = int(rng.integers(5, 40))
        arms = [rng.random(n) < rng.random() for _ in range(2)]
        rates = [SuccessRate.of(list(map(bool, a)), [{"success": bool(x)} for x in a]) for a in arms]
        results.append(SeedResult(seed, [], 0, rates[0], rates[1]))
    s = summarize(results)
    for arm, i in (("without_library", 0), ("with_library", 1)):
        rates = np.array([[r.without_library, r.with_library][i].rate for r in results])
        assert s[arm]["mean"] == pytest.approx(rates.mean()) and s[arm]["std"] == pytest.approx(rates.std(ddof=1))
        assert (s[arm]["min"], s[arm]["max"]) == (rates.min(), rates.max())
        k = sum([r.without_library, r.with_library][i].successes for r in results)
        n = sum([r.without_library, r.with_library][i].n for r in results)
        assert (s[arm]["pooled"]["low"], s[arm]["pooled"]["high"]) == wilson_interval(k, n)
    diffs = np.array([r.with_library.rate - r.without_library.rate for r in results])
    assert s["difference"]["mean"] == pytest.approx(diffs.mean()) and s["difference"]["std"] == pytest.approx(diffs.std(ddof=1))
    one = summarize(results[:1])
    assert one["difference"]["std"] == 0.0


# ----------------------------------------------------------------------------- the model's window


def test_fit_lines_keeps_whole_lines_within_the_budget() -> None:
    rng = random.Random()
    chars = list  # one token per character: the counts are the lengths
    for _ in range(50):
        lines = ["".join(rng.choice("ab ") for _ in range(rng.randint(0, 9))) + "\n" for _ in range(rng.randint(1, 8))]
        text = "".join(lines)
        budget = rng.randint(1, len(text) + 2)
        tail, head = fit_lines(text, chars, budget, keep_end=True), fit_lines(text, chars, budget, keep_end=False)
        sizes = [len(l) for l in lines]
        k_tail = max(k for k in range(len(lines) + 1) if sum(sizes[len(lines) - k :]) <= budget)
        k_head = max(k for k in range(len(lines) + 1) if sum(sizes[:k]) <= budget)
        assert head == "".join(lines[:k_head])
        if k_tail:
            assert tail == "".join(lines[len(lines) - k_tail :])
        else:  # the last line alone is too long: its last `budget` characters
            assert tail == lines[-1][-budget:]
    assert fit_lines("abc\n", chars, 0, keep_end=True) == ""


def test_model_window_is_the_same_prompt_end_in_both_arms(python_corpus: Path, monkeypatch) -> None:
    """What the sampler receives: the end-of-text, the head of the context within
    ``context_tokens``, the end of the prompt within ``prompt_tokens`` (the same
    with or without a context); call ``i`` of stream ``s`` seeded ``s * 1_000_003 + i``."""
    import sparsetrain.evaluate as evaluate
    from sparsetrain.config import ModelConfig
    from sparsetrain.model import GPT
    from sparsetrain.tokenizer import BPETokenizer

    files = sorted(python_corpus.iterdir())
    tok = BPETokenizer.train([f.read_text() for f in files], 300)
    model = GPT(ModelConfig(vocab_size=320, seq_len=128, n_layer=1, n_head=2, d_model=16)).eval()
    calls = []

    def fake_sample_prompts(model, prompts, gens, n, temperature, top_k, stop=None, check_every=16):
        calls.extend((list(ids), gen.initial_seed()) for ids, gen in zip(prompts, gens))
        return [tok.encode("\n    x = 1\ny = 2\n")[:n] for _ in gens]

    monkeypatch.setattr(evaluate, "sample_prompts", fake_sample_prompts)
    with pytest.raises(ConfigError, match="= 129 must fit the model's seq_len 128"):
        model_generate(model, tok, context_tokens=40, prompt_tokens=40, max_new_tokens=48)
    make = model_generate(model, tok, context_tokens=40, prompt_tokens=40, max_new_tokens=47)
    prompt = code_prompts(files, 1, seed=0)[0].prompt
    context = CompileTask(files).render([f"def f{i}():\n    return {i}\n" for i in range(6)])
    window = fit_lines(prompt, tok.encode, 40, keep_end=True)
    assert prompt.endswith(window) and 0 < len(tok.encode(window)) <= 40
    head = fit_lines(context, tok.encode, 40, keep_end=False)
    assert context.startswith(head) and len(head) < len(context) and 0 < len(tok.encode(head)) <= 40

    make(7)(context, prompt, 2)
    make(7)("", prompt, 1)
    assert [c[0] for c in calls] == [[tok.eot_id] + tok.encode(head + window)] * 2 + [[tok.eot_id] + tok.encode(window)]
    assert [c[1] for c in calls] == [7 * 1_000_003, 7 * 1_000_003 + 1, 7 * 1_000_003]


def test_held_out_prompts_decoded_in_batches_are_the_samples_one_by_one(python_corpus: Path) -> None:
    """A seed measured with the model's held-out prompts decoded 5 at a time (groups
    in one batch) equals the same seed with every call made alone (float64)."""
    from sparsetrain.config import ModelConfig
    from sparsetrain.model import GPT, rope_tables
    from sparsetrain.tokenizer import BPETokenizer

    files = sorted(python_corpus.iterdir())
    tok = BPETokenizer.train([f.read_text() for f in files], 300)
    torch.manual_seed(random.randrange(2**31))
    cfg = ModelConfig(vocab_size=320, seq_len=96, n_layer=2, n_head=2, d_model=16)
    model = GPT(cfg).double().eval()
    with torch.no_grad():  # the init's logits are nearly uniform: stir every weight so that the context matters
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    model.rope_cos, model.rope_sin = rope_tables(cfg.seq_len, cfg.head_dim, cfg.rope_theta, torch.float64)
    task = CompileTask(files)
    settings = GRPOSettings(rounds=1, train_prompts=3, test_prompts=7, group_size=3, context_items=2)
    make = model_generate(model, tok, context_tokens=24, prompt_tokens=40, max_new_tokens=24, temperature=1.0,
                          top_k=0, batch_size=5)

    def one_by_one(stream: int):
        g = make(stream)
        return lambda context, prompt, n: [g.sampler(g.fit(context, prompt), g.max_new_tokens) for _ in range(n)]

    batched = measure_seed(task, make, ExperienceLibrary(8), 2, settings)
    alone = measure_seed(task, one_by_one, ExperienceLibrary(8), 2, settings)
    assert asdict(batched) == asdict(alone)
    assert batched.with_library.samples[0]["context_items"] > 0 or batched.library_size == 0


# ----------------------------------------------------------------------------- the CLI


def test_grpo_cli_end_to_end(make_cfg, python_corpus: Path, tmp_path: Path, capsys) -> None:
    from sparsetrain.trainer import train

    cfg = make_cfg(data=str(python_corpus), val_fraction=0.2, max_steps=2, out_dir=str(tmp_path / "run"))
    train(cfg, verbose=False)
    args = ["grpo", "--ckpt", str(tmp_path / "run"), "--task", "compile", "--rounds", "1", "--seeds", "2", "--seed", "5",
            "--train-prompts", "2", "--test-prompts", "3", "--group-size", "2", "--context-tokens", "6",
            "--prompt-tokens", "12", "--max-new-tokens", "8", "--device", "cpu"]
    code, out, err = run_main(args + ["--json", str(tmp_path / "a.json"), "--library", str(tmp_path / "lib.json")], capsys)
    assert code == 0, err
    assert "seed 5: held-out success without the library" in out and "compile over 2 seed(s)" in out
    a = json.loads((tmp_path / "a.json").read_text())
    assert [s["seed"] for s in a["seeds"]] == [5, 6] and a["task"] == "compile"

    files = held_out_code_files(cfg.data, cfg.val_fraction)
    task = CompileTask(files)
    for s in a["seeds"]:
        prompts = code_prompts(task.files["test"], 3, s["seed"])
        for arm in ("without_library", "with_library"):
            r = s[arm]
            assert r["n"] == 3 and r["rate"] == r["successes"] / 3
            assert (r["low"], r["high"]) == wilson_interval(r["successes"], 3)
            assert [x["where"] for x in r["samples"]] == [f"{p.file}:{p.line}" for p in prompts]
            # every recorded verdict, judged again from the recorded completion
            assert [x["success"] for x in r["samples"]] == [verify_completion(p, x["completion"]).success
                                                            for p, x in zip(prompts, r["samples"])]
        assert s["difference"] == s["with_library"]["rate"] - s["without_library"]["rate"]
        saved = ExperienceLibrary.load(tmp_path / f"lib.seed{s['seed']}.json")
        assert len(saved.items) == s["library_size"]
    rates = [s["with_library"]["rate"] for s in a["seeds"]]
    assert a["summary"]["with_library"]["mean"] == pytest.approx(statistics.fmean(rates))
    assert a["summary"]["with_library"]["std"] == pytest.approx(statistics.stdev(rates))

    assert run_main(args + ["--json", str(tmp_path / "b.json")], capsys)[0] == 0  # the same seeds: the same samples
    b = json.loads((tmp_path / "b.json").read_text())
    assert b["seeds"] == a["seeds"] and b["summary"] == a["summary"]

    code, out, _ = run_main(args[:3] + ["--task", "arithmetic", "--rounds", "1", "--seeds", "1", "--train-prompts", "1",
                                        "--test-prompts", "2", "--context-tokens", "4", "--prompt-tokens", "12",
                                        "--max-new-tokens", "4", "--device", "cpu"], capsys)
    assert code == 0 and "arithmetic over 1 seed(s)" in out

    bad = tmp_path / "bad.json"
    bad.write_text("garbage")
    assert_one_line_error(*run_main(args + ["--library", str(bad)], capsys)[::2], "bad.json is corrupt")
    assert_one_line_error(*run_main(args + ["--prompt-tokens", "40"], capsys)[::2], "--prompt-tokens 40", "seq_len 32")
    assert_one_line_error(*run_main(args + ["--seeds", "0"], capsys)[::2], "--seeds")
    assert_one_line_error(*run_main(args + ["--test-prompts", "0"], capsys)[::2], "--test-prompts must be >= 1, got 0")
    assert_one_line_error(*run_main(args + ["--rounds", "-1"], capsys)[::2], "--rounds must be >= 0, got -1")
    assert_one_line_error(*run_main(args + ["--temperature", "-1"], capsys)[::2], "-1")
    existing = tmp_path / "existing.json"
    ExperienceLibrary(5).save(existing)
    assert_one_line_error(*run_main(args + ["--library", str(existing), "--max-size", "8"], capsys)[::2],
                          "--max-size 8 differs from the capacity 5")


def test_grpo_cli_keeps_the_finished_seeds_of_a_stopped_run(make_cfg, python_corpus: Path, tmp_path: Path, capsys,
                                                             monkeypatch) -> None:
    """``--json`` is written after every seed: a run stopped in its second seed leaves
    the first seed's report (marked partial), equal to that seed in a whole run's."""
    import sparsetrain.grpo as grpo
    from sparsetrain.trainer import train

    cfg = make_cfg(data=str(python_corpus), val_fraction=0.2, max_steps=2, out_dir=str(tmp_path / "run"))
    train(cfg, verbose=False)
    args = ["grpo", "--ckpt", str(tmp_path / "run"), "--task", "compile", "--rounds", "1", "--seeds", "2", "--seed", "3",
            "--train-prompts", "2", "--test-prompts", "3", "--group-size", "2", "--context-tokens", "6",
            "--prompt-tokens", "12", "--max-new-tokens", "8", "--device", "cpu"]
    assert run_main(args + ["--json", str(tmp_path / "whole.json")], capsys)[0] == 0
    whole = json.loads((tmp_path / "whole.json").read_text())
    assert "partial" not in whole and len(whole["seeds"]) == 2

    measure = grpo.measure_seed
    seen = []

    def stopped_in_the_second_seed(*a, **k):
        seen.append(1)
        if len(seen) == 2:
            raise KeyboardInterrupt
        return measure(*a, **k)

    monkeypatch.setattr(grpo, "measure_seed", stopped_in_the_second_seed)
    assert run_main(args + ["--json", str(tmp_path / "cut.json")], capsys)[0] == 130
    cut = json.loads((tmp_path / "cut.json").read_text())
    assert cut["partial"] == {"seeds_finished": 1, "seeds": 2}
    assert cut["seeds"] == whole["seeds"][:1]
    assert cut["summary"]["with_library"]["mean"] == whole["seeds"][0]["with_library"]["rate"]


def test_grpo_cli_refuses_a_run_without_held_out_code(make_cfg, tmp_path: Path, capsys) -> None:
    """The conftest corpus is random words: no held-out file compiles, so no prompt."""
    from sparsetrain.trainer import train

    train(make_cfg(out_dir=str(tmp_path / "run"), max_steps=1), verbose=False)
    code, _, err = run_main(["grpo", "--ckpt", str(tmp_path / "run"), "--context-tokens", "6", "--prompt-tokens", "12",
                             "--max-new-tokens", "8", "--device", "cpu"], capsys)
    assert_one_line_error(code, err, "held-out Python files")


@pytest.mark.parametrize("flag", ["--library", "--json"])
def test_grpo_cli_refuses_a_folder_for_a_file_it_writes_before_running(flag: str, tmp_path: Path, capsys) -> None:
    """--library and --json are written after the whole run: a folder given for one is
    refused first, naming the flag, not after the run by the temporary file's name."""
    folder = tmp_path / "somewhere"
    folder.mkdir()
    code, _, err = run_main(["grpo", "--ckpt", str(tmp_path / "no_run"), flag, str(folder), "--device", "cpu"], capsys)
    assert_one_line_error(code, err, f"{flag} {folder} is a folder")
