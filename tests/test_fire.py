"""FIRE: the polar factor is orthogonal to the target, scaled by sqrt(d_out/d_in),
equals U V^T from torch.linalg.svd, and is written into the model."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from sparsetrain.cli import main
from sparsetrain.config import ModelConfig
from sparsetrain.fire import orthogonality_error, polar_factor, reinitialize
from sparsetrain.model import GPT


@pytest.mark.parametrize("shape", [(48, 16), (16, 48), (32, 32)])
def test_polar_factor_matches_svd(shape) -> None:
    w = torch.randn(*shape, dtype=torch.float64)
    q, info = polar_factor(w, tol=1e-10, max_iters=200)
    u, _, vh = torch.linalg.svd(w, full_matrices=False)
    assert info["method"] == "newton_schulz" and info["orthogonality_error"] < 1e-10
    assert torch.allclose(q, u @ vh, atol=1e-8)


def test_svd_fallback_when_newton_schulz_does_not_converge() -> None:
    w = torch.randn(24, 24, dtype=torch.float64)
    w[:, 0] *= 1e-6  # a tiny singular value: Newton-Schulz needs many iterations
    q, info = polar_factor(w, tol=1e-10, max_iters=3)
    assert info["method"] == "svd" and orthogonality_error(q) < 1e-10


def test_reinitialize_writes_scaled_orthogonal_weights() -> None:
    torch.manual_seed(int(torch.randint(0, 2**31 - 1, ())))
    model = GPT(ModelConfig(vocab_size=300, seq_len=8, n_layer=2, n_head=2, d_model=32))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    stats = reinitialize(model, tol=1e-5)
    linears = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    assert [s["name"] for s in stats] == linears
    for s in stats:
        w = model.get_submodule(s["name"]).weight.detach().double()
        d_out, d_in = w.shape
        assert s["orthogonality_error"] < 1e-5 and s["scale"] == pytest.approx(math.sqrt(d_out / d_in))
        sv = torch.linalg.svdvals(w)
        assert torch.allclose(sv, torch.full_like(sv, math.sqrt(d_out / d_in)), rtol=1e-4)
        assert not torch.equal(w.float(), before[s["name"] + ".weight"])
    assert torch.equal(model.embed.weight, before["embed.weight"])  # only Linear layers


def test_fire_at_step_and_cli(make_cfg, tmp_path: Path, capsys) -> None:
    from sparsetrain.trainer import train

    cfg = make_cfg(out_dir=str(tmp_path / "run"), max_steps=4, fire_at_step=2)
    train(cfg, verbose=False)
    rows = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    fire_rows = [r for r in rows if r["kind"] == "fire"]
    assert len(fire_rows) == 1 and fire_rows[0]["step"] == 2 and fire_rows[0]["max_orthogonality_error"] < 1e-4
    code = main(["fire", "--ckpt", str(tmp_path / "run"), "--out", str(tmp_path / "fired")])
    assert code == 0 and "reinitialised" in capsys.readouterr().out
    state = torch.load(tmp_path / "fired" / "ckpt.pt", weights_only=True)
    w = state["model"]["blocks.0.attn.qkv.weight"].double()
    assert torch.allclose(torch.linalg.svdvals(w), torch.full((w.shape[1],), math.sqrt(3.0), dtype=torch.float64),
                          rtol=1e-3)
    assert state["optimizer"]["state"] == {}
    # the run's record of its tokens goes with it, for eval, and in the checkpoint, for the resume's comparison
    recorded = json.loads((tmp_path / "run" / "data.json").read_text())
    assert json.loads((tmp_path / "fired" / "data.json").read_text()) == recorded == state["data"]
    assert main(["train", "--resume", str(tmp_path / "fired"), "--max-steps", "6"]) == 0
    assert main(["fire", "--ckpt", str(tmp_path / "run"), "--out", str(tmp_path / "fired")]) == 2  # never overwrite


def test_fire_command_restarts_every_part_of_muons_optimizer(make_cfg, tmp_path: Path) -> None:
    """``sparsetrain fire`` on a Muon run: both parts of the combined optimizer's state
    restart (their moments described the old weights), as fire_at_step's do."""
    from sparsetrain.trainer import train

    train(make_cfg(out_dir=str(tmp_path / "run"), max_steps=2, eval_every=0, optimizer="muon"), verbose=False)
    assert main(["fire", "--ckpt", str(tmp_path / "run"), "--out", str(tmp_path / "fired")]) == 0
    optimizer = torch.load(tmp_path / "fired" / "ckpt.pt", weights_only=True)["optimizer"]
    assert set(optimizer) == {"combined"} and set(optimizer["combined"]) == {"adamw", "muon"}
    assert all(part["state"] == {} for part in optimizer["combined"].values())


def test_fire_on_resnet_bk_is_refused_in_one_line(make_cfg, tmp_path: Path, capsys) -> None:
    """FIRE reinitialises nn.Linear weights; ResNet-BK's expert stacks are not: refused
    rather than half applied, in a run and by the command."""
    from sparsetrain.errors import ConfigError
    from sparsetrain.trainer import train

    with pytest.raises(ConfigError, match="fire_at_step = 1 with model.arch = resnet_bk"):
        make_cfg(arch="resnet_bk", fire_at_step=1)
    train(make_cfg(out_dir=str(tmp_path / "run"), max_steps=1, eval_every=0, arch="resnet_bk"), verbose=False)
    capsys.readouterr()
    assert main(["fire", "--ckpt", str(tmp_path / "run"), "--out", str(tmp_path / "fired")]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "model.arch = resnet_bk" in err[0] and not (tmp_path / "fired").exists(), err


def test_fire_refuses_a_run_whose_config_does_not_parse(make_cfg, tmp_path: Path, capsys) -> None:
    """The new run gets a copy of the old one's config.toml, which its --resume reads:
    a garbled one is refused before anything is written, not copied."""
    from sparsetrain.trainer import train

    train(make_cfg(out_dir=str(tmp_path / "run"), max_steps=1, eval_every=0), verbose=False)
    (tmp_path / "run" / "config.toml").write_text("garbage [[[\n")
    capsys.readouterr()
    assert main(["fire", "--ckpt", str(tmp_path / "run"), "--out", str(tmp_path / "fired")]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "config.toml is not valid TOML" in err[0] and not (tmp_path / "fired").exists(), err


@pytest.mark.parametrize("tol", ["nan", "inf", "0"])
def test_fire_refuses_a_tolerance_that_is_not_a_positive_number(tol: str, tmp_path: Path, capsys) -> None:
    """nan passed a ``<= 0`` check and made every layer take the SVD fallback; inf left the
    weights unorthogonalised: both refused in one line before anything is read."""
    assert main(["fire", "--ckpt", str(tmp_path / "none"), "--out", str(tmp_path / "fired"), "--tol", tol]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "--tol must be a finite number > 0" in err[0] and tol in err[0], err
