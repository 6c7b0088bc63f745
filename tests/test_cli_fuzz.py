"""Seeded fuzz of the CLI and the config layer: random flags, values, types and
TOML files. Every case ends with exit 0 or with exit 2 and one line on stderr,
never a traceback; an accepted config prints as TOML that reads back to the
same config."""

from __future__ import annotations

import dataclasses
import random
import string
import tomllib
from pathlib import Path

import pytest

from sparsetrain.config import SECTIONS, ModelConfig, TrainConfig, build_config, dumps_toml, field_types
from sparsetrain.cli import main
from test_cli import SMALL, run_main

FIELDS = {f.name: (sec, typ) for sec, cls in (("model", ModelConfig), (None, TrainConfig))
          for f in dataclasses.fields(cls) if f.name != "model"
          for typ in [field_types(cls)[f.name]]
          for sec in [sec or f.metadata["section"]]}
NASTY_STRINGS = ["", " ", "nan", "inf", "-inf", "1e400", "-0", "0x10", "1_000", "１", "é", "\n", "a\tb", "\x1b[31m", '"',
                 "\\", "--lr", "true", "None", "../..", "/dev/null", "💥", "a" * 300, "\udcff"]


def random_value(rng: random.Random, typ: type) -> str:
    """A command-line value for a field of type ``typ``: plausible, boundary or wrong."""
    roll = rng.random()
    if roll < 0.25:
        return rng.choice(NASTY_STRINGS)
    if typ is int or roll < 0.4:
        return str(rng.choice([0, 1, -1, 2, 3, 7, 64, 257, 1000, 2**31, -(2**63), 10**30, rng.randint(-5, 5000)]))
    if typ is float:
        return repr(rng.choice([0.0, 1.0, -1.0, 0.5, 1e-9, 1e308, 2.5, rng.uniform(-2, 2), rng.uniform(0, 1)]))
    return rng.choice(["gpt", "resnet_bk", "relu2", "swiglu", "relu2_24", "cpu", "auto", "cuda", "cuda:1", "topk",
                       "threshold", "loss", "collider", "none", "batch", "uint16", "float32", "tiny", "d20", "x"])


def random_argv(rng: random.Random) -> list[str]:
    argv = ["train", "--dry-run"]
    for name in rng.sample(sorted(FIELDS), rng.randint(1, 4)):
        flag = "--" + name.replace("_", "-")
        sec, typ = FIELDS[name]
        if typ is bool:
            argv.append(flag if rng.random() < 0.5 else "--no-" + flag[2:])
            if rng.random() < 0.1:
                argv.append(rng.choice(NASTY_STRINGS))  # a stray value
            continue
        if rng.random() < 0.1:
            flag = flag[: max(4, len(flag) - rng.randint(1, 3))]  # an abbreviation, maybe ambiguous
        value = random_value(rng, typ)
        argv += [f"{flag}={value}"] if rng.random() < 0.3 else [flag, value]
    if rng.random() < 0.2:
        argv += ["--drop-ratio", random_value(rng, float)]
    if rng.random() < 0.05:
        argv.append("--" + "".join(rng.choice(string.ascii_lowercase + "-") for _ in range(rng.randint(1, 12))))
    return argv


def assert_clean_exit(argv: list[str], code: int, out: str, err: str) -> None:
    if code == 0:
        data = tomllib.loads(out)  # what --dry-run printed is a config file ...
        again = build_config(base=data)  # ... that reads back to the same config
        assert dumps_toml(again.to_dict()) == out, argv
        return
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, (argv, code, err)
    assert lines[0].startswith("sparsetrain") and ": error: " in lines[0], (argv, err)


@pytest.mark.parametrize("seed", range(8))
def test_random_flags(seed: int, capsys) -> None:
    rng = random.Random(seed)
    for _ in range(40):
        argv = random_argv(rng)
        code, out, err = run_main(argv, capsys)  # any exception but SystemExit fails the test
        assert_clean_exit(argv, code, out, err)


def random_toml_value(rng: random.Random, typ: type | None) -> str:
    roll = rng.random()
    if roll < 0.15:
        return rng.choice(["nan", "inf", "-inf", "1979-05-27", "1979-05-27T07:32:00Z", "[1, 2]", "{ a = 1 }", "[]",
                           "true", "false", '""', "'lit\\eral'", '"""multi\nline"""', "0x1F", "1e400", "9" * 30,
                           '"\\u00e9"', '"tab\\there"', "+1", "-0.0", "1_000"])
    if typ is bool:
        return rng.choice(["true", "false", "1", '"yes"'])
    if typ is int:
        return str(rng.choice([0, 1, -1, 2, 4, 128, 300, rng.randint(-10, 10**6)]))
    if typ is float:
        return repr(rng.choice([0.0, 0.5, 1.0, -0.1, 1e-3, 3e-3, rng.uniform(-1, 2)]))
    escaped = random_value(rng, str).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    escaped = "".join(c if c.isprintable() or c in "\\" else f"\\u{ord(c):04x}" for c in escaped if ord(c) < 0xD800 or ord(c) > 0xDFFF)
    return f'"{escaped}"'


def random_toml(rng: random.Random) -> str:
    lines = []
    for _ in range(rng.randint(0, 4)):
        sec = rng.choice(list(SECTIONS) * 4 + ["optim", "Model", "training.sub", "[run]"])
        lines.append(f"[{sec}]" if rng.random() < 0.95 else f"[[{sec}]]")
        for _ in range(rng.randint(0, 4)):
            name = rng.choice(sorted(FIELDS) + ["learning_rate", "bogus", "model", "n layer"])
            key = name if rng.random() < 0.9 else f'"{name}"'
            lines.append(f"{key} = {random_toml_value(rng, FIELDS.get(name, (None, None))[1])}")
    text = "\n".join(lines) + "\n"
    if rng.random() < 0.1:  # broken syntax
        i = rng.randrange(len(text))
        text = text[:i] + rng.choice(["=", "[", '"', "\n=\n", "\x00", "]]"]) + text[i:]
    return text


@pytest.mark.parametrize("seed", range(5))
def test_random_toml_files(seed: int, tmp_path: Path, capsys) -> None:
    rng = random.Random(100 + seed)
    for i in range(40):
        f = tmp_path / f"c{i}.toml"
        f.write_bytes(random_toml(rng).encode("utf-8", errors="replace"))
        argv = ["train", "--config", str(f), "--dry-run"] + (random_argv(rng)[2:] if rng.random() < 0.3 else [])
        code, out, err = run_main(argv, capsys)
        assert_clean_exit(argv, code, out, err)


def test_random_bytes_as_toml(tmp_path: Path, capsys) -> None:
    rng = random.Random(7)
    for i in range(30):
        f = tmp_path / f"b{i}.toml"
        f.write_bytes(bytes(rng.randrange(256) for _ in range(rng.randint(0, 200))))
        code, out, err = run_main(["train", "--config", str(f), "--dry-run"], capsys)
        assert_clean_exit(["--config", f.name], code, out, err)


@pytest.fixture(scope="module")
def small_run(corpus_dir: Path, cache_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("fuzz") / "run"
    argv = ["train", *SMALL, "--data", str(corpus_dir), "--cache-dir", str(cache_dir), "--max-steps", "1", "--out-dir", str(run)]
    assert main(argv) == 0
    return run


def test_random_generate_options(small_run: Path, capsys) -> None:
    rng = random.Random(3)
    for _ in range(30):
        argv = ["generate", "--ckpt", str(small_run) if rng.random() < 0.9 else rng.choice(NASTY_STRINGS[:12])]
        argv += ["--max-new-tokens", rng.choice(["0", "1", "3", "-2", "x", "1e3", "5"])]
        argv += ["--temperature", rng.choice(["0", "0.7", "-1", "nan", "inf", "1e308", "1e-30", "abc"])]
        argv += ["--top-k", rng.choice(["0", "1", "5", "-1", "100000", "2.5"])]
        if rng.random() < 0.5:
            argv += ["--prompt", rng.choice(NASTY_STRINGS[:-1])]
        if rng.random() < 0.3:
            argv += ["--device", rng.choice(["cpu", "auto", "cuda", "cuda:7", "tpu", "", "cpu:0"])]
        code, out, err = run_main(argv, capsys)
        if code != 0:
            lines = err.strip().splitlines()
            assert code == 2 and len(lines) == 1 and ": error: " in lines[0], (argv, code, err)
