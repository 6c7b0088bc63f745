"""User-facing errors.

Anything the user can fix (a bad flag, a missing file, a checkpoint from another
model) raises a subclass of :class:`SparsetrainError`. The CLI prints its message
as one line and exits with code 2; library users catch it like any exception.
"""

from __future__ import annotations


class SparsetrainError(Exception):
    """Base class for errors caused by user input rather than by a bug."""


class ConfigError(SparsetrainError):
    """An unknown config key, a value out of range, an unknown preset."""


class DataError(SparsetrainError):
    """A missing data path, an empty corpus, tokens out of the vocabulary."""


class CheckpointError(SparsetrainError):
    """A missing, unreadable or mismatched checkpoint."""


class DivergedError(SparsetrainError):
    """Training produced NaN or Inf (a loss, a gradient norm, weights, logits): the
    run cannot go on from here, and nothing non-finite is saved."""
