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
from sparsetrain.generate import sample, sample_rows
from sparsetrain.model import KVCache


def _model(seed: int, **over) -> torch.nn.Module:
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=300, seq_len=24, n_layer=3, n_head=2, d_model=32, **over)
    model = build_model(cfg).double().eval()
    with torch.no_grad():  # the init's residual scaling makes late layers tiny: stir every weight
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    return model


@pytest.mark.parametrize("over", [{}, {"ffn": "swiglu"}, {"hyper_connections": 2}], ids=["relu2", "swiglu", "hyper2"])
def test_trunk_in_pieces_from_the_cache_equals_the_whole_sequence(over: dict) -> None:
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
    assert err < 1e-10 * whole.abs().max().item(), (seed, err)
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
    got = sample_rows(model, prompt, [torch.Generator().manual_seed(seed + r) for r in range(3)], 20, temperature, top_k)
    want = [_naive_sample(model, prompt, 20, temperature, top_k, torch.Generator().manual_seed(seed + r))
            for r in range(3)]
    assert got == want, seed
    if temperature > 0:  # the rows draw apart (a failure here would mean one generator fed every row)
        assert len({tuple(r) for r in got}) > 1, seed


def test_each_row_stops_by_its_own_rule() -> None:
    """A row stops at the first check where ``stop`` says so for its own tokens, cut
    there; the others go on; the loop ends once every row has stopped."""
    seed = random.randrange(2**31)
    model = _model(seed)
    prompt = torch.randint(0, 300, (5,), generator=torch.Generator().manual_seed(seed)).tolist()
    gens = lambda: [torch.Generator().manual_seed(seed + r) for r in range(4)]  # noqa: E731
    full = sample_rows(model, prompt, gens(), 40, 1.0, 0)
    asked: list[int] = []

    def stop(new: list[int]) -> bool:
        asked.append(len(new))
        return len(new) >= (8 if new[0] % 2 == 0 else 16)

    cut = sample_rows(model, prompt, gens(), 40, 1.0, 0, stop=stop, check_every=8)
    assert cut == [row[: 8 if row[0] % 2 == 0 else 16] for row in full], seed
    last = max(8 if row[0] % 2 == 0 else 16 for row in full)
    assert max(asked) == last and sum(1 for a in asked if a == 8) == 4, (seed, asked)  # no check after the last stop
    with pytest.raises(ValueError, match="at least one row"):
        sample_rows(model, prompt, [], 4)


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
