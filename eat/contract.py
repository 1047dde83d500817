"""The EAT contract, once: audio rate, frame and patch maths, windows, ``eat.*`` metadata, aggregation.

Everything that turns a clip into model inputs, or model outputs into answers, and that the PyTorch
side (front end, export), the ONNX side (engine, service, ``Predictor``) and the tests must agree on,
lives here — numpy only, so the torch-free service imports it too. The numbers are EAT's
(eat-reference.md §1.2, §2.2): 16 kHz, 25 ms frames every 10 ms (snip edges), 16×16 patches, so one
token row covers 16 frames (160 ms) and the tokens are time-major, ``F`` frequency patches per row.

Windows: a clip longer than the model's window is cut into fixed windows (``hop`` apart, the last one
zero-padded, its ``num_samples`` telling the model where the audio ends); a clip's scores are the max
over its windows, and embeddings are pooled over the valid (unpadded) token rows only. The original
EAT instead keeps only the first ``target_frames`` frames: that is ``first_window``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Literal

import numpy as np

SAMPLE_RATE = 16_000  # Hz; every EAT model, every file the service decodes
FRAME_LENGTH_SAMPLES = 400  # 25 ms Kaldi analysis frame
FRAME_SHIFT_SAMPLES = 160  # 10 ms hop
PATCH_FRAMES = 16  # frames per token row (the 16×16 patch's height)
PATCH_SECONDS = PATCH_FRAMES * FRAME_SHIFT_SAMPLES / SAMPLE_RATE  # 0.16 s per token row
MAX_TIME_PATCHES = 768  # rows of EAT's positional table (reference §1.6): 12 288 frames, ~122.9 s
FORMAT_VERSION = "1"

Granularity = Literal["utterance", "frame", "all", "mean", "time"]
GRANULARITIES: tuple[str, ...] = ("utterance", "frame", "all", "mean", "time")
OUTPUT_NAMES: tuple[str, ...] = ("embedding", "tokens", "logits")


class ContractError(ValueError):
    """A model file's metadata or outputs break the contract; the message says which part."""


# ------------------------------------------------------------------------------------ frame maths


def num_frames(num_samples: int | np.ndarray) -> int | np.ndarray:
    """Snip-edges frame count ``1 + (n - 400) // 160``, 0 below one frame (reference §1.2)."""
    offset = FRAME_LENGTH_SAMPLES - FRAME_SHIFT_SAMPLES
    if isinstance(num_samples, np.ndarray):
        return (np.maximum(num_samples, offset) - offset) // FRAME_SHIFT_SAMPLES
    return max(int(num_samples) - offset, 0) // FRAME_SHIFT_SAMPLES


def window_samples_for(target_frames: int) -> int:
    """Samples that fill ``target_frames`` frames exactly: 164 080 for EAT's 1024 (10.255 s)."""
    return FRAME_LENGTH_SAMPLES + FRAME_SHIFT_SAMPLES * (target_frames - 1)


def valid_time_patches(num_samples: np.ndarray, time_patches: int) -> np.ndarray:
    """Token rows per window that hold audio, not padding: ``ceil(frames / 16)``, at least 1, at most all."""
    frames = num_frames(np.asarray(num_samples, dtype=np.int64))
    return np.clip(-(-frames // PATCH_FRAMES), 1, time_patches)


# --------------------------------------------------------------------------------- labels, metadata


@dataclass(frozen=True)
class Label:
    """One output class: its row in the logits, its dataset key (an AudioSet MID) and display name."""

    index: int
    id: str
    display_name: str = ""


@dataclass(frozen=True)
class ModelInfo:
    """What a model's ``eat.*`` metadata promises; nothing else about the model is trusted."""

    model_name: str
    labels: tuple[Label, ...]
    sample_rate: int
    window_samples: int
    target_frames: int
    embedding_dim: int
    num_classes: int
    time_patches: int
    freq_patches: int
    precision: str
    provider: str
    source_sha256: str = ""
    format_version: str = FORMAT_VERSION
    norm_mean: float = 0.0
    norm_std: float = 1.0

    @property
    def has_classifier(self) -> bool:
        return self.num_classes > 0

    @property
    def window_s(self) -> float:
        return self.window_samples / self.sample_rate

    @property
    def covers_target_frames(self) -> bool:
        """Whether one window fills every frame the encoder sees (else its last frames are padding)."""
        return num_frames(self.window_samples) >= self.target_frames


def metadata_props(
    *,
    model_name: str,
    labels: list[Label] | tuple[Label, ...] | None,
    window_samples: int,
    target_frames: int,
    norm_mean: float,
    norm_std: float,
    embedding_dim: int,
    num_classes: int,
    freq_patches: int,
    precision: str,
    source_sha256: str,
    extra: dict[str, str] | None = None,
) -> dict[str, str]:
    """The ``eat.*`` metadata of the contract, as the strings an ONNX file's ``metadata_props`` hold."""
    props = {
        "eat.format_version": FORMAT_VERSION,
        "eat.model_name": model_name,
        "eat.labels": json.dumps([[lb.index, lb.id, lb.display_name] for lb in labels or ()]),
        "eat.sample_rate": str(SAMPLE_RATE),
        "eat.window_samples": str(window_samples),
        "eat.target_frames": str(target_frames),
        "eat.norm_mean": repr(float(norm_mean)),
        "eat.norm_std": repr(float(norm_std)),
        "eat.embedding_dim": str(embedding_dim),
        "eat.num_classes": str(num_classes),
        "eat.precision": precision,
        "eat.source_sha256": source_sha256,
        "eat.time_patches": str(target_frames // PATCH_FRAMES),
        "eat.freq_patches": str(freq_patches),
    }
    props.update(extra or {})
    return props


def parse_metadata(meta: dict[str, str], *, provider: str, output_names: tuple[str, ...]) -> ModelInfo:
    """Check and parse ``eat.*`` metadata against the model's outputs; raises ``ContractError``."""
    try:
        raw_labels = json.loads(meta.get("eat.labels") or "[]")
        labels = tuple(Label(int(i), str(label_id), str(name)) for i, label_id, name in raw_labels)
        target_frames = int(meta["eat.target_frames"])
        info = ModelInfo(
            model_name=meta.get("eat.model_name", "eat"),
            labels=labels,
            sample_rate=int(meta["eat.sample_rate"]),
            window_samples=int(meta["eat.window_samples"]),
            target_frames=target_frames,
            embedding_dim=int(meta["eat.embedding_dim"]),
            num_classes=int(meta.get("eat.num_classes", len(labels))),
            time_patches=int(meta.get("eat.time_patches", target_frames // PATCH_FRAMES)),
            freq_patches=int(meta.get("eat.freq_patches", 8)),
            precision=meta.get("eat.precision", "fp32"),
            provider=provider,
            source_sha256=meta.get("eat.source_sha256", ""),
            format_version=meta.get("eat.format_version", FORMAT_VERSION),
            norm_mean=float(meta.get("eat.norm_mean", 0.0)),
            norm_std=float(meta.get("eat.norm_std", 1.0)),
        )
    except (KeyError, ValueError, TypeError) as err:
        raise ContractError(f"the metadata breaks the EAT contract: {err!r}") from err
    if info.sample_rate != SAMPLE_RATE:
        raise ContractError(f"eat.sample_rate is {info.sample_rate}; EAT models take {SAMPLE_RATE} Hz audio")
    missing = {"embedding", "tokens"} - set(output_names)
    if missing:
        raise ContractError(f"the model lacks the outputs {sorted(missing)}")
    if info.has_classifier:
        if "logits" not in output_names:
            raise ContractError(f"eat.num_classes is {info.num_classes} but the model has no 'logits' output")
        if len(labels) != info.num_classes or [lab.index for lab in labels] != list(range(len(labels))):
            raise ContractError("eat.labels must list indices 0..num_classes-1 in order")
    return info


# ------------------------------------------------------------------------------------------ windows


@dataclass(frozen=True)
class Windows:
    waveform: np.ndarray  # [W, window_samples] float32, zero-padded past num_samples
    num_samples: np.ndarray  # [W] int64, valid samples per row
    starts: np.ndarray  # [W] int64, first sample of each window in the clip

    def __len__(self) -> int:
        return len(self.starts)

    @property
    def start_s(self) -> np.ndarray:
        return self.starts / SAMPLE_RATE

    @property
    def end_s(self) -> np.ndarray:
        return (self.starts + self.num_samples) / SAMPLE_RATE


def cut_windows(samples: np.ndarray, *, window_samples: int, hop_samples: int) -> Windows:
    """Cut ``samples`` [S] into windows of the model's fixed length, ``hop_samples`` apart.

    The last window is zero-padded; a clip shorter than a window is one padded window. Its
    ``num_samples`` tells the model where the audio ends (the front end pads as EAT pads short clips).
    """
    if not 0 < hop_samples <= window_samples:
        raise ValueError(f"hop_samples must be in (0, {window_samples}], got {hop_samples}")
    num_total = len(samples)
    num_windows = 1 if num_total <= window_samples else 1 + math.ceil((num_total - window_samples) / hop_samples)
    starts = np.arange(num_windows, dtype=np.int64) * hop_samples
    waveform = np.zeros((num_windows, window_samples), dtype=np.float32)  # [W, S]
    num_samples = np.empty(num_windows, dtype=np.int64)
    for row, start in enumerate(starts):
        piece = samples[start : start + window_samples]
        waveform[row, : len(piece)] = piece
        num_samples[row] = len(piece)
    return Windows(waveform=waveform, num_samples=num_samples, starts=starts)


def first_window(samples: np.ndarray, *, window_samples: int) -> Windows:
    """The original EAT's view of a clip: its first ``window_samples`` samples only, nothing after."""
    return cut_windows(samples[:window_samples], window_samples=window_samples, hop_samples=window_samples)


def hop_samples_for(hop_seconds: float | None, window_samples: int) -> int:
    """The window hop in samples; None = the window (no overlap). A longer hop would skip audio."""
    if hop_seconds is None:
        return window_samples
    if not hop_seconds > 0:
        raise ValueError(f"the hop must be positive, got {hop_seconds} s")
    hop = math.ceil(hop_seconds * SAMPLE_RATE)
    if hop > window_samples:
        raise ValueError(f"a hop of {hop_seconds} s exceeds the model's window of {window_samples / SAMPLE_RATE} s")
    return hop


# -------------------------------------------------------------------------------------- aggregation


def sigmoid(logits: np.ndarray) -> np.ndarray:
    """float32 sigmoid that never overflows, whatever the size of ``|logits|``."""
    return np.exp(-np.logaddexp(0.0, -logits)).astype(np.float32)


def clip_scores(window_scores: np.ndarray) -> np.ndarray:
    """A clip's class scores [C] from its windows' [W, C]: the max, so a short event anywhere counts."""
    return window_scores.max(axis=0)


def outputs_for(granularity: Granularity) -> tuple[str, ...]:
    """The model outputs a granularity needs: the CLS ``embedding``, the patch ``tokens``, or both."""
    if granularity not in GRANULARITIES:
        raise ValueError(f"unknown granularity {granularity!r}; choose one of {', '.join(GRANULARITIES)}")
    return {"utterance": ("embedding",), "all": ("embedding", "tokens")}.get(granularity, ("tokens",))


def pool(
    granularity: Granularity,
    outputs: dict[str, np.ndarray],
    num_samples: np.ndarray,
    info: ModelInfo,
    *,
    trim: bool = True,
) -> np.ndarray:
    """One clip's windows' outputs -> its embedding (float32).

    - ``utterance`` [D]: the CLS vector, averaged over windows;
    - ``frame`` [N, D]: patch tokens, time-major (``F`` per 160 ms row), windows concatenated;
    - ``all`` [1+N, D]: ``utterance`` then ``frame``, the original's full feature layout;
    - ``mean`` [D]: mean of the frame tokens; ``time`` [T, D]: each row's tokens averaged over frequency.

    ``trim`` keeps only the token rows that hold audio (a padded window's tail is dropped). Without it
    every row of every window is kept, as the original extractor returns the padded rows too.
    """
    outputs_for(granularity)  # validates the name
    if granularity == "utterance":
        return outputs["embedding"].mean(axis=0).astype(np.float32)  # [W, D] -> [D]
    tokens = outputs["tokens"]  # [W, N, D], token F*t + f
    num_windows, num_tokens, dim = tokens.shape
    if num_tokens != info.time_patches * info.freq_patches:
        promised = f"{info.time_patches}x{info.freq_patches}"
        raise ContractError(f"model gave {num_tokens} tokens, metadata promises {promised}")
    grid = tokens.reshape(num_windows, info.time_patches, info.freq_patches, dim)  # [W, T, F, D]
    rows = valid_time_patches(num_samples, info.time_patches) if trim else np.full(num_windows, info.time_patches)
    kept = np.concatenate([grid[w, : rows[w]] for w in range(num_windows)])  # [sum T_valid, F, D]
    if granularity == "mean":
        return kept.mean(axis=(0, 1)).astype(np.float32)
    if granularity == "time":
        return kept.mean(axis=1).astype(np.float32)
    frame = kept.reshape(-1, dim).astype(np.float32)  # [sum T_valid * F, D]
    if granularity == "frame":
        return frame
    utterance = outputs["embedding"].mean(axis=0, keepdims=True).astype(np.float32)  # [1, D]
    return np.concatenate([utterance, frame])
