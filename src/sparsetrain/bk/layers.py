"""ResNet-BK layers: an MoE FFN produces a potential, BK-Core mixes it along the
sequence, and a 2 -> D projection writes the resolvent features back.

``MoEResNetBKLayer``: ``h = MoE(x)``, ``v = v_max * tanh(Linear(h) / v_max)``,
``y = h + scale * Linear(2, D)(bk_core(v))``. The tanh bound keeps the potential
in a physically sensible range with a gradient everywhere (a hard clamp would
zero it); the op itself is exact for any finite ``v``.

``SparseMoEResNetBKLayer`` learns which positions deserve the MoE FFN at all:

* an importance predictor (Linear -> ReLU -> Linear) scores each position;
* a Gumbel-sigmoid with temperature ``tau`` gives soft keep probabilities, and
  the hard mask passes a straight-through gradient (``hard + soft - soft.detach()``
  is exactly ``hard`` in the forward), so both the LM loss and the sparsity loss
  train the predictor;
* only computed positions go through the MoE FFN, the potential projection
  and the feature projection (gather -> compute -> scatter): at sparsity ``s``
  those cost ``1 - s`` of the dense layer. On the grouped-GEMM path (CUDA,
  bf16) the threshold mask instead parks skipped rows past the MoE's last
  expert group, where the GEMMs do no work: no host sync, fixed shapes, but
  the row-wise work outside the GEMMs runs on every row;
* a causal Conv1d interpolation network fills the potential at skipped
  positions from the computed ones to their left, and BK-Core then runs
  exactly over every position;
* skipped positions add nothing to the residual stream.

Mask modes: ``threshold`` (position ``i`` is computed when its own noisy logit
is positive; causal, the LM default, sparsity learned toward the target) and
``topk`` (exactly ``round((1 - s) N)`` positions per sequence; the choice reads
the whole sequence, so it is non-causal -- for timing at a fixed sparsity).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import ConfigError
from ..model import relu_squared, upcast
from ..optim import StepCounted
from ..rows import gather_rows
from .core import DEFAULT_Z, bk_core
from .relu_squared_rows import relu_squared_rows

SPARSITY_LOSSES = ("l2", "l1", "kl", "adaptive")

MASK_MODES = ("threshold", "topk")


class MoEFFN(nn.Module):
    """Top-1 mixture of squared-ReLU experts. The chosen expert's output is
    multiplied by its softmax gate probability, so the router gets a gradient
    (Switch Transformer's differentiable gating).

    ``grouped_mm``: a stand-in for ``torch._grouped_mm`` (the CPU tests' float64
    reference); None uses torch's own wherever it applies (CUDA, bf16)."""

    def __init__(self, d_model: int, hidden: int, num_experts: int) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.router = nn.Linear(d_model, num_experts, bias=False)
        self.up = nn.Parameter(torch.empty(num_experts, hidden, d_model))
        self.down = nn.Parameter(torch.empty(num_experts, d_model, hidden))
        self.grouped_mm: Callable | None = None
        self.limit_relu_rows = True  # grouped path: ReLU² skips the parked rows (False: a pass over the whole buffer, a benchmark baseline)
        std = 0.02
        nn.init.normal_(self.up, 0.0, std)
        nn.init.normal_(self.down, 0.0, std)

    def grouped(self, x: torch.Tensor) -> tuple[torch.dtype, Callable] | None:
        """(compute dtype, grouped GEMM) when the sync-free grouped path applies to ``x``, else None."""
        if self.grouped_mm is not None:
            return x.dtype, self.grouped_mm
        cdt = _grouped_dtype(x)
        return None if cdt is None else (cdt, torch._grouped_mm)

    def forward(self, x: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        """``x[M, D] -> [M, D]``. ``keep[M]`` (bool, grouped path only): rows to
        compute; the others cost no GEMM work, come out 0 and pass no gradient
        (see :func:`grouped_experts`)."""
        probs = F.softmax(upcast(self.router(x)), dim=-1)
        gate, expert = probs.max(dim=-1)
        grouped = self.grouped(x)
        if keep is not None and grouped is None:
            raise ValueError("keep= needs the grouped-GEMM path (CUDA bf16, or a grouped_mm stand-in)")
        if self.num_experts == 1 and keep is None:
            return _expert(x, self.up[0], self.down[0]) * gate.unsqueeze(-1).to(x.dtype)
        if grouped is not None:
            cdt, gmm = grouped
            y = grouped_experts(x.to(cdt), expert, self.up.to(cdt), self.down.to(cdt), gmm, keep=keep,
                                limit_rows=self.limit_relu_rows)
            return y * gate.unsqueeze(-1).to(y.dtype)
        order = expert.argsort()
        counts = torch.bincount(expert, minlength=self.num_experts).tolist()  # one host sync per layer
        xs = x[order]
        # unbind once: indexing self.up[e] per expert would make each backward allocate a full [E, ...] gradient
        ups, downs = self.up.unbind(0), self.down.unbind(0)
        outs = [_expert_bucketed(chunk, ups[e], downs[e]) for e, chunk in enumerate(xs.split(counts)) if chunk.shape[0]]
        y_sorted = torch.cat(outs) if outs else xs
        y = torch.empty_like(y_sorted).index_copy_(0, order, y_sorted)
        return y * gate.unsqueeze(-1).to(y.dtype)


GROUP_ALIGN = 16  # rows per expert group are padded to a multiple of this for the grouped GEMM


def _grouped_dtype(x: torch.Tensor) -> torch.dtype | None:
    """bf16 when the grouped-GEMM path applies (CUDA, bf16 compute, torch has ``_grouped_mm``), else None."""
    if not x.is_cuda or not hasattr(torch, "_grouped_mm"):
        return None
    cdt = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else x.dtype
    return torch.bfloat16 if cdt is torch.bfloat16 else None


def grouped_experts(x: torch.Tensor, expert: torch.Tensor, up: torch.Tensor, down: torch.Tensor, gmm,
                    keep: torch.Tensor | None = None, limit_rows: bool = True) -> torch.Tensor:
    """All experts' ``down_e(relu(up_e x)^2)`` in two grouped GEMMs, with no host sync.

    ``x[M, D]``, ``expert[M]`` (each row's expert), ``up[E, H, D]``, ``down[E, D, H]``;
    ``gmm(a[R, K], b[E, K, N], offs)`` multiplies row group ``e`` (rows
    ``offs[e-1]:offs[e]``) by ``b[e]`` (``torch._grouped_mm``) and leaves the
    rows past ``offs[-1]`` uncomputed. Rows are sorted by expert into a buffer
    of a fixed size, each expert's group padded with zero rows to a multiple of
    :data:`GROUP_ALIGN`, so the offsets stay on the GPU: no host sync (the
    per-expert loop's row counts), no 2E small GEMMs, and the same shapes
    every step.

    ``keep[M]`` (bool): rows to compute. The others are parked past the last
    group, where the grouped GEMM does no work (its time follows the last
    offset: bench/results/grouped_mm_tail_h200.json), so
    the cost follows the kept count while every shape stays fixed -- a
    data-dependent skip with no host sync, which a CUDA graph can capture.
    What the GEMMs leave in the parked rows is undefined (it can be non-finite),
    so they are selected away with ``torch.where`` on the
    way in and out: they come out 0 and pass exactly 0 gradient.

    ``limit_rows``: the ReLU² between the GEMMs skips the rows past the last
    group too (:mod:`.relu_squared_rows`; ``False``: it runs over the whole
    buffer, a baseline for benchmarks)."""
    M, E = x.shape[0], up.shape[0]
    if keep is not None:
        x = torch.where(keep.unsqueeze(-1), x, 0)  # parked rows' gradient: 0, not what the GEMMs left there
        expert = torch.where(keep, expert, E)  # sentinel group E: sorted last, never multiplied
    order = expert.argsort()
    sorted_e = expert.index_select(0, order)
    counts = torch.zeros(E + 1, dtype=torch.long, device=x.device).scatter_add_(0, expert, torch.ones_like(expert))
    padded = torch.cat(((counts[:E] + GROUP_ALIGN - 1) // GROUP_ALIGN * GROUP_ALIGN, counts[E:]))
    start, pstart = counts.cumsum(0) - counts, padded.cumsum(0) - padded
    rows = M + E * GROUP_ALIGN  # >= the padded groups plus the parked rows, whatever the routing
    offs = padded[:E].cumsum(0).to(torch.int32)  # rows past offs[-1] (slack, parked) are not multiplied
    # each row's slot in the padded buffer (sorted position - group start + padded group start):
    # one scatter in and one gather out move the activations, and neither backward is an atomic add
    slot_sorted = torch.arange(M, device=x.device) - start.index_select(0, sorted_e) + pstart.index_select(0, sorted_e)
    slot = torch.empty_like(slot_sorted).index_copy_(0, order, slot_sorted)
    xp = x.new_zeros(rows, x.shape[1]).index_copy(0, slot, x)  # pad rows 0: they are multiplied
    pre = gmm(xp, up.transpose(1, 2), offs)
    # ReLU² on the grouped rows only (rows past offs[-1] are never read). Compiled with nothing
    # parked (dense, top-k) there is little to skip and inductor fuses its own ReLU², so under
    # torch.compile only the parked path takes the kernel.
    if limit_rows and (keep is not None or not torch.compiler.is_compiling()):
        h = relu_squared_rows(pre, offs[-1:])
    else:
        h = relu_squared(pre)
    y = gather_rows(gmm(h, down.transpose(1, 2), offs), slot)
    return y if keep is None else torch.where(keep.unsqueeze(-1), y, 0)


def _expert(x: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """One squared-ReLU expert: ``down(relu(up x)^2)``."""
    return F.linear(relu_squared(F.linear(x, up)), down)


ROW_BUCKET = 128  # expert batches are zero-padded to a multiple of this many rows


def _expert_bucketed(x: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """:func:`_expert` on ``x`` zero-padded to a multiple of :data:`ROW_BUCKET` rows.

    Routing changes every step, so unpadded expert batches have new row counts
    every call, and each new GEMM shape costs a cuBLAS heuristic lookup on the
    host (bench/results/bk_core_h200.json's profile). Padded, a layer sees a few
    shapes; rows are independent in a GEMM,
    so the real rows' results are the same."""
    pad = (-x.shape[0]) % ROW_BUCKET
    if pad == 0:
        return _expert(x, up, down)
    return _expert(F.pad(x, (0, 0, 0, pad)), up, down)[: x.shape[0]]


class MoEResNetBKLayer(nn.Module):
    """MoE FFN -> potential -> BK-Core features -> Linear(2, D), added to the FFN output."""

    def __init__(self, d_model: int, hidden: int, num_experts: int = 4, z: complex = DEFAULT_Z,
                 causal: bool = True, v_max: float = 3.0) -> None:
        super().__init__()
        self.moe = MoEFFN(d_model, hidden, num_experts)
        self.v_proj = nn.Linear(d_model, 1)
        self.feature_proj = nn.Linear(2, d_model)
        self.bk_scale = nn.Parameter(torch.ones(()))
        self.z, self.causal, self.v_max = complex(z), causal, v_max

    def potential(self, h: torch.Tensor) -> torch.Tensor:
        return self.v_max * torch.tanh(upcast(self.v_proj(h).squeeze(-1)) / self.v_max)

    def features(self, v: torch.Tensor) -> torch.Tensor:
        # |v| <= v_max by construction (tanh), so the op's overflow check (a host sync) is not needed
        return bk_core(v, self.z, causal=self.causal, check=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x[B, N, D] -> [B, N, D]`` (the caller adds the residual)."""
        B, N, D = x.shape
        h = self.moe(x.reshape(B * N, D)).reshape(B, N, D)
        feats = self.features(self.potential(h))
        return h + self.bk_scale * self.feature_proj(feats.to(h.dtype))


class SparseMoEResNetBKLayer(MoEResNetBKLayer, StepCounted):
    """:class:`MoEResNetBKLayer` that computes the MoE FFN and the feature path
    only where a learned Gumbel-sigmoid mask says so (see the module docstring).

    ``target_sparsity`` is the fraction of positions to skip; the sparsity
    schedule ramps it linearly from 0 over ``schedule_steps`` calls of
    :meth:`step`. At a current target of 0 every position is computed and the
    layer equals :class:`MoEResNetBKLayer` with the same weights.
    """

    STEP_BUFFER = "steps_done"  # the schedule's count, as checkpoints name it

    def __init__(self, d_model: int, hidden: int, num_experts: int = 4, z: complex = DEFAULT_Z,
                 causal: bool = True, v_max: float = 3.0, target_sparsity: float = 0.5,
                 sparsity_loss: str = "l2", sparsity_loss_weight: float = 0.1, tau: float = 1.0,
                 schedule_steps: int = 0, mask_mode: str = "threshold", interp_kernel: int = 5) -> None:
        super().__init__(d_model, hidden, num_experts, z, causal, v_max)
        if sparsity_loss not in SPARSITY_LOSSES:
            raise ConfigError(f"sparsity_loss must be one of {', '.join(SPARSITY_LOSSES)}, got {sparsity_loss!r}")
        if mask_mode not in MASK_MODES:
            raise ConfigError(f"mask_mode must be one of {', '.join(MASK_MODES)}, got {mask_mode!r}")
        if not 0 <= target_sparsity < 1:
            raise ConfigError(f"target_sparsity must be in [0, 1), got {target_sparsity}")
        if tau <= 0:
            raise ConfigError(f"tau must be > 0, got {tau}")
        if causal and mask_mode == "topk":
            raise ConfigError("mask_mode topk picks positions by looking at the whole sequence; use threshold for a causal layer")
        hid = max(8, d_model // 8)
        self.predictor = nn.Sequential(nn.Linear(d_model, hid), nn.ReLU(), nn.Linear(hid, 1))
        # input channels: the potential at computed positions (0 elsewhere), and the mask
        self.interp = nn.Conv1d(2, 1, interp_kernel)
        self.interp_kernel = interp_kernel
        self.final_sparsity, self.sparsity_loss_kind = target_sparsity, sparsity_loss
        self.sparsity_loss_weight, self.tau, self.schedule_steps, self.mask_mode = sparsity_loss_weight, tau, schedule_steps, mask_mode
        self.init_step_count()  # steps_done (saved) and its host copy: resume continues the schedule
        self._soft: torch.Tensor | None = None
        self._num_computed: int | torch.Tensor = 0
        self._total = 0

    def _count_changed(self) -> None:
        # recomputed per optimizer step, read by the forward instead of the count
        # (StepCounted): under torch.compile the threshold mask reads only whether
        # it skips at all, which flips once; the top-k mask's count follows the
        # target, so a compiled top-k layer recompiles at each step of a ramp
        if self.schedule_steps <= 0:
            self._target = self.final_sparsity
        else:
            self._target = self.final_sparsity * min(1.0, self._steps / self.schedule_steps)
        self._skipping = self._target > 0

    @property
    def target_sparsity(self) -> float:
        """The schedule's current target: linear ramp 0 -> final over ``schedule_steps``."""
        return self._target

    def _mask(self, logits: torch.Tensor, parked: bool = False) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor | None]:
        """(hard bool mask [B, N] or None when every position is computed,
        soft keep probabilities [B, N], flat indices of the computed positions,
        or None where the threshold mask takes the sync-free parked path)."""
        if self.training:
            u = torch.rand_like(logits).clamp_(1e-6, 1 - 1e-6)
            noisy = logits + (u.log() - (-u).log1p())  # logistic noise = difference of two Gumbels
        else:
            noisy = logits
        soft = torch.sigmoid(noisy / self.tau)
        if not self._skipping:
            return None, soft, None
        B, N = logits.shape
        if self.mask_mode == "topk":  # known count: indices without a host sync
            k = max(1, int(round((1 - self._target) * N)))
            top = noisy.topk(k, dim=-1).indices
            hard = torch.zeros_like(logits, dtype=torch.bool).scatter_(-1, top, True)
            idx = (top + torch.arange(B, device=top.device)[:, None] * N).flatten()  # any order: rows are independent
        else:
            hard = noisy > 0
            if parked:
                idx = None  # parked rows instead of a gather: no host sync (_forward_parked)
            else:
                idx = hard.reshape(-1).nonzero().squeeze(-1)  # one host sync: the count is data-dependent
        return hard, soft, idx

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, D = x.shape
        logits = upcast(self.predictor(x).squeeze(-1))
        hard, soft, idx = self._mask(logits, parked=self.moe.grouped(x) is not None)
        self._soft, self._total = soft, B * N
        if hard is not None and idx is None:  # threshold mask on the grouped path: no gather, no host sync
            return self._forward_parked(x, hard, soft)
        if hard is None or idx.numel() == B * N:  # nothing to skip: the dense layer, bit for bit
            self._num_computed = B * N
            return super().forward(x)
        self._num_computed = int(idx.numel())
        x_c = gather_rows(x.reshape(B * N, D), idx)
        h_c = self.moe(x_c)
        v_c = self.potential(h_c)
        v_sparse = torch.zeros(B * N, dtype=v_c.dtype, device=x.device).index_copy(0, idx, v_c).view(B, N)
        v = self._fill_skipped(v_sparse, hard)
        feats = self.features(v).reshape(B * N, 2).index_select(0, idx)
        st = (1.0 + (soft - soft.detach())).reshape(-1).index_select(0, idx)  # == 1; carries the predictor's gradient
        y_c = (h_c + self.bk_scale * self.feature_proj(feats.to(h_c.dtype))) * st.unsqueeze(-1).to(h_c.dtype)
        return torch.zeros(B * N, D, dtype=y_c.dtype, device=x.device).index_copy(0, idx, y_c).view(B, N, D)

    def _fill_skipped(self, v_sparse: torch.Tensor, hard: torch.Tensor) -> torch.Tensor:
        """The potential everywhere: computed positions keep theirs (``v_sparse``, 0
        elsewhere), skipped ones get the causal interpolation of it."""
        m = hard.to(v_sparse.dtype)
        # causal interpolation: left padding only, so position i reads positions <= i
        filled = self.interp(F.pad(torch.stack((v_sparse, m), dim=1).to(self.interp.weight.dtype), (self.interp_kernel - 1, 0))).squeeze(1)
        filled = self.v_max * torch.tanh(filled / self.v_max)
        return torch.where(hard, v_sparse, filled)

    def _forward_parked(self, x: torch.Tensor, hard: torch.Tensor, soft: torch.Tensor) -> torch.Tensor:
        """The threshold mask without a host sync: every position keeps its row,
        and the skipped ones are parked past the MoE's last expert group, where
        the grouped GEMMs do no work (:func:`grouped_experts`). The GEMM cost
        follows the kept count, shapes stay fixed, and the layer can be captured
        in a CUDA graph; the row-wise work outside the GEMMs (the potential and
        feature projections, over ``D``) runs on every row. Equal to the gather
        path (tests/test_bk.py)."""
        B, N, D = x.shape
        keep = hard.reshape(-1)
        self._num_computed = keep.sum()  # a device count: read (one sync) only when the stats are
        h = self.moe(x.reshape(B * N, D), keep=keep)  # 0 at skipped rows
        v_sparse = torch.where(keep, self.potential(h), 0).view(B, N)
        v = self._fill_skipped(v_sparse, hard)
        feats = self.features(v).reshape(B * N, 2)
        st = (1.0 + (soft - soft.detach())).reshape(-1, 1)  # == 1; carries the predictor's gradient
        y = (h + self.bk_scale * self.feature_proj(feats.to(h.dtype))) * st.to(h.dtype)
        return torch.where(keep.unsqueeze(-1), y, 0).view(B, N, D)

    def get_sparsity_loss(self) -> torch.Tensor:
        """Weighted loss pulling the mean skip probability toward the current target
        (``l2``, ``l1``, ``kl`` between Bernoulli rates, ``adaptive`` = Huber).
        Its gradient reaches the predictor through the soft probabilities."""
        if self._soft is None:
            raise RuntimeError("get_sparsity_loss() needs a forward pass first")
        sparsity = 1.0 - self._soft.mean()
        target = torch.tensor(self.target_sparsity, dtype=sparsity.dtype, device=sparsity.device)
        kind = self.sparsity_loss_kind
        if kind == "l2":
            loss = (sparsity - target).square()
        elif kind == "l1":
            loss = (sparsity - target).abs()
        elif kind == "kl":
            eps = 1e-6
            p, q = sparsity.clamp(eps, 1 - eps), target.clamp(eps, 1 - eps)
            loss = p * (p / q).log() + (1 - p) * ((1 - p) / (1 - q)).log()
        else:
            loss = F.huber_loss(sparsity, target, delta=0.1)
        return self.sparsity_loss_weight * loss

    def get_sparsity_stats(self, sync: bool = True) -> dict[str, float]:
        """``sparsity_ratio`` (skipped / total in the last forward), ``num_computed``,
        ``target_sparsity`` (current, after the schedule). ``sync=False``: on the
        parked path the first two stay 0-dim device tensors (no host sync; the
        trainer converts them when it logs)."""
        total = max(self._total, 1)
        computed = self._num_computed  # a device count on the parked path
        if sync:
            computed = float(computed)
        return {"sparsity_ratio": 1.0 - computed / total, "num_computed": computed * 1.0,
                "target_sparsity": float(self.target_sparsity)}
