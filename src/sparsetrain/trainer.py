"""The training loop: one readable loop, with DDP or FSDP2, grad accumulation,
bf16 autocast, eval, metrics, atomic checkpoints and exact resume.

Exact resume holds because nothing in a step depends on hidden state: the
batch of step ``s`` is a pure function of ``(seed, s, micro, rank)``, the LR a
function of ``s``, and the checkpoint holds the model and AdamW state.

With several processes, ``parallel = ddp`` wraps the objective in DDP (every
module the loss reads, MTP heads included, gets its gradients all-reduced)
and rank 0 writes single-file checkpoints; ``parallel = fsdp`` shards the model
per block (:mod:`sparsetrain.parallel`), the objective calls the sharded model,
and every rank writes its shards (:mod:`sparsetrain.sharded_checkpoint`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from . import distributed as D
from . import fire, hyper, kernels
from . import parallel as P
from . import sharded_checkpoint as S
from .checkpoint import (CKPT_NAME, PREVIOUS_CKPT_NAME, WEIGHTS_NAME, Weights, atomic_write_bytes, atomic_write_text,
                         capture_rng_state, first_line, load_checkpoint_from, module_generators, refuse_other_tokenizer,
                         remove_durably, remove_partial_writes, restore_rng_state, rng_untouched, save_checkpoint, save_weights)
from .config import ModelConfig, TrainConfig, dumps_toml, read_toml, saved_model_fields
from .data import (DATA_RECORD_NAME, TokenizedCorpus, bits_per_byte, data_record, data_record_changes, load_corpus,
                   memory_named_by_batch, read_data_record, tokens_per_byte, train_batch, train_window_starts,
                   val_batches)
from .loader import make_loader
from .errors import CheckpointError, ConfigError, DataError, DivergedError
from .evaluate import code_compile_rate, code_prompts, held_out_code_files
from .generate import load_model, load_model_weights
from .build import build_model, weights_differences
from .metrics import LABEL_COUNTS, ElapsedMs, MetricWindow, tensor_means
from .model import GPT, IGNORE_INDEX
from .mtp import MTPHeads
from .objectives import Objective, build_objective, make_selector
from .sparse24.ffn import Sparse24FFN, cuda_graphs_ok, prepare_ffns
from .selection import TokenSelector
from .step_graph import StepGraph, make_capturable, portable_optimizer_state
from .optim import LRSchedule, step_counted
from .optimizers import build_optimizer, resume_fixed_fields
from .plotting import plot_loss_curve
from .reference_losses import ReferenceLosses
from .token_labels import TokenLabels, label_counts, read_manifest, train_token_labels
from .train_clock import TrainClock
from .reporting import METRICS_NAME, RunLog, sinks, truncate_metrics

CONFIG_NAME = "config.toml"
CONFIG_HEADER = ("# The resolved config of this run. `sparsetrain train --config` on this file starts a new run\n"
                 "# in a new folder (out_dir is not recorded); `sparsetrain train --resume <this folder>` continues it.\n")


@dataclass
class TrainResult:
    """What a finished (or time-limited) run reports back."""

    out_dir: Path
    steps_done: int
    train_losses: dict[int, float] = field(default_factory=dict)  # step -> loss, of the steps this call ran (none before a resume)
    val_losses: dict[int, float] = field(default_factory=dict)  # step -> val loss, of the evaluations this call ran
    tokens_per_second: float = 0.0
    train_seconds: float = 0.0
    startup_seconds: float = 0.0  # part of train_seconds: every process's first steps (compile, autotuning)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"run.device is {name!r} but CUDA is not available on this machine")
    return dev


def autocast_dtype(dtype: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of ``run.dtype`` on ``device``: bf16 where asked, or by default on CUDA."""
    if dtype == "bfloat16" or (dtype == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


def load_run_corpus(cfg: TrainConfig, verbose: bool = True) -> TokenizedCorpus:
    """The corpus a run with ``cfg`` trains on (its [data] settings and vocabulary)."""
    return load_corpus(cfg.data, cfg.model.vocab_size, cfg.val_fraction, cfg.cache_dir, cfg.token_dtype, cfg.tokenizer,
                       verbose=verbose, include=cfg.data_include, exclude=cfg.data_exclude, max_bytes=cfg.data_max_bytes)


def prepare_sparse24(cfg: TrainConfig, model: nn.Module, device: torch.device) -> None:
    """Make the 2:4 FFNs' token permutations (and pattern table) and build the cached cuSPARSELt
    plans now where the model's transposable 2:4 FFNs will use them (at
    start-up, not at the first sparse step after the dense warmup), and refuse
    a CUDA-graph compile mode those FFNs cannot run under here
    (:func:`~sparsetrain.sparse24.ffn.cuda_graphs_ok`)."""
    if cfg.model.ffn != "relu2_24":
        return
    # before torch.compile sees the model: made inside a compiled call, each permutation would
    # split the graph for good, and the table made in a CUDA-graph warm-up stops the step
    prepare_ffns(model, cfg.batch_size * cfg.model.seq_len)
    graphs_ok = cuda_graphs_ok(model, device)  # builds or loads the extension where it applies
    if cfg.compile and cfg.compile_mode in ("reduce-overhead", "max-autotune") and not graphs_ok:
        raise ConfigError(f"compile_mode {cfg.compile_mode} (CUDA graphs) with ffn = relu2_24 needs sparsetrain's cached "
                          "cuSPARSELt plans, which did not build here (see the warning above); "
                          "use default or max-autotune-no-cudagraphs")


def _unusable_out_dir(out: Path) -> str | None:
    """Why a new run may not write into ``out`` (None: it may)."""
    if out.exists() and not out.is_dir():
        return f"run directory {out} is a file"
    if not out.is_dir():
        return None
    if (out / CKPT_NAME).exists() or (out / PREVIOUS_CKPT_NAME).exists() or (out / S.SHARDED_DIR).exists():
        return f"run directory {out} already holds a checkpoint; resume it with --resume {out} or pick another --out-dir"
    names = sorted(p.name for p in out.iterdir())
    if names:
        shown = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
        return (f"run directory {out} is not empty ({shown}) and holds no checkpoint to resume from; "
                "pick another --out-dir or delete it")
    return None


def _stopped_before_first_checkpoint(out: Path) -> bool:
    """Whether ``out`` is the folder of a run that saves checkpoints and was stopped
    before its first: its config is there, no checkpoint is. Such a folder is resumed
    from step 0; one of a run that saves none (``save_checkpoints = false``) holds a
    finished run's log and is not."""
    if not (out / CONFIG_NAME).is_file():
        return False
    return bool(read_toml(out / CONFIG_NAME).get("run", {}).get("save_checkpoints", True))


def _announced_not_saved(state: dict, row: dict) -> bool:
    """Whether a metrics row at a checkpoint's step announces what a resume changed
    (an extended ``lr_schedule``, a ``resume_change`` of the batch) and the checkpoint
    ``state`` does not hold: that resume ended before saving it."""
    if row.get("kind") == "lr_schedule":
        return state.get("lr_schedule") is not None and row.get("schedule") != state["lr_schedule"]
    if row.get("kind") == "resume_change":
        saved = {**state.get("train_config", {}).get("training", {}), "data": state.get("data")}
        return any(saved.get(name) != new for name, (_, new) in row.get("changes", {}).items())
    return False


def compare_model_configs(saved: dict, wanted: ModelConfig, where: str) -> None:
    """Refuse to load weights into a differently shaped model, naming the difference.
    A field the checkpoint lacks was added after it was written: it compares as the
    value that run had (:func:`~sparsetrain.config.saved_model_fields`)."""
    saved = saved_model_fields(saved)
    want = asdict(wanted)
    diffs = [f"{k}={saved.get(k)!r} there vs {v!r} here" for k, v in want.items() if saved.get(k) != v]
    if diffs:
        raise CheckpointError(f"checkpoint {where} is from another model: " + ", ".join(diffs))



class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C during a run: the message is what it leaves and how to continue
    (:meth:`Trainer.interrupted_note`); ``out_dir`` its folder, ``kept_step`` the step
    of the checkpoint it keeps (None: none), for a caller that continues it its own way."""

    def __init__(self, message: str = "", out_dir: Path | None = None, kept_step: int | None = None) -> None:
        super().__init__(message)  # defaults: BaseException's pickling rebuilds it from the message alone
        self.out_dir, self.kept_step = out_dir, kept_step


def _under_kernel_policy(method):
    """Run a :class:`Trainer` method under the run's kernel policy (``self.kernel_policy``):
    every module that reads :func:`sparsetrain.kernels.current` in its forward or backward
    sees this run's policy, whatever another run in the process set."""
    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        with kernels.using(self.kernel_policy):
            return method(self, *args, **kwargs)
    return wrapper


def _valid_targets(y: torch.Tensor) -> int:
    """How many targets of a micro-batch are not ignored, known on the host so that
    the selector needs no sync to size its budget. The corpus windows (data.py,
    loader.py) have a target at every position; a batch still on the CPU is counted
    anyway."""
    return int((y != IGNORE_INDEX).sum()) if y.device.type == "cpu" else y.numel()


class Trainer:
    """Owns the model, optimizer, data and run directory of one training run.

    ``Trainer(cfg).fit()`` trains; ``Trainer(cfg, resume=run_dir)`` continues
    the run saved there exactly where it stopped.
    """

    def __init__(self, cfg: TrainConfig, resume: str | Path | None = None, verbose: bool = True) -> None:
        cfg.validate()
        self.cfg = cfg
        self.device = resolve_device(cfg.device)
        self.dist = D.init_distributed(self.device.type)
        if self.dist.enabled and self.device.type == "cuda":
            self.device = torch.device("cuda", self.dist.local_rank)
        self.verbose = verbose and self.dist.is_main
        self.amp_dtype = self._amp_dtype()
        # another run's weights to start from (init_from), read and checked against this run's model before
        # the corpus is tokenized; a resumed run continues from its own checkpoint instead
        init = self._read_init_from() if cfg.init_from and resume is None else None

        # Rank 0 builds the token cache first; the others then find it ready.
        data_t0 = time.perf_counter()
        if self.dist.is_main:
            self.corpus = self._load_corpus()
        D.barrier(self.dist)
        if not self.dist.is_main:
            self.corpus = self._load_corpus()
        self.data_record = data_record(self.corpus.train, self.corpus.val)  # the run's data.json
        # shown beside the data: a corpus tokenized for the first time can take longer than the training
        self.data_seconds = time.perf_counter() - data_t0
        if init is not None:
            run_dir = init[1] if init[1].is_dir() else init[1].parent  # the folder, or the file in it
            refuse_other_tokenizer(run_dir, self.corpus.tokenizer_path, "init_from")
        if resume is not None:  # new data (FIRE's continual step) would otherwise get a BPE of its own
            refuse_other_tokenizer(resume, self.corpus.tokenizer_path, "resumed run")

        # FSDP2 only with several processes; one process trains the plain model in either mode
        self.sharded = cfg.parallel == "fsdp" and self.dist.enabled
        # the run's kernel dispatch ([kernels]): given to the modules that take a policy, and
        # current (kernels.using) in every step and evaluation, for the modules that read it
        self.kernel_policy = kernels.KernelPolicy.from_config(cfg)
        torch.manual_seed(cfg.seed)
        self.model = build_model(cfg.model, self.kernel_policy).to(self.device)
        self.init_note = ""  # the "init:" line fit prints
        if init is not None:  # before anything wraps or compiles the model, and before the optimizer sees it
            self._load_init_weights(*init)
        # modules with a per-step schedule: relu2_24's dense warmup, sparse BK layers' sparsity ramp
        self.scheduled = step_counted(self.model)
        self.sparse_ffns = [m for m in self.scheduled if isinstance(m, Sparse24FFN)]
        self.mtp: MTPHeads | None = None
        if cfg.use_mtp:
            self.mtp = MTPHeads(self.model, cfg.mtp_n_tokens, cfg.mtp_weight, cfg.mtp_decay).to(self.device)
        self.step = 0
        self._setup_clock_and_schedule()
        self.train_seconds = 0.0  # cumulative over resumes
        self.loader = None  # async batch loader, started on first use
        self.hyper_report: dict | None = None  # mHC-lite analysis, written at the next eval
        self._loader_next = (0, 0)
        self._prime_pending = True  # every process primes in its first step (_prime_objective)
        self._graph_micro: int | None = None  # while a step graph is captured: the micro-batch being recorded
        self._replay_batches: list | None = None  # a step the graph could not replay: its batches, run eagerly
        self._uncounted_seconds = 0.0  # host seconds inside a step that are not training (a capture)
        self._setup_selection()
        self._setup_kept_audit()
        # every micro-step's metrics and every step's loss, read once per log window
        self.metric_window = MetricWindow(self.token_labels.names if self.token_labels is not None else ())
        self.restart_note = ""  # set when --resume finds a run folder stopped before its first checkpoint
        self.out_dir = self._prepare_out_dir(resume)
        self.code_files = self._setup_code_eval()
        prepare_sparse24(cfg, self.model, self.device)  # before anything is compiled
        self._parallelize()
        # after sharding: FSDP replaces every parameter with a sharded DTensor parameter
        trainable = nn.ModuleList([self.model] + ([self.mtp] if self.mtp is not None else []))
        self.optimizer = build_optimizer(trainable, cfg, self.device.type)
        self.step_graph = self._setup_step_graph()
        self._pending_rows: list[dict] = []  # rows made outside fit's log (set-up, FIRE), logged by fit
        # a held-out split too short for one window is refused here, before the run's files are written
        self._val = val_batches(
            self.corpus.val, cfg.eval_batches, cfg.batch_size, cfg.model.seq_len, self.dist.rank, self.dist.world_size
        )
        if self.restart_note:
            if self.dist.is_main:
                truncate_metrics(self.out_dir / METRICS_NAME, -1)
            if verbose:
                print(self.restart_note, flush=True)
        elif resume is not None:
            self._load_state(self.out_dir)
        self._write_run_files()
        self._set_schedules(self.step)  # one step counter, the optimizer step's; also after a resume
        # each forward of a sharded model is a collective: every rank runs ceil(eval_batches / world) of them
        rounds = -(-cfg.eval_batches // self.dist.world_size)
        self._eval_padding = rounds - len(self._val) if self.sharded else 0

    @property
    def tokens_per_step(self) -> int:
        """Tokens per optimizer step, over all processes."""
        c = self.cfg
        return c.batch_size * c.model.seq_len * c.grad_accum * self.dist.world_size

    # ------------------------------------------------------------------ set-up

    def _setup_selection(self) -> None:
        """The token selector of the run's objective (Collider's, or CGGR's for
        ``selection`` = loss | batch), and the reference model for ``excess``."""
        c = self.cfg
        self.selector: TokenSelector | None = make_selector(c, seed=c.seed * 1000 + self.dist.rank)
        self.reference: GPT | ReferenceLosses | None = None
        if self.selector is not None and c.reference_losses:  # precomputed: read per batch, no reference forward
            self.reference = ReferenceLosses(c.reference_losses, self.corpus.train)
        if self.selector is not None and c.reference_ckpt:
            self.reference = load_model(c.reference_ckpt, self.device)
            if self.reference.config.vocab_size != c.model.vocab_size:
                raise CheckpointError(
                    f"reference {c.reference_ckpt} has vocab_size {self.reference.config.vocab_size}, "
                    f"this run {c.model.vocab_size}"
                )

    def _setup_kept_audit(self) -> None:
        """The labels of the train tokens by kind of document (``self.token_labels``), for
        runs whose objective keeps tokens one by one (Collider, CGGR's selective loss) on
        a corpus with a ``corpus build`` manifest: each micro-batch's kept and total targets
        per kind become the ``kept_share/<kind>`` and ``batch_share/<kind>`` of the log rows
        (:mod:`sparsetrain.token_labels`). None otherwise, at the cost of one file lookup."""
        c = self.cfg
        self.token_labels: TokenLabels | None = None
        if self.selector is None:
            return
        manifest = read_manifest(self.corpus)
        if manifest is None:
            return
        off = ("data_on_the_fly builds its windows from raw files, not from the token stream the labels follow"
               if c.data_on_the_fly else
               "selection = batch keeps whole sequences, with no per-token keep mask" if c.selection == "batch" else None)
        if off is not None:
            if self.verbose:
                print(f"kept_share audit off: {off}", flush=True)
            return
        self.token_labels = train_token_labels(self.corpus, manifest)

    def _target_labels(self, micro: int) -> torch.Tensor | None:
        """The labels (uint8 ``[batch_size, seq_len]``, CPU) of the targets of micro-batch
        ``micro`` of step ``self.step``: its windows are :func:`~sparsetrain.data.train_batch`'s,
        read by the sync and async loaders alike. None without labels."""
        if self.token_labels is None:
            return None
        c = self.cfg
        starts = train_window_starts(self.corpus.train.size, c.batch_size, c.model.seq_len, seed=c.seed, step=self.step,
                                     micro=micro, rank=self.dist.rank, world_size=self.dist.world_size)
        labels = self.token_labels.targets(starts, c.model.seq_len)
        # pinned, its copy to the GPU is asynchronous; from pageable memory the host may wait for the copy
        return labels.pin_memory() if self.device.type == "cuda" else labels

    def _parallelize(self) -> None:
        """The objective and the module a training step calls (``self.train_module``).

        ``fsdp`` (several processes): the model is sharded in place, each block
        compiled with ``compile`` (the objective then compiles nothing), and the
        objective calls the sharded model. Collider instead compiles its own
        pieces, as with one process: its engine calls each block with a node as
        the block's forward, which a compiled block would trace. Otherwise the
        objective is built as for one process and, with several, wrapped in DDP.
        Activation checkpointing wraps the blocks first, before anything is compiled."""
        c = self.cfg
        reference_nll = self._reference_nll if self.reference is not None else None
        if self.sharded:
            param_dtype = self.amp_dtype if self.device.type == "cuda" else None  # bf16 gathers, float32 reduction
            compile_blocks = c.compile and not c.use_collider
            P.parallelize(self.model, "fsdp", self.dist, self.device, param_dtype=param_dtype,
                          activation_checkpointing=c.activation_checkpointing, compile_model=compile_blocks,
                          compile_mode=None if c.compile_mode == "default" else c.compile_mode)
            objective_cfg = dataclasses.replace(c, compile=c.compile and not compile_blocks)
            self.objective: Objective = build_objective(objective_cfg, self.model, self.mtp, self.selector,
                                                        reference_nll)
            self.train_module: nn.Module = self.objective
            self._grad_sync_module: nn.Module = self.model  # the FSDP root: no_sync acts on it
            return
        if c.activation_checkpointing:
            P.apply_activation_checkpointing(self.model)
        self.objective = build_objective(c, self.model, self.mtp, self.selector, reference_nll)
        # DDP wraps the whole objective, so every trainable module it reads (the MTP heads too)
        # gets its gradients all-reduced; evaluate() toggles train/eval on it
        self.train_module = P.parallelize(self.model, "ddp", self.dist, self.device, forward_module=self.objective)
        self._grad_sync_module = self.train_module

    def _setup_step_graph(self) -> StepGraph | None:
        """``cuda_graph``: the step graph (captured later, :meth:`_graphed_step`); what
        the config cannot know is refused here."""
        if not self.cfg.cuda_graph:
            return None
        if self.device.type != "cuda":
            raise ConfigError(f"run.cuda_graph needs a CUDA device, got {self.device}")
        if self.dist.enabled:
            raise ConfigError(f"run.cuda_graph runs one process, got {self.dist.world_size} (torchrun)")
        # a capture records on the current device's streams: on another device's tensors it would
        # record nothing. set_device wants an index; a bare "cuda" already means the current one.
        if self.device.index is not None:
            torch.cuda.set_device(self.device.index)
        return StepGraph(self.device)

    def _setup_code_eval(self) -> list[Path]:
        """The held-out ``.py`` files whose sampled continuations ``eval_code_samples``
        judges (empty when off); refused at set-up when there is nothing to complete."""
        c = self.cfg
        if not c.eval_code_samples:
            return []
        problem = None
        try:
            files = [] if c.data.endswith(".bin") else held_out_code_files(
                c.data, c.val_fraction, c.data_include, c.data_exclude, c.data_max_bytes)
            if not files:
                problem = "holds no .py file"
            else:
                code_prompts(files, c.eval_code_samples, c.seed)  # every sample has a prompt
        except DataError as e:
            problem = f"has no usable .py file ({e})"
        if problem is not None:
            raise ConfigError(f"training.eval_code_samples = {c.eval_code_samples} samples held-out Python files, "
                              f"but the val split of {c.data or 'the Python stdlib'} {problem}; set eval_code_samples = 0")
        return files

    def _set_schedules(self, step: int) -> None:
        """Put every per-step schedule at optimizer step ``step``: the objective's
        own (a selection warmup) and the network's modules' (2:4 dense warmup, BK
        sparsity ramp). The trainer's step is the only counter."""
        self.objective.set_step(step)
        for m in self.scheduled:
            m.set_step(step)

    def _sidecar_nll(self) -> torch.Tensor:
        """The reference-loss sidecar's entries for the windows of micro-batch ``self._batch_key`` (CPU)."""
        c, (step, micro) = self.cfg, self._batch_key
        return self.reference.batch(c.batch_size, c.model.seq_len, seed=c.seed, step=step, micro=micro,
                                    rank=self.dist.rank, world_size=self.dist.world_size)

    @torch.no_grad()
    def _reference_nll(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if isinstance(self.reference, ReferenceLosses):  # the sidecar's entries for this micro-batch's windows
            if self._graph_micro is not None:  # capturing: the static buffer each replay's entries are copied to
                return self.step_graph.inputs[f"ref{self._graph_micro}"]
            return self._sidecar_nll().to(self.device, non_blocking=True)
        logits, _ = self.reference(x)
        nll = F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="none", ignore_index=IGNORE_INDEX)
        return nll.view(y.shape)

    def _amp_dtype(self) -> torch.dtype | None:
        return autocast_dtype(self.cfg.dtype, self.device)

    def _load_corpus(self) -> TokenizedCorpus:
        return load_run_corpus(self.cfg, verbose=self.verbose)

    def _read_init_from(self) -> tuple[Weights, Path]:
        """The weights ``init_from`` names (a run directory, ckpt.pt or model.safetensors,
        read as :func:`~sparsetrain.generate.load_model_weights` reads them) and the file
        they came from; :class:`CheckpointError` (one line) when there are none, or when
        they are another model's: a field that shapes the weights differs
        (:func:`~sparsetrain.build.weights_differences`)."""
        path = self.cfg.init_from
        if not Path(path).exists():
            raise CheckpointError(f"init_from {path}: no such run directory or checkpoint file")
        try:
            weights, file = load_model_weights(path, "cpu")
        except CheckpointError as e:
            raise CheckpointError(f"init_from {path}: {e}") from None
        try:
            saved = ModelConfig(**weights.model_config)
        except TypeError as e:
            raise CheckpointError(f"init_from {path} has an unknown model config: {e}") from None
        diffs = weights_differences(saved, self.cfg.model)
        if diffs:
            raise CheckpointError(f"init_from {path} is from another model: " + ", ".join(diffs))
        return weights, file

    def _load_init_weights(self, weights: Weights, file: Path) -> None:
        """Put the ``init_from`` weights into the fresh model. Its step-counted modules (a
        2:4 dense warmup, a BK sparsity ramp) take the saved run's count with them; the
        trainer sets them back to this run's step 0 once everything is built."""
        try:
            self.model.load_state_dict(weights.tensors)
        except RuntimeError as e:
            raise CheckpointError(f"init_from {file}: the weights do not fit this run's model: {first_line(e)}") from None
        self.init_note = f"init: weights from {file} (step {weights.step} of that run)"

    def _prepare_out_dir(self, resume: str | Path | None) -> Path:
        """The run directory: the one resumed, or a new one that must not exist yet
        or be empty (a folder holding another run's files is never written into)."""
        sinks(self.cfg.report_to)  # a missing logging package is refused before anything is written
        self.last_saved_step: int | None = None  # step of the newest checkpoint on disk
        if resume is not None:
            out = Path(resume)
            if not (out / CKPT_NAME).is_file() and not (out / PREVIOUS_CKPT_NAME).is_file() and not S.has_sharded_checkpoint(out):
                if not _stopped_before_first_checkpoint(out):
                    raise CheckpointError(f"cannot resume: no {CKPT_NAME} and no sharded checkpoint in {out}")
                # nothing trained is kept: the run starts over in its own folder, its rows cleared
                self.restart_note = f"no checkpoint yet in {out} (stopped before its first): training it from step 0"
        else:
            name = self.cfg.out_dir or f"runs/{self.cfg.preset}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"
            out = Path(D.broadcast_object(name, self.dist))
            problem = D.broadcast_object(_unusable_out_dir(out) if self.dist.is_main else None, self.dist)
            if problem:
                raise ConfigError(problem)
        self.cfg.out_dir = str(out)
        return out

    def _write_run_files(self) -> None:
        """Resolved config (without out_dir, so that ``--config`` on it starts a new run),
        the record of its tokens (``data.json``, :func:`~sparsetrain.data.data_record`,
        which evaluation and a resume compare against) and tokenizer, written only once
        every check has passed."""
        if self.dist.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            remove_partial_writes(self.out_dir)  # what a killed run was writing
            data = self.cfg.to_dict()
            del data["run"]["out_dir"]
            atomic_write_text(self.out_dir / CONFIG_NAME, CONFIG_HEADER + dumps_toml(data))
            atomic_write_text(self.out_dir / DATA_RECORD_NAME, json.dumps(self.data_record, indent=1) + "\n")
            if self.corpus.tokenizer_path is not None:
                atomic_write_bytes(self.out_dir / "tokenizer.json", Path(self.corpus.tokenizer_path).read_bytes())

    def _load_state(self, out: Path) -> None:
        """Load the newest checkpoint of ``out`` and drop the metric rows written after it.

        The newer of the sharded checkpoint (any number of processes saved it,
        any number loads it) and the single-file one (``ckpt.pt``, else
        ``ckpt.prev.pt`` with a warning) is read; a single file loads into a
        sharded model too (:func:`~sparsetrain.sharded_checkpoint.load_single_file_state`)."""
        if S.resume_from_sharded(out):
            state = S.read_meta(S.latest_sharded_dir(out))
            compare_model_configs(state["model_config"], self.cfg.model, str(out))
            saved = state["train_config"]["training"].get("optimizer", "adamw")
            if saved != self.cfg.optimizer:
                raise CheckpointError(f"the checkpoint's optimizer state is {saved}, this run's optimizer is "
                                      f"{self.cfg.optimizer}; resume with the optimizer it was trained with")
            if self.mtp is not None:  # a sharded run has no MTP heads (refused under FSDP)
                raise CheckpointError(f"checkpoint {out} has no MTP heads; resume without use_mtp")
            state = S.load_sharded(out, self.model, self.optimizer)
        else:
            # a sharded model takes the full state from host memory, every rank the same
            state, _ = load_checkpoint_from(out, map_location="cpu" if self.sharded else self.device)
            compare_model_configs(state["model_config"], self.cfg.model, str(out))
            if self.sharded:
                S.load_single_file_state(self.model, self.optimizer, state)
            else:
                self.model.load_state_dict(state["model"])
            if self.mtp is not None:
                if state.get("mtp") is None:
                    raise CheckpointError(f"checkpoint {out} has no MTP heads; resume without use_mtp")
                self.mtp.load_state_dict(state["mtp"])
            elif state.get("mtp") is not None:  # its heads' optimizer groups would not fit this run's
                raise CheckpointError(f"checkpoint {out} trained MTP heads; resume with use_mtp (a run without "
                                      "them: start a new one with --init-from)")
            if not self.sharded:
                self.optimizer.load_state_dict(state["optimizer"])
        started_from = state.get("train_config", {}).get("training", {}).get("init_from", "")
        if self.cfg.init_from != started_from:
            raise CheckpointError(f"cannot resume {out} with init_from {self.cfg.init_from!r}: it started from "
                                  f"{started_from!r}, and a resumed run continues from its own checkpoint "
                                  "(init_from starts a new run)")
        self._refuse_changed_optimizer_settings(state, out)
        self.step = int(state["step"])
        if 0 < self.cfg.max_steps < self.step:  # before metrics.jsonl is trimmed and the run's files rewritten
            raise ConfigError(f"cannot resume {out} at step {self.step} with max_steps {self.cfg.max_steps}: a resume "
                              f"extends a run, it does not shorten one (use --max-steps {self.step} or more)")
        self._check_changed_run_settings(state, out)
        self.last_saved_step = self.step
        if self.selector is not None and state.get("selector") is not None:  # none: selection turned on now
            self.selector.load_state_dict(state["selector"])
        if state.get("rng") is not None:  # none: a checkpoint from before the RNG states were saved
            restore_rng_state(state["rng"], self.device, self._module_generators())
        self.train_seconds = float(state.get("train_seconds", 0.0))
        if self.dist.is_main:  # before any row of this process is appended (a torn last line stays last)
            truncate_metrics(out / METRICS_NAME, self.step, functools.partial(_announced_not_saved, state))
        self._restore_clock_and_schedule(state, out)

    # ------------------------------------------------------------------ time and lr schedule

    @property
    def train_seconds(self) -> float:
        """Training seconds so far, cumulative over resumes: start-up included, eval and
        checkpoints excluded (:class:`~sparsetrain.train_clock.TrainClock`)."""
        return self.clock.seconds

    @train_seconds.setter
    def train_seconds(self, value: float) -> None:
        self.clock.seconds = value

    def _sync_device(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _schedule_end(self) -> float:
        """Where the lr reaches its floor: max_steps, or max_seconds by time."""
        return float(self.cfg.max_seconds if self.cfg.schedule_by == "time" else self.cfg.max_steps)

    def _setup_clock_and_schedule(self) -> None:
        c = self.cfg
        if self.dist.enabled and (c.schedule_by == "time" or c.eval_every_seconds):
            # each process reads its own clock: lrs (and evaluation points) would differ between replicas
            raise ConfigError("schedule_by = time and eval_every_seconds are not available with several processes yet")
        self.clock = TrainClock(c.startup_steps, sync=self._sync_device)
        self.lr_schedule = LRSchedule.from_settings(c.schedule_by, c.lr, c.warmup_steps, c.min_lr_ratio, self._schedule_end())
        self._next_eval_seconds = c.eval_every_seconds  # eval_every_seconds: the next due point

    def _refuse_changed_optimizer_settings(self, state: dict, out: Path) -> None:
        """The optimizer's loaded param groups hold the settings it was saved with: a
        resumed config that changes one would train with the old value under a config
        recording the new, so it is refused by name (another optimizer altogether is
        refused where its state is loaded)."""
        saved = state.get("train_config", {}).get("training", {})
        for name in resume_fixed_fields(saved.get("optimizer", "adamw")):
            if name in saved and saved[name] != getattr(self.cfg, name):
                raise CheckpointError(f"cannot resume {out} with {name}={getattr(self.cfg, name)!r}: it trained with "
                                      f"{saved[name]!r}, which its optimizer state keeps (start a new run, or "
                                      f"--init-from it, to change the optimizer)")

    def _check_changed_run_settings(self, state: dict, out: Path) -> None:
        """A resumed config may change the batch (``batch_size``, ``grad_accum``: a batch-size
        ramp), which is announced on stdout and as a ``resume_change`` row in metrics.jsonl;
        it may not change ``seed``, which sets the data order of every step, so the run's
        config would record a seed its first steps did not read."""
        saved = state.get("train_config", {})
        seed = saved.get("run", {}).get("seed", self.cfg.seed)
        if seed != self.cfg.seed:
            raise CheckpointError(f"cannot resume {out} with seed={self.cfg.seed}: it trained with seed {seed}, which "
                                  "sets its data order (start a new run, or --init-from it, for another seed)")
        changes = {name: [saved["training"][name], getattr(self.cfg, name)] for name in ("batch_size", "grad_accum")
                   if name in saved.get("training", {}) and saved["training"][name] != getattr(self.cfg, name)}
        # Other tokens (new files, another selection, a changed split) are allowed, as FIRE's continual
        # step needs, but said: the data order from here is another corpus's, and earlier evals read
        # another val. Compared with the checkpoint's record, not data.json: a run rewrites that as it
        # starts, so after a resume on new data killed before its first checkpoint it names the new data.
        saved_data = state.get("data") or read_data_record(out)  # none in checkpoints written before the record
        if saved_data and data_record_changes(saved_data, self.data_record):
            changes["data"] = [saved_data, self.data_record]
        if changes and self.dist.is_main:
            self._pending_rows.append({"kind": "resume_change", "step": self.step, "changes": changes})
            if self.verbose:
                said = ", ".join(f"the data changed ({'; '.join(data_record_changes(*v))})" if k == "data"
                                 else f"{k} {v[0]} -> {v[1]}" for k, v in changes.items())
                print(f"step {self.step}: {said} ({self.tokens_per_step:,} tokens/step from here)", flush=True)

    def _restore_clock_and_schedule(self, state: dict, out: Path) -> None:
        """A resumed run keeps its start-up count and its lr schedule; a new max_steps (or
        max_seconds, by time) extends the schedule without a jump (:meth:`LRSchedule.extend`),
        announced on stdout and as a ``lr_schedule`` row in metrics.jsonl."""
        c = self.cfg
        self.clock.startup_seconds = float(state.get("startup_seconds", 0.0))
        if state.get("lr_schedule"):
            schedule = LRSchedule.from_state_dict(state["lr_schedule"])
        else:  # a checkpoint written before the schedule was saved: its config's steps schedule
            t = state["train_config"]["training"]
            schedule = LRSchedule.from_settings("steps", t["lr"], t["warmup_steps"], t["min_lr_ratio"], t["max_steps"])
        diff = schedule.check_same_shape(c.schedule_by, c.lr, c.warmup_steps, c.min_lr_ratio)
        if diff:
            raise CheckpointError(f"cannot resume {out} with another lr schedule: {diff} "
                                  "(a resume keeps its schedule; a new max_steps or max_seconds extends it)")
        seconds = self.clock.seconds_after_startup
        change = schedule.extend(self.step if c.schedule_by == "steps" else seconds, self._schedule_end())
        self.lr_schedule = schedule
        if c.eval_every_seconds:
            self._next_eval_after(seconds)
        if change and self.dist.is_main:
            self._pending_rows.append({"kind": "lr_schedule", "step": self.step, "change": change,
                                          "schedule": schedule.state_dict()})
            if self.verbose:
                print(f"step {self.step}: {change}", flush=True)

    def _lr_for_step(self) -> float:
        """The lr of step ``self.step``: by steps a function of the step; by time, of the
        training seconds after start-up expected at the end of this step, read from the
        host clock without a device sync (see :mod:`sparsetrain.train_clock`)."""
        seconds = self.clock.expected_after_next_step() if self.cfg.schedule_by == "time" else 0.0
        return self.lr_schedule.lr(self.step, seconds)

    def _out_of_time(self) -> bool:
        return self.cfg.max_seconds > 0 and self.clock.seconds_after_startup >= self.cfg.max_seconds

    def _eval_due_by_time(self) -> bool:
        """Has the next ``eval_every_seconds`` point of training after start-up passed?
        (Each evaluation moves it on: :meth:`_next_eval_after`.)"""
        return bool(self.cfg.eval_every_seconds) and self.clock.seconds_after_startup >= self._next_eval_seconds

    def _next_eval_after(self, seconds: float) -> None:
        """Make the next time-based evaluation due at the first multiple of
        ``eval_every_seconds`` past ``seconds``."""
        every = self.cfg.eval_every_seconds
        self._next_eval_seconds = (math.floor(seconds / every) + 1) * every

    @functools.cached_property
    def _val_tokens_per_byte(self) -> float | None:
        """Tokens per UTF-8 byte of the eval windows' targets (all ranks' windows), or None
        without a tokenizer (a .bin corpus given without one)."""
        if self.corpus.tokenizer is None:
            return None
        c = self.cfg
        windows = val_batches(self.corpus.val, c.eval_batches, c.batch_size, c.model.seq_len)
        return tokens_per_byte(torch.cat([y for _, y in windows]).numpy(), self.corpus.tokenizer)

    def _eval_row(self, val: float, extra: dict | None = None) -> dict:
        """The metrics.jsonl row of an evaluation: val loss (nats/token) and bits per byte,
        at the step and the training seconds with and without start-up, plus ``extra``."""
        row = {"kind": "eval", "step": self.step, "val_loss": val, "train_seconds": round(self.train_seconds, 3),
               "startup_seconds": round(self.clock.startup_seconds, 3),
               "train_seconds_after_startup": round(self.clock.seconds_after_startup, 3)}
        if self._val_tokens_per_byte is not None:
            row["val_bpb"] = round(bits_per_byte(val, self._val_tokens_per_byte), 5)
        return {**row, **(extra or {})}

    @_under_kernel_policy
    def code_compile_metrics(self, val: float) -> dict[str, float]:
        """``code_compile_rate`` and its Wilson 95% bounds ``code_compile_low/high`` over
        ``eval_code_samples`` continuations of the held-out ``.py`` files
        (:func:`~sparsetrain.evaluate.code_compile_rate`), sampled on rank 0; empty
        when off, on other ranks, or when ``val`` (the eval's loss) is not finite.
        Every rank calls it: under FSDP the weights are first gathered to rank 0
        into an unsharded copy of the model."""
        c = self.cfg
        if not c.eval_code_samples or not math.isfinite(val):
            return {}
        model: nn.Module = self.model
        if self.sharded:
            full = self.full_model_state()
            if not self.dist.is_main:
                return {}
            with torch.random.fork_rng(devices=[]):  # the copy's initialisation draws nothing from the run's stream
                model = build_model(c.model, self.kernel_policy)
            model.load_state_dict(full)
            model.to(self.device)
        elif not self.dist.is_main:
            return {}
        # a 2:4 FFN's random patterns drawn while sampling leave the training's RNGs as they were
        with self.autocast(), rng_untouched(self.device, module_generators({"model": model})):
            r = code_compile_rate(model, self.corpus.tokenizer, self.code_files, c.eval_code_samples, seed=c.seed)
        return {"code_compile_rate": r.rate, "code_compile_low": r.low, "code_compile_high": r.high}

    # ------------------------------------------------------------------ steps

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    @_under_kernel_policy
    def forward_backward(self, x: torch.Tensor, y: torch.Tensor, loss_scale: float = 1.0, sync: bool = True,
                         labels: torch.Tensor | None = None) -> torch.Tensor:
        """One micro-batch: the objective's forward, ``(loss * loss_scale).backward()``
        (timed), its metrics into the log window. Returns the reported loss
        (detached, never read here). ``sync=False`` skips the gradient reduction
        (DDP's all-reduce, FSDP's reduce-scatter), for all but the last
        micro-batch of an accumulation. ``labels``: the kinds of document of the
        targets (:meth:`_target_labels`); with an objective that hands out its keep
        mask, the kept and total targets per kind are counted on the device."""
        n_valid = _valid_targets(y)
        x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
        no_sync = P.no_sync(self._grad_sync_module) if not sync else contextlib.nullcontext()
        with no_sync:
            with self.autocast():
                out = self.train_module(x, y, n_valid)
            with self._timed_backward() as timing:
                (out.loss * loss_scale).backward()
        metrics = {**out.metrics, "backward_ms": timing[0]}
        if labels is not None and out.keep is not None:
            metrics[LABEL_COUNTS] = label_counts(labels, out.keep, len(self.token_labels.names))
        self.metric_window.add(metrics)
        return out.lm_loss

    def _batch(self, micro: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Micro-batch ``micro`` of step ``self.step``: built here, or taken from the
        async loader (restarted whenever the step sequence jumps, as after a resume)."""
        c = self.cfg
        self._batch_key = (self.step, micro)  # which windows: what a reference_losses sidecar is read by
        if not c.use_async_loader and not c.data_on_the_fly:
            return train_batch(self.corpus.train, c.batch_size, c.model.seq_len, seed=c.seed, step=self.step,
                               micro=micro, rank=self.dist.rank, world_size=self.dist.world_size)
        if self.loader is None or self._loader_next != (self.step, micro):
            self.close_loader()
            self.loader = make_loader(self.corpus, c.batch_size, c.model.seq_len, c.seed, self.dist.rank,
                                      self.dist.world_size, self.step, c.grad_accum, self.device, c.use_async_loader,
                                      c.async_n_workers, c.async_prefetch_size, on_the_fly=c.data_on_the_fly)
        x, y = self.loader.next()
        self._loader_next = (self.step, micro + 1) if micro + 1 < c.grad_accum else (self.step + 1, 0)
        return x, y

    def close_loader(self) -> None:
        """Stop the async loader's workers, if any."""
        if self.loader is not None:
            self.loader.close()
            self.loader = None

    def _fire(self) -> None:
        """FIRE-reinitialise every Linear and restart AdamW's moments (they
        describe the old weights); the stats go to metrics.jsonl."""
        stats = fire.reinitialize(self.model)
        self.optimizer.state.clear()
        if self.dist.is_main:
            row = {"kind": "fire", "step": self.step, "layers": len(stats),
                   "max_orthogonality_error": max(s["orthogonality_error"] for s in stats),
                   "svd_fallbacks": sum(s["method"] == "svd" for s in stats),
                   "mean_relative_change": sum(s["relative_change"] for s in stats) / len(stats)}
            self._pending_rows.append(row)  # logged with the step's window
            if self.verbose:
                print(f"step {self.step}: FIRE reinitialised {len(stats)} layers "
                      f"(max orthogonality error {row['max_orthogonality_error']:.2e})", flush=True)

    @contextlib.contextmanager
    def _timed_backward(self):
        """Time a backward pass: CUDA events (read when the log window is), or the
        host clock. Yields a one-item list that holds the timing afterwards."""
        timing: list = [None]
        if self.device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            yield timing
            end.record()
            timing[0] = ElapsedMs(start, end)
        else:
            t0 = time.perf_counter()
            yield timing
            timing[0] = (time.perf_counter() - t0) * 1e3

    def _priming_ratios(self, n_valid: int | None = None) -> tuple[float, ...]:
        """The keep ratios :meth:`_prime_objective` runs the objective at (none: no
        priming). ``n_valid``: the micro-batch's targets; with it, where the
        kept-query attention kernels will run (CUDA, Collider, the final keep ratio
        within the kernel policy's ``kept_kernel_max_keep``), one more ratio whose
        kept count the kernels compile apart from the final one
        (:func:`~sparsetrain.collider.triton_attention.other_specialization_count`):
        a warmup passes through counts of both kinds."""
        c = self.cfg
        if not (c.prime_startup and c.startup_steps > 0 and self.selector is not None
                and self.objective.kept_count_shapes):
            return ()
        ratios = self.selector.priming_ratios()
        if ratios and n_valid and c.use_collider and self._kept_kernels_may_run():
            from .collider.triton_attention import other_specialization_count
            from .selection.select import budget

            twin = other_specialization_count(budget(n_valid, ratios[-1]), n_valid)
            if twin is not None and twin / n_valid <= self.kernel_policy.kept_kernel_max_keep:
                ratios = (*ratios, twin / n_valid)
        return ratios

    def _kept_kernels_may_run(self) -> bool:
        """Whether Collider's kept-query attention kernels can run in this process: a
        CUDA device with Triton (their own test, ``kept_kernel_ok``, also asks for a
        16-bit dtype and a power-of-two head size, which the trainer's models have)."""
        from .collider import triton_attention

        return self.device.type == "cuda" and triton_attention.available()

    def _prime_objective(self, x: torch.Tensor, y: torch.Tensor) -> tuple[float, ...]:
        """Run the objective's forward and backward on the micro-batch ``x, y`` once at
        each keep ratio of :meth:`TokenSelector.priming_ratios`, and discard it all.
        Returns those ratios (empty: nothing to prime, nothing run).

        Why: where the kept count changes during a run (a selection warmup, an
        adaptive threshold), training compiles again: torch.compile recompiles
        Collider's backward pieces (or the network, for batch splitting) with a
        symbolic kept count the first time the count changes, and the kept-query
        attention kernels compile and tune the first time the kept fraction falls to
        the kernel policy's ``kept_kernel_max_keep``. After the start-up those
        compiles count as training time, so an arm with a warmup would pay inside its
        time budget what an arm keeping its final ratio from the first step pays in
        its start-up. Priming moves them into the start-up (``prime_startup``).

        It runs in the process's first step (timed as start-up by the clock), after
        that step's optimizer step and before the schedules advance: that step ran
        and compiled exactly as without priming, and every module is still in the
        state the step found it in (a 2:4 FFN's dense warmup, for one). Nothing of it
        remains: the gradients are put back as they were (none, after the optimizer
        step) and no optimizer step follows; the selector selects by top-k at the
        forced ratio and is restored (:meth:`TokenSelector.forced_ratio`: step
        count, generators, threshold controller, last mask and stats); the torch
        (CPU and this device), numpy and Python RNGs and the modules' own generators
        are restored; no metric is recorded; the data order is untouched (the
        step's last micro-batch is reused)."""
        n_valid = _valid_targets(y)
        ratios = self._priming_ratios(n_valid)
        if not ratios:
            return ()
        x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
        params = list({id(p): p for p in [*self.train_module.parameters(),
                                          *(q for g in self.optimizer.param_groups for q in g["params"])]}.values())
        grads = [p.grad for p in params]
        ffns = [(m.track_stats, m.last_stats, m.last_backend) for m in self.sparse_ffns]
        host_rngs = np.random.get_state(), random.getstate()
        # DDP: gradients kept local (no collective). FSDP reduces as usual: its no-sync mode would
        # keep the unsharded gradients and add them to the next step's
        local = contextlib.nullcontext() if self.sharded else P.no_sync(self._grad_sync_module)
        try:
            with rng_untouched(self.device, module_generators({"train": self.train_module})), local:
                for r in ratios:
                    for p in params:
                        p.grad = None
                    with self.selector.forced_ratio(r):
                        with self.autocast():
                            out = self.train_module(x, y, n_valid)
                        out.loss.backward()
                    del out
        finally:
            for p, g in zip(params, grads):
                p.grad = g
            for m, (track, stats, backend) in zip(self.sparse_ffns, ffns):
                m.track_stats, m.last_stats, m.last_backend = track, stats, backend
            np.random.set_state(host_rngs[0])
            random.setstate(host_rngs[1])
        if self.verbose:
            print(f"start-up: primed the objective at keep ratios {', '.join(f'{r:.4g}' for r in ratios)}", flush=True)
        return ratios

    def _set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            value = lr * group.get("lr_scale", 1.0)  # Muon's groups run at muon_lr / lr of it
            if isinstance(group["lr"], torch.Tensor):  # a step graph's: filled in place, the graph reads it
                group["lr"].fill_(value)
            else:
                group["lr"] = value

    def _optimizer_step(self) -> torch.Tensor:
        """Clip, step and clear the gradients; returns the gradient norm (a device tensor)."""
        c = self.cfg
        if c.grad_clip > 0:
            params = [p for group in self.optimizer.param_groups for p in group["params"]]  # MTP heads too
            gnorm = P.clip_grad_norm(params, c.grad_clip)  # sharded gradients: the norm over all ranks' shards
        else:
            gnorm = torch.zeros((), device=self.device)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return gnorm

    def _graph_due(self) -> bool:
        """Whether this step belongs to the step graph: warm-up steps and captured ones
        start after this process's start-up (its first step, which primes, included)
        and any selection warmup."""
        if self.step_graph is None or self.clock.in_startup or self._prime_pending:
            return False
        return self.selector is None or self.step >= self.selector.warmup_steps

    def _graphed_step(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """This step on the step graph's static inputs: one of its eager warm-up
        steps (the recorded body run now, so that whatever it compiles or tunes for
        those inputs is done before the capture), or a replay (captured first if it
        is not yet). Its metrics go into the window. Returns (summed loss, grad
        norm), or None where the step must run eagerly (a batch whose count of valid
        targets differs from the capture's)."""
        c, g = self.cfg, self.step_graph
        batches = [self._batch(m) for m in range(c.grad_accum)]
        n_valid = tuple(_valid_targets(y) for _, y in batches)
        if g.captured and n_valid != g.n_valid:
            self._replay_batches = batches
            return None
        # one buffer per micro-batch and kind, each at its own address (no offset views into a shared one)
        inputs = {}
        for m, (x, y) in enumerate(batches):
            inputs[f"x{m}"], inputs[f"y{m}"] = x, y
            if isinstance(self.reference, ReferenceLosses):
                inputs[f"ref{m}"] = self._sidecar_for(m)
            if self.token_labels is not None:
                inputs[f"labels{m}"] = self._target_labels(m)
        g.set_inputs(**inputs)
        if g.eager_steps > 0:
            with g.eager_context():
                total, metrics, gnorm = self._graph_body(n_valid)
            for m in metrics:
                self.metric_window.add(m)
            return total, gnorm
        if not g.captured:
            g.n_valid = n_valid
            self._sync_device()
            t0 = time.perf_counter()
            make_capturable(self.optimizer, self.device)
            self._set_lr(self._lr_now)
            generators = self.selector.generators() if self.selector is not None else ()
            g.capture(functools.partial(self._graph_body, n_valid), generators)
            self._sync_device()
            g.capture_seconds = time.perf_counter() - t0
            self.clock.count_as_startup(g.capture_seconds)
            self._uncounted_seconds += g.capture_seconds  # out of the log window's tokens/s too
            self._pending_rows.append({"kind": "cuda_graph", "step": self.step, "capture_seconds": round(g.capture_seconds, 3)})
            if self.verbose:
                print(f"step {self.step}: captured the training step in a CUDA graph ({g.capture_seconds:.1f} s, "
                      "counted as start-up)", flush=True)
        total, metrics, gnorm = g.replay()
        for m in metrics:
            self.metric_window.add(m)
        return total, gnorm

    def _sidecar_for(self, micro: int) -> torch.Tensor:
        self._batch_key = (self.step, micro)
        return self._sidecar_nll()

    def _graph_body(self, n_valid: tuple[int, ...]) -> tuple[torch.Tensor, list[dict], torch.Tensor]:
        """What the step graph records: every micro-batch's forward and backward on the
        static inputs, then the optimizer step. Returns (summed loss, each micro-step's
        metrics, grad norm): outputs every replay rewrites."""
        c, inputs = self.cfg, self.step_graph.inputs
        total = torch.zeros((), device=self.device)
        metrics = []
        try:
            for micro in range(c.grad_accum):
                self._graph_micro = micro
                with self.autocast():
                    out = self.train_module(inputs[f"x{micro}"], inputs[f"y{micro}"], n_valid[micro])
                (out.loss * (1.0 / c.grad_accum)).backward()
                m = dict(out.metrics)
                if f"labels{micro}" in inputs and out.keep is not None:
                    m[LABEL_COUNTS] = label_counts(inputs[f"labels{micro}"], out.keep, len(self.token_labels.names))
                metrics.append(m)
                total += out.lm_loss
        finally:
            self._graph_micro = None
        return total, metrics, self._optimizer_step()

    def _eager_micro_steps(self, batches: list[tuple[torch.Tensor, torch.Tensor]] | None = None
                           ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """Every micro-batch's forward and backward, run now. Returns (summed loss,
        the last micro-batch). ``batches``: already read (else read here)."""
        c = self.cfg
        total = torch.zeros((), device=self.device)
        for micro in range(c.grad_accum):
            x, y = batches[micro] if batches is not None else self._batch(micro)
            self._batch_key = (self.step, micro)
            total += self.forward_backward(x, y, 1.0 / c.grad_accum, sync=micro == c.grad_accum - 1,
                                           labels=self._target_labels(micro))
        return total, (x, y)

    @_under_kernel_policy
    def train_step(self) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimizer step at ``self.step``. Returns (mean loss, grad norm) as tensors.
        With ``cuda_graph``, after start-up a few eager steps, then the step replayed
        from one CUDA graph (:mod:`sparsetrain.step_graph`)."""
        c = self.cfg
        lr = self._lr_now = self._lr_for_step()
        self._set_lr(lr)
        log_step = (self.step + 1) % c.log_every == 0
        for m in self.sparse_ffns:  # 2:4 statistics cost extra reductions: only on steps that get logged
            m.track_stats = log_step and m.sparse
        report_every = c.eval_every or c.max_steps  # 0 (no step limit, no step-counted evaluations): never
        report_now = bool(self.model.config.hyper_connections and report_every and (self.step + 1) % report_every == 0)
        graph_due = self._graph_due()
        # a hyper-connection report reads this step's gradients: its step runs eagerly
        graphed = self._graphed_step() if graph_due and not report_now else None
        if graphed is not None:
            total, gnorm = graphed
        else:
            batches, self._replay_batches = self._replay_batches, None
            total, (x, y) = self._eager_micro_steps(batches)
            if report_now:
                # analysed here, while the mixing parameters still hold this step's gradients
                self.hyper_report = hyper.report(self.model, x.to(self.device)[:2])
            gnorm = self._optimizer_step()
        extras = {}
        stats = [m.last_stats for m in self.sparse_ffns if m.track_stats and m.last_stats]
        if stats:  # device tensors, averaged over layers here and read when the step is logged
            extras["sparse24"] = {**tensor_means(stats), "backend": self.sparse_ffns[0].last_backend}
        for m in self.sparse_ffns:  # off again, so that an evaluation after this step counts nothing
            m.track_stats = False
        loss = D.all_reduce_mean(total / c.grad_accum, self.dist)
        self.metric_window.end_step(self.step + 1, loss, gnorm.detach(), lr * self.optimizer.param_groups[0].get("lr_scale", 1.0),
                                    extras)
        if self._prime_pending:  # this process's first step (never a graphed one, see _graph_due): part of its start-up
            self._prime_pending = False
            self._prime_objective(x, y)
        self.step += 1
        self._set_schedules(self.step)
        if c.fire_at_step and self.step == c.fire_at_step:
            self._fire()
        return loss, gnorm.detach()

    @torch.no_grad()
    @_under_kernel_policy
    def evaluate(self) -> float:
        """Mean val cross-entropy over the fixed val windows (all ranks together):
        the mean of the ``eval_batches`` batch means, whatever the number of processes.
        Under FSDP a rank with fewer batches than others runs padding forwards that
        count with weight zero, so that every rank joins every sharded forward.
        Random draws (a 2:4 FFN's random patterns) leave the training's RNGs as they
        were: training does not depend on when it is evaluated."""
        self.train_module.eval()
        s = torch.zeros(2, device=self.device, dtype=torch.float64)
        with rng_untouched(self.device, self._module_generators()):
            for x, y in self._val:
                with self.autocast():
                    _, loss = self.model(x.to(self.device), y.to(self.device))
                s[0] += loss.double()
                s[1] += 1
            padding = torch.zeros((self.cfg.batch_size, self.cfg.model.seq_len), dtype=torch.long, device=self.device)
            for _ in range(self._eval_padding):
                with self.autocast():
                    self.model(padding)
        self.train_module.train()
        if self.dist.enabled:
            torch.distributed.all_reduce(s)
        return float(s[0] / s[1])

    def _kept_note(self) -> str:
        """Which checkpoint survives a failure now, for error messages."""
        if self.last_saved_step is None:
            return "no checkpoint was written before it"
        return f"the last good checkpoint (step {self.last_saved_step}) in {self.out_dir} is kept"

    def interrupted(self) -> RunInterrupted:
        """The exception a Ctrl-C in :meth:`fit` becomes: what is kept and how to go on."""
        return RunInterrupted(self.interrupted_note(), self.out_dir,
                              self.last_saved_step if self.cfg.save_checkpoints else None)

    def interrupted_note(self) -> str:
        """What an interrupted run leaves and how to continue it (the CLI's Ctrl-C line)."""
        where = self.out_dir
        if not self.cfg.save_checkpoints:
            return f"this run saves no checkpoint; its log is {where / METRICS_NAME}"
        if self.last_saved_step is None:
            return f"before its first checkpoint; sparsetrain train --resume {where} starts it again from step 0"
        return (f"the step-{self.last_saved_step} checkpoint in {where} is intact; "
                f"continue with sparsetrain train --resume {where}")

    def _diverged(self, what: str) -> DivergedError:
        advice = f"; continue from it with --resume {self.out_dir} and a lower --lr" if self.last_saved_step is not None else ""
        return DivergedError(f"training diverged: {what}; {self._kept_note()}{advice}")

    def _check_finite_weights(self) -> None:
        """Refuse to save NaN/Inf weights (one host sync; under FSDP a collective,
        every rank checking its shards)."""
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        if not P.all_finite(params):
            raise self._diverged(f"the weights hold NaN or Inf after step {self.step} (not saved)")

    def _run_state(self) -> dict:
        """What a checkpoint holds besides the model and optimizer tensors."""
        return {
            "step": self.step,
            "train_seconds": self.train_seconds,
            "startup_seconds": self.clock.startup_seconds,
            "lr_schedule": self.lr_schedule.state_dict(),
            "selector": self.selector.state_dict() if self.selector is not None else None,
            # random 2:4 patterns and ResNet-BK's routing noise draw from these. Every process
            # seeds alike and draws tensors of the same shapes, so rank 0's states are every rank's
            "rng": capture_rng_state(self.device, self._module_generators()),
            "mtp": self.mtp.state_dict() if self.mtp is not None else None,  # generate ignores the heads
            "model_config": asdict(self.cfg.model),
            "train_config": self.cfg.to_dict(),
            "data": self.data_record,  # what a resume compares its data with (data.json may be newer)
        }

    def _module_generators(self) -> dict[str, torch.Generator]:
        """The model's and the MTP heads' own generators, by name (:func:`~sparsetrain.checkpoint.module_generators`)."""
        return module_generators({"model": self.model, **({"mtp": self.mtp} if self.mtp is not None else {})})

    def full_model_state(self) -> dict[str, torch.Tensor]:
        """The model's whole state dict: under FSDP gathered from every rank's
        shards into rank 0's host memory (a collective: every rank calls it; the
        others get an empty dict); otherwise the model's own tensors."""
        if not self.sharded:
            return self.model.state_dict()
        return get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def save(self) -> None:
        """Checkpoint everything needed to continue exactly, each write verified,
        the previous checkpoint kept until the new one is. Replicated (one
        process, DDP): rank 0 writes ``ckpt.pt`` (model, AdamW state, step, ...),
        the one before it kept as ``ckpt.prev.pt``. FSDP: every rank writes its
        shards (:func:`~sparsetrain.sharded_checkpoint.save_sharded`; every rank
        must call this). Non-finite weights are never saved.

        The weights-only ``model.safetensors`` (rank 0, from the full state dict)
        is removed before the checkpoint is written and written after it, so it
        never holds a later step than the checkpoint: a crash or a full disk in
        between leaves the run without it, and ``generate``/``eval`` read the
        checkpoint instead (written first, the weights file would be newer than
        the checkpoint a failed save keeps)."""
        if self.sharded:
            self._save_sharded()
            return
        if not self.dist.is_main:
            return
        self._check_finite_weights()
        state = {"model": self.model.state_dict(), "optimizer": portable_optimizer_state(self.optimizer), **self._run_state()}
        try:
            remove_durably(self.out_dir / WEIGHTS_NAME)
            save_checkpoint(self.out_dir / CKPT_NAME, state)
        except OSError as e:
            raise CheckpointError(f"cannot write the step-{self.step} checkpoint in {self.out_dir}: "
                                  f"{e.strerror or e}; {self._kept_note()}") from e
        self.last_saved_step = self.step
        try:
            save_weights(self.out_dir / WEIGHTS_NAME, state["model"], state["model_config"], self.step)
        except (OSError, CheckpointError) as e:
            raise CheckpointError(self._weights_note(e)) from None

    def _log_error(self, e: OSError) -> CheckpointError:
        """A failed write of the run's log (a full disk): which file, what is kept, how to go on.
        A resume drops the log's rows past its checkpoint, a torn last line with them."""
        where = e.filename or self.out_dir / METRICS_NAME
        go_on = (f"; continue with sparsetrain train --resume {self.out_dir} once there is room"
                 if self.cfg.save_checkpoints else "")
        return CheckpointError(f"cannot write the run's log {where}: {e.strerror or e}; {self._kept_note()}{go_on}")

    def _weights_note(self, e: BaseException) -> str:
        why = f"{e.strerror or e}" if isinstance(e, OSError) else str(e)
        return (f"cannot write {WEIGHTS_NAME} at step {self.step} in {self.out_dir}: {why}; the step-{self.step} "
                f"checkpoint is written, and generate and eval read it instead; continue with "
                f"sparsetrain train --resume {self.out_dir}")

    def _save_sharded(self) -> None:
        self._check_finite_weights()
        full = self.full_model_state()  # a collective, before any rank can stop
        meta = self._run_state()
        error = None
        if self.dist.is_main:
            try:
                remove_durably(self.out_dir / WEIGHTS_NAME)
            except OSError as e:
                error = f"{e.strerror or e}"
        error = D.broadcast_object(error, self.dist)  # every rank stops alike
        try:
            if error is not None:
                raise CheckpointError(error)
            S.save_sharded(self.out_dir, self.model, self.optimizer, meta, self.step)
        except CheckpointError as e:
            raise CheckpointError(f"cannot write the step-{self.step} checkpoint in {self.out_dir}: {e}; "
                                  f"{self._kept_note()}") from None
        self.last_saved_step = self.step
        error = None
        if self.dist.is_main:
            try:
                save_weights(self.out_dir / WEIGHTS_NAME, full, meta["model_config"], self.step)
            except (OSError, CheckpointError) as e:
                error = self._weights_note(e)
        del full
        error = D.broadcast_object(error, self.dist)
        if error is not None:
            raise CheckpointError(error)

    # ------------------------------------------------------------------ loop

    def fit(self) -> TrainResult:
        """Train from ``self.step`` to ``max_steps`` (or ``max_seconds``).

        Every metric row is handed to the run's :class:`~sparsetrain.reporting.RunLog`
        (``metrics.jsonl``, and TensorBoard / W&B with ``report_to``); before each
        checkpoint the rows up to its step are written and fsynced, so the log
        never lags a checkpoint. A NaN or Inf loss, gradient norm, val loss or
        weight stops the run with :class:`DivergedError` naming the step, before
        anything non-finite is saved."""
        c = self.cfg
        result = TrainResult(out_dir=self.out_dir, steps_done=self.step)
        tokens_per_step = self.tokens_per_step
        if self.verbose:
            print(f"data: {self.corpus.description} (ready in {self.data_seconds:.1f} s)")
            print(
                f"model: {self.model.num_params() / 1e6:.2f}M params ({c.preset}), device {self.device}"
                f"{', bf16 autocast' if self.amp_dtype else ''}, {self.dist.world_size} process(es)"
            )
            if self.init_note:
                print(self.init_note)
            print(f"run dir: {self.out_dir}  ({tokens_per_step:,} tokens/step, {self._limits()})")
        bar = self._progress_bar()
        log = RunLog(self.out_dir, c.report_to, c.to_dict(), first_step=self.step) if self.dist.is_main else None

        def write(row: dict) -> None:
            if log is not None:
                try:
                    log.log(row)
                except OSError as e:
                    raise self._log_error(e) from None

        def write_pending() -> None:
            for row in self._pending_rows:
                write(row)
            self._pending_rows.clear()

        write_pending()  # a resume's lr-schedule change, after the rows its checkpoint vouches for
        try:
            if self.step == 0:  # the starting point of the val curve
                val = self.evaluate()
                result.val_losses[0] = val
                write(self._eval_row(val, self.code_compile_metrics(val)))
                if not math.isfinite(val):
                    raise self._diverged(f"val loss {val} at step 0")
                self._say(bar, f"step 0: val loss {val:.4f}")
            fit_start_seconds, window_t0, window_tokens = self.train_seconds, time.perf_counter(), 0
            self.clock.run()
            # a run that ended on its time budget has nothing left: a resume must not train a step past it
            ended_by_time = self._out_of_time()
            while not ended_by_time and (not c.max_steps or self.step < c.max_steps):
                try:
                    # the step's activations scale with the micro-batch: the one setting to name
                    with memory_named_by_batch(c.batch_size, c.model.seq_len, f"step {self.step + 1} does not fit"):
                        self.train_step()  # its loss and metrics wait in self.metric_window until logged
                except DivergedError as e:  # raised inside the step (token scores of NaN logits)
                    raise self._diverged(f"step {self.step + 1}: {e}") from None
                window_t0 += self._uncounted_seconds
                self._uncounted_seconds = 0.0
                if self.clock.step_done():  # start-up measured (one sync)
                    write({"kind": "startup", "step": self.step, "steps": c.startup_steps,
                           "startup_seconds": round(self.clock.startup_seconds, 3)})
                window_tokens += tokens_per_step
                last = bool(c.max_steps) and self.step >= c.max_steps
                out_of_time = self._out_of_time()
                eval_now = last or out_of_time or (c.eval_every and self.step % c.eval_every == 0) or self._eval_due_by_time()
                save_now = c.save_checkpoints and (eval_now and not c.ckpt_every or c.ckpt_every and self.step % c.ckpt_every == 0
                                                   or last or out_of_time)
                # a checkpoint step is always a log step: the log must hold every row up to it
                if self.step % c.log_every == 0 or last or out_of_time or save_now:  # one host sync per log window
                    if self.device.type == "cuda":
                        torch.cuda.synchronize(self.device)
                    now = time.perf_counter()
                    self.clock.synced()
                    tps = window_tokens / max(now - window_t0, 1e-9)
                    rows = self.metric_window.rows(tokens_per_step, tps)
                    diverged = None
                    for row in rows:
                        result.train_losses[row["step"]] = row["loss"]
                        write(row)
                        if diverged is None and not (math.isfinite(row["loss"]) and math.isfinite(row["grad_norm"])):
                            diverged = f"loss {row['loss']}, grad norm {row['grad_norm']} at step {row['step']}"
                    write_pending()  # e.g. FIRE's stats of a step in this window
                    if diverged is not None:
                        raise self._diverged(diverged)
                    self._report(bar, result.train_losses[self.step], tps, len(rows), rows[-1].get("kept_fraction"))
                    window_t0, window_tokens = now, 0
                pause_t0 = time.perf_counter()  # eval and checkpoint time stay out of tokens/s
                if eval_now or save_now:
                    self.clock.pause()  # waits for the device: its queued steps count as training
                if eval_now:
                    if c.eval_every_seconds:
                        # due again after the clock the row records: the device's queued steps (counted by the
                        # pause) and the logging can carry it past the next due point, which would then
                        # evaluate again at once, two rows in one interval
                        self._next_eval_after(self.clock.seconds_after_startup)
                    val = self.evaluate()
                    result.val_losses[self.step] = val
                    write(self._eval_row(val, self.code_compile_metrics(val)))
                    if not math.isfinite(val):
                        raise self._diverged(f"val loss {val} at step {self.step}")
                    self._say(bar, f"step {self.step}: val loss {val:.4f}")
                    if self.hyper_report is not None:
                        r = self.hyper_report
                        write({"kind": "hyper", "step": self.step, "healthy": r["healthy"], "problems": r["problems"],
                               "composed_res_gain": r["composed_res_gain"], "layers": r["layers"]})
                        if not r["healthy"]:
                            self._say(bar, f"step {self.step}: hyper-connections unhealthy: {'; '.join(r['problems'])}")
                        self.hyper_report = None
                if save_now:
                    if log is not None:
                        try:  # every row up to this step on disk before the checkpoint that vouches for them
                            log.sync()
                        except OSError as e:
                            raise self._log_error(e) from None
                    self.save()
                if out_of_time:
                    self._say(bar, f"stopping at step {self.step}: max_seconds={c.max_seconds} reached")
                    break
                self.clock.run()
                window_t0 += time.perf_counter() - pause_t0
            self.clock.pause()
        finally:
            self.close_loader()
            if bar is not None:
                bar.close()
            close_error = None
            if log is not None:
                try:
                    log.close()
                except OSError as e:  # raised below when nothing else is: an error in flight says more
                    close_error = e
        if close_error is not None:
            raise self._log_error(close_error)
        result.steps_done = self.step
        result.train_seconds = self.train_seconds
        result.startup_seconds = self.clock.startup_seconds
        fit_seconds = self.train_seconds - fit_start_seconds
        done = len(result.train_losses)
        result.tokens_per_second = done * tokens_per_step / fit_seconds if fit_seconds > 0 else 0.0
        if self.dist.is_main:
            plot_loss_curve(self.out_dir / METRICS_NAME, self.out_dir / "loss.png", f"{c.preset} - {self.out_dir.name}")
            if self.verbose:
                where = self.out_dir / (S.SHARDED_DIR if self.sharded else CKPT_NAME)
                saved = f", checkpoint {where}" if c.save_checkpoints else ""
                print(f"done: {self.step} steps, {result.tokens_per_second:,.0f} tokens/s; "
                      f"loss curve {self.out_dir / 'loss.png'}{saved}")
        return result

    def _progress_bar(self):
        if not (self.verbose and sys.stderr.isatty()):
            return None
        from tqdm import tqdm

        return tqdm(total=self.cfg.max_steps or None, initial=self.step, unit="step", dynamic_ncols=True)

    def _report(self, bar, loss: float, tps: float, n_steps: int, kept_fraction: float | None) -> None:
        kept = {} if kept_fraction is None else {"kept": f"{kept_fraction:.0%}"}
        if bar is not None:
            bar.update(n_steps)
            bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tps:,.0f}", **kept)
        elif self.verbose:
            c = self.cfg
            etas, step, budget = [], f"step {self.step}", ""
            if c.max_steps:
                etas.append((c.max_steps - self.step) * self.tokens_per_step / max(tps, 1e-9))
                step += f"/{c.max_steps}"
            if c.max_seconds:
                seconds = self.clock.seconds_after_startup
                etas.append(max(c.max_seconds - seconds, 0.0))
                budget = f"  {seconds:.1f}/{c.max_seconds:g} s"
            extra = f"  kept {kept['kept']}" if kept else ""
            print(f"{step}  loss {loss:.4f}{extra}  {tps:,.0f} tok/s{budget}  ETA {min(etas):.0f}s", flush=True)

    def _limits(self) -> str:
        """Where the run stops: a step, a time budget, or whichever comes first."""
        c = self.cfg
        seconds = f"{c.max_seconds:g} s of training after start-up"
        if not c.max_steps:
            return f"from step {self.step} for {seconds}"
        if c.max_seconds:
            return f"steps {self.step} -> {c.max_steps} or {seconds}, whichever comes first"
        return f"steps {self.step} -> {c.max_steps}"

    def _say(self, bar, message: str) -> None:
        if not self.verbose:
            return
        if bar is not None:
            bar.write(message)
        else:
            print(message, flush=True)


def train(cfg: TrainConfig, resume: str | Path | None = None, verbose: bool = True) -> TrainResult:
    """Train (or resume) a run and tear down the process group afterwards: after
    a barrier when it ended normally, without one when it leaves on an
    exception (a peer may never reach the barrier)."""
    ok, trainer = False, None
    try:
        trainer = Trainer(cfg, resume=resume, verbose=verbose)
        result = trainer.fit()
        ok = True
        return result
    except KeyboardInterrupt:
        if trainer is None:
            raise
        raise trainer.interrupted() from None
    finally:
        D.shutdown_distributed(synchronize=ok)

