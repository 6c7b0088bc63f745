"""2:4 activation sparsity for the squared-ReLU FFN (docs/sparse24.md).

The sparsifiers, their statistics, the ``relu2_24`` FFN's masked-dense path
and, for the ``transposable`` method, its cuSPARSELt path (``cusparselt.py``)."""

from .sparsify import METHODS, is_24, transposable_24, transposable_random_24, mvue_24, mvue_probabilities, naive_24, soft_threshold_24, soft_threshold_scale, sparsify_24, sparsity_stats

from .ffn import Sparse24FFN, prepare_ffns, token_24  # noqa: E402

__all__ = ["Sparse24FFN", "prepare_ffns", "token_24", "METHODS", "is_24", "transposable_24", "transposable_random_24", "mvue_24", "mvue_probabilities", "naive_24", "soft_threshold_24", "soft_threshold_scale",
           "sparsify_24", "sparsity_stats"]
