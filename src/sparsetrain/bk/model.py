"""ResNet-BK language model: the GPT's interface (``trunk``, ``hidden_states``,
``forward(idx, targets)``, ``lm_head``) with every attention+FFN block replaced
by ``x + BKLayer(RMSNorm(x))``. Token mixing comes only from the causal
BK-Core resolvent, so no position embedding is needed: ``G^(i)_ii`` already
depends on how many positions precede ``i``.

``ModelConfig`` fields used: ``vocab_size, seq_len, n_layer, d_model, ffn_hidden,
norm_eps, init_std`` and the ``bk_*`` fields (experts, sparsity and its loss).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ..config import ModelConfig, require
from ..model import CausalLM, RMSNorm
from .layers import SPARSITY_LOSSES, MoEResNetBKLayer, SparseMoEResNetBKLayer


def check_model_config(cfg: ModelConfig) -> None:
    """The config fields ResNet-BK owns (``model.bk_*``), and what ``arch = resnet_bk`` needs."""
    require(cfg.bk_num_experts >= 1, f"model.bk_num_experts must be >= 1, got {cfg.bk_num_experts}")
    require(0 <= cfg.bk_sparsity < 1, f"model.bk_sparsity must be in [0, 1), got {cfg.bk_sparsity}")
    require(cfg.bk_sparsity_loss in SPARSITY_LOSSES,
            f"model.bk_sparsity_loss must be one of {', '.join(SPARSITY_LOSSES)}, got {cfg.bk_sparsity_loss!r}")
    require(cfg.bk_sparsity_loss_weight >= 0, f"model.bk_sparsity_loss_weight must be >= 0, got {cfg.bk_sparsity_loss_weight}")
    require(cfg.bk_sparsity_warmup_steps >= 0, f"model.bk_sparsity_warmup_steps must be >= 0, got {cfg.bk_sparsity_warmup_steps}")
    require(cfg.bk_tau > 0, f"model.bk_tau must be > 0, got {cfg.bk_tau}")
    if cfg.arch == "resnet_bk":
        require(cfg.ffn == "relu2", f"model.arch = resnet_bk uses its own squared-ReLU experts; model.ffn must be relu2, got {cfg.ffn!r}")
        require(not cfg.hyper_connections, "model.arch = resnet_bk does not support hyper_connections")


class BKBlock(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        hidden = cfg.hidden_size
        if cfg.bk_sparsity > 0:
            self.layer: MoEResNetBKLayer = SparseMoEResNetBKLayer(
                cfg.d_model, hidden, cfg.bk_num_experts, target_sparsity=cfg.bk_sparsity,
                sparsity_loss=cfg.bk_sparsity_loss, sparsity_loss_weight=cfg.bk_sparsity_loss_weight,
                tau=cfg.bk_tau, schedule_steps=cfg.bk_sparsity_warmup_steps)
        else:
            self.layer = MoEResNetBKLayer(cfg.d_model, hidden, cfg.bk_num_experts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.layer(self.norm(x))


class ResNetBK(CausalLM):
    """Embedding -> n_layer x BKBlock -> RMSNorm -> LM head (causal throughout)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        cfg.validate()
        self.config = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(BKBlock(cfg) for _ in range(cfg.n_layer))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        nn.init.normal_(self.embed.weight, 0.0, cfg.init_std)
        nn.init.normal_(self.lm_head.weight, 0.0, cfg.init_std)

    def sparse_layers(self) -> list[SparseMoEResNetBKLayer]:
        return [b.layer for b in self.blocks if isinstance(b.layer, SparseMoEResNetBKLayer)]

    def aux_loss(self) -> torch.Tensor | None:
        """Sum of the sparse layers' sparsity losses from the last forward (None when dense)."""
        layers = self.sparse_layers()
        return sum(layer.get_sparsity_loss() for layer in layers) if layers else None  # type: ignore[return-value]

    def sparsity_stats(self, sync: bool = True) -> dict[str, float]:
        """Mean of the sparse layers' :meth:`get_sparsity_stats` (empty when dense);
        ``sync=False`` may leave device tensors in it (see there)."""
        stats = [layer.get_sparsity_stats(sync) for layer in self.sparse_layers()]
        return {k: sum(s[k] for s in stats) / len(stats) for k in stats[0]} if stats else {}

    def trunk(self, idx: torch.Tensor, n_layers: int | None = None) -> torch.Tensor:
        if idx.shape[1] > self.config.seq_len:
            raise ValueError(f"sequence length {idx.shape[1]} exceeds the model's seq_len {self.config.seq_len}")
        x = self.embed(idx)
        for block in self.blocks[:n_layers]:
            x = block(x)
        return x

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs per token, 6 x the matmul parameters a token touches
        (one expert of each MoE; BK-Core's O(1) per position is left out)."""
        cfg = self.config
        per_layer = 2 * cfg.d_model * cfg.hidden_size + cfg.d_model * (cfg.bk_num_experts + 3)
        return 6.0 * (cfg.n_layer * per_layer + cfg.d_model * cfg.vocab_size)
