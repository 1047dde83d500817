"""Encoder + pooling + LayerNorm + Linear: the fine-tuned EAT classifier (eat-reference.md §4.1)."""

from __future__ import annotations

import torch
from torch import nn

from model.config import EATConfig
from model.encoder import Encoder


class EATClassifier(nn.Module):
    """Log-mel ``[B, 1, T, 128]`` -> logits ``[B, C]``, in timm's stages:
    ``forward_features`` (the encoder) then ``forward_head`` (pool, LayerNorm, Linear).

    Pooling is chosen at construction: the CLS token (EAT's ``CLS_TOKEN`` mode, every published
    recipe) or the mean of the patch tokens.
    """

    def __init__(self, cfg: EATConfig) -> None:
        super().__init__()
        if cfg.num_classes <= 0:
            raise ValueError("EATClassifier needs num_classes > 0; use Encoder for a headless model")
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.fc_norm = nn.LayerNorm(cfg.embed_dim, eps=cfg.head_norm_eps)
        self.head = nn.Linear(cfg.embed_dim, cfg.num_classes)
        self._pool = pool_cls if cfg.pooling == "cls" else pool_mean

    @torch.no_grad()
    def init_weights(self) -> None:
        self.encoder.init_weights()
        self.init_head()

    @torch.no_grad()
    def init_head(self) -> None:
        """Fresh head for fine-tuning: LN 1/0, truncated-normal(0.02) weights, zero bias (§4.1)."""
        nn.init.ones_(self.fc_norm.weight)
        nn.init.zeros_(self.fc_norm.bias)
        nn.init.trunc_normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)

    def pool(self, features: torch.Tensor) -> torch.Tensor:
        return self._pool(features)

    def forward_features(self, fbank: torch.Tensor) -> torch.Tensor:
        """Log-mel ``[B, 1, T, 128]`` -> encoder tokens ``[B, 1+N, D]`` (CLS first)."""
        return self.encoder.forward_features(fbank)

    def forward_head(self, features: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Encoder tokens ``[B, 1+N, D]`` -> logits ``[B, C]``, or with ``pre_logits`` the pooled,
        normalised embedding ``[B, D]`` the Linear head reads (timm's contract)."""
        pooled = self.fc_norm(self._pool(features))
        return pooled if pre_logits else self.head(pooled)

    def forward(self, fbank: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(fbank))


def pool_cls(features: torch.Tensor) -> torch.Tensor:
    return features[:, 0]


def pool_mean(features: torch.Tensor) -> torch.Tensor:
    return features[:, 1:].mean(dim=1)
