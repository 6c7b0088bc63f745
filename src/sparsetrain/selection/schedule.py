"""How many tokens to keep over training: warmup, CGGR's confidence-dynamic
ratio, an adaptive threshold that holds a target sparsity, and the stats
object with its health check."""

from __future__ import annotations

import warnings

import torch

from .scores import nonfinite_error

HEALTHY_SPARSITY = (0.2, 0.5)


def warmup_keep_ratio(step: int, target: float, warmup_steps: int) -> float:
    """Linear from 1.0 (dense) at step 0 to ``target`` at ``warmup_steps``."""
    if warmup_steps <= 0 or step >= warmup_steps:
        return target
    return 1.0 - (step / warmup_steps) * (1.0 - target)


def dynamic_keep_ratio(base_ratio: float, avg_confidence: float, sensitivity: float) -> float:
    """CGGR-style adjustment by batch confidence (mean top-1 probability ``c``):
    ``base + sensitivity * (1 - c) * (1 - base)``. A confident batch (c -> 1)
    keeps the base ratio; an unsure one keeps up to ``sensitivity`` of the way
    to everything. Always in ``[base, 1]``."""
    if not 0.0 <= sensitivity <= 1.0:
        raise ValueError(f"threshold_sensitivity must be in [0, 1], got {sensitivity}")
    c = min(1.0, max(0.0, avg_confidence))
    return base_ratio + sensitivity * (1.0 - c) * (1.0 - base_ratio)


class AdaptiveThreshold:
    """Threshold controller that holds a target sparsity (fraction dropped).

    A fixed threshold on a drifting score distribution drops a drifting
    fraction of tokens (Collider's paper leaves adapting it to future work).
    This controller is a PI loop on the quantile: an exponential moving
    average of each batch's ``target`` quantile, plus an integral of the
    sparsity error, which removes the average lag of the EMA when the scores
    drift:

        q   <- (1 - beta) * q + beta * quantile(scores, target)
        b   <- b + gain * std(scores) * (target - observed)
        tau  = q + b

    ``threshold`` is what the next batch is cut at (keep score > tau).
    """

    def __init__(self, target_sparsity: float, beta: float = 0.3, gain: float = 0.1) -> None:
        if not 0.0 <= target_sparsity < 1.0:
            raise ValueError(f"target_sparsity must be in [0, 1), got {target_sparsity}")
        self.target = target_sparsity
        self.beta = beta
        self.gain = gain
        self.quantile: float | None = None
        self.bias = 0.0

    @property
    def threshold(self) -> float | None:
        return None if self.quantile is None else self.quantile + self.bias

    def update(self, scores: torch.Tensor) -> float:
        """Feed this batch's scores (``-inf`` = ignored); returns the new threshold."""
        valid = scores[scores > float("-inf")].double()
        if valid.numel() == 0:
            return self.threshold if self.threshold is not None else 0.0
        q = float(torch.quantile(valid, self.target)) if valid.numel() > 1 else float(valid[0])
        if self.quantile is None:
            self.quantile = q
            return q
        observed = float((valid <= self.threshold).double().mean())
        spread = float(valid.std()) if valid.numel() > 1 else 1.0
        self.quantile = (1 - self.beta) * self.quantile + self.beta * q
        self.bias += self.gain * spread * (self.target - observed)
        return self.threshold

    def state_dict(self) -> dict:
        return {"target": self.target, "beta": self.beta, "gain": self.gain, "quantile": self.quantile, "bias": self.bias}

    def load_state_dict(self, state: dict) -> None:
        for k, v in state.items():
            setattr(self, k, v)


class SelectionStats:
    """What one selection did. ``sparsity`` = dropped / total valid (derived
    from ``kept`` and ``total`` unless given).

    Any field may be a 0-d tensor still on the GPU. Reading such a field reads
    all of them back together, in one host sync; fields known on the host
    (``kept`` and ``total`` for top-k selection with a given valid count) read
    without one. So a step that only counts tokens never waits for the GPU
    (the selector hands out its averages this way).
    """

    FIELDS = ("kept", "total", "sparsity", "keep_ratio", "threshold", "avg_confidence", "avg_entropy", "avg_difficulty")

    def __init__(self, kept: int | torch.Tensor, total: int | torch.Tensor, sparsity: float | torch.Tensor | None = None,
                 keep_ratio: float = 1.0, threshold: float | None = None,
                 avg_confidence: float | torch.Tensor = float("nan"),  # mean top-1 probability over valid tokens
                 avg_entropy: float | torch.Tensor = float("nan"),
                 avg_difficulty: float | torch.Tensor = float("nan"),  # mean score over valid tokens
                 nonfinite: int | torch.Tensor = 0,  # scored tokens with NaN/Inf logits
                 weights: torch.Tensor | None = None) -> None:
        #: per-token loss weights of an ``importance`` selection (else None), for the kept-rows loss
        self.weights = weights
        self._raw: dict = {"kept": kept, "total": total, "sparsity": sparsity, "keep_ratio": keep_ratio,
                           "threshold": threshold, "avg_confidence": avg_confidence, "avg_entropy": avg_entropy,
                           "avg_difficulty": avg_difficulty, "nonfinite": nonfinite}

    def _get(self, name: str):
        if not isinstance(self._raw[name], torch.Tensor):  # known on the host: no sync
            return self._raw[name]
        lazy = [k for k, v in self._raw.items() if isinstance(v, torch.Tensor)]  # this one among them
        t = [self._raw[k].detach().reshape(()) for k in lazy]
        values = torch.stack([v.to(t[0].device, torch.float64) for v in t]).tolist()  # one device-to-host copy
        for k, v in zip(lazy, values):
            self._raw[k] = int(round(v)) if k in ("kept", "total", "nonfinite") else v
        if self._raw["nonfinite"]:  # scored on the GPU without a sync: the first read tells
            raise nonfinite_error(self._raw["nonfinite"], self._raw["total"])
        return self._raw[name]

    def unread(self, name: str):
        """Field ``name`` as stored: a device tensor comes back as it is, not read
        (for callers that add counts up on the device and read them later)."""
        return self._raw[name]

    kept = property(lambda self: self._get("kept"))
    total = property(lambda self: self._get("total"))
    keep_ratio = property(lambda self: self._get("keep_ratio"))
    threshold = property(lambda self: self._get("threshold"))
    avg_confidence = property(lambda self: self._get("avg_confidence"))
    avg_entropy = property(lambda self: self._get("avg_entropy"))
    avg_difficulty = property(lambda self: self._get("avg_difficulty"))

    @property
    def sparsity(self) -> float:
        s = self._get("sparsity")
        if s is not None:
            return s
        return 1.0 - self.kept / self.total if self.total else 0.0

    @sparsity.setter
    def sparsity(self, value: float) -> None:
        self._raw["sparsity"] = value

    def is_healthy(self, low: float = HEALTHY_SPARSITY[0], high: float = HEALTHY_SPARSITY[1]) -> bool:
        """Sparsity inside ``[low, high]``: below, filtering saves little; above,
        the gradient rests on too few tokens to be trusted (Collider's range)."""
        return low <= self.sparsity <= high

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.FIELDS}

    def __repr__(self) -> str:
        return "SelectionStats(" + ", ".join(f"{k}={getattr(self, k)!r}" for k in self.FIELDS) + ")"


def check_health(stats: SelectionStats, low: float = HEALTHY_SPARSITY[0], high: float = HEALTHY_SPARSITY[1]) -> bool:
    """Warn (``RuntimeWarning``) when sparsity leaves ``[low, high]``; returns health."""
    ok = stats.is_healthy(low, high)
    if not ok:
        warnings.warn(
            f"token-selection sparsity {stats.sparsity:.3f} is outside the healthy range [{low}, {high}] "
            f"({stats.kept}/{stats.total} tokens kept)",
            RuntimeWarning,
            stacklevel=2,
        )
    return ok
