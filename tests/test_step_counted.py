"""Modules whose behaviour follows the step count (optim.StepCounted) under
torch.compile: the forward reads a value derived from the count that changes
only where the behaviour does, so a compiled model recompiles there and not at
every step (reading the count itself, the compiled 2:4 trainer recompiled each
step and, past dynamo's limit of 8, ran the FFNs eagerly: 0.82x dense)."""

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
    torch.manual_seed(int(torch.randint(0, 2**31 - 1, ())))
    layer = SparseMoEResNetBKLayer(16, 32, num_experts=3, target_sparsity=0.5, schedule_steps=4)
    x = torch.randn(2, 12, 16)
    counts, limit_warnings = _graphs_after_each_step(layer, x, steps=12)
    # step 0: target 0, nothing skipped; from step 1 on the ramp's target is read
    # outside the compiled forward, which sees only that positions are skipped
    assert counts[0] < counts[1] and counts[-1] == counts[4], counts
    assert abs(layer.target_sparsity - 0.5) < 1e-12 and not limit_warnings
