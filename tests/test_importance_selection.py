"""Importance selection: tokens drawn in proportion to a score, weighted so that
the kept-rows loss is an unbiased estimate of the mean loss over every token.

References: capped inclusion probabilities by the plain iterative algorithm in
float64 Python, inclusion frequencies over a fine grid of the systematic draw's
offset, Monte Carlo over many draws for the whole selection, and float64
autograd for the weighted selective loss (the weighted Collider loss is tested
in test_collider.py)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from sparsetrain.selection import (
    CGGRLoss, TokenSelector, budget, inclusion_probabilities, score_tokens, select, select_importance,
)
from sparsetrain.selection.select import IMPORTANCE_FLOOR, systematic_sample
from conftest import fresh_seed


def naive_inclusion(w: list[float], k: int) -> list[float]:
    """Cap at 1 whatever ``c * w_i`` puts above 1, recompute ``c`` over the rest, repeat."""
    capped: set[int] = set()
    while True:
        rest = [i for i in range(len(w)) if i not in capped]
        c = (k - len(capped)) / sum(w[i] for i in rest)
        over = {i for i in rest if c * w[i] > 1.0}
        if not over:
            return [1.0 if i in capped else c * w[i] for i in range(len(w))]
        capped |= over


@pytest.mark.parametrize("n, k", [(1, 1), (7, 3), (50, 25), (200, 17), (64, 64)])
def test_inclusion_probabilities_match_iterative_capping(n: int, k: int) -> None:
    g = torch.Generator().manual_seed(fresh_seed())
    w = torch.rand(n, generator=g, dtype=torch.float64) ** 4 + 1e-3  # heavy tail: several capped
    got = inclusion_probabilities(w, k)
    want = torch.tensor(naive_inclusion(w.tolist(), k), dtype=torch.float64)
    assert torch.allclose(got, want, rtol=1e-12, atol=1e-12)
    assert abs(float(got.sum()) - k) < 1e-9 and float(got.max()) <= 1.0


def test_inclusion_probabilities_leave_zero_weights_out() -> None:
    g = torch.Generator().manual_seed(fresh_seed())
    w = torch.rand(30, generator=g, dtype=torch.float64)
    w[::3] = 0.0
    pi = inclusion_probabilities(w, 8)
    assert torch.all(pi[::3] == 0) and abs(float(pi.sum()) - 8) < 1e-9
    with pytest.raises(ValueError, match="cannot keep 31 of 30"):
        inclusion_probabilities(w, 31)


def test_systematic_draw_keeps_each_token_with_its_probability_and_exactly_k() -> None:
    """Over a fine grid of offsets u (a fixed random order), each token is kept for a
    share of u equal to its probability, and every draw keeps exactly k."""
    g = torch.Generator().manual_seed(fresh_seed())
    n, k, grid = 40, 13, 4000
    pi = inclusion_probabilities(torch.rand(n, generator=g, dtype=torch.float64) ** 3 + 0.01, k)
    order = torch.randperm(n, generator=g)
    counts = torch.zeros(n, dtype=torch.float64)
    for j in range(grid):
        hit = systematic_sample(pi, order, torch.tensor((j + 0.5) / grid, dtype=torch.float64))
        assert int(hit.sum()) == k
        counts += hit
    # each token's set of offsets is at most two intervals: the grid misses at most 2 points per end
    assert torch.allclose(counts / grid, pi, atol=4.0 / grid)


def test_selection_is_unbiased_and_keeps_hard_tokens_more() -> None:
    """Many draws from select_importance: kept frequencies equal the probabilities the
    weights imply (binomial bounds), those equal inclusion_probabilities of the
    floored scores, and the weighted kept mean is an unbiased estimate of the mean
    over every valid token."""
    g = torch.Generator().manual_seed(fresh_seed())
    B, T = 2, 20
    scores = torch.rand(B, T, generator=g) ** 2
    scores[1, 3] = float("-inf")  # an ignored target: never kept
    values = torch.randn(B, T, generator=g, dtype=torch.float64)  # any per-token quantity, e.g. a loss
    valid = scores > float("-inf")
    n = int(valid.sum())
    k = budget(n, 0.3)
    s = torch.where(valid, scores.double(), 0.0)
    pi_want = inclusion_probabilities(torch.where(valid, s + IMPORTANCE_FLOOR * s.sum() / n + 1e-12, 0.0), k)
    draws = 3000
    gen = torch.Generator().manual_seed(fresh_seed())
    freq = torch.zeros(B * T, dtype=torch.float64)
    estimates = []
    for _ in range(draws):
        mask, w = select_importance(scores, 0.3, generator=gen, n_valid=n)
        assert int(mask.sum()) == k and not bool(mask[1, 3]) and torch.all(w[~mask] == 0)
        kept = mask.reshape(-1)
        pi_from_w = k / (n * w.reshape(-1)[kept].double())
        assert torch.allclose(pi_from_w, pi_want[kept], rtol=1e-5)
        freq += kept
        estimates.append(float((w.double() * values)[mask].sum()) / k)
    sd = torch.sqrt(pi_want * (1 - pi_want) / draws)
    assert torch.all((freq / draws - pi_want).abs() <= 5 * sd + 1e-12)
    mean_all = float(values[valid].mean())
    est = torch.tensor(estimates, dtype=torch.float64)
    assert abs(float(est.mean()) - mean_all) <= 5 * float(est.std()) / math.sqrt(draws)
    # harder tokens (higher score) are kept more often than easier ones
    order = torch.argsort(s.reshape(-1), descending=True)
    assert float(freq[order[:5]].mean()) > float(freq[order[-6:-1]].mean())


def test_equal_scores_give_random_selection_with_unit_weights() -> None:
    g = torch.Generator().manual_seed(fresh_seed())
    mask, w = select_importance(torch.full((3, 11), 0.7), 0.5, generator=g)
    assert int(mask.sum()) == budget(33, 0.5)
    assert torch.allclose(w[mask], torch.ones(()), rtol=1e-6)


def test_select_refuses_importance_without_its_weights() -> None:
    with pytest.raises(ValueError, match="returns weights with its mask"):
        select("importance", torch.rand(2, 5), ratio=0.5)


def test_selector_refuses_scores_that_can_be_negative() -> None:
    with pytest.raises(ValueError, match="must be one of loss, gradnorm.*got 'collider'"):
        TokenSelector(score="collider", method="importance")
    with pytest.raises(ValueError, match="per_sequence and dynamic"):
        TokenSelector(score="loss", method="importance", per_sequence=True)


def test_gradnorm_score_bounds_the_logit_gradient_norm() -> None:
    """``1 - p_target`` against the float64 norm of softmax - onehot: within sqrt(2)."""
    g = torch.Generator().manual_seed(fresh_seed())
    logits = 3 * torch.randn(4, 9, 50, generator=g, dtype=torch.float64)
    targets = torch.randint(0, 50, (4, 9), generator=g)
    targets[0, 0] = -100
    s, _ = score_tokens("gradnorm", logits, targets)
    p = torch.softmax(logits, -1)
    norm = (p - F.one_hot(targets.clamp(min=0), 50).double()).norm(dim=-1)
    v = targets != -100
    assert s[0, 0] == float("-inf")
    assert torch.all(s[v] <= norm[v] + 1e-12) and torch.all(norm[v] <= math.sqrt(2) * s[v] + 1e-12)
    assert torch.allclose(s[v], 1 - p.gather(-1, targets.clamp(min=0)[..., None]).squeeze(-1)[v], rtol=1e-12)


def test_cggr_loss_with_importance_is_the_weighted_kept_mean() -> None:
    g = torch.Generator().manual_seed(fresh_seed())
    B, T, V = 2, 16, 40
    logits = torch.randn(B, T, V, generator=g, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, V, (B, T), generator=g)
    sel = TokenSelector(score="gradnorm", method="importance", keep_ratio=0.4, seed=fresh_seed())
    loss = CGGRLoss(selector=sel)(logits, targets)
    mask, stats = sel.last_mask, sel.last_stats
    ce = F.cross_entropy(logits.detach().reshape(-1, V), targets.reshape(-1), reduction="none").view(B, T)
    want = (ce * stats.weights.double())[mask].sum() / int(mask.sum())
    assert torch.allclose(loss.detach(), want, rtol=1e-12)


@pytest.mark.parametrize("T, span", [(12, 4), (13, 4), (7, 1), (5, 8)])
def test_span_mean_matches_a_loop_over_blocks(T: int, span: int) -> None:
    from sparsetrain.selection.scores import span_mean

    g = torch.Generator().manual_seed(fresh_seed())
    s = torch.randn(3, T, generator=g, dtype=torch.float64)
    s[0, 1] = float("-inf")
    s[2, : min(span, T)] = float("-inf")  # a block with nothing valid
    got = span_mean(s, span)
    for b in range(3):
        for start in range(0, T, span):
            block = s[b, start:start + span]
            ok = block > float("-inf")
            want = block[ok].mean() if ok.any() else torch.tensor(float("-inf"), dtype=torch.float64)
            for t in range(start, min(start + span, T)):
                expect = want if s[b, t] > float("-inf") else torch.tensor(float("-inf"), dtype=torch.float64)
                assert torch.allclose(got[b, t], expect, rtol=1e-12) or (got[b, t] == expect), (b, t)


def test_span_selection_keeps_or_drops_whole_blocks() -> None:
    """Top-k on span-averaged scores with a budget of whole blocks keeps whole blocks:
    the blocks of highest mean score."""
    g = torch.Generator().manual_seed(fresh_seed())
    B, T, V, span = 2, 32, 30, 8
    logits = torch.randn(B, T, V, generator=g, dtype=torch.float64)
    targets = torch.randint(0, V, (B, T), generator=g)
    sel = TokenSelector(score="loss", method="topk", keep_ratio=0.5, span=span)
    keep, _ = sel(logits, targets)
    blocks = keep.view(B, T // span, span)
    assert torch.all(blocks.all(-1) | ~blocks.any(-1)) and int(keep.sum()) == B * T // 2
    nll = F.cross_entropy(logits.reshape(-1, V), targets.reshape(-1), reduction="none").view(B, T // span, span).mean(-1)
    kept_blocks = blocks.all(-1)
    assert float(nll[kept_blocks].min()) >= float(nll[~kept_blocks].max()) - 1e-12
    with pytest.raises(ValueError, match="span must be >= 1, got 0"):
        TokenSelector(span=0)

