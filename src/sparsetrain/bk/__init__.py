"""BK-Core: an exact, causal O(N) tridiagonal-resolvent sequence layer, the
ResNet-BK language model, and learned sparsity that skips work.

Public API: :func:`bk_core` (the op), :class:`BKCoreError`,
:class:`MoEResNetBKLayer`, :class:`SparseMoEResNetBKLayer`, :class:`ResNetBK`.
"""

from .core import DEFAULT_Z, BKCoreError, bk_core, resolvent_dense
from .layers import MoEFFN, MoEResNetBKLayer, SparseMoEResNetBKLayer
from .model import ResNetBK

__all__ = ["DEFAULT_Z", "BKCoreError", "bk_core", "resolvent_dense", "MoEFFN", "MoEResNetBKLayer",
           "SparseMoEResNetBKLayer", "ResNetBK"]
