"""``TokenSelector``: score -> keep-ratio schedule -> selection -> stats, in one
object that every token-filtering method (CGGR loss, CGGR batch splitting,
Collider) shares."""

from __future__ import annotations

import torch

from .schedule import AdaptiveThreshold, SelectionStats, dynamic_keep_ratio, warmup_keep_ratio
from .scores import IGNORE_INDEX, SCORES, RowStats, score_tokens
from .select import METHODS, cached_kept_indices, select


class TokenSelector:
    """Pick the tokens that get a gradient.

    Args:
        score: one of :data:`~sparsetrain.selection.scores.SCORES`.
        method: one of :data:`~sparsetrain.selection.select.METHODS`.
        keep_ratio: target fraction of valid tokens kept (budget methods).
        warmup_steps: the ratio goes linearly from 1.0 to ``keep_ratio`` over
            these steps (for adaptive thresholds, the target sparsity does).
        dynamic: adjust the ratio by batch confidence (CGGR's dynamic threshold).
        sensitivity: strength of that adjustment, in [0, 1].
        threshold: fixed threshold for ``method="threshold"``.
        target_sparsity: with ``method="threshold"``, hold this dropped
            fraction with :class:`AdaptiveThreshold` instead of a fixed value.
        num_strata, min_per_sequence, per_sequence: see ``select.py``.
        seed: seed of the generator behind ``random`` and ``stratified``.

    ``step_count`` is the optimizer step the schedule is at: :meth:`step` advances
    it by one, :meth:`set_step` sets it (the trainer sets it from its own step
    count after every optimizer step, so there is one counter).
    """

    def __init__(
        self,
        score: str = "collider",
        method: str = "topk",
        keep_ratio: float = 0.5,
        warmup_steps: int = 0,
        dynamic: bool = False,
        sensitivity: float = 0.5,
        threshold: float = 0.0,
        target_sparsity: float | None = None,
        num_strata: int = 4,
        min_per_sequence: int = 1,
        per_sequence: bool = False,
        seed: int = 0,
        ignore_index: int = IGNORE_INDEX,
    ) -> None:
        if score not in SCORES:
            raise ValueError(f"unknown score {score!r} (choose from {', '.join(SCORES)})")
        if method not in METHODS:
            raise ValueError(f"unknown selection method {method!r} (choose from {', '.join(METHODS)})")
        if not 0.0 < keep_ratio <= 1.0:
            raise ValueError(f"keep_ratio must be in (0, 1], got {keep_ratio}")
        self.score, self.method, self.keep_ratio = score, method, keep_ratio
        self.warmup_steps, self.dynamic, self.sensitivity = warmup_steps, dynamic, sensitivity
        self.threshold, self.num_strata = threshold, num_strata
        self.min_per_sequence, self.per_sequence = min_per_sequence, per_sequence
        self.ignore_index, self.seed = ignore_index, seed
        self.target_sparsity = target_sparsity
        self.controller = AdaptiveThreshold(target_sparsity) if target_sparsity is not None else None
        self.step_count = 0
        self._generators: dict[torch.device, torch.Generator] = {}
        self.last_stats: SelectionStats | None = None
        self.last_mask: torch.Tensor | None = None  # keep mask of the last call

    def step(self) -> None:
        """Count one optimizer step."""
        self.step_count += 1

    def set_step(self, step: int) -> None:
        """Put the schedule at optimizer step ``step``."""
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        self.step_count = step

    def current_ratio(self, confidence: torch.Tensor | float | None = None) -> float:
        """Keep ratio in force at this step: the warmup schedule, adjusted by the
        batch ``confidence`` (mean top-1 probability) when ``dynamic`` is on.
        The confidence is only read (a host sync for a tensor) in that case."""
        ratio = warmup_keep_ratio(self.step_count, self.keep_ratio, self.warmup_steps)
        if self.dynamic and confidence is not None:
            ratio = dynamic_keep_ratio(ratio, float(confidence), self.sensitivity)
        return ratio

    def _generator(self, device: torch.device) -> torch.Generator:
        if device not in self._generators:
            self._generators[device] = torch.Generator(device=device).manual_seed(self.seed)
        return self._generators[device]

    @torch.no_grad()
    def __call__(
        self, logits: torch.Tensor, targets: torch.Tensor, ref_nll: torch.Tensor | None = None,
        n_valid: int | None = None,
    ) -> tuple[torch.Tensor, SelectionStats]:
        """Keep mask (bool, shape of ``targets``) and stats for this batch.

        ``n_valid``: how many targets are not ``ignore_index``, when the caller
        knows it on the host (the trainer counts it on the CPU batch). With it,
        ``topk`` and ``random`` selection never wait for the GPU: the mask, its
        kept indices and the stats stay on the device until read."""
        scores, rs = score_tokens(self.score, logits, targets, ref_nll, self.ignore_index)
        return self.select_from_scores(scores, rs, n_valid)

    @torch.no_grad()
    def select_from_scores(self, scores: torch.Tensor, rs: RowStats,
                           n_valid: int | None = None) -> tuple[torch.Tensor, SelectionStats]:
        valid = rs.valid
        if n_valid is None:
            n_valid = int(valid.sum())  # a host sync
        if n_valid == 0:
            raise ValueError("no token has a target to learn from (all are ignore_index)")

        def valid_mean(x: torch.Tensor) -> torch.Tensor:  # on the device; boolean indexing would sync
            return torch.where(valid, x.float(), 0.0).sum() / n_valid

        avg_conf = valid_mean(rs.p1)
        ratio = self.current_ratio(avg_conf)  # reads it (a sync) only when dynamic
        threshold = None
        if self.method == "threshold":
            if self.controller is not None:
                # during warmup the target sparsity ramps up from 0, like the keep ratio ramps down
                self.controller.target = 1.0 - warmup_keep_ratio(self.step_count, 1.0 - self.target_sparsity, self.warmup_steps)
                if self.controller.threshold is None:
                    self.controller.update(scores)
                threshold = self.controller.threshold
            else:
                threshold = self.threshold
        mask = select(
            self.method, scores, ratio=ratio, threshold=threshold if threshold is not None else 0.0,
            num_strata=self.num_strata, min_per_sequence=self.min_per_sequence,
            per_sequence=self.per_sequence, generator=self._generator(scores.device), n_valid=n_valid,
        )
        if self.controller is not None and self.method == "threshold":
            self.controller.update(scores)
        idx = cached_kept_indices(mask)
        self.last_mask = mask
        self.last_stats = SelectionStats(
            kept=idx.numel() if idx is not None else mask.sum(),
            total=n_valid,
            keep_ratio=ratio,
            threshold=threshold,
            avg_confidence=avg_conf,
            avg_entropy=valid_mean(rs.entropy),
            avg_difficulty=valid_mean(scores),
            nonfinite=rs.nonfinite if rs.nonfinite is not None else 0,
        )
        return mask, self.last_stats

    def state_dict(self) -> dict:
        """Step count, generator states and controller state, for exact resume."""
        return {
            "step_count": self.step_count,
            "generators": {str(d): g.get_state() for d, g in self._generators.items()},
            "controller": self.controller.state_dict() if self.controller is not None else None,
        }

    def load_state_dict(self, state: dict) -> None:
        self.step_count = int(state["step_count"])
        for dev, gen_state in state["generators"].items():
            self._generator(torch.device(dev)).set_state(gen_state.cpu() if hasattr(gen_state, "cpu") else gen_state)
        if state["controller"] is not None and self.controller is not None:
            self.controller.load_state_dict(state["controller"])
