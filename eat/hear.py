"""The HEAR benchmark's API (Holistic Evaluation of Audio Representations), so EAT can be scored by
its tooling unchanged: ``python -m heareval.embeddings.runner eat.hear --model models/x/model.onnx``.

HEAR calls ``load_model(path)``, then ``get_scene_embeddings(audio, model)`` ->
``[n_sounds, D]`` and ``get_timestamp_embeddings(audio, model)`` -> ``([n_sounds, T, D], [n_sounds, T])``
with timestamps in milliseconds, for audio ``[n_sounds, n_samples]`` at ``model.sample_rate``. What we
return, and why:

- scene: the CLS ("utterance") vector, averaged over windows — EAT's clip-level feature;
- timestamps: one vector per 160 ms token row (its 8 frequency patches averaged), stamped at the
  centre of the audio the row sees (16 frames of 10 ms hop and 25 ms length: 2 800 samples from
  ``2 560·t``, so ``160·t + 87.5`` ms), rows of consecutive windows following each other.

The audio may be a torch tensor (as HEAR passes it; the answers are then torch tensors on its device)
or a numpy array. No PyTorch is needed for ONNX models.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from eat.contract import FRAME_LENGTH_SAMPLES, FRAME_SHIFT_SAMPLES, PATCH_FRAMES, SAMPLE_RATE, valid_time_patches
from eat.predictor import Predictor, embedding

DEFAULT_MODEL = "models/default/model.onnx"
_ROW_CENTRE_MS = ((PATCH_FRAMES - 1) * FRAME_SHIFT_SAMPLES + FRAME_LENGTH_SAMPLES) / 2 / SAMPLE_RATE * 1000  # 87.5


class HearModel:
    """What HEAR's runner holds between calls: the predictor and the attributes the API requires."""

    sample_rate = SAMPLE_RATE

    def __init__(self, predictor: Predictor) -> None:
        self.predictor = predictor
        self.scene_embedding_size = predictor.info.embedding_dim
        self.timestamp_embedding_size = predictor.info.embedding_dim


def load_model(model_file_path: str = "", **options: Any) -> HearModel:
    """An ONNX file (or a checkpoint, with torch installed); ``""`` is the default model."""
    return HearModel(Predictor.open(model_file_path or os.environ.get("EAT_MODEL_PATH", DEFAULT_MODEL), **options))


def _as_numpy(audio: Any) -> tuple[np.ndarray, Any]:
    """``[n_sounds, n_samples]`` float32 numpy, and a function turning results back into the input's type."""
    if hasattr(audio, "detach"):  # a torch tensor: answer with tensors on the same device
        device = audio.device
        import torch

        return audio.detach().cpu().float().numpy(), lambda x: torch.from_numpy(x).to(device)
    return np.asarray(audio, dtype=np.float32), lambda x: x


def _check(audio: np.ndarray) -> None:
    if audio.ndim != 2:
        raise ValueError(f"HEAR audio must be [n_sounds, n_samples], got shape {audio.shape}")


def get_scene_embeddings(audio: Any, model: HearModel) -> Any:
    """``[n_sounds, D]``: each sound's CLS vector, averaged over its windows."""
    batch, back = _as_numpy(audio)
    _check(batch)
    rows = [model.predictor.embed(sound, sample_rate=SAMPLE_RATE, granularity="utterance").vector for sound in batch]
    return back(np.stack(rows).astype(np.float32))


def get_timestamp_embeddings(audio: Any, model: HearModel) -> tuple[Any, Any]:
    """``([n_sounds, T, D], [n_sounds, T])``: one vector per 160 ms token row, timestamps in ms."""
    batch, back = _as_numpy(audio)
    _check(batch)
    predictor = model.predictor
    embeddings, stamps = [], []
    for sound in batch:
        clip = predictor.prepare(sound, sample_rate=SAMPLE_RATE)
        windows = clip.windows
        rows = embedding(clip, predictor.run(windows, ("tokens",)), predictor.info, "time").vector  # [T, D]
        per_window = valid_time_patches(windows.num_samples, predictor.info.time_patches)
        times = np.concatenate([
            start / SAMPLE_RATE * 1000 + np.arange(n) * PATCH_FRAMES * FRAME_SHIFT_SAMPLES / SAMPLE_RATE * 1000
            for start, n in zip(windows.starts, per_window, strict=True)
        ]) + _ROW_CENTRE_MS
        embeddings.append(rows)
        stamps.append(times)
    if len({len(t) for t in stamps}) > 1:  # HEAR gives sounds of one length per call; guard the stack anyway
        raise ValueError("sounds of different lengths give different numbers of timestamps; pad them first")
    return back(np.stack(embeddings).astype(np.float32)), back(np.stack(stamps).astype(np.float32))
