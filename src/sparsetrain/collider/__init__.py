"""Collider: cross-layer token filtering in the backward pass (see README.md here).

    from sparsetrain.collider import ColliderModel, masked_cross_entropy

    cm = ColliderModel(gpt)
    logits = cm(idx)                                  # dense forward, all tokens
    keep, stats = selector(logits.detach(), targets)  # sparsetrain.selection.TokenSelector
    loss = masked_cross_entropy(logits, targets, keep)
    loss.backward()                                   # kept rows only, in every layer

The keep mask travels with the loss; ``with filter(keep):`` around the
backward is optional (it must then be the same mask).

Hugging Face causal LMs: ``apply(model)`` runs Llama, Mistral, Qwen2 and Qwen3
through the engine (``hf_engine.py``, ``hf_block.py``; PEFT LoRA included) and
any other model on the attention registry through the generic swap
(``hf_generic.py``, with a one-line notice); ``remove(model)`` undoes it; see
``hf.py``. Other block types join the engine through
``register_block_adapter`` (``blocks.py``).
"""

from .blocks import BlockAdapter, RowGrad, register_block_adapter
from .compact import rmsnorm_backward, rope_inverse
from .gpt import ColliderModel
from .hf import ColliderGenericPathWarning, apply, kept_rows_loss, remove
from .keep import filter
from .loss import masked_cross_entropy

__all__ = ["apply", "BlockAdapter", "ColliderGenericPathWarning", "ColliderModel", "filter", "kept_rows_loss",
           "masked_cross_entropy", "register_block_adapter", "remove", "rmsnorm_backward", "RowGrad", "rope_inverse"]
