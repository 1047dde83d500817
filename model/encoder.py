"""The EAT encoder: patch conv, fixed 2-D sin-cos positions, CLS token, input LayerNorm and post-LN
transformer blocks, with no final norm (eat-reference.md §2).

Tokens are time-major: token ``n = F·t + f`` covers frames ``16t…16t+15`` and mel bins ``16f…16f+15``
(F = 8 frequency patches for 128 bins).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from model.config import EATConfig


def sincos_position_table(num_time: int, num_freq: int, dim: int) -> torch.Tensor:
    """Fixed 2-D sin-cos table ``[num_time·num_freq, dim]`` in float64 (reference §2.3).

    Dims ``[0, dim/2)`` encode the frequency column and ``[dim/2, dim)`` the time row; each half is
    ``sin`` then ``cos`` of ``p·10000^(-k/(dim/4))``.
    """
    if dim % 4:
        raise ValueError(f"embed_dim must be a multiple of 4 for the sin-cos table, got {dim}")
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)  # [dim/4]

    def encode(positions: torch.Tensor) -> torch.Tensor:
        angles = positions[:, None].to(torch.float64) * omega[None]
        return torch.cat([angles.sin(), angles.cos()], dim=1)  # [P, dim/2]

    t = torch.arange(num_time).repeat_interleave(num_freq)  # row index 8t+f -> t
    f = torch.arange(num_freq).repeat(num_time)  # -> f
    return torch.cat([encode(f), encode(t)], dim=1)


class DropPath(nn.Module):
    """Stochastic depth per sample; built only when the rate is > 0 (else ``nn.Identity``)."""

    def __init__(self, rate: float) -> None:
        super().__init__()
        self.rate = rate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return x
        keep = 1.0 - self.rate
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"rate={self.rate}"


class PatchEmbed(nn.Module):
    """``[B, 1, T, 128]`` log-mel -> ``[B, N, D]`` tokens with a 16×16 stride-16 conv (reference §2.2)."""

    def __init__(self, embed_dim: int, patch_size: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(1, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, fbank: torch.Tensor) -> torch.Tensor:
        return self.proj(fbank).flatten(2).transpose(1, 2)  # [B, D, T/16, F] -> [B, N, D]


class Attention(nn.Module):
    """Multi-head self-attention with one fused qkv projection (rows q | k | v)."""

    def __init__(self, dim: int, num_heads: int, impl: str = "sdpa") -> None:
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim, bias=True)
        self.proj = nn.Linear(dim, dim)
        self._attend = self._sdpa if impl == "sdpa" else self._math

    def _sdpa(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return F.scaled_dot_product_attention(q, k, v)

    def _math(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        # The original computes the softmax in float32 even under fp16 (reference §2.6).
        scores = (q * self.scale) @ k.transpose(-2, -1)
        return scores.float().softmax(dim=-1).to(v.dtype) @ v

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        out = self._attend(qkv[0], qkv[1], qkv[2])  # [B, H, N, hd]
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()  # exact erf GELU
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Post-LN block: ``a = LN1(x + attn(x))``, ``m = mlp(a)``, ``out = LN2(a + m)`` (reference §2.6).

    ``m``, the FFN output before the residual, is what the EMA teacher's targets are built from.
    """

    def __init__(self, cfg: EATConfig, drop_path: float = 0.0) -> None:
        super().__init__()
        dim = cfg.embed_dim
        self.attn = Attention(dim, cfg.num_heads, cfg.attn_impl)
        self.norm1 = nn.LayerNorm(dim, eps=cfg.norm_eps)
        self.mlp = Mlp(dim, int(dim * cfg.mlp_ratio))
        self.norm2 = nn.LayerNorm(dim, eps=cfg.norm_eps)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward_with_ffn(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        a = self.norm1(x + self.drop_path(self.attn(x)))
        m = self.mlp(a)
        return self.norm2(a + self.drop_path(m)), m

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_with_ffn(x)[0]


class Encoder(nn.Module):
    """Log-mel ``[B, 1, T, 128]`` -> ``[B, 1+N, D]`` (CLS first, then N = T/16·8 patch tokens).

    Stages in timm's shape: ``forward_features`` (the whole encoder) and ``forward_intermediates``
    (per-block outputs, or FFN outputs for the EMA teacher). Pre-training masks between the two
    halves of ``forward_features``: ``embed`` (conv + positions) and ``forward_tokens`` (CLS, input
    LayerNorm, blocks).
    """

    def __init__(self, cfg: EATConfig) -> None:
        super().__init__()
        self.cfg = cfg
        dim = cfg.embed_dim
        self.patch_embed = PatchEmbed(dim, cfg.patch_size)
        # A fixed table, stored in checkpoints: official files hold it fp16-rounded, and loading
        # that table rather than recomputing it is what gives 1e-4 parity (reference §6.5).
        table = sincos_position_table(cfg.max_time_patches, cfg.freq_patches, dim)
        self.register_buffer("pos_embed", table.float()[None], persistent=True)  # [1, P, D]
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pre_norm = nn.LayerNorm(dim, eps=cfg.norm_eps)
        rates = [cfg.drop_path_rate * i / max(cfg.depth - 1, 1) for i in range(cfg.depth)]
        self.blocks = nn.ModuleList(Block(cfg, rate) for rate in rates)

    @torch.no_grad()
    def init_weights(self) -> None:
        """EAT's from-scratch init (reference §2.7): BERT-style linears, Xavier patch conv, N(0,1) CLS."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        w = self.patch_embed.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.patch_embed.proj.bias)
        nn.init.normal_(self.cls_token, std=1.0)

    def embed(self, fbank: torch.Tensor) -> torch.Tensor:
        """``[B, 1, T, 128]`` -> patch tokens with positions ``[B, N, D]``."""
        x = self.patch_embed(fbank)
        return x + self.pos_embed[:, : x.shape[1]].to(x.dtype)

    def _prepend_cls(self, tokens: torch.Tensor) -> torch.Tensor:
        cls = self.cls_token.expand(tokens.shape[0], -1, -1).to(tokens.dtype)
        return self.pre_norm(torch.cat([cls, tokens], dim=1))

    def forward_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """Patch tokens ``[B, L, D]`` (all of them, or the visible ones) -> ``[B, 1+L, D]``."""
        x = self._prepend_cls(tokens)
        for block in self.blocks:
            x = block(x)
        return x

    def forward_features(self, fbank: torch.Tensor) -> torch.Tensor:
        """Log-mel ``[B, 1, T, 128]`` -> tokens ``[B, 1+N, D]`` (CLS first; EAT has no final norm)."""
        return self.forward_tokens(self.embed(fbank))

    def forward_intermediates(
        self,
        fbank: torch.Tensor,
        indices: int | Sequence[int] | None = None,
        *,
        output: Literal["block", "ffn"] = "block",
        stop_early: bool = False,
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The final tokens and chosen blocks' outputs, each ``[B, 1+N, D]`` (timm's contract).

        ``indices``: an int ``n`` takes the last ``n`` blocks, a sequence takes those block indices
        (negative counts from the end), ``None`` takes every block; intermediates come in block order.
        ``output="ffn"`` returns each chosen block's FFN output before the residual and LN2 instead of
        the block output: what EAT's teacher averages into its targets (eat-reference.md §3.4).
        ``stop_early`` skips the blocks after the last chosen one (the returned final tokens are then
        that block's output).
        """
        if output not in ("block", "ffn"):
            raise ValueError(f"output must be 'block' or 'ffn', got {output!r}")
        take = self._intermediate_indices(indices)
        last = max(take) if stop_early else len(self.blocks) - 1
        want_ffn = output == "ffn"
        x = self._prepend_cls(self.embed(fbank))
        intermediates = []
        for i, block in enumerate(self.blocks[: last + 1]):
            x, ffn = block.forward_with_ffn(x)
            if i in take:
                intermediates.append(ffn if want_ffn else x)
        return x, intermediates

    def _intermediate_indices(self, indices: int | Sequence[int] | None) -> set[int]:
        depth = len(self.blocks)
        if indices is None:
            return set(range(depth))
        if isinstance(indices, int):
            if not 1 <= indices <= depth:
                raise ValueError(f"take the last n blocks with 1 <= n <= {depth}, got {indices}")
            return set(range(depth - indices, depth))
        chosen = {i + depth if i < 0 else i for i in indices}
        if not chosen or any(not 0 <= i < depth for i in chosen):
            raise ValueError(f"block indices {list(indices)} are not all in [-{depth}, {depth})")
        return chosen

    def forward(self, fbank: torch.Tensor) -> torch.Tensor:
        return self.forward_features(fbank)

    @torch.no_grad()
    def extend_positions(self, stored: torch.Tensor) -> None:
        """Load a stored table ``[1, P, D]``; rows past P (old 512-row files) keep exact values."""
        rows = min(stored.shape[1], self.pos_embed.shape[1])
        self.pos_embed[:, :rows] = stored[:, :rows].to(self.pos_embed.dtype)


def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def flops_per_token(cfg: EATConfig, seq_len: int) -> float:
    """Forward FLOPs per token of the transformer stack (2·params + attention), for MFU figures."""
    d, h = cfg.embed_dim, int(cfg.embed_dim * cfg.mlp_ratio)
    per_block = 2 * (3 * d * d + d * d + 2 * d * h) + 2 * 2 * seq_len * d
    return float(cfg.depth * per_block)


__all__ = [
    "Attention",
    "Block",
    "DropPath",
    "Encoder",
    "Mlp",
    "PatchEmbed",
    "count_params",
    "flops_per_token",
    "sincos_position_table",
]
