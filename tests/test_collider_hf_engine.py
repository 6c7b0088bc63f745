"""Hugging Face Llama-family models through the Collider engine
(``collider.apply``): every parameter's gradient against a float64 reference
that detaches dropped positions' keys and values in every layer and takes the
mean loss over kept tokens (tests/hf_reference.py)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("transformers")

from sparsetrain.collider import ColliderGenericPathWarning, apply, masked_cross_entropy, remove  # noqa: E402
from sparsetrain.collider.hf import uses_engine  # noqa: E402
from sparsetrain.selection import TokenSelector, budget, shift_labels  # noqa: E402

from conftest import requires_cuda  # noqa: E402
from hf_reference import (FAMILIES, assert_grads_close, float64_norms, fresh_seed, grads, make_model,  # noqa: E402
                          random_batch, reference_backward, transformers)


@pytest.fixture(autouse=True)
def _float64_norms():
    with float64_norms():
        yield


LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 16}
CONFIGS = {
    "llama": dict(),
    "llama-biases-tied-llama3rope-pad": dict(attention_bias=True, mlp_bias=True, tie_word_embeddings=True,
                                              rope_parameters=LLAMA3_ROPE, pad_token_id=3),
    "llama-mha": dict(num_key_value_heads=4),
    "mistral": dict(sliding_window=32),
    "qwen2": dict(),  # q/k/v biases
    "qwen3": dict(tie_word_embeddings=True),  # per-head q/k norms
}


def _family(name: str) -> str:
    return name.split("-")[0]


class FixedDropout(torch.nn.Module):
    """Dropout with a given keep mask: the reference applies the masks the adapter drew."""

    def __init__(self, mask: torch.Tensor, p: float) -> None:
        super().__init__()
        self.mask, self.p = mask, p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.mask / (1 - self.p)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_engine_gradients_match_detached_kv_reference(name: str) -> None:
    """Every parameter, GQA or not, biases, q/k norms, tied embeddings, llama3
    rope scaling, a padding index; the logits are HF's; the LM head takes the
    loss's compact rows (the logits' gradient is a stride-0 zero); tokens seen
    only at dropped positions get no embedding gradient."""
    seed = fresh_seed()
    ref = make_model(_family(name), seed, **CONFIGS[name])
    model = apply(copy.deepcopy(ref))
    assert uses_engine(model)
    g = torch.Generator().manual_seed(seed)
    ids, targets, keep = random_batch(3, 20, 120, g)
    reference_backward(ref, lambda logits: masked_cross_entropy(logits, targets, keep), keep, ids)
    want = grads(ref)
    logits = model(ids, use_cache=False).logits
    with torch.no_grad():
        plain = remove(copy.deepcopy(model))(ids, use_cache=False).logits
    assert torch.allclose(logits, plain, rtol=1e-12, atol=1e-12), seed
    seen = []
    logits.register_hook(lambda grad: seen.append(grad.stride()))
    masked_cross_entropy(logits, targets, keep).backward()
    assert seen == [(0, 0, 0)], seed
    got = grads(model)
    assert_grads_close(got, want)
    if not ref.config.tie_word_embeddings:  # (tied, every row is also the LM head's)
        only_dropped = set(ids[~keep].tolist()) - set(ids[keep].tolist())
        emb = got["model.embed_tokens.weight"]
        assert all(emb[t].abs().max() == 0 for t in only_dropped), seed


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_engine_with_kept_query_kernel_and_grouped_heads(family: str) -> None:
    """The Triton kept-query kernel (interpreter on CPU) with 2 query heads per
    key/value head, in float32: as close to the float64 reference as the
    float32 reference itself is."""
    from sparsetrain.collider import triton_attention

    if not triton_attention.available():
        pytest.skip("triton not installed")
    seed = fresh_seed()
    ref = make_model(family, seed, hidden_size=64, head_dim=16)  # head_dim 16: a kernel-legal shape
    g = torch.Generator().manual_seed(seed)
    ids, targets, keep = random_batch(2, 40, 120, g)
    m32 = copy.deepcopy(ref).float()
    model = apply(copy.deepcopy(m32), attention="kept")
    for m in (ref, m32):
        reference_backward(m, lambda logits: masked_cross_entropy(logits, targets, keep), keep, ids)
    want, plain = grads(ref), grads(m32)
    masked_cross_entropy(model(ids, use_cache=False).logits, targets, keep).backward()
    got = grads(model)
    assert set(got) == set(want)
    for n in want:
        err = float((got[n] - want[n]).norm() / want[n].norm())
        assert err <= 3 * float((plain[n] - want[n]).norm() / want[n].norm()) + 1e-6, (n, err, seed)


@pytest.mark.parametrize("H, Hkv, T", [(4, 2, 40), (6, 2, 33), (3, 1, 24), (15, 5, 20)])
def test_kept_attention_kernel_grouped_heads_matches_dense(H: int, Hkv: int, T: int) -> None:
    """Grouped-query heads straight into the kernel: dq per query head, dk and dv
    summed over the query heads sharing each key/value head (HF's repeat_kv),
    written as [K, H + 2 Hkv, hd] rows; non-power-of-two head counts."""
    tri = pytest.importorskip("sparsetrain.collider.triton_attention")
    if not tri.available():
        pytest.skip("triton not installed")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    B, hd, G = 2, 16, H // Hkv
    g = torch.Generator().manual_seed(fresh_seed())
    q = torch.randn(B, T, H, hd, generator=g).transpose(1, 2)
    k, v = (torch.randn(B, T, Hkv, hd, generator=g).transpose(1, 2) for _ in range(2))
    keep = torch.rand(B, T, generator=g) < 0.5
    keep[:, 0] = True
    kidx = torch.nonzero(keep.reshape(-1)).squeeze(1)
    kb, kt = kidx // T, kidx % T
    d_out = torch.zeros(B, H, T, hd)
    d_out[kb, :, kt] = torch.randn(kidx.numel(), H, hd, generator=g)
    qd, kd, vd = (t.double().requires_grad_(True) for t in (q, k, v))
    out = F.scaled_dot_product_attention(qd, kd.repeat_interleave(G, 1), vd.repeat_interleave(G, 1), is_causal=True)
    dq, dk, dv = torch.autograd.grad(out, (qd, kd, vd), d_out.double())
    pick = lambda t: t[kb, :, kt]  # noqa: E731
    out32 = out.detach().float().transpose(1, 2).contiguous().transpose(1, 2)
    buf = torch.empty(kidx.numel(), H + 2 * Hkv, hd, device=device)
    got = tri.kept_attention_backward(q.to(device), k.to(device), v.to(device), out32.to(device),
                                      pick(d_out).to(device), kidx.to(device), None, config=(16, 16, 4, 1), grads=buf)
    for name, a, ref in zip(("dq", "dk", "dv"), got, (pick(dq), pick(dk), pick(dv))):
        assert a.data_ptr() >= buf.data_ptr() and a.shape[1] == ref.shape[1]
        err = (a.double().cpu() - ref).norm() / ref.norm()
        assert err < 1e-5, (name, float(err))
    with pytest.raises(ValueError, match="grads must be"):
        tri.kept_attention_backward(q, k, v, out32, pick(d_out), kidx, None, grads=torch.empty(kidx.numel(), 3, H, hd))


@pytest.mark.parametrize("family", FAMILIES)
def test_keep_all_is_dense_training(family: str) -> None:
    """``model(ids, labels=...)`` without a selector keeps every token: the loss
    and every gradient are dense training's (HF's model, nothing detached, its
    loss written out in float64: HF's own computes in float32), with and
    without the Trainer's ``num_items_in_batch``."""
    seed = fresh_seed()
    ref = make_model(family, seed)
    model = apply(copy.deepcopy(ref))
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 120, (2, 16), generator=g)
    labels = torch.randint(0, 120, (2, 16), generator=g)
    labels[1, 5:9] = -100
    for items in (None, 40):
        kw = {} if items is None else {"num_items_in_batch": torch.tensor(items)}
        targets = shift_labels(labels).flatten()
        want_loss = F.cross_entropy(ref(ids).logits.flatten(0, 1), targets, reduction="sum")
        want_loss = want_loss / (items if items is not None else int((targets != -100).sum()))
        want_loss.backward()
        got_loss = model(ids, labels=labels, use_cache=False, **kw).loss
        got_loss.backward()
        assert torch.allclose(got_loss, want_loss, rtol=1e-12), seed
        assert_grads_close(grads(model), grads(ref), rtol=1e-9)


def test_selector_in_the_forward_and_global_kept_normalisation() -> None:
    """Labels with a selector: the forward picks the kept tokens from its own
    logits; micro-batches each normalised by the kept count of all of them
    accumulate to the reference loss over every kept token of the window, whether
    the forward counts the targets or is handed the count."""
    seed = fresh_seed()
    ref = make_model("llama", seed)
    model = apply(copy.deepcopy(ref), selector=TokenSelector(score="collider", method="topk", keep_ratio=0.5))
    g = torch.Generator().manual_seed(seed)
    batches = [(torch.randint(0, 120, (2, 12), generator=g), torch.randint(0, 120, (2, 12), generator=g))
               for _ in range(2)]
    batches[1][1][0, 2:6] = -100
    n_valid = [int((shift_labels(lab) != -100).sum()) for _, lab in batches]
    total = sum(budget(n, 0.5) for n in n_valid)
    from sparsetrain.errors import ConfigError

    with pytest.raises(ConfigError, match="num_items_in_batch with a Collider selector must count the kept tokens"):
        model(*batches[0][:1], labels=batches[0][1], use_cache=False, num_items_in_batch=torch.tensor(sum(n_valid)))
    state_masks = []
    for i, (ids, labels) in enumerate(batches):
        # the second micro-batch's count handed in (as a trainer that counted on the host does), the first's counted
        given = {"collider_n_valid": n_valid[i]} if i == 1 else {}
        model(ids, labels=labels, use_cache=False, num_items_in_batch=torch.tensor(total), collider_counts_kept=True,
              **given).loss.backward()  # the count handed in is the kept one
        from sparsetrain.collider.hf import applied_state

        stats = applied_state(model).last_stats
        assert stats.kept == budget(stats.total, 0.5)
        state_masks.append(model.__dict__["_sparsetrain_collider"].selector.last_mask.clone())
    got = grads(model)
    for (ids, labels), keep in zip(batches, state_masks):
        targets = shift_labels(labels)
        reference_backward(ref, lambda logits: masked_cross_entropy(logits, targets, keep)
                           * (int(keep.sum()) / total), keep, ids)
    assert_grads_close(got, grads(ref))


def test_a_target_count_larger_than_the_batch_is_refused() -> None:
    model = apply(make_model("llama", fresh_seed()), selector=TokenSelector(score="collider", method="topk", keep_ratio=0.5))
    ids = torch.randint(0, 120, (2, 12))
    with pytest.raises(ValueError, match="collider_n_valid = 25: a batch of 24 positions"):
        model(ids, labels=ids, use_cache=False, collider_n_valid=25)


def test_lora_adapters_get_kept_row_gradients_and_the_base_none() -> None:
    """PEFT LoRA on every projection (two adapters on q/v, one active): frozen
    base weights get no gradient, the active LoRA factors the reference's."""
    peft = pytest.importorskip("peft")
    seed = fresh_seed()
    base = make_model("qwen2", seed)
    cfg = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                          target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    ref = peft.get_peft_model(base, cfg)
    ref.add_adapter("other", peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in ref.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype))
    model = apply(copy.deepcopy(ref))
    assert uses_engine(model)
    ids, targets, keep = random_batch(2, 16, 120, g)
    reference_backward(ref.get_base_model(), lambda logits: masked_cross_entropy(logits, targets, keep), keep, ids)
    want = grads(ref)
    masked_cross_entropy(model(input_ids=ids, use_cache=False).logits, targets, keep).backward()
    got = grads(model)
    assert all("lora_" in n and ".default." in n for n in got), sorted(got)
    assert_grads_close(got, want)


def test_lora_dropout_masks_are_the_forwards_in_the_backward(monkeypatch: pytest.MonkeyPatch) -> None:
    """LoRA dropout: the mask drawn from a seed in the forward is drawn again in
    the backward; gradients equal a reference whose dropout applies those masks."""
    peft = pytest.importorskip("peft")
    from sparsetrain.collider import hf_linear

    seed, p = fresh_seed(), 0.3
    base = make_model("llama", seed, num_hidden_layers=1)
    targets_ = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    ref = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=p, target_modules=targets_))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, q in ref.named_parameters():
            if "lora_B" in n:
                q.copy_(torch.randn(q.shape, generator=g, dtype=q.dtype))
    model = apply(copy.deepcopy(ref))
    seeds = iter(range(seed, seed + 100))
    monkeypatch.setattr("sparsetrain.collider.hf_block.new_seed", lambda: next(seeds))
    ids, targets, keep = random_batch(2, 12, 120, g)
    masked_cross_entropy(model(ids, use_cache=False).logits, targets, keep).backward()
    got = grads(model)

    layer = ref.get_base_model().model.layers[0]
    modules = {"q": layer.self_attn.q_proj, "k": layer.self_attn.k_proj, "v": layer.self_attn.v_proj,
               "o": layer.self_attn.o_proj, "gate": layer.mlp.gate_proj, "up": layer.mlp.up_proj,
               "down": layer.mlp.down_proj}
    for i, (name, m) in enumerate(modules.items()):  # the adapter draws seeds in this order
        width = m.get_base_layer().in_features
        m.lora_dropout["default"] = FixedDropout(hf_linear.keep_mask((2, 12, width), p, seed + i, ids.device), p)
    reference_backward(ref.get_base_model(), lambda logits: masked_cross_entropy(logits, targets, keep), keep, ids)
    assert_grads_close(got, grads(ref))


@pytest.mark.parametrize("lora", [False, True])
def test_gradient_checkpointing_recomputes_in_the_adapter(lora: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """``gradient_checkpointing_enable()``: each layer keeps only its input and
    runs its forward again in the backward (the LoRA dropout masks drawn again
    from the forward's seeds); the gradients are the float64 reference's, and
    those of the run without checkpointing."""
    from sparsetrain.collider import hf_block, hf_linear

    seed, p = fresh_seed(), 0.2
    ref = make_model("qwen3", seed)
    if lora:
        peft = pytest.importorskip("peft")
        ref = peft.get_peft_model(ref, peft.LoraConfig(r=4, lora_dropout=p, target_modules=["q_proj", "down_proj"]))
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():  # LoRA B away from zero: the A factors get a gradient
            for n, q in ref.named_parameters():
                if "lora_B" in n:
                    q.copy_(torch.randn(q.shape, generator=g, dtype=q.dtype))
    g = torch.Generator().manual_seed(seed + 1)
    ids, targets, keep = random_batch(2, 16, 120, g)
    results, calls = [], []
    forward = hf_block.HFDecoderLayerAdapter._forward
    monkeypatch.setattr(hf_block.HFDecoderLayerAdapter, "_forward",
                        lambda self, *a: (calls.append(1), forward(self, *a))[1])
    for ckpt in (False, True):
        model = copy.deepcopy(ref)
        if ckpt:
            model.gradient_checkpointing_enable()
        apply(model)
        calls.clear()
        seeds = iter(range(seed, seed + 100))  # the same dropout seeds in both runs, known to the reference
        monkeypatch.setattr(hf_block, "new_seed", lambda: next(seeds))
        masked_cross_entropy(model(ids, use_cache=False).logits, targets, keep).backward()
        assert len(calls) == (4 if ckpt else 2)
        results.append(grads(model))
    base = ref.get_base_model() if lora else ref
    if lora:  # the reference's dropout applies the masks the adapter drew, in its order (layer, projection)
        i = 0
        for layer in base.model.layers:
            for m in (layer.self_attn.q_proj, layer.mlp.down_proj):
                width = m.get_base_layer().in_features
                m.lora_dropout["default"] = FixedDropout(hf_linear.keep_mask((2, 16, width), p, seed + i, ids.device), p)
                i += 1
    reference_backward(base, lambda logits: masked_cross_entropy(logits, targets, keep), keep, ids)
    want = grads(ref)
    assert_grads_close(results[1], want)  # checkpointed: the float64 reference's gradients
    assert_grads_close(results[0], want)
    assert_grads_close(results[1], results[0], rtol=1e-12)


def test_no_full_vocabulary_tensor_in_the_loss_or_backward() -> None:
    """From the kept-rows loss to the embedding, no tensor as large as the
    logits ([N, V]) is allocated (the dense HF step allocates several): the
    loss reads kept rows, the LM head takes [K, V] rows."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Largest(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.bytes = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            inputs = {t.untyped_storage().data_ptr() for t in torch.utils._pytree.tree_leaves((args, kwargs))
                      if isinstance(t, torch.Tensor)}
            for t in torch.utils._pytree.tree_leaves(out):  # new memory only (a view's is its base's)
                if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs:
                    self.bytes = max(self.bytes, t.untyped_storage().nbytes())
            return out

    seed = fresh_seed()
    V = 1000
    ref = make_model("llama", seed, vocab_size=V, tie_word_embeddings=True)
    model = apply(copy.deepcopy(ref))
    g = torch.Generator().manual_seed(seed)
    ids, targets, keep = random_batch(4, 16, V, g)
    full = ids.numel() * V * 8  # float64 logits
    for m, collider in ((model, True), (ref, False)):
        logits = m(ids, use_cache=False).logits
        with Largest() as watch:
            loss = masked_cross_entropy(logits, targets, keep) if collider else F.cross_entropy(
                logits.flatten(0, 1)[keep.flatten()], targets.flatten()[keep.flatten()].clamp(min=0))
            loss.backward()
        if collider:
            assert watch.bytes < full, (watch.bytes, full)
        else:  # the check can fail: a plain loss on the same logits does allocate one
            assert watch.bytes >= full


def test_unsupported_batches_are_refused_in_one_line() -> None:
    seed = fresh_seed()
    model = apply(make_model("mistral", seed, sliding_window=8))
    ids = torch.randint(0, 120, (2, 12))
    with pytest.raises(ValueError, match="sliding window 8"):
        model(ids)
    model = apply(make_model("llama", seed))
    left = torch.ones(2, 12, dtype=torch.long)
    left[0, :3] = 0
    with pytest.raises(ValueError, match="right padding only"):
        model(ids, attention_mask=left)
    with pytest.raises(ValueError, match="positions 0 .. T-1"):
        model(ids, position_ids=torch.arange(12).flip(0)[None].expand(2, 12))
    with pytest.raises(ValueError, match="output_hidden_states=True"):
        model(ids, output_hidden_states=True)
    right = torch.ones(2, 12, dtype=torch.long)
    right[1, 8:] = 0
    model(ids, attention_mask=right, position_ids=torch.arange(12)[None], use_cache=True)  # accepted


def test_right_padding_gives_hfs_gradients_with_pads_never_targets() -> None:
    """Right-padded rows: real tokens see what HF's padding mask shows them, so
    with labels the gradients are HF's (pads' labels are ignored either way)."""
    seed = fresh_seed()
    ref = make_model("qwen2", seed)
    model = apply(copy.deepcopy(ref))
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 120, (2, 14), generator=g)
    mask = torch.ones(2, 14, dtype=torch.long)
    mask[1, 9:] = 0
    labels = ids.clone()  # pads' labels too: the last real token's target, a pad, is no target
    want = shift_labels(labels.masked_fill(mask == 0, -100)).flatten()
    F.cross_entropy(ref(ids, attention_mask=mask).logits.flatten(0, 1), want).backward()  # float64 (HF's: float32)
    model(ids, attention_mask=mask, labels=labels, use_cache=False).loss.backward()  # padded queries: no target
    assert_grads_close(grads(model), grads(ref), rtol=1e-9)


def test_generic_path_for_other_architectures_with_one_notice() -> None:
    """GPT-2 has no block adapter: one warning line, then the generic path,
    still exact; it refuses gradient checkpointing (the recomputation would
    lose the keep mask)."""
    seed = fresh_seed()
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(vocab_size=120, n_embd=32, n_layer=2, n_head=4, n_positions=64, resid_pdrop=0.0,
                                  embd_pdrop=0.0, attn_pdrop=0.0, attn_implementation="sdpa")
    ref = transformers.GPT2LMHeadModel(cfg).double().train()
    with pytest.warns(ColliderGenericPathWarning) as record:
        model = apply(copy.deepcopy(ref))
    assert len(record) == 1 and "\n" not in str(record[0].message) and "generic path" in str(record[0].message)
    assert not uses_engine(model)
    g = torch.Generator().manual_seed(seed)
    ids, targets, keep = random_batch(2, 16, 120, g)
    reference_backward(ref, lambda logits: masked_cross_entropy(logits, targets, keep), keep, ids)
    masked_cross_entropy(model(ids, use_cache=False).logits, targets, keep).backward()
    assert_grads_close(grads(model), grads(ref))
    model.gradient_checkpointing_enable()
    with pytest.raises(ValueError, match="gradient checkpointing on the generic Collider path"):
        model(ids, labels=ids)
    with pytest.raises(ValueError, match="GPT2"):
        apply(copy.deepcopy(ref), engine=True)


def test_a_model_mixing_positions_outside_attention_is_refused() -> None:
    """LFM2's short convolutions mix positions outside attention: the generic path would
    drop the gradient they carry into dropped positions, so apply refuses it in one line
    (a Llama, whose only mixer is attention, is taken)."""
    from sparsetrain.collider.hf_generic import positions_mixed_outside_attention
    from sparsetrain.collider.hf_linear import UnsupportedLayer

    if not hasattr(transformers, "Lfm2Config"):
        pytest.skip("this transformers has no LFM2")
    cfg = transformers.Lfm2Config(vocab_size=120, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                  layer_types=["conv", "full_attention"])
    model = transformers.Lfm2ForCausalLM(cfg)
    import warnings

    with warnings.catch_warnings(record=True) as seen, pytest.raises(UnsupportedLayer,
                                                                     match=r"Lfm2ForCausalLM has conv layers") as e:
        warnings.simplefilter("always")
        apply(model)
    assert "\n" not in str(e.value) and "forward" not in model.__dict__  # refused before anything changed
    assert not [w for w in seen if issubclass(w.category, ColliderGenericPathWarning)]  # no notice of a path not taken
    mixer = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Conv1d(4, 4, 3, groups=4))  # no layer_types to go by
    assert positions_mixed_outside_attention(mixer) == "Sequential mixes positions in 1 (Conv1d), outside attention"
    assert positions_mixed_outside_attention(make_model("llama", fresh_seed())) is None


def test_remove_and_eval_use_hfs_own_forward() -> None:
    """No gradient (evaluation, generation): HF's forward and loss; remove()
    restores the model, state dict unchanged."""
    seed = fresh_seed()
    ref = make_model("llama", seed)
    model = apply(copy.deepcopy(ref))
    ids = torch.randint(0, 120, (2, 10))
    with torch.no_grad():
        a, b = ref(ids, labels=ids), model(ids, labels=ids)
    assert torch.equal(a.logits, b.logits) and torch.equal(a.loss, b.loss)
    assert model.state_dict().keys() == ref.state_dict().keys()
    remove(model)
    assert "forward" not in model.__dict__ and not hasattr(model, "_sparsetrain_collider")
    with pytest.raises(ValueError, match="not made a Collider trainee"):
        remove(model)


def test_cggr_api_on_an_applied_model() -> None:
    """CGGR's batch splitting and truncated router work on the applied model as
    on the plain one (its full logit gradient takes the engine's dense backward)."""
    from sparsetrain.selection import CGGRModel, create_truncated_router

    seed = fresh_seed()
    ref = make_model("qwen3", seed)
    model = apply(copy.deepcopy(ref))
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 120, (4, 12), generator=g)
    losses = []
    for m in (ref, model):
        cggr = CGGRModel(m, router=create_truncated_router(m, 1), min_tokens_ratio=0.5, warmup_steps=0)
        loss = cggr(ids, labels=ids)
        loss.backward()
        losses.append(loss.detach())
    assert torch.allclose(losses[0], losses[1], rtol=1e-12)
    assert_grads_close(grads(model), grads(ref), rtol=1e-9)


@pytest.mark.parametrize("family", FAMILIES)
def test_cggr_loss_on_an_applied_models_logits(family: str) -> None:
    """``CGGRLoss`` on the applied model's logits (no selector in the model: every
    position kept, the logits' gradient through the engine's dense backward):
    its kept tokens are the ``ceil(r * n)`` highest CGGR ``combined`` scores over
    the batch's n valid targets, with r CGGR's confidence-dynamic ratio; the loss
    and every gradient are those of a naive float64 cross-entropy averaged over
    exactly those tokens, on the plain HF model."""
    import math

    from sparsetrain.selection import CGGRLoss

    seed = fresh_seed()
    ref = make_model(family, seed)
    model = apply(copy.deepcopy(ref))
    assert uses_engine(model)
    g = torch.Generator().manual_seed(seed)
    ids, targets, _ = random_batch(3, 16, 120, g)
    targets[1, 5:9] = -100
    targets[:, -1] = -100  # HF's shifted labels: the last position predicts nothing
    base, sensitivity = 0.3, 0.5

    # the reference: the plain model's logits, the kept tokens worked out here from CGGR's rule
    ref_logits = ref(ids, use_cache=False).logits
    ref_logits.retain_grad()
    valid = targets != -100
    logp = torch.log_softmax(ref_logits.double(), -1)
    nll = -logp.gather(-1, targets.clamp(min=0)[..., None]).squeeze(-1)
    with torch.no_grad():
        prob = logp.exp()
        entropy = -(prob * logp).sum(-1)
        p1, p2 = prob.topk(2, dim=-1).values.unbind(-1)
        score = (entropy - p1) + (1 - (p1 - p2)) + nll
        confidence = float(p1[valid].mean())
        ratio = base + sensitivity * (1 - confidence) * (1 - base)
        n = int(valid.sum())
        k = min(n, max(1, math.ceil(ratio * n - 1e-9)))
        order = torch.where(valid, score, float("-inf")).flatten().argsort(descending=True)
        kept = torch.zeros(ids.numel(), dtype=torch.bool)
        kept[order[:k]] = True
        kept = kept.view_as(valid)
    assert 0 < k < n and not (kept & ~valid).any()
    want_loss = nll[kept].mean()
    want_loss.backward()
    want = grads(ref)

    loss_fn = CGGRLoss(scoring="combined", selection="topk", dynamic_threshold=True,
                       threshold_sensitivity=sensitivity, min_tokens_ratio=base, warmup_steps=0)
    logits = model(ids, use_cache=False).logits
    seen = []
    logits.register_hook(lambda grad: seen.append(grad.detach().clone()))
    loss = loss_fn(logits, targets)
    loss.backward()
    assert torch.allclose(loss.detach(), want_loss.detach(), rtol=1e-12, atol=0), (float(loss), float(want_loss), seed)
    (dlogits,) = seen
    assert torch.equal(dlogits.abs().sum(-1) != 0, kept), seed  # exactly the kept rows get a gradient
    assert torch.allclose(dlogits, ref_logits.grad, rtol=1e-10, atol=1e-14), seed
    assert_grads_close(grads(model), want)
    metrics = loss_fn.get_metrics()
    assert metrics["tokens_selected"] == k and metrics["tokens_total"] == n, (metrics, k, n, seed)


@pytest.mark.slow
def test_compiled_pieces_match_eager() -> None:
    """compile=True runs the same math through torch.compile (LoRA and q/k norms
    in the pieces; two kept counts: the dynamic-shape backward must not care)."""
    peft = pytest.importorskip("peft")
    seed = fresh_seed()
    ref = peft.get_peft_model(make_model("qwen3", seed), peft.LoraConfig(r=4, target_modules=["q_proj", "up_proj"]))
    results = []
    for compile in (False, True):
        model = apply(copy.deepcopy(ref), compile=compile)
        for n in (3, 7):
            g = torch.Generator().manual_seed(seed + n)
            ids, targets, keep = random_batch(2, 16, 120, g)
            masked_cross_entropy(model(ids).logits, targets, keep).backward()
            results.append(grads(model))
    assert_grads_close(results[2], results[0], rtol=1e-10)
    assert_grads_close(results[3], results[1], rtol=1e-10)


@pytest.mark.parametrize("weights", ["float32-autocast", "bfloat16"])
def test_16bit_runs_close_to_the_float64_reference(weights: str) -> None:
    """bf16 on the CPU (autocast over float32 weights, or bf16 weights): the
    dtype plumbing holds and the gradients are those of the objective to bf16
    precision."""
    seed = fresh_seed()
    ref = make_model("qwen3", seed, hidden_size=64, head_dim=16)
    g = torch.Generator().manual_seed(seed)
    ids, targets, keep = random_batch(2, 24, 120, g)
    reference_backward(ref, lambda logits: masked_cross_entropy(logits, targets, keep), keep, ids)
    want = grads(ref)
    model = apply(copy.deepcopy(ref).to(torch.float32 if weights == "float32-autocast" else torch.bfloat16))
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=weights == "float32-autocast"):
        logits = model(ids).logits
        assert logits.dtype == torch.bfloat16
        masked_cross_entropy(logits, targets, keep).backward()
    got = grads(model)
    assert set(got) == set(want)
    for n in want:
        err = float((got[n] - want[n]).norm() / want[n].norm())
        assert err < 0.05, (n, err, seed)


def _ddp_worker(rank: int, world: int, port: int, seed: int, state: dict, batches: list, total: int, out: str) -> None:
    import os

    from sparsetrain.distributed import shutdown_distributed, track_ddp

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    ok = False
    try:
        with float64_norms():
            model = make_model("llama", seed)
            model.load_state_dict(state)
            selector = TokenSelector(score="collider", method="topk", keep_ratio=0.5)
            ddp = track_ddp(torch.nn.parallel.DistributedDataParallel(apply(model, selector=selector)))
            ids, labels = batches[rank]
            # the loss over this rank's kept tokens divided by every rank's: DDP's mean then needs the world size
            loss = ddp(ids, labels=labels, num_items_in_batch=torch.tensor(total), collider_counts_kept=True).loss * world
            loss.backward()
            torch.save({"grads": {k: p.grad for k, p in model.named_parameters()}, "keep": selector.last_mask},
                       f"{out}/rank{rank}.pt")
        ok = True
    finally:
        # the project's ordered teardown: destroying the group while DDP's reducer is
        # alive deadlocks gloo's teardown (docs/scaling.md, Clean exits)
        shutdown_distributed(synchronize=ok)


def test_ddp_normalises_by_the_global_kept_count(tmp_path) -> None:
    """Two gloo processes, a selector in each forward: the all-reduced gradients
    equal one process's float64 reference over every kept token of both
    ranks divided by their total count."""
    import torch.multiprocessing as mp

    from test_distributed import _free_port

    seed = fresh_seed()
    ref = make_model("llama", seed)
    g = torch.Generator().manual_seed(seed)
    batches = [(torch.randint(0, 120, (2, 12), generator=g), torch.randint(0, 120, (2, 12), generator=g))
               for _ in range(2)]
    batches[0][1][1, :5] = -100
    total = sum(budget(int((shift_labels(lab) != -100).sum()), 0.5) for _, lab in batches)
    mp.spawn(_ddp_worker, args=(2, _free_port(), seed, ref.state_dict(), batches, total, str(tmp_path)), nprocs=2,
             join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    for (ids, labels), r in zip(batches, (r0, r1)):
        keep, targets = r["keep"], shift_labels(labels)
        reference_backward(ref, lambda logits: masked_cross_entropy(logits, targets, keep) * (int(keep.sum()) / total),
                           keep, ids)
    want = grads(ref)
    for name in want:
        assert torch.equal(r0["grads"][name], r1["grads"][name]), name
    assert_grads_close({k: v.double() for k, v in r0["grads"].items()}, want)


@requires_cuda
@pytest.mark.parametrize("attention, lora", [("kept", False), ("dense", False), ("kept", True)])
def test_cuda_bf16_engine_close_to_float64_reference(attention: str, lora: bool) -> None:
    """On the GPU: bf16 autocast over float32 weights, compiled pieces, the fused
    attention forward on expanded grouped heads, and the kept-query kernel (or
    cuDNN's dense backward) reading them grouped: every gradient near the
    float64 reference."""
    seed = fresh_seed()
    ref = make_model("qwen3", seed, hidden_size=256, intermediate_size=512, num_attention_heads=4,
                     num_key_value_heads=2, head_dim=64, vocab_size=1000)
    if lora:
        peft = pytest.importorskip("peft")
        ref = peft.get_peft_model(ref, peft.LoraConfig(r=8, target_modules=["q_proj", "k_proj", "o_proj", "up_proj"]))
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for n, p in ref.named_parameters():
                if "lora_B" in n:
                    p.copy_(0.1 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    g = torch.Generator().manual_seed(seed)
    ids, targets, keep = random_batch(2, 256, 1000, g)
    lm = ref.get_base_model() if lora else ref
    reference_backward(lm, lambda logits: masked_cross_entropy(logits, targets, keep), keep, ids)
    want = grads(ref)
    model = apply(copy.deepcopy(ref).float().cuda(), compile=True, attention=attention)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        logits = model(input_ids=ids.cuda()).logits
        masked_cross_entropy(logits, targets.cuda(), keep.cuda()).backward()
    got = {n: t.cpu() for n, t in grads(model).items()}
    assert set(got) == set(want)
    for n in want:
        err = float((got[n] - want[n]).norm() / want[n].norm())
        assert err < 3e-2, (n, err, seed)


def test_keep_all_training_step_reads_nothing_back(monkeypatch: pytest.MonkeyPatch) -> None:
    """With no selector (every position kept) and the target count given, the
    engine's forward, its kept-rows loss and the backward read no tensor on the
    host (what a CUDA graph's capture needs), and the loss is HF's mean."""
    import traceback

    from test_objectives import READS

    seed = fresh_seed()
    ref = make_model("llama", seed, dtype=torch.float32)
    model = apply(copy.deepcopy(ref))
    assert uses_engine(model)
    ids = torch.randint(0, 120, (2, 16), generator=torch.Generator().manual_seed(seed))
    reads: list[str] = []
    originals = {name: getattr(torch.Tensor, name) for name in READS}
    nonzero = torch.nonzero

    def recording(name, original):
        def read(*args, **kwargs):
            frames = [f for f in traceback.extract_stack()[:-1] if "sparsetrain" in f.filename]
            if frames:
                reads.append(f"{name} at {frames[-1].filename}:{frames[-1].lineno}")
            return original(*args, **kwargs)
        return read

    for name in READS:
        monkeypatch.setattr(torch.Tensor, name, recording(name, originals[name]))
    monkeypatch.setattr(torch, "nonzero", recording("nonzero", nonzero))
    loss = model(ids, labels=ids, use_cache=False, collider_logits=False, collider_n_valid=2 * 15).loss
    loss.backward()
    monkeypatch.undo()
    assert not reads, reads
    want = ref(ids, labels=ids, use_cache=False).loss
    assert float(loss) == pytest.approx(float(want), rel=1e-5)
