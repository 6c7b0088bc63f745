"""Scores against float64 formulas, the fused kernel against them, exact selection
counts, schedules, the adaptive controller, CGGRLoss gradients and routers."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from sparsetrain.config import ModelConfig
from sparsetrain.model import GPT
from sparsetrain.selection import (
    AdaptiveThreshold,
    CGGRLoss,
    CGGRModel,
    SelectionStats,
    TokenSelector,
    budget,
    check_health,
    create_truncated_router,
    dynamic_keep_ratio,
    row_stats_torch,
    score_tokens,
    select_random,
    select_sequence_aware,
    select_stratified,
    select_threshold,
    select_topk,
    shift_labels,
    warmup_keep_ratio,
)
from sparsetrain.selection.select import allocate, cached_kept_indices, kept_indices, strata_proportions
from sparsetrain.selection.triton_scores import row_stats_triton, triton_available

from conftest import fresh_seed, requires_cuda


def reference_scores(logits: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:
    """Each score from its textbook formula in float64, one row at a time."""
    x = logits.double()
    B, T, V = x.shape
    out = {k: torch.full((B, T), float("-inf"), dtype=torch.float64) for k in ("loss", "entropy", "margin", "combined")}
    out["collider"] = torch.full((B, T), float("-inf"), dtype=torch.float64)
    for b in range(B):
        losses = {}
        for t in range(T):
            if targets[b, t] == -100:
                continue
            p = torch.softmax(x[b, t], -1)
            nll = -math.log(p[targets[b, t]])
            H = -(p * torch.log(p)).sum().item()
            p_sorted = sorted(p.tolist(), reverse=True)
            p1, p2 = p_sorted[0], p_sorted[1]
            out["loss"][b, t] = nll
            out["entropy"][b, t] = H
            out["margin"][b, t] = 1 - (p1 - p2)
            out["combined"][b, t] = (H - p1) + (1 - (p1 - p2)) + nll
            losses[t] = nll
        if losses:
            lo, hi = min(losses.values()), max(losses.values())
            for t, l in losses.items():
                out["collider"][b, t] = (l - lo) / (hi - lo + 1e-6)
    return out


def random_batch(B=3, T=9, V=50, scale=3.0):
    g = torch.Generator().manual_seed(fresh_seed())
    logits = torch.randn(B, T, V, generator=g, dtype=torch.float64) * scale
    targets = torch.randint(0, V, (B, T), generator=g)
    targets[0, :3] = -100
    targets[-1, -1] = -100
    logits[1, 2, :] = 0.0  # a row of exact ties: p1 == p2, margin 1
    logits[1, 3, 7] = logits[1, 3, 11] = logits[1, 3].max() + 2.0  # tied top-2
    return logits, targets


@pytest.mark.parametrize("kind", ["loss", "entropy", "margin", "combined", "collider"])
def test_scores_match_float64_formulas(kind: str) -> None:
    logits, targets = random_batch()
    ref = reference_scores(logits, targets)[kind]
    got, stats = score_tokens(kind, logits, targets)
    assert got.dtype == torch.float64
    assert torch.equal(torch.isinf(got), targets == -100)
    assert torch.allclose(got[targets != -100], ref[targets != -100], rtol=1e-10, atol=1e-10)
    assert stats.p1[1, 2] == pytest.approx(1 / 50) and stats.p2[1, 2] == pytest.approx(1 / 50)


def test_float32_scores_close_to_float64() -> None:
    logits, targets = random_batch(V=300)
    ref = reference_scores(logits, targets)["combined"]
    got, _ = score_tokens("combined", logits.float(), targets)
    valid = targets != -100
    assert torch.allclose(got[valid].double(), ref[valid], rtol=1e-5, atol=1e-5)


def test_excess_score_and_errors() -> None:
    logits, targets = random_batch()
    ref_nll = torch.rand(targets.shape, dtype=torch.float64)
    got, stats = score_tokens("excess", logits, targets, ref_nll=ref_nll)
    valid = targets != -100
    assert torch.allclose(got[valid], stats.nll[valid] - ref_nll[valid])
    with pytest.raises(ValueError, match="ref_nll"):
        score_tokens("excess", logits, targets)
    with pytest.raises(ValueError, match="unknown score"):
        score_tokens("magic", logits, targets)


def test_reference_score_is_minus_the_reference_loss() -> None:
    """``reference``: what the reference finds easiest first, whatever the model's logits say."""
    logits, targets = random_batch()
    ref_nll = torch.rand(targets.shape, dtype=torch.float64) * 5
    got, _ = score_tokens("reference", logits, targets, ref_nll=ref_nll)
    valid = targets != -100
    assert torch.equal(got[valid], -ref_nll[valid]) and torch.isinf(got[~valid]).all()
    other, _ = score_tokens("reference", torch.randn_like(logits), targets, ref_nll=ref_nll)
    assert torch.equal(other, got)  # the model's logits play no part
    with pytest.raises(ValueError, match="score 'reference' needs the reference model's per-token losses"):
        score_tokens("reference", logits, targets)


def test_reference_score_over_spans_keeps_the_easiest_blocks() -> None:
    """Top-k on the span-averaged reference score keeps the blocks of lowest mean reference loss."""
    from sparsetrain.selection import TokenSelector

    g = torch.Generator().manual_seed(fresh_seed())
    B, T, V, span = 3, 32, 20, 8
    logits = torch.randn(B, T, V, generator=g, dtype=torch.float64)
    targets = torch.randint(0, V, (B, T), generator=g)
    ref_nll = torch.rand(B, T, generator=g, dtype=torch.float64) * 6
    keep, _ = TokenSelector(score="reference", method="topk", keep_ratio=0.5, span=span)(logits, targets, ref_nll)
    blocks = keep.view(B, T // span, span)
    assert torch.all(blocks.all(-1) | ~blocks.any(-1)) and int(keep.sum()) == B * T // 2
    means = ref_nll.view(B, T // span, span).mean(-1)
    kept = blocks.all(-1)
    assert float(means[kept].max()) <= float(means[~kept].min()) + 1e-12


def test_shift_labels() -> None:
    labels = torch.tensor([[5, 6, 7, 8]])
    assert shift_labels(labels).tolist() == [[6, 7, 8, -100]]


@pytest.mark.skipif(not triton_available(), reason="triton not installed")
@pytest.mark.parametrize("V, block", [(1000, 128), (37, 64), (2048, 2048)])
def test_fused_kernel_matches_reference(V: int, block: int) -> None:
    device = "cuda" if torch.cuda.is_available() else "cpu"  # CPU runs Triton's interpreter
    logits, targets = random_batch(B=2, T=5, V=V)
    ref = row_stats_torch(logits, targets)
    got = row_stats_triton(logits.float().to(device), targets.to(device), block=block)
    for k in ("lse", "nll", "entropy", "p1", "p2"):
        a, b = getattr(got, k).cpu().double(), getattr(ref, k)
        assert torch.allclose(a, b, rtol=2e-5, atol=2e-5), (k, (a - b).abs().max())
    assert torch.equal(got.valid.cpu(), ref.valid)


@pytest.mark.skipif(not triton_available(), reason="triton not installed")
def test_fused_kernel_bf16_matches_torch_path_on_same_bf16_input() -> None:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    logits, targets = random_batch(B=2, T=4, V=700)
    x = logits.to(torch.bfloat16)
    ref = row_stats_torch(x.double(), targets)  # exact stats of the rounded input
    got = row_stats_triton(x.to(device), targets.to(device), block=256)
    for k in ("lse", "nll", "entropy", "p1", "p2"):
        assert torch.allclose(getattr(got, k).cpu().double(), getattr(ref, k), rtol=1e-5, atol=1e-5), k


@pytest.mark.skipif(not triton_available(), reason="triton not installed")
def test_fused_kernel_on_listed_rows_equals_the_gathered_rows() -> None:
    """``rows=``: the stats of those rows, read in place (bit for bit what the
    kernel gives on a gathered copy), in the order listed, repeats allowed."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    logits, targets = random_batch(B=3, T=6, V=500)
    targets[1, 2] = -100
    x, t = logits.float().to(device), targets.to(device)
    rows = torch.tensor([17, 0, 8, 8, 3], device=device)
    got = row_stats_triton(x, t, block=128, rows=rows)
    want = row_stats_triton(x.reshape(-1, 500)[rows], t.reshape(-1)[rows], block=128)
    ref = row_stats_torch(logits.reshape(-1, 500)[rows.cpu()], targets.reshape(-1)[rows.cpu()])
    for k in ("lse", "nll", "entropy", "p1", "p2"):
        assert torch.equal(getattr(got, k), getattr(want, k)), k
        assert torch.allclose(getattr(got, k).cpu().double(), getattr(ref, k), rtol=2e-5, atol=2e-5), k
    assert torch.equal(got.valid, want.valid) and got.lse.shape == (5,)


@requires_cuda
def test_gpu_dispatch_uses_kernel_and_agrees() -> None:
    logits, targets = random_batch(B=4, T=64, V=5000)
    a, _ = score_tokens("combined", logits.float().cuda(), targets.cuda())
    b, _ = score_tokens("combined", logits.float(), targets)
    valid = targets != -100
    assert torch.allclose(a.cpu()[valid], b[valid], rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------- selection


def random_scores(B=4, T=50, n_invalid=7):
    s = torch.randn(B, T, dtype=torch.float64)
    flat = s.view(-1)
    flat[torch.randperm(flat.numel())[:n_invalid]] = float("-inf")
    return s


@pytest.mark.parametrize("ratio", [0.1, 0.25, 0.4, 0.5, 1.0])
def test_topk_counts_and_ordering(ratio: float) -> None:
    s = random_scores()
    n_valid = int((s > float("-inf")).sum())
    mask = select_topk(s, ratio)
    assert int(mask.sum()) == math.ceil(ratio * n_valid - 1e-9) == budget(n_valid, ratio)
    assert not mask[s == float("-inf")].any()
    rest = s[~mask & (s > float("-inf"))]
    if rest.numel():
        assert s[mask].min() >= rest.max()
    per = select_topk(s, ratio, per_sequence=True)
    for r in range(s.shape[0]):
        assert int(per[r].sum()) == budget(int((s[r] > float("-inf")).sum()), ratio)


def test_threshold_selection() -> None:
    s = random_scores()
    mask = select_threshold(s, 0.3)
    assert torch.equal(mask, s > 0.3)
    assert not select_threshold(s, float("-inf"))[s == float("-inf")].any()


def test_threshold_selection_never_keeps_nothing() -> None:
    """Where no valid score is above the threshold, the valid tokens of the highest
    score are kept (all of a tied span), never an empty mask: the step would have
    nothing to learn from."""
    s = random_scores()
    valid = s > float("-inf")
    top = s[valid].max()
    assert torch.equal(select_threshold(s, float(top) + 1.0), valid & (s == top))
    ties = torch.tensor([[0.2, 0.2, 0.9, 0.9], [0.1, float("-inf"), 0.9, 0.3]])
    assert select_threshold(ties, 0.9).tolist() == [[False, False, True, True], [False, False, True, False]]
    assert not select_threshold(torch.full((2, 3), float("-inf")), 0.0).any()  # nothing valid: nothing kept


@pytest.mark.parametrize("case", ["span ties", "one target", "easy batch"])
def test_threshold_selector_keeps_a_token_where_the_threshold_passes_none(case: str) -> None:
    """Three batches on which the threshold (adaptive or fixed) is at or above every
    kept candidate: a span-scored batch at drop 0.9 (scores tie within spans), a batch
    with one target (its own score is the first threshold), a fixed threshold above
    every loss. Each keeps the highest-scored valid tokens."""
    logits, targets = random_batch(B=2, T=16, V=40)
    if case == "span ties":
        sel = TokenSelector(score="collider", method="threshold", keep_ratio=0.1, target_sparsity=0.9, span=16)
    elif case == "one target":
        sel = TokenSelector(score="loss", method="threshold", target_sparsity=0.4)
        targets = torch.full_like(targets, -100)
        targets[1, 7] = 5
    else:
        sel = TokenSelector(score="loss", method="threshold", threshold=100.0)
    mask, st = sel(logits, targets)
    assert st.kept >= 1 and mask.sum() == st.kept and not mask[targets == -100].any()
    if case == "one target":
        assert mask[1, 7] and st.kept == 1
    if case == "easy batch":
        nll = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none", ignore_index=-100).view(targets.shape)
        assert torch.equal(mask, nll == nll[targets != -100].max())


def test_adaptive_threshold_warmup_starts_dense() -> None:
    """With selection warmup the adaptive threshold's target sparsity starts at 0:
    step 0 keeps every valid token, as the keep ratio in force (1.0) says."""
    logits, targets = random_batch(B=4, T=16, V=40)
    sel = TokenSelector(score="collider", method="threshold", keep_ratio=0.6, target_sparsity=0.4, warmup_steps=100)
    mask, st = sel(logits, targets)
    assert torch.equal(mask, targets != -100) and st.keep_ratio == 1.0


def test_random_selection_exact_counts_and_uniform() -> None:
    valid = random_scores() > float("-inf")
    g = torch.Generator().manual_seed(fresh_seed())
    hits = torch.zeros(valid.shape)
    n = 2000
    k = budget(int(valid.sum()), 0.3)
    for _ in range(n):
        m = select_random(valid, ratio=0.3, generator=g)
        assert int(m.sum()) == k and not m[~valid].any()
        hits += m
    p = k / int(valid.sum())
    se = math.sqrt(p * (1 - p) / n)
    assert (hits[valid] / n - p).abs().max() < 5 * se
    counts = torch.tensor([3, 0, 5, 1])
    m = select_random(valid, count=counts, generator=g)
    assert m.sum(-1).tolist() == counts.tolist()


def test_strata_proportions_and_allocation() -> None:
    assert strata_proportions(4) == pytest.approx([0.4, 0.3, 0.2, 0.1])
    assert allocate(100, [0.4, 0.3, 0.2, 0.1], [50, 50, 50, 50]) == [40, 30, 20, 10]
    assert allocate(7, [0.4, 0.3, 0.2, 0.1], [9, 9, 9, 9]) == [3, 2, 1, 1]  # largest remainders .8 and .7
    assert allocate(100, [0.4, 0.3, 0.2, 0.1], [25, 25, 25, 25]) == [25, 25, 25, 25]
    assert sum(allocate(60, [0.4, 0.3, 0.2, 0.1], [10, 40, 40, 40])) == 60


def test_stratified_draws_exact_counts_per_stratum() -> None:
    s = torch.randn(4, 100, dtype=torch.float64)  # 400 valid, strata of 100
    g = torch.Generator().manual_seed(fresh_seed())
    mask = select_stratified(s, 0.5, 4, generator=g)
    assert int(mask.sum()) == 200
    order = torch.argsort(s.view(-1), descending=True)
    rank_of = torch.empty_like(order)
    rank_of[order] = torch.arange(400)
    strata = rank_of[mask.view(-1)] // 100
    assert torch.bincount(strata, minlength=4).tolist() == [80, 60, 40, 20]


def test_sequence_aware_guarantees_coverage() -> None:
    s = torch.randn(5, 40, dtype=torch.float64)
    s[3] -= 100.0  # a sequence a global top-k would skip entirely
    s[4, 2:] = float("-inf")  # only 2 valid tokens
    mask = select_sequence_aware(s, 0.1, min_per_sequence=3)
    n_valid = int((s > float("-inf")).sum())
    reserved = 3 * 4 + 2
    assert int(mask.sum()) == max(budget(n_valid, 0.1), reserved)
    assert mask.sum(-1).min() >= 2 and mask[3].sum() == 3 and mask[4].sum() == 2
    assert torch.equal(mask[3], s[3] >= s[3].topk(3).values[-1])


# ----------------------------------------------------------------------------- schedules


def test_warmup_and_dynamic_ratio_at_chosen_steps() -> None:
    assert warmup_keep_ratio(0, 0.25, 100) == 1.0
    assert warmup_keep_ratio(50, 0.25, 100) == pytest.approx(0.625)
    assert warmup_keep_ratio(100, 0.25, 100) == 0.25
    assert warmup_keep_ratio(10_000, 0.25, 100) == 0.25
    assert warmup_keep_ratio(3, 0.25, 0) == 0.25
    assert dynamic_keep_ratio(0.25, 1.0, 0.5) == 0.25
    assert dynamic_keep_ratio(0.25, 0.0, 0.5) == pytest.approx(0.625)
    assert dynamic_keep_ratio(0.25, 0.6, 1.0) == pytest.approx(0.25 + 0.4 * 0.75)


@pytest.mark.parametrize("target", [0.25, 0.4, 0.5])
def test_adaptive_threshold_holds_target_sparsity(target: float) -> None:
    g = torch.Generator().manual_seed(fresh_seed())
    ctl = AdaptiveThreshold(target)
    dropped = []
    for step in range(400):
        shift = 2.0 * step / 400  # scores drift upward as training changes the model
        scores = torch.randn(4096, generator=g, dtype=torch.float64) * 0.3 + shift
        if ctl.threshold is None:
            ctl.update(scores)
        dropped.append(float((scores <= ctl.threshold).double().mean()))
        ctl.update(scores)
    late = dropped[50:]
    assert abs(sum(late) / len(late) - target) < 0.02
    assert max(abs(d - target) for d in late) < 0.1


def test_stats_health_and_warning() -> None:
    st = SelectionStats(kept=30, total=100, sparsity=0.7, keep_ratio=0.3, threshold=None,
                        avg_confidence=0.5, avg_entropy=1.0, avg_difficulty=0.1)
    assert not st.is_healthy()
    with pytest.warns(RuntimeWarning, match="0.700"):
        check_health(st)
    st.sparsity = 0.4
    assert st.is_healthy() and check_health(st)


def test_selector_stats_and_adaptive_threshold_method() -> None:
    logits, targets = random_batch(B=8, T=64, V=40)
    sel = TokenSelector(score="loss", method="threshold", target_sparsity=0.4)
    for _ in range(30):
        mask, st = sel(logits + 0.01 * torch.randn_like(logits), targets)
    valid = targets != -100
    assert st.total == int(valid.sum()) and st.kept == int(mask.sum())
    assert abs(st.sparsity - 0.4) < 0.05
    assert st.avg_confidence == pytest.approx(float(torch.softmax(logits, -1).amax(-1)[valid].mean()), rel=0.05)
    with pytest.raises(ValueError, match="ignore_index"):
        sel(logits, torch.full_like(targets, -100))


@pytest.mark.parametrize("method", ["topk", "random", "stratified", "threshold"])
def test_given_valid_count_gives_same_mask_and_cached_indices(method: str) -> None:
    """Passing the host-known valid count changes nothing but the syncs: the
    same mask, stats equal to the counted ones, and kept indices that ride
    along (equal to nonzero) until the mask is modified in place."""
    logits, targets = random_batch(B=4, T=33, V=40)
    n_valid = int((targets != -100).sum())
    mask_a, st_a = TokenSelector(score="loss", method=method, keep_ratio=0.4, threshold=1.0)(logits, targets)
    mask_b, st_b = TokenSelector(score="loss", method=method, keep_ratio=0.4, threshold=1.0)(logits, targets, n_valid=n_valid)
    assert torch.equal(mask_a, mask_b)
    assert not (mask_b & (targets == -100)).any()
    assert st_b.total == n_valid and st_b.kept == int(mask_b.sum())
    valid = targets != -100
    p1 = torch.softmax(logits, -1).amax(-1)
    assert st_b.avg_confidence == pytest.approx(float(p1[valid].mean()), rel=1e-5)
    for key, value in st_a.to_dict().items():
        assert getattr(st_b, key) == (value if value is None else pytest.approx(value, rel=1e-6)), key
    ref = torch.nonzero(mask_b.reshape(-1)).squeeze(1)
    cached = cached_kept_indices(mask_b)
    if method == "threshold":  # no indices at hand when the mask was made
        assert cached is None
    else:
        assert torch.equal(cached, ref)
    assert torch.equal(kept_indices(mask_b), ref)
    flip = int(ref[0])
    mask_b.view(-1)[flip] = False  # in place: the cached indices are stale and must not be used
    assert cached_kept_indices(mask_b) is None
    assert torch.equal(kept_indices(mask_b), ref[1:])


def test_stats_read_back_lazily_from_tensors() -> None:
    g = torch.Generator().manual_seed(fresh_seed())
    vals = torch.rand(3, generator=g, dtype=torch.float64)
    kept = torch.randint(1, 50, (), generator=g)
    st = SelectionStats(kept=kept, total=100, keep_ratio=0.5, avg_confidence=vals[0], avg_entropy=vals[1],
                        avg_difficulty=vals[2])
    assert st.total == 100 and isinstance(st._raw["avg_confidence"], torch.Tensor)  # a host field: nothing read back
    assert st.kept == int(kept) and isinstance(st.kept, int)
    assert not any(isinstance(v, torch.Tensor) for v in st._raw.values())  # one read resolved them all
    assert st.sparsity == pytest.approx(1 - int(kept) / 100)
    assert [st.avg_confidence, st.avg_entropy, st.avg_difficulty] == pytest.approx(vals.tolist(), rel=1e-12)


# ----------------------------------------------------------------------------- CGGR API


CGGR_METRIC_KEYS = {"step", "token_ratio", "tokens_selected", "tokens_total", "avg_confidence", "avg_entropy",
                    "avg_difficulty", "selection", "scoring"}


@pytest.mark.parametrize("scoring", ["loss", "entropy", "margin", "combined"])
def test_cggr_loss_gradient_equals_masked_cross_entropy(scoring: str) -> None:
    logits, targets = random_batch(B=4, T=16, V=30)
    crit = CGGRLoss(scoring=scoring, selection="topk", min_tokens_ratio=0.3, warmup_steps=0, dynamic_threshold=False)
    x = logits.clone().requires_grad_(True)
    loss = crit(x, targets)
    loss.backward()
    scores, _ = score_tokens(scoring, logits, targets)
    mask = select_topk(scores, 0.3)
    x_ref = logits.clone().requires_grad_(True)
    ref = F.cross_entropy(x_ref[mask], targets[mask])
    ref.backward()
    assert torch.allclose(loss, ref, rtol=1e-12)
    assert torch.allclose(x.grad, x_ref.grad, rtol=1e-12, atol=1e-15)
    assert (x.grad[~mask] == 0).all()
    assert set(crit.get_metrics()) == CGGR_METRIC_KEYS
    assert crit.get_metrics()["tokens_selected"] == int(mask.sum())


def test_cggr_loss_warmup_advances_without_step_calls() -> None:
    logits, targets = random_batch(B=4, T=16, V=30)
    crit = CGGRLoss(min_tokens_ratio=0.25, warmup_steps=4, dynamic_threshold=False)
    ratios = []
    for _ in range(6):
        crit(logits, targets)
        ratios.append(crit.get_metrics()["token_ratio"])
    assert ratios == pytest.approx([1.0, 0.8125, 0.625, 0.4375, 0.25, 0.25])
    manual = CGGRLoss(min_tokens_ratio=0.25, warmup_steps=4, dynamic_threshold=False)
    manual.step()  # from now on only explicit calls count
    for _ in range(3):
        manual(logits, targets)
    assert manual.get_metrics()["step"] == 1


def _warmup_ratio(step: int, target: float, warmup: int) -> float:
    """The documented warmup: linear from 1.0 at step 0 to ``target`` at ``warmup`` steps."""
    return 1.0 - min(step, warmup) / warmup * (1.0 - target)


def _accumulate(obj, forward, n_steps: int, micro: int) -> list[list[float]]:
    """The documented loop: ``micro`` training forwards per optimizer step, ``obj.step()``
    after each optimizer step; the keep ratio of every micro-batch."""
    ratios = []
    for _ in range(n_steps):
        ratios.append([])
        for _ in range(micro):
            forward()
            ratios[-1].append(obj.get_metrics()["token_ratio"])
        obj.step()  # after optimizer.step()
    return ratios


def _cggr_pair(kind: str, **kw):
    """A CGGRLoss or CGGRModel in training mode and a training forward of it."""
    if kind == "loss":
        logits, targets = random_batch(B=4, T=16, V=30)
        obj = CGGRLoss(selection="topk", dynamic_threshold=False, **kw)
        return obj, lambda: obj(logits, targets)
    obj = CGGRModel(_tiny_gpt(n_layer=1), dynamic_threshold=False, scoring="loss", **kw)
    ids = torch.randint(0, 300, (8, 16))
    return obj, lambda: obj(ids, targets=ids)


@pytest.mark.parametrize("kind", ["loss", "model"])
def test_cggr_step_calls_count_optimizer_steps_with_accumulation(kind: str) -> None:
    """With ``.step()`` after each optimizer step and 2 micro-batches per step, the
    count is the number of optimizer steps: the first call undoes the forwards'
    automatic counts, and from then on forwards count nothing."""
    target, warmup = 0.25, 8
    obj, forward = _cggr_pair(kind, min_tokens_ratio=target, warmup_steps=warmup)
    ratios = _accumulate(obj, forward, n_steps=4, micro=2)
    assert obj.selector.step_count == 4
    forward()
    assert obj.get_metrics()["step"] == 4
    # before the first call nothing tells a training loop's micro-batches from its steps:
    # the first step's micro-batches ran at the automatic count (auto_step=False avoids it)
    assert ratios[0] == pytest.approx([_warmup_ratio(0, target, warmup), _warmup_ratio(1, target, warmup)])
    for s in range(1, 4):
        assert ratios[s] == pytest.approx([_warmup_ratio(s, target, warmup)] * 2), s


@pytest.mark.parametrize("kind", ["loss", "model"])
def test_cggr_manual_steps_only_gives_one_ratio_per_optimizer_step(kind: str) -> None:
    """``auto_step=False``: forwards never count, every micro-batch of optimizer
    step s runs at the warmup's ratio for s, from the first step on."""
    target, warmup = 0.25, 4
    obj, forward = _cggr_pair(kind, min_tokens_ratio=target, warmup_steps=warmup, auto_step=False)
    ratios = _accumulate(obj, forward, n_steps=6, micro=2)
    assert obj.selector.step_count == 6
    assert [r for pair in ratios for r in pair] == pytest.approx([_warmup_ratio(s // 2, target, warmup) for s in range(12)])
    assert ratios[1] == pytest.approx([0.8125, 0.8125])


@pytest.mark.parametrize("kind", ["loss", "model"])
def test_cggr_auto_step_counts_each_training_forward(kind: str) -> None:
    """Without ``.step()`` calls each training forward is one step; eval forwards are not."""
    target, warmup = 0.25, 4
    obj, forward = _cggr_pair(kind, min_tokens_ratio=target, warmup_steps=warmup)
    ratios = []
    for _ in range(6):
        forward()
        ratios.append(obj.get_metrics()["token_ratio"])
    assert ratios == pytest.approx([_warmup_ratio(s, target, warmup) for s in range(6)])
    assert obj.selector.step_count == 6
    obj.eval()
    forward()
    assert obj.selector.step_count == 6
    obj.train()
    obj.step()  # switching to counted steps: the automatic counts are undone
    assert obj.selector.step_count == 1


def _tiny_gpt(n_layer=4) -> GPT:
    torch.manual_seed(fresh_seed())
    return GPT(ModelConfig(vocab_size=300, seq_len=32, n_layer=n_layer, n_head=2, d_model=32, init_std=0.1)).double()


def test_gpt_truncated_router_shares_weights_and_equals_first_layers() -> None:
    model = _tiny_gpt()
    router = create_truncated_router(model, num_layers=2)
    ref = GPT(ModelConfig(**{**model.config.__dict__, "n_layer": 2})).double()
    ref.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith(("blocks.2", "blocks.3"))})
    idx = torch.randint(0, 300, (2, 20))
    assert torch.allclose(router(idx), ref(idx)[0], rtol=1e-12)
    assert {p.data_ptr() for p in router.parameters()} <= {p.data_ptr() for p in model.parameters()}
    with pytest.raises(ValueError, match="num_layers"):
        create_truncated_router(model, num_layers=9)


def test_cggr_model_batch_splitting_picks_hardest_sequences() -> None:
    model = _tiny_gpt()
    router = create_truncated_router(model, num_layers=1)
    wrapped = CGGRModel(model, router=router, min_tokens_ratio=0.5, warmup_steps=0, dynamic_threshold=False, scoring="loss")
    ids = torch.randint(0, 300, (6, 16))
    mask = torch.ones_like(ids)
    mask[1, 10:] = 0  # padding must not count as a target
    loss = wrapped(ids, labels=ids, attention_mask=mask)
    # reference: the router's mean per-token loss per sequence, top 3 sequences
    targets = shift_labels(ids.masked_fill(mask == 0, -100))
    with torch.no_grad():
        nll = F.cross_entropy(router(ids).flatten(0, 1), targets.flatten(), reduction="none", ignore_index=-100).view(6, 16)
    valid = targets != -100
    seq = (nll * valid).sum(-1) / valid.sum(-1)
    chosen = seq.topk(3).indices.sort().values
    ref = F.cross_entropy(model(ids[chosen])[0].flatten(0, 1), targets[chosen].flatten(), ignore_index=-100)
    assert torch.allclose(loss, ref, rtol=1e-10)
    assert wrapped.get_metrics()["sequences_selected"] == 3
    loss.backward()
    assert model.blocks[-1].ffn.down.weight.grad is not None


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "qwen3", "gpt2"])
def test_hf_truncated_router_equals_first_layers(family: str) -> None:
    """The router cut at 2 layers gives the logits of a 2-layer model with the same
    weights, and owns no parameter of its own (tiny models of each family as the
    HF Collider tests build them, tests/hf_reference.py)."""
    transformers = pytest.importorskip("transformers")
    seed = fresh_seed()
    if family == "gpt2":
        torch.manual_seed(seed)
        kw = dict(vocab_size=120, n_embd=32, n_head=4, n_positions=64)
        full = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=4, **kw))
        cut = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=2, **kw))
    else:
        from hf_reference import make_model  # the Llama-family tiny configs (grouped-query heads)

        full = make_model(family, seed, dtype=torch.float32, num_hidden_layers=4)
        cut = make_model(family, seed, dtype=torch.float32, num_hidden_layers=2)
    full.eval()
    missing, unexpected = cut.load_state_dict(full.state_dict(), strict=False)
    assert not missing and all(".2." in k or ".3." in k for k in unexpected), (missing, unexpected)
    cut.eval()
    router = create_truncated_router(full, num_layers=2)
    ids = torch.randint(0, 120, (2, 12))
    attn = torch.ones_like(ids)
    attn[1, :3] = 0  # left padding: the backbone's own mask handling
    with torch.no_grad():
        got = router(ids, attention_mask=attn)
        want = cut(ids, attention_mask=attn).logits
    assert torch.allclose(got, want, atol=1e-5), (seed, float((got - want).abs().max()))
    full_ptrs = {p.data_ptr() for p in full.parameters()}
    assert all(p.data_ptr() in full_ptrs for p in router.parameters())
    assert len(router.backbone.layers if family != "gpt2" else router.backbone.h) == 2


def test_cggr_objects_never_step_a_selector_passed_in() -> None:
    """A selector handed to CGGRLoss / CGGRModel is stepped by its owner only (the
    trainer steps it once per optimizer step): forwards leave its count alone."""
    logits, targets = random_batch(B=4, T=16, V=30)
    sel = TokenSelector(score="loss", keep_ratio=0.25, warmup_steps=4)
    crit = CGGRLoss(selector=sel)
    for _ in range(3):
        crit(logits, targets)
    assert sel.step_count == 0 and crit.get_metrics()["token_ratio"] == 1.0
    model = _tiny_gpt(n_layer=1)
    split = CGGRModel(model, selector=sel)
    ids = torch.randint(0, 300, (4, 16))
    for _ in range(3):
        split(ids, targets=ids)
    assert sel.step_count == 0
    sel.step()
    crit(logits, targets)
    assert crit.get_metrics()["token_ratio"] == pytest.approx(0.8125)


def test_kept_index_cache_lives_as_long_as_its_masks() -> None:
    """Kept indices are remembered per mask object (no attribute on the tensor),
    and forgotten when the mask is freed: a training loop does not grow the cache."""
    from sparsetrain.selection.select import _kept_index_cache as cache

    g = torch.Generator().manual_seed(fresh_seed())
    before = len(cache._entries)
    for _ in range(5):
        mask = select_random(torch.ones(3, 7, dtype=torch.bool), ratio=0.5, generator=g)
        ref = torch.nonzero(mask.reshape(-1)).squeeze(1)
        assert torch.equal(cached_kept_indices(mask), ref)
        assert not any("kept" in k for k in mask.__dict__)
        other = mask.clone()  # equal values, another object: not known
        assert cached_kept_indices(other) is None
        assert torch.equal(kept_indices(other), ref) and torch.equal(cached_kept_indices(other), ref)
        del mask, other
    assert len(cache._entries) == before
