"""Selection policies: which tokens to keep, given their scores.

Every policy takes ``scores [B, T]`` (or ``[N]``) where ``-inf`` marks ignored
positions, and returns a bool keep mask of the same shape that never keeps an
ignored position. Counts are exact and documented per policy, because a fair
comparison (against ``random`` at the same budget) needs them to be.
"""

from __future__ import annotations

import math
import weakref

import torch

METHODS = ("threshold", "topk", "stratified", "sequence_aware", "random", "importance")


def budget(n_valid: int, ratio: float) -> int:
    """Tokens kept out of ``n_valid`` at keep ``ratio``: ``ceil(ratio * n)``,
    at least 1 when anything is valid, at most ``n``."""
    if not 0.0 < ratio <= 1.0:
        raise ValueError(f"keep ratio must be in (0, 1], got {ratio}")
    if n_valid == 0:
        return 0
    return min(n_valid, max(1, math.ceil(ratio * n_valid - 1e-9)))


def _valid(scores: torch.Tensor) -> torch.Tensor:
    return scores > float("-inf")


class KeptIndexCache:
    """The sorted flat kept indices of keep masks, by mask identity, each entry
    living as long as its mask and valid until the mask is modified in place.

    A policy that knows its kept indices when it makes a mask leaves them here,
    so the Collider loss and backward need no ``nonzero`` (a host sync) to find
    them again. Inference tensors have no version counter to guard an entry
    with, so they get none."""

    def __init__(self) -> None:
        self._entries: dict[int, tuple[weakref.ref, torch.Tensor, int]] = {}

    def put(self, mask: torch.Tensor, idx: torch.Tensor) -> None:
        if mask.is_inference():
            return
        key = id(mask)

        def forget(ref: weakref.ref) -> None:  # the mask is gone: so is its entry
            if self._entries.get(key, (None,))[0] is ref:
                del self._entries[key]

        self._entries[key] = (weakref.ref(mask, forget), idx, mask._version)

    def get(self, mask: torch.Tensor) -> torch.Tensor | None:
        entry = self._entries.get(id(mask))
        if entry is None or entry[0]() is not mask or mask.is_inference() or entry[2] != mask._version:
            return None
        return entry[1]


_kept_index_cache = KeptIndexCache()


def _keep_indices(shape: torch.Size, idx: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Bool mask of ``shape``, true at the flat indices ``idx``, whose sorted
    indices go to the :class:`KeptIndexCache` for :func:`kept_indices`."""
    mask = torch.zeros(shape.numel(), dtype=torch.bool, device=device).index_fill_(0, idx, True).view(shape)
    _kept_index_cache.put(mask, torch.sort(idx).values)
    return mask


def keep_every_position(shape: torch.Size, device: torch.device) -> torch.Tensor:
    """The mask keeping every position (dense training through a kept-rows path,
    positions without a target included, so that every key and value gets its
    gradient), its indices known: the loss and backward read nothing back."""
    return _keep_indices(shape, torch.arange(shape.numel(), device=device), device)


def cached_kept_indices(keep: torch.Tensor) -> torch.Tensor | None:
    """The sorted flat indices known for the ``keep`` mask (a policy here made it,
    or :func:`kept_indices` found them), or None (another mask, or one modified
    in place since)."""
    return _kept_index_cache.get(keep)


def kept_indices(keep: torch.Tensor) -> torch.Tensor:
    """Sorted flat indices of the kept tokens (``int64 [K]``).

    For a mask made by a policy here (``topk``, ``random``, ``stratified``)
    they were known when it was made, so this needs no host sync; any other
    mask costs one ``nonzero`` (which waits for the GPU) on its first call. The Collider
    loss takes its kept rows from here, and the backward from the loss, so no
    sync between forward and backward leaves the GPU idle
    (bench/results/collider_step_sync_free_h200.json)."""
    cached = cached_kept_indices(keep)
    if cached is not None:
        return cached
    idx = torch.nonzero(keep.reshape(-1)).squeeze(1)
    _kept_index_cache.put(keep, idx)  # the next call on the same mask is free
    return idx


def select_threshold(scores: torch.Tensor, threshold: float) -> torch.Tensor:
    """Keep tokens whose score is strictly above ``threshold``; where none is, the
    valid tokens of the highest score (all of a tied span), so that a step always
    learns from something (no host sync: the fallback is computed on the device)."""
    valid = _valid(scores)
    mask = (scores > threshold) & valid
    top = scores.masked_fill(~valid, float("-inf")).amax()
    return mask | (valid & (scores == top) & ~mask.any())


def select_topk(scores: torch.Tensor, ratio: float, per_sequence: bool = False, n_valid: int | None = None) -> torch.Tensor:
    """Keep the ``budget(n_valid, ratio)`` highest scores, over the whole batch,
    or with ``per_sequence`` the same ratio within each row (last dim).
    ``n_valid``: the number of valid (finite-score) tokens when the caller
    knows it; otherwise it is counted, a host sync."""
    if per_sequence and scores.dim() >= 2:
        rows = scores.reshape(-1, scores.shape[-1])
        mask = torch.zeros_like(rows, dtype=torch.bool)
        for r in range(rows.shape[0]):  # rows differ in valid counts; B is small
            mask[r] = select_topk(rows[r], ratio)
        return mask.view(scores.shape)
    flat = scores.reshape(-1)
    k = budget(int(_valid(flat).sum()) if n_valid is None else n_valid, ratio)
    idx = torch.topk(flat, k).indices if k else flat.new_zeros(0, dtype=torch.long)
    return _keep_indices(scores.shape, idx, flat.device)


def select_random(
    valid: torch.Tensor,
    ratio: float | None = None,
    count: int | torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    n_valid: int | None = None,
) -> torch.Tensor:
    """Uniformly random valid tokens: the control every score is compared with.

    Give ``ratio`` (same budget rule as top-k), a total ``count``, or a tensor of
    per-row counts (to match another mask sequence by sequence). ``n_valid``:
    the number of valid tokens when the caller knows it (saves a host sync).
    """
    if isinstance(count, torch.Tensor):
        rows = valid.reshape(-1, valid.shape[-1])
        counts = count.reshape(-1)
        mask = torch.zeros_like(rows)
        for r in range(rows.shape[0]):
            mask[r] = select_random(rows[r], count=int(counts[r]), generator=generator)
        return mask.view(valid.shape)
    flat = valid.reshape(-1)
    n = int(flat.sum()) if n_valid is None else n_valid
    k = budget(n, ratio) if count is None else int(count)
    if not 0 <= k <= n:
        raise ValueError(f"cannot pick {k} of {n} valid tokens")
    noise = torch.rand(flat.shape, generator=generator, device=flat.device if generator is None else generator.device)
    noise = noise.to(flat.device).masked_fill(~flat, -1.0)
    idx = torch.topk(noise, k).indices
    return _keep_indices(valid.shape, idx, flat.device)


IMPORTANCE_FLOOR = 0.1  # defensive mixture: every valid token's sampling weight is at least this share of the mean


def inclusion_probabilities(weights: torch.Tensor, k: int) -> torch.Tensor:
    """``pi_i = min(1, c * w_i)`` with ``c`` such that ``sum(pi) = k``: each token's
    chance of being kept when ``k`` are drawn in proportion to ``weights``
    (1-D, >= 0, at least ``k`` of them positive), the largest capped at 1.

    Float64, on the weights' device, no host sync: with the weights sorted in
    decreasing order, capping the ``m`` largest leaves ``c_m = (k - m) / (sum of the
    rest)``; the answer is the smallest ``m`` whose largest uncapped weight stays
    at most 1 (``c_m * w_(m) <= 1``), a condition that, once true, stays true for
    every larger ``m``, and is true at ``m = k - 1``."""
    w = weights.reshape(-1).to(torch.float64)
    n = w.numel()
    if not 0 < k <= n:
        raise ValueError(f"cannot keep {k} of {n} tokens")
    sw, order = torch.sort(w, descending=True)
    rest = torch.flip(torch.cumsum(torch.flip(sw, [0]), 0), [0])  # rest[m] = sum of sw[m:]
    m = torch.arange(k, device=w.device)
    c = (k - m) / rest[:k]
    m_star = torch.argmax((c * sw[:k] <= 1.0).to(torch.int8)).reshape(1)  # the first m where it holds
    # gather, not c[m_star]: indexing with a 0-dim tensor reads it on the host (a sync; no CUDA graph capture)
    pi_sorted = torch.where(torch.arange(n, device=w.device) < m_star, 1.0, (c.gather(0, m_star) * sw).clamp(max=1.0))
    return torch.empty_like(w).scatter_(0, order, pi_sorted)


def systematic_sample(pi: torch.Tensor, order: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Bool mask of the tokens systematic sampling keeps: lay the tokens' ``pi``
    end to end in ``order`` (a permutation) and keep each token whose stretch
    ``(start, end]`` holds one of the points ``u, u + 1, u + 2, ...`` (``u`` in
    ``[0, 1)``). A token is kept with probability exactly ``pi_i`` over ``u``
    (each ``pi_i <= 1``), and exactly ``sum(pi)`` tokens are kept when that sum is
    an integer: a fixed-size draw in proportion to ``pi``."""
    p = pi.reshape(-1).to(torch.float64)[order]
    end = torch.cumsum(p, 0)
    hit_sorted = (torch.floor(end - u) - torch.floor(end - p - u)) >= 1
    return torch.empty_like(hit_sorted).scatter_(0, order, hit_sorted)


def select_importance(
    scores: torch.Tensor,
    ratio: float,
    generator: torch.Generator | None = None,
    n_valid: int | None = None,
    floor: float = IMPORTANCE_FLOOR,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep ``budget(n_valid, ratio)`` tokens drawn in proportion to their scores,
    and the weights that make the kept tokens' mean loss unbiased.

    ``scores`` must be >= 0 where valid (``-inf`` where ignored): the ``gradnorm``
    score (``1 - p_target``, the logit gradient's norm up to sqrt(2)) or ``loss``.
    Sampling weights are ``score + floor * mean(score)`` over valid tokens, so that
    no token's chance, and no kept weight, is extreme; inclusion probabilities
    ``pi`` come from :func:`inclusion_probabilities` and the draw from
    :func:`systematic_sample` in a random order (exactly ``k`` kept).

    Returns ``(keep, weights)``: ``weights[i] = k / (n_valid * pi_i)`` on kept tokens
    (1 when every token has the same chance, as under random selection), 0
    elsewhere. So ``sum_kept weights_i * loss_i / k`` estimates the mean loss over
    every valid token without bias (Horvitz-Thompson), while hard tokens are kept
    more often than easy ones: a lower-variance gradient than random selection's
    when the tokens' gradient norms differ, as the importance-sampling literature
    for SGD does per sample (Katharopoulos and Fleuret, 2018)."""
    flat = scores.reshape(-1)
    valid = _valid(flat)
    n = int(valid.sum()) if n_valid is None else n_valid
    k = budget(n, ratio)
    if k == 0:
        raise ValueError("no token has a target to learn from (all are ignore_index)")
    s = torch.where(valid, flat.to(torch.float64), 0.0)
    mean = s.sum() / n
    # a tiny constant keeps an all-zero batch well defined (then every token has the same chance)
    w = torch.where(valid, s + floor * mean + 1e-12, 0.0)
    pi = inclusion_probabilities(w, k)
    dev = flat.device if generator is None else generator.device
    order = torch.argsort(torch.rand(flat.shape, generator=generator, device=dev).to(flat.device))
    u = torch.rand((), generator=generator, device=dev, dtype=torch.float64).to(flat.device)
    hit = systematic_sample(pi, order, u)
    # exactly k: rounding in the running sum could add or lose one token at a boundary
    idx = torch.topk(hit.to(torch.float32) + pi.to(torch.float32) * 1e-3, k).indices
    mask = _keep_indices(scores.shape, idx, flat.device)
    weights = torch.zeros(flat.shape, dtype=torch.float32, device=flat.device)
    weights.index_copy_(0, idx, (k / (n * pi.index_select(0, idx))).to(torch.float32))
    return mask, weights.view(scores.shape)


def strata_proportions(num_strata: int) -> list[float]:
    """Default shares per stratum, hardest first, decreasing linearly:
    4 strata -> 0.4, 0.3, 0.2, 0.1."""
    total = num_strata * (num_strata + 1) / 2
    return [(num_strata - i) / total for i in range(num_strata)]


def allocate(k: int, proportions: list[float], sizes: list[int]) -> list[int]:
    """Integer counts per stratum summing to ``min(k, sum(sizes))``: largest
    remainders of ``k * p_i`` (ties to the harder stratum), and any count a
    stratum cannot hold passed on to the next, then back to the hardest with room."""
    exact = [k * p for p in proportions]
    want = [math.floor(e) for e in exact]
    order = sorted(range(len(exact)), key=lambda i: (-(exact[i] - want[i]), i))
    for i in order[: k - sum(want)]:
        want[i] += 1
    out, carry = [], 0
    for w, size in zip(want, sizes):
        take = min(size, w + carry)
        carry = w + carry - take
        out.append(take)
    for i in range(len(out)):
        if carry <= 0:
            break
        extra = min(sizes[i] - out[i], carry)
        out[i] += extra
        carry -= extra
    return out


def select_stratified(
    scores: torch.Tensor,
    ratio: float,
    num_strata: int = 4,
    proportions: list[float] | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Sort valid tokens by score, cut them into ``num_strata`` equal strata
    (hardest first), and draw ``allocate(k, proportions)`` tokens uniformly at
    random from each. Total kept = ``budget(n_valid, ratio)``."""
    props = proportions or strata_proportions(num_strata)
    if len(props) != num_strata or abs(sum(props) - 1.0) > 1e-6:
        raise ValueError(f"need {num_strata} proportions summing to 1, got {props}")
    flat = scores.reshape(-1)
    valid_idx = torch.nonzero(_valid(flat)).squeeze(1)
    n = valid_idx.numel()
    k = budget(n, ratio)
    order = valid_idx[torch.argsort(flat[valid_idx], descending=True, stable=True)]
    bounds = [round(i * n / num_strata) for i in range(num_strata + 1)]
    strata = [order[bounds[i] : bounds[i + 1]] for i in range(num_strata)]
    counts = allocate(k, props, [s.numel() for s in strata])
    picked = []
    for stratum, c in zip(strata, counts):
        if c:
            perm = torch.randperm(stratum.numel(), generator=generator, device=generator.device if generator else "cpu")
            picked.append(stratum[perm[:c].to(stratum.device)])
    idx = torch.cat(picked) if picked else order[:0]
    return _keep_indices(scores.shape, idx, flat.device)


def select_sequence_aware(scores: torch.Tensor, ratio: float, min_per_sequence: int = 1) -> torch.Tensor:
    """Top-k over the batch, but every sequence keeps at least
    ``min(min_per_sequence, its valid tokens)`` of its own highest scores.

    Total kept = ``max(budget(n_valid, ratio), reserved)``: the reserved
    tokens come first, the rest of the budget goes to the highest remaining
    scores anywhere.
    """
    rows = scores.reshape(-1, scores.shape[-1])
    valid = _valid(rows)
    reserved = torch.zeros_like(valid)
    for r in range(rows.shape[0]):
        m = min(min_per_sequence, int(valid[r].sum()))
        if m:
            reserved[r, torch.topk(rows[r], m).indices] = True
    k = budget(int(valid.sum()), ratio)
    extra = k - int(reserved.sum())
    if extra > 0:
        rest = rows.masked_fill(reserved, float("-inf")).reshape(-1)
        reserved.view(-1)[torch.topk(rest, extra).indices] = True
    return reserved.view(scores.shape)


def select(
    method: str,
    scores: torch.Tensor,
    ratio: float = 1.0,
    threshold: float = 0.0,
    num_strata: int = 4,
    min_per_sequence: int = 1,
    per_sequence: bool = False,
    generator: torch.Generator | None = None,
    n_valid: int | None = None,
) -> torch.Tensor:
    """Dispatch by name (see :data:`METHODS`). ``n_valid``: the number of valid
    tokens, when known on the host (``topk`` and ``random`` then need no sync)."""
    if method == "threshold":
        return select_threshold(scores, threshold)
    if method == "topk":
        return select_topk(scores, ratio, per_sequence, n_valid)
    if method == "stratified":
        return select_stratified(scores, ratio, num_strata, generator=generator)
    if method == "sequence_aware":
        return select_sequence_aware(scores, ratio, min_per_sequence)
    if method == "importance":
        raise ValueError("importance selection returns weights with its mask: call select_importance "
                         "(TokenSelector does, and the Collider loss takes them)")
    if method == "random":
        if per_sequence and scores.dim() >= 2:
            valid = _valid(scores)
            counts = torch.tensor([budget(int(v.sum()), ratio) for v in valid.reshape(-1, scores.shape[-1])])
            return select_random(valid, count=counts, generator=generator)
        return select_random(_valid(scores), ratio=ratio, generator=generator, n_valid=n_valid)
    raise ValueError(f"unknown selection method {method!r} (choose from {', '.join(METHODS)})")
