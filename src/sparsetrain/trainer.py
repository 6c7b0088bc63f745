"""The training loop: one readable loop, with DDP, grad accumulation, bf16
autocast, eval, metrics, atomic checkpoints and exact resume.

Exact resume holds because nothing in a step depends on hidden state: the
batch of step ``s`` is a pure function of ``(seed, s, micro, rank)``, the LR a
function of ``s``, and the checkpoint holds the model and AdamW state.
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

from . import distributed as D
from . import fire, hyper
from .checkpoint import (CKPT_NAME, PREVIOUS_CKPT_NAME, WEIGHTS_NAME, atomic_write_bytes, atomic_write_text,
                         load_checkpoint_from, remove_partial_writes, save_checkpoint, save_weights)
from .config import ModelConfig, TrainConfig, dumps_toml
from .data import TokenizedCorpus, load_corpus, train_batch, val_batches
from .loader import make_loader
from .errors import CheckpointError, ConfigError, DivergedError
from .generate import load_model
from .model import GPT, IGNORE_INDEX, build_model
from .mtp import MTPHeads, kept_rows_loss, sequential_backward
from .sparse24.ffn import Sparse24FFN, cuda_graphs_ok, prepare_ffns
from .bk.model import ResNetBK
from .collider import ColliderModel, masked_cross_entropy
from .collider import filter as collider_filter
from .selection import CGGRLoss, CGGRModel, TokenSelector, create_truncated_router
from .optim import lr_at, make_optimizer, step_counted
from .plotting import plot_loss_curve
from .reporting import METRICS_NAME, RunLog, sinks, truncate_metrics

CONFIG_NAME = "config.toml"
CONFIG_HEADER = ("# The resolved config of this run. `sparsetrain train --config` on this file starts a new run\n"
                 "# in a new folder (out_dir is not recorded); `sparsetrain train --resume <this folder>` continues it.\n")


@dataclass
class TrainResult:
    """What a finished (or time-limited) run reports back."""

    out_dir: Path
    steps_done: int
    train_losses: dict[int, float] = field(default_factory=dict)  # step -> loss, this session only
    val_losses: dict[int, float] = field(default_factory=dict)  # step -> val loss, this session only
    tokens_per_second: float = 0.0
    train_seconds: float = 0.0


def _mean_rows(rows: list[dict[str, float | torch.Tensor]]) -> dict[str, float]:
    """Key-wise mean of same-keyed stat dicts (floats or 0-dim tensors), rounded for metrics.jsonl."""
    return {k: round(float(sum(r[k] for r in rows)) / len(rows), 4) for k in rows[0]}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"run.device is {name!r} but CUDA is not available on this machine")
    return dev


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
    if (out / CKPT_NAME).exists() or (out / PREVIOUS_CKPT_NAME).exists():
        return f"run directory {out} already holds a checkpoint; resume it with --resume {out} or pick another --out-dir"
    names = sorted(p.name for p in out.iterdir())
    if names:
        shown = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
        return (f"run directory {out} is not empty ({shown}) and holds no checkpoint to resume from; "
                "pick another --out-dir or delete it")
    return None


def compare_model_configs(saved: dict, wanted: ModelConfig, where: str) -> None:
    """Refuse to load weights into a differently shaped model, naming the difference."""
    want = asdict(wanted)
    diffs = [f"{k}={saved.get(k)!r} there vs {v!r} here" for k, v in want.items() if saved.get(k) != v]
    if diffs:
        raise CheckpointError(f"checkpoint {where} is from another model: " + ", ".join(diffs))


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

        # Rank 0 builds the token cache first; the others then find it ready.
        if self.dist.is_main:
            self.corpus = self._load_corpus()
        D.barrier(self.dist)
        if not self.dist.is_main:
            self.corpus = self._load_corpus()

        torch.manual_seed(cfg.seed)
        self.model = build_model(cfg.model).to(self.device)
        # modules with a per-step schedule: relu2_24's dense warmup, sparse BK layers' sparsity ramp
        self.scheduled = step_counted(self.model)
        self.sparse_ffns = [m for m in self.scheduled if isinstance(m, Sparse24FFN)]
        self.mtp: MTPHeads | None = None
        if cfg.use_mtp:
            if self.dist.enabled:
                raise ConfigError("use_mtp is not available with several processes yet")
            self.mtp = MTPHeads(self.model, cfg.mtp_n_tokens, cfg.mtp_weight, cfg.mtp_decay).to(self.device)
        trainable = nn.ModuleList([self.model] + ([self.mtp] if self.mtp is not None else []))
        self.optimizer = make_optimizer(trainable, cfg.lr, cfg.weight_decay, (cfg.beta1, cfg.beta2), self.device.type)
        self.step = 0
        self.train_seconds = 0.0  # cumulative over resumes; what max_seconds limits
        self.loader = None  # async batch loader, started on first use
        self.hyper_report: dict | None = None  # mHC-lite analysis, written at the next eval
        self.mtp_losses: list[list[float]] = []  # per micro-step [main, L_1..L_n] since the last log
        self.bk_stats: list[dict[str, float]] = []  # sparse ResNet-BK mask stats per micro-step since the last log
        self.sparse24_stats: dict[int, tuple[list, str]] = {}  # step -> (each relu2_24 layer's statistics, backend)
        self._loader_next = (0, 0)
        self._setup_selection()
        self.out_dir = self._prepare_out_dir(resume)
        if resume is not None:
            self._load_state(self.out_dir)
        self._write_run_files()
        # Collider compiles its own elementwise pieces; its autograd node is not traced whole
        self.ddp_model: nn.Module = ColliderModel(self.model, compile=cfg.compile) if cfg.use_collider else self.model
        prepare_sparse24(cfg, self.model, self.device)
        if cfg.compile and not cfg.use_collider:
            # reduce-overhead: CUDA graphs of the compiled pieces (what the sync-free
            # ResNet-BK parked path allows; bench/results/bk_step_0.5_h200.json)
            self.ddp_model = torch.compile(self.ddp_model, mode=None if cfg.compile_mode == "default" else cfg.compile_mode)
        if self.dist.enabled:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.ddp_model = DDP(self.ddp_model, device_ids=ids)
        if self.cfg.selection == "batch":
            # the router scores with the raw model's first layers; the selected
            # sequences go through the DDP/compiled model so gradients sync
            router = create_truncated_router(self.model, self.cfg.router_layers)
            self.batch_splitter = CGGRModel(self.ddp_model, router=router, selector=self.selector)
        self._val = val_batches(
            self.corpus.val, cfg.eval_batches, cfg.batch_size, cfg.model.seq_len, self.dist.rank, self.dist.world_size
        )

    @property
    def tokens_per_step(self) -> int:
        """Tokens per optimizer step, over all processes."""
        c = self.cfg
        return c.batch_size * c.model.seq_len * c.grad_accum * self.dist.world_size

    # ------------------------------------------------------------------ set-up

    def _setup_selection(self) -> None:
        """Token selection objects: the selector for Collider (``use_collider``) or for
        CGGR (``selection`` = loss | batch), and the reference model for ``excess``."""
        c = self.cfg
        self.selector: TokenSelector | None = None
        self.criterion: CGGRLoss | None = None
        self.batch_splitter: CGGRModel | None = None
        self.reference: GPT | None = None
        self.step_kept = [0, 0]  # kept / total valid tokens of the current step
        self.backward_ms: list = []  # per micro-step backward timings of the current log window
        seed = c.seed * 1000 + self.dist.rank
        if c.use_collider:
            adaptive = c.collider_method == "threshold" and c.collider_sparsity > 0
            self.selector = TokenSelector(
                score=c.collider_score, method=c.collider_method, keep_ratio=1.0 - c.collider_sparsity,
                warmup_steps=c.selection_warmup_steps, threshold=c.collider_threshold,
                target_sparsity=c.collider_sparsity if adaptive else None, seed=seed,
            )
        elif c.selection != "none":
            self.selector = TokenSelector(
                score=c.selection_score, method=c.selection_method, keep_ratio=c.keep_ratio,
                warmup_steps=c.selection_warmup_steps, dynamic=c.selection_dynamic, sensitivity=c.selection_sensitivity,
                threshold=c.selection_threshold, target_sparsity=c.selection_target_sparsity or None, seed=seed,
            )
        else:
            return
        if c.selection == "loss":
            self.criterion = CGGRLoss(selector=self.selector)
        if c.reference_ckpt:
            self.reference = load_model(c.reference_ckpt, self.device)
            if self.reference.config.vocab_size != c.model.vocab_size:
                raise CheckpointError(
                    f"reference {c.reference_ckpt} has vocab_size {self.reference.config.vocab_size}, "
                    f"this run {c.model.vocab_size}"
                )

    @torch.no_grad()
    def _reference_nll(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        logits, _ = self.reference(x)
        nll = F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="none", ignore_index=IGNORE_INDEX)
        return nll.view(y.shape)

    def _amp_dtype(self) -> torch.dtype | None:
        if self.cfg.dtype == "bfloat16" or (self.cfg.dtype == "auto" and self.device.type == "cuda"):
            return torch.bfloat16
        return None

    def _load_corpus(self) -> TokenizedCorpus:
        c = self.cfg
        return load_corpus(
            c.data, c.model.vocab_size, c.val_fraction, c.cache_dir, c.token_dtype, c.tokenizer, verbose=self.verbose
        )

    def _prepare_out_dir(self, resume: str | Path | None) -> Path:
        """The run directory: the one resumed, or a new one that must not exist yet
        or be empty (a folder holding another run's files is never written into)."""
        sinks(self.cfg.report_to)  # a missing logging package is refused before anything is written
        self.last_saved_step: int | None = None  # step of the newest checkpoint on disk
        if resume is not None:
            out = Path(resume)
            if not (out / CKPT_NAME).is_file() and not (out / PREVIOUS_CKPT_NAME).is_file():
                raise CheckpointError(f"cannot resume: no {CKPT_NAME} in {out}")
        else:
            name = self.cfg.out_dir or f"runs/{self.cfg.preset}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"
            out = Path(D.broadcast_object(name, self.dist))
            problem = D.broadcast_object(_unusable_out_dir(out) if self.dist.is_main else None, self.dist)
            if problem:
                raise ConfigError(problem)
        self.cfg.out_dir = str(out)
        return out

    def _write_run_files(self) -> None:
        """Resolved config (without out_dir, so that ``--config`` on it starts a new run)
        and tokenizer, written only once every check has passed."""
        if self.dist.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            remove_partial_writes(self.out_dir)  # what a killed run was writing
            data = self.cfg.to_dict()
            del data["run"]["out_dir"]
            atomic_write_text(self.out_dir / CONFIG_NAME, CONFIG_HEADER + dumps_toml(data))
            if self.corpus.tokenizer_path is not None:
                atomic_write_bytes(self.out_dir / "tokenizer.json", Path(self.corpus.tokenizer_path).read_bytes())

    def _load_state(self, out: Path) -> None:
        """Load the newest intact checkpoint of ``out`` (``ckpt.pt``, else ``ckpt.prev.pt``
        with a warning) and drop the metric rows written after it."""
        state, _ = load_checkpoint_from(out, map_location=self.device)
        compare_model_configs(state["model_config"], self.cfg.model, str(out))
        self.model.load_state_dict(state["model"])
        if self.mtp is not None:
            if state.get("mtp") is None:
                raise CheckpointError(f"checkpoint {out} has no MTP heads; resume without use_mtp")
            self.mtp.load_state_dict(state["mtp"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.step = int(state["step"])
        self.last_saved_step = self.step
        if self.selector is not None and "selector" in state:
            self.selector.load_state_dict(state["selector"])
        self.train_seconds = float(state.get("train_seconds", 0.0))
        if self.dist.is_main:
            truncate_metrics(out / METRICS_NAME, self.step)

    # ------------------------------------------------------------------ steps

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    def forward_backward(self, x: torch.Tensor, y: torch.Tensor, loss_scale: float = 1.0, sync: bool = True) -> torch.Tensor:
        """One micro-batch: forward, ``(loss * loss_scale).backward()``. Returns the
        unscaled loss (detached). ``sync=False`` skips the DDP all-reduce, for
        all but the last micro-batch of an accumulation."""
        # known on the host, the selector needs no sync to size its budget. The
        # corpus windows (data.py, loader.py) have a target at every position;
        # a batch still on the CPU is counted anyway
        n_valid = int((y != IGNORE_INDEX).sum()) if y.device.type == "cpu" else y.numel()
        x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
        ctx = self.ddp_model.no_sync() if (self.dist.enabled and not sync) else contextlib.nullcontext()
        with ctx:
            if self.cfg.use_collider:
                with self.autocast():
                    logits, trunk = self.ddp_model(x, return_trunk=True)
                ref = self._reference_nll(x, y) if self.reference is not None else None
                keep, stats = self.selector(logits.detach(), y, ref, n_valid=n_valid)
                with self.autocast():
                    loss = masked_cross_entropy(logits, y, keep)
                    total = loss
                    if self.mtp is not None:  # every head uses the primary head's keep mask, on kept rows only
                        extra, head_losses = kept_rows_loss(self.model, self.mtp, trunk, y, keep)
                        total = loss + extra
                        self.mtp_losses.append([float(loss.detach())] + head_losses)
                with collider_filter(keep), self._timed_backward():
                    (total * loss_scale).backward()
                self.step_kept[0] += stats.kept
                self.step_kept[1] += stats.total
                return loss.detach()
            if self.mtp is not None:
                with self._timed_backward():
                    _, losses = sequential_backward(self.model, self.mtp, x, y, loss_scale, self.autocast)
                self.mtp_losses.append(losses)
                return torch.tensor(losses[0], device=self.device)  # the main head's loss, comparable to dense
            with self.autocast():
                if self.batch_splitter is not None:
                    loss = self.batch_splitter(x, targets=y)
                    m = self.batch_splitter.get_metrics()
                    kept, total = m["tokens_selected"], m["tokens_total"]
                elif self.criterion is not None:
                    logits, _ = self.ddp_model(x)
                    ref = self._reference_nll(x, y) if self.reference is not None else None
                    loss = self.criterion(logits, y, ref)
                    kept, total = self.selector.last_stats.kept, self.selector.last_stats.total
                else:
                    _, loss = self.ddp_model(x, y)
                    kept = total = 0
                aux = self.model.aux_loss() if isinstance(self.model, ResNetBK) else None
            with self._timed_backward():
                # the reported loss stays the LM loss; a sparse ResNet-BK also learns its sparsity target
                ((loss if aux is None else loss + aux) * loss_scale).backward()
            if aux is not None:
                self.bk_stats.append(self.model.sparsity_stats(sync=False))  # read on log steps only
        self.step_kept[0] += kept
        self.step_kept[1] += total
        return loss.detach()

    def _batch(self, micro: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Micro-batch ``micro`` of step ``self.step``: built here, or taken from the
        async loader (restarted whenever the step sequence jumps, as after a resume)."""
        c = self.cfg
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
            with open(self.out_dir / METRICS_NAME, "a") as f:
                f.write(json.dumps(row) + "\n")
            if self.verbose:
                print(f"step {self.step}: FIRE reinitialised {len(stats)} layers "
                      f"(max orthogonality error {row['max_orthogonality_error']:.2e})", flush=True)

    @contextlib.contextmanager
    def _timed_backward(self):
        """Time a backward pass: CUDA events (read at the next log), or the host clock."""
        if self.device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
            self.backward_ms.append((start, end))
        else:
            t0 = time.perf_counter()
            yield
            self.backward_ms.append((time.perf_counter() - t0) * 1e3)

    def _drain_backward_ms(self) -> float | None:
        """Mean backward milliseconds per micro-step since the last call."""
        if not self.backward_ms:
            return None
        ms = [b if isinstance(b, float) else b[0].elapsed_time(b[1]) for b in self.backward_ms]
        self.backward_ms = []
        return sum(ms) / len(ms)

    def train_step(self) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimizer step at ``self.step``. Returns (mean loss, grad norm) as tensors."""
        c = self.cfg
        lr = lr_at(self.step, c.lr, c.warmup_steps, c.max_steps, c.min_lr_ratio)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        total = torch.zeros((), device=self.device)
        self.step_kept = [0, 0]
        log_step = (self.step + 1) % c.log_every == 0
        for m in self.sparse_ffns:  # 2:4 statistics cost extra reductions: only on steps that get logged
            m.track_stats = log_step and m.sparse
        for micro in range(c.grad_accum):
            x, y = self._batch(micro)
            total += self.forward_backward(x, y, 1.0 / c.grad_accum, sync=micro == c.grad_accum - 1)
        report_every = c.eval_every or c.max_steps
        if self.model.config.hyper_connections and (self.step + 1) % report_every == 0:
            # analysed here, while the mixing parameters still hold this step's gradients
            self.hyper_report = hyper.report(self.model, x.to(self.device)[:2])
        if c.grad_clip > 0:
            params = [p for group in self.optimizer.param_groups for p in group["params"]]  # MTP heads too
            gnorm = torch.nn.utils.clip_grad_norm_(params, c.grad_clip)
        else:
            gnorm = torch.zeros((), device=self.device)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.selector is not None:
            self.selector.step()
        stats = [m.last_stats for m in self.sparse_ffns if m.track_stats and m.last_stats]
        if stats:
            # kept as tensors and averaged when the step is logged, after the window's one sync
            self.sparse24_stats[self.step + 1] = (stats, self.sparse_ffns[0].last_backend)
        for m in self.sparse_ffns:  # off again, so that an evaluation after this step counts nothing
            m.track_stats = False
        for m in self.scheduled:
            m.step()
        self.step += 1
        if c.fire_at_step and self.step == c.fire_at_step:
            self._fire()
        return D.all_reduce_mean(total / c.grad_accum, self.dist), gnorm.detach()

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean val cross-entropy over the fixed val windows (all ranks together)."""
        self.ddp_model.eval()
        s = torch.zeros(2, device=self.device, dtype=torch.float64)
        for x, y in self._val:
            with self.autocast():
                _, loss = self.model(x.to(self.device), y.to(self.device))
            s[0] += loss.double()
            s[1] += 1
        self.ddp_model.train()
        if self.dist.enabled:
            torch.distributed.all_reduce(s)
        return float(s[0] / s[1])

    def _kept_note(self) -> str:
        """Which checkpoint survives a failure now, for error messages."""
        if self.last_saved_step is None:
            return "no checkpoint was written before it"
        return f"the last good checkpoint (step {self.last_saved_step}) in {self.out_dir} is kept"

    def _diverged(self, what: str) -> DivergedError:
        advice = f"; continue from it with --resume {self.out_dir} and a lower --lr" if self.last_saved_step is not None else ""
        return DivergedError(f"training diverged: {what}; {self._kept_note()}{advice}")

    def _check_finite_weights(self) -> None:
        """Refuse to save NaN/Inf weights (one host sync)."""
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        if params and not bool(torch.stack([torch.isfinite(p).all() for p in params]).all()):
            raise self._diverged(f"the weights hold NaN or Inf after step {self.step} (not saved)")

    def save(self) -> None:
        """Checkpoint everything needed to continue exactly (rank 0 only): the
        weights-only ``model.safetensors``, then ``ckpt.pt`` (model, AdamW state,
        step, ...), each written atomically and verified, the checkpoint before it
        kept as ``ckpt.prev.pt``. Non-finite weights are never saved."""
        if not self.dist.is_main:
            return
        self._check_finite_weights()
        state = {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "step": self.step,
            "train_seconds": self.train_seconds,
            "selector": self.selector.state_dict() if self.selector is not None else None,
            "mtp": self.mtp.state_dict() if self.mtp is not None else None,  # generate ignores the heads
            "model_config": asdict(self.cfg.model),
            "train_config": self.cfg.to_dict(),
        }
        try:
            save_weights(self.out_dir / WEIGHTS_NAME, state["model"], state["model_config"], self.step)
            save_checkpoint(self.out_dir / CKPT_NAME, state)
        except OSError as e:
            raise CheckpointError(f"cannot write the step-{self.step} checkpoint in {self.out_dir}: "
                                  f"{e.strerror or e}; {self._kept_note()}") from e
        self.last_saved_step = self.step

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
            print(f"data: {self.corpus.description}")
            print(
                f"model: {self.model.num_params() / 1e6:.2f}M params ({c.preset}), device {self.device}"
                f"{', bf16 autocast' if self.amp_dtype else ''}, {self.dist.world_size} process(es)"
            )
            print(f"run dir: {self.out_dir}  ({tokens_per_step:,} tokens/step, steps {self.step} -> {c.max_steps})")
        bar = self._progress_bar()
        log = RunLog(self.out_dir, c.report_to, c.to_dict(), first_step=self.step) if self.dist.is_main else None

        def write(row: dict) -> None:
            if log is not None:
                log.log(row)

        pending: list[tuple[int, torch.Tensor, torch.Tensor, float, float | None]] = []
        session_seconds = 0.0
        try:
            if self.step == 0:  # the starting point of the val curve
                val = self.evaluate()
                result.val_losses[0] = val
                write({"kind": "eval", "step": 0, "val_loss": val, "train_seconds": 0.0})
                if not math.isfinite(val):
                    raise self._diverged(f"val loss {val} at step 0")
                self._say(bar, f"step 0: val loss {val:.4f}")
            window_t0, window_tokens = time.perf_counter(), 0
            while self.step < c.max_steps:
                t0 = time.perf_counter()
                try:
                    loss, gnorm = self.train_step()
                except DivergedError as e:  # raised inside the step (token scores of NaN logits)
                    raise self._diverged(f"step {self.step + 1}: {e}") from None
                kept_frac = self.step_kept[0] / self.step_kept[1] if self.step_kept[1] else None
                pending.append((self.step, loss, gnorm, self.optimizer.param_groups[0]["lr"], kept_frac))
                window_tokens += tokens_per_step
                last = self.step >= c.max_steps
                dt = time.perf_counter() - t0
                session_seconds += dt
                self.train_seconds += dt
                out_of_time = c.max_seconds > 0 and self.train_seconds >= c.max_seconds
                eval_now = last or out_of_time or (c.eval_every and self.step % c.eval_every == 0)
                save_now = c.save_checkpoints and (eval_now and not c.ckpt_every or c.ckpt_every and self.step % c.ckpt_every == 0
                                                   or last or out_of_time)
                # a checkpoint step is always a log step: the log must hold every row up to it
                if self.step % c.log_every == 0 or last or out_of_time or save_now:  # one host sync per log window
                    if self.device.type == "cuda":
                        torch.cuda.synchronize(self.device)
                    now = time.perf_counter()
                    tps = window_tokens / max(now - window_t0, 1e-9)
                    bwd_ms = self._drain_backward_ms()
                    diverged = None
                    for s, l, g, lr, kf in pending:
                        row = {"kind": "train", "step": s, "loss": float(l), "grad_norm": float(g), "lr": lr,
                               "tokens": s * tokens_per_step, "tokens_per_s": round(tps, 1)}
                        if kf is not None:
                            row["kept_fraction"] = round(kf, 4)
                        if bwd_ms is not None:
                            row["backward_ms"] = round(bwd_ms, 3)  # mean over the log window
                        if s in self.sparse24_stats:
                            layer_stats, backend = self.sparse24_stats.pop(s)
                            row["sparse24"] = {**_mean_rows(layer_stats), "backend": backend}
                        if self.bk_stats:
                            row["bk_sparsity"] = _mean_rows(self.bk_stats)
                        if self.mtp_losses:
                            row["mtp_losses"] = [round(sum(c) / len(c), 4) for c in zip(*self.mtp_losses)][1:]
                        result.train_losses[s] = row["loss"]
                        write(row)
                        if diverged is None and not (math.isfinite(row["loss"]) and math.isfinite(row["grad_norm"])):
                            diverged = f"loss {row['loss']}, grad norm {row['grad_norm']} at step {s}"
                    if diverged is not None:
                        raise self._diverged(diverged)
                    self.mtp_losses = []
                    self.bk_stats = []
                    self._report(bar, result.train_losses[self.step], tps, len(pending), pending[-1][4])
                    pending.clear()
                    window_t0, window_tokens = now, 0
                pause_t0 = time.perf_counter()  # eval and checkpoint time stay out of tokens/s
                if eval_now:
                    val = self.evaluate()
                    result.val_losses[self.step] = val
                    write({"kind": "eval", "step": self.step, "val_loss": val, "train_seconds": round(self.train_seconds, 3)})
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
                        log.sync()  # every row up to this step on disk before the checkpoint that vouches for them
                    self.save()
                if out_of_time:
                    self._say(bar, f"stopping at step {self.step}: max_seconds={c.max_seconds} reached")
                    break
                window_t0 += time.perf_counter() - pause_t0
        finally:
            self.close_loader()
            if bar is not None:
                bar.close()
            if log is not None:
                log.close()
        result.steps_done = self.step
        result.train_seconds = self.train_seconds
        done = len(result.train_losses)
        result.tokens_per_second = done * tokens_per_step / session_seconds if session_seconds > 0 else 0.0
        if self.dist.is_main:
            plot_loss_curve(self.out_dir / METRICS_NAME, self.out_dir / "loss.png", f"{c.preset} - {self.out_dir.name}")
            if self.verbose:
                saved = f", checkpoint {self.out_dir / CKPT_NAME}" if c.save_checkpoints else ""
                print(f"done: {self.step} steps, {result.tokens_per_second:,.0f} tokens/s; "
                      f"loss curve {self.out_dir / 'loss.png'}{saved}")
        return result

    def _progress_bar(self):
        if not (self.verbose and sys.stderr.isatty()):
            return None
        from tqdm import tqdm

        return tqdm(total=self.cfg.max_steps, initial=self.step, unit="step", dynamic_ncols=True)

    def _report(self, bar, loss: float, tps: float, n_steps: int, kept_fraction: float | None) -> None:
        kept = {} if kept_fraction is None else {"kept": f"{kept_fraction:.0%}"}
        if bar is not None:
            bar.update(n_steps)
            bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tps:,.0f}", **kept)
        elif self.verbose:
            eta = (self.cfg.max_steps - self.step) * self.tokens_per_step / max(tps, 1e-9)
            extra = f"  kept {kept['kept']}" if kept else ""
            print(f"step {self.step}/{self.cfg.max_steps}  loss {loss:.4f}{extra}  {tps:,.0f} tok/s  ETA {eta:.0f}s", flush=True)

    def _say(self, bar, message: str) -> None:
        if not self.verbose:
            return
        if bar is not None:
            bar.write(message)
        else:
            print(message, flush=True)


def train(cfg: TrainConfig, resume: str | Path | None = None, verbose: bool = True) -> TrainResult:
    """Train (or resume) a run and tear down the process group afterwards."""
    try:
        return Trainer(cfg, resume=resume, verbose=verbose).fit()
    finally:
        D.shutdown_distributed()

