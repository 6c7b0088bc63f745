"""Sampling text from a trained checkpoint."""

from __future__ import annotations

from pathlib import Path

import torch

from .checkpoint import resolve_checkpoint, load_checkpoint
from .config import ModelConfig
from .errors import CheckpointError
from .build import build_model
from .model import GPT
from .tokenizer import BPETokenizer


def load_model(ckpt: str | Path, device: str | torch.device = "cpu") -> GPT:
    """Rebuild the network (GPT or ResNet-BK) a checkpoint was saved from and load its weights."""
    state = load_checkpoint(ckpt, map_location=device)
    try:
        cfg = ModelConfig(**state["model_config"])
    except TypeError as e:
        raise CheckpointError(f"checkpoint {ckpt} has an unknown model config: {e}") from None
    model = build_model(cfg)
    model.load_state_dict(state["model"])
    return model.to(device).eval()


@torch.no_grad()
def sample(
    model: GPT,
    prompt_ids: list[int],
    max_new_tokens: int,
    temperature: float = 0.8,
    top_k: int = 50,
    generator: torch.Generator | None = None,
) -> list[int]:
    """Autoregressive sampling (temperature 0 = greedy), cropping the context
    to the model's ``seq_len``."""
    device = next(model.parameters()).device
    ids = torch.tensor([prompt_ids], dtype=torch.long, device=device)
    for _ in range(max_new_tokens):
        logits, _ = model(ids[:, -model.config.seq_len :])
        logits = logits[0, -1].float()
        if temperature <= 0:
            nxt = logits.argmax().view(1)
        else:
            logits = logits / temperature
            if 0 < top_k < logits.numel():
                kth = torch.topk(logits, top_k).values[-1]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            nxt = torch.multinomial(torch.softmax(logits, -1), 1, generator=generator)
        ids = torch.cat([ids, nxt.view(1, 1)], dim=1)
    return ids[0, len(prompt_ids) :].tolist()


def generate_text(
    run: str | Path,
    prompt: str = "",
    max_new_tokens: int = 200,
    temperature: float = 0.8,
    top_k: int = 50,
    seed: int = 0,
    device: str = "cpu",
) -> str:
    """Load a run directory (checkpoint + tokenizer.json) and continue ``prompt``."""
    ckpt = resolve_checkpoint(run)
    model = load_model(ckpt, device)
    tok_path = ckpt.parent / "tokenizer.json"
    if not tok_path.is_file():
        raise CheckpointError(f"no tokenizer.json in {ckpt.parent} (a run on .bin tokens needs --tokenizer to sample text)")
    tok = BPETokenizer.load(tok_path)
    ids = [tok.eot_id] + tok.encode(prompt)
    gen = torch.Generator(device=device).manual_seed(seed)
    out = sample(model, ids, max_new_tokens, temperature, top_k, gen)
    return prompt + tok.decode(out)
