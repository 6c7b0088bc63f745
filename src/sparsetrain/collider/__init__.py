"""Collider: cross-layer token filtering in the backward pass (see README.md here).

    from sparsetrain.collider import ColliderModel, filter, masked_cross_entropy

    cm = ColliderModel(gpt)
    logits = cm(idx)                                  # dense forward, all tokens
    keep, stats = selector(logits.detach(), targets)  # sparsetrain.selection.TokenSelector
    loss = masked_cross_entropy(logits, targets, keep)
    with filter(keep):
        loss.backward()                               # kept rows only, in every layer
"""

from .engine import ColliderModel, current_keep, filter, masked_cross_entropy, rmsnorm_backward, rope_inverse

__all__ = ["ColliderModel", "current_keep", "filter", "masked_cross_entropy", "rmsnorm_backward", "rope_inverse"]
