"""The ResNet-BK layer's forward+backward, dense against learned-sparse, as the suites time it.

Variants: ``dense`` (:class:`MoEResNetBKLayer`), ``sparse_<skip>`` (the
learned-sparse layer in ``topk`` mask mode: every call skips exactly that
fraction of positions, no host sync) and ``threshold_<skip>`` (the causal
threshold mask a language model trains with, on the sync-free parked path,
each position skipped with that probability, so the count varies from call to
call as in training). Each call takes a fresh input (one of eight) under bf16
autocast on CUDA, float32 parameters (the trainer's).

Modes: ``eager``; ``compiled`` (``torch.compile``); ``graphed``
(``torch.cuda.make_graphed_callables``: the host cost of launching the many
small kernels is gone, so this is what the GPU work itself takes), after
compiling with ``compile`` too.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from sparsetrain.bk import MoEResNetBKLayer, SparseMoEResNetBKLayer


def topk_layer(d: int, hidden: int, experts: int, skip: float) -> SparseMoEResNetBKLayer:
    """The learned-sparse layer in ``topk`` mask mode with the causal BK op the
    language model uses (``topk`` is refused for a causal layer at construction,
    so causality is switched on after it; timing only)."""
    layer = SparseMoEResNetBKLayer(d, hidden, experts, target_sparsity=skip, mask_mode="topk", causal=False)
    layer.causal = True
    return layer


def threshold_layer(d: int, hidden: int, experts: int, skip: float) -> SparseMoEResNetBKLayer:
    """The learned-sparse layer as a language model trains it, its predictor set
    so each position is skipped with probability ``skip``: the predictor's output
    is the constant ``log((1 - skip) / skip)`` and the mask's logistic noise does
    the rest."""
    layer = SparseMoEResNetBKLayer(d, hidden, experts, target_sparsity=skip, mask_mode="threshold")
    with torch.no_grad():
        layer.predictor[2].weight.zero_()
        layer.predictor[2].bias.fill_(math.log((1 - skip) / skip))
    return layer


def layer_names(skip: float, threshold: bool = True) -> list[str]:
    """The variants :func:`build_layers` builds, in order."""
    return ["dense", f"sparse_{skip}"] + ([f"threshold_{skip}"] if threshold else [])


def build_layers(d: int, hidden: int, experts: int, skip: float, threshold: bool = True) -> dict[str, torch.nn.Module]:
    """``dense``, ``sparse_<skip>`` and (``threshold``) ``threshold_<skip>``, on the CPU."""
    torch.manual_seed(0)
    makers = [lambda: MoEResNetBKLayer(d, hidden, experts), lambda: topk_layer(d, hidden, experts, skip),
              lambda: threshold_layer(d, hidden, experts, skip)]
    return {name: make() for name, make in zip(layer_names(skip, threshold), makers)}


def layer_calls(layers: dict[str, torch.nn.Module], batch: int, seq: int, device: torch.device,
                compile: bool, graphed: bool) -> dict[str, Callable[[], None]]:
    """One forward+backward per call of each layer (moved to ``device``), in the
    given mode. Graph captures are made before any eager backward: parameters
    that already ran one on the default stream keep AccumulateGrad nodes there,
    which breaks the capture."""
    if graphed and device.type != "cuda":
        raise ValueError("CUDA graphs need a CUDA device")
    layers = {name: layer.to(device) for name, layer in layers.items()}
    d = next(iter(layers.values())).v_proj.in_features  # the model width
    g = torch.Generator(device=device).manual_seed(0)
    xs = [torch.randn(batch, seq, d, device=device, generator=g) for _ in range(8)]
    amp = device.type == "cuda"
    dy = torch.randn(batch, seq, d, device=device, generator=g).to(torch.bfloat16 if amp else torch.float32)
    if compile:  # aten's random ops, which CUDA-graph capture handles, instead of inductor's
        torch._inductor.config.fallback_random = True
    calls: dict[str, Callable[[], None]] = {}
    count = [0]
    for name, layer in layers.items():
        run: Callable = torch.compile(layer) if compile else layer
        if graphed:
            with torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False):
                run = torch.cuda.make_graphed_callables(run, (xs[0].clone(),))

        def call(run: Callable = run, layer: torch.nn.Module = layer) -> None:
            count[0] += 1
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp, cache_enabled=False):
                y = run(xs[count[0] % len(xs)])
            y.backward(dy.to(y.dtype))
            layer.zero_grad(set_to_none=False)  # graphs keep their gradient buffers

        calls[name] = call
    return calls

