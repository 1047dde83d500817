"""EAT's HDF5 audio shards (the official AS-2M storage, eat-reference.md §1.1 and §7.1), read and written.

The layout the official data loader reads (its ``h5_format``), which ``eat data pack`` writes:

- a shard is an HDF5 file named ``NN.h5`` (``00.h5``, ``01.h5``, ...) in the manifest's root directory;
- each clip is one dataset at the file's top level, named after the clip's file (``Y--0PQM4-hqg.wav``),
  holding a 1-D float array of samples in [-1, 1] at **32 kHz** (the official reader assumes that rate:
  it stores none); a 2-D ``[samples, channels]`` array is averaged over channels, as the original does;
- the manifest line is ``NN.h5/<dataset name><TAB><samples at 32 kHz>``, so ``min_sample_size`` counts
  32 kHz samples, as for any file at its native rate.

What we add, without breaking the official reader: shards we write carry a ``sample_rate`` attribute
(32000); when a shard has one, it wins over the 32 kHz assumption.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path

import h5py
import numpy as np

from training.data.manifest import DataError

SHARD_SAMPLE_RATE = 32_000  # the official shards' rate, assumed when a shard does not say (§7.1)
SHARD_SUFFIXES = (".h5", ".hdf5")


def locate(path: str | Path) -> tuple[Path, str] | None:
    """``(shard file, dataset name)`` when ``path`` points into a shard (``.../NN.h5/<name>``), else None."""
    path = Path(path)
    if path.parent.suffix.lower() in SHARD_SUFFIXES:
        return path.parent, path.name
    return None


def read_clip(shard: str | Path, name: str, max_seconds: float | None = None) -> tuple[np.ndarray, int]:
    """The clip's samples, float32 ``[S]`` or ``[S, channels]`` at the shard's rate, and that rate.

    ``max_seconds`` reads only the first part of the dataset (HDF5 reads slices without loading the
    rest), plus a few samples so a resampler's edge falls outside what the caller keeps.
    """
    try:
        with h5py.File(shard, "r") as f:
            if name not in f:
                raise DataError(f"{shard}: no dataset {name!r} in this HDF5 shard")
            dataset = f[name]
            if not isinstance(dataset, h5py.Dataset) or dataset.ndim not in (1, 2):
                raise DataError(f"{shard}/{name}: expected a 1-D (or [samples, channels]) audio array")
            rate = int(f.attrs.get("sample_rate", SHARD_SAMPLE_RATE))
            stop = None if max_seconds is None else math.ceil(max_seconds * rate) + 256
            data = np.asarray(dataset[:stop], dtype=np.float32)
    except OSError as err:  # h5py's error for missing, truncated or non-HDF5 files
        raise DataError(f"{shard}: cannot read HDF5 shard ({err})") from None
    return data, rate


def missing_clips(paths: Iterable[tuple[int, Path]]) -> list[tuple[int, Path]]:
    """Entries ``(line number, shard path/name)`` whose shard or dataset does not exist; each shard is
    opened once, so checking a 2M-clip manifest costs one key listing per shard."""
    by_shard: dict[Path, list[tuple[int, Path, str]]] = defaultdict(list)
    for line_no, path in paths:
        shard, name = locate(path) or (path, "")
        by_shard[shard].append((line_no, path, name))
    missing = []
    for shard, entries in by_shard.items():
        try:
            with h5py.File(shard, "r") as f:
                names = set(f.keys())
        except (OSError, FileNotFoundError):
            names = set()
        missing += [(line_no, path) for line_no, path, name in entries if name not in names]
    return sorted(missing)


def shard_name(index: int, num_shards: int) -> str:
    """``00.h5``, ``01.h5``, ... (the official names), wider when there are more than 100 shards."""
    return f"{index:0{max(2, len(str(num_shards - 1)))}d}.h5"


def write_shard(path: str | Path, clips: Iterable[tuple[str, np.ndarray]], sample_rate: int) -> None:
    """One shard: a 1-D float32 dataset per ``(name, samples)``, at ``sample_rate`` (stored as an attribute)."""
    with h5py.File(path, "w") as f:
        f.attrs["sample_rate"] = sample_rate
        for name, samples in clips:
            if "/" in name:
                raise DataError(f"dataset name {name!r} may not contain '/': the official reader splits on it")
            f.create_dataset(name, data=np.asarray(samples, dtype=np.float32))


__all__ = [
    "SHARD_SAMPLE_RATE",
    "SHARD_SUFFIXES",
    "locate",
    "missing_clips",
    "read_clip",
    "shard_name",
    "write_shard",
]
