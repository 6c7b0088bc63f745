"""2:4 activation sparsity for the squared-ReLU FFN (see README.md here).

This release has the sparsifiers, their statistics and the ``relu2_24`` FFN's
masked-dense reference path; the sparse-tensor-core kernels are still to come."""

from .sparsify import METHODS, is_24, mvue_24, mvue_probabilities, naive_24, soft_threshold_24, soft_threshold_scale, sparsify_24, sparsity_stats

from .ffn import Sparse24FFN, token_24  # noqa: E402

__all__ = ["Sparse24FFN", "token_24", "METHODS", "is_24", "mvue_24", "mvue_probabilities", "naive_24", "soft_threshold_24", "soft_threshold_scale",
           "sparsify_24", "sparsity_stats"]
