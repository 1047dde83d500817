"""Whole clips cut into the model's windows, for evaluation that scores clips as the service does.

EAT evaluates the first ``target_length`` frames of each clip (reference §1.3); the service and
``eat predict`` cover the whole clip with windows and take the max over them. ``ClipWindows`` yields a
clip's windows (cut by ``eat.contract.cut_windows``, the service's own cutter) with the clip's index,
so ``training.evaluate.evaluate`` can aggregate rows back into clips and the two figures compare.
"""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader, Dataset

from eat.contract import cut_windows
from training.data.dataset import load_audio
from training.data.manifest import Manifest


class ClipWindows(Dataset):
    """Item ``i``: ``{"waveform": [W, S], "num_samples": [W], "target": [C], "clip": i}`` (multi-hot targets)."""

    def __init__(self, manifest: Manifest, window_samples: int) -> None:
        self.manifest = manifest
        self.window_samples = window_samples

    def __len__(self) -> int:
        return len(self.manifest.items)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor | int]:
        item = self.manifest.items[index]
        windows = cut_windows(load_audio(str(item.path)), window_samples=self.window_samples,
                              hop_samples=self.window_samples)
        target = torch.zeros(self.manifest.num_classes, dtype=torch.float32)
        target[list(item.targets)] = 1.0
        return {"waveform": torch.from_numpy(windows.waveform), "num_samples": torch.from_numpy(windows.num_samples),
                "target": target, "clip": index}


def collate_windows(clips: list[dict[str, torch.Tensor | int]]) -> dict[str, torch.Tensor]:
    """Windows of several clips as one batch; ``clip`` [B_windows] says which clip each row belongs to."""
    counts = [len(c["num_samples"]) for c in clips]
    return {
        "waveform": torch.cat([c["waveform"] for c in clips]),  # [sum W, S]
        "num_samples": torch.cat([c["num_samples"] for c in clips]),  # [sum W]
        "target": torch.stack([c["target"] for c in clips]).repeat_interleave(torch.tensor(counts), dim=0),
        "clip": torch.tensor([c["clip"] for c in clips]).repeat_interleave(torch.tensor(counts)),
    }


def window_loader(manifest: Manifest, window_samples: int, clips_per_batch: int, num_workers: int = 0) -> DataLoader:
    return DataLoader(ClipWindows(manifest, window_samples), batch_size=clips_per_batch, shuffle=False,
                      num_workers=num_workers, collate_fn=collate_windows)
