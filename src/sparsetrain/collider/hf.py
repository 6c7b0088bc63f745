"""Collider for Hugging Face causal LMs: ``sparsetrain.collider.apply(model)``.

``apply`` makes a transformers causal LM (bf16 or float32 weights, under
autocast or not, PEFT-wrapped or not) a Collider trainee, in place and with
its state dict unchanged:

* **engine path** (every decoder layer has a block adapter: Llama, Mistral,
  Qwen2, Qwen3): the training forward runs the whole model through the
  Collider engine (hf_engine.py): compact kept-row gradients between layers,
  every backward GEMM on kept rows, the kept-query attention kernel;
* **generic path** (any other model on the attention registry, with a
  one-line notice that it is the slower path): the attention and linear
  swaps of hf_generic.py.

Both keep HF's forward for evaluation and generation (no gradient: the
model's own forward runs). In a training forward with ``labels`` the loss is
computed here, on the logits before they leave the model: the mean
cross-entropy over kept tokens (:func:`kept_rows_loss`; the keep mask comes
from ``selector``, or every token without one, which is dense training), so
no float32 copy of the logits and no ``[N, V]`` gradient is ever made (a
caller that converts outputs to float32, as accelerate's autocast wrapper
does, sees the logits only after the loss has its rows). ``num_items_in_batch``
(the Trainer's) turns the mean into a sum over this batch's kept tokens
divided by it: with a selector it must count the kept tokens, which the
caller declares with ``collider_counts_kept=True`` (as
:class:`~sparsetrain.hf_trainer.ColliderTrainer` does); any other caller's (a
plain ``Trainer``'s target count, which would shrink the loss and gradients
by the kept fraction) is refused in one line. Tokens at padded positions
(``attention_mask`` 0) are never targets. :func:`remove` undoes :func:`apply`.
"""

from __future__ import annotations

import functools
import types
import warnings
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from ..errors import ConfigError
from ..selection import IGNORE_INDEX, REFERENCE_SCORES, SelectionStats, TokenSelector, keep_every_position, shift_labels
from .hf_engine import HFEngine, unsupported_reason
from .hf_generic import GenericSwap, positions_mixed_outside_attention, swap_in, swap_out
from .hf_linear import UnsupportedLayer
from .loss import masked_cross_entropy

_STATE_ATTR = "_sparsetrain_collider"


class ColliderGenericPathWarning(UserWarning):
    """``collider.apply`` took the generic (exact, slower) path for a model the engine cannot run."""


@dataclass
class _Applied:
    """What :func:`apply` changed, for :func:`remove`, and what the forward reads."""

    engine: HFEngine | None
    generic: GenericSwap | None
    selector: TokenSelector | None
    previous_forward: Any  # the instance-level forward the model had (another wrapper's), or None
    last_stats: SelectionStats | None = None


def causal_lm(model: nn.Module) -> nn.Module:
    """The transformers causal LM inside ``model`` (PEFT's wrapper removed)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def kept_rows_loss(logits: torch.Tensor, targets: torch.Tensor, selector: TokenSelector | None = None,
                   num_items_in_batch: torch.Tensor | int | None = None, n_valid: int | None = None,
                   ref_nll: torch.Tensor | None = None) -> tuple[torch.Tensor, SelectionStats]:
    """Collider's loss on ``logits`` ``[B, T, V]`` for aligned ``targets`` ``[B, T]``
    (``IGNORE_INDEX`` for none): the mean cross-entropy over the tokens
    ``selector`` keeps (every token without one: dense training), or with
    ``num_items_in_batch`` their sum divided by it. Returns the loss and the
    selection's stats. ``n_valid``: the number of targets, when the caller
    counted them (else counted here: a host sync); it sizes the selector's
    budget. ``ref_nll``: a reference model's loss of each target, aligned with
    ``targets`` (for the ``excess`` score). A batch without targets gives a zero loss."""
    valid = targets != IGNORE_INDEX
    if n_valid is None:
        n_valid = int(valid.sum())
    if n_valid == 0:
        return logits.sum() * 0.0, SelectionStats(kept=0, total=0)
    if selector is not None:
        keep, stats = selector(logits.detach(), targets, ref_nll, n_valid=n_valid)
    else:  # every token kept: every position's keys and values get their gradient, as in dense training
        keep = keep_every_position(valid.shape, valid.device)
        stats = SelectionStats(kept=n_valid, total=n_valid, keep_ratio=1.0)
    loss = masked_cross_entropy(logits, targets, keep, stats.weights)
    if num_items_in_batch is not None:
        loss = loss * stats.unread("kept") / num_items_in_batch  # in the loss's precision
    return loss, stats


def apply(model: nn.Module, selector: TokenSelector | None = None, compile: bool | None = None,
          attention: str = "auto", engine: bool | None = None) -> nn.Module:
    """Make a Hugging Face causal LM train with Collider filtering (in place; returns it).

    ``model``: a transformers ``*ForCausalLM`` or PEFT's wrapper of one.
    ``selector``: picks the kept tokens when the forward gets ``labels``
    (None: every token, dense training through the same path). ``compile``:
    run the engine's pieces through ``torch.compile`` (None: on CUDA);
    ``attention``: the engine's attention backward (auto, kept or dense).
    ``engine``: None takes the engine when every layer has an adapter, else
    the generic path with a one-line :class:`ColliderGenericPathWarning`;
    True requires the engine (:class:`~sparsetrain.collider.hf_linear.UnsupportedLayer`
    says why not); False takes the generic path.

    Use: ``model(ids, labels=labels).loss.backward()`` (with
    ``collider_n_valid=N``, the number of targets when the caller knows it on
    the host, such as ``B * (T - 1)`` for unpadded batches: the forward then
    never waits for the GPU to count them), or
    ``logits = model(ids).logits``, pick ``keep``, and backpropagate
    ``collider.masked_cross_entropy(logits, targets, keep)``. Applying twice
    changes nothing; :func:`remove` undoes it.
    """
    lm = causal_lm(model)
    if hasattr(lm, _STATE_ATTR):
        return model
    # before any notice of the path taken: a module that is no transformers causal LM is refused outright
    if not hasattr(lm, "config") or not callable(getattr(lm, "get_output_embeddings", None)):
        raise UnsupportedLayer(f"collider.apply takes a transformers causal LM (*ForCausalLM, or PEFT's wrapper of "
                               f"one), got {type(lm).__name__}")
    # a causal LM by its config, its class name (remote code need not mix in generation) or its generation
    causal = (getattr(lm.config, "is_decoder", False) or type(lm).__name__.endswith(("ForCausalLM", "LMHeadModel"))
              or (callable(getattr(lm, "can_generate", None)) and lm.can_generate()))
    if lm.get_output_embeddings() is None or not causal:
        raise UnsupportedLayer(f"collider.apply takes a causal LM with its LM head; {type(lm).__name__} is not one "
                               "(its loss is not next-token cross-entropy)")
    if compile is None:
        compile = any(p.is_cuda for p in lm.parameters())
    eng = generic = None
    reason = None
    if engine is not False:
        reason = unsupported_reason(lm)
        if reason is None:
            eng = HFEngine(lm, compile=compile, attention=attention)
        elif engine:
            raise UnsupportedLayer(reason)
    if eng is None:
        mixed = positions_mixed_outside_attention(lm)
        if mixed is not None:  # refused before any notice of a path it will not take
            raise UnsupportedLayer(f"collider.apply: {mixed}; Collider runs on models whose positions mix only "
                                   "in attention (a dropped position's gradient would be lost there)")
        if reason is not None:
            warnings.warn(f"sparsetrain.collider.apply: {reason}; taking the generic path (exact, slower)",
                          ColliderGenericPathWarning, stacklevel=2)
        generic = swap_in(lm)
    state = _Applied(eng, generic, selector, lm.__dict__.get("forward"))
    setattr(lm, _STATE_ATTR, state)
    lm.forward = types.MethodType(_forward_of(type(lm)), lm)
    return model


def remove(model: nn.Module) -> nn.Module:
    """Undo :func:`apply` (in place; returns the model): the model's own forward
    (or the wrapper it had), linear layers and attention implementation."""
    lm = causal_lm(model)
    state: _Applied | None = getattr(lm, _STATE_ATTR, None)
    if state is None:
        raise ValueError("collider.remove: this model was not made a Collider trainee by collider.apply")
    if state.generic is not None:
        swap_out(lm, state.generic)
    if state.previous_forward is not None:
        lm.forward = state.previous_forward
    else:
        lm.__dict__.pop("forward", None)
    delattr(lm, _STATE_ATTR)
    return model


def applied_state(model: nn.Module) -> _Applied | None:
    """The state :func:`apply` left on ``model`` (or PEFT's wrapper of it), or None."""
    return getattr(causal_lm(model), _STATE_ATTR, None)


def uses_engine(model: nn.Module) -> bool:
    """Whether :func:`apply` put ``model`` on the engine path."""
    state = applied_state(model)
    return state is not None and state.engine is not None


def _refuse_checkpointing(lm: nn.Module) -> None:
    if any(getattr(m, "gradient_checkpointing", False) is True and m.training for m in lm.modules()):
        raise ValueError("gradient checkpointing on the generic Collider path would recompute layers without the "
                         "keep mask; disable it (model.gradient_checkpointing_disable()) or use a model the engine "
                         "runs")


def _forward_of(cls: type):
    """The applied model's forward, to bind to an instance of ``cls`` (its signature
    shows as ``cls.forward``'s, which the Trainer reads to pick dataset columns)."""
    cls_forward = cls.forward

    @functools.wraps(cls_forward)
    @torch.compiler.disable  # the engine compiles its own pieces; its autograd nodes are not traced whole
    def forward(lm: nn.Module, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, *args: Any, labels: torch.Tensor | None = None,
                shift_labels: torch.Tensor | None = None, num_items_in_batch: Any = None,
                collider_logits: bool = True, collider_n_valid: int | None = None, collider_counts_kept: bool = False,
                reference_losses: torch.Tensor | None = None, **kwargs: Any):
        state: _Applied = lm.__dict__[_STATE_ATTR]
        previous = state.previous_forward or functools.partial(cls_forward, lm)
        # by name: the model's own forward may take them in another order (GPT-2's, Falcon's: the cache second)
        named = {k: v for k, v in (("attention_mask", attention_mask), ("position_ids", position_ids)) if v is not None}
        if not torch.is_grad_enabled():  # evaluation, generation: the model's own forward and loss
            extra = {k: v for k, v in (("labels", labels), ("shift_labels", shift_labels),
                                       ("num_items_in_batch", num_items_in_batch)) if v is not None}
            if args:  # every argument up to these positional: handed on in the caller's order
                return previous(input_ids, attention_mask, position_ids, *args, **extra, **kwargs)
            return previous(input_ids, **named, **extra, **kwargs)
        if args:
            raise ValueError("the Collider training forward takes input_ids, attention_mask and position_ids "
                             "positionally; pass the rest by keyword")
        # a keyword, not a context: it reaches the forward through DDP, DataParallel's threads and a Trainer
        if state.selector is not None and num_items_in_batch is not None and not collider_counts_kept:
            raise ConfigError("num_items_in_batch with a Collider selector must count the kept tokens: a plain "
                              "transformers Trainer passes its target count, which would shrink the loss and "
                              "gradients by the kept fraction; train with sparsetrain.hf_trainer.ColliderTrainer "
                              "(or with_collider(YourTrainer)), or pass collider_counts_kept=True with a kept count")
        targets = n_valid = None
        if labels is not None or shift_labels is not None:
            targets = collider_targets(labels, shift_labels, attention_mask)
            # the caller's count, or counted here before the forward (a host sync that waits for the
            # previous step's work, so the GPU idles while this step's first kernels are launched)
            n_valid = collider_n_valid if collider_n_valid is not None else int((targets != IGNORE_INDEX).sum())
            if not 0 <= n_valid <= targets.numel():
                raise ValueError(f"collider_n_valid = {n_valid}: a batch of {targets.numel()} positions has at most "
                                 f"{targets.numel()} targets")
        if state.engine is not None:
            from transformers.modeling_outputs import CausalLMOutputWithPast

            out = CausalLMOutputWithPast(logits=state.engine.forward(input_ids, attention_mask, position_ids,
                                                                     **kwargs))
        else:
            _refuse_checkpointing(lm)
            out = previous(input_ids, **named, **kwargs)
            if not hasattr(out, "logits"):
                raise ValueError("the Collider training forward needs return_dict outputs (a .logits field)")
        if targets is not None:
            ref_nll = collider_reference_losses(reference_losses, targets, state.selector, shifted=labels is None)
            out.loss, state.last_stats = kept_rows_loss(out.logits, targets, state.selector, num_items_in_batch,
                                                        n_valid, ref_nll)
        if not collider_logits:  # the caller wants the loss only: nothing left to convert or keep
            out.logits = None
        return out

    return forward


def collider_reference_losses(reference_losses: torch.Tensor | None, targets: torch.Tensor,
                              selector: TokenSelector | None, shifted: bool = False) -> torch.Tensor | None:
    """A reference model's per-token losses as the selector reads them: aligned
    with the targets. ``reference_losses`` ``[B, T]`` come aligned with
    ``labels`` (entry ``t``: the reference's loss of the token at ``t``, as
    :func:`sparsetrain.hf_trainer.add_reference_losses` writes them) and are
    shifted here as the labels are; ``shifted``: they are aligned with
    ``shift_labels`` already. None where the selector's score does not read
    them; refused in one line where it does and they are missing or misshapen."""
    wants = selector is not None and selector.score in REFERENCE_SCORES
    if not wants:
        return None
    if reference_losses is None:
        raise ValueError(f"collider score {selector.score!r} needs reference_losses [batch, seq] in each training batch (a "
                         "reference model's loss of each label: sparsetrain.hf_trainer.add_reference_losses)")
    if reference_losses.shape != targets.shape:
        raise ValueError(f"reference_losses has shape {tuple(reference_losses.shape)}, the labels "
                         f"{tuple(targets.shape)}: give one loss per label position")
    ref = reference_losses.to(targets.device, torch.float32)
    return ref if shifted else shift_labels(ref, 0.0)  # as the labels: entry t is target t's (token t + 1's)


def collider_targets(labels: torch.Tensor | None, shifted: torch.Tensor | None = None,
                     attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """The aligned targets the training forward learns from: HF-style ``labels``
    (same positions as the inputs) shifted, or ``shifted`` as given (HF's
    ``shift_labels``); none where the input or the token to predict is padded
    (``attention_mask`` 0): a right-padded row's last real token predicts no pad."""
    targets = shifted if shifted is not None else shift_labels(labels, IGNORE_INDEX)
    if attention_mask is not None and attention_mask.dim() == 2:
        pad = attention_mask.to(targets.device) == 0
        pad_next = torch.zeros_like(pad)
        pad_next[:, :-1] = pad[:, 1:]  # target t is token t + 1
        targets = targets.masked_fill(pad | pad_next, IGNORE_INDEX)
    return targets


__all__ = ["ColliderGenericPathWarning", "apply", "applied_state", "causal_lm", "collider_reference_losses",
           "collider_targets", "kept_rows_loss",
           "remove", "uses_engine"]
