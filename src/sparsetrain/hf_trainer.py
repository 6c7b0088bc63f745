"""Collider in the Hugging Face ``Trainer`` (and TRL's ``SFTTrainer``).

``ColliderTrainer(model=..., args=..., train_dataset=..., collider=ColliderArguments(drop_ratio=0.5))``
trains like ``Trainer`` with Collider (:func:`sparsetrain.collider.apply` on
the model; the selector picks the kept tokens in each training forward,
from the forward's own logits). For another Trainer subclass,
``with_collider(SFTTrainer)`` gives one that does the same.

* **Loss normalisation.** The loss of an optimizer step is the sum of
  cross-entropy over the kept tokens of all its micro-batches (gradient
  accumulation) and, under DDP, of all processes, divided by their total
  count. For ``topk`` and ``random`` selection at a fixed ratio the count is
  known from the batches' target counts before the first forward (each
  micro-batch keeps ``budget(n_valid, ratio)``), and is handed to the model
  as the Trainer's ``num_items_in_batch``. Threshold and other selections
  keep an unknown count: they train with one process and no accumulation
  (refused otherwise, in one line).
* **Logging.** ``collider_kept_fraction`` (kept / targets since the last log)
  and ``collider_backward_seconds`` (mean backward time per micro-batch: CUDA
  events on the GPU, read at log time) join the Trainer's logs, so every
  ``report_to`` integration sees them.
* **Evaluation** runs the model's own forward and loss (no gradient).
* **model_init.** A model the Trainer builds from ``model_init`` (at each
  ``train()``) is made a Collider trainee as a given model is, with a fresh
  selector.
* **Checkpoints** hold the selector's state (its generators, schedule step and
  threshold controller: ``collider_selector.pt``, one per process under DDP,
  beside the Trainer's RNG states), so a run resumed from one selects as the
  uninterrupted run would.
* **A plain ``Trainer``** over a model given to :func:`~sparsetrain.collider.apply`
  with a selector would pass the target count as ``num_items_in_batch``, not
  the kept count: :class:`ColliderCallback` refuses it (see there).
* **CUDA graph** (``ColliderArguments(cuda_graph=True)``): each micro-batch's
  forward and backward is captured once and replayed, so a small model's
  step is not paced by the host's kernel launches (the Trainer's optimizer
  step, clipping and logging stay outside the graph). After any selection
  warmup, three micro-steps run the recorded body eagerly, then it is
  captured (a batch of another shape or count before then starts the
  warm-up again on its own). A replay needs the captured batch's shapes, non-tensor inputs
  and target count: packed fixed-length batches with every token a target
  replay every time, and any other batch runs eagerly (padding changes the
  count). The graph's gradients are added into ``.grad`` outside it, since
  the Trainer's ``zero_grad`` frees them between steps. Each replayed batch's
  padding and position checks come with the step's one read of its target
  counts (a replayed forward cannot read the device). One CUDA process on
  the block engine (the Llama family), without DeepSpeed, FSDP or DataParallel, bf16 or float32 (not fp16's loss
  scaling), no gradient checkpointing, no LoRA dropout, no optimizer that
  steps in backward hooks, a selection with a count fixed ahead (``topk``,
  ``random``, ``importance``); otherwise refused in one line. ``collider_graph_steps`` (replayed micro-steps since the last
  log) joins the logs; replayed micro-steps are not in
  ``collider_backward_seconds``, and ``torch_empty_cache_steps`` is not applied
  on them. A warning says when more micro-steps did not fit the graph than
  replayed (counted from the start, restarted warm-ups included).

TRL's ``SFTTrainer`` computes its loss through a fused LM head that skips
the logits; under Collider the loss is the kept-rows loss on the logits
instead, so the trainer's own entropy and token-accuracy metrics are not
logged (``with_collider`` bypasses that loss).
"""

from __future__ import annotations

import dataclasses
import os
import time
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from . import kernels
from .collider import apply, remove
from .collider.attention import MODES
from .collider.hf import applied_state, collider_targets, uses_engine
from .collider.hf_engine import HFEngine
from .config import CAPTURABLE_METHODS
from .errors import ConfigError
from .kernels import KernelPolicy
from .step_graph import EAGER_STEPS, StepGraph, clone_tree
from .selection import IGNORE_INDEX, METHODS, NONNEGATIVE_SCORES, REFERENCE_SCORES, SCORES, TokenSelector, budget

try:
    from transformers import Trainer, TrainerCallback
except ImportError as e:  # pragma: no cover - depends on the install
    raise ImportError("sparsetrain.hf_trainer needs transformers (and accelerate)") from e


@dataclass
class ColliderArguments:
    """What Collider adds to ``TrainingArguments``.

    ``drop_ratio``: fraction of target tokens dropped from the backward (0 is
    dense training through the same path); ``score`` and ``method``: the
    selector's (:class:`~sparsetrain.selection.TokenSelector`; ``threshold``
    holds ``drop_ratio`` adaptively); ``warmup_steps``: optimizer steps over
    which the kept fraction falls from 1 to ``1 - drop_ratio``; ``attention``,
    ``compile``, ``engine``: as :func:`sparsetrain.collider.apply`;
    ``cuda_graph``: capture each micro-batch's forward and backward in a CUDA
    graph and replay it (see the module docstring); ``span``: score each token
    by the mean score of its block of ``span`` positions, so whole spans are
    kept or dropped. The ``excess`` score (the model's loss minus a reference
    model's) reads a ``reference_losses`` column of the training data
    (:func:`add_reference_losses`). ``kernels``: the kernel policy the
    training and evaluation steps run under, forward and backward (a
    :class:`~sparsetrain.kernels.KernelPolicy`, or a mapping of the fields to
    change in the process's policy as it is when the arguments are made;
    None: the process's, :func:`sparsetrain.kernels.current`, at each step).
    """

    drop_ratio: float = 0.5
    score: str = "collider"
    method: str = "topk"
    warmup_steps: int = 0
    attention: str = "auto"
    compile: bool | None = None
    engine: bool | None = None
    seed: int = 0
    cuda_graph: bool = False
    span: int = 1
    kernels: KernelPolicy | Mapping[str, Any] | None = None

    def __post_init__(self) -> None:
        if self.kernels is not None and not isinstance(self.kernels, KernelPolicy):
            if not isinstance(self.kernels, Mapping):
                raise ConfigError(f"collider kernels must be a KernelPolicy or a mapping of its fields, "
                                  f"got {type(self.kernels).__name__}")
            fields = {f.name for f in dataclasses.fields(KernelPolicy)}
            unknown = sorted(set(self.kernels) - fields)
            if unknown:
                raise ConfigError(f"collider kernels: unknown field {unknown[0]!r} (fields: {', '.join(sorted(fields))})")
            try:  # the named fields changed, the others the process's (its environment's overrides kept)
                self.kernels = kernels.current().replace(**self.kernels)
            except (TypeError, ValueError) as e:
                raise ConfigError(f"collider kernels: {e}") from None
        if not 0.0 <= self.drop_ratio < 1.0:
            raise ConfigError(f"collider drop_ratio must be in [0, 1), got {self.drop_ratio}")
        if self.score not in SCORES:
            raise ConfigError(f"collider score must be one of {', '.join(SCORES)}, got {self.score!r}")
        if self.method not in METHODS:
            raise ConfigError(f"collider method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.span < 1:
            raise ConfigError(f"collider span must be >= 1, got {self.span}")
        if self.method == "importance" and self.score not in NONNEGATIVE_SCORES:
            raise ConfigError(f"collider method 'importance' samples in proportion to the score: score must be one of "
                              f"{', '.join(NONNEGATIVE_SCORES)}, got {self.score!r}")
        if self.method == "threshold" and self.drop_ratio == 0:
            raise ConfigError("collider method 'threshold' holds drop_ratio adaptively: give drop_ratio > 0")
        if self.warmup_steps < 0:
            raise ConfigError(f"collider warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.attention not in MODES:
            raise ConfigError(f"collider attention must be one of {', '.join(MODES)}, got {self.attention!r}")
        if self.cuda_graph and self.drop_ratio > 0 and self.method not in CAPTURABLE_METHODS:
            raise ConfigError(f"collider cuda_graph needs a kept count fixed ahead (method "
                              f"{', '.join(CAPTURABLE_METHODS)}), got method {self.method!r}")

    @property
    def reads_reference_losses(self) -> bool:
        """Whether the selection reads the training data's ``reference_losses`` column."""
        return self.score in REFERENCE_SCORES and self.drop_ratio > 0

    @property
    def count_known_ahead(self) -> bool:
        """Whether a micro-batch's kept count follows from its target count."""
        return self.method in ("topk", "random", "importance")

    def selector(self) -> TokenSelector | None:
        """The selector these arguments describe (None at ``drop_ratio`` 0: every token kept)."""
        if self.drop_ratio == 0:
            return None
        threshold = self.method == "threshold"
        return TokenSelector(score=self.score, method=self.method, keep_ratio=1.0 - self.drop_ratio,
                             warmup_steps=self.warmup_steps, target_sparsity=self.drop_ratio if threshold else None,
                             seed=self.seed, span=self.span)


REFERENCE_LOSSES = "reference_losses"  # the dataset column the excess score reads (add_reference_losses)
SELECTOR_STATE = "collider_selector.pt"  # a checkpoint's selector state (collider_selector_{rank}.pt under DDP)
MAX_WARMUP_RESTARTS = 8  # batches of a new shape that may restart the graph's warm-up before its capture


class ColliderCallback(TrainerCallback):
    """Keeps ``selector``'s schedule at the Trainer's optimizer step: the callback
    :class:`ColliderTrainer` (and ``with_collider``) adds itself.

    Under any other Trainer it refuses a selector when training begins, in one
    line: a plain ``Trainer`` over a model given to
    :func:`sparsetrain.collider.apply` with a selector hands the forward the
    batch's target count as ``num_items_in_batch``, where the kept count
    belongs, so its loss and gradients would shrink by the kept fraction.
    Without a selector (every token kept) the counts agree and it trains."""

    _in_collider_trainer = False  # set by ColliderTrainerMixin, which passes the kept count

    def __init__(self, selector: TokenSelector | None) -> None:
        self.selector = selector

    def on_train_begin(self, args, state, control, **kwargs):  # noqa: D102 - the TrainerCallback hook
        if self.selector is not None and not self._in_collider_trainer:
            raise ConfigError("ColliderCallback: a plain transformers Trainer divides the kept tokens' loss by its "
                              "target count (num_items_in_batch), not the kept count; train with "
                              "sparsetrain.hf_trainer.ColliderTrainer (or with_collider(YourTrainer)) instead")

    def on_step_begin(self, args, state, control, **kwargs):  # noqa: D102 - the TrainerCallback hook
        if self.selector is not None:
            self.selector.set_step(state.global_step)


class _BackwardClock:
    """Backward time per micro-batch: CUDA events (read when asked), else the host clock."""

    def __init__(self) -> None:
        self.spans: list[tuple[Any, Any]] = []
        self._start: Any = None

    def _mark(self) -> Any:
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            return e
        return time.perf_counter()

    def start(self) -> None:
        self._start = self._mark()

    def stop(self) -> None:
        if self._start is not None:
            self.spans.append((self._start, self._mark()))
            self._start = None

    def mean_seconds(self) -> float | None:
        """Mean span since the last call (None without any), then forget them."""
        spans, self.spans = self.spans, []
        if not spans:
            return None
        secs = []
        for a, b in spans:
            if isinstance(a, float):
                secs.append(b - a)
            else:
                b.synchronize()
                secs.append(a.elapsed_time(b) / 1e3)
        return sum(secs) / len(secs)


class ColliderTrainerMixin:
    """What :class:`ColliderTrainer` adds to a ``Trainer`` class (see the module docstring)."""

    def __init__(self, *args: Any, collider: ColliderArguments | None = None, **kwargs: Any) -> None:
        self.collider_args = collider if collider is not None else ColliderArguments()
        super().__init__(*args, **kwargs)
        ca, targs = self.collider_args, self.args
        if targs.label_smoothing_factor or getattr(self, "compute_loss_func", None) is not None:
            raise ConfigError("Collider computes its own loss (the kept-rows loss): label_smoothing_factor and "
                              "compute_loss_func are not available with it")
        world = targs.world_size
        if not ca.count_known_ahead and ca.drop_ratio > 0 and (targs.gradient_accumulation_steps > 1 or world > 1):
            raise ConfigError(f"collider method {ca.method!r} keeps a count known only after each forward: it trains "
                              "with gradient_accumulation_steps 1 on one process; use topk or random to normalise "
                              "over accumulated or distributed batches")
        if world > 1 and not targs.average_tokens_across_devices:
            raise ConfigError("Collider normalises by the kept tokens of every process: set "
                              "average_tokens_across_devices=True")
        columns = getattr(self.train_dataset, "column_names", None)  # a datasets.Dataset's (None: unknown)
        if ca.reads_reference_losses and columns is not None and REFERENCE_LOSSES not in columns:
            raise ConfigError(f"collider score {ca.score!r} reads a {REFERENCE_LOSSES!r} column, which the training "
                              f"dataset lacks (it has {', '.join(columns)}); add it with add_reference_losses")
        if self.model_init is None:  # a model from model_init has it already (call_model_init)
            self._apply_collider(self.model)
        self.model_accepts_loss_kwargs = True  # the applied forward takes num_items_in_batch
        self._collider_callback = ColliderCallback(self.collider_selector)
        self.add_callback(self._collider_callback)
        for cb in self.callback_handler.callbacks:  # this trainer passes the kept count (get_batch_samples)
            if isinstance(cb, ColliderCallback):
                cb._in_collider_trainer = True
        self._collider_counts: list[tuple[Any, Any]] = []
        self._collider_n_valid: list[int] = []  # the step's micro-batches' target counts, in order (get_batch_samples)
        self._count_is_kept = False  # whether this step's num_items_in_batch is get_batch_samples' kept count
        self._collider_clock = _BackwardClock()
        self._start_collider_graph()

    def _apply_collider(self, model: torch.nn.Module) -> torch.nn.Module:
        """``model`` made a Collider trainee under these arguments, with a fresh selector."""
        ca = self.collider_args
        self.collider_selector = ca.selector()
        if getattr(self, "_collider_callback", None) is not None:
            self._collider_callback.selector = self.collider_selector
        if applied_state(model) is not None:  # applied before: these arguments replace that
            remove(model)
        return apply(model, selector=self.collider_selector, compile=ca.compile, attention=ca.attention,
                     engine=ca.engine)

    def call_model_init(self, trial: Any = None) -> torch.nn.Module:
        """``Trainer.call_model_init``'s fresh model (``train()`` builds one from
        ``model_init`` each time), made a Collider trainee as a given model is."""
        model = self._apply_collider(super().call_model_init(trial))
        if getattr(self, "_collider_callback", None) is not None:  # in train(), not __init__: a graph for this model
            self.model = model  # what train() makes it next; the graph's checks read it
            self._start_collider_graph()
        return model

    def _start_collider_graph(self) -> None:
        """A fresh micro-step graph for the trainer's model and its bookkeeping (no
        graph without ``cuda_graph``)."""
        self._collider_graph_steps = 0  # replayed micro-steps since the last log
        self._collider_graph_key: tuple | None = None  # what the capture's batch looked like (see _graph_key)
        self._collider_graph_eager = 0  # micro-steps so far that did not fit the graph's shape
        self._collider_graph_replays = 0  # replayed micro-steps so far
        self._collider_graph_restarts = 0  # warm-ups restarted for another batch shape before the capture
        self._collider_graph_params: list[torch.nn.Parameter] | None = None  # what the captured gradients are of
        self._collider_graph_warned = False
        self.collider_graph: StepGraph | None = self._setup_collider_graph() if self.collider_args.cuda_graph else None

    def _set_signature_columns_if_needed(self) -> None:
        """The model's forward arguments (the Trainer keeps only those dataset
        columns) and ``reference_losses`` where the selection's score reads it."""
        super()._set_signature_columns_if_needed()
        # only then: a leftover column (filter_by_reference_losses's) is ragged, which a padding collator cannot stack
        if self.collider_args.reads_reference_losses and REFERENCE_LOSSES not in self._signature_columns:
            self._signature_columns.append(REFERENCE_LOSSES)

    # ------------------------------------------------------------------ checkpoints

    def _collider_state_path(self, folder: str) -> str:
        """The checkpoint file of this process's selector state (one per process, as the RNG states)."""
        if self.args.world_size <= 1:
            return os.path.join(folder, SELECTOR_STATE)
        return os.path.join(folder, SELECTOR_STATE.replace(".", f"_{self.args.process_index}."))

    def _save_rng_state(self, output_dir: str) -> None:
        """The Trainer's RNG states and the selector's (its generators, schedule
        step and threshold controller), saved with each checkpoint."""
        super()._save_rng_state(output_dir)
        if self.collider_selector is not None:
            torch.save(self.collider_selector.state_dict(), self._collider_state_path(output_dir))

    def _load_rng_state(self, checkpoint: str | None) -> None:
        """The RNG states and the selector's state of ``checkpoint``, on resuming
        (a checkpoint without the selector's: a warning, and its state starts afresh)."""
        super()._load_rng_state(checkpoint)
        if checkpoint is None or self.collider_selector is None:
            return
        path = self._collider_state_path(checkpoint)
        if not os.path.isfile(path):
            warnings.warn(f"ColliderTrainer: {checkpoint} has no {os.path.basename(path)}; the token selection's "
                          "generator and controller start afresh, so the resumed run selects unlike an "
                          "uninterrupted one", stacklevel=2)
            return
        self.collider_selector.load_state_dict(torch.load(path, weights_only=True))
        self._sync_selector()

    # ------------------------------------------------------------------ the CUDA graph

    def _setup_collider_graph(self) -> StepGraph:
        """The micro-step graph (captured later, :meth:`_graphed_training_step`);
        what it cannot hold is refused here, in one line."""
        targs = self.args
        optim = str(getattr(targs.optim, "value", targs.optim))
        what = None
        if targs.world_size > 1:
            what = f"{targs.world_size} processes (its gradients bypass the gradient synchronisation)"
        elif targs.n_gpu > 1:
            what = f"{targs.n_gpu} GPUs in one process (DataParallel)"
        elif getattr(self, "is_deepspeed_enabled", False) or getattr(self, "is_fsdp_enabled", False):
            what = "DeepSpeed or FSDP (their gradient buffers are not .grad)"
        elif optim in ("lomo", "adalomo") or "layerwise" in optim:
            what = f"optim {optim} (it updates in backward hooks, which the graph's gradients do not fire)"
        elif targs.gradient_checkpointing:
            what = "gradient_checkpointing (its recomputation reads the RNG state, which capture forbids)"
        elif not uses_engine(self.model):
            what = (f"{type(self.model).__name__} on the generic path (only the block engine's forward, for the "
                    "Llama family, is free of host reads)")
        elif self._lora_dropout() > 0:
            what = (f"LoRA dropout {self._lora_dropout():g} (the engine draws its masks from host-side seeds, which "
                    "a replay would repeat); set lora_dropout=0")
        elif targs.fp16:
            what = "fp16 (its loss scaler steps on the host); use bf16"
        elif targs.device.type != "cuda":
            what = f"device {targs.device} (CUDA graphs need a CUDA device)"
        if what is not None:
            raise ConfigError(f"collider cuda_graph with {what} is not available")
        return StepGraph(targs.device)

    def _lora_dropout(self) -> float:
        """The largest dropout probability of the model's LoRA adapters (PEFT's
        ``lora_dropout`` modules; 0 without any)."""
        ps = [d.p for m in self.model.modules() if isinstance(getattr(m, "lora_dropout", None), torch.nn.ModuleDict)
              for d in m.lora_dropout.values() if isinstance(d, torch.nn.Dropout)]
        return max(ps, default=0.0)

    def _graph_due(self) -> bool:
        """Whether micro-steps may use the graph: past the selection's warmup, so
        the kept count is the final ratio's."""
        sel = self.collider_selector
        return sel is None or self.state.global_step >= sel.warmup_steps

    @staticmethod
    def _graph_key(tensors: dict[str, torch.Tensor], others: dict[str, Any], n_valid: int) -> tuple:
        """What a replay must share with the capture: tensor shapes and dtypes, the
        other inputs' values, the target count (it sizes the kept rows)."""
        return (tuple((k, tuple(v.shape), v.dtype) for k, v in sorted(tensors.items())),
                tuple(sorted((k, repr(v)) for k, v in others.items())), n_valid)

    def _graphed_training_step(self, model, inputs: dict[str, Any], num_items_in_batch: Any) -> torch.Tensor | None:
        """One micro-step on the graph's static inputs (an eager warm-up run of the
        recorded body, or a replay, captured first when due), its gradients added
        into ``.grad``; None where the micro-step must run eagerly instead."""
        g = self.collider_graph
        if not self._collider_n_valid or not isinstance(num_items_in_batch, torch.Tensor):
            return None  # the count is not known ahead (no labels): nothing fixes the kept rows' shape
        model.train()
        inputs = self._prepare_inputs(inputs)
        tensors = {k: v for k, v in inputs.items() if isinstance(v, torch.Tensor)}
        others = {k: v for k, v in inputs.items() if not isinstance(v, torch.Tensor)}
        key = self._graph_key(tensors, others, self._collider_n_valid[0])
        if self._collider_graph_key is not None and key != self._collider_graph_key:
            self._collider_graph_eager += 1
            if g.captured or self._collider_graph_restarts >= MAX_WARMUP_RESTARTS:
                return None
            # not captured yet: this batch's shape starts the warm-up again, so that an odd first
            # batch (a padded one, say) does not become the shape every later batch is held to;
            # a few times only, or batches whose shapes keep changing would never be captured
            self._collider_graph_restarts += 1
            g.restart_warmup()
        self._collider_graph_key = key
        n_valid = self._collider_n_valid.pop(0)
        self._sync_selector()
        if hasattr(self.optimizer, "train") and callable(self.optimizer.train):  # as Trainer.training_step does
            self.optimizer.train()
        g.set_inputs(**tensors, num_items_in_batch=num_items_in_batch.reshape(()))
        params = [p for p in model.parameters() if p.requires_grad]
        if self._collider_graph_params is not None and (
                len(params) != len(self._collider_graph_params)
                or any(p is not q for p, q in zip(params, self._collider_graph_params))):
            raise ConfigError("collider cuda_graph: the trainable parameters changed after the capture (frozen, "
                              "unfrozen or replaced); the graph's gradients would go to the wrong ones")

        def body() -> tuple[torch.Tensor, list[torch.Tensor], tuple[Any, Any]]:
            static = dict(g.inputs)
            count = static.pop("num_items_in_batch")
            batch = {**static, **others, "collider_logits": False, "collider_n_valid": n_valid,
                     "collider_counts_kept": True}
            with self.compute_loss_context_manager():
                loss = Trainer.compute_loss(self, model, batch, num_items_in_batch=count)
            # the gradients as outputs: .grad is freed between optimizer steps, so the graph cannot own it
            grads = torch.autograd.grad(loss, params, allow_unused=True)
            state = applied_state(model)
            stats, state.last_stats = state.last_stats, None
            kept = stats.unread("kept") if stats is not None else torch.zeros((), device=loss.device)
            total = stats.unread("total") if stats is not None else torch.zeros((), device=loss.device)
            return loss.detach(), list(grads), (kept, total)

        replayed = g.eager_steps <= 0
        if not replayed:
            with g.eager_context():
                loss, grads, counts = body()
        else:
            if not g.captured:
                generators = self.collider_selector.generators() if self.collider_selector is not None else ()
                g.capture(body, generators)
                self._collider_graph_params = params
            loss, grads, counts = g.replay_outputs()  # the graph's own outputs: the next replay rewrites them
            loss, counts = clone_tree((loss, counts))
            self._collider_graph_steps += 1
            self._collider_graph_replays += 1
        for p, grad in zip(params, grads):
            if grad is None:
                continue
            if p.grad is None:
                p.grad = grad.clone() if replayed else grad
            else:
                p.grad.add_(grad)
        self._collider_counts.append(counts)
        return loss

    # ------------------------------------------------------------------ normalisation

    def _sync_selector(self) -> None:
        if self.collider_selector is not None:
            self.collider_selector.set_step(self.state.global_step)

    def get_batch_samples(self, *args: Any, **kwargs: Any):
        """The Trainer's micro-batches of one optimizer step, with
        ``num_items_in_batch`` the number of tokens they will keep (all
        processes'), when that is known ahead (see the module docstring)."""
        batches, count = super().get_batch_samples(*args, **kwargs)
        ca = self.collider_args
        self._count_is_kept = False
        if not batches or "labels" not in batches[0]:
            return batches, count  # the Trainer's own count: a selector's forward refuses it
        if ca.drop_ratio > 0 and not ca.count_known_ahead:
            return batches, None  # a mean over each micro-batch's kept tokens (one process, no accumulation)
        self._sync_selector()
        ratio = self.collider_selector.current_ratio() if self.collider_selector is not None else 1.0
        counts = [(collider_targets(b["labels"], b.get("shift_labels"), b.get("attention_mask")) != IGNORE_INDEX).sum()
                  for b in batches]
        # the padding and position checks a replayed forward cannot make (it must not read the device)
        checks = [HFEngine.batch_checks(b.get("attention_mask"), b.get("position_ids"), b["labels"].shape[-1])
                  for b in batches] if self.collider_graph is not None else []
        # one host read for the whole step; each micro-batch's forward then gets its count (collider_n_valid)
        # instead of counting it itself, which would wait for the GPU before every forward
        values = torch.stack(counts + [c.long() for cs in checks for c in cs]).tolist()
        self._collider_n_valid = values[:len(counts)]
        if not all(values[len(counts):]):
            for b in batches:  # the failing batch's own message
                HFEngine.check_batch(b.get("attention_mask"), b.get("position_ids"), b["labels"].shape[-1])
        kept = sum(budget(n, ratio) for n in self._collider_n_valid)
        total = torch.tensor(kept, device=self.args.device)
        if self.args.world_size > 1:
            total = self.accelerator.gather(total).sum()
        self._count_is_kept = True
        return batches, total

    # ------------------------------------------------------------------ loss, backward, logs

    def compute_loss(self, model, inputs, return_outputs: bool = False, num_items_in_batch=None):
        """The applied model's loss: the kept-rows loss of its training forward
        (``Trainer.compute_loss`` itself, not a subclass's own loss)."""
        self._sync_selector()
        if torch.is_grad_enabled():
            # num_items_in_batch, where get_batch_samples made it, counts the kept tokens: the forward takes it
            inputs = {**inputs, "collider_logits": return_outputs, "collider_counts_kept": self._count_is_kept}
            if self._collider_n_valid:  # this micro-batch's count, from get_batch_samples
                inputs["collider_n_valid"] = self._collider_n_valid.pop(0)
        else:
            inputs = dict(inputs)
        loss, outputs = Trainer.compute_loss(self, model, inputs, return_outputs=True,
                                             num_items_in_batch=num_items_in_batch)
        state = applied_state(model)
        if torch.is_grad_enabled() and state is not None and state.last_stats is not None:
            stats, state.last_stats = state.last_stats, None
            self._collider_counts.append((stats.unread("kept"), stats.unread("total")))
            self._collider_clock.start()
        return (loss, outputs) if return_outputs else loss

    def training_step(self, model, inputs: dict[str, Any], num_items_in_batch: Any = None, *args: Any,
                      **kwargs: Any) -> torch.Tensor:
        with kernels.using(self.collider_args.kernels):  # the backward reads the policy too
            if self.collider_graph is not None and self._graph_due():
                loss = self._graphed_training_step(model, inputs, num_items_in_batch)
                if loss is not None:
                    return loss
            loss = super().training_step(model, inputs, num_items_in_batch, *args, **kwargs)
        self._collider_clock.stop()
        return loss

    def prediction_step(self, *args: Any, **kwargs: Any):  # noqa: D102 - Trainer's, under the kernel policy
        with kernels.using(self.collider_args.kernels):
            return super().prediction_step(*args, **kwargs)

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        """The Trainer's logs plus Collider's, for every ``report_to`` integration."""
        if self._collider_counts and "loss" in logs:
            counts, self._collider_counts = self._collider_counts, []
            values = torch.tensor([[float(k), float(t)] for k, t in counts]).sum(0)  # device counts read here
            if values[1] > 0:
                logs["collider_kept_fraction"] = round(float(values[0] / values[1]), 4)
            secs = self._collider_clock.mean_seconds()
            if secs is not None:
                logs["collider_backward_seconds"] = round(secs, 6)
        if self.collider_graph is not None and "loss" in logs:
            logs["collider_graph_steps"] = self._collider_graph_steps
            self._collider_graph_steps = 0
            eager, replays = self._collider_graph_eager, self._collider_graph_replays
            if eager > max(replays, EAGER_STEPS) and not self._collider_graph_warned:
                self._collider_graph_warned = True
                warnings.warn(f"ColliderTrainer cuda_graph: {eager} micro-steps so far did not fit the graph and "
                              f"{replays} replayed: their batches differ in shape or target count; pack sequences "
                              "to one length and keep every label", stacklevel=2)
        super().log(logs, *args, **kwargs)


def with_collider(trainer_class: type) -> type:
    """``trainer_class`` (``Trainer`` or a subclass such as TRL's ``SFTTrainer``)
    with Collider: it takes ``collider=ColliderArguments(...)``."""
    return type(f"Collider{trainer_class.__name__}", (ColliderTrainerMixin, trainer_class), {})


class ColliderTrainer(ColliderTrainerMixin, Trainer):
    """``transformers.Trainer`` with Collider (see the module docstring)."""


@torch.no_grad()
def add_reference_losses(dataset: Any, reference_model: torch.nn.Module, batch_size: int = 8,
                         column: str = "input_ids") -> Any:
    """``dataset`` (a ``datasets.Dataset`` of token ids in ``column``) with a
    ``reference_losses`` column: for each example, ``reference_model``'s loss
    of the token at each position given the ones before it (0 at the first
    position, which nothing predicts), float16, aligned with the labels as the
    Trainer passes them. The ``excess`` score (``ColliderArguments(score="excess")``)
    reads it: the trained model's loss minus this one (Rho-1), so training
    keeps the tokens the model has yet to learn and a reference trained on a
    small clean sample of the domain finds learnable, and drops noise, which
    the reference finds as hard as the model does. Computed once, before
    training, on ``reference_model``'s device; examples of unequal length are
    right-padded within a batch (a causal model's earlier positions do not see
    the padding). A dataset's own ``attention_mask`` column is honoured
    (positions counted over the unmasked tokens; 0 at a masked token and at the
    first unmasked one), so padded examples score as the unpadded ones would."""
    import uuid

    import numpy as np

    from datasets import Dataset

    if not isinstance(dataset, Dataset):  # computed once, before training: a stream would run it while training
        raise ValueError(f"add_reference_losses needs a datasets.Dataset (map-style), got {type(dataset).__name__}")
    if column not in dataset.column_names:
        raise ValueError(f"add_reference_losses: the dataset has no column {column!r} (it has "
                         f"{', '.join(dataset.column_names)})")
    was_training = reference_model.training
    reference_model.eval()
    device = next(reference_model.parameters()).device

    def losses(batch: dict[str, list]) -> dict[str, list]:
        rows = [list(r) for r in batch[column]]
        masks = batch.get("attention_mask") or [[1] * len(r) for r in rows]
        T = max(len(r) for r in rows)
        ids = torch.zeros(len(rows), T, dtype=torch.long)
        mask = torch.zeros(len(rows), T, dtype=torch.long)
        for i, (r, m) in enumerate(zip(rows, masks)):
            ids[i, :len(r)] = torch.tensor(r, dtype=torch.long)
            mask[i, :len(r)] = torch.tensor(m, dtype=torch.long)
        ids, mask = ids.to(device), mask.to(device)
        positions = (mask.cumsum(1) - 1).clamp_min(0)  # a left-padded example starts at position 0 too
        logits = reference_model(input_ids=ids, attention_mask=mask, position_ids=positions).logits
        out = []
        for i, r in enumerate(rows):  # one row's float32 logits at a time, not the batch's
            nll = torch.nn.functional.cross_entropy(logits[i, :len(r) - 1].float(), ids[i, 1:len(r)], reduction="none")
            m = mask[i, :len(r)]
            nll = torch.cat([nll.new_zeros(1), nll * m[1:] * m[:-1]])  # 0 where the token or its context is padding
            out.append(nll.cpu().numpy().astype(np.float16))
        return {REFERENCE_LOSSES: out}

    try:
        # a fresh fingerprint: datasets would otherwise hash this closure, reference weights and all
        return dataset.map(losses, batched=True, batch_size=batch_size, desc="reference losses",
                           new_fingerprint=f"reference-losses-{uuid.uuid4().hex}")
    finally:
        reference_model.train(was_training)


def filter_by_reference_losses(dataset: Any, drop: float) -> Any:
    """``dataset`` without the examples whose mean ``reference_losses``
    (:func:`add_reference_losses`) is highest, the highest first until at least
    ``drop`` of its tokens are gone: the static form of the excess score, a
    perplexity filter that leaves the noise out once, before training, instead
    of in every batch. Where the noise comes in whole documents and each
    example is one document (or a block of one), this did better than the
    per-batch span score in our races (docs/time_to_quality.md, regime 3).
    An example's tokens are its unmasked ones (``attention_mask`` when the
    dataset has it); its mean is over the positions the column scores (a
    token whose context is unmasked, the first excluded). Of equal means the
    earlier example goes first. The kept examples keep their order."""
    import numpy as np

    from .corpus_filter import DocumentLosses, choose_left_out

    if not 0.0 < drop < 1.0:
        raise ValueError(f"filter_by_reference_losses: drop must be in (0, 1), got {drop}")
    from datasets import Dataset

    if not isinstance(dataset, Dataset):  # the choice ranks every example: it needs them all, indexable
        raise ValueError(f"filter_by_reference_losses needs a datasets.Dataset (map-style), got "
                         f"{type(dataset).__name__}: a streamed dataset cannot be ranked before training")
    if REFERENCE_LOSSES not in dataset.column_names:
        raise ValueError(f"filter_by_reference_losses: the dataset has no {REFERENCE_LOSSES!r} column: "
                         "add it with add_reference_losses(dataset, reference_model)")
    masked = "attention_mask" in dataset.column_names
    columns = [REFERENCE_LOSSES] + (["attention_mask"] if masked else [])

    def stats(batch: dict[str, list]) -> dict[str, list]:
        means, counts = [], []
        for i, row in enumerate(batch[REFERENCE_LOSSES]):
            row = np.asarray(row, dtype=np.float64)
            m = np.asarray(batch["attention_mask"][i], dtype=bool) if masked else np.ones(len(row), dtype=bool)
            scored = np.zeros(len(row), dtype=bool)
            scored[1:] = m[1:] & m[:-1]
            means.append(float(row[scored].mean()) if scored.any() else 0.0)
            counts.append(int(m.sum()))
        return {"mean": means, "tokens": counts}

    # a batched pass that keeps two numbers per example, not the columns as Python lists
    per_example = dataset.select_columns(columns).map(stats, batched=True, batch_size=1000, remove_columns=columns,
                                                      keep_in_memory=True, desc="mean reference loss")
    mean = np.asarray(per_example["mean"], dtype=np.float64)
    tokens = np.asarray(per_example["tokens"], dtype=np.int64)
    docs = DocumentLosses(names=tuple(f"{i:012d}" for i in range(len(mean))), tokens=tokens, mean_loss=mean)
    return dataset.select(np.flatnonzero(~choose_left_out(docs, drop)).tolist())


def local_tokenizer(texts: list[str], vocab_size: int):
    """A byte-level BPE learned on ``texts`` as a transformers fast tokenizer
    (end of text ``<|endoftext|>``, also the padding token): for training a
    randomly initialised model without the hub."""
    import tempfile
    from pathlib import Path

    from transformers import PreTrainedTokenizerFast

    from .tokenizer import EOT, BPETokenizer

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "tokenizer.json"
        BPETokenizer.train(texts, vocab_size).save(path)
        return PreTrainedTokenizerFast(tokenizer_file=str(path), eos_token=EOT, pad_token=EOT, bos_token=EOT)


__all__ = ["ColliderArguments", "ColliderCallback", "ColliderTrainer", "ColliderTrainerMixin", "add_reference_losses",
           "filter_by_reference_losses", "local_tokenizer", "with_collider"]
