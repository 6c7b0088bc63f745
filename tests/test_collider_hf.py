"""The generic path of sparsetrain.collider.apply (``engine=False``: the
attention and linear swaps) on Hugging Face Llama / Qwen2: gradients equal a
float64 reference that detaches dropped positions' keys and values up front.
The engine path has its own tests (test_collider_hf_engine.py)."""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch

from sparsetrain.collider import apply, filter as collider_filter, masked_cross_entropy, remove

transformers = pytest.importorskip("transformers")

_REFERENCE_KEEP: list[torch.Tensor] = []


def _detached_kv_attention(module, query, key, value, attention_mask, **kwargs):
    """Reference: the mask is known before the forward; dropped K/V detached in it."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    kv_keep = _REFERENCE_KEEP[-1][:, None, :, None]
    key = torch.where(kv_keep, key, key.detach())
    value = torch.where(kv_keep, value, value.detach())
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def _model(family: str) -> torch.nn.Module:
    common = dict(vocab_size=120, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64, attn_implementation="sdpa")
    torch.manual_seed(int(torch.randint(0, 2**31 - 1, ())))
    if family == "llama":
        m = transformers.LlamaForCausalLM(transformers.LlamaConfig(**common))
    else:
        m = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**common))  # q/k/v biases
    return m.double().train()


def _grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    out = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out


@pytest.mark.parametrize("family, with_filter", [("llama", True), ("qwen2", True), ("llama", False)])
def test_apply_matches_detached_kv_reference(family: str, with_filter: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """The loss carries the keep mask to every layer's backward; filter, given
    the same mask, changes nothing. The LM head takes the loss's [K, V] rows and
    never gathers the stride-0 zero the loss gave autograd."""
    from sparsetrain.collider.keep import KeptRows

    gathered = []
    rows = KeptRows.rows
    monkeypatch.setattr(KeptRows, "rows", lambda self, t: (gathered.append(t.stride()), rows(self, t))[1])
    ref = _model(family)
    model = apply(copy.deepcopy(ref), engine=False)
    transformers.AttentionInterface.register("test_detached_kv", _detached_kv_attention)
    ref.set_attn_implementation("test_detached_kv")
    B, T = 3, 16
    ids = torch.randint(0, 120, (B, T))
    targets = torch.randint(0, 120, (B, T))
    keep = torch.rand(B, T) < torch.rand(B, 1).clamp(0.2, 0.9)  # uneven per sequence
    keep[:, 0] = True
    targets[0, 3] = -100  # an ignored target is never learned from

    _REFERENCE_KEEP.append(keep)
    try:
        masked_cross_entropy(ref(ids, use_cache=False).logits, targets, keep).backward()
    finally:
        _REFERENCE_KEEP.pop()
    want = _grads(ref)
    logits = model(ids, use_cache=False).logits
    seen = []
    logits.register_hook(lambda grad: seen.append(grad.stride()))
    with collider_filter(keep) if with_filter else contextlib.nullcontext():
        masked_cross_entropy(logits, targets, keep).backward()
    assert seen == [(0, 0, 0)]  # the LM head took the compact [K, V] rows: no full logits gradient
    assert not [st for st in gathered if set(st) == {0}]
    got = _grads(model)
    assert set(got) == set(want)
    for n in want:
        assert torch.allclose(got[n], want[n], rtol=1e-6, atol=1e-12), n
    # the embedding rows of tokens seen only at dropped positions get no gradient
    only_dropped = set(ids[~keep].tolist()) - set(ids[keep].tolist())
    emb = got["model.embed_tokens.weight"]
    assert all(emb[t].abs().max() == 0 for t in only_dropped)


def test_apply_outside_filter_is_dense_and_keeps_the_state_dict() -> None:
    ref = _model("llama")
    model = apply(copy.deepcopy(ref), engine=False)
    assert model.state_dict().keys() == ref.state_dict().keys()
    ids = torch.randint(0, 120, (2, 12))
    for m in (ref, model):  # a plain loss on the logits (not the kept-rows loss): the ordinary dense backward
        logits = m(ids, use_cache=False).logits
        torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten()).backward()
    want, got = _grads(ref), _grads(model)
    for n in want:
        assert torch.allclose(got[n], want[n], rtol=1e-9, atol=1e-12), n


def test_filter_that_disagrees_with_the_loss_mask_raises() -> None:
    model = apply(_model("llama"), engine=False)
    ids = torch.randint(0, 120, (2, 12))
    keep = torch.rand(2, 12) < 0.5
    keep[:, 0] = True
    loss = masked_cross_entropy(model(ids, use_cache=False).logits, ids, keep)
    with pytest.raises(ValueError, match="collider.filter"):
        with collider_filter(~keep):
            loss.backward()


def test_two_forwards_keep_their_own_masks() -> None:
    """The mask belongs to each forward (no process-wide state): two forwards
    whose losses are backpropagated together each keep their own tokens."""
    ref = _model("llama")
    model = apply(copy.deepcopy(ref), engine=False)
    transformers.AttentionInterface.register("test_detached_kv", _detached_kv_attention)
    ref.set_attn_implementation("test_detached_kv")
    batches = [(torch.randint(0, 120, (2, 10)), torch.randint(0, 120, (2, 10)), torch.rand(2, 10) < p)
               for p in (0.3, 0.7)]
    for _, _, keep in batches:
        keep[:, 0] = True
    total = 0
    for ids, targets, keep in batches:
        total = total + masked_cross_entropy(model(ids, use_cache=False).logits, targets, keep)
    total.backward()
    got = _grads(model)
    for ids, targets, keep in batches:
        _REFERENCE_KEEP.append(keep)
        try:
            masked_cross_entropy(ref(ids, use_cache=False).logits, targets, keep).backward()
        finally:
            _REFERENCE_KEEP.pop()
    want = _grads(ref)
    for n in want:
        assert torch.allclose(got[n], want[n], rtol=1e-6, atol=1e-12), n


def test_remove_restores_the_model() -> None:
    """remove(apply(m)) trains as m: the model's own attention and linear layers,
    dense gradients of a masked loss (dropped keys and values not detached)."""
    ref = _model("qwen2")
    attn = ref.config._attn_implementation
    model = remove(apply(copy.deepcopy(ref), engine=False))
    assert model.config._attn_implementation == attn
    assert not any("forward" in m.__dict__ for m in model.modules())
    assert not model._forward_pre_hooks and not model._forward_hooks
    ids = torch.randint(0, 120, (2, 12))
    keep = torch.rand(2, 12) < 0.5
    keep[:, 0] = True
    for m in (ref, model):
        masked_cross_entropy(m(ids, use_cache=False).logits, ids, keep).backward()
    want, got = _grads(ref), _grads(model)
    for n in want:
        assert torch.allclose(got[n], want[n], rtol=1e-9, atol=1e-12), n
    with pytest.raises(ValueError, match="not made a Collider trainee"):
        remove(model)


def test_generic_path_on_gpt2_trains_and_evaluates() -> None:
    """GPT-2's forward takes the cache second (``input_ids, cache, attention_mask``):
    the applied forward hands the mask and positions on by name. The training
    forward's gradient equals the plain-torch mean cross-entropy over the
    selector's kept tokens on the unapplied model's logits (dropped keys and
    values detached); evaluation and generation are the model's own."""
    import torch.nn.functional as F

    from hf_reference import reference_backward
    from sparsetrain.selection import TokenSelector

    torch.manual_seed(int(torch.randint(0, 2**31 - 1, ())))
    cfg = transformers.GPT2Config(vocab_size=120, n_embd=32, n_layer=2, n_head=4, n_positions=64, resid_pdrop=0.0,
                                  embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
                                  attn_implementation="sdpa")
    ref = transformers.GPT2LMHeadModel(cfg).double().train()
    plain = copy.deepcopy(ref)
    selector = TokenSelector(keep_ratio=0.5)
    model = apply(copy.deepcopy(ref), selector=selector, engine=False)
    B, T = 3, 14
    ids = torch.randint(0, 120, (B, T))
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, 9:] = 0  # right padding: never a target
    labels = ids.masked_fill(mask == 0, -100)

    out = model(input_ids=ids, attention_mask=mask, labels=labels)
    out.loss.backward()
    keep = selector.last_mask
    got = _grads(model)
    targets = torch.full_like(ids, -100)
    targets[:, :-1] = labels[:, 1:]
    targets[mask == 0] = -100
    rows = keep & (targets != -100)
    assert 0 < int(rows.sum()) < int((targets != -100).sum())
    reference_backward(ref, lambda logits: F.cross_entropy(logits[rows], targets[rows]), keep, ids)
    want = _grads(ref)
    assert set(got) == set(want)
    for n in want:
        assert torch.allclose(got[n], want[n], rtol=1e-6, atol=1e-12), n

    with torch.no_grad():  # evaluation: the model's own forward and loss (padded positions' logits are nobody's)
        mine, own = model(input_ids=ids, attention_mask=mask, labels=labels), plain(input_ids=ids, attention_mask=mask,
                                                                                     labels=labels)
    real = mask == 1
    assert torch.allclose(mine.logits[real], own.logits[real], rtol=1e-9, atol=1e-12)
    assert torch.allclose(mine.loss, own.loss, rtol=1e-9, atol=1e-12)
    model.eval()
    plain.eval()
    prompt = ids[:1, :5]
    assert torch.equal(model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=4,
                                      do_sample=False, pad_token_id=0),
                       plain.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=4,
                                      do_sample=False, pad_token_id=0))


def test_apply_refuses_what_is_not_a_causal_lm_before_any_notice() -> None:
    """A plain module (no config) or an encoder without an LM head is refused in one
    line naming its class, before the generic path's notice and before anything changes."""
    import warnings

    from sparsetrain.collider.hf_linear import UnsupportedLayer

    encoder = transformers.BertModel(transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1,
                                                             num_attention_heads=2, intermediate_size=64))
    for module, needle in ((torch.nn.Linear(3, 3), "takes a transformers causal LM (*ForCausalLM, or PEFT's wrapper "
                                                   "of one), got Linear"),
                           (encoder, "takes a causal LM with its LM head; BertModel is not one")):
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            with pytest.raises(UnsupportedLayer) as e:
                apply(module)
        assert needle in str(e.value) and "\n" not in str(e.value)
        assert not [w for w in seen if "generic path" in str(w.message)]
        assert "forward" not in module.__dict__  # untouched
