"""``Predictor``: tags and embeddings for one clip at a time, synchronously, with no server and no torch.

    from eat import Predictor
    predictor = Predictor.from_onnx("models/default/model.onnx")
    predictor.predict("clip.wav").tags(top_k=12)
    predictor.embed(waveform, sample_rate=44_100, granularity="frame").vector  # [N, D]

A clip goes ``prepare`` (decode, resample, cut into windows) -> the engine (in batches of windows) ->
``prediction`` / ``embedding`` (aggregate the windows). The service runs the very same three steps,
with its batcher in the middle, so an HTTP answer and a ``Predictor`` answer are the same numbers.

Modes: ``windows`` (default) covers the whole clip with the model's windows, ``hop`` apart, and takes
the max over windows; ``original`` keeps only the first window, as the original EAT keeps the first
``target_length`` frames of a clip.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from eat import audio as audio_io
from eat.contract import (
    PATCH_SECONDS,
    Granularity,
    Label,
    ModelInfo,
    Windows,
    clip_scores,
    cut_windows,
    first_window,
    hop_samples_for,
    outputs_for,
    pool,
    sigmoid,
    window_samples_for,
)
from eat.engine import Engine, Provider
from eat.events import Event, EventOptions, Thresholds, detect_events

logger = logging.getLogger(__name__)

AudioInput = str | os.PathLike[str] | bytes | np.ndarray
Mode = Literal["windows", "original"]
MODES: tuple[str, ...] = ("windows", "original")
DEFAULT_TOP_K = 12  # what the original's inference script prints


@dataclass(frozen=True)
class Tag:
    index: int
    id: str
    name: str
    score: float


@dataclass(frozen=True)
class WindowTags:
    start_s: float
    end_s: float
    tags: list[Tag]


@dataclass(frozen=True)
class Clip:
    """A decoded clip cut into the model's windows: what goes into the engine."""

    name: str
    audio: audio_io.Audio
    windows: Windows


@dataclass(frozen=True)
class Prediction:
    """Class scores of one clip: ``scores`` [C] (max over windows) and ``window_scores`` [W, C], sigmoids."""

    name: str
    duration_s: float
    labels: tuple[Label, ...]
    scores: np.ndarray
    window_scores: np.ndarray
    window_start_s: np.ndarray  # [W]
    window_end_s: np.ndarray  # [W], the end of the audio in the window (not of its padding)

    @property
    def num_windows(self) -> int:
        return len(self.window_scores)

    def tags(self, top_k: int = DEFAULT_TOP_K, threshold: float | None = None) -> list[Tag]:
        """The best ``top_k`` classes of the clip, best first, without those scoring under ``threshold``."""
        return top_tags(self.scores, self.labels, top_k=top_k, threshold=threshold)

    def timeline(self, top_k: int = DEFAULT_TOP_K, threshold: float | None = None) -> list[WindowTags]:
        """The same, per window, with each window's span in seconds."""
        return [
            WindowTags(round(float(start), 4), round(float(end), 4), top_tags(s, self.labels, top_k=top_k,
                                                                              threshold=threshold))
            for start, end, s in zip(self.window_start_s, self.window_end_s, self.window_scores, strict=True)
        ]

    def events(
        self, thresholds: Thresholds | float | None = None, options: EventOptions | None = None
    ) -> list[Event]:
        """Sound events with onset and offset (``eat.events``); overlapping windows (a hop under the
        window) make the times finer than a window."""
        if not isinstance(thresholds, Thresholds):
            thresholds = Thresholds().with_default(thresholds)
        return detect_events(self.window_scores, self.window_start_s, self.window_end_s, self.labels,
                             thresholds=thresholds.for_labels(self.labels), options=options or EventOptions())


@dataclass(frozen=True)
class Embedding:
    """One clip's embedding; ``vector`` is [D] (utterance, mean) or [rows, D] (frame, all, time)."""

    name: str
    duration_s: float
    num_windows: int
    granularity: Granularity
    vector: np.ndarray
    time_step_s: float | None  # seconds per row for ``time``; per ``freq_patches`` rows for ``frame``/``all``


def top_tags(scores: np.ndarray, labels: tuple[Label, ...], *, top_k: int, threshold: float | None) -> list[Tag]:
    order = np.argsort(-scores, kind="stable")[:top_k]
    return [
        Tag(index=labels[i].index, id=labels[i].id, name=labels[i].display_name, score=round(float(scores[i]), 6))
        for i in order
        if threshold is None or scores[i] >= threshold
    ]


# ------------------------------------------------------------------- the three steps, shared with the service


def prepare(
    source: AudioInput | audio_io.Audio,
    *,
    info: ModelInfo,
    mode: Mode = "windows",
    hop_samples: int | None = None,
    sample_rate: int | None = None,
    max_duration_s: float | None = None,
    name: str | None = None,
) -> Clip:
    """Decode (unless given ``Audio``) and cut into windows. Raises ``eat.audio.AudioError`` for bad audio."""
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
    if isinstance(source, audio_io.Audio):
        decoded = source
    else:
        decoded = audio_io.load(source, sample_rate=sample_rate, max_duration_s=max_duration_s)
    if name is None:
        name = str(source) if isinstance(source, str | os.PathLike) else "audio"
    window = info.window_samples
    if mode == "original":
        windows = first_window(decoded.samples, window_samples=window)
    else:
        windows = cut_windows(decoded.samples, window_samples=window, hop_samples=hop_samples or window)
    return Clip(name=name, audio=decoded, windows=windows)


def prediction(clip: Clip, logits: np.ndarray, labels: tuple[Label, ...]) -> Prediction:
    """The clip's windows' logits [W, C] -> its ``Prediction`` (clip score = max over windows)."""
    window_scores = sigmoid(logits)  # [W, C]
    return Prediction(
        name=clip.name,
        duration_s=round(clip.audio.duration_s, 4),
        labels=labels,
        scores=clip_scores(window_scores),
        window_scores=window_scores,
        window_start_s=clip.windows.start_s,
        window_end_s=clip.windows.end_s,
    )


def embedding(
    clip: Clip, outputs: dict[str, np.ndarray], info: ModelInfo, granularity: Granularity, *, trim: bool = True
) -> Embedding:
    return Embedding(
        name=clip.name,
        duration_s=round(clip.audio.duration_s, 4),
        num_windows=len(clip.windows),
        granularity=granularity,
        vector=pool(granularity, outputs, clip.windows.num_samples, info, trim=trim),
        time_step_s=PATCH_SECONDS if granularity in ("time", "frame", "all") else None,
    )


# ----------------------------------------------------------------------------------------- Predictor


class Predictor:
    """Synchronous inference on one engine (an ONNX session, or a PyTorch checkpoint through its twin)."""

    def __init__(
        self,
        engine: Engine,
        *,
        hop_seconds: float | None = None,
        batch_size: int = 8,
        max_duration_s: float | None = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.engine = engine
        self.hop_samples = hop_samples_for(hop_seconds, engine.info.window_samples)
        self.batch_size = batch_size
        self.max_duration_s = max_duration_s
        self._warned_short_window = False

    @classmethod
    def from_onnx(
        cls, path: str | os.PathLike[str], *, provider: Provider = "auto",
        intra_op_threads: int = 0, **options: object,
    ) -> Predictor:
        """An exported ONNX file on onnxruntime (``provider``: auto = CUDA when available), or on OpenVINO
        in bf16 (``provider="openvino"``, CPU)."""
        from eat.engine import open_engine

        return cls(open_engine(Path(path), provider=provider, intra_op_threads=intra_op_threads), **options)  # type: ignore[arg-type]

    @classmethod
    def from_checkpoint(
        cls, path: str | os.PathLike[str], *, device: str = "cpu", window_seconds: float | None = 10.0,
        target_frames: int | None = None, teacher: bool = False, **options: object,
    ) -> Predictor:
        """Our ``.safetensors``, an official fairseq ``.pt`` or a Hugging Face folder, run in PyTorch.

        Needs the ``train`` extra (torch). The window and frames follow ``eat export``'s rules, so the
        answers equal those of the file ``eat export`` would write from the same checkpoint;
        ``window_seconds=None`` fits the window to the frames (the original's exact crop).
        """
        from model.pipeline import TorchEngine  # torch only when a checkpoint is asked for

        engine = TorchEngine(path, device=device, window_seconds=window_seconds, target_frames=target_frames,
                             teacher=teacher)
        return cls(engine, **options)  # type: ignore[arg-type]

    @classmethod
    def open(cls, path: str | os.PathLike[str], **options: object) -> Predictor:
        """``from_onnx`` for ``.onnx`` files, else ``from_checkpoint``; options go to the one chosen."""
        return cls.from_onnx(path, **options) if str(path).endswith(".onnx") else cls.from_checkpoint(path, **options)

    @property
    def info(self) -> ModelInfo:
        return self.engine.info

    def close(self) -> None:
        self.engine.close()

    def __enter__(self) -> Predictor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def prepare(
        self, audio: AudioInput, *, sample_rate: int | None = None, mode: Mode = "windows", name: str | None = None
    ) -> Clip:
        clip = prepare(audio, info=self.info, mode=mode, hop_samples=self.hop_samples, sample_rate=sample_rate,
                       max_duration_s=self.max_duration_s, name=name)
        cropped_short = mode == "original" and len(clip.audio.samples) > self.info.window_samples
        if cropped_short and not self.info.covers_target_frames and not self._warned_short_window:
            self._warned_short_window = True
            logger.warning(
                "this model's window (%.3f s) covers fewer than its %d frames: frames past the window are "
                "padding, where the original crops real audio; export with --window-seconds %.3f for an "
                "exact match", self.info.window_s, self.info.target_frames,
                window_samples_for(self.info.target_frames) / self.info.sample_rate,
            )
        return clip

    def run(self, windows: Windows, outputs: tuple[str, ...]) -> dict[str, np.ndarray]:
        """The named outputs for every window, ``batch_size`` windows per engine call."""
        parts: dict[str, list[np.ndarray]] = {name: [] for name in outputs}
        for start in range(0, len(windows), self.batch_size):
            rows = slice(start, start + self.batch_size)
            out = self.engine.run(windows.waveform[rows], windows.num_samples[rows], outputs)
            for name in outputs:
                parts[name].append(out[name])
        return {name: np.concatenate(chunks) for name, chunks in parts.items()}

    def predict(
        self, audio: AudioInput, *, sample_rate: int | None = None, mode: Mode = "windows", name: str | None = None
    ) -> Prediction:
        """Class scores of a clip (a path, a file's bytes, or an array with its ``sample_rate``)."""
        if not self.info.has_classifier:
            raise ValueError(f"{self.info.model_name} has no classifier head; use embed()")
        clip = self.prepare(audio, sample_rate=sample_rate, mode=mode, name=name)
        return prediction(clip, self.run(clip.windows, ("logits",))["logits"], self.info.labels)

    def embed(
        self,
        audio: AudioInput,
        *,
        granularity: Granularity = "utterance",
        sample_rate: int | None = None,
        mode: Mode = "windows",
        name: str | None = None,
    ) -> Embedding:
        """An embedding of a clip; ``original`` mode keeps the padded token rows, as the original does."""
        outputs = outputs_for(granularity)
        clip = self.prepare(audio, sample_rate=sample_rate, mode=mode, name=name)
        return embedding(clip, self.run(clip.windows, outputs), self.info, granularity, trim=mode == "windows")


__all__ = [
    "Clip",
    "Embedding",
    "Event",
    "Prediction",
    "Predictor",
    "Tag",
    "WindowTags",
    "embedding",
    "prediction",
    "prepare",
]
