"""A whole Hugging Face Llama-family causal LM through the Collider engine.

:class:`HFEngine` runs the model as the engine runs the sparsetrain GPT
(gpt.py): an embedding node, one node per decoder layer (hf_block.py), and
the head node (final norm and LM head, tied or not), with compact ``[K, D]``
gradients between them. Its forward returns the logits of all tokens; a
kept-rows loss on them (:func:`~sparsetrain.collider.masked_cross_entropy`)
carries the keep mask into the backward.

What the engine runs is what HF's forward computes for a training batch:
causal attention over each row, positions ``0 .. T-1``, RoPE tables from the
model's own ``rotary_emb`` (every rope scaling HF implements). An
``attention_mask`` that pads on the right is accepted (a real token never
attends to a later pad, so it sees what HF's mask shows it; padded positions
are never targets, see hf.py); any other mask, other position ids, a cache
or requests for attentions or hidden states are refused with one line.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from .attention import MODES, CudnnFallback
from .blocks import BlockAdapter, block_adapter
from .engine import ColliderPass, run_block
from .gpt import EmbedNode, HeadNode
from .hf_block import hf_rms_norm, register_hf_adapters
from .hf_linear import UnsupportedLayer
from .loss import SLOT_ATTR

# keyword arguments a training forward may carry that change nothing here (value: the allowed values)
_IGNORED = {"use_cache": None, "return_dict": (None, True), "output_attentions": (None, False),
            "output_hidden_states": (None, False), "cache": (None,), "past_key_values": (None,),
            "logits_to_keep": (None, 0), "cache_position": None}


def unsupported_reason(model: nn.Module) -> str | None:
    """Why the engine cannot run ``model`` (one line), or None when it can."""
    register_hf_adapters()
    name = type(model).__name__
    base = getattr(model, "model", None)
    if base is None or not all(hasattr(base, a) for a in ("embed_tokens", "layers", "norm", "rotary_emb")):
        return f"{name} is not a Llama-family causal LM (model.model.embed_tokens/layers/norm/rotary_emb)"
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if type(head) is not nn.Linear or head.bias is not None:
        return f"{name}'s LM head is a {type(head).__name__}{' with a bias' if head is not None else ''}, " \
               "not a plain nn.Linear"
    if type(base.embed_tokens) is not nn.Embedding:
        return f"{name}'s token embedding is a {type(base.embed_tokens).__name__}, not a plain nn.Embedding"
    if not type(base.norm).__name__.endswith("RMSNorm") or not hasattr(base.norm, "variance_epsilon"):
        return f"{name}'s final norm is a {type(base.norm).__name__}"
    for layer in base.layers:
        try:
            block_adapter(layer)
        except UnsupportedLayer as e:
            return str(e)
        except ValueError:
            return f"{type(layer).__name__} has no Collider block adapter"
    return None


class HFEngine:
    """The engine's forward for one Hugging Face causal LM (``model``: the
    ``*ForCausalLM``, PEFT's wrapper already removed). ``compile``: run the
    pieces through ``torch.compile``; ``attention``: auto, kept or dense (as
    :class:`~sparsetrain.collider.ColliderModel`)."""

    def __init__(self, model: nn.Module, compile: bool = False, attention: str = "auto") -> None:
        if attention not in MODES:
            raise ValueError(f"attention must be auto, kept or dense, got {attention!r}")
        reason = unsupported_reason(model)
        if reason is not None:
            raise UnsupportedLayer(reason)
        self.model, self.compile, self.attention = model, compile, attention
        self._cudnn = CudnnFallback()  # this engine's: a cuDNN failure here leaves other engines trying it
        self._adapters: dict[int, BlockAdapter] = {}

    def _adapter(self, layer: nn.Module) -> BlockAdapter:
        adapter = self._adapters.get(id(layer))
        if adapter is None or adapter.block is not layer:
            adapter = self._adapters[id(layer)] = block_adapter(layer)
        return adapter

    @staticmethod
    def _check_kwargs(kwargs: dict[str, Any]) -> None:
        for k, v in kwargs.items():
            allowed = _IGNORED.get(k, ())
            if allowed is None:  # any value
                continue
            if not (v is None or isinstance(v, (bool, int))) or v not in allowed:
                raise ValueError(f"the Collider engine's training forward does not take {k}={v!r}")

    @staticmethod
    def batch_checks(attention_mask: torch.Tensor | None, position_ids: torch.Tensor | None,
                     T: int) -> list[torch.Tensor]:
        """The device-side checks of :meth:`check_batch`, unread: right padding of
        the mask, positions ``0 .. T-1`` (a 0-dim bool tensor each, for whichever is
        given), for callers that read them with other values in one host read."""
        checks = []
        if attention_mask is not None:
            if attention_mask.dim() != 2:
                raise ValueError(f"the Collider engine takes a [batch, seq] attention_mask, got "
                                 f"{tuple(attention_mask.shape)}")
            m = attention_mask.bool()
            checks.append((m[:, 1:] <= m[:, :-1]).all())
        if position_ids is not None:
            checks.append((position_ids == torch.arange(T, device=position_ids.device)).all())
        return checks

    @classmethod
    def check_batch(cls, attention_mask: torch.Tensor | None, position_ids: torch.Tensor | None, T: int) -> None:
        """Refuse (one line) a mask other than right padding and positions other
        than ``0 .. T-1`` in every row (one host sync when either is given)."""
        checks = cls.batch_checks(attention_mask, position_ids, T)
        if not checks:
            return
        ok = torch.stack(checks).tolist()
        if attention_mask is not None and not ok[0]:
            raise ValueError("the Collider engine takes right padding only (attention_mask ones, then zeros, in each "
                             "row); pad on the right")
        if position_ids is not None and not ok[-1]:
            raise ValueError("the Collider engine runs positions 0 .. T-1 in every row; packed sequences or offset "
                             "position_ids are not supported")

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, inputs_embeds: torch.Tensor | None = None,
                **kwargs: Any) -> torch.Tensor:
        """The logits ``[B, T, V]`` of every token, carrying the slot a kept-rows
        loss leaves its rows and mask in."""
        self._check_kwargs(kwargs)
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        model = self.model
        base = model.model
        B, T = (input_ids if input_ids is not None else inputs_embeds).shape[:2]
        # under a CUDA graph's capture the check cannot read the device: whoever captures
        # checks each replayed batch itself (ColliderTrainer, in get_batch_samples)
        if not (torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()):
            self.check_batch(attention_mask, position_ids, T)
        embed = base.embed_tokens
        device = embed.weight.device
        autocast = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else None
        dtype = embed.weight.dtype if inputs_embeds is None else inputs_embeds.dtype
        run = ColliderPass((B, T), device, autocast or dtype, autocast, self.compile, self.attention, cudnn=self._cudnn)
        if inputs_embeds is None:
            x = EmbedNode.apply(input_ids, run, embed.weight, None, embed.padding_idx)
        else:
            x = inputs_embeds
        cos, sin = base.rotary_emb(x.detach(), torch.arange(T, device=device)[None])
        half = cos.shape[-1] // 2  # HF's tables repeat the angles over both halves (rotate-half)
        run.rope = (cos[0, :, :half].contiguous(), sin[0, :, :half].contiguous())
        layers = base.layers[:model.config.num_hidden_layers]
        for key, layer in enumerate(layers):
            x = run_block(layer, self._adapter(layer), x, run, key, call=nn.Module.__call__)
        head = model.get_output_embeddings()
        logits = HeadNode.apply(x, run, len(layers), base.norm.variance_epsilon, base.norm.weight, head.weight,
                                hf_rms_norm)
        setattr(logits, SLOT_ATTR, run.slot)  # masked_cross_entropy hands its kept rows' gradient through it
        return logits


__all__ = ["HFEngine", "unsupported_reason"]
