"""The ``relu2_24`` FFN: up-projection -> ReLU^2 -> 2:4 along the hidden dimension
-> down-projection, with the training backward of Haziza et al. (2025), as a
masked-dense reference implementation (exact on CPU; the numerics any
sparse-tensor-core path must reproduce).

Backward, for ``y = S(relu(x W_up^T)^2) W_down^T`` with ``S`` the forward 2:4:

* the forward mask stays on the gradient: values pruned in the forward never
  get a gradient (MVUE's kept values carry their ``1/p``, S-STE its scale);
* the weight-gradient products ``dW_down = dy^T s`` and ``dW_up = du^T x``
  take their ``[features, tokens]`` operand (``s^T``, ``du^T``) pruned 2:4 along
  the token dimension, except the densest ``dense_fraction`` of features,
  which stay dense -- that is what lets those GEMMs use sparse tensor cores;
* a fixed random token permutation is applied before the FFN and undone
  after it, so the token groups of four are not neighbouring positions.

``token_24=False`` turns the token-wise pruning off; the gradients are then
exactly autograd's for the masked forward (the test's float64 reference).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import kernels
from ..model import relu_squared, upcast
from ..optim import StepCounted
from ..rows import permute_rows
from . import cslt_plans, cusparselt, packing
from .custom_ops import ffn_op
from .sparsify import naive_24, soft_threshold_scale, sparsify_24, sparsity_stats


def token_24(m: torch.Tensor, dense_features: torch.Tensor | None) -> torch.Tensor:
    """``m`` [N, h] pruned 2:4 along tokens (groups of 4 consecutive rows) for
    every feature except ``dense_features``; ``N`` is padded to a multiple of 4."""
    N, h = m.shape
    pad = (-N) % 4
    mt = F.pad(m.t(), (0, pad))  # [h, N + pad]
    pruned, _ = naive_24(mt)
    if dense_features is not None and dense_features.numel():
        pruned[dense_features] = mt[dense_features]
    return pruned[:, :N].t()


def densest_features(m: torch.Tensor, fraction: float) -> torch.Tensor | None:
    """Indices of the ``fraction`` of features (columns) with the most nonzeros."""
    k = int(round(fraction * m.shape[1]))
    if k <= 0:
        return None
    return (m != 0).sum(0).topk(k).indices


class _Sparse24FFN(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w_up, w_down, method, scale, generator, token_prune, dense_fraction, stats):  # type: ignore[override]
        u = F.linear(x, w_up)
        a = F.relu(u).square()
        s, mask = sparsify_24(a, method, scale, generator)
        if stats is not None:
            stats.update(sparsity_stats(a, s))
        # d s / d a on kept values: 1 (naive), 1/p (MVUE: s = a/p), scale (S-STE, straight through the threshold)
        if method == "mvue":
            factor = torch.where(mask, upcast(s) / upcast(a).clamp(min=1e-30), 0.0)
        elif method == "soft_threshold":
            factor = mask.to(upcast(s).dtype) * float(scale)  # not bool * float: that would round the scale to float32
        else:
            factor = mask.to(upcast(s).dtype)
        ctx.save_for_backward(x, u, s, factor, w_up, w_down)
        ctx.token_prune, ctx.dense_fraction = token_prune, dense_fraction
        return F.linear(s, w_down)

    @staticmethod
    def backward(ctx, dy):  # type: ignore[override]
        x, u, s, factor, w_up, w_down = ctx.saved_tensors
        dy = dy.to(s.dtype)
        ds = dy @ w_down.to(dy.dtype)
        du = (upcast(ds) * factor * 2 * F.relu(upcast(u))).to(s.dtype)
        s_w, du_w = s, du
        if ctx.token_prune:
            dense = densest_features(s, ctx.dense_fraction)
            s_w = token_24(s, dense)
            du_w = token_24(du, densest_features(du, ctx.dense_fraction))
        d_down = dy.t() @ s_w
        d_up = du_w.t() @ x.to(du.dtype)
        dx = du @ w_up.to(du.dtype)
        return dx, d_up.to(w_up.dtype), d_down.to(w_down.dtype), None, None, None, None, None, None


def _masked_kernel_forward(x: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor) -> tuple[torch.Tensor, ...]:
    with torch.autocast("cuda", enabled=False):
        u = F.linear(x, w_up.to(x.dtype))
        s, pattern = packing.mask_transposable(u)
        y = F.linear(s, w_down.to(x.dtype))
    return y, u, pattern


def _masked_kernel_backward(dy: torch.Tensor, x: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor,
                            u: torch.Tensor, pattern: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    with torch.autocast("cuda", enabled=False):
        dy = dy.to(x.dtype)
        wd = w_down.to(x.dtype)
        s, _ = packing.mask_transposable(u, pattern=pattern)  # recomputed, no search: instead of keeping [N, h]
        du, _ = packing.mask_transposable(u, dy @ wd, pattern)  # ds * 2 relu(u) on the forward's pattern
        d_down, d_up, dx = dy.t() @ s, du.t() @ x, du @ w_up.to(x.dtype)
    return dx, d_up.to(w_up.dtype), d_down.to(w_down.dtype)


# The transposable method on dense GEMMs: the Triton packing kernel writes the
# 2:4 activation, and in backward its gradient, densely (packing.mask_transposable).
# The same selection and products as the cuSPARSELt path, for widths where dense
# GEMMs are faster; a custom op pair (custom_ops.py), so torch.compile keeps it whole.
sparse24_ffn_masked_kernel = ffn_op(
    "ffn24_masked_kernel", _masked_kernel_forward, _masked_kernel_backward,
    lambda x, w_up, w_down: (x.new_empty(x.shape[0], w_up.shape[0]),
                             x.new_empty(x.shape[0] // 4, w_up.shape[0] // 4, dtype=torch.uint8)))


# Outside torch.compile: dynamo cannot trace a torch.Generator, and on the GPU
# the break it made here inside a compiled model cascaded through the enclosing
# frames ("failed to handle graph break gracefully ... falling back to eager").
# Disabled, it is one clean break per layer, but dynamo keeps that split after
# the permutation is cached (the outer frames never re-trace), so the trainer
# and the benches make the permutations before compiling (prepare_ffns).
@torch.compiler.disable
def _token_permutation(n: int, seed: int, device: torch.device, compiling: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed pseudo-random permutation of ``n`` tokens and its inverse."""
    if compiling:
        warnings.warn(f"sparsetrain: the 2:4 FFN's token permutation for {n} tokens was made inside torch.compile, "
                      "which splits the compiled model at every such layer for good; call "
                      "sparse24.prepare_ffns(model, n_tokens) before the first compiled call",
                      stacklevel=2)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed + n))
    return perm.to(device), torch.argsort(perm).to(device)


def prepare_ffns(model: nn.Module, n_tokens: int) -> None:
    """Make what every 2:4 FFN of ``model`` makes once, before ``torch.compile``
    or CUDA graphs see the model: the token permutation for ``n_tokens`` tokens
    per call (micro-batch x sequence length), on the FFN's device, and on CUDA
    the packing kernel's pattern table (:func:`.packing.pattern_table`).

    Made inside a compiled call instead, the permutation is a graph break, and
    dynamo keeps the split it made there for good: the model runs as several
    graphs per layer instead of one graph. Made inside a
    CUDA-graph warm-up, the pattern table is an untracked tensor in the graphs'
    memory pool, and cudagraph trees stop the step with an error."""
    for module in model.modules():
        if isinstance(module, Sparse24FFN):
            device = module.up.weight.device
            module._permutation(n_tokens, device)
            if device.type == "cuda":
                packing.pattern_table(device)


def _half_dtype(x: torch.Tensor) -> torch.dtype | None:
    """The 16-bit dtype a CUDA product of ``x`` runs in (autocast's, or ``x``'s own), else None."""
    if not x.is_cuda:
        return None
    if torch.is_autocast_enabled("cuda"):
        return torch.get_autocast_dtype("cuda")
    return x.dtype if x.dtype in (torch.float16, torch.bfloat16) else None


# token counts of recomputed calls (Sparse24FFN.recompute_context) whose
# permutation stays cached: each is a host-made randperm and a copy to the device
RECOMPUTED_PERMUTATIONS = 4


class Sparse24FFN(StepCounted):
    """``down(S_24(relu(up(x))^2))`` on ``[B, T, d]``; dense (plain relu2) until
    ``dense_warmup_steps`` calls of :meth:`step` have happened."""

    def __init__(self, d_model: int, hidden: int, method: str = "naive", dense_warmup_steps: int = 1000,
                 dense_fraction: float = 0.05, token_prune: bool = True, seed: int = 0,
                 policy: kernels.KernelPolicy | None = None, up: nn.Linear | None = None,
                 down: nn.Linear | None = None) -> None:
        """``policy``: the kernel policy the forward dispatches by (default: the
        current one at each call, :func:`sparsetrain.kernels.current`). ``up``,
        ``down``: existing projections to take over (a dense FFN's, converted), so
        no new weights are drawn."""
        super().__init__()
        if hidden % 4:
            raise ValueError(f"hidden size must be a multiple of 4 for 2:4 sparsity, got {hidden}")
        self.up = up if up is not None else nn.Linear(d_model, hidden, bias=False)
        self.gate = None  # the FFN interface the rest of sparsetrain reads (no SwiGLU gate here)
        self.down = down if down is not None else nn.Linear(hidden, d_model, bias=False)
        if self.up.weight.shape != (hidden, d_model) or self.down.weight.shape != (d_model, hidden):
            raise ValueError(f"up {tuple(self.up.weight.shape)} and down {tuple(self.down.weight.shape)} "
                             f"are not the projections of a {d_model} -> {hidden} FFN")
        self.policy = policy
        self.method, self.dense_warmup_steps = method, dense_warmup_steps
        self.dense_fraction, self.token_prune = dense_fraction, token_prune
        self.init_step_count()  # steps (saved) and its host copy: resume continues the warmup
        self.register_buffer("scale", torch.zeros(()))  # S-STE scale, fixed at the first sparse call
        # its host copy, which the forward reads: reading the buffer would be a host sync and a
        # graph break on every call of the masked-dense path
        self._scale = 0.0
        self.generator = torch.Generator().manual_seed(seed)
        self.seed = seed
        self._perms: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # tokens per call -> permutation, inverse
        self.track_stats = False  # set by the trainer on log steps: fills last_stats at the next forward
        self.last_stats: dict[str, torch.Tensor] = {}  # 0-dim tensors (sparsity_stats): read when logged
        self.last_backend = "dense"  # dense (warmup), masked_dense, masked_kernel or cusparselt
        self._recomputed_counts: list[int] = []  # token counts whose permutation a recomputation made, oldest first

    @property
    def couples_tokens(self) -> bool:
        """Whether a token's output depends on the other tokens of the same call: the
        transposable methods choose the 2:4 pattern over 4 x 4 tiles of [tokens,
        hidden], so decoding from a KV cache (one token per call) would not give the
        whole window's forward."""
        return self.method.startswith("transposable")

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:  # type: ignore[override]
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if prefix + "scale" in state_dict:
            self._scale = float(state_dict[prefix + "scale"])

    def _count_changed(self) -> None:
        # a bool that flips once, at the warmup's end: the forward reads this, not
        # the step count, which torch.compile would recompile for at every step
        self._sparse = self._steps >= self.dense_warmup_steps

    @property
    def sparse(self) -> bool:
        """Whether the forward runs 2:4 (the dense warmup is over)."""
        return self._sparse

    @contextlib.contextmanager
    def recompute_context(self) -> Iterator[None]:
        """For a forward run again on some of the tokens (Collider's exact
        backward recomputes position-wise maps on the kept rows,
        collider/positionwise.py): the statistics and the backend record keep
        describing the real forward, and only the :data:`RECOMPUTED_PERMUTATIONS`
        latest token counts of such calls keep their permutation (Collider's
        kept count changes from step to step)."""
        saved = self.track_stats, self.last_stats, self.last_backend
        before = set(self._perms)
        self.track_stats = False
        try:
            yield
        finally:
            self.track_stats, self.last_stats, self.last_backend = saved
            for n in set(self._perms) - before:
                self._recomputed_counts.append(n)
            while len(self._recomputed_counts) > RECOMPUTED_PERMUTATIONS:
                self._perms.pop(self._recomputed_counts.pop(0), None)

    def _permutation(self, n: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        # one per token count (training and evaluation may differ), so that neither evicts the other
        cached = self._perms.get(n)
        if cached is None or cached[0].device != device:
            cached = self._perms[n] = _token_permutation(n, self.seed, device, torch.compiler.is_compiling())
        return cached

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.sparse:
            return self.down(relu_squared(self.up(x)))
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        perm, inv = self._permutation(flat.shape[0], flat.device)
        half = _half_dtype(flat)
        fast = self.method == "transposable" and half is torch.bfloat16
        if fast:  # cast, then permute: the rows move in bf16, half the bytes of the float32 norm output
            flat = flat.to(half)
        xp = permute_rows(flat, perm, inv)
        if self.method == "soft_threshold" and self._scale == 0.0:
            with torch.no_grad():
                self.scale.fill_(soft_threshold_scale(F.relu(F.linear(xp, self.up.weight)).square()))
            self._scale = float(self.scale)  # once; as stored (float32), so a resumed run reads the same value
        stats: dict[str, torch.Tensor] | None = {} if self.track_stats else None
        if fast:
            # cast here, not inside the ops: autograd (or the compiled graph) then keeps the
            # bf16 weights for the backward as autocast's dense products do. Cast inside the
            # opaque op, each weight would be cast again in its backward, and every cast would
            # run on torch's copy kernels rather than inductor's (profiles of both:
            # bench/results/sparse24_steps_weight_casts_{in_op_,}h200.json)
            w_up, w_down = self.up.weight.to(half), self.down.weight.to(half)
        # cuSPARSELt from the policy's width up (where it beats the masked kernel in the step);
        # below it the transposable method runs the same selection on dense GEMMs
        min_width = (self.policy or kernels.current()).cusparselt_min_width
        if fast and cusparselt.supported(xp, w_up) and xp.shape[1] >= min_width:
            self.last_backend = "cusparselt"
            y = cusparselt.sparse24_ffn_cusparselt(xp, w_up, w_down)
        elif fast and packing.triton_ok(xp) and xp.shape[0] % 64 == 0 and w_up.shape[0] % 64 == 0:
            self.last_backend = "masked_kernel"
            y = sparse24_ffn_masked_kernel(xp, w_up, w_down)
        else:
            self.last_backend = "masked_dense"
            gen = self.generator if flat.device.type == "cpu" else None
            # transposable masks are 2:4 along tokens already: the weight gradients need no second pruning
            token_prune = self.token_prune and self.training and not self.method.startswith("transposable")
            y = _Sparse24FFN.apply(xp, self.up.weight, self.down.weight, self.method, self._scale, gen,
                                   token_prune, self.dense_fraction, stats)
        if stats is not None:
            if self.last_backend != "masked_dense":  # both fast paths choose the same patterns: one dense view
                stats.update(fast_path_stats(xp.detach(), w_up.detach()))
            self.last_stats = stats
        return permute_rows(y, inv, perm).reshape(*shape[:-1], -1)  # undo the permutation


STAT_NAMES = ("activation_sparsity", "groups_already_24", "pruned_beyond_relu")
# tokens the fast paths' statistics count (the first rows of the permuted tokens, a
# random sample): the up-projection and the selection run again for them, which
# for all 16k tokens of a d20 step would add about 1% to every step at log_every 10
STATS_TOKENS = 4096


# An opaque custom op, so a compiled model stays one graph on logged steps too.
# Not a torch.compiler.disable'd function: that is a graph break in every FFN, and
# dynamo recompiles the resume frame after it on every logged step ("cache line
# invalidated": the frame guards on the stats dict, new each call) until its
# recompile limit, after which those steps' FFN tails run eagerly.
@torch.library.custom_op("sparsetrain::ffn24_fast_path_stats", mutates_args=())
def _fast_path_stats_op(x: torch.Tensor, w_up: torch.Tensor) -> torch.Tensor:
    with torch.no_grad(), torch.autocast(x.device.type, enabled=False):
        u = F.linear(x, w_up)
        stats = sparsity_stats(F.relu(u).square(), packing.mask_transposable(u)[0])
        return torch.stack([stats[k].float() for k in STAT_NAMES])


@_fast_path_stats_op.register_fake
def _(x: torch.Tensor, w_up: torch.Tensor) -> torch.Tensor:
    return x.new_empty(len(STAT_NAMES), dtype=torch.float32)


def fast_path_stats(x: torch.Tensor, w_up: torch.Tensor) -> dict[str, torch.Tensor]:
    """:func:`.sparsify.sparsity_stats` of the fast paths' activation for the
    first :data:`STATS_TOKENS` rows of ``x`` (the FFN passes its permuted tokens,
    so a random sample) and up-projection ``w_up``, without gradient: a dense
    view of the transposable selection, which both fast paths make alike.
    0-dim tensors, no host sync; one opaque node under torch.compile (the
    up-projection and the selection run again, on logged steps only)."""
    return dict(zip(STAT_NAMES, _fast_path_stats_op(x[:STATS_TOKENS], w_up).unbind()))


def cuda_graphs_ok(model: nn.Module, device: torch.device) -> bool:
    """Whether ``model``'s ``relu2_24`` FFNs can run under CUDA graphs on
    ``device``; builds or loads the cached-plan extension where it applies.

    False only where a transposable FFN would multiply through torch's
    ``_cslt_sparse_mm``: a step with it fails capture ("tensor in the cudagraph
    pool not tracked as outputs"); with the cached plans of :mod:`.cslt_plans`
    it is captured (bench/results/cslt_plans_d20_graphs_h200.json)."""
    if device.type != "cuda" or not cusparselt.cusparselt_available():
        return True
    if not any(isinstance(m, Sparse24FFN) and m.method == "transposable" for m in model.modules()):
        return True
    return cslt_plans.load() is not None
