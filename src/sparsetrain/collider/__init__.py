"""Collider: cross-layer token filtering in the backward pass (see README.md here).

    from sparsetrain.collider import ColliderModel, filter, masked_cross_entropy

    cm = ColliderModel(gpt)
    logits = cm(idx)                                  # dense forward, all tokens
    keep, stats = selector(logits.detach(), targets)  # sparsetrain.selection.TokenSelector
    loss = masked_cross_entropy(logits, targets, keep)
    with filter(keep):
        loss.backward()                               # kept rows only, in every layer

Hugging Face causal LMs (Llama, Qwen2): ``apply(model)`` swaps in the same
filtering (attention registry + kept-row linear backward); see ``hf.py``.
"""

from .engine import ColliderModel, current_keep, filter, rmsnorm_backward, rope_inverse
from .hf import apply
from .loss import masked_cross_entropy

__all__ = ["apply", "ColliderModel", "current_keep", "filter", "masked_cross_entropy", "rmsnorm_backward", "rope_inverse"]
