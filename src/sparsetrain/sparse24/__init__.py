"""2:4 activation sparsity for the squared-ReLU FFN (see README.md here).

This release has the sparsifiers and their statistics; the ``relu2_24`` FFN
kind and the sparse-tensor-core kernels are still to come (issue 5)."""

from .sparsify import METHODS, is_24, mvue_24, mvue_probabilities, naive_24, soft_threshold_24, soft_threshold_scale, sparsify_24, sparsity_stats

__all__ = ["METHODS", "is_24", "mvue_24", "mvue_probabilities", "naive_24", "soft_threshold_24", "soft_threshold_scale",
           "sparsify_24", "sparsity_stats"]
