"""Collider gradients against an independent float64 reference: an ordinary
autograd forward that takes the keep mask up front and detaches dropped
positions' keys and values in every attention layer."""

from __future__ import annotations

import contextlib
import json

import pytest
import torch
import torch.nn.functional as F

from sparsetrain.collider import ColliderModel, filter, masked_cross_entropy, rmsnorm_backward, rope_inverse
from sparsetrain.build import build_model
from sparsetrain.config import ModelConfig
from sparsetrain.model import GPT, apply_rope, rope_tables
from sparsetrain.selection import TokenSelector, cached_kept_indices

from conftest import fresh_seed, requires_cuda
from gradient_magnitudes import assert_within_rounding, recording


def reference_trunk(model: GPT, idx: torch.Tensor, keep: torch.Tensor, hidden: list | None = None,
                    ffn_on_kept_rows: bool = False) -> torch.Tensor:
    """The trunk output under the Collider objective written plainly: dropped K/V
    detached per layer; one residual stream, or hyper-connection streams.
    ``hidden`` collects each block's output. ``ffn_on_kept_rows``: the FFN's
    values on all tokens, but its backward that of the FFN called on the kept
    rows alone (the definition of Collider's relu2_24 path with token-wise pruning)."""
    cfg = model.config
    B, T = idx.shape
    H, hd = cfg.n_head, cfg.head_dim
    cos, sin = model.rope_cos[:T], model.rope_sin[:T]
    kv_keep = keep[:, None, :, None]  # [B, 1, T, 1]
    kidx = torch.nonzero(keep.reshape(-1)).squeeze(1)

    def attention(blk, a):
        q, k, v = blk.attn.qkv(blk.attn_norm(a)).view(B, T, 3, H, hd).permute(2, 0, 3, 1, 4)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        k = torch.where(kv_keep, k, k.detach())
        v = torch.where(kv_keep, v, v.detach())
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return blk.attn.proj(o.transpose(1, 2).reshape(B, T, -1))

    def ffn(blk, a):
        b = blk.ffn_norm(a)
        if not ffn_on_kept_rows:
            return blk.ffn(b)
        with torch.no_grad():
            values = blk.ffn(b)
        flat = b.reshape(B * T, -1)
        y_k = blk.ffn(flat[kidx])  # the FFN's own backward, with the kept rows as its batch
        grad_path = torch.zeros_like(values.reshape(B * T, -1)).index_copy(0, kidx, y_k - y_k.detach())
        return values + grad_path.view_as(values)

    n = cfg.hyper_connections
    x = model.embed(idx)
    if n:
        x = x.unsqueeze(-2) * model.hyper_in[:, None]
    for blk in model.blocks:
        if n:
            x = blk.hc_attn.write(x, attention(blk, blk.hc_attn(x)))
            x = blk.hc_ffn.write(x, ffn(blk, blk.hc_ffn(x)))
        else:
            x = x + attention(blk, x)
            x = x + ffn(blk, x)
        if hidden is not None:
            hidden.append(x)
    if n:
        x = torch.einsum("i,...id->...d", model.hyper_out, x)
    return x


def reference_loss(model: GPT, idx: torch.Tensor, targets: torch.Tensor, keep: torch.Tensor,
                   weights: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
    """The Collider objective: mean cross-entropy over kept tokens of :func:`reference_trunk`
    (each token's loss times its weight first, with ``weights``)."""
    logits = model.lm_head(model.norm(reference_trunk(model, idx, keep, **kwargs)))
    sel = keep & (targets != -100)
    losses = F.cross_entropy(logits[sel], targets[sel], reduction="none")
    return (losses if weights is None else losses * weights[sel]).mean()


# model variants: FFN kind, and for relu2_24 the settings that make its backward
# position-wise (no token-wise pruning, or every feature dense in it)
VARIANTS = {
    "relu2": {}, "swiglu": {"ffn": "swiglu"}, "relu2-tied": {"tie": True},
    "relu2_24-noprune": {"ffn": "relu2_24", "token_prune": False},
    "relu2_24-alldense": {"ffn": "relu2_24", "dense_fraction": 1.0},
    "swiglu-hyper2": {"ffn": "swiglu", "hyper": 2}, "relu2-hyper4": {"hyper": 4},
    "relu2_24-hyper2-tied": {"ffn": "relu2_24", "token_prune": False, "hyper": 2, "tie": True},
}


def make(ffn: str = "relu2", tie: bool = False, n_layer: int = 3, hyper: int = 0, token_prune: bool = True,
         dense_fraction: float = 0.05) -> GPT:
    torch.manual_seed(fresh_seed())
    cfg = ModelConfig(vocab_size=300, seq_len=24, n_layer=n_layer, n_head=2, d_model=16, ffn=ffn, init_std=0.3,
                      tie_embeddings=tie, hyper_connections=hyper, activation_dense_warmup_steps=0,
                      activation_dense_fraction=dense_fraction)
    model = build_model(cfg).double()
    for p in model.parameters():  # non-trivial norm gains and mixing
        if p.dim() == 1:
            p.data.uniform_(0.5, 1.5)
    for m in model.modules():
        if hasattr(m, "token_prune"):
            m.token_prune = token_prune
    return model


def grads(model: GPT) -> dict[str, torch.Tensor]:
    out = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out


def random_tokens(B: int, T: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Input tokens and targets ``[B, T]`` (97 of the model's 300 ids)."""
    return torch.randint(0, 97, (B, T), generator=g), torch.randint(0, 97, (B, T), generator=g)


def random_keep(B: int, T: int, g: torch.Generator) -> torch.Tensor:
    keep = torch.rand(B, T, generator=g) < torch.rand(B, 1, generator=g).clamp(0.2, 0.9)  # uneven per sequence
    keep[:, 0] |= ~keep.any(-1)
    return keep


def assert_close(a: dict, b: dict, rtol: float = 1e-6) -> None:
    assert a.keys() == b.keys()
    for n in a:
        err = (a[n] - b[n]).norm() / b[n].norm().clamp(min=1e-30)
        assert err <= rtol, (n, float(err))


@pytest.mark.parametrize("given", ["none", "same", "copy"])
def test_compact_loss_rows_reach_the_engine(given: str) -> None:
    """masked_cross_entropy on ColliderModel logits hands the engine [K, V] rows
    (autograd only sees a stride-0 zero) and its keep mask: no filter is needed,
    and a filter given the same mask object, or an equal copy, changes nothing.
    All give the reference gradients."""
    model = make()
    g = torch.Generator().manual_seed(fresh_seed())
    B, T = 2, 20
    idx, targets = random_tokens(B, T, g)
    targets[0, 2] = -100
    keep = random_keep(B, T, g)
    keep[0, 0] = True  # at least one kept row with a target...
    targets[0, 0] = 5
    reference_loss(model, idx, targets, keep).backward()
    ref = grads(model)
    logits = ColliderModel(model)(idx)
    seen = []
    logits.register_hook(lambda grad: seen.append(grad.stride()))
    loss = masked_cross_entropy(logits, targets, keep)
    ctx = {"none": contextlib.nullcontext(), "same": filter(keep), "copy": filter(keep.clone())}[given]
    with ctx:
        loss.backward()
    assert seen == [(0, 0, 0)]  # the full-size gradient was never written
    assert_close(grads(model), ref, rtol=1e-6)


@pytest.mark.parametrize("other", ["subset", "none"])
def test_filter_that_disagrees_with_the_loss_mask_raises(other: str) -> None:
    """filter is a check when the loss brings its mask: another mask (or None,
    keep-everything, while the loss dropped tokens) is one clear error."""
    model = make()
    g = torch.Generator().manual_seed(fresh_seed())
    idx, targets = random_tokens(2, 16, g)
    keep = torch.ones(2, 16, dtype=torch.bool)
    keep[1, 3:9] = False
    loss = masked_cross_entropy(ColliderModel(model)(idx), targets, keep)
    with pytest.raises(ValueError, match="collider.filter"):
        with filter(None if other == "none" else keep & (torch.rand(2, 16, generator=g) < 0.5)):
            loss.backward()


@pytest.mark.parametrize("method", ["topk", "random"])
def test_selector_mask_with_its_own_indices_matches_reference(method: str) -> None:
    """A selector's mask brings its kept indices (no host sync in loss or
    backward); the gradients are still the reference's."""
    model = make()
    g = torch.Generator().manual_seed(fresh_seed())
    B, T = 3, 20
    idx, targets = random_tokens(B, T, g)
    targets[1, 4:9] = -100
    cm = ColliderModel(model)
    logits = cm(idx)
    n_valid = int((targets != -100).sum())
    keep, stats = TokenSelector(score="collider", method=method, keep_ratio=0.4)(logits.detach(), targets, n_valid=n_valid)
    assert cached_kept_indices(keep) is not None and stats.kept == int(keep.sum())
    loss = masked_cross_entropy(logits, targets, keep)
    with filter(keep):
        loss.backward()
    got = grads(model)
    reference_loss(model, idx, targets, keep.clone()).backward()
    assert_close(got, grads(model), rtol=1e-6)


@pytest.mark.parametrize("weighted", [False, True])
def test_masked_cross_entropy_on_plain_logits_matches_float64(weighted: bool) -> None:
    """The mean over kept tokens with a target, or with ``weights`` (importance
    selection's) the weighted sum over them divided by their count."""
    g = torch.Generator().manual_seed(fresh_seed())
    B, T, V = 3, 7, 11
    logits = torch.randn(B, T, V, generator=g, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, V, (B, T), generator=g)
    targets[1, 2] = -100
    keep = torch.rand(B, T, generator=g) < 0.6
    keep[1, 2] = keep[0, 1] = True
    weights = torch.rand(B, T, generator=g, dtype=torch.float64) * 3 if weighted else torch.ones(B, T, dtype=torch.float64)
    loss = masked_cross_entropy(logits, targets, keep, weights if weighted else None)
    (dl,) = torch.autograd.grad(loss, logits)
    ref_logits = logits.detach().clone().requires_grad_(True)
    terms = [weights[b, t] * (torch.logsumexp(ref_logits[b, t], 0) - ref_logits[b, t, targets[b, t]])
             for b in range(B) for t in range(T) if keep[b, t] and targets[b, t] != -100]
    ref = torch.stack(terms).mean()
    ref.backward()
    assert torch.allclose(loss, ref, rtol=1e-12)
    assert torch.allclose(dl, ref_logits.grad, rtol=1e-12, atol=1e-15)
    if weighted:
        with pytest.raises(ValueError, match=r"weights \(3, 6\) do not match keep \(3, 7\)"):
            masked_cross_entropy(logits, targets, keep, weights[:, :6])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("compact", [False, True])
@pytest.mark.parametrize("weighted", [False, True])
def test_masked_cross_entropy_kernels_match_float64(monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype,
                                                   compact: bool, weighted: bool) -> None:
    """The loss on its Triton kernels (on CUDA; here through Triton's interpreter):
    loss and gradient against float64, as a full gradient and as the compact
    kept rows handed to the engine's slot; ``weighted``: per-token weights (the
    importance selection's), one scale per kept row in the gradient kernel."""
    from sparsetrain import cross_entropy as ce
    from sparsetrain.collider import loss as kept_loss

    monkeypatch.setattr(kept_loss, "_fused", ce.fused_ok)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator().manual_seed(fresh_seed())
    B, T, V = 2, 9, 600
    logits = (3 * torch.randn(B, T, V, generator=g)).to(device, dtype).requires_grad_(True)
    targets = torch.randint(0, V, (B, T), generator=g)
    targets[1, 2] = -100
    keep = torch.rand(B, T, generator=g) < 0.6
    keep[1, 2] = keep[0, 1] = True
    weights = (torch.rand(B, T, generator=g) * 4).to(device) if weighted else None
    targets, keep = targets.to(device), keep.to(device)
    slot = kept_loss.RowGradSlot()
    if compact:
        setattr(logits, kept_loss.SLOT_ATTR, slot)
    loss = masked_cross_entropy(logits, targets, keep, weights)
    (dl,) = torch.autograd.grad(loss * 0.8, logits)
    x64 = logits.detach().double().requires_grad_(True)
    sel = keep & (targets != -100)
    ref = F.cross_entropy(x64[sel], targets[sel], reduction="none")
    ref = (ref * weights[sel].double()).mean() if weighted else ref.mean()
    (want,) = torch.autograd.grad(ref * 0.8, x64)
    assert abs(float(loss.detach()) - float(ref)) <= 1e-5 * abs(float(ref))
    if compact:  # the engine's rows: the gradient of the kept rows, in the filter's order
        (keep_, kidx, rows), = slot.items
        got = torch.zeros(B * T, V, dtype=rows.dtype, device=device).index_copy_(0, kidx, rows).view(B, T, V)
    else:
        got = dl
    tol = 1e-6 if dtype == torch.float32 else 2**-8
    assert got.dtype == dtype
    assert torch.allclose(got.double(), want, rtol=tol, atol=tol * float(want.abs().max()))


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_gradients_match_detached_kv_reference(variant: str) -> None:
    """Every parameter's gradient (embedding, blocks, hyper-connection mixing, head)
    equals the reference's; the loss alone brings the keep mask (no filter)."""
    model = make(**VARIANTS[variant])
    g = torch.Generator().manual_seed(fresh_seed())
    B, T = 3, 20
    idx, targets = random_tokens(B, T, g)
    targets[1, 3] = -100
    keep = random_keep(B, T, g)
    with recording(model) as magnitudes:
        reference_loss(model, idx, targets, keep).backward()
    ref = grads(model)
    cm = ColliderModel(model)
    logits = cm(idx)
    masked_cross_entropy(logits, targets, keep).backward()
    got = grads(model)
    assert set(got) == {n for n, p in model.named_parameters()}
    # float64 sums in another order, against the sum of each gradient's |terms| (the
    # hyper-connection mixing logits' gradients cancel: gradient_magnitudes.py);
    # relu2_24's weights (its own autograd function: no magnitudes) relative to their norm
    assert_within_rounding(got, ref, magnitudes, torch.float64, rtol=1e-10)
    # the detached K/V matter: plain masked cross-entropy has other gradients
    sel = keep & (targets != -100)
    F.cross_entropy(model(idx)[0][sel], targets[sel]).backward()
    plain = grads(model)
    assert max(float((plain[n] - got[n]).norm() / got[n].norm()) for n in got) > 1e-3


@pytest.mark.parametrize("variant", ["relu2", "relu2_24-hyper2-tied"])
def test_weighted_kept_loss_gradients_match_reference(variant: str) -> None:
    """Per-token weights on the kept rows (importance selection's) scale each kept
    row's gradient through every layer: the engine against the detached-K/V
    reference with the weighted mean over kept tokens."""
    model = make(**VARIANTS[variant])
    g = torch.Generator().manual_seed(fresh_seed())
    B, T = 3, 20
    idx, targets = random_tokens(B, T, g)
    targets[2, 5] = -100
    keep = random_keep(B, T, g)
    weights = torch.rand(B, T, generator=g, dtype=torch.float64) * 3
    with recording(model) as magnitudes:
        reference_loss(model, idx, targets, keep, weights).backward()
    ref = grads(model)
    masked_cross_entropy(ColliderModel(model)(idx), targets, keep, weights).backward()
    assert_within_rounding(grads(model), ref, magnitudes, torch.float64, rtol=1e-10)


@pytest.mark.parametrize("variant", ["relu2", "swiglu-hyper2"])
def test_engine_with_kept_attention_kernel_matches_reference(variant: str) -> None:
    """The full Collider backward with the Triton kept-query kernel (interpreter on
    CPU), in the compact and the composed block paths."""
    from sparsetrain.collider import triton_attention

    if not triton_attention.available():
        pytest.skip("triton not installed")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = make(n_layer=2, **VARIANTS[variant])
    torch.nn.init.normal_(model.embed.weight, 0, 0.3)
    cfg = model.config
    model32 = build_model(ModelConfig(**{**cfg.__dict__, "d_model": 32})).double()  # head_dim 16: a kernel-legal shape
    for p in model32.parameters():
        p.data.normal_(0, 0.2) if p.dim() > 1 else p.data.uniform_(0.5, 1.5)
    model32.float().double()  # float32 values: the reference and the float32 engine see the same parameters
    g = torch.Generator().manual_seed(fresh_seed())
    idx = torch.randint(0, 300, (2, 20), generator=g)
    targets = torch.randint(0, 300, (2, 20), generator=g)
    keep = random_keep(2, 20, g)
    with recording(model32) as magnitudes:
        reference_loss(model32, idx, targets, keep).backward()
    ref = grads(model32)
    m = model32.float().to(device)
    idx, targets, keep = idx.to(device), targets.to(device), keep.to(device)
    loss = masked_cross_entropy(ColliderModel(m, attention="kept")(idx), targets, keep)
    with filter(keep):
        loss.backward()
    got = {n: p.grad.double().cpu() for n, p in m.named_parameters()}
    # float32 throughout (the kernel's products too), against the sum of each gradient's
    # |terms|: a relative error means nothing where the terms cancel, as the first
    # hyper-connection read's gains' do exactly (gradient_magnitudes.py)
    assert_within_rounding(got, ref, magnitudes, torch.float32)


@pytest.mark.parametrize("variant", ["swiglu", "relu2_24", "swiglu-hyper2", "relu2-hyper4"])
def test_keep_all_equals_dense(variant: str) -> None:
    """Keeping every token gives dense training's gradients; for relu2_24 with
    token-wise pruning too (its recomputation then sees every row, in order)."""
    model = make(**({"ffn": "relu2_24"} if variant == "relu2_24" else VARIANTS[variant]))
    idx = torch.randint(0, 97, (2, 24))
    targets = torch.randint(0, 97, (2, 24))
    with recording(model) as magnitudes:
        _, loss = model(idx, targets)
        loss.backward()
    dense = grads(model)
    logits = ColliderModel(model)(idx)
    assert torch.equal(logits, model(idx)[0])  # the forward is the model's own
    loss = masked_cross_entropy(logits, targets, torch.ones_like(targets, dtype=torch.bool))
    with filter(None):
        loss.backward()
    # float64 sums in another order, against the sum of each gradient's |terms| (the
    # hyper-connection mixing logits' gradients cancel: gradient_magnitudes.py);
    # relu2_24's weights (its own autograd function: no magnitudes) relative to their norm
    assert_within_rounding(grads(model), dense, magnitudes, torch.float64, rtol=1e-10)


def test_dropped_positions_get_no_gradient_anywhere() -> None:
    model = make()
    B, T = 2, 16
    idx = torch.arange(B * T).view(B, T) % 97  # every position a distinct token: embedding rows map to positions
    targets = torch.randint(0, 97, (B, T))
    keep = torch.zeros(B, T, dtype=torch.bool)
    keep[0, 5] = keep[1, 9] = keep[1, 15] = True
    loss = masked_cross_entropy(ColliderModel(model)(idx), targets, keep)
    with filter(keep):
        loss.backward()
    d_embed = model.embed.weight.grad
    for b in range(B):
        for t in range(T):
            row = d_embed[idx[b, t]]
            assert bool(row.abs().sum() > 0) == bool(keep[b, t]), (b, t)


def test_grad_accumulation_adds_up() -> None:
    model = make()
    g = torch.Generator().manual_seed(fresh_seed())
    batches = [(torch.randint(0, 97, (2, 12), generator=g), torch.randint(0, 97, (2, 12), generator=g),
                random_keep(2, 12, g)) for _ in range(2)]
    cm = ColliderModel(model)
    for idx, tgt, keep in batches:
        with filter(keep):
            (0.5 * masked_cross_entropy(cm(idx), tgt, keep)).backward()
    acc = grads(model)
    for idx, tgt, keep in batches:
        (0.5 * reference_loss(model, idx, tgt, keep)).backward()
    assert_close(acc, grads(model), rtol=1e-6)


def test_filter_supplies_the_mask_to_other_losses_on_another_thread() -> None:
    """Without a kept-rows loss (here plain cross-entropy on the kept logits) the
    filter's mask is the one kept, and it reaches autograd's worker thread (where
    CUDA backward nodes run); so does the check that it agrees with a kept-rows loss."""
    import threading

    model = make()
    idx = torch.randint(0, 300, (2, 12))
    targets = torch.randint(0, 300, (2, 12))
    keep = torch.zeros(2, 12, dtype=torch.bool)
    keep[:, 6:] = True
    reference_loss(model, idx, targets, keep).backward()
    ref = grads(model)
    logits = ColliderModel(model)(idx)
    loss = F.cross_entropy(logits[keep], targets[keep])
    errors = []

    def backward(loss_):
        try:
            loss_.backward()
        except ValueError as e:
            errors.append(str(e))

    with filter(keep):
        worker = threading.Thread(target=backward, args=(loss,))
        worker.start()
        worker.join()
    assert not errors
    assert_close(grads(model), ref, rtol=1e-6)
    loss = masked_cross_entropy(ColliderModel(model)(idx), targets, keep)
    with filter(~keep):
        worker = threading.Thread(target=backward, args=(loss,))
        worker.start()
        worker.join()
    assert len(errors) == 1 and "collider.filter" in errors[0]


def test_keep_none_and_bad_mask_raise() -> None:
    model = make()
    idx = torch.randint(0, 97, (2, 8))
    logits = ColliderModel(model)(idx)
    none = torch.zeros(2, 8, dtype=torch.bool)
    with pytest.raises(ValueError, match="keeps no token"):
        masked_cross_entropy(logits, idx, none)
    with pytest.raises(ValueError, match="keeps no token"):
        with filter(none):
            logits.sum().backward()
    logits = ColliderModel(model)(idx)
    with pytest.raises(ValueError, match="shape"):
        with filter(torch.ones(3, 8, dtype=torch.bool)):
            logits.sum().backward()


def test_ignore_index_is_never_a_target() -> None:
    model = make()
    idx = torch.randint(0, 97, (2, 10))
    targets = torch.randint(0, 97, (2, 10))
    targets[0, :4] = -100
    keep = torch.ones(2, 10, dtype=torch.bool)
    loss = masked_cross_entropy(ColliderModel(model)(idx), targets, keep)
    assert torch.allclose(loss, F.cross_entropy(model(idx)[0].flatten(0, 1), targets.flatten(), ignore_index=-100))


def test_rmsnorm_and_rope_backward_helpers() -> None:
    x = torch.randn(5, 8, dtype=torch.float64, requires_grad=True)
    w = torch.rand(8, dtype=torch.float64, requires_grad=True)
    dy = torch.randn(5, 8, dtype=torch.float64)
    F.rms_norm(x, (8,), w, 1e-6).backward(dy)
    dx, dw = rmsnorm_backward(dy, x.detach(), w.detach(), 1e-6)
    assert torch.allclose(dx, x.grad) and torch.allclose(dw, w.grad)
    q = torch.randn(2, 3, 4, 8, dtype=torch.float64, requires_grad=True)  # [B, H, T, hd]
    cos, sin = torch.rand(4, 4, dtype=torch.float64), torch.rand(4, 4, dtype=torch.float64)
    dq = torch.randn(2, 3, 4, 8, dtype=torch.float64)
    apply_rope(q, cos, sin).backward(dq)
    assert torch.allclose(rope_inverse(dq, cos[None, None], sin[None, None]), q.grad)


@requires_cuda
def test_cuda_bf16_collider_close_to_float64_reference() -> None:
    model = make(n_layer=2)
    g = torch.Generator().manual_seed(fresh_seed())
    idx = torch.randint(0, 97, (2, 24), generator=g)
    targets = torch.randint(0, 97, (2, 24), generator=g)
    keep = random_keep(2, 24, g)
    reference_loss(model, idx, targets, keep).backward()
    ref = grads(model)
    gpu = make(n_layer=2).float().cuda()
    gpu.load_state_dict({k: v.float() for k, v in model.state_dict().items()})
    with torch.autocast("cuda", dtype=torch.bfloat16):
        logits = ColliderModel(gpu)(idx.cuda())
    loss = masked_cross_entropy(logits, targets.cuda(), keep.cuda())
    with filter(keep.cuda()):
        loss.backward()
    got = {n: p.grad.double().cpu() for n, p in gpu.named_parameters()}
    assert_close(got, ref, rtol=5e-2)


@pytest.mark.slow
def test_compiled_pieces_match_eager() -> None:
    """ColliderModel(compile=True) runs the same math through torch.compile."""
    model = make("swiglu", n_layer=2)
    g = torch.Generator().manual_seed(fresh_seed())
    results = []
    for compile in (False, True):
        for K in (1, 2):  # two different kept counts: the dynamic-shape backward must not care
            g.manual_seed(K)
            idx = torch.randint(0, 300, (2, 16), generator=g)
            targets = torch.randint(0, 300, (2, 16), generator=g)
            keep = random_keep(2, 16, g)
            loss = masked_cross_entropy(ColliderModel(model, compile=compile)(idx), targets, keep)
            with filter(keep):
                loss.backward()
            results.append(grads(model))
    assert_close(results[2], results[0], rtol=1e-10)
    assert_close(results[3], results[1], rtol=1e-10)


@pytest.mark.parametrize("token_major", [True, False])
def test_head_scatter_gather_both_layouts(token_major: bool) -> None:
    from sparsetrain.collider.attention import scatter_heads as _scatter_heads

    B, H, T, hd = 2, 3, 5, 4
    like = torch.randn(B, T, H, hd).transpose(1, 2) if token_major else torch.randn(B, H, T, hd)
    kidx = torch.tensor([0, 3, 6, 9])
    kb, kt = kidx // T, kidx % T
    buf = None
    for _ in range(2):  # the second call reuses the first's buffer (one per backward, as the engine does)
        rows = torch.randn(4, H * hd)
        out, buf = _scatter_heads(rows, like, kidx, kb, kt, buf)
        assert out.stride() == like.stride() or not token_major
        assert (buf is not None) == token_major
        ref = torch.zeros(B, H, T, hd)
        for i, (b, t) in enumerate(zip(kb.tolist(), kt.tolist())):
            ref[b, :, t] = rows[i].view(H, hd)
        assert torch.equal(out, ref)


@pytest.mark.parametrize("B, H, T, hd, block, with_lse", [(2, 2, 40, 16, 16, False), (1, 3, 70, 32, 32, True),
                                                           (3, 2, 50, 16, 16, True)])
def test_kept_query_attention_kernel_matches_dense_backward(B, H, T, hd, block, with_lse) -> None:
    """The kernels read q/k/v/out in place, in the engine's token-major layout,
    with the log-sum-exp given (as the fused forward kernels return it) or recomputed."""
    tri = pytest.importorskip("sparsetrain.collider.triton_attention")
    if not tri.available():
        pytest.skip("triton not installed")
    device = "cuda" if torch.cuda.is_available() else "cpu"  # CPU: Triton's interpreter
    g = torch.Generator().manual_seed(fresh_seed())
    q, k, v = (torch.randn(B, T, H, hd, generator=g).transpose(1, 2) for _ in range(3))  # token-major
    keep = random_keep(B, T, g)
    kidx = torch.nonzero(keep.reshape(-1)).squeeze(1)
    kb, kt = kidx // T, kidx % T
    d_out = torch.zeros(B, H, T, hd)
    d_out[kb, :, kt] = torch.randn(kidx.numel(), H, hd, generator=g)
    qd, kd, vd = (t.double().requires_grad_(True) for t in (q, k, v))
    out = F.scaled_dot_product_attention(qd, kd, vd, is_causal=True)
    dq, dk, dv = torch.autograd.grad(out, (qd, kd, vd), d_out.double())
    scores = (qd @ kd.transpose(-1, -2)).detach() / hd**0.5
    lse = scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf")).logsumexp(-1)
    pick = lambda t: t[kb, :, kt]  # noqa: E731
    to = lambda t: t.to(device)  # noqa: E731
    out32 = out.detach().float().transpose(1, 2).contiguous().transpose(1, 2)
    got = tri.kept_attention_backward(to(q), to(k), to(v), to(out32), to(pick(d_out)), to(kidx),
                                      to(lse.float()) if with_lse else None, config=(block, block, 4, 1))
    for name, a, ref in zip(("dq", "dk", "dv"), got, (pick(dq), pick(dk), pick(dv))):
        err = (a.double().cpu() - ref).norm() / ref.norm()
        assert err < 1e-5, (name, float(err))  # float32 products (input_precision ieee on the GPU)


def test_kept_attention_kernel_undoes_rope_into_packed_rows() -> None:
    """With the RoPE tables, dq and dk come out as gradients before RoPE,
    written as the [K, 3, H, hd] rows of the QKV projection's output: checked
    against float64 autograd through apply_rope and attention."""
    tri = pytest.importorskip("sparsetrain.collider.triton_attention")
    if not tri.available():
        pytest.skip("triton not installed")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator().manual_seed(fresh_seed())
    B, H, T, hd = 2, 2, 37, 16
    cos, sin = rope_tables(T + 5, hd, 100.0)  # longer tables than T, as the model's may be
    q0, k0, v = (torch.randn(B, T, H, hd, generator=g, dtype=torch.float64) for _ in range(3))  # before RoPE
    keep = random_keep(B, T, g)
    kidx = torch.nonzero(keep.reshape(-1)).squeeze(1)
    kb, kt = kidx // T, kidx % T
    qd, kd, vd = (t.clone().requires_grad_(True) for t in (q0, k0, v))
    q, k = (apply_rope(t, cos[:T].double(), sin[:T].double(), seq_dim=1).transpose(1, 2) for t in (qd, kd))
    out = F.scaled_dot_product_attention(q, k, vd.transpose(1, 2), is_causal=True)
    d_out = torch.zeros(B, H, T, hd, dtype=torch.float64)
    d_out[kb, :, kt] = torch.randn(kidx.numel(), H, hd, generator=g, dtype=torch.float64)
    dq, dk, dv = torch.autograd.grad(out, (qd, kd, vd), d_out)  # token-major [B, T, H, hd]
    to = lambda t: t.detach().float().transpose(1, 2).contiguous().transpose(1, 2).to(device)  # noqa: E731
    grads = torch.full((kidx.numel(), 3, H, hd), float("nan"), device=device)
    got = tri.kept_attention_backward(to(q), to(k), to(vd.transpose(1, 2)), to(out), d_out[kb, :, kt].float().to(device),
                                      kidx.to(device), rope=(cos.to(device), sin.to(device)), grads=grads,
                                      config=(16, 16, 4, 1))
    assert all(t.data_ptr() == grads[:, i].data_ptr() for i, t in enumerate(got))
    for name, i, ref in (("dq", 0, dq), ("dk", 1, dk), ("dv", 2, dv)):
        ref = ref.reshape(B * T, H, hd)[kidx]
        err = (grads[:, i].double().cpu() - ref).norm() / ref.norm()
        assert err < 1e-5, (name, float(err))


@requires_cuda
def test_kept_kernel_reads_the_fused_forward_log_sum_exp() -> None:
    """On the GPU the kernel takes cuDNN's (or flash's) log-sum-exp as given: the
    result must match the float64 dense backward as well as with it recomputed."""
    from sparsetrain.collider import triton_attention as tri
    from sparsetrain.collider.attention import attention_forward

    B, H, T, hd = 2, 4, 256, 128
    g = torch.Generator(device="cuda").manual_seed(fresh_seed())
    q, k, v = (torch.randn(B, T, H, hd, device="cuda", generator=g, dtype=torch.bfloat16).transpose(1, 2)
               for _ in range(3))
    out, saved = attention_forward(q, k, v)
    assert saved.flash is not None
    keep = torch.rand(B, T, device="cuda", generator=g) < 0.5
    keep[:, 0] = True
    kidx = torch.nonzero(keep.reshape(-1)).squeeze(1)
    kb, kt = kidx // T, kidx % T
    d_out = torch.zeros(B, H, T, hd, device="cuda", dtype=torch.float64)
    d_out[kb, :, kt] = torch.randn(kidx.numel(), H, hd, device="cuda", generator=g, dtype=torch.float64)
    qd, kd, vd = (t.double().requires_grad_(True) for t in (q, k, v))
    ref = torch.autograd.grad(F.scaled_dot_product_attention(qd, kd, vd, is_causal=True), (qd, kd, vd), d_out)
    do_k = d_out[kb, :, kt].to(torch.bfloat16)
    with_lse = tri.kept_attention_backward(q, k, v, out, do_k, kidx, saved.flash[1])
    recomputed = tri.kept_attention_backward(q, k, v, out, do_k, kidx, None)
    for name, a, b, r in zip(("dq", "dk", "dv"), with_lse, recomputed, ref):
        r = r[kb, :, kt]
        assert float((a.double() - r).norm() / r.norm()) < 2e-2, name  # bf16 inputs and products
        assert float((a.double() - b.double()).norm() / r.norm()) < 1e-2, name


def test_kernel_tuning_is_kept_on_disk(tmp_path, monkeypatch) -> None:
    """The fastest tile pair is found by timing each candidate, written to the
    cache folder, and read back (no timing) by a later process; a changed
    candidate list or an unreadable file means tuning again."""
    tri = pytest.importorskip("sparsetrain.collider.triton_attention")
    if not tri.available():
        pytest.skip("triton not installed")
    monkeypatch.setenv("SPARSETRAIN_CACHE", str(tmp_path))
    monkeypatch.setattr(tri, "_tuned", {})
    timed = []  # the (dq, dk/dv) tile pairs launched under the timer
    monkeypatch.setattr(tri, "_launch", lambda args, dq, kv: timed.append((dq, kv)))
    g = torch.Generator().manual_seed(fresh_seed())
    cost = {c: float(torch.rand((), generator=g)) for c in tri.DQ_CONFIGS + tri.KV_CONFIGS}

    def timer(launch):  # a pair "takes" the sum of its two tiles' costs
        launch()
        dq, kv = timed[-1]
        return cost[dq] + cost[kv]

    args = {"q": torch.empty(2, 3, 64, 32), "has_lse": True, "rope": True}
    choice = tri._tune(args, timer=timer)
    assert choice == (min(tri.DQ_CONFIGS, key=cost.get), min(tri.KV_CONFIGS, key=cost.get))
    assert len(timed) == len(tri.DQ_CONFIGS) + len(tri.KV_CONFIGS)
    assert (tmp_path / tri.TUNING_FILE).exists()

    def no_timing(launch):
        raise AssertionError("tuned again although the choice was on disk")

    monkeypatch.setattr(tri, "_tuned", {})  # a new process
    assert tri._tune(args, timer=no_timing) == choice
    monkeypatch.setattr(tri, "_tuned", {})
    monkeypatch.setattr(tri, "KV_CONFIGS", tri.KV_CONFIGS[:-1])  # other candidates: other key
    timed.clear()
    cost_kv = min(tri.KV_CONFIGS, key=cost.get)
    assert tri._tune(args, timer=timer)[1] == cost_kv and timed
    for junk in ("{not json", "[1, 2]", json.dumps({tri._tuning_key(args): "junk"})):  # unreadable: tune again
        (tmp_path / tri.TUNING_FILE).write_text(junk)
        monkeypatch.setattr(tri, "_tuned", {})
        timed.clear()
        assert tri._tune(args, timer=timer)[1] == cost_kv and timed


@pytest.mark.parametrize("variant", ["relu2", "relu2_24-hyper2-tied"])
def test_real_gradients_from_mtp_heads_and_hidden_states_join_at_kept_rows(variant: str) -> None:
    """Gradients from outside the Collider chain (MTP heads on the trunk, an extra
    loss on a block's hidden state at kept rows) are added at the kept rows of the
    boundary they reach: the result equals the reference with the same terms."""
    from sparsetrain.mtp import MTPHeads, head_targets, kept_rows_loss

    model = make(**VARIANTS[variant])
    heads = MTPHeads(model, 2, weight=0.3, decay=0.5).double()
    for p in heads.parameters():  # the zero init would make the heads trivial
        p.data.normal_(0.0, 0.2)
    g = torch.Generator().manual_seed(fresh_seed())
    B, T = 3, 20
    idx, targets = random_tokens(B, T, g)
    keep = random_keep(B, T, g)
    kidx = torch.nonzero(keep.reshape(-1)).squeeze(1)

    def hidden_loss(h: torch.Tensor) -> torch.Tensor:
        return 0.1 * (h.flatten(0, 1)[kidx] ** 2).mean()

    hidden: list[torch.Tensor] = []
    handle = model.blocks[1].register_forward_hook(lambda m, args, out: hidden.append(out))
    logits, trunk = ColliderModel(model)(idx, return_trunk=True)
    handle.remove()
    extra, _ = kept_rows_loss(model, heads, trunk, targets, keep)
    (masked_cross_entropy(logits, targets, keep) + extra + hidden_loss(hidden[0])).backward()
    got = {n: p.grad.clone() for n, p in [*model.named_parameters(), *heads.named_parameters()]}
    model.zero_grad(set_to_none=True)
    heads.zero_grad(set_to_none=True)

    ref_hidden: list[torch.Tensor] = []
    x = reference_trunk(model, idx, keep, hidden=ref_hidden)
    sel = keep & (targets != -100)
    ref = F.cross_entropy(model.lm_head(model.norm(x))[sel], targets[sel]) + hidden_loss(ref_hidden[1])
    for k in range(1, 3):
        t = head_targets(targets, k)
        m = keep & (t != -100)
        if m.any():
            ref = ref + heads.head_weight(k) * F.cross_entropy(model.lm_head(model.norm(heads.heads[k - 1](x)))[m], t[m])
    ref.backward()
    want = {n: p.grad for n, p in [*model.named_parameters(), *heads.named_parameters()]}
    assert_close(got, want, rtol=1e-6)


@pytest.mark.parametrize("variant", ["relu2", "swiglu-hyper2"])
def test_each_block_is_its_own_node_with_hooks_and_stride0_gradients(variant: str) -> None:
    """Per block and per backward: forward pre-hooks and full backward hooks fire
    once (the block is called through its __call__), every parameter's
    post-accumulate hook fires once, and a block's parameters are accumulated
    before the block below runs its backward (what FSDP2's reduce-scatter after
    each block needs). Between blocks autograd sees stride-0 zeros only: the
    compact rows travel beside it."""
    model = make(**VARIANTS[variant])
    L = len(model.blocks)
    events: list[tuple[str, int]] = []
    strides: list[tuple[int, ...]] = []
    for i, blk in enumerate(model.blocks):
        blk.register_forward_pre_hook(lambda m, a, i=i: events.append(("forward", i)))

        def backward_hook(m, grad_in, grad_out, i=i):
            events.append(("backward", i))
            strides.extend(t.stride() for t in (*grad_in, *grad_out) if t is not None)

        blk.register_full_backward_hook(backward_hook)
        for p in blk.parameters():
            p.register_post_accumulate_grad_hook(lambda p, i=i: events.append(("param", i)))
    n_params = [len(list(b.parameters())) for b in model.blocks]
    g = torch.Generator().manual_seed(fresh_seed())
    cm = ColliderModel(model)
    for _ in range(2):
        events.clear()
        strides.clear()
        idx, targets = random_tokens(2, 16, g)
        keep = random_keep(2, 16, g)
        logits = cm(idx)
        assert events == [("forward", i) for i in range(L)]
        events.clear()
        masked_cross_entropy(logits, targets, keep).backward()
        blocks_in_order = [i for _, i in events]
        assert blocks_in_order == sorted(blocks_in_order, reverse=True)  # block L-1 done before L-2 starts...
        for i in range(L):
            assert events.count(("backward", i)) == 1
            assert events.count(("param", i)) == n_params[i]
        assert strides and all(set(s) == {0} for s in strides), strides
        model.zero_grad(set_to_none=True)


@pytest.mark.parametrize("variant", ["relu2", "swiglu-hyper2"])
def test_zero_gradients_in_the_channel_are_never_gathered(variant: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The stride-0 zeros autograd carries (the loss's on the logits, the blocks'
    between them) are recognised as such: no node gathers their kept rows as if
    they were a gradient (for the logits that would be a [K, V] copy per step)."""
    from sparsetrain.collider.keep import KeptRows

    gathered = []
    rows = KeptRows.rows
    monkeypatch.setattr(KeptRows, "rows", lambda self, t: (gathered.append(t.stride()), rows(self, t))[1])
    model = make(**VARIANTS[variant])
    g = torch.Generator().manual_seed(fresh_seed())
    idx, targets = random_tokens(2, 16, g)
    keep = random_keep(2, 16, g)
    masked_cross_entropy(ColliderModel(model)(idx), targets, keep).backward()
    assert not [s for s in gathered if set(s) == {0}], gathered


def test_relu2_24_with_token_pruning_backpropagates_the_ffn_on_kept_rows() -> None:
    """relu2_24's weight gradients prune 2:4 along tokens in groups of four rows
    (of the FFN's permuted batch) with the densest features dense. Under Collider
    the FFN's backward is recomputed on the kept rows, so the groups are formed
    from kept rows: the gradients equal a reference whose FFN values are those
    of all tokens and whose FFN backward is that of the FFN called on the kept
    rows alone -- and differ from the all-rows grouping."""
    model = make("relu2_24", dense_fraction=0.25)
    g = torch.Generator().manual_seed(fresh_seed())
    B, T = 3, 20
    idx, targets = random_tokens(B, T, g)
    keep = random_keep(B, T, g)
    masked_cross_entropy(ColliderModel(model)(idx), targets, keep).backward()
    got = grads(model)
    reference_loss(model, idx, targets, keep, ffn_on_kept_rows=True).backward()
    assert_close(got, grads(model), rtol=1e-6)
    reference_loss(model, idx, targets, keep).backward()  # the FFN's backward on all rows
    all_rows = grads(model)
    err = max(float((got[n] - all_rows[n]).norm() / all_rows[n].norm()) for n in got if "ffn.up" in n or "ffn.down" in n)
    assert err > 1e-6


def test_relu2_24_recomputation_leaves_the_ffn_statistics_alone() -> None:
    """The recomputation on kept rows neither records statistics nor changes the
    backend record, and keeps only a few kept counts' permutations."""
    from sparsetrain.sparse24.ffn import RECOMPUTED_PERMUTATIONS

    model = make("relu2_24", n_layer=1)
    ffn = model.blocks[0].ffn
    g = torch.Generator().manual_seed(fresh_seed())
    ffn.track_stats = True
    cm = ColliderModel(model)
    for step in range(RECOMPUTED_PERMUTATIONS + 3):
        idx, targets = random_tokens(2, 16, g)
        keep = torch.zeros(2, 16, dtype=torch.bool)
        keep.view(-1)[: 3 + step] = True  # a new kept count every step
        logits = cm(idx)
        stats = ffn.last_stats
        masked_cross_entropy(logits, targets, keep).backward()
        assert ffn.last_stats is stats and ffn.track_stats  # as the forward on all 32 tokens left them
    assert 32 in ffn._perms and len(ffn._perms) == 1 + RECOMPUTED_PERMUTATIONS


def test_block_adapters_come_from_a_registry_by_class(monkeypatch: pytest.MonkeyPatch) -> None:
    """A block class without an adapter is refused when ColliderModel is built;
    a subclass of Block finds Block's adapter through its MRO unless it
    registers its own, which the engine then runs."""
    from sparsetrain.collider import blocks, register_block_adapter
    from sparsetrain.collider.gpt_block import GPTBlockAdapter
    from sparsetrain.model import Block

    monkeypatch.setattr(blocks, "_ADAPTERS", dict(blocks._ADAPTERS))
    model = make(n_layer=2)
    idx, targets = random_tokens(2, 12, torch.Generator().manual_seed(fresh_seed()))
    keep = random_keep(2, 12, torch.Generator().manual_seed(fresh_seed()))
    reference_loss(model, idx, targets, keep).backward()
    ref = grads(model)

    class MyBlock(Block):
        pass

    for blk in model.blocks:
        blk.__class__ = MyBlock
    assert isinstance(ColliderModel(model)._adapter(model.blocks[0]), GPTBlockAdapter)
    calls = []

    class Counting(GPTBlockAdapter):
        def backward(self, saved, grad, run):
            calls.append(grad.rows.shape)
            return super().backward(saved, grad, run)

    register_block_adapter(MyBlock, Counting)
    masked_cross_entropy(ColliderModel(model)(idx), targets, keep).backward()
    assert calls == [(int(keep.sum()), 16)] * 2  # compact [K, D] rows into each block
    assert_close(grads(model), ref, rtol=1e-6)
    model.blocks[1] = torch.nn.Identity()
    with pytest.raises(ValueError, match="no block adapter for Identity"):
        ColliderModel(model)


def test_second_backward_through_one_forward_is_refused() -> None:
    model = make(n_layer=1)
    idx, targets = random_tokens(2, 8, torch.Generator().manual_seed(fresh_seed()))
    loss = masked_cross_entropy(ColliderModel(model)(idx), targets, torch.ones(2, 8, dtype=torch.bool))
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="retain_graph is not supported"):
        loss.backward()


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=requires_cuda)])
@pytest.mark.parametrize("variant", ["relu2_24-noprune", "swiglu-hyper2"])
def test_bf16_composed_blocks_close_to_float64_reference(variant: str, device: str) -> None:
    """The composed path (relu2_24, hyper-connections) in bf16 autocast (on the
    GPU, and on the CPU, whose autocast also runs the GEMMs in bf16) is as close
    to the float64 reference as the plain autograd reference run in bf16 is, measured in multiples of bf16's rounding scale of each gradient
    (eps times the norm of the sum of its |terms|, gradient_magnitudes.py): the
    hyper-connection logits' gradients are small sums of large terms, so their
    relative error is rounding noise in any bf16 computation (it reached 0.1
    for the engine and 0.001 for plain autograd on one draw, with both at 2-13
    multiples of the scale). Gradients whose terms do not cancel (most) keep
    the relative bound, which is the stronger one for them."""
    model = make(n_layer=2, **VARIANTS[variant])
    g = torch.Generator().manual_seed(fresh_seed())
    idx, targets = random_tokens(2, 24, g)
    keep = random_keep(2, 24, g)
    with recording(model) as magnitudes:
        reference_loss(model, idx, targets, keep).backward()
    ref = grads(model)
    net = make(n_layer=2, **VARIANTS[variant]).float().to(device)
    net.load_state_dict({k: v.float() for k, v in model.state_dict().items()})
    idx, targets, keep = idx.to(device), targets.to(device), keep.to(device)
    with torch.autocast(device, dtype=torch.bfloat16):
        reference_loss(net, idx, targets, keep).backward()
    plain = {n: t.double().cpu() for n, t in grads(net).items()}
    with torch.autocast(device, dtype=torch.bfloat16):
        loss = masked_cross_entropy(ColliderModel(net)(idx), targets, keep)
    loss.backward()
    got = {n: t.double().cpu() for n, t in grads(net).items()}
    assert got.keys() == ref.keys()
    eps = torch.finfo(torch.bfloat16).eps
    for n in ref:
        terms = float(magnitudes[n].norm()) if n in magnitudes else 0.0
        if terms > 16 * float(ref[n].norm()):  # the terms cancel: errors in multiples of the rounding scale
            scale = eps * terms
            err, bf16 = float((got[n] - ref[n]).norm()) / scale, float((plain[n] - ref[n]).norm()) / scale
            assert err <= max(32.0, 3 * bf16), (n, err, bf16)
        else:
            err = float((got[n] - ref[n]).norm() / ref[n].norm())
            bf16 = float((plain[n] - ref[n]).norm() / ref[n].norm())
            assert err <= 3 * bf16 + 1e-2, (n, err, bf16)
