"""mHC-lite hyper-connections: ``n`` residual streams instead of one.

Around every sublayer (attention, FFN) of a block, with streams ``X [..., n, D]``:

    x_in   = sum_i h_pre_i X_i                       (what the sublayer reads)
    X_new  = H_res X + h_post (outer) F(x_in)       (what it writes back)

``H_res`` is a convex combination of the ``n!`` permutation matrices
(softmax weights), so it is exactly doubly stochastic with no Sinkhorn
iterations (mHC-lite, arXiv 2601.05732); ``h_pre = sigmoid(a)`` and
``h_post = 2 sigmoid(b)`` are per-sublayer gains as in mHC (arXiv 2512.24880).

Init. Every sublayer writes its output to every stream with gain 1
(``h_post = 2 sigmoid(0)``; ``model.hyper_write_init = "every_stream"``), so each
stream holds the embedding plus every earlier sublayer's output, as the one
residual stream of a plain GPT does: Hyper-Connections' (arXiv 2409.19606)
start, which with the reads made one-hot and ``H_res = I`` is a Pre-Norm
residual exactly. ``"next_stream"``, what runs saved without the field used,
writes mostly to stream ``(l + 1) mod n``: at ``n = 2``, where ``H_res`` starts
within 2% of the identity, a sublayer then sees little more than half of the
earlier outputs; at ``n = 2`` it trained worse per step than every_stream on
four seeds of a small CPU model (docs/hyper_connections.md).

Symmetry: a doubly stochastic ``H_res`` maps identical streams to themselves,
so with identical streams the mixing weights get exactly zero gradient. The
init breaks it: the streams start as the embedding at distinct learned scales
(``GPT.hyper_in``), sublayer ``l`` reads mostly stream ``l mod n``, ``H_res``
starts near the identity, and the output is a learned read-out
(``GPT.hyper_out``; a plain mean would leave the last ``H_res`` without
gradient, since its columns also sum to 1).

The weights are per layer, the same for every token, so a block's mixing is
three passes over the streams (read; write and the next read; write), each
one node of :mod:`sparsetrain.hyper_mixing`, in the streams' own dtype
(``model.hyper_stream_dtype``: float32 by default, or bfloat16).

``model.hyper_connections = n`` is applied to a built GPT by
:func:`add_hyper_connections` (:func:`sparsetrain.build.build_model` does it);
:func:`check_model_config` owns the field's check.
"""

from __future__ import annotations

import itertools
import math

import torch
import torch.nn as nn

from . import hyper_mixing
from .config import ModelConfig, require
from .model import GPT
from .numerics import upcast

STREAM_COUNTS = (0, 2, 4)
WRITE_INITS = ("every_stream", "next_stream")
# the streams' storage: float32 as the plain residual stream under autocast, or bfloat16,
# which halves the traffic that sets the mixing's cost (every pass reads and writes all n
# streams); the mixing sums in float32 either way and rounds its result once
STREAM_DTYPES = ("float32", "bfloat16")


def permutation_matrices(n: int) -> torch.Tensor:
    """All ``n!`` permutation matrices ``[n!, n, n]``, identity first."""
    perms = list(itertools.permutations(range(n)))
    out = torch.zeros(len(perms), n, n)
    for k, p in enumerate(perms):
        out[k, torch.arange(n), torch.tensor(p)] = 1.0
    return out


class HyperConnection(nn.Module):
    """The mixing of one sublayer: the ``index``-th of the model (attention and FFN
    counted apart), ``n`` streams, written at init as ``write_init`` says (one of
    :data:`WRITE_INITS`; the module docstring says why)."""

    def __init__(self, n: int, index: int, write_init: str = "every_stream") -> None:
        super().__init__()
        self.n = n
        self.register_buffer("perms", permutation_matrices(n), persistent=False)
        res = torch.zeros(math.factorial(n))
        res[0] = 4.0  # identity permutation first: H_res starts close to I
        self.res_logits = nn.Parameter(res)
        pre = torch.full((n,), -3.0)
        pre[index % n] = 3.0
        self.pre_logits = nn.Parameter(pre)
        if write_init == "every_stream":
            post = torch.zeros(n)  # h_post = 1 on every stream
        elif write_init == "next_stream":
            post = torch.full((n,), -3.0)
            post[(index + 1) % n] = 3.0
        else:
            raise ValueError(f"write_init must be one of {', '.join(WRITE_INITS)}, got {write_init!r}")
        self.post_logits = nn.Parameter(post)
        self.widen_reads = False  # set for streams stored in bfloat16 (add_hyper_connections)

    def perm_weights(self) -> torch.Tensor:
        return torch.softmax(upcast(self.res_logits), 0)

    def h_res(self) -> torch.Tensor:
        """``[n, n]``, doubly stochastic by construction. A weighted sum, not an einsum:
        under autocast an einsum is a 16-bit GEMM, whose rounding leaves rows and
        columns summing to 1 only within 2^-8."""
        w = self.perm_weights()
        return (w[:, None, None] * self.perms.to(w.dtype)).sum(0)

    def h_pre(self) -> torch.Tensor:
        return torch.sigmoid(upcast(self.pre_logits))

    def h_post(self) -> torch.Tensor:
        return 2 * torch.sigmoid(upcast(self.post_logits))

    def forward(self, streams: torch.Tensor) -> torch.Tensor:
        """Read: ``[..., n, D] -> [..., D]`` (a forward, so hooks can see the streams)."""
        return self._widened(hyper_mixing.read(streams, self.h_pre()))

    def _widened(self, read: torch.Tensor) -> torch.Tensor:
        """A read from streams stored narrower than the model (``widen_reads``: the
        ``bfloat16`` stream dtype) in the model's own dtype, so that the sublayer
        reading it meets its weights' dtype with or without autocast."""
        return read.to(self.pre_logits.dtype) if self.widen_reads else read

    def write(self, streams: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """Write the sublayer output ``out [..., D]``: ``H_res X + h_post (outer) out``."""
        return hyper_mixing.write(streams, out, self.h_res(), self.h_post())

    def read_through(self, streams: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(self(streams), streams)`` as one node, so the backward adds the gradient
        reaching the returned streams to the read's in one pass
        (:func:`~sparsetrain.hyper_mixing.read_through`)."""
        if self._hooked():  # hooks see the read as a forward call
            return self(streams), streams
        a, y = hyper_mixing.read_through(streams, self.h_pre())
        return self._widened(a), y

    def write_then_read(self, streams: torch.Tensor, out: torch.Tensor, reader: HyperConnection
                        ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(y, reader(y))`` for ``y = self.write(streams, out)``: the next sublayer's
        read in the same pass over the streams (:func:`~sparsetrain.hyper_mixing.write_then_read`)."""
        if self._hooked() or reader._hooked():  # hooks see the read as a forward call
            y = self.write(streams, out)
            return y, reader(y)
        y, a = hyper_mixing.write_then_read(streams, out, self.h_res(), self.h_post(), reader.h_pre())
        return y, reader._widened(a)

    def _hooked(self) -> bool:
        return bool(self._forward_pre_hooks or self._forward_hooks or nn.modules.module._global_forward_pre_hooks
                    or nn.modules.module._global_forward_hooks)


def check_model_config(cfg: ModelConfig) -> None:
    """The config fields this technique owns (``model.hyper_connections``,
    ``model.hyper_write_init``)."""
    require(cfg.hyper_connections in STREAM_COUNTS,
            f"model.hyper_connections must be 0, 2 or 4, got {cfg.hyper_connections}")
    require(cfg.hyper_write_init in WRITE_INITS,
            f"model.hyper_write_init must be {' or '.join(WRITE_INITS)}, got {cfg.hyper_write_init!r}")
    require(cfg.hyper_stream_dtype in STREAM_DTYPES,
            f"model.hyper_stream_dtype must be {' or '.join(STREAM_DTYPES)}, got {cfg.hyper_stream_dtype!r}")


def add_hyper_connections(model: GPT, n: int, write_init: str = "every_stream", stream_dtype: str = "float32") -> GPT:
    """Give ``model`` ``n`` residual streams: a :class:`HyperConnection` around each
    block's attention (``hc_attn``) and FFN (``hc_ffn``), and the streams' entry
    scales (``hyper_in``) and read-out (``hyper_out``), initialised as the module
    docstring says (no random draws); the streams stored in ``stream_dtype``
    (:data:`STREAM_DTYPES`). In place; returns ``model``."""
    if model.hyper_in is not None:
        raise ValueError("model already has hyper-connections")
    if stream_dtype not in STREAM_DTYPES:
        raise ValueError(f"stream_dtype must be one of {', '.join(STREAM_DTYPES)}, got {stream_dtype!r}")
    for index, block in enumerate(model.blocks):
        block.hc_attn = HyperConnection(n, 2 * index, write_init)
        block.hc_ffn = HyperConnection(n, 2 * index + 1, write_init)
        block.hc_attn.widen_reads = block.hc_ffn.widen_reads = stream_dtype != "float32"
    device = model.embed.weight.device
    model.hyper_in = nn.Parameter(torch.linspace(1.0, 0.5, n, device=device))
    out = torch.linspace(1.5, 0.5, n, device=device)
    model.hyper_out = nn.Parameter(out / out.sum())  # unequal, summing to 1
    if stream_dtype != "float32":  # float32: the streams keep the embedding's dtype, as the plain residual
        model.hyper_stream_dtype = getattr(torch, stream_dtype)
    return model


# ----------------------------------------------------------------------------- analysis

# Health thresholds, and why:
#  - permutation entropy below 5% of its maximum log(n!) means H_res has
#    collapsed onto one permutation: the streams no longer exchange anything;
#  - stream divergence below 1e-3 means the streams are copies: n-fold memory
#    for the work of one (and the mixing weights get no gradient);
#  - a read gain (h_pre summed over the streams) or a write gain (h_post's mean
#    over the streams: 1 where every stream gets the output once, as a plain
#    residual does) below 0.05 means a sublayer is (nearly) cut off from the
#    streams. There is no upper threshold: the sigmoids bound every gain (h_pre
#    below 1 and h_post below 2 per stream) and H_res is doubly stochastic, so
#    the mixing cannot amplify without limit.
MIN_ENTROPY_FRACTION = 0.05
MIN_DIVERGENCE = 1e-3
MIN_GAIN = 0.05


def stream_divergence(streams: torch.Tensor) -> float:
    """Mean over pairs ``i != j`` of ``||s_i - s_j|| / ||s_i||`` (streams ``[..., n, D]``)."""
    n = streams.shape[-2]
    s = streams.reshape(-1, n, streams.shape[-1]).transpose(0, 1).reshape(n, -1).double()
    vals = [float((s[i] - s[j]).norm() / s[i].norm().clamp(min=1e-30)) for i in range(n) for j in range(n) if i != j]
    return sum(vals) / len(vals)


def analyze_layer(hc: HyperConnection, streams: torch.Tensor | None = None) -> dict:
    """Numbers for one sublayer's mixing: permutation weights and their entropy,
    the read gain (h_pre's sum) and the write gain (h_post's mean), gradient
    norms of the mixing parameters and, given the streams it read, their
    divergence."""
    w = hc.perm_weights().detach()
    entropy = float(-(w * w.clamp(min=1e-30).log()).sum())
    out = {
        "perm_weights": w.tolist(),
        "perm_entropy": entropy,
        "perm_entropy_fraction": entropy / math.log(w.numel()),
        "h_pre": hc.h_pre().detach().tolist(),
        "h_post": hc.h_post().detach().tolist(),
        "read_gain": float(hc.h_pre().detach().sum()),
        "write_gain": float(hc.h_post().detach().mean()),  # per stream: 1 for a plain residual's write
        "grad_norm": {name: (float(p.grad.norm()) if p.grad is not None else 0.0)
                      for name, p in (("res", hc.res_logits), ("pre", hc.pre_logits), ("post", hc.post_logits))},
    }
    if streams is not None:
        out["stream_divergence"] = stream_divergence(streams)
    return out


def analyze_model(connections: list[HyperConnection], streams: list[torch.Tensor] | None = None) -> dict:
    """Model-wide report with a health verdict (thresholds above)."""
    layers = [analyze_layer(hc, streams[i] if streams else None) for i, hc in enumerate(connections)]
    composed = torch.eye(connections[0].n, dtype=torch.float64)
    for hc in connections:  # on the CPU in float64: a tiny n x n product, wherever the model lives
        composed = hc.h_res().detach().cpu().double() @ composed
    problems = []
    for i, l in enumerate(layers):
        if l["perm_entropy_fraction"] < MIN_ENTROPY_FRACTION:
            problems.append(f"sublayer {i}: H_res collapsed onto one permutation")
        if min(l["read_gain"], l["write_gain"]) < MIN_GAIN:
            problems.append(f"sublayer {i}: read or write gain below {MIN_GAIN} (cut off from the streams)")
        if "stream_divergence" in l and l["stream_divergence"] < MIN_DIVERGENCE:
            problems.append(f"sublayer {i}: streams are copies of each other")
    return {
        "layers": layers,
        # a product of doubly stochastic matrices is doubly stochastic: its 2-norm is 1 (no blow-up with depth)
        "composed_res_gain": float(torch.linalg.matrix_norm(composed, ord=2)),
        "composed_res_distance_from_identity": float((composed - torch.eye(composed.shape[0])).norm()),
        "healthy": not problems,
        "problems": problems,
    }


@torch.no_grad()
def report(model: nn.Module, idx: torch.Tensor) -> dict:
    """:func:`analyze_model` for every hyper-connection of ``model``, with the
    streams each one read on the batch ``idx``."""
    connections = [m for m in model.modules() if isinstance(m, HyperConnection)]
    seen: list[torch.Tensor] = []
    hooks = [hc.register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach())) for hc in connections]
    try:
        model(idx)
    finally:
        for h in hooks:
            h.remove()
    return analyze_model(connections, seen)
