"""Decoding from a KV cache (sparsetrain.model.KVCache) against the whole
sequence's forward, in float64 on fresh random models and tokens: the trunk fed
in pieces equals the trunk fed whole, and sampling with the cache draws the
tokens a naive loop (the whole window's forward per token) draws."""

from __future__ import annotations

import random

import pytest
import torch

from sparsetrain.build import build_model
from sparsetrain.config import ModelConfig
from sparsetrain.generate import batchable, sample, sample_prompts
from sparsetrain.model import KVCache, rope_tables


def _model(seed: int, **over) -> torch.nn.Module:
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=300, seq_len=24, n_layer=3, n_head=2, d_model=32, **over)
    model = build_model(cfg).double().eval()
    with torch.no_grad():  # the init's residual scaling makes late layers tiny: stir every weight
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    return model


@pytest.mark.parametrize("over", [{}, {"ffn": "swiglu"}, {"hyper_connections": 2},
                                  {"hyper_connections": 2, "hyper_stream_dtype": "bfloat16"}],
                         ids=["relu2", "swiglu", "hyper2", "hyper2_bf16"])
def test_trunk_in_pieces_from_the_cache_equals_the_whole_sequence(over: dict) -> None:
    """The trunk over a prompt and then single tokens and chunks from the cache equals
    one forward of the whole sequence: to float64 rounding, or, with streams stored in
    bfloat16, to a few roundings of a value near a bfloat16 tie (a cache that served
    the wrong keys would be off by the values' own size)."""
    seed = random.randrange(2**31)
    model = _model(seed, **over)
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 300, (2, 24), generator=gen)
    with torch.no_grad():
        whole = model.trunk(ids)
        cache = KVCache(len(model.blocks))
        pieces, at = [], 0
        for size in (5, 1, 1, 3, 1, 13):  # a prompt, single tokens, chunks: 24 in all
            pieces.append(model.trunk(ids[:, at : at + size], cache=cache))
            at += size
        assert cache.length == 24
        err = (torch.cat(pieces, 1) - whole).abs().max().item()
    tol = 2e-2 if over.get("hyper_stream_dtype") == "bfloat16" else 1e-10
    assert err < tol * whole.abs().max().item(), (seed, err)
    with pytest.raises(ValueError, match="exceeds the model's seq_len"):
        model.trunk(ids[:, :1], cache=cache)


def _naive_sample(model, prompt: list[int], n: int, temperature: float, top_k: int, gen: torch.Generator) -> list[int]:
    """The definition: every token from the whole window's forward (the last seq_len ids)."""
    ids = list(prompt)
    for _ in range(n):
        with torch.no_grad():
            logits, _ = model(torch.tensor([ids[-model.config.seq_len :]]))
        logits = logits[0, -1].float()
        if temperature <= 0:
            ids.append(int(logits.argmax()))
            continue
        logits = logits / temperature
        if 0 < top_k < logits.numel():
            logits = logits.masked_fill(logits < torch.topk(logits, top_k).values[-1], float("-inf"))
        ids.append(int(torch.multinomial(torch.softmax(logits, -1), 1, generator=gen)))
    return ids[len(prompt) :]


@pytest.mark.parametrize("temperature, top_k", [(0.0, 0), (1.0, 0), (0.8, 10)])
@pytest.mark.parametrize("prompt_len", [1, 9, 30], ids=["short", "mid", "past-window"])
def test_sampling_with_the_cache_draws_what_the_whole_window_draws(temperature: float, top_k: int,
                                                                   prompt_len: int) -> None:
    """20 new tokens: from a 9-token prompt the context passes seq_len (24) midway
    and the window starts to slide; a 30-token prompt starts past it."""
    seed = random.randrange(2**31)
    model = _model(seed)
    prompt = torch.randint(0, 300, (prompt_len,), generator=torch.Generator().manual_seed(seed)).tolist()
    got = sample(model, prompt, 20, temperature, top_k, torch.Generator().manual_seed(seed))
    want = _naive_sample(model, prompt, 20, temperature, top_k, torch.Generator().manual_seed(seed))
    assert got == want, seed


def _transposable_model(seed: int) -> torch.nn.Module:
    return _model(seed, ffn="relu2_24", activation_sparse_method="transposable", activation_dense_warmup_steps=0)


def test_an_ffn_that_couples_tokens_turns_the_cache_off() -> None:
    """The transposable 2:4 methods choose patterns over tiles spanning 4 tokens: a token
    decoded alone is not what the whole window gives it, so sampling recomputes the window."""
    seed = random.randrange(2**31)
    model = _transposable_model(seed)
    assert model.blocks[0].ffn.sparse and not model.supports_kv_cache
    assert _model(seed, ffn="relu2_24", activation_sparse_method="naive",
                  activation_dense_warmup_steps=0).supports_kv_cache
    prompt = torch.randint(0, 300, (9,), generator=torch.Generator().manual_seed(seed)).tolist()
    assert sample(model, prompt, 10, 0.0, 0) == _naive_sample(model, prompt, 10, 0.0, 0, None), seed


def test_a_cache_runs_every_block() -> None:
    model = _model(0)
    with pytest.raises(ValueError, match="runs every one"):
        model.trunk(torch.zeros(1, 2, dtype=torch.long), n_layers=1, cache=KVCache(len(model.blocks)))
    with pytest.raises(ValueError, match="runs every one"):
        model.trunk(torch.zeros(1, 2, dtype=torch.long), cache=KVCache(1))


def test_a_stop_rule_cuts_the_same_draws_at_its_checks() -> None:
    """``stop`` is asked after every ``check_every`` tokens: the sample is the unstopped
    one's prefix up to the first check where it says stop."""
    seed = random.randrange(2**31)
    model = _model(seed)
    prompt = torch.randint(0, 300, (5,), generator=torch.Generator().manual_seed(seed)).tolist()
    full = sample(model, prompt, 40, 1.0, 0, torch.Generator().manual_seed(seed))
    asked: list[int] = []

    def stop(new: list[int]) -> bool:
        asked.append(len(new))
        return len(new) >= 20

    cut = sample(model, prompt, 40, 1.0, 0, torch.Generator().manual_seed(seed), stop=stop, check_every=8)
    assert asked == [8, 16, 24] and cut == full[:24], seed


@pytest.mark.parametrize("temperature, top_k", [(0.0, 0), (1.0, 0), (0.8, 10)])
@pytest.mark.parametrize("prompt_len", [1, 9, 30], ids=["short", "mid", "past-window"])
def test_rows_decoded_together_draw_what_each_row_draws_alone(temperature: float, top_k: int, prompt_len: int) -> None:
    """Three continuations of one prompt in one batch: row r is the naive whole-window
    loop with row r's generator (float64: the batched products round as the single ones)."""
    seed = random.randrange(2**31)
    model = _model(seed)
    prompt = torch.randint(0, 300, (prompt_len,), generator=torch.Generator().manual_seed(seed)).tolist()
    got = sample_prompts(model, [prompt] * 3, [torch.Generator().manual_seed(seed + r) for r in range(3)], 20, temperature,
                         top_k)
    want = [_naive_sample(model, prompt, 20, temperature, top_k, torch.Generator().manual_seed(seed + r))
            for r in range(3)]
    assert got == want, seed
    if temperature > 0:  # the rows draw apart (a failure here would mean one generator fed every row)
        assert len({tuple(r) for r in got}) > 1, seed


def _exact_rope(model: torch.nn.Module) -> torch.nn.Module:
    """RoPE tables computed and kept in float64: the stored float32 tables make a score
    depend on the absolute positions at ~1e-7, which a padded row's shift would show."""
    c = model.config
    model.rope_cos, model.rope_sin = rope_tables(c.seq_len, c.head_dim, c.rope_theta, torch.float64)
    return model


@pytest.mark.parametrize("temperature, top_k", [(0.0, 0), (1.0, 0), (0.8, 10)])
@pytest.mark.parametrize("over", [{}, {"hyper_connections": 2}], ids=["gpt", "hyper2"])
def test_prompts_of_unequal_lengths_left_padded_draw_what_each_draws_alone(temperature: float, top_k: int,
                                                                          over: dict) -> None:
    """Prompts of 1 to 9 tokens in one batch, the short ones left-padded and their
    padding masked: each row is the naive whole-window loop of its own prompt."""
    seed = random.randrange(2**31)
    model = _exact_rope(_model(seed, **over))
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(0, 300, (n,), generator=g).tolist() for n in (9, 1, 4, 9, 6)]
    assert batchable(model, [len(p) for p in prompts], 12)  # 9 + 12 <= seq_len 24: no slide
    got = sample_prompts(model, prompts, [torch.Generator().manual_seed(seed + r) for r in range(5)], 12,
                         temperature, top_k)
    want = [_naive_sample(model, p, 12, temperature, top_k, torch.Generator().manual_seed(seed + r))
            for r, p in enumerate(prompts)]
    assert got == want, seed


def test_padded_rows_get_the_logits_they_get_alone() -> None:
    """The trunk over a left-padded batch from a cache: each row's real positions equal
    its own prompt's forward (float64, to rounding), prompt and decoded token alike."""
    seed = random.randrange(2**31)
    model = _exact_rope(_model(seed))
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(0, 300, (n,), generator=g).tolist() for n in (7, 2, 5)]
    nxt = torch.randint(0, 300, (3, 1), generator=g)
    pad = torch.tensor([0, 5, 2])
    ids = torch.tensor([[p[0]] * int(k) + p for p, k in zip(prompts, pad)])
    with torch.no_grad():
        cache = KVCache(len(model.blocks), pad)
        first = model.trunk(ids, cache=cache)
        second = model.trunk(nxt, cache=cache)[:, 0]
        for r, p in enumerate(prompts):
            alone = model.trunk(torch.tensor([p + [int(nxt[r])]]))[0]
            scale = alone.abs().max().item()
            assert (first[r, int(pad[r]) :] - alone[:-1]).abs().max().item() < 1e-10 * scale, seed
            assert (second[r] - alone[-1]).abs().max().item() < 1e-10 * scale, seed


def test_a_prompt_that_would_slide_is_sampled_alone() -> None:
    """A prompt whose continuation would pass seq_len is not padded into the batch
    (the window would slide the rows apart): it is sampled alone, the others
    together, each still the naive loop's draws. A model without a cache pads none."""
    seed = random.randrange(2**31)
    model = _model(seed)
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(0, 300, (n,), generator=g).tolist() for n in (3, 20, 7, 5)]
    assert not batchable(model, [3, 20, 7, 5], 8) and batchable(model, [20, 20], 8) and batchable(model, [3, 7, 5], 8)
    got = sample_prompts(model, prompts, [torch.Generator().manual_seed(seed + r) for r in range(4)], 8, 1.0, 0)
    assert got == [_naive_sample(model, p, 8, 1.0, 0, torch.Generator().manual_seed(seed + r))
                   for r, p in enumerate(prompts)], seed
    assert not batchable(_transposable_model(seed), [5, 3], 4)


def test_a_model_that_couples_tokens_samples_every_row_alone() -> None:
    """The transposable 2:4 FFNs choose patterns over tokens of every row of a call:
    rows decoded together would change each other's draws, so even copies of one
    prompt are sampled one by one, each the naive loop's draws."""
    seed = random.randrange(2**31)
    model = _transposable_model(seed)
    assert model.couples_tokens and not batchable(model, [6, 6], 5) and batchable(model, [6], 5)
    prompt = torch.randint(0, 300, (6,), generator=torch.Generator().manual_seed(seed)).tolist()
    got = sample_prompts(model, [prompt] * 3, [torch.Generator().manual_seed(seed + r) for r in range(3)], 5, 1.0, 0)
    assert got == [_naive_sample(model, prompt, 5, 1.0, 0, torch.Generator().manual_seed(seed + r))
                   for r in range(3)], seed


def test_every_query_of_a_padded_batch_attends_to_something() -> None:
    """A padding position attends to itself alone: an attention row with every key
    masked is NaN in some kernels, and a NaN value times a zero weight stays NaN."""
    pad = torch.tensor([0, 3, 5, 1])
    cache = KVCache(1, pad)
    for end, new in ((6, 6), (7, 1), (9, 2)):
        mask = cache.key_mask(end, new, pad.device)[:, 0]  # [B, new, end]
        assert mask.shape == (4, new, end) and bool(mask.any(-1).all())
        for b in range(4):
            for q in range(new):
                pos = end - new + q
                want = [k <= pos and (k >= pad[b] or k == pos) for k in range(end)]
                assert mask[b, q].tolist() == want, (end, new, b, q)


def test_each_row_stops_by_its_own_rule() -> None:
    """A row stops at the first check where ``stop`` says so for its own tokens, cut
    there; the others go on; the loop ends once every row has stopped."""
    seed = random.randrange(2**31)
    model = _model(seed)
    prompt = torch.randint(0, 300, (5,), generator=torch.Generator().manual_seed(seed)).tolist()
    gens = lambda: [torch.Generator().manual_seed(seed + r) for r in range(4)]  # noqa: E731
    full = sample_prompts(model, [prompt] * 4, gens(), 40, 1.0, 0)
    asked: list[int] = []

    def stop(new: list[int]) -> bool:
        asked.append(len(new))
        return len(new) >= (8 if new[0] % 2 == 0 else 16)

    cut = sample_prompts(model, [prompt] * 4, gens(), 40, 1.0, 0, stop=stop, check_every=8)
    assert cut == [row[: 8 if row[0] % 2 == 0 else 16] for row in full], seed
    last = max(8 if row[0] % 2 == 0 else 16 for row in full)
    assert max(asked) == last and sum(1 for a in asked if a == 8) == 4, (seed, asked)  # no check after the last stop
    with pytest.raises(ValueError, match="at least one prompt"):
        sample_prompts(model, [], [], 4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_the_cache_on_cuda_under_bf16_autocast_matches_the_whole_sequence() -> None:
    """On CUDA, 16-bit RoPE runs the fused Triton kernel on the cache's position slice
    of the tables; the pieces must match the whole sequence as closely as bf16 allows."""
    seed = random.randrange(2**31)
    model = _model(seed).float().cuda()
    ids = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(seed)).cuda()
    with torch.no_grad(), torch.autocast("cuda", torch.bfloat16):
        whole = model.trunk(ids).float()
        cache = KVCache(len(model.blocks))
        pieces = [model.trunk(ids[:, a:b], cache=cache).float() for a, b in ((0, 7), (7, 8), (8, 9), (9, 24))]
    err = (torch.cat(pieces, 1) - whole).abs().max().item()
    assert err < 0.05 * whole.abs().max().item(), (seed, err)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_padded_rows_on_cuda_under_bf16_autocast_match_their_own_forward() -> None:
    """The padding mask on CUDA (a boolean mask for SDPA's kernels under autocast):
    each row's real positions match its own prompt's forward as closely as bf16 allows."""
    seed = random.randrange(2**31)
    model = _model(seed).float().cuda()
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(0, 300, (n,), generator=g).tolist() for n in (9, 3, 6)]
    pad = torch.tensor([0, 6, 3], device="cuda")
    ids = torch.tensor([[p[0]] * int(k) + p for p, k in zip(prompts, pad)], device="cuda")
    with torch.no_grad(), torch.autocast("cuda", torch.bfloat16):
        batch = model.trunk(ids, cache=KVCache(len(model.blocks), pad)).float()
        for r, p in enumerate(prompts):
            alone = model.trunk(torch.tensor([p], device="cuda")).float()[0]
            err = (batch[r, int(pad[r]) :] - alone).abs().max().item()
            assert err < 0.05 * alone.abs().max().item(), (seed, r, err)
