"""A torch ``Dataset`` of raw 16 kHz mono waveforms, and the collate that batches them.

Loading stays cheap on purpose: decode, average channels, resample, crop or pad. The log-mel front end,
augmentation and normalisation run later, batched on the device (``model.frontend.LogMelFrontend``,
``training.augment``). The whole-clip DC removal of reference §1.1 step 4 is the front end's job too
(it must happen identically in the exported graph), so waveforms here are exactly what the file holds.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Literal

import numpy as np
import soundfile as sf
import soxr
import torch
from torch.utils.data import Dataset

from eat.contract import SAMPLE_RATE
from training.data import hdf5
from training.data.manifest import DataError, Manifest

TargetMode = Literal["multi_hot", "index", "none"]


def load_audio(path: str, max_samples: int | None = None) -> np.ndarray:
    """Float32 mono 16 kHz samples of ``path``; at most the first ``max_samples`` (output rate).

    ``path`` is an audio file, or a clip inside an HDF5 shard (``.../NN.h5/<name>``, EAT's AS-2M
    storage at 32 kHz, ``training.data.hdf5``). soundfile's float decoding (PCM_16 / 32768, never int16
    values, reference §9.9); channels are averaged (EAT's training data path); other rates go through
    soxr's high-quality resampler (EAT uses torchaudio's sinc kernel, which differs in the last bits,
    §9.21). Only the frames needed for ``max_samples`` are read, plus a margin so the resampler's edge
    stays outside the kept part.
    """
    max_seconds = None if max_samples is None else max_samples / SAMPLE_RATE
    data, rate = read_native(path, max_seconds)
    wave = data.mean(axis=1) if data.ndim == 2 else data
    if rate != SAMPLE_RATE and len(wave):
        wave = soxr.resample(wave, rate, SAMPLE_RATE, quality="HQ")
    if max_samples is not None:
        wave = wave[:max_samples]
    return np.ascontiguousarray(wave, dtype=np.float32)


def read_native(path: str | Path, max_seconds: float | None = None) -> tuple[np.ndarray, int]:
    """A clip's float32 samples (``[S]`` or ``[S, channels]``) at its stored rate, and that rate: from an
    audio file or an HDF5 shard; at most the first ``max_seconds`` (plus a small margin)."""
    located = hdf5.locate(path)
    if located is not None:
        return hdf5.read_clip(*located, max_seconds=max_seconds)
    return _read_file(str(path), max_seconds)


def _read_file(path: str, max_seconds: float | None) -> tuple[np.ndarray, int]:
    """An audio file's float32 ``[S, channels]`` samples at its own rate (the first ``max_seconds``)."""
    try:
        with sf.SoundFile(path) as f:
            rate = f.samplerate
            frames = -1
            if max_seconds is not None:
                frames = math.ceil(max_seconds * rate) + (0 if rate == SAMPLE_RATE else 256)
            return f.read(frames=frames, dtype="float32", always_2d=True), rate
    except (sf.LibsndfileError, RuntimeError, TypeError) as err:
        raise DataError(f"{path}: cannot decode audio ({err})") from None


class AudioDataset(Dataset):
    """Items of a ``Manifest`` as ``{"waveform": [S], "num_samples": int, "target": ...}``.

    ``clip_samples``: every waveform is cut to its *first* ``clip_samples`` (EAT never crops at random,
    §1.3) or zero-padded to that length; ``num_samples`` says how many samples are real.
    ``target``: ``"multi_hot"`` -> float32 [C] (one-hot for single-label data, as EAT trains ESC-50 and
    SPC-2), ``"index"`` -> int64 class index (single-label only), ``"none"`` -> no target (pre-training).
    """

    def __init__(self, manifest: Manifest, clip_samples: int, target: TargetMode = "multi_hot") -> None:
        if clip_samples <= 0:
            raise ValueError(f"clip_samples must be positive, got {clip_samples}")
        if target not in ("multi_hot", "index", "none"):
            raise ValueError(f"target must be 'multi_hot', 'index' or 'none', got {target!r}")
        if target != "none" and manifest.num_classes == 0:
            raise DataError(f"split {manifest.name!r} has no labels; use target='none' for unlabelled data")
        if target == "index" and not manifest.is_single_label:
            raise DataError(f"split {manifest.name!r} has clips with 0 or several labels; use 'multi_hot'")
        self.manifest = manifest
        self.clip_samples = clip_samples
        self.target = target

    def __len__(self) -> int:
        return len(self.manifest.items)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor | int]:
        item = self.manifest.items[index]
        wave = load_audio(str(item.path), self.clip_samples)
        out = np.zeros(self.clip_samples, dtype=np.float32)
        out[: len(wave)] = wave
        sample: dict[str, torch.Tensor | int] = {"waveform": torch.from_numpy(out), "num_samples": len(wave)}
        if self.target == "multi_hot":
            multi_hot = torch.zeros(self.manifest.num_classes, dtype=torch.float32)
            multi_hot[list(item.targets)] = 1.0
            sample["target"] = multi_hot
        elif self.target == "index":
            sample["target"] = item.targets[0]
        return sample


def collate(samples: list[dict[str, torch.Tensor | int]]) -> dict[str, torch.Tensor]:
    """``{"waveform": [B, S] float32, "num_samples": [B] int64, "target": [B, C] float32 or [B] int64}``."""
    batch = {
        "waveform": torch.stack([s["waveform"] for s in samples]),  # [B, S]
        "num_samples": torch.tensor([s["num_samples"] for s in samples], dtype=torch.int64),  # [B]
    }
    if "target" in samples[0]:
        first = samples[0]["target"]
        if isinstance(first, torch.Tensor):
            batch["target"] = torch.stack([s["target"] for s in samples])  # [B, C]
        else:
            batch["target"] = torch.tensor([s["target"] for s in samples], dtype=torch.int64)  # [B]
    return batch
