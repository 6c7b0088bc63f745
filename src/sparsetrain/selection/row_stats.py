"""The five per-row numbers every token score derives from (see ``scores.py``),
as the torch reference and the Triton kernel (``triton_scores.py``) both return them."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class RowStats:
    """Per-token statistics of a logits row (float32, float64 for float64 logits;
    shape = logits.shape[:-1])."""

    lse: torch.Tensor  # log-sum-exp of the row
    nll: torch.Tensor  # lse - logit[target]; 0 where the target is ignored
    entropy: torch.Tensor  # entropy of softmax(row), nats
    p1: torch.Tensor  # largest probability (the model's confidence)
    p2: torch.Tensor  # second-largest probability
    valid: torch.Tensor  # bool: target != ignore_index
    nonfinite: torch.Tensor | None = None  # 0-d count of scored rows with NaN/Inf statistics (set by score_tokens)
