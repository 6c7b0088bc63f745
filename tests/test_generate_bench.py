"""Sampling semantics, the library's step timing (`sparsetrain bench step`), and the CUDA path (skipped without a GPU)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from sparsetrain.bench_step import bench_train_step
from sparsetrain.benchmark import summarize, time_fn
from sparsetrain.config import ModelConfig
from sparsetrain.data import train_batch
from sparsetrain.generate import sample
from sparsetrain.model import GPT
from sparsetrain.trainer import Trainer

from conftest import requires_cuda


def _model() -> GPT:
    torch.manual_seed(int(torch.randint(0, 2**31, ())))
    return GPT(ModelConfig(vocab_size=300, seq_len=16, n_layer=1, n_head=2, d_model=32, init_std=0.3)).eval()


def test_greedy_is_argmax_of_full_recompute() -> None:
    model = _model()
    prompt = torch.randint(0, 300, (5,)).tolist()
    out = sample(model, prompt, 20, temperature=0)
    ids = list(prompt)
    for _ in range(20):  # reference: recompute from scratch, context cropped to seq_len
        logits, _ = model(torch.tensor([ids[-16:]]))
        ids.append(int(logits[0, -1].argmax()))
    assert out == ids[5:]
    assert sample(model, prompt, 20, temperature=1.0, top_k=1) == out


def test_sampling_follows_softmax() -> None:
    model = _model()
    prompt = [1, 2, 3]
    logits, _ = model(torch.tensor([prompt]))
    p = torch.softmax(logits[0, -1].double(), -1)
    g = torch.Generator().manual_seed(0)
    n = 4000
    counts = torch.bincount(torch.tensor([sample(model, prompt, 1, 1.0, 0, g)[0] for _ in range(n)]), minlength=300)
    top = p.argsort(descending=True)[:3]
    for t in top:  # within 5 standard errors of the softmax probability
        se = (p[t] * (1 - p[t]) / n).sqrt()
        assert abs(counts[t] / n - p[t]) < 5 * se + 1e-3


def test_time_fn_and_summary() -> None:
    calls = []
    times = time_fn(lambda: calls.append(1), warmup=2, repeats=5)
    assert len(calls) == 7 and len(times) == 5
    s = summarize([3.0, 1.0, 2.0])
    assert s == {"median_ms": 2.0, "min_ms": 1.0, "max_ms": 3.0, "repeats": 3}


def test_bench_train_step_on_cpu() -> None:
    r = bench_train_step("tiny", seq_len=32, batch_size=2, warmup=1, repeats=2, device="cpu",
                         model_overrides={"n_layer": 1, "vocab_size": 512})
    assert r["tokens_per_step"] == 64 and r["step"]["median_ms"] > 0
    assert r["tokens_per_s"] == pytest.approx(64 / (r["step"]["median_ms"] / 1e3))
    assert r["achieved_tflops"] == pytest.approx(r["flops_per_token"] * r["tokens_per_s"] / 1e12)


def test_bench_train_step_times_a_sparse_resnet_bk_with_its_sparsity_loss() -> None:
    r = bench_train_step("tiny", seq_len=32, batch_size=2, warmup=1, repeats=2, device="cpu",
                         model_overrides={"arch": "resnet_bk", "n_layer": 1, "d_model": 32, "n_head": 2,
                                          "vocab_size": 512, "bk_num_experts": 2, "bk_sparsity": 0.5})
    stats = r["sparsity_stats"]
    assert r["step"]["median_ms"] > 0 and stats["target_sparsity"] == 0.5
    assert stats["num_computed"] == pytest.approx(64 * (1 - stats["sparsity_ratio"]))


@requires_cuda
def test_cuda_ms_per_call_leaves_the_sleep_and_warmup_untimed() -> None:
    """cuda_ms_per_call times only the queued calls: a leading GPU sleep (which
    puts the host far ahead of the GPU) and warm-up calls add nothing,
    and a call that itself sleeps is timed at about its sleep."""
    from sparsetrain.benchmark import cuda_ms_per_call

    torch.cuda.synchronize()
    sleep = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    sleep[0].record()
    torch.cuda._sleep(int(2e8))
    sleep[1].record()
    sleep[1].synchronize()
    sleep_ms = sleep[0].elapsed_time(sleep[1])
    x = torch.randn(256, 256, device="cuda")
    x @ x  # cuBLAS's first call loads its kernels on the host for tens of ms: not what is timed here
    torch.cuda.synchronize()
    quick = cuda_ms_per_call(lambda: x @ x, calls=3, warmup=0, sleep_cycles=int(2e8))
    assert quick < 0.1 * sleep_ms
    slow = cuda_ms_per_call(lambda: torch.cuda._sleep(int(2e8)), calls=2, warmup=2)
    assert slow == pytest.approx(sleep_ms, rel=0.2)


@requires_cuda
def test_cuda_bf16_step_matches_cpu_fp32(make_cfg) -> None:
    cpu = Trainer(make_cfg(device="cpu"), verbose=False)
    gpu = Trainer(make_cfg(device="cuda", out_dir=str(cpu.out_dir) + "-gpu"), verbose=False)
    x, y = train_batch(cpu.corpus.train, 4, 32, seed=3, step=0)
    l_cpu = cpu.forward_backward(x, y)
    l_gpu = gpu.forward_backward(x, y)
    assert abs(float(l_cpu) - float(l_gpu)) < 2e-2 * float(l_cpu)
    for (n, a), b in zip(cpu.model.named_parameters(), gpu.model.parameters()):
        rel = (a.grad - b.grad.cpu()).norm() / a.grad.norm()
        assert rel < 5e-2, n


def test_time_fn_queues_calls_per_sample(monkeypatch: pytest.MonkeyPatch) -> None:
    """A sample of ``calls_per_sample`` calls reports milliseconds per call: on a
    fake clock where each call takes exactly 1 s, every sample is 1000 ms."""
    import sparsetrain.benchmark as bench

    clock = [0.0]
    calls: list[int] = []

    def fn() -> None:
        calls.append(1)
        clock[0] += 1.0

    monkeypatch.setattr(bench.time, "perf_counter", lambda: clock[0])
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)  # the host clock, also on a GPU machine
    times = bench.time_fn(fn, warmup=2, repeats=4, calls_per_sample=3)
    assert times == [1000.0] * 4 and len(calls) == 2 + 4 * 3


def test_make_train_step_counts_steps_as_the_trainer_does() -> None:
    """The benches' step calls every StepCounted module's step() after the
    optimizer, as the trainer does (so a model that recompiles per count shows
    in the benches too): a 2:4 FFN with a 2-step dense warmup is sparse after two."""
    from sparsetrain.bench_step import make_train_step
    from sparsetrain.sparse24 import Sparse24FFN

    step, model = make_train_step("tiny", seq_len=32, batch_size=2, device="cpu",
                                  model_overrides={"ffn": "relu2_24", "activation_sparse_method": "naive",
                                                   "activation_dense_warmup_steps": 2})
    ffns = [m for m in model.modules() if isinstance(m, Sparse24FFN)]
    assert ffns and not any(f.sparse for f in ffns)
    step()
    step()
    assert all(f._steps == 2 and int(f.steps) == 2 and f.sparse for f in ffns)
    step()
    assert all(f.last_backend == "masked_dense" for f in ffns)


def test_make_train_step_can_take_a_corpus_batch(corpus_dir, cache_dir, monkeypatch: pytest.MonkeyPatch) -> None:
    """tokens="corpus": the model sees the corpus's first training batch, as the
    data module cuts it (and ids outside uniform sampling's reach stay legal)."""
    from sparsetrain.bench_step import make_train_step
    from sparsetrain.data import load_corpus, train_batch

    monkeypatch.setenv("SPARSETRAIN_CACHE", str(cache_dir))
    seen = []
    step, model = make_train_step("tiny", seq_len=32, batch_size=2, device="cpu", tokens="corpus", data=str(corpus_dir),
                                  model_overrides={"vocab_size": 320, "n_layer": 1, "d_model": 32, "n_head": 2})
    model.register_forward_pre_hook(lambda m, args: seen.append(args[0].clone()))
    step()
    corpus = load_corpus(str(corpus_dir), vocab_size=320, cache_dir=cache_dir, verbose=False)
    assert torch.equal(seen[0], train_batch(corpus.train, 2, 32, seed=0, step=0)[0])
    with pytest.raises(ValueError, match="'words'"):
        make_train_step("tiny", seq_len=32, batch_size=2, device="cpu", tokens="words")


def test_cli_bench_step_times_the_presets_own_shape(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """`sparsetrain bench step --preset tiny` times tiny's own sequence length and
    batch (not 2048 x 8), says what it times before the first timed step, and
    on the CPU times only a few steps."""
    import sparsetrain.bench_step as bench
    from sparsetrain.cli import main
    from sparsetrain.config import build_config

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the CPU defaults, also on a GPU machine
    cfg = build_config("tiny")
    real_time_fn = bench.time_fn
    said_before_timing = []

    def time_fn(*args, **kwargs):
        said_before_timing.append(capsys.readouterr().out)
        assert f"seq {cfg.model.seq_len}" in said_before_timing[0] and f"batch {cfg.batch_size}" in said_before_timing[0]
        return real_time_fn(*args, **kwargs)

    monkeypatch.setattr(bench, "time_fn", time_fn)
    out = tmp_path / "step.json"
    assert main(["bench", "step", "--preset", "tiny", "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    assert (r["seq_len"], r["batch_size"]) == (cfg.model.seq_len, cfg.batch_size)
    assert r["tokens_per_step"] == cfg.model.seq_len * cfg.batch_size
    assert r["step"]["repeats"] <= 3 and len(said_before_timing) == 1


def test_bench_step_default_batch_keeps_a_step_within_the_token_limit() -> None:
    """A preset whose own batch makes a step longer than STEP_TOKENS_LIMIT tokens
    (d20: 16 x 2048) gets the largest batch within it; given values are kept."""
    from sparsetrain.cli import STEP_TOKENS_LIMIT, bench_step_shape
    from sparsetrain.config import build_config

    d20 = build_config("d20")
    assert d20.model.seq_len * d20.batch_size > STEP_TOKENS_LIMIT  # the case under test
    seq, batch = bench_step_shape("d20")
    assert seq == d20.model.seq_len and batch * seq <= STEP_TOKENS_LIMIT < (batch + 1) * seq
    assert bench_step_shape("d20", 512, 3) == (512, 3)


def test_make_train_step_runs_the_objective_the_config_names() -> None:
    """The step runs the trainer's objective for its config and marks its phases
    in order. Dense: every token of the batch gets an embedding gradient.
    Collider (topk, drop 0.5): dropped positions get no gradient in any layer,
    so only the ids at the kept half of the positions do."""
    from sparsetrain.bench_step import make_train_step

    small = {"vocab_size": 512, "n_layer": 1, "d_model": 32, "n_head": 2, "tie_embeddings": False}
    collider = {"use_collider": True, "collider_method": "topk", "collider_sparsity": 0.5}
    rows, ids, marks = {}, {}, {}
    for name, extra in (("dense", {}), ("collider", collider)):
        def recording(model, name=name):  # an optimizer that changes nothing and keeps the embedding's gradient
            opt = torch.optim.SGD(model.parameters(), lr=0.0)
            real_step = opt.step

            def step(*args, **kwargs):
                grad = model.embed.weight.grad
                rows[name] = set(torch.nonzero(grad.abs().sum(1)).flatten().tolist())
                return real_step(*args, **kwargs)
            opt.step = step
            return opt

        marks[name] = []
        step, model = make_train_step("tiny", seq_len=32, batch_size=2, device="cpu", model_overrides={**small, **extra},
                                      optimizer=recording, mark=marks[name].append)
        step()
        ids[name] = set(step.x.flatten().tolist())
    assert rows["dense"] == ids["dense"]
    assert rows["collider"] <= ids["collider"] and len(rows["collider"]) <= 32 < len(rows["dense"])
    assert marks == {"dense": ["forward", "backward", "optimizer", "end"],
                     "collider": ["forward", "select", "loss", "backward", "optimizer", "end"]}
