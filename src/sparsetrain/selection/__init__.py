"""Token importance and selection: the shared core of every token-filtering
method (CGGR's selective loss and batch splitting, Collider's cross-layer
filtering). See docs/cggr.md."""

from .cggr import CGGRLoss, CGGRModel, create_truncated_router
from .schedule import AdaptiveThreshold, SelectionStats, check_health, dynamic_keep_ratio, warmup_keep_ratio
from .scores import IGNORE_INDEX, NONNEGATIVE_SCORES, REFERENCE_SCORES, SCORES, RowStats, row_stats, row_stats_torch, score_tokens, scores_from_stats, shift_labels
from .select import METHODS, budget, cached_kept_indices, inclusion_probabilities, keep_every_position, kept_indices, select, select_importance, select_random, select_sequence_aware, select_stratified, select_threshold, select_topk
from .selector import TokenSelector

__all__ = [
    "AdaptiveThreshold", "CGGRLoss", "CGGRModel", "IGNORE_INDEX", "METHODS", "NONNEGATIVE_SCORES", "REFERENCE_SCORES", "RowStats", "SCORES", "SelectionStats",
    "TokenSelector", "budget", "cached_kept_indices", "check_health", "create_truncated_router", "dynamic_keep_ratio", "inclusion_probabilities", "keep_every_position", "kept_indices", "row_stats",
    "row_stats_torch", "score_tokens", "scores_from_stats", "select", "select_importance", "select_random", "select_sequence_aware",
    "select_stratified", "select_threshold", "select_topk", "shift_labels", "warmup_keep_ratio",
]
