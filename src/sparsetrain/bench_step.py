"""One training step as the trainer runs it, on a fixed batch, for timing:
what ``sparsetrain bench step`` times (:func:`bench_train_step`) and what the
step benches of ``python -m bench steps`` build their variants from
(:func:`make_train_step`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.profiler import record_function

from . import kernels
from .benchmark import peak_bf16_tflops, summarize, time_fn
from .build import build_model
from .config import ModelConfig, build_config
from .data import load_corpus, train_batch
from .mtp import MTPHeads
from .objectives import build_objective, make_selector
from .optim import step_counted
from .optimizers import build_optimizer, make_adamw
from .trainer import autocast_dtype, prepare_sparse24


def default_optimizer(model: torch.nn.Module) -> torch.optim.Optimizer:
    """AdamW as the trainer builds it (fused on CUDA), at the step benches' settings."""
    device = next(model.parameters()).device
    return make_adamw(model, 1e-4, 0.1, (0.9, 0.95), device.type)


PHASES = ("forward", "select", "loss", "backward", "optimizer")
"""The phases of a training step, in order; ``select`` and ``loss`` only where the
objective selects tokens between the forward and the loss (Collider)."""


class _MarkedSelector:
    """A token selector that marks the start of the select phase and, when it
    returns, of the loss; everything else is the selector's own."""

    def __init__(self, selector: Any, mark: Callable[[str], None]) -> None:
        self._selector, self._mark = selector, mark

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self._mark("select")
        with record_function("phase:select"):
            out = self._selector(*args, **kwargs)
        self._mark("loss")
        return out

    def __getattr__(self, name: str) -> Any:
        return getattr(self._selector, name)


def _no_mark(phase: str) -> None:
    pass


class TrainStep:
    """One training step on a fixed batch, callable with no arguments (see
    :func:`make_train_step`); ``model``, ``objective`` and ``optimizer`` are
    the ones it steps."""

    def __init__(self, model: torch.nn.Module, objective: torch.nn.Module, optimizer: Any, x: torch.Tensor,
                 y: torch.Tensor, amp_dtype: torch.dtype | None, mark: Callable[[str], None],
                 policy: kernels.KernelPolicy | None = None) -> None:
        self.model, self.objective, self.optimizer, self.x, self.y = model, objective, optimizer, x, y
        self.amp_dtype, self.mark = amp_dtype, mark
        self.policy = policy  # the kernel policy every call runs under, as the trainer's steps do (None: the current)
        self.n_valid = y.numel()  # every position has a target, known on the host: no sync to size a selection
        # set after each optimizer step as the trainer sets them, so that a compiled
        # model which recompiles when a count changes shows it here too
        self.counted = step_counted(model)
        self.steps_done = 0

    def __call__(self) -> None:
        # the phase ranges let a profile charge the GPU's idle time to forward, backward or optimizer
        with kernels.using(self.policy):
            self._step()

    def _step(self) -> None:
        mark, x = self.mark, self.x
        mark("forward")
        with record_function("phase:forward"), \
                torch.autocast(x.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
            out = self.objective(x, self.y, self.n_valid)
        mark("backward")
        with record_function("phase:backward"):
            out.loss.backward()
        mark("optimizer")
        with record_function("phase:optimizer"):
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.steps_done += 1
            self.objective.set_step(self.steps_done)
            for m in self.counted:
                m.set_step(self.steps_done)
        mark("end")


def make_train_step(
    preset: str = "nano-125m",
    seq_len: int = 2048,
    batch_size: int = 8,
    compile: bool = False,
    device: str | None = None,
    model_overrides: dict[str, Any] | None = None,
    compile_mode: str | None = None,
    prepare: Callable[[torch.nn.Module], None] | None = None,
    tokens: str = "random",
    data: str = "",
    optimizer: Callable[[torch.nn.Module], Any] | None = None,
    mark: Callable[[str], None] | None = None,
) -> tuple[TrainStep, torch.nn.Module]:
    """``(step, model)``: one training step as the trainer runs it, on one fixed
    batch: the objective the config names (:func:`sparsetrain.objectives.build_objective`:
    the dense loss, Collider, CGGR, MTP, ResNet-BK's auxiliary loss) under the
    run's autocast (bf16 on CUDA), its backward, the optimizer step, and every
    per-step schedule set to the new step count.

    ``model_overrides``: config fields of the preset to change, model,
    training or kernel ones (``ffn``, ``use_collider``, ``optimizer``,
    ``fused_hyper_mixing_compiled``, ...); every call runs under the config's
    kernel policy, as the trainer's steps do. ``tokens``:
    ``"random"`` (uniform token ids) or ``"corpus"`` (the trainer's first batch
    of ``data``, the embedded corpus when empty; tokenized into
    ``$SPARSETRAIN_CACHE``): GPU power, and so the clock under the power limit,
    depends on the data. ``prepare(model)`` runs once the model is built,
    before anything else sees it. ``optimizer(model)`` gives the optimizer the
    step calls (default: :func:`sparsetrain.optimizers.build_optimizer` of the
    config, as the trainer builds it); models whose ``prepare`` gave them
    another model's parameters can share its optimizer, and so its state's
    memory. ``compile_mode``: torch.compile's mode (``compile`` implied).
    ``mark(phase)`` is called as each phase of :data:`PHASES` that the step has
    begins, and with ``"end"`` after the last (the phases are also
    ``phase:*`` profiler ranges)."""
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    compile = compile or compile_mode is not None
    cfg = build_config(preset=preset, overrides={
        "seq_len": seq_len, "batch_size": batch_size, "grad_accum": 1, "device": dev.type, "compile": compile,
        "compile_mode": compile_mode or "default", **(model_overrides or {})})
    mcfg: ModelConfig = cfg.model
    torch.manual_seed(cfg.seed)
    model = build_model(mcfg).to(dev)
    model.train()
    if prepare is not None:
        prepare(model)
    heads = MTPHeads(model, cfg.mtp_n_tokens, cfg.mtp_weight, cfg.mtp_decay).to(dev) if cfg.use_mtp else None
    trainable = model if heads is None else torch.nn.ModuleList([model, heads])
    opt = optimizer(trainable) if optimizer is not None else build_optimizer(trainable, cfg, dev.type)
    prepare_sparse24(cfg, model, dev)  # 2:4 FFNs: before compiling, as the trainer does
    selector = make_selector(cfg, seed=cfg.seed * 1000)  # the trainer's, on rank 0
    if selector is not None and cfg.use_collider:
        selector = _MarkedSelector(selector, mark or _no_mark)
    objective = build_objective(cfg, model, heads, selector)
    if tokens == "corpus":
        corpus = load_corpus(data, vocab_size=mcfg.vocab_size, verbose=False)  # in data.default_cache_dir()
        x, y = (t.to(dev) for t in train_batch(corpus.train, batch_size, seq_len, seed=0, step=0))
    elif tokens == "random":
        x = torch.randint(0, mcfg.vocab_size, (batch_size, seq_len), device=dev)
        y = torch.randint(0, mcfg.vocab_size, (batch_size, seq_len), device=dev)
    else:
        raise ValueError(f"tokens must be 'random' or 'corpus', got {tokens!r}")
    step = TrainStep(model, objective, opt, x, y, autocast_dtype(cfg.dtype, dev), mark or _no_mark,
                     kernels.KernelPolicy.from_config(cfg))
    return step, model


def bench_train_step(
    preset: str = "nano-125m",
    seq_len: int = 2048,
    batch_size: int = 8,
    compile: bool = False,
    warmup: int = 5,
    repeats: int = 20,
    device: str | None = None,
    model_overrides: dict[str, Any] | None = None,
    compile_mode: str | None = None,
    prepare: Callable[[torch.nn.Module], None] | None = None,
) -> dict[str, Any]:
    """Time full training steps (:func:`make_train_step`: forward, backward,
    optimizer) on random tokens, of the model the preset and ``model_overrides``
    build (a GPT, or ResNet-BK with ``arch="resnet_bk"``, whose sparsity loss
    joins the backward as in training).

    Returns tokens/s, the step-time summary, FLOPs per token and, on a GPU
    with a known datasheet peak, MFU. ``compile_mode``: torch.compile's mode (``compile`` implied), e.g.
    ``"reduce-overhead"`` for CUDA graphs. ``prepare(model)`` runs once after
    the model is built (e.g. to pin a learned mask's rate for timing).
    """
    step, model = make_train_step(preset, seq_len, batch_size, compile, device, model_overrides, compile_mode, prepare)
    dev = next(model.parameters()).device
    compile = compile or compile_mode is not None
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    times = time_fn(step, warmup=warmup, repeats=repeats)
    s = summarize(times)
    tokens = batch_size * seq_len
    flops_tok = model.flops_per_token(seq_len)
    out: dict[str, Any] = {
        "preset": preset,
        "params": model.num_params(),
        "seq_len": seq_len,
        "batch_size": batch_size,
        "tokens_per_step": tokens,
        "compile": compile,
        "compile_mode": compile_mode,
        "dtype": "bf16 autocast" if dev.type == "cuda" else "float32",
        "step": s,
        "tokens_per_s": tokens / (s["median_ms"] * 1e-3),
        "flops_per_token": flops_tok,
        "achieved_tflops": flops_tok * tokens / (s["median_ms"] * 1e-3) / 1e12,
    }
    if dev.type == "cuda":
        out["peak_memory_gib"] = round(torch.cuda.max_memory_allocated(dev) / 2**30, 2)
        peak = peak_bf16_tflops(torch.cuda.get_device_name(dev))
        if peak:
            out["mfu_vs_datasheet"] = out["achieved_tflops"] / peak
    if hasattr(model, "sparsity_stats"):  # ResNet-BK: what the learned mask skipped in the last step
        out["sparsity_stats"] = model.sparsity_stats()
    return out
