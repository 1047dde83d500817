"""Waveform in, contract outputs out: the PyTorch twin of an exported ONNX file.

``WaveformModel`` is the module ``eat export`` traces, so the ONNX file and this module compute the
same thing by construction. ``TorchEngine`` wraps it in the engine interface of ``eat.engine`` (``info``,
``run``, ``close``), so ``eat.Predictor`` can run a checkpoint (ours, fairseq or Hugging Face) with the
same windows, metadata and aggregation as an ONNX file: same answers, within float32 noise.
"""

from __future__ import annotations

import dataclasses
import math
import os

import numpy as np
import torch
from torch import Tensor, nn

from eat.contract import (
    FRAME_SHIFT_SAMPLES,
    PATCH_FRAMES,
    SAMPLE_RATE,
    ModelInfo,
    metadata_props,
    num_frames,
    parse_metadata,
    window_samples_for,
)
from model.checkpoints import LoadedCheckpoint, build_model, load_checkpoint
from model.classifier import EATClassifier
from model.config import FrontendConfig, Label
from model.encoder import Encoder
from model.frontend import LogMelFrontend


class WindowError(ValueError):
    """A window length the model cannot take (no frame at all, or past its position table)."""


class EmbeddingHeads(nn.Module):
    """Features ``[B, 1, T, 128]`` -> ``(embedding [B, D], tokens [B, N, D])`` for a headless encoder."""

    def __init__(self, encoder: Encoder) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, fbank: Tensor) -> tuple[Tensor, Tensor]:
        features = self.encoder.forward_features(fbank)  # [B, 1+N, D]
        return features[:, 0], features[:, 1:]


class ClassifierHeads(nn.Module):
    """Features -> ``(embedding, tokens, logits [B, C])``; logits from the classifier's own pooling."""

    def __init__(self, classifier: EATClassifier) -> None:
        super().__init__()
        self.classifier = classifier

    def forward(self, fbank: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        features = self.classifier.forward_features(fbank)  # [B, 1+N, D]
        return features[:, 0], features[:, 1:], self.classifier.forward_head(features)


class WaveformModel(nn.Module):
    """``(waveform [B, S], num_samples [B])`` -> the contract's outputs, in ``output_names`` order."""

    def __init__(self, frontend: LogMelFrontend, heads: EmbeddingHeads | ClassifierHeads) -> None:
        super().__init__()
        self.frontend = frontend
        self.heads = heads

    @property
    def output_names(self) -> tuple[str, ...]:
        return ("embedding", "tokens") + (("logits",) if isinstance(self.heads, ClassifierHeads) else ())

    def forward(self, waveform: Tensor, num_samples: Tensor) -> tuple[Tensor, ...]:
        return self.heads(self.frontend(waveform, num_samples))


def window_frames(
    window_seconds: float, trained_frames: int, max_frames: int, target_frames: int | None = None
) -> tuple[int, int]:
    """``(window_samples, target_frames)`` for a window of ``window_seconds`` (S = seconds·16 kHz).

    By default the model sees the frame count it was trained with (the checkpoint's
    ``target_frames``) whenever the window fits in it, exactly as EAT pads every shorter clip: a 10 s
    window (998 frames) on an AudioSet model gives 1024 frames, and a clip shorter than the window
    gets the features EAT gives it. A longer window rounds its frames up to a multiple of 16 (the
    patch height), as EAT's feature-extraction guide does. ``target_frames`` overrides both, e.g. to
    spend less compute on short windows; it must cover the window.
    """
    if not math.isfinite(window_seconds) or window_seconds <= 0:
        raise WindowError(f"--window-seconds must be a positive number, got {window_seconds}")
    samples = round(window_seconds * SAMPLE_RATE)
    frames = int(num_frames(samples))
    if frames < 1:
        raise WindowError(f"a {window_seconds} s window holds no 25 ms frame; use at least 0.025 s")
    covering = math.ceil(frames / PATCH_FRAMES) * PATCH_FRAMES
    if target_frames is None:
        target = trained_frames if frames <= trained_frames else covering
    elif target_frames % PATCH_FRAMES or target_frames < covering:
        raise WindowError(
            f"--target-frames must be a multiple of 16 of at least {covering} for a {window_seconds} s window "
            f"({frames} frames), got {target_frames}"
        )
    else:
        target = target_frames
    if target > max_frames:
        raise WindowError(
            f"a {window_seconds} s window needs {target} frames; the model's position table covers "
            f"{max_frames} ({max_frames * FRAME_SHIFT_SAMPLES / SAMPLE_RATE:.1f} s)"
        )
    return samples, target


def waveform_model(
    network: EATClassifier | Encoder,
    frontend: FrontendConfig,
    *,
    window_seconds: float,
    target_frames: int | None = None,
) -> tuple[WaveformModel, int]:
    """The float32, eval-mode twin for a window: ``(model, window_samples)``; the frames follow
    ``window_frames`` and the normalisation stays the checkpoint's."""
    cfg = network.cfg
    window_samples, frames = window_frames(
        window_seconds, frontend.target_frames, cfg.max_time_patches * cfg.patch_size, target_frames
    )
    front_cfg = dataclasses.replace(frontend, target_frames=frames)
    heads = ClassifierHeads(network) if isinstance(network, EATClassifier) else EmbeddingHeads(network)
    return WaveformModel(LogMelFrontend(front_cfg), heads).float().eval(), window_samples


def model_metadata(
    model: WaveformModel,
    *,
    window_samples: int,
    name: str,
    labels: list[Label] | None,
    precision: str,
    source_sha256: str,
    extra: dict[str, str] | None = None,
) -> dict[str, str]:
    """The ``eat.*`` metadata that describes ``model`` (what export writes and ``TorchEngine`` reports)."""
    network = model.heads.classifier if isinstance(model.heads, ClassifierHeads) else model.heads.encoder
    front = model.frontend.cfg
    num_classes = network.cfg.num_classes if isinstance(network, EATClassifier) else 0
    return metadata_props(
        model_name=name,
        labels=labels if num_classes else None,
        window_samples=window_samples,
        target_frames=front.target_frames,
        norm_mean=front.norm_mean,
        norm_std=front.norm_std,
        embedding_dim=network.cfg.embed_dim,
        num_classes=num_classes,
        freq_patches=network.cfg.freq_patches,
        precision=precision,
        source_sha256=source_sha256,
        extra=extra,
    )


def placeholder_labels(num_classes: int) -> list[Label]:
    return [Label(i, str(i), f"class {i}") for i in range(num_classes)]


class TorchEngine:
    """A checkpoint as an ``eat.engine.Engine``: ``run`` feeds the twin, ``info`` is its contract metadata.

    ``window_seconds=None`` makes the window exactly as long as the frames the encoder sees (10.255 s
    for 1024 frames), so ``original`` mode crops a long clip exactly where the original EAT does.
    """

    def __init__(
        self,
        source: str | os.PathLike[str] | LoadedCheckpoint,
        *,
        device: str = "cpu",
        window_seconds: float | None = 10.0,
        target_frames: int | None = None,
        teacher: bool = False,
    ) -> None:
        loaded = source if isinstance(source, LoadedCheckpoint) else load_checkpoint(source, teacher=teacher)
        network = build_model(loaded)
        if window_seconds is None:  # exactly the frames the encoder sees: the original's crop of a long clip
            window_seconds = window_samples_for(target_frames or loaded.frontend.target_frames) / SAMPLE_RATE
        model, window_samples = waveform_model(
            network, loaded.frontend, window_seconds=window_seconds, target_frames=target_frames
        )
        self.device = torch.device(device)
        self.model = model.to(self.device)
        labels = loaded.labels or placeholder_labels(loaded.config.num_classes)
        meta = model_metadata(model, window_samples=window_samples, name=loaded.name, labels=labels,
                              precision="fp32", source_sha256=loaded.source_sha256)
        self.info: ModelInfo = parse_metadata(meta, provider=f"torch-{self.device.type}",
                                              output_names=model.output_names)

    @torch.no_grad()
    def run(self, waveform: np.ndarray, num_samples: np.ndarray, outputs: tuple[str, ...]) -> dict[str, np.ndarray]:
        result = self.model(torch.from_numpy(waveform).to(self.device), torch.from_numpy(num_samples).to(self.device))
        named = dict(zip(self.model.output_names, result, strict=True))
        return {name: named[name].float().cpu().numpy() for name in outputs}

    def close(self) -> None:
        self.model = None  # type: ignore[assignment]
