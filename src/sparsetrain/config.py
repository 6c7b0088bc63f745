"""Configuration: two plain dataclasses, presets, TOML files and validation.

Precedence, lowest first: dataclass defaults < preset (``presets/<name>.toml``)
< ``--config FILE`` < command-line flags. A preset is a TOML file like any
other, so anything a preset sets, a user file can set too.

TOML layout::

    [model]                 # ModelConfig fields (shape of the network)
    n_layer = 12
    [data]                  # where tokens come from
    data = "corpus/"
    [training]              # optimisation, evaluation, feature switches
    use_collider = true
    [run]                   # seed, device, output, logging
    seed = 1
    [kernels]               # which kernel runs where several could (sparsetrain.kernels.KernelPolicy)
    attention_impl = "flash"

Two environment variables set defaults (:data:`ENV_DEFAULTS`), read by
:func:`env_default` alone, once each when a config is built:
``SPARSETRAIN_ATTENTION_IMPL`` (``kernels.attention_impl``) and
``SPARSETRAIN_CSLT_PLANS=0`` (``kernels.cached_cslt_plans = false``). A value
in a file or a flag wins. (:func:`sparsetrain.kernels.current`, the policy of
code run outside a trainer, takes the same defaults.)
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from collections.abc import Callable, Mapping
from typing import Any

from .errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib

FFN_KINDS = ("swiglu", "relu2", "relu2_24")
PARALLEL_KINDS = ("ddp", "fsdp")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
SECTIONS = ("model", "data", "training", "run", "kernels")
ARCHS = ("gpt", "resnet_bk")
SCHEDULE_KINDS = ("steps", "time")  # what the lr schedule follows (sparsetrain.optim.LRSchedule)
CAPTURABLE_METHODS = ("topk", "random", "importance")  # selections with a fixed count and no host read (run.cuda_graph)
OPTIMIZERS = ("adamw", "muon", "lion", "adamw8bit", "galore_adamw")  # built by sparsetrain.optimizers
MUON_FALLBACKS = ("adamw", "lion")
MUON_ADJUST_LR = ("original", "match_rms_adamw")
REPORT_TO = ("none", "tensorboard", "wandb", "all")
ATTENTION_IMPLS = ("auto", "cudnn", "flash", "recompute")  # Collider's attention forward (kernels.attention_impl)

ENV_DEFAULTS = {"attention_impl": "SPARSETRAIN_ATTENTION_IMPL", "cached_cslt_plans": "SPARSETRAIN_CSLT_PLANS"}
"""Config fields whose default an environment variable sets (read by :func:`env_default` only)."""

MAX_SIZE = 2**31 - 1  # the largest size or count a setting may take (int32)


def env_default(name: str, environ: Mapping[str, str] | None = None) -> Any:
    """The default of field ``name`` of :data:`ENV_DEFAULTS` under ``environ`` (default:
    ``os.environ``): ``SPARSETRAIN_ATTENTION_IMPL`` as given (unset or empty: auto),
    ``SPARSETRAIN_CSLT_PLANS`` off at ``0`` only."""
    value = (os.environ if environ is None else environ).get(ENV_DEFAULTS[name], "")
    if name == "cached_cslt_plans":
        return value != "0"
    return value or "auto"


def _section(name: str, help: str) -> dict[str, Any]:
    return {"section": name, "help": help}


def _from_env(name: str) -> Callable[[], Any]:
    """A field's default factory: the environment's value when the config is built."""
    return lambda: env_default(name)


@dataclass
class ModelConfig:
    """Shape of the GPT decoder. Every field is a plain number or name."""

    arch: str = field(default="gpt", metadata={"help": "network: gpt or resnet_bk (BK-Core layers; CLI alias --model)"})
    vocab_size: int = field(default=8192, metadata={"help": "tokenizer and embedding size"})
    seq_len: int = field(default=256, metadata={"help": "context length (tokens per sequence)"})
    n_layer: int = field(default=4, metadata={"help": "transformer blocks"})
    n_head: int = field(default=4, metadata={"help": "attention heads"})
    d_model: int = field(default=128, metadata={"help": "residual width"})
    ffn: str = field(default="relu2", metadata={"help": "FFN kind: " + ", ".join(FFN_KINDS)})
    ffn_hidden: int = field(default=0, metadata={"help": "FFN hidden size; 0 = 4*d (relu2) or 2/3 of that (swiglu)"})
    rope_theta: float = field(default=10000.0, metadata={"help": "RoPE base"})
    norm_eps: float = field(default=1e-6, metadata={"help": "RMSNorm epsilon"})
    activation_sparse_method: str = field(default="naive", metadata={"help": "relu2_24: naive, mvue, soft_threshold, transposable (the one that runs on sparse tensor cores) or transposable_random (its control: random patterns)"})
    activation_dense_warmup_steps: int = field(default=1000, metadata={"help": "relu2_24: dense steps before 2:4 switches on"})
    activation_dense_fraction: float = field(default=0.05, metadata={"help": "relu2_24: densest features kept dense in weight gradients"})
    hyper_connections: int = field(default=0, metadata={"help": "mHC-lite residual streams: 0 (off), 2 or 4"})
    hyper_write_init: str = field(default="every_stream", metadata={"help": "hyper-connections: where each sublayer writes at init: every_stream (gain 1 on each stream, as Hyper-Connections start) or next_stream (mostly to stream (l + 1) mod n; what runs saved without this field used)"})
    hyper_stream_dtype: str = field(default="float32", metadata={"help": "hyper-connections: the streams' storage dtype: float32 (as the plain residual) or bfloat16 (half the streams' memory traffic; the mixing still sums in float32 and rounds once)"})
    bk_num_experts: int = field(default=4, metadata={"help": "resnet_bk: experts of each top-1 MoE FFN"})
    bk_sparsity: float = field(default=0.0, metadata={"help": "resnet_bk: target fraction of positions that skip the MoE FFN (0 = dense layers)"})
    bk_sparsity_loss: str = field(default="l2", metadata={"help": "resnet_bk: sparsity loss l2, l1, kl or adaptive (Huber)"})
    bk_sparsity_loss_weight: float = field(default=0.1, metadata={"help": "resnet_bk: weight of the sparsity loss"})
    bk_sparsity_warmup_steps: int = field(default=0, metadata={"help": "resnet_bk: steps over which the target sparsity ramps up from 0"})
    bk_tau: float = field(default=1.0, metadata={"help": "resnet_bk: Gumbel-sigmoid temperature of the skip mask"})
    tie_embeddings: bool = field(default=False, metadata={"help": "share the embedding with the LM head"})
    init_std: float = field(default=0.02, metadata={"help": "std of the normal weight init"})

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    @property
    def hidden_size(self) -> int:
        """Resolved FFN hidden size.

        relu2 uses 4*d. SwiGLU has three matrices instead of two, so it gets
        2/3 of that (rounded to a multiple of 64) to keep the parameter count
        the same -- the comparison every later FFN benchmark relies on.
        """
        if self.ffn_hidden:
            return self.ffn_hidden
        if self.ffn == "swiglu":
            return max(64, int(round(4 * self.d_model * 2 / 3 / 64)) * 64)
        return 4 * self.d_model

    def validate(self) -> None:
        for name in ("vocab_size", "seq_len", "n_layer", "n_head", "d_model"):
            _require(getattr(self, name) >= 1, f"model.{name} must be >= 1, got {getattr(self, name)}")
        # past int32, tensor sizes and numpy's index arithmetic overflow before any check of memory
        # (vocab_size has a tighter bound of its own, below)
        for name in ("seq_len", "n_layer", "n_head", "d_model"):
            _require(getattr(self, name) <= MAX_SIZE, f"model.{name} must be <= {MAX_SIZE}, got {getattr(self, name)}")
        _require(self.vocab_size >= 257, f"model.vocab_size must be >= 257 (256 bytes + end-of-text), got {self.vocab_size}")
        # a uint32 token file's ids, and far past any tokenizer's (the BPE trainer aborts the process on huge ones)
        _require(self.vocab_size <= 2**24, f"model.vocab_size must be <= {2**24}, got {self.vocab_size}")
        _require(self.ffn in FFN_KINDS, f"model.ffn must be one of {', '.join(FFN_KINDS)}, got {self.ffn!r}")
        _require(self.ffn_hidden >= 0, f"model.ffn_hidden must be >= 0, got {self.ffn_hidden}")
        _require(self.arch in ARCHS, f"model.arch must be one of {', '.join(ARCHS)}, got {self.arch!r}")
        _require(
            self.d_model % self.n_head == 0,
            f"model.d_model ({self.d_model}) must be divisible by model.n_head ({self.n_head})",
        )
        _require(self.head_dim % 2 == 0, f"model.d_model / model.n_head must be even for RoPE, got {self.head_dim}")
        _require(self.rope_theta > 0, f"model.rope_theta must be > 0, got {self.rope_theta}")
        _require(0 < self.norm_eps < 1, f"model.norm_eps must be in (0, 1), got {self.norm_eps}")
        _require(self.init_std > 0, f"model.init_std must be > 0, got {self.init_std}")
        for check in _MODEL_CHECKS.values():  # the network techniques' own fields (sparsetrain.build)
            check(self)


@dataclass
class TrainConfig:
    """Everything a training run needs besides the model shape.

    Field metadata ``section`` says which TOML table a key lives in. Feature
    switches of later techniques (Collider, MTP, async loader) keep their names
    here so configs written today stay valid.
    """

    model: ModelConfig = field(default_factory=ModelConfig, metadata={"section": "model"})
    # [run]
    preset: str = field(default="tiny", metadata=_section("run", "named preset (a TOML file in sparsetrain/presets)"))
    out_dir: str = field(default="", metadata=_section("run", "run directory; empty = runs/<preset>-<timestamp>"))
    seed: int = field(default=1337, metadata=_section("run", "seed for init and data order"))
    device: str = field(default="auto", metadata=_section("run", "auto, cpu, cuda or cuda:N"))
    dtype: str = field(default="auto", metadata=_section("run", "auto (bf16 autocast on CUDA, fp32 on CPU), float32, bfloat16"))
    compile: bool = field(default=False, metadata=_section("run", "torch.compile the model"))
    compile_mode: str = field(default="default", metadata=_section(
        "run", "torch.compile mode with compile: default, reduce-overhead (CUDA graphs), max-autotune or max-autotune-no-cudagraphs"))
    log_every: int = field(default=10, metadata=_section("run", "steps between metric lines"))
    ckpt_every: int = field(default=0, metadata=_section("run", "steps between checkpoints; 0 = at evals and the end"))
    save_checkpoints: bool = field(default=True, metadata=_section(
        "run", "write checkpoints (false: nothing to resume from; for throughput benchmarks of large models)"))
    parallel: str = field(default="ddp", metadata=_section(
        "run", "with several processes (torchrun): ddp (replicated weights) or fsdp (FSDP2: weights, gradients and "
               "optimizer state sharded per block; sharded checkpoints)"))
    activation_checkpointing: bool = field(default=False, metadata=_section(
        "run", "recompute each block's activations in the backward instead of storing them (less memory, one more forward)"))
    cuda_graph: bool = field(default=False, metadata=_section(
        "run", "capture each optimizer step whole in one CUDA graph and replay it (after a selection warmup and a few "
               "eager steps): no kernel-launch overhead, for small models, Collider's many kernels and slow hosts. One "
               "CUDA process, AdamW, a kept count that stays fixed"))
    report_to: str = field(default="none", metadata=_section(
        "run", "also log to: none, tensorboard, wandb (offline without WANDB_API_KEY) or all; metrics.jsonl is always written"))
    # [data]
    data: str = field(default="", metadata=_section("data", "text file, folder of text files or .bin tokens; empty = Python stdlib sources"))
    token_dtype: str = field(default="uint16", metadata=_section("data", "dtype of a .bin token file: uint16 or uint32"))
    tokenizer: str = field(default="", metadata=_section(
        "data", "tokenizer.json: of a .bin file's tokens (for bits per byte and generate); for text data, the BPE to "
                "tokenize it with instead of one trained on it (with init_from: that run's tokenizer.json)"))
    cache_dir: str = field(default="", metadata=_section("data", "tokenizer/token cache; empty = $SPARSETRAIN_CACHE or ~/.cache/sparsetrain"))
    val_fraction: float = field(default=0.02, metadata=_section("data", "fraction of files (or tokens, for .bin) held out for validation"))
    data_on_the_fly: bool = field(default=False, metadata=_section("data", "read and tokenize the raw train files for every batch (in the loader, async with use_async_loader) instead of reading the token cache"))
    data_include: str = field(default="", metadata=_section("data", "folder corpus: comma-separated globs of the relative paths to keep (fnmatch, * crosses /); empty = every text file"))
    data_exclude: str = field(default="", metadata=_section("data", "folder corpus: comma-separated globs of the relative paths to drop (after data_include)"))
    data_max_bytes: int = field(default=0, metadata=_section("data", "folder corpus: keep files in an order fixed by a hash of their paths while their total stays within this many bytes; 0 = no cap"))
    # [training]
    init_from: str = field(default="", metadata=_section(
        "training", "start from the weights of this run (its directory, ckpt.pt or model.safetensors) with a fresh "
                    "optimizer, step 0 and a new lr schedule (continued pretraining); the weights' shape and tokenizer "
                    "must be this run's, seq_len may differ. A resumed run continues from its own checkpoint"))
    batch_size: int = field(default=16, metadata=_section("training", "sequences per micro-batch per process"))
    grad_accum: int = field(default=1, metadata=_section("training", "micro-batches per optimizer step"))
    max_steps: int = field(default=300, metadata=_section("training", "optimizer steps; 0 = no limit (the time budget max_seconds ends the run)"))
    max_seconds: float = field(default=0.0, metadata=_section("training", "stop after this much training time (seconds after start-up, eval and checkpoints excluded); 0 = no limit"))
    startup_steps: int = field(default=1, metadata=_section("training", "first steps of each process timed as start-up (compile, autotuning), outside max_seconds and the time schedule"))
    prime_startup: bool = field(default=True, metadata=_section(
        "training", "in the start-up, run the objective once more at the kept counts a changing keep ratio (selection "
                    "warmup, adaptive threshold) reaches later, discarding the result, so that what those counts compile "
                    "counts as start-up, not training; needs startup_steps >= 1"))
    schedule_by: str = field(default="steps", metadata=_section("training", "lr decay over steps (to max_steps) or time (to max_seconds of training after start-up)"))
    lr: float = field(default=3e-3, metadata=_section("training", "peak learning rate"))
    min_lr_ratio: float = field(default=0.1, metadata=_section("training", "final lr as a fraction of the peak"))
    warmup_steps: int = field(default=30, metadata=_section("training", "linear warmup steps"))
    weight_decay: float = field(default=0.1, metadata=_section("training", "AdamW (and Lion) decay on matrices other than embeddings"))
    beta1: float = field(default=0.9, metadata=_section("training", "AdamW beta1"))
    beta2: float = field(default=0.95, metadata=_section("training", "AdamW beta2"))
    optimizer: str = field(default="adamw", metadata=_section(
        "training", "adamw, muon (hidden matrices; the rest with muon_fallback), lion, adamw8bit (bitsandbytes) or "
        "galore_adamw (galore-torch); lr, weight_decay and the betas apply to AdamW and Lion (docs/optimizers.md)"))
    muon_fallback: str = field(default="adamw", metadata=_section(
        "training", "optimizer = muon: adamw or lion for embeddings, LM head, norms, biases and scalars"))
    muon_lr: float = field(default=0.02, metadata=_section("training", "optimizer = muon: peak lr of the Muon matrices (the schedule scales it with lr)"))
    muon_momentum: float = field(default=0.95, metadata=_section("training", "optimizer = muon: Nesterov momentum"))
    muon_weight_decay: float = field(default=0.0, metadata=_section("training", "optimizer = muon: decoupled decay of the Muon matrices (times the Muon lr)"))
    muon_adjust_lr: str = field(default="original", metadata=_section(
        "training", "optimizer = muon: per-shape lr scale, original (sqrt(max(1, rows/cols))) or match_rms_adamw (0.2*sqrt(max(rows, cols)))"))
    galore_rank: int = field(default=128, metadata=_section("training", "optimizer = galore_adamw: rank of the projected gradients"))
    galore_update_proj_gap: int = field(default=200, metadata=_section("training", "optimizer = galore_adamw: steps between projection updates"))
    galore_scale: float = field(default=0.25, metadata=_section("training", "optimizer = galore_adamw: scale of the projected-back update"))
    grad_clip: float = field(default=1.0, metadata=_section("training", "max grad norm; 0 = off"))
    eval_every: int = field(default=100, metadata=_section("training", "steps between val evals; 0 = only at the end"))
    eval_every_seconds: float = field(default=0.0, metadata=_section("training", "also eval each time this many training seconds (after start-up) have passed; 0 = off"))
    eval_batches: int = field(default=8, metadata=_section("training", "val micro-batches per eval"))
    eval_code_samples: int = field(default=0, metadata=_section(
        "training", "at each eval, the compile rate of this many sampled continuations of the held-out .py files "
                    "(rank 0; eval time, not training time); 0 = off"))
    selection: str = field(default="none", metadata=_section("training", "token selection: none, loss (CGGR selective loss) or batch (CGGR batch splitting)"))
    selection_score: str = field(default="combined", metadata=_section("training", "token score: loss, entropy, margin, combined, collider, excess, reference, gradnorm"))
    selection_method: str = field(default="topk", metadata=_section("training", "threshold, topk, stratified, sequence_aware, random or importance (drawn in proportion to the score, weighted: unbiased)"))
    keep_ratio: float = field(default=0.5, metadata=_section("training", "fraction of tokens (sequences, for batch) kept"))
    selection_warmup_steps: int = field(default=0, metadata=_section("training", "keep ratio goes 1.0 -> keep_ratio over these steps"))
    selection_dynamic: bool = field(default=False, metadata=_section("training", "adjust the ratio by batch confidence (CGGR)"))
    selection_sensitivity: float = field(default=0.5, metadata=_section("training", "strength of that adjustment, in [0, 1]"))
    selection_threshold: float = field(default=0.0, metadata=_section("training", "fixed threshold for selection_method = threshold"))
    selection_target_sparsity: float = field(default=0.0, metadata=_section("training", "threshold method: hold this dropped fraction adaptively; 0 = fixed threshold"))
    router_layers: int = field(default=2, metadata=_section("training", "layers of the truncated router (selection = batch)"))
    reference_ckpt: str = field(default="", metadata=_section("training", "reference run for the excess and reference scores (Rho-1)"))
    reference_losses: str = field(default="", metadata=_section("training", "precomputed reference losses for the excess and reference scores (sparsetrain reference-losses), instead of reference_ckpt"))
    use_collider: bool = field(default=False, metadata=_section("training", "Collider token filtering in backward"))
    collider_threshold: float = field(default=0.5, metadata=_section("training", "Collider fixed threshold on the score (used when collider_sparsity = 0)"))
    collider_sparsity: float = field(default=0.0, metadata=_section("training", "Collider target drop ratio, held by the adaptive threshold (or exact, with collider_method = topk)"))
    collider_score: str = field(default="collider", metadata=_section("training", "Collider token score (collider, loss, excess, reference, ...)"))
    collider_span: int = field(default=1, metadata=_section("training", "score each token by the mean score of its block of this many consecutive positions (per sequence), so that whole spans are kept or dropped; 1 = per token"))
    collider_method: str = field(default="threshold", metadata=_section("training", "threshold (adaptive when collider_sparsity > 0), topk (exact ratio), random (the control) or importance (drawn in proportion to a loss or gradnorm score, weighted: unbiased)"))
    use_mtp: bool = field(default=False, metadata=_section("training", "multi-token prediction heads"))
    mtp_n_tokens: int = field(default=2, metadata=_section("training", "MTP extra heads (2-4)"))
    mtp_weight: float = field(default=0.2, metadata=_section("training", "MTP loss weight"))
    mtp_decay: float = field(default=0.5, metadata=_section("training", "weight of head k is mtp_weight * mtp_decay^(k-1)"))
    fire_at_step: int = field(default=0, metadata=_section("training", "FIRE-reinitialise every Linear after this step (0 = never)"))
    use_async_loader: bool = field(default=False, metadata=_section("training", "background batch workers"))
    async_n_workers: int = field(default=2, metadata=_section("training", "async loader workers"))
    async_prefetch_size: int = field(default=4, metadata=_section("training", "batches prefetched"))
    # [kernels]: the run's kernel dispatch policy, sparsetrain.kernels.KernelPolicy (same names and defaults)
    fused_cross_entropy: bool = field(default=True, metadata=_section(
        "kernels", "mean cross-entropy and Collider's kept-rows loss by the Triton kernels on CUDA (off: plain torch)"))
    cached_cslt_plans: bool = field(default_factory=_from_env("cached_cslt_plans"), metadata=_section(
        "kernels", "2:4 cuSPARSELt products on sparsetrain's cached plans where their extension builds (off: torch's "
                   "op); default off with $SPARSETRAIN_CSLT_PLANS=0"))
    cusparselt_min_width: int = field(default=1280, metadata=_section(
        "kernels", "relu2_24 transposable FFN on cuSPARSELt from this d_model up; below it the masked Triton kernel "
                   "on dense GEMMs"))
    attention_impl: str = field(default_factory=_from_env("attention_impl"), metadata=_section(
        "kernels", "Collider's attention: auto (cuDNN, else flash), cudnn, flash or recompute (plain SDPA, recomputed "
                   "in backward); default $SPARSETRAIN_ATTENTION_IMPL where set"))
    fused_hyper_mixing: bool = field(default=True, metadata=_section(
        "kernels", "hyper-connection stream mixing by the Triton kernels on CUDA outside torch.compile (off: plain torch)"))
    fused_hyper_mixing_compiled: bool = field(default=True, metadata=_section(
        "kernels", "hyper-connection stream mixing by the Triton kernels (as custom ops) inside torch.compile "
                   "(off: plain torch, which inductor fuses with its neighbours)"))
    kept_kernel_max_keep: float = field(default=0.65, metadata=_section(
        "kernels", "Collider's attention backward by the Triton kernel over kept queries only up to this kept "
                   "fraction, the fused dense backward above it"))

    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the first bad value."""
        self.model.validate()
        _require(self.preset in list_presets(), f"unknown preset {self.preset!r} (choose from {', '.join(list_presets())})")
        _require(_valid_device(self.device), f"run.device must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        _require(self.dtype in ("auto", "float32", "bfloat16"), f"run.dtype must be auto, float32 or bfloat16, got {self.dtype!r}")
        _require(self.report_to in REPORT_TO, f"run.report_to must be one of {', '.join(REPORT_TO)}, got {self.report_to!r}")
        _require(self.compile_mode in COMPILE_MODES,
                 f"run.compile_mode must be one of {', '.join(COMPILE_MODES)}, got {self.compile_mode!r}")
        _require(self.parallel in PARALLEL_KINDS, f"run.parallel must be ddp or fsdp, got {self.parallel!r}")
        if self.parallel == "fsdp":
            self._validate_fsdp()
        if self.cuda_graph:
            self._validate_cuda_graph()
        _require(not (self.use_collider and self.model.hyper_stream_dtype != "float32"),
                 f"use_collider with model.hyper_stream_dtype = {self.model.hyper_stream_dtype} is not available yet "
                 "(Collider's backward keeps the streams in float32)")
        if self.activation_checkpointing:
            _require(not self.use_collider, "activation_checkpointing with use_collider is not available yet "
                                            "(Collider runs its own backward through the blocks)")
            _require(self.model.ffn != "relu2_24" or self.model.activation_sparse_method not in ("mvue", "transposable_random"),
                     f"activation_checkpointing with activation_sparse_method = {self.model.activation_sparse_method} is not "
                     "available: the recomputation would draw other random 2:4 patterns than the forward did")
        for name in ("log_every", "batch_size", "grad_accum", "eval_batches"):
            _require(getattr(self, name) >= 1, f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("log_every", "grad_accum", "eval_batches"):  # a batch too large is the memory check's to name
            _require(getattr(self, name) <= MAX_SIZE, f"{name} must be <= {MAX_SIZE}, got {getattr(self, name)}")
        for name in ("max_steps", "ckpt_every", "eval_every", "warmup_steps", "eval_code_samples"):
            _require(getattr(self, name) >= 0, f"{name} must be >= 0, got {getattr(self, name)}")
        _require(0 <= self.seed < 2**63, f"run.seed must be in [0, 2**63) (torch's and numpy's generators), got {self.seed}")
        _require(self.token_dtype in ("uint16", "uint32"), f"data.token_dtype must be uint16 or uint32, got {self.token_dtype!r}")
        _require(0 < self.val_fraction < 0.5, f"data.val_fraction must be in (0, 0.5), got {self.val_fraction}")
        _require(not (self.data_on_the_fly and self.data.endswith(".bin")),
                 f"data.data_on_the_fly needs raw text files, got the token file {self.data!r}")
        _require(math.isfinite(self.lr) and self.lr > 0, f"training.lr must be a positive number, got {self.lr}")
        _require(0 <= self.min_lr_ratio <= 1, f"training.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        _require(self.weight_decay >= 0, f"training.weight_decay must be >= 0, got {self.weight_decay}")
        for name in ("beta1", "beta2"):
            _require(0 <= getattr(self, name) < 1, f"training.{name} must be in [0, 1), got {getattr(self, name)}")
        _require(self.grad_clip >= 0, f"training.grad_clip must be >= 0, got {self.grad_clip}")
        _require(self.optimizer in OPTIMIZERS, f"training.optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}")
        _require(self.muon_fallback in MUON_FALLBACKS,
                 f"training.muon_fallback must be one of {', '.join(MUON_FALLBACKS)}, got {self.muon_fallback!r}")
        _require(math.isfinite(self.muon_lr) and self.muon_lr > 0, f"training.muon_lr must be a positive number, got {self.muon_lr}")
        _require(0 <= self.muon_momentum < 1, f"training.muon_momentum must be in [0, 1), got {self.muon_momentum}")
        _require(self.muon_weight_decay >= 0, f"training.muon_weight_decay must be >= 0, got {self.muon_weight_decay}")
        _require(self.muon_adjust_lr in MUON_ADJUST_LR,
                 f"training.muon_adjust_lr must be one of {', '.join(MUON_ADJUST_LR)}, got {self.muon_adjust_lr!r}")
        _require(self.galore_rank >= 1, f"training.galore_rank must be >= 1, got {self.galore_rank}")
        _require(self.galore_update_proj_gap >= 1, f"training.galore_update_proj_gap must be >= 1, got {self.galore_update_proj_gap}")
        _require(math.isfinite(self.galore_scale) and self.galore_scale > 0, f"training.galore_scale must be a positive number, got {self.galore_scale}")
        _require(self.max_seconds >= 0, f"training.max_seconds must be >= 0, got {self.max_seconds}")
        _require(self.startup_steps >= 0, f"training.startup_steps must be >= 0, got {self.startup_steps}")
        _require(self.eval_every_seconds >= 0, f"training.eval_every_seconds must be >= 0, got {self.eval_every_seconds}")
        _require(self.schedule_by in SCHEDULE_KINDS,
                 f"training.schedule_by must be one of {', '.join(SCHEDULE_KINDS)}, got {self.schedule_by!r}")
        _require(self.schedule_by != "time" or self.max_seconds > 0,
                 "training.schedule_by = time decays the lr to its floor at max_seconds; set max_seconds > 0")
        _require(self.max_steps > 0 or self.max_seconds > 0,
                 "training.max_steps = 0 (no step limit) needs max_seconds > 0, a time budget that ends the run")
        _require(self.max_steps > 0 or self.schedule_by == "time",
                 "training.schedule_by = steps decays the lr to its floor at max_steps; with max_steps = 0 "
                 "(no step limit) set schedule_by = time")
        _require(not (self.reference_ckpt and self.reference_losses),
                 "training.reference_ckpt and reference_losses are two sources of one reference: set one")
        _require(not (self.reference_losses and self.data_on_the_fly),
                 "training.reference_losses is aligned with the token cache; data_on_the_fly does not read it")
        _require(self.data_max_bytes >= 0, f"data.data_max_bytes must be >= 0, got {self.data_max_bytes}")
        if self.data_include or self.data_exclude or self.data_max_bytes:
            _require(not Path(self.data).is_file() and not self.data.endswith(".bin"),
                     f"data.data_include, data_exclude and data_max_bytes select files of a folder; data is the file {self.data!r}")
        _require(self.async_n_workers >= 1, f"training.async_n_workers must be >= 1, got {self.async_n_workers}")
        _require(1 <= self.async_prefetch_size <= 4096,
                 f"training.async_prefetch_size must be in [1, 4096] (batches held in memory), got {self.async_prefetch_size}")
        _require(self.fire_at_step >= 0, f"training.fire_at_step must be >= 0, got {self.fire_at_step}")
        _require(not (self.fire_at_step and self.model.arch == "resnet_bk"),
                 f"training.fire_at_step = {self.fire_at_step} with model.arch = resnet_bk is not available: FIRE "
                 "reinitialises nn.Linear weights, and ResNet-BK's [E, out, in] expert stacks would silently keep "
                 "theirs while their optimizer state is reset")
        check_kernels(self)
        for check in _TRAIN_CHECKS.values():  # each training objective's own fields (sparsetrain.objectives)
            check(self)

    def _validate_fsdp(self) -> None:
        """What FSDP2 cannot shard yet, refused by name."""
        what = None
        if self.selection == "batch":
            what = "selection = batch (its router runs the first blocks outside the sharded forward)"
        elif self.use_mtp:
            what = ("use_mtp (the MTP heads live outside the sharded model: nothing would reduce their gradients "
                    "and the sharded checkpoint would not hold them)")
        elif self.fire_at_step:
            what = "fire_at_step (FIRE orthogonalises whole matrices, not shards)"
        elif self.model.hyper_connections:
            what = "hyper_connections (their analysis runs blocks outside the sharded forward)"
        elif self.model.arch == "resnet_bk":
            what = "model.arch = resnet_bk (scalar parameters cannot be sharded)"
        elif self.model.ffn == "relu2_24" and self.model.activation_sparse_method == "soft_threshold":
            what = "activation_sparse_method = soft_threshold (each rank would fix its own S-STE scale buffer)"
        elif self.compile and self.compile_mode in ("reduce-overhead", "max-autotune"):
            what = f"compile_mode = {self.compile_mode} (CUDA graphs around the sharding collectives are untested)"
        elif self.optimizer != "adamw":
            what = f"optimizer = {self.optimizer} (only AdamW's state is sharded and checkpointed through DCP here)"
        _require(what is None, f"parallel = fsdp with {what} is not available yet; use parallel = ddp")

    def _validate_cuda_graph(self) -> None:
        """What a captured step cannot hold, refused by name: whatever changes the
        step's shapes or its Python-side decisions after capture, and optimizers
        whose step is not capturable."""
        what = None
        if self.optimizer != "adamw":
            what = f"optimizer = {self.optimizer} (only the fused AdamW step is captured, with its lr in a device tensor)"
        elif self.compile and self.compile_mode in ("reduce-overhead", "max-autotune"):
            what = f"compile_mode = {self.compile_mode} (its own CUDA graphs cannot nest in the step's)"
        elif self.use_collider and self.collider_method not in CAPTURABLE_METHODS:
            what = (f"collider_method = {self.collider_method} (its kept count or its choice reads the device on "
                    f"the host: use {', '.join(CAPTURABLE_METHODS)})")
        elif self.selection not in ("none", "batch") and self.selection_method not in CAPTURABLE_METHODS:
            what = (f"selection_method = {self.selection_method} (its kept count or its choice reads the device on "
                    f"the host: use {', '.join(CAPTURABLE_METHODS)})")
        elif self.selection != "none" and self.selection_dynamic:
            what = "selection_dynamic (its kept count follows the batch's confidence: use a fixed keep_ratio)"
        elif self.activation_checkpointing:
            what = "activation_checkpointing (its recomputation reads the RNG state, which capture forbids)"
        elif self.selection == "batch":
            what = "selection = batch (its router picks sequences on the host)"
        elif self.fire_at_step:
            what = "fire_at_step (FIRE replaces the optimizer state the graph holds)"
        elif self.model.ffn == "relu2_24":
            what = "ffn = relu2_24 (its dense warmup and logged statistics change the step)"
        elif self.model.arch == "resnet_bk":
            what = "model.arch = resnet_bk (its sparsity schedule changes the step)"
        elif self.device == "cpu":
            what = "device = cpu (CUDA graphs need a CUDA device)"
        _require(what is None, f"run.cuda_graph with {what} is not available")

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """Sectioned plain dict, the shape of the TOML file."""
        out: dict[str, dict[str, Any]] = {s: {} for s in SECTIONS}
        out["model"] = dataclasses.asdict(self.model)
        for f in dataclasses.fields(self):
            if f.name != "model":
                out[f.metadata["section"]][f.name] = getattr(self, f.name)
        return out


def require(ok: bool, message: str) -> None:
    """Raise :class:`ConfigError` with ``message`` (one line naming the bad value) unless ``ok``."""
    if not ok:
        raise ConfigError(message)


_require = require


def check_kernels(values: Any) -> None:
    """Refuse a bad ``[kernels]`` value of ``values`` (a :class:`TrainConfig`, or a
    :class:`sparsetrain.kernels.KernelPolicy`: the same field names)."""
    require(values.attention_impl in ATTENTION_IMPLS,
            f"kernels.attention_impl (default: ${ENV_DEFAULTS['attention_impl']}) must be one of "
            f"{', '.join(ATTENTION_IMPLS)}, got {values.attention_impl!r}")
    require(values.cusparselt_min_width >= 0, f"kernels.cusparselt_min_width must be >= 0, got {values.cusparselt_min_width}")
    require(0 <= values.kept_kernel_max_keep <= 1,
            f"kernels.kept_kernel_max_keep must be in [0, 1], got {values.kept_kernel_max_keep}")

# ----------------------------------------------------------------------------- technique checks
#
# Each technique checks its own fields: the model converters (2:4 FFN,
# hyper-connections, ResNet-BK) register with register_model_check, the
# training objectives (CGGR selection, Collider, MTP) with register_train_check.
# They register when their modules are imported (sparsetrain.build and
# sparsetrain.objectives and sparsetrain.optimizers, which the package's __init__ imports, so before any
# submodule of sparsetrain runs). This module imports none of them: the
# techniques build on the config, not the other way round.

_MODEL_CHECKS: dict[str, Callable[[ModelConfig], None]] = {}
_TRAIN_CHECKS: dict[str, Callable[[TrainConfig], None]] = {}


def register_model_check(name: str, check: Callable[[ModelConfig], None]) -> None:
    """Run ``check(model_config)`` in every :meth:`ModelConfig.validate` (a
    network technique's own fields); registering a name again replaces its check."""
    _MODEL_CHECKS[name] = check


def register_train_check(name: str, check: Callable[[TrainConfig], None]) -> None:
    """Run ``check(train_config)`` in every :meth:`TrainConfig.validate` (a
    training objective's own fields); registering a name again replaces its check."""
    _TRAIN_CHECKS[name] = check


def registered_checks() -> dict[str, list[str]]:
    """Names of the registered technique checks: ``{"model": [...], "training": [...]}``."""
    return {"model": list(_MODEL_CHECKS), "training": list(_TRAIN_CHECKS)}


def _valid_device(device: str) -> bool:
    if device in ("auto", "cpu", "cuda"):
        return True
    return device.startswith("cuda:") and device[5:].isdigit()


# ----------------------------------------------------------------------------- presets


def list_presets() -> list[str]:
    """Names of the shipped presets."""
    folder = resources.files("sparsetrain") / "presets"
    return sorted(p.name[: -len(".toml")] for p in folder.iterdir() if p.name.endswith(".toml"))


def preset_dict(name: str) -> dict[str, dict[str, Any]]:
    if name not in list_presets():
        raise ConfigError(f"unknown preset {name!r} (choose from {', '.join(list_presets())})")
    text = (resources.files("sparsetrain") / "presets" / f"{name}.toml").read_text()
    return tomllib.loads(text)


def read_toml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        return tomllib.loads(p.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"config file {path} is not valid TOML: {e}") from None


# ----------------------------------------------------------------------------- building


def field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


_TOML_KINDS = ((bool, "a boolean"), (int, "an integer"), (float, "a float"), (str, "a string"), (list, "an array"),
               (dict, "a table"))
_EXPECTED = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}


def _strict_value(value: Any, typ: Any, key: str, source: str) -> Any:
    """A value of a TOML file (or a parsed one) as its field holds it, refused unless
    TOML typed it so: an int field takes an integer, a float field a number (an
    integer or a float), a str field a string, a bool field true or false. Nothing is
    converted from text: ``d_model = "128"`` is a mistake, not 128."""
    ok = {bool: lambda v: isinstance(v, bool),
          int: lambda v: isinstance(v, int) and not isinstance(v, bool),
          float: lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
          str: lambda v: isinstance(v, str)}
    if typ not in ok:
        raise TypeError(f"unsupported config type {typ} for {key}")  # a bug, not user input
    if not ok[typ](value):
        kind = next((name for t, name in _TOML_KINDS if isinstance(value, t)), f"a {type(value).__name__}")
        try:
            shown = _toml_value(value)
        except (TypeError, ValueError):
            shown = repr(value)
        raise ConfigError(f"{key} must be {_EXPECTED[typ]}, got {shown} ({kind}) in {source}")
    return _coerce(value, typ, key)  # the checks of every value (a finite float, UTF-8 text)


def _coerce(value: Any, typ: Any, key: str) -> Any:
    """Check a CLI/override value against a field type; ints are accepted as floats, and
    text is parsed (``race --arm NAME:KEY=VALUE`` hands every value over as text). A
    TOML file's values go through :func:`_strict_value` first."""
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "false", "0", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{key} must be true or false, got {value!r}")
    if typ is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key} must be an integer, got {value!r}")
        if isinstance(value, int):
            return value
        try:
            return int(str(value))
        except ValueError:
            raise ConfigError(f"{key} must be an integer, got {value!r}") from None
    if typ is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key} must be a number, got {value!r}")
        try:
            number = float(value)
        except (TypeError, ValueError, OverflowError):
            raise ConfigError(f"{key} must be a number, got {value!r}") from None
        if not math.isfinite(number):  # no setting means anything at inf or nan, and TOML files must round-trip
            raise ConfigError(f"{key} must be a finite number, got {value!r}")
        return number
    if typ is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{key} must be a string, got {value!r}")
        text = str(value)
        try:
            text.encode("utf-8")  # the run's config.toml is UTF-8
        except UnicodeEncodeError:
            raise ConfigError(f"{key} must be UTF-8 text, got {value!r}") from None
        return text
    raise TypeError(f"unsupported config type {typ} for {key}")  # a bug, not user input


def apply_dict(cfg: TrainConfig, data: dict[str, Any], source: str) -> None:
    """Apply a sectioned dict (a parsed TOML file) onto ``cfg`` in place; each value must
    have its field's type (:func:`_strict_value`)."""
    train_types = field_types(TrainConfig)
    model_types = field_types(ModelConfig)
    sections = {f.name: f.metadata["section"] for f in dataclasses.fields(TrainConfig) if f.name != "model"}
    for sec, table in data.items():
        if sec not in SECTIONS:
            hint = f"; did you mean [{sections[sec]}] {sec} = ...?" if sec in sections else ""
            raise ConfigError(f"unknown config section or top-level key {sec!r} in {source}{hint}")
        if not isinstance(table, dict):
            raise ConfigError(f"[{sec}] in {source} must be a table")
        for key, value in table.items():
            full = f"{sec}.{key}"
            if sec == "model":
                if key not in model_types:
                    raise ConfigError(f"unknown config key {full!r} in {source}")
                setattr(cfg.model, key, _strict_value(value, model_types[key], full, source))
            else:
                if sections.get(key) != sec:
                    where = f" (it belongs in [{sections[key]}])" if key in sections else ""
                    raise ConfigError(f"unknown config key {full!r} in {source}{where}")
                setattr(cfg, key, _strict_value(value, train_types[key], full, source))


# Settings that act only while a switch is on: (the switch off, and how to turn it on; the settings;
# whether it is on).
# Given explicitly (a flag, a race arm) with the switch off, they would be ignored: refused instead.
SWITCHED_SETTINGS: tuple[tuple[str, tuple[str, ...], Callable[[TrainConfig], bool]], ...] = (
    ("use_collider is off (--use-collider or --drop-ratio turns it on)",
     ("collider_threshold", "collider_sparsity", "collider_score", "collider_span", "collider_method"),
     lambda c: c.use_collider),
    ("use_mtp is off (--use-mtp)", ("mtp_n_tokens", "mtp_weight", "mtp_decay"), lambda c: c.use_mtp),
    ("use_async_loader is off (--use-async-loader)", ("async_n_workers", "async_prefetch_size"),
     lambda c: c.use_async_loader),
    ("selection is none (--selection loss or batch)",
     ("selection_score", "selection_method", "keep_ratio", "selection_dynamic", "selection_sensitivity",
      "selection_threshold", "selection_target_sparsity", "router_layers"),
     lambda c: c.selection != "none"),
    # the keep ratio's ramp: CGGR selection's and Collider's alike
    ("no token filter is on (--selection, --use-collider or --drop-ratio)", ("selection_warmup_steps",),
     lambda c: c.selection != "none" or c.use_collider),
    ("optimizer is not muon (--optimizer muon)",
     ("muon_fallback", "muon_lr", "muon_momentum", "muon_weight_decay", "muon_adjust_lr"),
     lambda c: c.optimizer == "muon"),
    ("hyper_connections is 0 (--hyper-connections 2 or 4)", ("hyper_write_init", "hyper_stream_dtype"),
     lambda c: c.model.hyper_connections > 0),
    ("optimizer is not galore_adamw (--optimizer galore_adamw)",
     ("galore_rank", "galore_update_proj_gap", "galore_scale"),
     lambda c: c.optimizer == "galore_adamw"),
    ("arch is not resnet_bk (--arch resnet_bk)",
     ("bk_num_experts", "bk_sparsity", "bk_sparsity_loss", "bk_sparsity_loss_weight", "bk_sparsity_warmup_steps",
      "bk_tau"),
     lambda c: c.model.arch == "resnet_bk"),
    ("compile is off (--compile)", ("compile_mode",), lambda c: c.compile),
    ("checkpoints are not saved (--no-save-checkpoints)", ("ckpt_every",), lambda c: c.save_checkpoints),
)


def refuse_inert_settings(cfg: TrainConfig, given: typing.Iterable[str]) -> None:
    """Refuse, in one line, settings named in ``given`` (those set explicitly: typed
    flags, a race arm's items) that do nothing in ``cfg`` because their switch is off
    (:data:`SWITCHED_SETTINGS`): ``--collider-sparsity 0.5`` without ``use_collider``
    would train dense under a name that says otherwise. Settings from a preset or a
    config file are not checked: a file may keep a technique's settings with it off."""
    given = set(given)
    for switch, names, is_on in SWITCHED_SETTINGS:
        inert = [name for name in names if name in given]
        if inert and not is_on(cfg):
            raise ConfigError(f"{', '.join(inert)} {'has' if len(inert) == 1 else 'have'} no effect while {switch}")


def saved_model_fields(saved: dict[str, Any]) -> dict[str, Any]:
    """A saved model config (a checkpoint's, a run's ``config.toml`` ``[model]``) with
    the fields it predates filled as that run ran: today's default, except where a
    field came in with a default that changed the behaviour of the models that use
    it (``hyper_write_init``: a run with hyper-connections saved before it was
    added started ``next_stream``)."""
    old = {"hyper_write_init": "next_stream"} if saved.get("hyper_connections") else {}
    return {**dataclasses.asdict(ModelConfig()), **old, **saved}


def build_config(
    preset: str | None = None,
    config_file: str | Path | None = None,
    overrides: dict[str, Any] | None = None,
    base: dict[str, Any] | None = None,
) -> TrainConfig:
    """Resolve a :class:`TrainConfig` from its layers and validate it.

    ``overrides`` maps bare field names (``"lr"``, ``"n_layer"``) to values,
    as the CLI produces them. ``base`` replaces the preset layer (used by
    ``--resume``, which starts from the run's saved config; its model fields
    filled by :func:`saved_model_fields`).
    """
    overrides = dict(overrides or {})
    file_data = read_toml(config_file) if config_file else {}
    cfg = TrainConfig()
    if base is not None:
        if isinstance(base.get("model"), dict):
            base = {**base, "model": saved_model_fields(base["model"])}
        apply_dict(cfg, base, "the saved run config")
    else:
        run_table = file_data.get("run")  # checked as a table by apply_dict below
        name = preset or overrides.get("preset") or (run_table.get("preset") if isinstance(run_table, dict) else None) or cfg.preset
        apply_dict(cfg, preset_dict(str(name)), f"preset {name}")
        cfg.preset = str(name)
    if file_data:
        apply_dict(cfg, file_data, str(config_file))
    if preset:
        overrides["preset"] = preset
    model_types = field_types(ModelConfig)
    train_types = field_types(TrainConfig)
    for key, value in overrides.items():
        if key in model_types:
            setattr(cfg.model, key, _coerce(value, model_types[key], key))
        elif key in train_types and key != "model":
            setattr(cfg, key, _coerce(value, train_types[key], key))
        else:
            raise ConfigError(f"unknown config key {key!r}")
    cfg.validate()
    return cfg


def dumps_toml(data: dict[str, dict[str, Any]]) -> str:
    """Write a sectioned dict of scalars as TOML (enough for our configs)."""
    lines: list[str] = []
    for sec, table in data.items():
        lines.append(f"[{sec}]")
        for key, value in table.items():
            lines.append(f"{key} = {_toml_value(value)}")
        lines.append("")
    return "\n".join(lines)


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v) or math.isinf(v):
            raise ValueError(f"cannot write {v} to TOML")
        return repr(v)
    if isinstance(v, str):
        # TOML basic strings: backslash and quote escaped, control characters as \uXXXX
        escaped = "".join(
            "\\" + c if c in '"\\' else f"\\u{ord(c):04x}" if ord(c) < 0x20 or ord(c) == 0x7F else c for c in v
        )
        return f'"{escaped}"'
    raise TypeError(f"cannot write {type(v).__name__} to TOML")


def reference_markdown() -> str:
    """The config reference table (docs/config.md is this, checked by a test)."""
    rows = ["# Configuration reference", "",
            "Generated from the dataclasses in `src/sparsetrain/config.py` "
            "(`python -c 'from sparsetrain.config import reference_markdown as r; print(r(), end="")' > docs/config.md`).",
            "Every key is a TOML key in its section and a CLI flag (`_` becomes `-`; booleans take `--x/--no-x`).",
            "Precedence: defaults (two from environment variables, read when a config is built: see [kernels]) "
            "< `--preset` < `--config FILE` < flags.", ""]
    defaults = TrainConfig(**{name: env_default(name, {}) for name in ENV_DEFAULTS})  # not this shell's environment
    for sec in SECTIONS:
        rows += [f"## [{sec}]", "", "| key | type | default | meaning |", "| --- | --- | --- | --- |"]
        if sec == "model":
            fields = [(f, getattr(defaults.model, f.name), field_types(ModelConfig)[f.name]) for f in dataclasses.fields(ModelConfig)]
        else:
            types = field_types(TrainConfig)
            fields = [(f, getattr(defaults, f.name), types[f.name]) for f in dataclasses.fields(TrainConfig)
                      if f.name != "model" and f.metadata["section"] == sec]
        for f, default, typ in fields:
            shown = _toml_value(default) if default != "" else '""'
            rows.append(f"| `{f.name}` | {typ.__name__} | `{shown}` | {f.metadata.get('help', '')} |")
        rows.append("")
    rows += ["## Presets", "", "| preset | n_layer | d_model | n_head | seq_len | vocab | ffn |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for name in list_presets():
        m = preset_dict(name)["model"]
        rows.append(f"| `{name}` | {m['n_layer']} | {m['d_model']} | {m['n_head']} | {m['seq_len']} | {m['vocab_size']} | {m['ffn']} |")
    return "\n".join(rows) + "\n"
