"""The excess (Rho-1) score in Hugging Face training: a reference model's loss of
every token written once into a dataset column (``add_reference_losses``,
against a per-example float64 loop), and ``ColliderTrainer`` keeping the
spans whose loss above the reference is highest (against scores recomputed
from the model's weights, the column and a loop over blocks)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("transformers")
pytest.importorskip("accelerate")
pytest.importorskip("datasets")

from sparsetrain.errors import ConfigError  # noqa: E402

from hf_reference import float64_norms, fresh_seed, make_model  # noqa: E402

VOCAB = 120


@pytest.fixture(autouse=True)
def _float64_norms():
    with float64_norms():
        yield


def _naive_losses(model: torch.nn.Module, ids: list[int]) -> torch.Tensor:
    """The model's loss of each token of one example given the ones before it, 0 first (float64, unbatched)."""
    with torch.no_grad():
        logits = model(torch.tensor([ids]), use_cache=False).logits[0].double()
    nll = -torch.log_softmax(logits[:-1], dim=-1).gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
    return torch.cat([torch.zeros(1, dtype=torch.float64), nll])


def test_reference_losses_are_each_tokens_loss_under_the_reference() -> None:
    from datasets import Dataset

    from sparsetrain.hf_trainer import add_reference_losses

    seed = fresh_seed()
    g = torch.Generator().manual_seed(seed)
    rows = [torch.randint(0, VOCAB, (int(n),), generator=g).tolist() for n in torch.randint(2, 20, (7,), generator=g)]
    ref = make_model("llama", seed)
    ref.train()
    out = add_reference_losses(Dataset.from_dict({"input_ids": rows}), ref, batch_size=3)  # ragged batches, padded
    assert ref.training, "the reference's mode is restored"
    assert out.column_names == ["input_ids", "reference_losses"]
    for ids, got in zip(rows, out["reference_losses"]):
        want = _naive_losses(ref.eval(), ids)
        got = torch.tensor(got, dtype=torch.float64)
        assert got.shape == want.shape and got[0] == 0, seed
        # stored as float16: within its rounding (2^-11 relative)
        torch.testing.assert_close(got, want, rtol=2e-3, atol=1e-3, msg=f"seed {seed}")
    # what cannot be computed once, before training, is refused in one line naming it
    with pytest.raises(ValueError, match="needs a datasets.Dataset \\(map-style\\), got IterableDataset"):
        add_reference_losses(Dataset.from_dict({"input_ids": rows}).to_iterable_dataset(), ref)
    with pytest.raises(ValueError, match="has no column 'tokens' \\(it has input_ids\\)"):
        add_reference_losses(Dataset.from_dict({"input_ids": rows}), ref, column="tokens")


def test_a_padded_example_scores_as_the_unpadded_one() -> None:
    """Left and right padding in the dataset's own attention_mask: the unmasked
    tokens get the losses of the example alone, the padding 0."""
    from datasets import Dataset

    from sparsetrain.hf_trainer import add_reference_losses

    seed = fresh_seed()
    g = torch.Generator().manual_seed(seed)
    ref = make_model("llama", seed).eval()
    ids = torch.randint(0, VOCAB, (9,), generator=g).tolist()
    pad = [0, 0, 0]
    rows = {"input_ids": [pad + ids, ids + pad, ids], "attention_mask": [[0] * 3 + [1] * 9, [1] * 9 + [0] * 3, [1] * 9]}
    out = add_reference_losses(Dataset.from_dict(rows), ref, batch_size=3)["reference_losses"]
    want = _naive_losses(ref, ids)
    left, right = torch.tensor(out[0], dtype=torch.float64), torch.tensor(out[1], dtype=torch.float64)
    torch.testing.assert_close(left[3:], want, rtol=2e-3, atol=1e-3, msg=f"seed {seed}")
    torch.testing.assert_close(right[:9], want, rtol=2e-3, atol=1e-3, msg=f"seed {seed}")
    assert not left[:3].any() and not right[9:].any()


def test_a_missing_column_is_named() -> None:
    from datasets import Dataset

    from sparsetrain.hf_trainer import add_reference_losses

    with pytest.raises(ValueError, match="no column 'tokens'"):
        add_reference_losses(Dataset.from_dict({"input_ids": [[1, 2]]}), make_model("llama", 0), column="tokens")


def _block_scores(score: torch.Tensor, valid: torch.Tensor, span: int) -> torch.Tensor:
    """Each position's score replaced by the mean over the valid positions of its block (a loop)."""
    out = torch.full_like(score, float("nan"))
    for b in range(score.shape[0]):
        for start in range(0, score.shape[1], span):
            sl = slice(start, start + span)
            if valid[b, sl].any():
                out[b, sl] = score[b, sl][valid[b, sl]].mean()
    return out


def test_the_trainer_keeps_the_spans_the_model_lags_the_reference_on(tmp_path) -> None:
    from datasets import Dataset
    from transformers import TrainingArguments, default_data_collator

    from sparsetrain.hf_trainer import ColliderArguments, ColliderTrainer, add_reference_losses

    seed = fresh_seed()
    g = torch.Generator().manual_seed(seed)
    T, span = 24, 4
    blocks = torch.randint(0, VOCAB, (8, T), generator=g).tolist()  # packed: every row the same length
    model, reference = make_model("llama", seed), make_model("llama", seed + 1)
    initial = copy.deepcopy(model)
    data = add_reference_losses(Dataset.from_dict({"input_ids": blocks, "labels": blocks}), reference)
    seen: list[tuple[dict, torch.Tensor]] = []

    def record(module, args, kwargs, output):
        if torch.is_grad_enabled():
            seen.append(({k: kwargs[k].clone() for k in ("input_ids", "labels", "reference_losses")},
                         trainer.collider_selector.last_mask.clone()))

    model.register_forward_hook(record, with_kwargs=True)
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4, report_to=[],
                             use_cpu=True, save_strategy="no", learning_rate=1e-3, logging_steps=1,
                             dataloader_num_workers=0, seed=seed % 1000)
    trainer = ColliderTrainer(model=model, args=args, train_dataset=data, eval_dataset=data,
                              data_collator=default_data_collator,
                              collider=ColliderArguments(drop_ratio=0.5, score="excess", span=span))
    trainer.train()
    assert "eval_loss" in trainer.evaluate()  # evaluation runs with the column in the batches
    assert len(seen) == 2
    batch, keep = seen[0]  # the first forward: the initial weights scored it
    ids, ref = batch["input_ids"], batch["reference_losses"].double()
    assert ref.shape == ids.shape, "the column reaches the forward (not dropped as an unused column)"
    with torch.no_grad():
        logits = initial(ids, use_cache=False).logits.double()
    targets = ids[:, 1:]
    nll = F.cross_entropy(logits[:, :-1].flatten(0, 1), targets.flatten(), reduction="none").view(targets.shape)
    score = torch.cat([nll - ref[:, 1:], torch.zeros(ids.shape[0], 1, dtype=torch.float64)], dim=1)
    valid = torch.ones_like(ids, dtype=torch.bool)
    valid[:, -1] = False  # the last position predicts nothing
    blocked = _block_scores(score, valid, span)
    assert not keep[~valid].any()
    assert int(keep.sum()) == (int(valid.sum()) + 1) // 2
    kept, dropped = blocked[keep], blocked[valid & ~keep]
    # every kept token's span scores at least every dropped one's (ties split a span only at the boundary)
    assert kept.min() >= dropped.max() - 1e-4, (seed, float(kept.min()), float(dropped.max()))
    # and the reference matters: the model's loss alone would have ranked the spans otherwise
    alone = _block_scores(torch.cat([nll, torch.zeros(ids.shape[0], 1, dtype=torch.float64)], 1), valid, span)
    assert not (alone[keep].min() >= alone[valid & ~keep].max() - 1e-4), seed


@pytest.mark.parametrize("score", ["excess", "reference"])
def test_reference_scores_without_the_column_and_a_bad_span_are_refused(tmp_path, score: str) -> None:
    from datasets import Dataset
    from transformers import TrainingArguments, default_data_collator

    from sparsetrain.hf_trainer import ColliderArguments, ColliderTrainer

    with pytest.raises(ConfigError, match="span must be >= 1, got 0"):
        ColliderArguments(span=0)
    rows = torch.randint(0, VOCAB, (4, 12)).tolist()
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=2, report_to=[],
                             use_cpu=True, save_strategy="no", dataloader_num_workers=0)
    plain = Dataset.from_dict({"input_ids": rows, "labels": rows})
    with pytest.raises(ConfigError, match="reads a 'reference_losses' column, which the training dataset lacks "
                                          r"\(it has input_ids, labels\)"):
        ColliderTrainer(model=make_model("llama", 0), args=args, train_dataset=plain,
                        data_collator=default_data_collator, collider=ColliderArguments(score=score))
    # a dataset whose columns the Trainer cannot see ahead (a torch Dataset): refused at the first batch
    trainer = ColliderTrainer(model=make_model("llama", 0), args=args,
                              train_dataset=[{"input_ids": torch.tensor(r), "labels": torch.tensor(r)} for r in rows],
                              data_collator=default_data_collator, collider=ColliderArguments(score=score))
    with pytest.raises(ValueError, match=f"collider score '{score}' needs reference_losses"):
        trainer.train()


def test_reference_losses_follow_the_labels_shift() -> None:
    from sparsetrain.collider.hf import collider_reference_losses
    from sparsetrain.selection import TokenSelector

    sel = TokenSelector(score="excess", keep_ratio=0.5)
    ref = torch.rand(2, 6, dtype=torch.float64)
    targets = torch.zeros(2, 6, dtype=torch.long)
    shifted = collider_reference_losses(ref, targets, sel)
    assert torch.equal(shifted[:, :-1], ref[:, 1:].float()) and not shifted[:, -1].any()
    assert torch.equal(collider_reference_losses(ref, targets, sel, shifted=True), ref.float())
    assert collider_reference_losses(ref, targets, TokenSelector(score="loss", keep_ratio=0.5)) is None
    with pytest.raises(ValueError, match=r"shape \(2, 5\), the labels \(2, 6\)"):
        collider_reference_losses(ref[:, :5], targets, sel)


def _naive_filter(losses: list[list[float]], masks: list[list[int]], drop: float) -> list[int]:
    """The kept example indices, written from the definition: each example's mean loss over the positions
    whose token and previous token are unmasked, its unmasked tokens counted; the highest mean (then the
    lowest index) left out first until at least ``drop`` of all tokens are."""
    means, counts = [], []
    for row, m in zip(losses, masks):
        scored = [row[t] for t in range(1, len(row)) if m[t] and m[t - 1]]
        means.append(sum(scored) / len(scored) if scored else 0.0)
        counts.append(sum(m))
    gone, out = 0, set()
    for i in sorted(range(len(losses)), key=lambda i: (-means[i], i)):
        if gone >= drop * sum(counts):
            break
        out.add(i)
        gone += counts[i]
    return [i for i in range(len(losses)) if i not in out]


@pytest.mark.parametrize("with_mask", [False, True])
def test_filter_by_reference_losses_leaves_out_the_highest_mean_examples(with_mask: bool) -> None:
    from datasets import Dataset

    from sparsetrain.hf_trainer import filter_by_reference_losses

    seed = fresh_seed()
    g = torch.Generator().manual_seed(seed)
    n = 40
    lengths = torch.randint(2, 30, (n,), generator=g).tolist()
    losses = [(torch.rand(k, generator=g, dtype=torch.float64) * 8).half().double().tolist() for k in lengths]
    masks = []
    for k in lengths:  # left padding on some rows, so the mask matters
        pad = int(torch.randint(0, k // 2 + 1, (1,), generator=g)) if with_mask else 0
        masks.append([0] * pad + [1] * (k - pad))
    data = {"input_ids": [[i] * k for i, k in enumerate(lengths)], "reference_losses": losses}
    if with_mask:
        data["attention_mask"] = masks
    drop = float(torch.rand(1, generator=g)) * 0.8 + 0.1
    out = filter_by_reference_losses(Dataset.from_dict(data), drop)
    want = _naive_filter(losses, masks, drop)
    assert [row[0] for row in out["input_ids"]] == want, f"seed {seed}, drop {drop}"
    assert out.column_names == list(data)


def test_filter_by_reference_losses_drops_the_planted_noise() -> None:
    """Rows of high reference loss (noise) among low ones: leaving out their share of the tokens leaves
    out exactly them."""
    from datasets import Dataset

    from sparsetrain.hf_trainer import filter_by_reference_losses

    seed = fresh_seed()
    g = torch.Generator().manual_seed(seed)
    noisy = torch.rand(30, generator=g) < 0.3
    noisy[0] = True
    losses = [((torch.rand(16, generator=g) + (6.0 if z else 1.0))).tolist() for z in noisy.tolist()]
    ds = Dataset.from_dict({"input_ids": [[i] * 16 for i in range(30)], "reference_losses": losses})
    out = filter_by_reference_losses(ds, float(noisy.float().mean()) - 1e-6)
    assert [r[0] for r in out["input_ids"]] == torch.nonzero(~noisy).flatten().tolist(), seed


def test_filter_by_reference_losses_refusals() -> None:
    from datasets import Dataset

    from sparsetrain.hf_trainer import filter_by_reference_losses

    ds = Dataset.from_dict({"input_ids": [[1, 2, 3]], "reference_losses": [[0.0, 1.0, 2.0]]})
    for bad in (0.0, 1.0, -0.2):
        with pytest.raises(ValueError, match=f"drop must be in \\(0, 1\\), got {bad}"):
            filter_by_reference_losses(ds, bad)
    with pytest.raises(ValueError, match="no 'reference_losses' column"):
        filter_by_reference_losses(Dataset.from_dict({"input_ids": [[1, 2, 3]]}), 0.5)
    with pytest.raises(ValueError, match="needs a datasets.Dataset \\(map-style\\), got IterableDataset"):
        filter_by_reference_losses(ds.to_iterable_dataset(), 0.5)
    with pytest.raises(ValueError, match="got list"):
        filter_by_reference_losses([{"input_ids": [1], "reference_losses": [0.0]}], 0.5)
