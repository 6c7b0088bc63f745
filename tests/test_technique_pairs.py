"""Every technique of the trainer, alone and in every pair: a combination is either
refused with one line (a :class:`ConfigError` naming one of its settings; through the
CLI, exit 2 and one ``sparsetrain: error:`` line) or it trains two steps with a finite
loss and *both* techniques verifiably live. A pair where one technique is silently
dropped fails here.

The table :data:`TECHNIQUES` maps each technique to its config overrides and a
liveness check on the finished run; :data:`REFUSED` lists the pairs (and single
techniques) that are refused on this machine, a CPU (CUDA graphs need CUDA)."""

from __future__ import annotations

import importlib
import itertools
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
import torch.nn as nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper

import sparsetrain.trainer as trainer_module
from sparsetrain.bk.model import BKBlock, ResNetBK
from sparsetrain.bk.layers import SparseMoEResNetBKLayer
from sparsetrain.cli import main
from sparsetrain.config import build_config
from sparsetrain.errors import ConfigError
from sparsetrain.hyper import HyperConnection
from sparsetrain.loader import AsyncLoader
from sparsetrain.mtp import MTPHeads
from sparsetrain.objectives import AuxiliaryLoss, BatchSplitLoss, ColliderLoss, SelectiveLoss
from sparsetrain.optimizers import CombinedOptimizer, parameter_roles
from sparsetrain.sparse24.ffn import Sparse24FFN

# The shape of every run: tiny, two steps, no checkpoint, one eval batch.
BASE: dict[str, Any] = dict(
    vocab_size=320, seq_len=32, n_layer=2, n_head=4, d_model=64, batch_size=2, max_steps=2, warmup_steps=0,
    eval_every=0, eval_batches=1, log_every=1, val_fraction=0.1, device="cpu", compile=False, save_checkpoints=False,
)


@dataclass
class Run:
    """A finished two-step run: the trainer, its train rows and what it built."""

    trainer: trainer_module.Trainer
    rows: list[dict]  # every metrics.jsonl row
    loaders: list = field(default_factory=list)  # every loader make_loader returned
    recomputed_in_backward: list[bool] = field(default_factory=list)  # per block forward: inside a backward?
    initial_hyper_in: torch.Tensor | None = None
    fired: dict[str, float] = field(default_factory=dict)  # hidden matrix -> spread of its singular values after FIRE

    @property
    def train_rows(self) -> list[dict]:
        return [r for r in self.rows if r["kind"] == "train"]

    @property
    def objective(self):
        o = self.trainer.objective
        return o.inner if isinstance(o, AuxiliaryLoss) else o


# ----------------------------------------------------------------------------- liveness checks


def _kept_fraction_below_one(run: Run) -> None:
    kept = [r.get("kept_fraction") for r in run.train_rows]
    assert all(k is not None and 0 < k < 1 for k in kept), f"kept fractions {kept}"


def collider_live(run: Run) -> None:
    assert isinstance(run.objective, ColliderLoss), type(run.objective)
    assert [r["kept_fraction"] for r in run.train_rows] == [0.5, 0.5]  # topk keeps exactly 1 - collider_sparsity


def selective_loss_live(run: Run) -> None:
    assert isinstance(run.objective, SelectiveLoss), type(run.objective)
    _kept_fraction_below_one(run)


def batch_split_live(run: Run) -> None:
    assert isinstance(run.objective, BatchSplitLoss), type(run.objective)
    _kept_fraction_below_one(run)


def mtp_live(run: Run) -> None:
    heads = run.trainer.mtp
    assert isinstance(heads, MTPHeads)
    n = run.trainer.cfg.mtp_n_tokens
    for r in run.train_rows:
        assert len(r.get("mtp_losses", [])) == n and all(math.isfinite(v) and v > 0 for v in r["mtp_losses"]), r
    optimized = {id(p) for g in run.trainer.optimizer.param_groups for p in g["params"]}
    assert all(id(p) in optimized for p in heads.parameters() if p.requires_grad)


def sparse24_live(run: Run) -> None:
    ffns = [m for m in run.trainer.model.modules() if isinstance(m, Sparse24FFN)]
    assert len(ffns) == run.trainer.cfg.model.n_layer, f"{len(ffns)} Sparse24FFN modules"
    assert all(m.sparse for m in ffns)  # past the dense warmup: the forward runs 2:4
    for r in run.train_rows:  # the 2:4 statistics of the steps, which only a sparse forward records
        assert "sparse24" in r and 0 < r["sparse24"]["activation_sparsity"] <= 1, r


def hyper_live(n: int) -> Callable[[Run], None]:
    def check(run: Run) -> None:
        model = run.trainer.model
        blocks = [getattr(b, "_checkpoint_wrapped_module", b) for b in model.blocks]
        for b in blocks:
            for hc in (b.hc_attn, b.hc_ffn):
                assert isinstance(hc, HyperConnection) and hc.n == n
        assert model.hyper_in.shape == (n,)
        # trained: the streams' entry scales got a gradient and moved
        assert not torch.equal(model.hyper_in.detach().cpu(), run.initial_hyper_in)
    return check


def bk_live(run: Run) -> None:
    model = run.trainer.model
    assert isinstance(model, ResNetBK)
    blocks = [getattr(b, "_checkpoint_wrapped_module", b) for b in model.blocks]
    assert all(isinstance(b, BKBlock) and isinstance(b.layer, SparseMoEResNetBKLayer) for b in blocks)
    for r in run.train_rows:  # the sparsity loss's statistics: the auxiliary loss is in the objective
        assert "bk_sparsity" in r, r


def _all_trainable_optimized(run: Run) -> None:
    """Every trainable parameter (the model's and the MTP heads') is the optimizer's, and it stepped."""
    opt = run.trainer.optimizer
    optimized = {id(p) for g in opt.param_groups for p in g["params"]}
    trainable = [p for m in [run.trainer.model, run.trainer.mtp] if m is not None for p in m.parameters() if p.requires_grad]
    assert all(id(p) in optimized for p in trainable)
    assert len(opt.state) > 0  # its state (moments, momentum, projections) exists: the steps went through it


def muon_live(run: Run) -> None:
    opt = run.trainer.optimizer
    assert isinstance(opt, CombinedOptimizer) and "muon" in opt.parts, type(opt)
    assert type(opt.parts["muon"]).__mro__[1] is torch.optim.Muon
    assert opt.parts["muon"].state  # it stepped: momentum buffers exist
    _all_trainable_optimized(run)


def lion_live(run: Run) -> None:
    import lion_pytorch

    assert isinstance(run.trainer.optimizer, lion_pytorch.Lion), type(run.trainer.optimizer)
    _all_trainable_optimized(run)


def adamw8bit_live(run: Run) -> None:
    import bitsandbytes as bnb

    assert isinstance(run.trainer.optimizer, bnb.optim.AdamW8bit), type(run.trainer.optimizer)
    _all_trainable_optimized(run)


def galore_live(run: Run) -> None:
    import galore_torch

    opt = run.trainer.optimizer
    assert isinstance(opt, galore_torch.GaLoreAdamW), type(opt)
    low_rank = [p for g in opt.param_groups if "rank" in g for p in g["params"]]
    assert low_rank and all("projector" in opt.state[p] for p in low_rank)  # the projected update ran
    _all_trainable_optimized(run)


def async_live(run: Run) -> None:
    assert run.loaders and all(isinstance(loader, AsyncLoader) for loader in run.loaders), run.loaders


def checkpointing_live(run: Run) -> None:
    assert all(isinstance(b, CheckpointWrapper) for b in run.trainer.model.blocks)
    assert any(run.recomputed_in_backward), "no block's forward ran again in a backward"


def cuda_graph_live(run: Run) -> None:
    assert run.trainer.step_graph is not None and run.trainer.step_graph.captured


def fire_live(run: Run) -> None:
    rows = [r for r in run.rows if r["kind"] == "fire"]
    # every nn.Linear of the model (FIRE reinitialises the model's, not the MTP heads')
    n_linear = sum(isinstance(m, nn.Linear) for m in run.trainer.model.modules())
    assert len(rows) == 1 and rows[0]["step"] == 1, rows
    assert rows[0]["layers"] == n_linear and rows[0]["mean_relative_change"] > 0, rows[0]
    # right after it, every hidden matrix of the network (each expert of a stack too) has
    # equal singular values: none was left out
    assert run.fired and all(spread < 1e-3 for spread in run.fired.values()), run.fired


# ----------------------------------------------------------------------------- the table


@dataclass(frozen=True)
class Technique:
    overrides: dict[str, Any]
    live: Callable[[Run], None]
    package: str | None = None  # an optional package it needs: missing, it is refused

    def names(self) -> set[str]:
        """What a refusal of it may name: its keys (as keys or flags) and string values."""
        out = set()
        for key, value in self.overrides.items():
            out |= {key, "--" + key.replace("_", "-")}
            if isinstance(value, str):
                out.add(value)
        return out


TECHNIQUES: dict[str, Technique] = {
    "collider": Technique({"use_collider": True, "collider_sparsity": 0.5, "collider_method": "topk"}, collider_live),
    "cggr_loss": Technique({"selection": "loss", "keep_ratio": 0.5}, selective_loss_live),
    "cggr_batch": Technique({"selection": "batch", "keep_ratio": 0.5, "router_layers": 1}, batch_split_live),
    "mtp": Technique({"use_mtp": True}, mtp_live),
    "relu2_24": Technique({"ffn": "relu2_24", "activation_dense_warmup_steps": 0}, sparse24_live),
    "hc2": Technique({"hyper_connections": 2}, hyper_live(2)),
    "hc4": Technique({"hyper_connections": 4}, hyper_live(4)),
    "bk": Technique({"arch": "resnet_bk", "bk_sparsity": 0.5}, bk_live),
    "muon": Technique({"optimizer": "muon"}, muon_live),
    "lion": Technique({"optimizer": "lion"}, lion_live, package="lion_pytorch"),
    "adamw8bit": Technique({"optimizer": "adamw8bit"}, adamw8bit_live, package="bitsandbytes"),
    "galore": Technique({"optimizer": "galore_adamw", "galore_rank": 8}, galore_live, package="galore_torch"),
    "async": Technique({"use_async_loader": True, "async_n_workers": 1, "async_prefetch_size": 2}, async_live),
    "act_ckpt": Technique({"activation_checkpointing": True}, checkpointing_live),
    "cuda_graph": Technique({"cuda_graph": True}, cuda_graph_live),
    "fire": Technique({"fire_at_step": 1}, fire_live),
}

# Refused on this machine: singles and pairs (by name, in TECHNIQUES order). Every
# pair with cuda_graph is refused on a CPU (the message names cuda_graph and,
# where it checks it first, the other technique's setting).
_REFUSED_PAIRS = {
    ("collider", "cggr_loss"), ("collider", "cggr_batch"), ("collider", "bk"), ("collider", "act_ckpt"),
    ("cggr_loss", "mtp"), ("cggr_loss", "bk"), ("cggr_batch", "mtp"), ("cggr_batch", "bk"),
    ("mtp", "bk"), ("relu2_24", "bk"), ("hc2", "bk"), ("hc4", "bk"), ("bk", "galore"), ("bk", "fire"),
}
REFUSED: set[frozenset[str]] = {frozenset(p) for p in _REFUSED_PAIRS} | {
    frozenset({"cuda_graph", t}) for t in TECHNIQUES}


def _conflicting(a: str, b: str) -> bool:
    """Two settings of one key (two optimizers, two selections): not a combination."""
    return bool(set(TECHNIQUES[a].overrides) & set(TECHNIQUES[b].overrides))


CASES = [(t,) for t in TECHNIQUES] + [p for p in itertools.combinations(TECHNIQUES, 2) if not _conflicting(*p)]


def _missing_package(case: tuple[str, ...]) -> str | None:
    """The first optional package ``case`` needs that does not import here (then it is refused)."""
    for t in case:
        package = TECHNIQUES[t].package
        if package is not None:
            try:
                importlib.import_module(package)
            except ImportError:
                return package
    return None


# ----------------------------------------------------------------------------- running


def _overrides(case: tuple[str, ...]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for t in case:
        out.update(TECHNIQUES[t].overrides)
    return out


def _train(case: tuple[str, ...], corpus_dir: Path, cache_dir: Path, out: Path, monkeypatch: pytest.MonkeyPatch) -> Run:
    """Build and fit the run of ``case``; ConfigError propagates."""
    loaders: list = []

    def make_loader(*args, **kwargs):
        loader = real_make_loader(*args, **kwargs)
        loaders.append(loader)
        return loader

    def reinitialize(model: nn.Module, *args, **kwargs):
        stats = real_reinitialize(model, *args, **kwargs)
        for name, p, role in parameter_roles(model):
            if role == "hidden":
                for i, w in enumerate(p.detach().double().reshape(-1, *p.shape[-2:])):
                    sv = torch.linalg.svdvals(w)
                    run.fired[f"{name}[{i}]"] = float((sv.max() - sv.min()) / sv.max())
        return stats

    real_make_loader = trainer_module.make_loader
    real_reinitialize = trainer_module.fire.reinitialize
    monkeypatch.setattr(trainer_module, "make_loader", make_loader)
    monkeypatch.setattr(trainer_module.fire, "reinitialize", reinitialize)
    monkeypatch.setattr(trainer_module, "plot_loss_curve", lambda *a, **k: None)  # matplotlib: seconds, nothing checked
    cfg = build_config("tiny", overrides={**BASE, "data": str(corpus_dir), "cache_dir": str(cache_dir),
                                          "out_dir": str(out), **_overrides(case)})
    trainer = trainer_module.Trainer(cfg, verbose=False)
    run = Run(trainer, [], loaders)
    if getattr(trainer.model, "hyper_in", None) is not None:
        run.initial_hyper_in = trainer.model.hyper_in.detach().cpu().clone()
    for block in trainer.model.blocks if cfg.activation_checkpointing else []:
        # a forward inside a backward: a checkpointed block's recomputation
        inner = getattr(block, "_checkpoint_wrapped_module", block)
        for child in inner.children():  # (the recomputation calls the block's forward, not its hooks)
            if not isinstance(child, HyperConnection):  # hooks there would change its mixing path
                child.register_forward_hook(
                    lambda *_: run.recomputed_in_backward.append(torch._C._current_graph_task_id() != -1))
    trainer.fit()
    run.rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return run


def _cli_flags(overrides: dict[str, Any]) -> list[str]:
    flags = []
    for key, value in overrides.items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            flags.append(flag if value else "--no-" + flag[2:])
        else:
            flags += [flag, str(value)]
    return flags


def _names_one_of(message: str, case: tuple[str, ...], package: str | None) -> bool:
    names = set().union(*(TECHNIQUES[t].names() for t in case))
    if package is not None:
        names.add(package.replace("_", "-"))
    return any(re.search(rf"(?<![\w-]){re.escape(n)}(?![\w-])", message) for n in names)


@pytest.mark.parametrize("case", CASES, ids=["+".join(c) for c in CASES])
def test_technique_combination_is_refused_in_one_line_or_trains_with_each_live(
        case: tuple[str, ...], corpus_dir: Path, cache_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture) -> None:
    missing = _missing_package(case)
    refused = frozenset(case) in REFUSED or missing is not None
    try:
        run = _train(case, corpus_dir, cache_dir, tmp_path / "run", monkeypatch)
    except ConfigError as e:
        message = str(e)
        assert refused, f"{'+'.join(case)} is refused, but expected to train: {message}"
        assert "\n" not in message and message.strip(), repr(message)
        assert _names_one_of(message, case, missing), f"the refusal names neither technique: {message}"
        # the same through the CLI: exit 2, one line on stderr naming the setting as typed
        capsys.readouterr()
        code = main(["train", "--preset", "tiny", *_cli_flags({**BASE, **_overrides(case)}), "--data", str(corpus_dir),
                     "--cache-dir", str(cache_dir), "--out-dir", str(tmp_path / "cli")])
        err = capsys.readouterr().err
        assert code == 2, err
        lines = err.splitlines()
        assert len(lines) == 1 and lines[0].startswith("sparsetrain: error:"), err
        assert _names_one_of(lines[0], case, missing), lines[0]
        return
    assert not refused, f"{'+'.join(case)} trained, but is expected to be refused"
    losses = [r["loss"] for r in run.train_rows]
    assert [r["step"] for r in run.train_rows] == [1, 2] and all(math.isfinite(v) for v in losses), losses
    for t in case:
        TECHNIQUES[t].live(run)


def test_every_refused_combination_is_a_case() -> None:
    """The REFUSED table names only cases that are run."""
    cases = {frozenset(c) for c in CASES}
    assert REFUSED <= cases, REFUSED - cases
