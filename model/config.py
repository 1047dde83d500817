"""Architecture and front-end configuration, and the size presets.

The architecture (``EATConfig``) and the audio front end (``FrontendConfig``) are kept apart: the
same weights serve several target lengths and normalisations (AudioSet, ESC-50, SPC-2), which travel
with checkpoints and ONNX metadata, not with the network (see STYLE.md §1).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

from eat.contract import MAX_TIME_PATCHES, PATCH_FRAMES, SAMPLE_RATE, Label, window_samples_for

# eat-reference.md §1.4: (mean, std) of the log-mel, applied as (x - mean) / (2 * std).
NORM_STATS: dict[str, tuple[float, float]] = {
    "audioset": (-4.268, 4.569),
    "esc50": (-6.627, 5.359),
    "spcv2": (-6.846, 5.565),
}


@dataclass(frozen=True)
class FrontendConfig:
    """16 kHz waveform -> Kaldi log-mel -> fixed number of frames -> normalised (reference §1)."""

    sample_rate: int = SAMPLE_RATE
    num_mel_bins: int = 128
    target_frames: int = 1024  # 10.24 s at a 10 ms hop; must be a multiple of the patch size
    norm_mean: float = NORM_STATS["audioset"][0]
    norm_std: float = NORM_STATS["audioset"][1]

    def __post_init__(self) -> None:
        if self.sample_rate != SAMPLE_RATE:
            raise ValueError("EAT's front end is defined for 16 kHz audio only; resample first")
        if self.target_frames <= 0 or self.target_frames % PATCH_FRAMES:
            raise ValueError(f"target_frames must be a positive multiple of 16, got {self.target_frames}")
        if self.target_frames > MAX_TIME_PATCHES * PATCH_FRAMES:
            raise ValueError(f"target_frames {self.target_frames} exceeds EAT's 12288-frame limit")
        if self.norm_std <= 0:
            raise ValueError("norm_std must be positive")

    @classmethod
    def preset(cls, norm: Literal["audioset", "esc50", "spcv2"], target_frames: int = 1024) -> FrontendConfig:
        mean, std = NORM_STATS[norm]
        return cls(target_frames=target_frames, norm_mean=mean, norm_std=std)

    @property
    def window_samples(self) -> int:
        """Samples of audio that fill ``target_frames`` exactly (snip-edges framing, §1.2)."""
        return window_samples_for(self.target_frames)


@dataclass(frozen=True)
class EATConfig:
    """The EAT network: patch encoder, post-LN transformer, optional classifier and CNN decoder.

    Field names match the constructor arguments and the checkpoint keys (STYLE.md §1).
    """

    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    patch_size: int = 16
    num_mel_bins: int = 128
    max_time_patches: int = 768  # positional table rows / 8 (reference §1.6)
    norm_eps: float = 1e-6
    drop_path_rate: float = 0.0
    attn_impl: Literal["sdpa", "math"] = "sdpa"
    # Classifier head (0 classes = encoder only, as pre-trained checkpoints are).
    num_classes: int = 0
    head_norm_eps: float = 1e-6  # fairseq's fc_norm; the HF remote code uses 1e-5 (reference §6.4)
    pooling: Literal["cls", "mean"] = "cls"
    # Pre-training decoder (reference §3.5).
    decoder_dim: int = 768
    decoder_layers: int = 6
    decoder_kernel: int = 3
    decoder_groups: int = 16

    def __post_init__(self) -> None:
        if self.embed_dim % self.num_heads:
            raise ValueError(f"num_heads {self.num_heads} must divide embed_dim {self.embed_dim}")
        if self.num_mel_bins % self.patch_size:
            raise ValueError("patch_size must divide num_mel_bins")
        if self.depth < 1:
            raise ValueError("depth must be at least 1")
        if not 0.0 <= self.drop_path_rate < 1.0:
            raise ValueError("drop_path_rate must be in [0, 1)")
        if self.attn_impl not in ("sdpa", "math"):
            raise ValueError(f"attn_impl must be 'sdpa' or 'math', got {self.attn_impl!r}")
        if self.pooling not in ("cls", "mean"):
            raise ValueError(f"pooling must be 'cls' or 'mean', got {self.pooling!r}")
        if self.decoder_dim % self.decoder_groups or self.embed_dim % self.decoder_groups:
            raise ValueError("decoder_groups must divide decoder_dim and embed_dim")
        if self.num_classes < 0:
            raise ValueError("num_classes must be >= 0")

    @property
    def freq_patches(self) -> int:
        return self.num_mel_bins // self.patch_size

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    def replace(self, **changes: Any) -> EATConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> EATConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown EATConfig fields: {unknown}")
        return cls(**values)


# Presets are a few lines of differences (STYLE.md §1); overrides win.
_PRESETS: dict[str, dict[str, Any]] = {
    # Small enough to pre-train and fine-tune on 2 CPU cores in minutes (tests, `eat demo`).
    "tiny": dict(embed_dim=128, depth=4, num_heads=4, decoder_dim=128, decoder_layers=2),
    # reference §2.1 and §3.5
    "base": dict(embed_dim=768, depth=12, num_heads=12, decoder_dim=768, decoder_layers=6, decoder_kernel=3),
    "large": dict(embed_dim=1024, depth=24, num_heads=16, decoder_dim=1024, decoder_layers=3, decoder_kernel=5),
}

PRESET_NAMES = tuple(_PRESETS)


def preset(name: str, **overrides: Any) -> EATConfig:
    if name not in _PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {PRESET_NAMES}")
    return EATConfig(**{**_PRESETS[name], **overrides})


def tiny(**overrides: Any) -> EATConfig:
    return preset("tiny", **overrides)


def base(**overrides: Any) -> EATConfig:
    return preset("base", **overrides)


def large(**overrides: Any) -> EATConfig:
    return preset("large", **overrides)


__all__ = ["EATConfig", "FrontendConfig", "Label", "preset"]  # Label lives in the contract (eat.contract)
