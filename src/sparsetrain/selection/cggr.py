"""CGGR-compatible API: a drop-in selective loss, a truncated router, and batch
splitting.

Drop-in for users of the ``cggr`` package (same constructor arguments and
``get_metrics()`` keys), without its known faults:

* the loss's scores use the targets when the score needs them (``loss``,
  ``combined``), and ignored targets (-100) are never selected;
* warmup advances by itself: every training-mode forward counts as a step
  until you call :meth:`step` yourself; that first call undoes those
  automatic counts, and from then on only your calls count (see
  :class:`_AutoStep`; ``auto_step=False`` counts only your calls from the
  start). That holds for the selector a CGGR object builds from its
  cggr-style arguments; a ``selector`` passed in belongs to the caller, who
  counts its steps (the trainer, once per optimizer step however many
  micro-batches);
* batch splitting ranks sequences by their *mean* token score (choosing a
  sequence when *any* token is hard selects nearly everything), shifts the
  router's labels once, and slices the attention mask with the batch.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..numerics import upcast
from .scores import IGNORE_INDEX, raise_if_nonfinite, score_tokens, shift_labels
from .select import kept_indices
from .selector import TokenSelector


class _AutoStep:
    """Step counting shared by CGGRLoss and CGGRModel.

    The warmup's step is the number of optimizer steps. There are two ways to count them:

    * call :meth:`step` after every ``optimizer.step()`` (the way to use it with
      gradient accumulation): the step count is the number of your calls, and every
      micro-batch of one optimizer step runs at the same keep ratio;
    * never call it: each training-mode forward counts as one step (a loop of one
      forward per optimizer step needs no call at all).

    The first :meth:`step` call decides: it undoes the counts that forwards made
    before it, and from then on forwards count nothing. Before that call a forward
    cannot tell a micro-batch from a step, so the micro-batches of the *first*
    optimizer step run at the automatically counted steps 0, 1, ...; pass
    ``auto_step=False`` to count only your calls from the start (every forward of
    that step at step 0). Eval-mode forwards never count. Forwards never step a
    ``selector`` passed in: its owner counts (the trainer, through ``set_step``).
    """

    selector: TokenSelector
    _manual_steps = False  # True once step() was called, or from the start with auto_step=False
    _auto_steps = 0  # the counts forwards made, undone by the first step()
    _owns_selector = True

    def step(self) -> None:
        """Advance the warmup by one optimizer step (call after ``optimizer.step()``).
        The first call undoes the steps that training forwards counted before it."""
        if not self._manual_steps:
            self._manual_steps = True
            self.selector.set_step(max(0, self.selector.step_count - self._auto_steps))
            self._auto_steps = 0
        self.selector.step()

    def _auto_step(self, training: bool) -> None:
        if training and self._owns_selector and not self._manual_steps:
            self.selector.step()
            self._auto_steps += 1


class CGGRLoss(_AutoStep, nn.Module):
    """Selective cross-entropy: mean loss over the tokens the selector keeps.

    ``forward(logits [B, T, V] or [N, V], targets [B, T] or [N])`` with targets
    aligned to logits (see ``scores.py``). The gradient equals that of
    cross-entropy averaged over the kept tokens only.

    Warmup steps: call :meth:`step` after each ``optimizer.step()``, or never
    (each training forward is then a step); ``auto_step=False`` counts only
    the calls. See :class:`_AutoStep`.
    """

    def __init__(
        self,
        scoring: str = "combined",
        selection: str = "topk",
        dynamic_threshold: bool = True,
        threshold_sensitivity: float = 0.5,
        min_tokens_ratio: float = 0.25,
        warmup_steps: int = 1000,
        num_strata: int = 4,
        min_tokens_per_sequence: int = 1,
        base_loss: nn.Module | None = None,
        ignore_index: int = IGNORE_INDEX,
        seed: int = 0,
        selector: TokenSelector | None = None,
        auto_step: bool = True,
    ) -> None:
        super().__init__()
        # ``selector`` (sparsetrain extension) replaces the cggr-style arguments; its owner counts its steps.
        # ``auto_step`` (sparsetrain extension): False counts only step() calls (see _AutoStep)
        self._owns_selector = selector is None
        self._manual_steps = not auto_step
        self.selector = selector or TokenSelector(
            score=scoring, method=selection, keep_ratio=min_tokens_ratio, warmup_steps=warmup_steps,
            dynamic=dynamic_threshold, sensitivity=threshold_sensitivity, num_strata=num_strata,
            min_per_sequence=min_tokens_per_sequence, seed=seed, ignore_index=ignore_index,
        )
        self.scoring, self.selection = self.selector.score, self.selector.method
        self.base_loss = base_loss
        self._last: tuple[int, Any] | None = None  # (step, SelectionStats) of the last forward

    def forward(self, logits: torch.Tensor, targets: torch.Tensor, ref_nll: torch.Tensor | None = None,
                n_valid: int | None = None) -> torch.Tensor:
        """``n_valid``: the number of targets that are not ``ignore_index``, when the
        caller knows it on the host (see :meth:`TokenSelector.__call__`); with it, and
        a selection method that knows its kept rows, the loss waits for no host sync."""
        mask, stats = self.selector(logits, targets, ref_nll, n_valid=n_valid)
        kidx = kept_indices(mask)  # sorted: the rows logits[mask] would give, without its sync
        kept_logits = logits.reshape(-1, logits.shape[-1]).index_select(0, kidx)
        kept_targets = targets.reshape(-1).index_select(0, kidx)
        if stats.weights is not None:  # importance selection: the weighted mean over the kept rows
            kept_w = stats.weights.reshape(-1).index_select(0, kidx)
            rows = (F.cross_entropy(upcast(kept_logits), kept_targets, reduction="none") if self.base_loss is None
                    else self.base_loss(kept_logits, kept_targets))
            loss = (rows * kept_w).sum() / (kept_targets != self.selector.ignore_index).sum()
        elif self.base_loss is None:
            loss = F.cross_entropy(upcast(kept_logits), kept_targets)
        else:
            loss = self.base_loss(kept_logits, kept_targets).mean()
        self._last = (self.selector.step_count, stats)  # read by get_metrics(): no host sync in the step
        self._auto_step(self.training)
        return loss

    def get_metrics(self) -> dict[str, Any]:
        """cggr's keys for the last forward, as Python numbers (a host sync for device values)."""
        if self._last is None:
            return {}
        step, stats = self._last
        return {"step": step, "token_ratio": stats.keep_ratio, "tokens_selected": stats.kept,
                "tokens_total": stats.total, "avg_confidence": stats.avg_confidence, "avg_entropy": stats.avg_entropy,
                "avg_difficulty": stats.avg_difficulty, "selection": self.selection, "scoring": self.scoring}


# ----------------------------------------------------------------------------- routers


def is_sparsetrain_lm(model: nn.Module) -> bool:
    """Does ``model`` have the interface of :class:`sparsetrain.model.CausalLM`
    (``trunk(idx, n_layers)``, ``norm``, ``lm_head``; ``forward`` returns ``(logits, loss)``)?
    Checked by interface: this package sits below the model module."""
    return callable(getattr(model, "trunk", None)) and hasattr(model, "norm") and hasattr(model, "lm_head")


class GPTTruncatedRouter(nn.Module):
    """The first ``num_layers`` blocks of a sparsetrain causal LM plus its final norm and
    LM head, sharing every parameter with it (no copies)."""

    def __init__(self, model: nn.Module, num_layers: int) -> None:
        super().__init__()
        self.model = model
        self.num_layers = num_layers

    def forward(self, idx: torch.Tensor, **_: Any) -> torch.Tensor:
        m = self.model
        return m.lm_head(m.norm(m.trunk(idx, self.num_layers)))


class HFTruncatedRouter(nn.Module):
    """A Hugging Face causal LM cut to its first ``num_layers`` decoder layers.

    A copy of the backbone's *structure* with ``num_layers`` layers is built
    from the config, then every submodule is replaced by the original's
    (embeddings, the first layers, final norm, rotary embedding), so all
    weights are shared and the backbone's own forward handles masks and
    positions. Works for the Llama, Qwen2 (``model.model.layers``) and GPT-2
    (``model.transformer.h``) families.
    """

    def __init__(self, model: nn.Module, num_layers: int) -> None:
        super().__init__()
        if hasattr(model, "model") and hasattr(model.model, "layers"):
            base, layers_attr, n_attr = model.model, "layers", "num_hidden_layers"
        elif hasattr(model, "transformer") and hasattr(model.transformer, "h"):
            base, layers_attr, n_attr = model.transformer, "h", "n_layer"
        else:
            raise ValueError(f"cannot build a truncated router for {type(model).__name__}: "
                             "expected model.model.layers (Llama/Qwen2) or model.transformer.h (GPT-2)")
        config = copy.deepcopy(model.config)
        setattr(config, n_attr, num_layers)
        if hasattr(config, "layer_types") and config.layer_types is not None:
            config.layer_types = config.layer_types[:num_layers]
        with torch.device("meta"):  # structure only; every tensor is replaced below
            mini = type(base)(config)
        for name, child in list(mini.named_children()):
            if name == layers_attr:
                setattr(mini, name, nn.ModuleList(list(getattr(base, layers_attr))[:num_layers]))
            else:
                setattr(mini, name, getattr(base, name))
        for name, buf in list(mini.named_buffers(recurse=False)):
            setattr(mini, name, getattr(base, name))
        self.backbone = mini
        self.lm_head = model.lm_head
        self.num_layers = num_layers

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kw: Any) -> torch.Tensor:
        out = self.backbone(input_ids=input_ids, attention_mask=attention_mask, **kw)
        return self.lm_head(out[0])


def create_truncated_router(model: nn.Module, num_layers: int = 2) -> nn.Module:
    """A cheap scorer that shares weights with ``model``: embedding, its first
    ``num_layers`` layers, final norm and LM head. Returns logits."""
    sparsetrain_lm = is_sparsetrain_lm(model)
    n_total = model.config.n_layer if sparsetrain_lm else None
    if n_total is not None and not 1 <= num_layers <= n_total:
        raise ValueError(f"num_layers must be in [1, {n_total}], got {num_layers}")
    if sparsetrain_lm:
        return GPTTruncatedRouter(model, num_layers)
    return HFTruncatedRouter(model, num_layers)


# ----------------------------------------------------------------------------- batch splitting


class CGGRModel(_AutoStep, nn.Module):
    """Batch splitting: score every token with the router under ``no_grad``,
    keep the ``ceil(ratio * B)`` sequences with the highest mean score, and run
    the model's forward and backward on those sequences only.

    ``forward(input_ids, labels=None, attention_mask=None, targets=None)``:
    ``labels`` are Hugging Face style (the same positions as the inputs; the
    shift happens here, once); ``targets`` are already aligned (sparsetrain
    style). Padding (``attention_mask == 0``) is never a target. Returns the
    mean cross-entropy over the selected sequences' valid tokens.

    Warmup steps are counted as by :class:`CGGRLoss` (:meth:`step`,
    ``auto_step``; see :class:`_AutoStep`).
    """

    def __init__(
        self,
        model: nn.Module,
        router: nn.Module | None = None,
        min_tokens_ratio: float = 0.25,
        warmup_steps: int = 1000,
        dynamic_threshold: bool = True,
        threshold_sensitivity: float = 0.5,
        scoring: str = "combined",
        ignore_index: int = IGNORE_INDEX,
        selector: TokenSelector | None = None,
        auto_step: bool = True,
    ) -> None:
        super().__init__()
        self.model = model
        self.router = router if router is not None else model
        # the selector's score and schedule (warmup, dynamic ratio) decide which and how many sequences;
        # a selector passed in is stepped by its owner; auto_step=False counts only step() calls (see _AutoStep)
        self._owns_selector = selector is None
        self._manual_steps = not auto_step
        self.selector = selector or TokenSelector(
            score=scoring, method="topk", keep_ratio=min_tokens_ratio, warmup_steps=warmup_steps,
            dynamic=dynamic_threshold, sensitivity=threshold_sensitivity, ignore_index=ignore_index)
        self.scoring = self.selector.score
        self.ignore_index = self.selector.ignore_index
        self._pending: dict[str, Any] = {}

    def _logits(self, module: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        if is_sparsetrain_lm(module):
            return module(input_ids)[0]
        if isinstance(module, GPTTruncatedRouter):
            return module(input_ids)
        out = module(input_ids=input_ids, attention_mask=attention_mask) if attention_mask is not None else module(input_ids)
        if isinstance(out, tuple):  # a wrapped sparsetrain GPT (DDP, torch.compile) returns (logits, loss)
            return out[0]
        return out.logits if hasattr(out, "logits") else out

    def forward(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        targets: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if (labels is None) == (targets is None):
            raise ValueError("pass exactly one of labels (unshifted, HF style) or targets (aligned)")
        if targets is None:
            lab = labels
            if attention_mask is not None:
                lab = lab.masked_fill(attention_mask == 0, self.ignore_index)
            targets = shift_labels(lab, self.ignore_index)
        elif attention_mask is not None:
            targets = targets.masked_fill(attention_mask == 0, self.ignore_index)
        B = input_ids.shape[0]
        with torch.no_grad():
            router_logits = self._logits(self.router, input_ids, attention_mask)
            scores, rs = score_tokens(self.scoring, router_logits, targets, ignore_index=self.ignore_index)
            raise_if_nonfinite(rs)  # this path reads back on the host below anyway
            del router_logits
            valid = rs.valid
            n_valid = valid.sum().clamp(min=1)  # means over valid tokens on the device: boolean indexing would sync
            conf = torch.where(valid, rs.p1, 0.0).sum() / n_valid
            ratio = self.selector.current_ratio(conf)  # reads conf (a sync) only with a dynamic ratio
            n_tok = valid.sum(-1)
            seq_score = torch.where(valid, scores, 0.0).sum(-1) / n_tok.clamp(min=1)
            seq_score = seq_score.masked_fill(n_tok == 0, float("-inf"))  # all-padding rows come last
            k = min(B, max(1, math.ceil(ratio * B - 1e-9)))
            chosen = torch.topk(seq_score, k).indices.sort().values
        sub_mask = attention_mask[chosen] if attention_mask is not None else None
        logits = self._logits(self.model, input_ids[chosen], sub_mask)
        sub_targets = targets[chosen]
        loss = F.cross_entropy(upcast(logits).flatten(0, 1), sub_targets.flatten(), ignore_index=self.ignore_index)
        # metrics stay on the device until get_metrics() asks: no host sync in the step
        self._pending = {"step": self.selector.step_count, "token_ratio": ratio, "sequences_selected": k,
                         "tokens_selected": (sub_targets != self.ignore_index).sum(), "tokens_total": valid.sum(),
                         "avg_confidence": conf, "avg_entropy": torch.where(valid, rs.entropy, 0.0).sum() / n_valid}
        self._auto_step(self.training)
        return loss

    @property
    def last_metrics(self) -> dict[str, Any]:
        """The last forward's metrics as they are: counts and means may be device
        tensors (reading them is a host sync, which :meth:`get_metrics` does)."""
        return dict(self._pending)

    def get_metrics(self) -> dict[str, Any]:
        """cggr's keys (plus ``sequences_selected``), as Python numbers."""
        return {k: (v.item() if isinstance(v, torch.Tensor) else v) for k, v in self._pending.items()}
