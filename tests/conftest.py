"""Shared fixtures: a small synthetic text corpus and a tiny model config.

The corpus is random but fixed for the whole test run (seeded), big enough for a BPE of a
few hundred tokens and for several train/val windows, small enough that the
tokenizer trains in well under a second.
"""

from __future__ import annotations

import random
from pathlib import Path

import os

import torch

# Without a GPU, Triton kernels run in Triton's CPU interpreter, so CI checks the
# same kernel code the GPU runs against the torch references.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest

from sparsetrain.config import TrainConfig, build_config

WORDS = "def class return import self value index token gradient layer model train loss for while if else None True".split()

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def fresh_seed() -> int:
    """A seed nobody chose, from the OS (not torch's global state, which earlier
    tests may have seeded): put it in assertion messages to reproduce a failure."""
    return int.from_bytes(os.urandom(4), "little") >> 1


def write_corpus(folder: Path, n_files: int = 40, seed: int = 0) -> Path:
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n_files):
        lines = []
        for _ in range(rng.randint(30, 60)):
            indent = "    " * rng.randint(0, 2)
            lines.append(indent + " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 8))) + rng.choice([":", "", "()", " = 1"]))
        sub = folder / f"pkg{i % 4}"
        sub.mkdir(exist_ok=True)
        (sub / f"mod{i}.py").write_text("\n".join(lines) + "\n")
    return folder


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture
def make_cfg(corpus_dir: Path, cache_dir: Path, tmp_path: Path):
    """Build a validated tiny TrainConfig on the synthetic corpus; kwargs override."""

    def make(**overrides) -> TrainConfig:
        base = dict(
            data=str(corpus_dir), cache_dir=str(cache_dir), out_dir=str(tmp_path / "run"),
            vocab_size=320, seq_len=32, n_layer=2, n_head=2, d_model=32, batch_size=4,
            max_steps=6, warmup_steps=2, eval_every=3, eval_batches=2, log_every=1, val_fraction=0.1,
            device="cpu",
        )
        base.update(overrides)
        return build_config("tiny", overrides=base)

    return make


@pytest.fixture(params=["torch", "kernel", "kernel_op"])
def mixing_path(request, monkeypatch) -> str:
    """Hyper-connection mixing in plain torch, or by the Triton kernels (the interpreter on
    CPU): as the eager autograd node (``kernel``) or as the custom op pair that
    torch.compile runs (``kernel_op``)."""
    from sparsetrain import hyper_mixing

    if request.param in ("kernel", "kernel_op"):
        if hyper_mixing.triton is None:
            pytest.skip("triton not installed")
        monkeypatch.setattr(hyper_mixing, "uses_kernel", hyper_mixing.kernel_ok)
        monkeypatch.setattr(hyper_mixing, "as_custom_op", lambda: request.param == "kernel_op")
    else:
        monkeypatch.setattr(hyper_mixing, "uses_kernel", lambda streams: False)
    return request.param
