"""The captured training step (``run.cuda_graph``, sparsetrain.step_graph).

CPU: what is refused; the trainer's side of a captured step (static inputs, the
lr in a tensor, copied outputs, the eager fallback) checked by a stand-in graph
whose replay re-runs the recorded step, against a run without it, to the bit;
the portable optimizer state and the start-up clock. CUDA: a real capture
against eager steps."""

from __future__ import annotations

import json

import pytest
import torch

import sparsetrain.trainer as trainer_mod
from sparsetrain.config import build_config
from sparsetrain.errors import ConfigError
from sparsetrain.step_graph import clone_tree, make_capturable, portable_optimizer_state
from sparsetrain.train_clock import TrainClock
from sparsetrain.trainer import Trainer

from conftest import requires_cuda
from replaying_graph import ReplayingStepGraph
from test_reference_losses import reference_run  # noqa: F401 (a fixture)

COLLIDER = dict(use_collider=True, collider_sparsity=0.5, collider_method="topk")


@pytest.mark.parametrize("overrides, named", [
    (dict(optimizer="muon"), "optimizer = muon"),
    (dict(compile=True, compile_mode="reduce-overhead"), "compile_mode = reduce-overhead"),
    (dict(use_collider=True, collider_sparsity=0.5, collider_method="threshold"), "collider_method = threshold"),
    (dict(selection="loss", selection_method="threshold"), "selection_method = threshold"),
    (dict(selection="loss", selection_method="stratified"), "selection_method = stratified"),
    (dict(selection="loss", selection_method="sequence_aware"), "selection_method = sequence_aware"),
    (dict(selection="loss", selection_dynamic=True), "selection_dynamic"),
    (dict(activation_checkpointing=True), "activation_checkpointing"),
    (dict(selection="batch"), "selection = batch"),
    (dict(fire_at_step=3), "fire_at_step"),
    (dict(ffn="relu2_24"), "ffn = relu2_24"),
    (dict(arch="resnet_bk"), "resnet_bk"),
    (dict(device="cpu"), "device = cpu"),
])
def test_refused_combinations_name_the_value(overrides: dict, named: str) -> None:
    with pytest.raises(ConfigError, match="run.cuda_graph") as e:
        build_config("tiny", overrides={"cuda_graph": True, "device": "auto", **overrides})
    assert named in str(e.value) and "\n" not in str(e.value)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU-only refusal")
def test_trainer_without_cuda_refuses_it(make_cfg) -> None:
    with pytest.raises(ConfigError, match="needs a CUDA device, got cpu"):
        Trainer(make_cfg(device="auto", cuda_graph=True), verbose=False)


def test_cli_refusal_is_one_line_exit_2(tmp_path) -> None:
    import subprocess
    import sys

    p = subprocess.run([sys.executable, "-m", "sparsetrain", "train", "--cuda-graph", "--device", "cpu",
                        "--out-dir", str(tmp_path / "r")], capture_output=True, text=True)
    assert p.returncode == 2, p.stderr
    assert p.stderr.count("\n") == 1 and "--cuda-graph with --device cpu" in p.stderr


def _run(make_cfg, tmp_path, name: str, graph: bool, monkeypatch, **kw):
    cfg = make_cfg(out_dir=str(tmp_path / name), max_steps=12, eval_every=6, device="auto" if graph else "cpu",
                   cuda_graph=graph, **kw)
    if graph:
        monkeypatch.setattr(trainer_mod, "resolve_device", lambda name: torch.device("cpu"))
        monkeypatch.setattr(Trainer, "_setup_step_graph", lambda self: ReplayingStepGraph(self.device))
    t = Trainer(cfg, verbose=False)
    result = t.fit()
    monkeypatch.undo()
    rows = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    return t, result, rows


def _same_training(eager, r_eager, graphed, r_graph) -> None:
    """Equal up to the lr's rounding: the graph's AdamW reads it from a float32 tensor."""
    assert r_graph.train_losses.keys() == r_eager.train_losses.keys()
    for step, loss in r_eager.train_losses.items():
        assert r_graph.train_losses[step] == pytest.approx(loss, rel=1e-6), step
    for (name, a), b in zip(eager.model.named_parameters(), graphed.model.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("kw", [
    dict(COLLIDER, selection_warmup_steps=3),
    dict(use_collider=True, collider_sparsity=0.5, collider_method="random", grad_accum=2),
    dict(selection="loss", keep_ratio=0.5, selection_method="importance", selection_score="gradnorm"),
    dict(selection="loss", keep_ratio=0.5, selection_method="topk"),  # CGGR's own combined score
    dict(use_mtp=True, mtp_n_tokens=2, grad_accum=2),
], ids=["collider-topk-warmup", "collider-random-accum", "cggr-importance", "cggr-topk-combined", "mtp-accum"])
def test_replayed_steps_equal_eager_steps(make_cfg, tmp_path, monkeypatch, kw: dict) -> None:
    eager, r_eager, rows_eager = _run(make_cfg, tmp_path, "eager", False, monkeypatch, **kw)
    graphed, r_graph, rows_graph = _run(make_cfg, tmp_path, "graph", True, monkeypatch, **kw)
    g = graphed.step_graph
    warmup = kw.get("selection_warmup_steps", 0)
    # start-up (1 step), then the selection warmup, then the eager warm-up steps, then captured
    first = max(1, warmup) + 3
    assert [r["step"] for r in rows_graph if r.get("kind") == "cuda_graph"] == [first]
    assert g.replays == 12 - first
    _same_training(eager, r_eager, graphed, r_graph)
    assert r_graph.val_losses == pytest.approx(r_eager.val_losses, rel=1e-6)
    keys = ("step", "lr", "kept_fraction")
    trains = [[{k: r.get(k) for k in keys} for r in rows if r.get("kind") == "train"] for rows in (rows_eager, rows_graph)]
    assert trains[0] == trains[1]
    grad_norms = [[r["grad_norm"] for r in rows if r.get("kind") == "train"] for rows in (rows_eager, rows_graph)]
    assert grad_norms[1] == pytest.approx(grad_norms[0], rel=1e-4)
    assert all(isinstance(group["lr"], torch.Tensor) for group in graphed.optimizer.param_groups)


def test_hyper_connection_report_steps_run_eagerly(make_cfg, tmp_path, monkeypatch) -> None:
    """The hyper-connection health report reads a step's gradients: its steps (every
    eval_every) run eagerly, the others replay; training and reports equal an
    uncaptured run's."""
    kw = dict(COLLIDER, hyper_connections=2)
    eager, r_eager, rows_eager = _run(make_cfg, tmp_path, "eager", False, monkeypatch, **kw)
    graphed, r_graph, rows_graph = _run(make_cfg, tmp_path, "graph", True, monkeypatch, **kw)
    assert graphed.step_graph.replays == 12 - 4 - 2  # steps 6 and 12 report
    _same_training(eager, r_eager, graphed, r_graph)
    reports = [[(r["step"], r["healthy"]) for r in rows if r.get("kind") == "hyper"] for rows in (rows_eager, rows_graph)]
    assert reports[0] == reports[1] and [s for s, _ in reports[0]] == [6, 12]


def test_without_startup_steps_the_first_step_still_runs_eagerly(make_cfg, tmp_path, monkeypatch) -> None:
    kw = dict(COLLIDER, startup_steps=0)
    eager, r_eager, _ = _run(make_cfg, tmp_path, "eager", False, monkeypatch, **kw)
    graphed, r_graph, rows = _run(make_cfg, tmp_path, "graph", True, monkeypatch, **kw)
    assert [r["step"] for r in rows if r.get("kind") == "cuda_graph"] == [4] and graphed.step_graph.replays == 8
    _same_training(eager, r_eager, graphed, r_graph)


def test_a_batch_of_another_size_runs_eagerly(make_cfg, tmp_path, monkeypatch) -> None:
    """The graph is sized by the capture's count of valid targets; a batch with
    another count (here, made so at one step) runs eagerly, exactly as without a graph."""
    real = trainer_mod._valid_targets

    def counted(y):  # one target fewer at step 8 (both runs alike): the kept count changes
        n = real(y)
        return n - 1 if current["t"].step == 8 else n

    current = {}
    original_init = Trainer.__init__

    def init(self, *a, **k):
        current["t"] = self
        original_init(self, *a, **k)

    kw = dict(COLLIDER)
    results = []
    for name, graph in (("eager", False), ("graph", True)):
        monkeypatch.setattr(trainer_mod, "_valid_targets", counted)
        monkeypatch.setattr(Trainer, "__init__", init)
        results.append(_run(make_cfg, tmp_path, name, graph, monkeypatch, **kw))
    (eager, r_eager, _), (graphed, r_graph, _) = results
    assert graphed.step_graph.replays == 12 - 4 - 1
    _same_training(eager, r_eager, graphed, r_graph)


def test_replayed_excess_steps_read_each_steps_sidecar_entries(reference_run, make_cfg, tmp_path, monkeypatch) -> None:
    """Reference losses from a sidecar go through the graph's static buffer: replayed
    steps select on this step's entries, as eager ones do."""
    _, sidecar, _ = reference_run
    kw = dict(COLLIDER, collider_score="excess", reference_losses=str(sidecar), grad_accum=2)
    eager, r_eager, _ = _run(make_cfg, tmp_path, "eager", False, monkeypatch, **kw)
    graphed, r_graph, _ = _run(make_cfg, tmp_path, "graph", True, monkeypatch, **kw)
    assert graphed.step_graph.replays == 12 - 4 and {"ref0", "ref1"} <= set(graphed.step_graph.inputs)
    _same_training(eager, r_eager, graphed, r_graph)


def test_resume_of_a_captured_run_continues_it(make_cfg, tmp_path, monkeypatch) -> None:
    """A checkpoint written while the step was replayed (its lr a device tensor) resumes:
    eager steps, a new capture, and the same losses and weights as the uninterrupted run."""
    kw = dict(COLLIDER, collider_method="random")
    whole, r_whole, _ = _run(make_cfg, tmp_path, "whole", True, monkeypatch, **kw)
    cfg = dict(out_dir=str(tmp_path / "cut"), max_steps=12, eval_every=6, device="auto", cuda_graph=True, **kw)
    runs = []
    for resume in (None, str(tmp_path / "cut")):
        monkeypatch.setattr(trainer_mod, "resolve_device", lambda name: torch.device("cpu"))
        monkeypatch.setattr(Trainer, "_setup_step_graph", lambda self: ReplayingStepGraph(self.device))
        t = Trainer(make_cfg(**cfg), resume=resume, verbose=False)
        if resume is None:  # stopped after step 7, as a killed job leaves it
            t.clock.run()
            while t.step < 7:
                t.train_step()
                t.clock.step_done()
            t.save()
        else:
            r = t.fit()
        monkeypatch.undo()
        runs.append(t)
    # each process: a start-up step and three eager ones, then replays (steps 4-6; step 11)
    assert [t.step_graph.replays for t in runs] == [3, 1]
    saved = torch.load(tmp_path / "cut" / "ckpt.pt", weights_only=True)["optimizer"]["param_groups"]
    assert all(type(g["lr"]) is float and not g["capturable"] for g in saved)
    assert sorted(r.train_losses) == list(range(8, 13))
    for step in r.train_losses:
        assert r.train_losses[step] == pytest.approx(r_whole.train_losses[step], rel=1e-6), step
    for (name, a), b in zip(whole.model.named_parameters(), runs[1].model.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=name)


def test_portable_optimizer_state_resumes_uncaptured() -> None:
    w = torch.nn.Parameter(torch.randn(4, 3, dtype=torch.float64))
    opt = torch.optim.AdamW([w], lr=0.01)
    w.grad = torch.randn_like(w)
    opt.step()
    make_capturable(opt, torch.device("cpu"))
    opt.param_groups[0]["lr"].fill_(0.003)
    state = portable_optimizer_state(opt)
    assert state["param_groups"][0]["lr"] == pytest.approx(0.003) and type(state["param_groups"][0]["lr"]) is float
    assert state["param_groups"][0]["capturable"] is False
    assert isinstance(opt.param_groups[0]["lr"], torch.Tensor)  # the live group keeps its tensor
    w2 = torch.nn.Parameter(w.detach().clone())
    opt2 = torch.optim.AdamW([w2], lr=1.0)
    opt2.load_state_dict(state)
    assert opt2.param_groups[0]["lr"] == pytest.approx(0.003)
    torch.testing.assert_close(opt2.state[w2]["exp_avg"], opt.state[w]["exp_avg"])


def test_clone_tree_copies_every_tensor() -> None:
    a, b = torch.randn(3), torch.randn(())
    tree = {"x": a, "y": [b, 2, "s"], "z": (a,)}
    c = clone_tree(tree)
    a.add_(1.0)
    b.add_(1.0)
    assert not torch.equal(c["x"], a) and not torch.equal(c["y"][0], b) and c["y"][1:] == [2, "s"]
    assert isinstance(c["z"], tuple)


def test_capture_seconds_count_as_startup() -> None:
    now = [0.0]
    clock = TrainClock(startup_steps=1, now=lambda: now[0])
    clock.run()
    with pytest.raises(RuntimeError):
        clock.count_as_startup(1.0)
    now[0] = 5.0
    clock.step_done()  # start-up: 5 s
    now[0] = 9.0
    assert clock.seconds_after_startup == pytest.approx(4.0)
    clock.count_as_startup(1.5)
    assert clock.startup_seconds == pytest.approx(6.5)
    assert clock.seconds_after_startup == pytest.approx(2.5)
    clock.step_done()
    clock.synced()  # one step since start-up, 4 s of clock of which 1.5 s were the capture
    assert clock.expected_after_next_step() == pytest.approx(2.5 + 2.5)


@requires_cuda
@pytest.mark.parametrize("kw", [
    dict(use_collider=True, collider_sparsity=0.5, collider_method="topk"),
    dict(use_collider=True, collider_sparsity=0.5, collider_method="random"),
    dict(selection="loss", keep_ratio=0.5, selection_method="topk"),
], ids=["collider-topk", "collider-random", "cggr-topk"])
def test_captured_training_matches_eager_on_cuda(make_cfg, tmp_path, kw: dict) -> None:
    """A real CUDA graph: top-k steps (Collider's, CGGR's) equal eager ones (float32,
    same kernels); random selection draws a new mask every replay."""
    runs = {}
    for name, graph in (("eager", False), ("graph", True)):
        cfg = make_cfg(out_dir=str(tmp_path / name), device="cuda", dtype="float32", max_steps=12, eval_every=6,
                       cuda_graph=graph, **kw)
        t = Trainer(cfg, verbose=False)
        runs[name] = (t, t.fit())
    (eager, r_eager), (graphed, r_graph) = runs["eager"], runs["graph"]
    assert graphed.step_graph.captured
    if kw.get("collider_method") == "random":
        first = graphed.selector.last_mask.clone()
        graphed.train_step()
        torch.cuda.synchronize()
        assert not torch.equal(first, graphed.selector.last_mask)
        return
    for step, loss in r_eager.train_losses.items():
        assert r_graph.train_losses[step] == pytest.approx(loss, rel=1e-4, abs=1e-5), step
    for a, b in zip(eager.model.parameters(), graphed.model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@requires_cuda
def test_captured_compiled_bf16_accumulation_on_cuda(make_cfg, tmp_path) -> None:
    """What the races run: compiled, bf16 autocast, two micro-batches each in its own
    buffer, importance selection (a registered generator); trains like an uncaptured
    run (losses within bf16's noise) and captures once."""
    results = {}
    for name, graph in (("eager", False), ("graph", True)):
        cfg = make_cfg(out_dir=str(tmp_path / name), device="cuda", compile=True, max_steps=14, eval_every=7,
                       grad_accum=2, cuda_graph=graph, use_collider=True, collider_sparsity=0.5,
                       collider_method="importance", collider_score="gradnorm")
        t = Trainer(cfg, verbose=False)
        results[name] = (t, t.fit())
    graphed, r_graph = results["graph"]
    rows = [json.loads(line) for line in (tmp_path / "graph" / "metrics.jsonl").read_text().splitlines()]
    assert graphed.step_graph.captured and [r["step"] for r in rows if r.get("kind") == "cuda_graph"] == [4]
    eager_loss, graph_loss = results["eager"][1].val_losses[14], r_graph.val_losses[14]
    assert graph_loss == pytest.approx(eager_loss, rel=0.05)
    assert all(torch.isfinite(p).all() for p in graphed.model.parameters())


@requires_cuda
def test_mtp_steps_capture_like_eager_ones_on_cuda(make_cfg, tmp_path) -> None:
    """MTP's sequential heads under a real capture: float32 losses and weights as eager steps'."""
    runs = {}
    for name, graph in (("eager", False), ("graph", True)):
        cfg = make_cfg(out_dir=str(tmp_path / name), device="cuda", dtype="float32", max_steps=10, eval_every=5,
                       cuda_graph=graph, use_mtp=True, mtp_n_tokens=2)
        t = Trainer(cfg, verbose=False)
        runs[name] = (t, t.fit())
    (eager, r_eager), (graphed, r_graph) = runs["eager"], runs["graph"]
    assert graphed.step_graph.captured
    for step, loss in r_eager.train_losses.items():
        assert r_graph.train_losses[step] == pytest.approx(loss, rel=1e-4, abs=1e-5), step
    for a, b in zip(eager.model.parameters(), graphed.model.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)
