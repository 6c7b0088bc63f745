"""What module forwards read, under torch.compile: host values, never buffers
or per-step counters. Modules whose behaviour follows the step count
(optim.StepCounted) read a value derived from the count that changes only
where the behaviour does, so a compiled model recompiles there and not at
every step (reading the count itself, the compiled 2:4 trainer recompiled each
step and, past dynamo's limit of 8, ran the FFNs eagerly: 0.82x dense); the
2:4 FFN's masked-dense path reads a host copy of its S-STE scale."""

from __future__ import annotations

import warnings

import torch

from sparsetrain.bk.layers import SparseMoEResNetBKLayer
from sparsetrain.sparse24 import Sparse24FFN, prepare_ffns


def _graphs_after_each_step(module: torch.nn.Module, x: torch.Tensor, steps: int) -> tuple[list[int], list[str]]:
    """Compiled graphs so far after each of ``steps`` forward+backward+step() calls,
    and dynamo's recompile-limit warnings."""
    graphs: list = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    compiled = torch.compile(module, backend=backend)
    counts = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(steps):
            compiled(x).float().square().sum().backward()
            module.step()
            counts.append(len(graphs))
    torch._dynamo.reset()
    return counts, [str(w.message) for w in caught if "recompile" in str(w.message)]


def test_2_4_ffn_recompiles_once_at_the_end_of_its_warmup() -> None:
    torch.manual_seed(int(torch.randint(0, 2**31 - 1, ())))
    ffn = Sparse24FFN(16, 32, method="naive", dense_warmup_steps=3)
    x = torch.randn(2, 8, 16)
    prepare_ffns(ffn, 16)
    counts, limit_warnings = _graphs_after_each_step(ffn, x, steps=12)
    assert counts[0] == counts[1] == counts[2] < counts[3] == counts[-1], counts  # one recompile, at the switch
    assert ffn.sparse and ffn.last_backend == "masked_dense" and not limit_warnings


def test_bk_threshold_mask_recompiles_once_when_its_ramp_starts() -> None:
    """Step 0: target 0, nothing skipped. From step 1 on the ramp's target (which
    grows until step 4) is read outside the compiled forward, which sees only
    that positions are skipped: one recompile, at step 1, and none after."""
    torch.manual_seed(int(torch.randint(0, 2**31 - 1, ())))
    layer = SparseMoEResNetBKLayer(16, 32, num_experts=3, target_sparsity=0.5, schedule_steps=4)
    x = torch.randn(2, 12, 16)
    # The same positions skipped at every step: the predictor's logit is 100 * x[..., 0]
    # with x[..., 0] = +-1 (12 of each), beyond the reach of the mask's logistic noise
    # (|log(u / (1 - u))| < 14 for u clamped to [1e-6, 1 - 1e-6]). A freshly drawn mask
    # changes the kept count and each expert's row count from step to step, and the
    # compiled CPU expert loop recompiles for those on its own: once the kept count
    # first changes (dynamic shapes), and whenever an expert's row count first
    # reaches 0 (`if chunk.shape[0]`) -- at random steps, not at the schedule's.
    x[..., 0] = torch.where(torch.randperm(24) < 12, 1.0, -1.0).view(2, 12)
    first, last = layer.predictor[0], layer.predictor[2]
    with torch.no_grad():
        for p in (*first.parameters(), *last.parameters()):
            p.zero_()
        first.weight[0, 0], first.weight[1, 0] = 1.0, -1.0  # relu(x0), relu(-x0)
        last.weight[0, 0], last.weight[0, 1] = 100.0, -100.0
    counts, limit_warnings = _graphs_after_each_step(layer, x, steps=12)
    assert counts[0] < counts[1] == counts[-1], counts
    assert abs(layer.target_sparsity - 0.5) < 1e-12 and not limit_warnings
    for _ in range(3):  # the mask of every skipping step: the positions where x[..., 0] > 0
        layer(x)
        assert layer.get_sparsity_stats()["num_computed"] == 12
        assert torch.equal(layer._soft > 0.5, x[..., 0] > 0)


def test_masked_dense_ffn_reads_no_buffer_in_its_forward() -> None:
    """The masked-dense 2:4 path (CPU, and any method but transposable on the GPU)
    read its S-STE scale buffer with float() on every call: a host sync and a
    graph break. It reads a host copy now: one graph, no break, for every method
    without a generator; and the copy comes back with a state dict."""
    torch.manual_seed(int(torch.randint(0, 2**31 - 1, ())))
    x = torch.randn(2, 8, 16)
    for method in ("naive", "soft_threshold", "transposable"):
        ffn = Sparse24FFN(16, 32, method=method, dense_warmup_steps=0)
        prepare_ffns(ffn, 16)
        want = ffn(x)  # the first sparse call fixes the S-STE scale
        torch._dynamo.reset()
        explained = torch._dynamo.explain(ffn)(x)
        assert (explained.graph_count, explained.graph_break_count) == (1, 0), (method, explained.break_reasons)
        torch.testing.assert_close(torch.compile(ffn, backend="eager")(x), want)
        torch._dynamo.reset()
    assert ffn.last_backend == "masked_dense"
    sste = Sparse24FFN(16, 32, method="soft_threshold", dense_warmup_steps=0)
    prepare_ffns(sste, 16)
    sste(x)
    fresh = Sparse24FFN(16, 32, method="soft_threshold", dense_warmup_steps=0)
    fresh.load_state_dict(sste.state_dict())
    assert sste._scale != 0.0 and fresh._scale == sste._scale == float(sste.scale)
