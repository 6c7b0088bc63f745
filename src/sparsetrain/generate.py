"""Sampling text from a trained run."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable

import torch

from .checkpoint import WEIGHTS_NAME, Weights, load_checkpoint_from, load_weights, warn
from .config import ModelConfig
from .errors import CheckpointError, ConfigError
from .build import build_model
from .model import GPT, CausalLM, KVCache
from .tokenizer import BPETokenizer


def model_from_tensors(model_config: dict[str, Any], tensors: dict[str, torch.Tensor], where: str,
                       device: str | torch.device) -> GPT:
    """The network ``model_config`` describes with ``tensors`` loaded, on ``device``, in
    eval mode; :class:`CheckpointError` naming ``where`` when they do not fit."""
    try:
        cfg = ModelConfig(**model_config)
    except TypeError as e:
        raise CheckpointError(f"checkpoint {where} has an unknown model config: {e}") from None
    model = build_model(cfg)
    try:
        model.load_state_dict(tensors)
    except RuntimeError as e:
        raise CheckpointError(f"weights in {where} do not fit the model they describe: {str(e).splitlines()[0][:200]}") from None
    return model.to(device).eval()


def load_model_weights(ckpt: str | Path, device: str | torch.device = "cpu") -> tuple[Weights, Path]:
    """The weights a run was trained to, with the model config and step they were saved
    with, and the file (or, for an FSDP run's sharded checkpoint, the run directory)
    they came from.

    ``ckpt`` is a run directory, its weights-only ``model.safetensors`` or a full
    checkpoint (``ckpt.pt``). A run directory is read from its weights-only file
    (a third of the full checkpoint: no optimizer state); where that file is
    missing (runs written before it existed) or damaged, from the full checkpoint:
    ``ckpt.pt``, or the sharded checkpoint of an FSDP run when that is the newer
    one, consolidated here in one process."""
    p = Path(ckpt)
    weights = p / WEIGHTS_NAME if p.is_dir() else p if p.suffix == ".safetensors" else None
    if weights is not None and (weights.is_file() or not p.is_dir()):
        try:
            return load_weights(weights, device), weights
        except CheckpointError as e:
            if not p.is_dir():
                raise
            warn(f"{e}; loading the weights from the full checkpoint instead")
    if p.is_dir():
        from .sharded_checkpoint import consolidate_sharded, resume_from_sharded

        if resume_from_sharded(p):
            state = consolidate_sharded(p, with_optimizer=False)
            return Weights(state["model"], state["model_config"], int(state.get("step", 0))), p
    state, file = load_checkpoint_from(p, map_location=device)
    return Weights(state["model"], state["model_config"], int(state.get("step", 0))), file


def run_directory(ckpt: str | Path) -> Path:
    """The run directory ``ckpt`` names (itself, or the folder of its ``ckpt.pt`` or
    ``model.safetensors``): where its tokenizer, config and metrics are. The weights
    are read from ``ckpt`` by :func:`load_model`, which picks the newest of the run's
    (a run directory's ``ckpt.pt`` alone may be older than its sharded checkpoint)."""
    from .checkpoint import CKPT_NAME, PREVIOUS_CKPT_NAME
    from .sharded_checkpoint import has_sharded_checkpoint

    p = Path(ckpt)
    if not p.exists() or (p.is_dir() and not any((p / f).is_file() for f in (WEIGHTS_NAME, CKPT_NAME, PREVIOUS_CKPT_NAME))
                          and not has_sharded_checkpoint(p)):
        raise CheckpointError(f"no checkpoint at {ckpt}")
    return p if p.is_dir() else p.parent


def load_model(ckpt: str | Path, device: str | torch.device = "cpu") -> GPT:
    """Rebuild the network (GPT or ResNet-BK) a run was trained with and load its weights
    (read as :func:`load_model_weights` reads them)."""
    w, where = load_model_weights(ckpt, device)
    return model_from_tensors(w.model_config, w.tensors, str(where if where.suffix == ".safetensors" else ckpt), device)


def check_sampling(max_new_tokens: int, temperature: float, top_k: int) -> None:
    """Refuse sampling settings that mean nothing (:class:`ConfigError`, naming the value)."""
    if max_new_tokens < 1:
        raise ConfigError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if not (math.isfinite(temperature) and temperature >= 0):
        raise ConfigError(f"temperature must be a number >= 0 (0 = greedy), got {temperature}")
    if top_k < 0:
        raise ConfigError(f"top_k must be >= 0 (0 = no top-k cut), got {top_k}")


@torch.no_grad()
def sample(
    model: CausalLM,
    prompt_ids: list[int],
    max_new_tokens: int,
    temperature: float = 0.8,
    top_k: int = 50,
    generator: torch.Generator | None = None,
    stop: Callable[[list[int]], bool] | None = None,
    check_every: int = 16,
) -> list[int]:
    """Autoregressive sampling (temperature 0 = greedy, ``top_k`` 0 = no cut), cropping
    the context to the model's ``seq_len``. ``stop(new_ids)``, asked after every
    ``check_every`` new tokens (one host sync each), ends the sampling early.

    A model with ``supports_kv_cache`` (the GPT) reads the prompt once and then one
    token per step from a :class:`~sparsetrain.model.KVCache`; once the context
    passes ``seq_len`` its window slides, every position moves, and each step
    recomputes the last ``seq_len`` tokens whole, as models without a cache always
    do. Both give the logits of the whole window's forward (a test holds them to it)."""
    return sample_prompts(model, [prompt_ids], [generator], max_new_tokens, temperature, top_k, stop, check_every)[0]


def batchable(model: CausalLM, prompt_lengths: list[int], max_new_tokens: int) -> bool:
    """Whether prompts of these lengths decode as one batch: never more than one
    where the model couples the tokens of a call (rows would change each other's
    samples); prompts of one length always otherwise; unequal ones, left-padded,
    only from a KV cache (a padding mask; the recomputed window has none) and
    without the window sliding (the padded rows' positions would slide apart)."""
    if model.couples_tokens:
        return len(prompt_lengths) <= 1
    if len(set(prompt_lengths)) <= 1:
        return True
    return model.supports_kv_cache and max(prompt_lengths) + max_new_tokens <= model.config.seq_len


def _batches(model: CausalLM, prompt_lengths: list[int], max_new_tokens: int) -> list[list[int]]:
    """The rows of a batch that :func:`batchable` refuses, split into batches it
    takes: each row alone where the tokens couple; else the prompts that fit the
    window with their continuation together (from a cache), the rest by length."""
    groups: dict[object, list[int]] = {}
    for r, n in enumerate(prompt_lengths):
        if model.couples_tokens:
            key: object = ("row", r)
        elif model.supports_kv_cache and n + max_new_tokens <= model.config.seq_len:
            key = "fits"
        else:
            key = ("length", n)
        groups.setdefault(key, []).append(r)
    return list(groups.values())


@torch.no_grad()
def sample_prompts(
    model: CausalLM,
    prompts: list[list[int]],
    generators: list[torch.Generator | None],
    max_new_tokens: int,
    temperature: float = 0.8,
    top_k: int = 50,
    stop: Callable[[list[int]], bool] | None = None,
    check_every: int = 16,
) -> list[list[int]]:
    """A continuation of each prompt, decoded together as a batch: one forward per
    step for all rows where :func:`sample` runs one per row. Prompts of unequal
    lengths are left-padded, their padding masked in the KV cache
    (:class:`~sparsetrain.model.KVCache`); where that cannot be (:func:`batchable`:
    a prompt whose continuation would pass ``seq_len``, a model without a cache,
    one that couples tokens) the rows go in the batches :func:`_batches` forms.
    Row ``r`` draws only from ``generators[r]`` and stops by its own ``stop``, so
    it is :func:`sample` of ``prompts[r]`` with that generator (up to the float
    rounding of batched products and shifted positions; equal in float64, a test
    checks). The loop ends when every row has stopped or
    at ``max_new_tokens``; a row that stopped earlier is cut where it stopped."""
    check_sampling(max_new_tokens, temperature, top_k)
    if not prompts or len(prompts) != len(generators):
        raise ValueError(f"sample_prompts needs one generator (or None) per prompt and at least one prompt, "
                         f"got {len(prompts)} prompts and {len(generators)} generators")
    lengths = [len(p) for p in prompts]
    if min(lengths) < 1:
        raise ValueError("every prompt needs at least one token")
    if not batchable(model, lengths, max_new_tokens):
        out: list[list[int]] = [[] for _ in prompts]
        for rows in _batches(model, lengths, max_new_tokens):
            got = sample_prompts(model, [prompts[r] for r in rows], [generators[r] for r in rows], max_new_tokens,
                                 temperature, top_k, stop, check_every)
            for r, row in zip(rows, got):
                out[r] = row
        return out
    rows = len(prompts)
    device = next(model.parameters()).device
    window = model.config.seq_len
    width = max(lengths)
    pad = [width - n for n in lengths]
    # the padding token is never attended to; any id in the vocabulary will do
    ids = torch.tensor([[p[0]] * k + p for p, k in zip(prompts, pad)], dtype=torch.long, device=device)
    cache = None
    if model.supports_kv_cache:
        cache = KVCache(len(model.blocks), torch.tensor(pad, device=device) if any(pad) else None)
    stopped_at: list[int | None] = [None] * rows
    for n in range(1, max_new_tokens + 1):
        if cache is not None and ids.shape[1] <= window:
            hidden = model.trunk(ids[:, cache.length :], cache=cache)[:, -1]
        else:
            hidden = model.trunk(ids[:, -window:])[:, -1]
        logits = model.lm_head(model.norm(hidden)).float()
        if temperature <= 0:
            nxt = logits.argmax(-1, keepdim=True)
        else:
            logits = logits / temperature
            if 0 < top_k < logits.shape[-1]:
                kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            probs = torch.softmax(logits, -1)
            nxt = torch.cat([torch.multinomial(probs[r], 1, generator=g) for r, g in enumerate(generators)])[:, None]
        ids = torch.cat([ids, nxt], dim=1)
        if stop is not None and n % check_every == 0 and n < max_new_tokens:
            new = ids[:, width:].tolist()
            for r in range(rows):
                if stopped_at[r] is None and stop(new[r]):
                    stopped_at[r] = n
            if all(s is not None for s in stopped_at):
                break
    new = ids[:, width:].tolist()
    return [row[:s] if s is not None else row for row, s in zip(new, stopped_at)]


def generate_text(
    run: str | Path,
    prompt: str = "",
    max_new_tokens: int = 200,
    temperature: float = 0.8,
    top_k: int = 50,
    seed: int = 0,
    device: str = "cpu",
) -> str:
    """Load a run (its directory, or a checkpoint or weights file in it, next to
    its tokenizer.json) and continue ``prompt``."""
    return generate_texts(run, prompt, 1, max_new_tokens, temperature, top_k, seed, device)[0]


def generate_texts(
    run: str | Path,
    prompt: str = "",
    num_samples: int = 1,
    max_new_tokens: int = 200,
    temperature: float = 0.8,
    top_k: int = 50,
    seed: int = 0,
    device: str = "cpu",
) -> list[str]:
    """``num_samples`` continuations of ``prompt`` by a run (as :func:`generate_text`),
    decoded as one batch; sample ``i`` is what ``seed + i`` gives alone."""
    check_sampling(max_new_tokens, temperature, top_k)
    if num_samples < 1:
        raise ConfigError(f"num_samples must be >= 1, got {num_samples}")
    run = Path(run)
    folder = run if run.is_dir() else run.parent
    model = load_model(run, device)
    tok_path = folder / "tokenizer.json"
    if not tok_path.is_file():
        raise CheckpointError(f"no tokenizer.json in {folder} (a run on .bin tokens needs --tokenizer to sample text)")
    tok = BPETokenizer.load(tok_path)
    ids = [tok.eot_id] + tok.encode(prompt)
    gens = [torch.Generator(device=device).manual_seed(seed + i) for i in range(num_samples)]
    return [prompt + tok.decode(out)
            for out in sample_prompts(model, [ids] * num_samples, gens, max_new_tokens, temperature, top_k)]
