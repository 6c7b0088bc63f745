"""The GPT decoder every sparsetrain technique plugs into.

Token embedding -> n_layer x [RMSNorm -> causal attention (RoPE, SDPA) -> residual,
RMSNorm -> FFN -> residual] -> RMSNorm -> LM head. No biases anywhere. The FFN is
SwiGLU or squared ReLU (nanochat's choice, and the one whose activations are
sparse enough for 2:4 tricks).

This module builds the plain decoder only. Techniques that change the network
(the 2:4 FFN, hyper-connections) convert it afterwards, and ResNet-BK is its
own network: :func:`sparsetrain.build.build_model` applies whatever a config
names. They build on this module; it imports none of them (the streams'
read-out takes its operation from :mod:`sparsetrain.hyper_mixing`, a leaf).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import ModelConfig
from .cross_entropy import cross_entropy
from .errors import ConfigError
from .hyper_mixing import read as read_streams
from .hyper_mixing import spread as spread_streams
from .numerics import IGNORE_INDEX, upcast

__all__ = ["IGNORE_INDEX", "upcast", "CausalLM", "GPT", "KVCache", "RMSNorm", "relu_squared", "rms_norm", "apply_rope"]


def relu_squared(u: torch.Tensor) -> torch.Tensor:
    """``relu(u)**2`` in ``u``'s dtype.

    ``.square()`` is a ``pow``, which autocast runs in float32: it writes a
    float32 copy of the whole hidden activation and reads it back for the
    next GEMM. The square of a bf16 value is exact in float32, and a bf16
    product is computed exactly and rounded once, so ``r * r`` gives the same
    bits, forward and backward (``2 r g`` = ``r g + r g``: doubling is exact),
    without the float32 round trip (tests/test_model.py). In float16 the
    gradient can differ in the last bit where products fall below its normal
    range."""
    r = F.relu(u)
    return r * r


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``x / sqrt(mean(x^2) + eps) * weight``, computed in float32 (or float64)."""
    x32 = upcast(x)
    return F.rms_norm(x32, (x.shape[-1],), weight.to(x32.dtype), eps).type_as(x)


class RMSNorm(nn.Module):
    """Root-mean-square norm with a learned gain (computed in float32)."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


def rope_tables(
    seq_len: int, head_dim: int, theta: float, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables of shape [seq_len, head_dim // 2], computed in float64
    (angles reach seq_len radians, where float32 loses digits) and stored as ``dtype``."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float64), inv_freq)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, seq_dim: int = 2) -> torch.Tensor:
    """Rotate pairs (x1, x2) = (first half, second half) of each head. x: [B, H, T, hd]
    (or any layout with positions along ``seq_dim``, e.g. 1 for [B, T, H, hd]);
    cos, sin: [T, hd/2]. The result is contiguous in x's dimension order.

    16-bit CUDA tensors outside torch.compile take one fused Triton kernel
    (:mod:`sparsetrain.rope_triton`); everything else, the plain-torch reference."""
    if x.is_cuda and x.dtype in (torch.bfloat16, torch.float16) and seq_dim in (1, 2) \
            and not torch.compiler.is_compiling():
        from .rope_triton import fused_rope, fused_rope_ok

        if fused_rope_ok(x):
            return fused_rope(x, cos, sin, seq_dim)
    return apply_rope_reference(x, cos, sin, seq_dim)


def apply_rope_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, seq_dim: int = 2) -> torch.Tensor:
    """Plain-torch :func:`apply_rope`: float32 arithmetic (float64 for float64 input), rounded once to x's dtype."""
    x1, x2 = upcast(x).chunk(2, dim=-1)
    shape = [1] * x.dim()
    shape[seq_dim], shape[-1] = cos.shape
    cos, sin = cos.reshape(shape), sin.reshape(shape)
    out = torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
    return out.type_as(x)


class KVCache:
    """The keys and values of the positions a :class:`GPT` has read, per block, for
    decoding a few tokens at a time (generation): ``GPT.trunk(idx, cache=cache)``
    places ``idx`` at positions ``length ..`` and appends its keys and values.
    Every position attends to the cached ones before it, so the result equals the
    whole sequence's forward; the positions may not pass ``seq_len``.

    ``pad`` (``[B]`` integers) left-pads the rows of a batch of prompts of unequal
    lengths: row ``b``'s first ``pad[b]`` positions are padding, which no position
    of that row attends to (a padding position attends to itself alone, so that no
    attention row is empty). Under RoPE a score depends only on the distance
    between two positions, so a row shifted right by its padding gets the logits it
    gets alone (up to rounding; a test checks)."""

    def __init__(self, n_layer: int, pad: torch.Tensor | None = None) -> None:
        self.layers: list[list[torch.Tensor]] = [[] for _ in range(n_layer)]  # per block: [] or [keys, values]
        self.length = 0
        self.pad = pad

    def key_mask(self, end: int, new: int, device: torch.device) -> torch.Tensor | None:
        """``[B or 1, 1, new, end]`` booleans, what each of the ``new`` positions ending
        at ``end`` may attend to (causal, no padding but itself). None where plain
        attention says the same without one: no padding, and either the whole
        sequence (causal) or one new position (every key)."""
        if self.pad is None and (new == 1 or new == end):
            return None
        keys = torch.arange(end, device=device)
        queries = keys[end - new :]
        causal = keys[None, :] <= queries[:, None]  # [new, end]
        if self.pad is None:
            return causal[None, None]
        real = keys[None, :] >= self.pad[:, None]  # [B, end]
        return (causal[None] & (real[:, None, :] | (keys[None, :] == queries[:, None])[None]))[:, None]


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_head = cfg.n_head
        self.head_dim = cfg.head_dim
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=False)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                kv: list[torch.Tensor] | None = None, mask: torch.Tensor | None = None) -> torch.Tensor:
        """``kv``: this block's entry of a :class:`KVCache` (keys and values of earlier
        positions, extended in place), or None for a whole sequence; ``mask``: the
        cache's :meth:`KVCache.key_mask` for this call (None: causal from the cache's
        start, or one new position that sees every key)."""
        B, T, D = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.n_head, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        past = 0
        if kv is not None:
            if kv:
                past = kv[0].shape[2]
                k, v = torch.cat((kv[0], k), 2), torch.cat((kv[1], v), 2)
            kv[:] = [k, v]
        if mask is not None:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        else:  # the whole sequence, or (from a cache) one new position that sees every key
            y = F.scaled_dot_product_attention(q, k, v, is_causal=past == 0)
        return self.proj(y.transpose(1, 2).reshape(B, T, D))


class FeedForward(nn.Module):
    """``swiglu``: down(silu(gate(x)) * up(x)); ``relu2``: down(relu(up(x))**2)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.kind = cfg.ffn
        hidden = cfg.hidden_size
        self.up = nn.Linear(cfg.d_model, hidden, bias=False)
        self.gate = nn.Linear(cfg.d_model, hidden, bias=False) if cfg.ffn == "swiglu" else None
        self.down = nn.Linear(hidden, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate is not None:
            return self.down(F.silu(self.gate(x)) * self.up(x))
        return self.down(relu_squared(self.up(x)))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = CausalSelfAttention(cfg)
        self.ffn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.ffn: nn.Module = FeedForward(cfg)  # a converter may replace it (sparsetrain.sparse24.convert)
        # the residual streams' mixing around each sublayer, set by sparsetrain.hyper's converter
        self.hc_attn: nn.Module | None = None
        self.hc_ffn: nn.Module | None = None

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                kv: list[torch.Tensor] | None = None, mask: torch.Tensor | None = None) -> torch.Tensor:
        """``x``: the residual stream ``[B, T, D]``, or ``[B, T, n, D]`` streams with hyper-connections;
        ``kv``: this block's :class:`KVCache` entry when decoding; ``mask``: its padding mask."""
        if self.hc_attn is not None:  # three mixing passes: read, write-then-read, write (sparsetrain.hyper)
            a, x = self.hc_attn.read_through(x)
            x, a = self.hc_attn.write_then_read(x, self.attn(self.attn_norm(a), cos, sin, kv, mask), self.hc_ffn)
            return self.hc_ffn.write(x, self.ffn(self.ffn_norm(a)))
        x = x + self.attn(self.attn_norm(x), cos, sin, kv, mask)
        return x + self.ffn(self.ffn_norm(x))


class CausalLM(nn.Module):
    """What every sparsetrain network shares: ``embed``, ``trunk(idx)``, ``norm``
    and ``lm_head``, so the trainer, MTP and generation see one interface."""

    config: ModelConfig
    embed: nn.Embedding
    norm: RMSNorm
    lm_head: nn.Linear
    supports_kv_cache = False  # whether trunk takes cache= (a KVCache); generation recomputes the window otherwise
    couples_tokens = False  # whether a token's output depends on the other tokens (other rows too) of a call

    def trunk(self, idx: torch.Tensor, n_layers: int | None = None) -> torch.Tensor:
        raise NotImplementedError

    def num_params(self, non_embedding: bool = False) -> int:
        """Parameter count; ``non_embedding`` leaves out the input embedding."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding and not self.config.tie_embeddings:
            n -= self.embed.weight.numel()
        return n

    def hidden_states(self, idx: torch.Tensor) -> torch.Tensor:
        """Final normed hidden states ``[B, T, D]`` (input of the LM head)."""
        return self.norm(self.trunk(idx))

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        logits = self.lm_head(self.hidden_states(idx))
        if targets is None:
            return logits, None
        return logits, cross_entropy(logits.flatten(0, 1), targets.flatten())


class GPT(CausalLM):
    """Decoder-only transformer.

    ``forward(idx)`` returns logits ``[B, T, V]``; ``forward(idx, targets)`` also
    returns the mean cross-entropy. ``targets[b, t]`` is the token that follows
    ``idx[b, t]`` (the data loader does the one-token shift); positions whose
    target is ``-100`` are ignored.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        cfg.validate()
        converted = [f for f, on in (("ffn = relu2_24", cfg.ffn == "relu2_24"),
                                     ("hyper_connections", cfg.hyper_connections)) if on]
        if converted:
            raise ConfigError(f"GPT(cfg) builds the plain decoder; model.{converted[0]} is applied by "
                              "sparsetrain.build.build_model(cfg)")
        self.config = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        # the residual streams' entry scales and read-out, set by sparsetrain.hyper's converter
        self.hyper_in: nn.Parameter | None = None
        self.hyper_out: nn.Parameter | None = None
        self.hyper_stream_dtype: torch.dtype | None = None  # streams stored narrower than the model (None: its dtype)
        cos, sin = rope_tables(cfg.seq_len, cfg.head_dim, cfg.rope_theta)
        # Not saved in checkpoints: they are a pure function of the config.
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.reset_parameters()

    @property
    def couples_tokens(self) -> bool:  # type: ignore[override]
        """Whether a block's FFN couples the tokens of a call, every row's alike (the
        transposable 2:4 methods' patterns span tokens): then neither a KV cache nor
        rows sampled together give what one window's forward gives."""
        return any(getattr(block.ffn, "couples_tokens", False) for block in self.blocks)

    @property
    def supports_kv_cache(self) -> bool:  # type: ignore[override]
        """Whether decoding from a :class:`KVCache` gives the whole window's forward:
        not where the tokens of a call are coupled (:attr:`couples_tokens`)."""
        return not self.couples_tokens

    def reset_parameters(self) -> None:
        """Normal(0, init_std) everywhere; residual-output projections are scaled
        by 1/sqrt(2 * n_layer) so the residual stream's variance does not grow
        with depth (GPT-2)."""
        std = self.config.init_std
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, 0.0, std)
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)
        for block in self.blocks:
            for proj in (block.attn.proj, block.ffn.down):
                nn.init.normal_(proj.weight, 0.0, std / math.sqrt(2 * self.config.n_layer))

    def trunk(self, idx: torch.Tensor, n_layers: int | None = None, cache: KVCache | None = None) -> torch.Tensor:
        """Residual stream after the first ``n_layers`` blocks (all by default),
        before the final norm: ``[B, T, D]``. With ``cache``, ``idx`` continues the
        positions it holds (see :class:`KVCache`)."""
        B, T = idx.shape
        start = cache.length if cache is not None else 0
        if cache is not None and (n_layers is not None or len(cache.layers) != len(self.blocks)):
            raise ValueError(f"a KVCache of {len(cache.layers)} layers runs every one of the {len(self.blocks)} "
                             f"blocks (n_layers={n_layers})")
        if start + T > self.config.seq_len:
            raise ValueError(f"sequence length {start + T} exceeds the model's seq_len {self.config.seq_len}")
        cos, sin = self.rope_cos[start : start + T], self.rope_sin[start : start + T]
        x = self.embed(idx)
        streams = self.hyper_in is not None
        if streams:  # streams = the embedding at distinct learned scales (identical streams would make H_res dead)
            x = spread_streams(x, self.hyper_in)
            if self.hyper_stream_dtype is not None:
                x = x.to(self.hyper_stream_dtype)
        if cache is None:
            for block in self.blocks[:n_layers]:
                x = block(x, cos, sin)
        else:
            mask = cache.key_mask(start + T, T, idx.device)
            for block, kv in zip(self.blocks[:n_layers], cache.layers):
                x = block(x, cos, sin, kv, mask)
            cache.length += T
        return self.read_out(x) if streams else x

    def read_out(self, streams: torch.Tensor) -> torch.Tensor:
        """The hyper-connection streams' learned read-out, ``[..., n, D] -> [..., D]``
        (a plain mean would leave the last ``H_res`` without gradient: its columns sum to 1)."""
        out = read_streams(streams, self.hyper_out)
        return out.to(self.hyper_out.dtype) if self.hyper_stream_dtype is not None else out

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs per token: 6 * (matmul params) + attention scores,
        12 * n_layer * d_model * seq_len (PaLM appendix B; causal masking is
        not discounted, as is customary for MFU)."""
        cfg = self.config
        T = seq_len or cfg.seq_len
        n_matmul = self.num_params() - self.embed.weight.numel() - sum(
            p.numel() for m in self.modules() if isinstance(m, RMSNorm) for p in m.parameters()
        )
        if cfg.tie_embeddings:
            n_matmul += self.embed.weight.numel()
        return 6.0 * n_matmul + 12.0 * cfg.n_layer * cfg.d_model * T
