"""``TokenSelector``: score -> keep-ratio schedule -> selection -> stats, in one
object that every token-filtering method (CGGR loss, CGGR batch splitting,
Collider) shares."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from .schedule import AdaptiveThreshold, SelectionStats, dynamic_keep_ratio, warmup_keep_ratio
from .scores import IGNORE_INDEX, NONNEGATIVE_SCORES, SCORES, RowStats, score_tokens, span_mean
from .select import METHODS, cached_kept_indices, select, select_importance


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
        span: score each token by the mean score of its block of ``span``
            positions (:func:`~sparsetrain.selection.scores.span_mean`): whole
            spans kept or dropped.
        seed: seed of the generator behind ``random``, ``stratified`` and ``importance``.

    ``importance`` draws the kept tokens in proportion to a non-negative score
    and returns per-token loss weights with the mask (``stats.weights``) that
    make the kept-rows loss an unbiased estimate of the full one
    (:func:`~sparsetrain.selection.select.select_importance`).

    ``step_count`` is the optimizer step the schedule is at: :meth:`step` advances
    it by one, :meth:`set_step` sets it (the trainer sets it from its own step
    count after every optimizer step, so there is one counter).

    :meth:`priming_ratios` and :meth:`forced_ratio` serve the trainer's start-up
    priming (``Trainer._prime_objective``): the keep ratios a run will reach
    later, and selections at one of them that leave the selector untouched.
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
        span: int = 1,
    ) -> None:
        if score not in SCORES:
            raise ValueError(f"unknown score {score!r} (choose from {', '.join(SCORES)})")
        if method not in METHODS:
            raise ValueError(f"unknown selection method {method!r} (choose from {', '.join(METHODS)})")
        if not 0.0 < keep_ratio <= 1.0:
            raise ValueError(f"keep_ratio must be in (0, 1], got {keep_ratio}")
        if method == "importance" and score not in NONNEGATIVE_SCORES:
            raise ValueError(f"importance selection samples in proportion to the score, which must be one of "
                             f"{', '.join(NONNEGATIVE_SCORES)} (never negative), got {score!r}")
        if method == "importance" and (per_sequence or dynamic):
            raise ValueError("importance selection draws over the whole batch at a fixed ratio: "
                             "per_sequence and dynamic are not available with it")
        self.score, self.method, self.keep_ratio = score, method, keep_ratio
        self.warmup_steps, self.dynamic, self.sensitivity = warmup_steps, dynamic, sensitivity
        self.threshold, self.num_strata = threshold, num_strata
        self.min_per_sequence, self.per_sequence = min_per_sequence, per_sequence
        self.ignore_index, self.seed = ignore_index, seed
        if span < 1:
            raise ValueError(f"span must be >= 1, got {span}")
        self.span = span
        self.target_sparsity = target_sparsity
        self.controller = AdaptiveThreshold(target_sparsity) if target_sparsity is not None else None
        self.step_count = 0
        self._generators: dict[torch.device, torch.Generator] = {}
        self.last_stats: SelectionStats | None = None
        self.last_mask: torch.Tensor | None = None  # keep mask of the last call
        self._forced: float | None = None  # the ratio inside forced_ratio()

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
        The confidence is only read (a host sync for a tensor) in that case.
        Inside :meth:`forced_ratio`, the forced ratio."""
        if self._forced is not None:
            return self._forced
        ratio = warmup_keep_ratio(self.step_count, self.keep_ratio, self.warmup_steps)
        if self.dynamic and confidence is not None:
            ratio = dynamic_keep_ratio(ratio, float(confidence), self.sensitivity)
        return ratio

    def target_ratio(self) -> float | None:
        """The keep ratio the schedule ends at: ``keep_ratio`` for the budget methods
        (the most a ``dynamic`` ratio drops to), ``1 - target_sparsity`` for the
        adaptive threshold; None for a fixed threshold, whose kept fraction is the data's."""
        if self.method == "threshold":
            return None if self.target_sparsity is None else 1.0 - self.target_sparsity
        return self.keep_ratio

    def priming_ratios(self) -> tuple[float, ...]:
        """Keep ratios to run the objective at once, after the first step a process
        trains (at ``step_count``), so that what a changing kept count compiles is
        compiled then: a kept count other than that step's (torch.compile then makes
        it symbolic), then the target ratio (the kept-query attention kernels, which
        a low enough kept fraction switches on, compile and tune).

        The first is the next step's ratio in the warmup; where the warmup is over
        and the kept count still changes (an adaptive threshold, a ``dynamic``
        ratio: both depend on the batch), halfway between 1 and the target. Empty
        when the kept count no longer changes (a budget method past its warmup, or
        keeping everything) and for a fixed threshold, which has no target to prime."""
        target = self.target_ratio()
        if target is None or target >= 1.0:
            return ()
        changes_with_batch = self.dynamic or self.method == "threshold"
        now = warmup_keep_ratio(self.step_count, target, self.warmup_steps)
        if not changes_with_batch and now == target:  # past the warmup: one kept count from here on
            return ()
        following = warmup_keep_ratio(self.step_count + 1, target, self.warmup_steps)
        if following == target:
            # a budget method's count at the first step was another: one pass makes the change;
            # a batch-dependent count may have been this one, so prime a second count too
            return ((1.0 + target) / 2, target) if changes_with_batch else (target,)
        return following, target

    @contextlib.contextmanager
    def forced_ratio(self, ratio: float) -> Iterator[None]:
        """Inside, every selection keeps the ``budget(n_valid, ratio)`` highest-scoring
        tokens (top-k, whatever the method: no generator draw, no threshold update)
        and :meth:`current_ratio` is ``ratio``; on exit the selector is as on entry
        (step count, generators, threshold controller, last mask and stats).

        For priming: what compiles depends on how many tokens are kept, not on which."""
        if not 0.0 < ratio <= 1.0:
            raise ValueError(f"keep ratio must be in (0, 1], got {ratio}")
        saved = self.state_dict(), self.last_mask, self.last_stats, self._forced
        self._forced = ratio
        try:
            yield
        finally:
            state, self.last_mask, self.last_stats, self._forced = saved
            self.load_state_dict(state)

    def generators(self) -> list[torch.Generator]:
        """The generators the selection has drawn from so far, one per device (what
        a CUDA graph capturing a step with ``random`` or ``importance`` selection
        registers)."""
        return list(self._generators.values())

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
        return self.select_from_scores(span_mean(scores, self.span), rs, n_valid)

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
        forced = self._forced is not None  # priming (forced_ratio): how many tokens are kept matters, not which
        method = "topk" if forced else self.method
        threshold = None
        if method == "threshold":
            if self.controller is not None:
                # during warmup the target sparsity ramps up from 0, like the keep ratio ramps down
                self.controller.target = 1.0 - warmup_keep_ratio(self.step_count, 1.0 - self.target_sparsity, self.warmup_steps)
                if self.controller.threshold is None:
                    self.controller.update(scores)
                # nothing to drop (warmup's start): keep every token, not all but the lowest-scored
                threshold = self.controller.threshold if self.controller.target > 0 else float("-inf")
            else:
                threshold = self.threshold
        weights = None
        if method == "importance":
            mask, weights = select_importance(scores, ratio, generator=self._generator(scores.device), n_valid=n_valid)
        else:
            mask = select(
                method, scores, ratio=ratio, threshold=threshold if threshold is not None else 0.0,
                num_strata=self.num_strata, min_per_sequence=self.min_per_sequence,
                per_sequence=self.per_sequence and not forced, generator=self._generator(scores.device), n_valid=n_valid,
            )
        if self.controller is not None and method == "threshold":
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
            weights=weights,
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
