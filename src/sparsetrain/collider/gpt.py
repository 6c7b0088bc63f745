"""``ColliderModel``: the sparsetrain GPT under Collider.

The forward is a chain of engine nodes (engine.py): the embedding (with
hyper-connections, the expansion into ``n`` streams), one node per block
(gpt_block.py), the hyper-connection read-out when there is one, and the
head (final norm and LM head). The head's backward is where a backward
starts: it takes the keep mask and the compact ``[K, V]`` logit gradient
that :func:`~sparsetrain.collider.masked_cross_entropy` left in the slot the
logits carry. Tied embeddings are one parameter that the embedding and head
nodes both return a gradient for (autograd adds them).
"""

from __future__ import annotations

import functools

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..model import GPT, rms_norm
from .attention import MODES, CudnnFallback
from .blocks import BlockAdapter, RowGrad, block_adapter
from .compact import piece, rmsnorm_backward, rows, wgrad, wgrad_in_float32
from .engine import _TWICE, ColliderPass, PositionwiseAdapter, call_with_forward, parameter_grads, run_block
from .gpt_block import GPTBlockAdapter  # noqa: F401  (registers the GPT block's adapter)
from .loss import SLOT_ATTR


class EmbedNode(torch.autograd.Function):
    """Token embedding (and, with hyper-connections, the ``n`` scaled streams):
    writes boundary 0. Its backward is the last of a backward: an ``index_add``
    of the kept rows into the embedding gradient (nothing into the row of
    ``padding_idx``, as ``nn.Embedding``'s backward)."""

    @staticmethod
    def forward(ctx, idx: torch.Tensor, run: ColliderPass, weight: torch.Tensor,  # type: ignore[override]
                hyper_in: torch.Tensor | None, padding_idx: int | None = None) -> torch.Tensor:
        ctx.set_materialize_grads(False)
        x = F.embedding(idx, weight)
        if hyper_in is not None:  # as GPT.trunk: the embedding at distinct learned scales
            x = x.unsqueeze(-2) * hyper_in.to(x.dtype)[:, None]
        ctx.run, ctx.idx, ctx.weight, ctx.hyper_in, ctx.meta = run, idx, weight, hyper_in, (x.shape, x.dtype)
        ctx.padding_idx = padding_idx
        run.produced(0)
        return x

    @staticmethod
    def backward(ctx, dx: torch.Tensor | None):  # type: ignore[override]
        run = ctx.run
        kept = run.kept
        g = run.take(0, dx, ctx.meta).rows
        ids = ctx.idx.reshape(-1).index_select(0, kept.kidx)
        d_hyper = None
        if ctx.hyper_in is not None:
            e = F.embedding(ids, ctx.weight).to(g.dtype)
            d_hyper = (g * e[:, None, :]).sum((0, 2)).to(ctx.hyper_in.dtype)
            g = (g * ctx.hyper_in.to(g.dtype)[:, None]).sum(1)
        d_embed = None
        if ctx.needs_input_grad[2]:
            d_embed = torch.zeros_like(ctx.weight).index_add_(0, ids, g.to(ctx.weight.dtype))
            if ctx.padding_idx is not None:
                d_embed[ctx.padding_idx] = 0
        run.finish()
        return None, None, d_embed, d_hyper if ctx.needs_input_grad[3] else None, None


def _head_backward(dl, h, kidx, norm_w, head_w, eps: float, f32: bool, norm=rms_norm, need_head: bool = True):
    h_k = rows(h, kidx)
    d_head = wgrad(dl, norm(h_k, norm_w, eps).to(head_w.dtype), f32) if need_head else None  # none for a frozen head
    dx, d_norm = rmsnorm_backward(dl @ head_w, h_k, norm_w, eps)
    return dx, dx.to(head_w.dtype), d_head, d_norm


class HeadNode(torch.autograd.Function):
    """Final norm and LM head on the trunk output (boundary ``key``). ``norm``:
    the RMSNorm ``(x, weight, eps) -> y`` of the model (the sparsetrain GPT's by
    default; Hugging Face models round differently)."""

    @staticmethod
    def forward(ctx, h: torch.Tensor, run: ColliderPass, key: int, eps: float,  # type: ignore[override]
                norm_w: torch.Tensor, head_w: torch.Tensor, norm=rms_norm) -> torch.Tensor:
        ctx.set_materialize_grads(False)
        with torch.autocast(h.device.type, enabled=False):
            w = head_w.to(run.compute_dtype)  # cast once, reused by the backward
            logits = F.linear(norm(h, norm_w, eps).to(w.dtype), w)
        ctx.run, ctx.key, ctx.eps, ctx.h, ctx.w, ctx.params = run, key, eps, h, w, (norm_w, head_w)
        ctx.norm = norm
        ctx.meta = (h.shape, h.dtype)
        return logits

    @staticmethod
    def backward(ctx, dlogits: torch.Tensor | None):  # type: ignore[override]
        if ctx.h is None:
            raise RuntimeError(_TWICE)
        run = ctx.run
        kept = run.begin()  # a backward starts here: the loss's keep mask
        norm_w, head_w = ctx.params
        cdt = ctx.w.dtype
        dl = run.logit_rows(dlogits, cdt)
        # weight gradients straight to float32 under autocast (compact.wgrad)
        dx, dxc, d_head, d_norm = piece(_head_backward, run.compile)(
            dl, ctx.h, kept.kidx, norm_w, ctx.w, ctx.eps, wgrad_in_float32(head_w, cdt), ctx.norm,
            ctx.needs_input_grad[5])
        ctx.h = None
        dh = run.give(ctx.key, RowGrad(dx, dxc), ctx.meta, ctx.needs_input_grad[0])
        grads = {id(norm_w): d_norm, id(head_w): d_head}
        return (dh, None, None, None, *parameter_grads(ctx.params, grads, ctx.needs_input_grad[4:6]), None)


class ColliderModel(nn.Module):
    """Wrap a :class:`~sparsetrain.model.GPT` for Collider training.

    ``forward(idx)`` returns the logits of all tokens (dense forward). The loss
    :func:`~sparsetrain.collider.masked_cross_entropy` (mean over kept tokens)
    carries the keep mask into the backward, which runs on the kept rows only
    in every layer (``collider.filter(keep)`` around it is optional; if given
    it must be the same mask). Wrap this module (not the GPT) in DDP; under
    FSDP2 shard the GPT (:func:`sparsetrain.parallel.shard_model`) and wrap it after.
    ``compile=True`` runs the elementwise-heavy pieces of the forward and
    backward through ``torch.compile``. ``attention``: ``dense`` (the fused
    dense attention backward with zero rows for dropped queries), ``kept``
    (the Triton kernel that skips dropped queries) or ``auto`` (``kept`` on
    the GPU in 16-bit when at most
    the kernel policy's ``kept_kernel_max_keep`` of the tokens
    are kept, else ``dense``).
    """

    def __init__(self, model: GPT, compile: bool = False, attention: str = "auto") -> None:
        super().__init__()
        if attention not in MODES:
            raise ValueError(f"attention must be auto, kept or dense, got {attention!r}")
        if getattr(model, "hyper_stream_dtype", None) is not None:  # the embedding node builds float32 streams
            raise ValueError(f"Collider keeps hyper-connection streams in the model's dtype; this model stores them "
                             f"in {model.hyper_stream_dtype} (model.hyper_stream_dtype): build it with float32 streams")
        self.model = model
        self.compile = compile
        self.attention = attention
        self._cudnn = CudnnFallback()  # this engine's: a cuDNN failure here leaves other engines trying it
        self._adapters: dict[int, BlockAdapter] = {}
        for blk in model.blocks:
            self._adapter(blk)  # an unsupported block type fails here, not in the first step
        self._readout = None
        if model.config.hyper_connections:
            # a learned read-out of the streams, as GPT.trunk computes it
            self._readout = PositionwiseAdapter(
                model.read_out, slots=[(model, "hyper_out")] if model.hyper_out.requires_grad else [])

    def _adapter(self, blk: nn.Module) -> BlockAdapter:
        adapter = self._adapters.get(id(blk))
        if adapter is None or adapter.block is not blk:
            adapter = self._adapters[id(blk)] = block_adapter(blk)
        return adapter

    def forward(self, idx: torch.Tensor, return_trunk: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Logits ``[B, T, V]``; with ``return_trunk`` also the trunk output
        ``[B, T, D]`` (before the final norm), for extra heads such as MTP's:
        the gradient they send back is used at kept rows only.

        The GPT is called through its own ``__call__`` with the node chain as
        its forward (:func:`~sparsetrain.collider.engine.call_with_forward`),
        as each block is: under FSDP2 the root's hooks unshard what no block
        holds (embedding, final norm, LM head) before the chain reads it, and
        each block's unshard its own parameters before its node does."""
        return call_with_forward(self.model, functools.partial(self._chain, return_trunk=return_trunk), idx)

    def _chain(self, idx: torch.Tensor, return_trunk: bool) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        model = self.model
        if not torch.is_grad_enabled():
            trunk = model.trunk(idx)
            logits = model.lm_head(model.norm(trunk))
            return (logits, trunk) if return_trunk else logits
        B, T = idx.shape
        if T > model.config.seq_len:
            raise ValueError(f"sequence length {T} exceeds the model's seq_len {model.config.seq_len}")
        device = idx.device
        autocast = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else None
        run = ColliderPass((B, T), device, autocast or model.embed.weight.dtype, autocast, self.compile,
                           self.attention, rope=(model.rope_cos, model.rope_sin), cudnn=self._cudnn)
        hyper_in = model.hyper_in if model.config.hyper_connections else None
        x = EmbedNode.apply(idx, run, model.embed.weight, hyper_in)
        key = 0
        for blk in model.blocks:
            x = run_block(blk, self._adapter(blk), x, run, key)
            key += 1
        if self._readout is not None:
            x = run_block(None, self._readout, x, run, key)
            key += 1
        logits = HeadNode.apply(x, run, key, model.norm.eps, model.norm.weight, model.lm_head.weight)
        setattr(logits, SLOT_ATTR, run.slot)  # masked_cross_entropy hands its kept rows' gradient through it
        return (logits, x) if return_trunk else logits
