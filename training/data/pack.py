"""``eat data pack``: write a split's clips into EAT's HDF5 shards, so the official scripts' AS-2M data
path (``task.h5_format=true``) and ours read the same directory unchanged.

    eat data pack --data DIR --split train --out PACKED [--clips-per-shard 50000]

Writes into ``PACKED``: the shards ``00.h5``, ``01.h5``, ... (layout in ``training.data.hdf5``: one
32 kHz float32 dataset per clip, named after the clip's file), ``<split>.tsv`` listing
``NN.h5/<name><TAB><samples at 32 kHz>`` under the absolute ``PACKED`` root, ``<split>.lbl`` (same
rows, keys matching the new names) and copies of the label CSV and the ``weight_*.csv`` files. Clips keep
their manifest order, so line-aligned files (``.lbl``, weights) stay aligned. Every clip is packed, short
ones included: the readers apply ``min_sample_size`` themselves. Each shard is written to a temporary
file and renamed when complete, so an interrupted pack never leaves a half shard under a real name.

50 000 clips per shard (the default) gives about 41 shards for AS-2M, as the official copy has
(``00.h5`` ... ``40.h5``); 10 s at 32 kHz is 1.28 MB a clip, so about 64 GB a shard.
"""

from __future__ import annotations

import argparse
import logging
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import soxr

from model.files import atomic_path
from training.data import hdf5
from training.data.dataset import read_native
from training.data.manifest import LABEL_FILE_NAMES, DataError, _keys_for, read_lbl, read_tsv, write_lbl, write_tsv

logger = logging.getLogger(__name__)

DEFAULT_CLIPS_PER_SHARD = 50_000


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    pack = sub.add_parser("pack", help="write a split's clips into EAT's 32 kHz HDF5 shards (the AS-2M layout)")
    pack.add_argument("--data", required=True, type=Path, help="data directory holding <split>.tsv (+ .lbl)")
    pack.add_argument("--split", default="train", help="split to pack (default: train)")
    pack.add_argument("--out", required=True, type=Path, help="output directory for the shards and manifests")
    pack.add_argument(
        "--clips-per-shard",
        type=int,
        default=DEFAULT_CLIPS_PER_SHARD,
        help=f"clips per NN.h5 file (default: {DEFAULT_CLIPS_PER_SHARD})",
    )


def run(args: argparse.Namespace) -> int:
    summary = pack_split(args.data, args.split, args.out, clips_per_shard=args.clips_per_shard)
    print(
        f"packed {summary['num_clips']} clips of {args.data}/{args.split}.tsv into {summary['num_shards']} "
        f"shard(s) in {args.out} ({summary['seconds_of_audio'] / 3600:.2f} h at 32 kHz)"
    )
    return 0


def pack_split(
    data_dir: str | Path, split: str, out_dir: str | Path, *, clips_per_shard: int = DEFAULT_CLIPS_PER_SHARD
) -> dict[str, int | float]:
    """Pack ``data_dir/<split>.tsv`` into ``out_dir``; returns counts (clips, shards, seconds of audio)."""
    data_dir, out_dir = Path(data_dir), Path(out_dir).resolve()
    if clips_per_shard < 1:
        raise ValueError(f"--clips-per-shard must be at least 1, got {clips_per_shard}")
    root, entries = read_tsv(data_dir / f"{split}.tsv")
    if not entries:
        raise DataError(f"{data_dir / f'{split}.tsv'}: lists no clips")
    names = _dataset_names(data_dir / f"{split}.tsv", [rel for rel, _ in entries])
    lbl_path = data_dir / f"{split}.lbl"
    rows = read_lbl(lbl_path) if lbl_path.is_file() else None
    if rows is not None and len(rows) != len(entries):
        raise DataError(f"{lbl_path}: {len(rows)} lines but {split}.tsv lists {len(entries)} clips")
    if (out_dir / f"{split}.tsv").exists():
        raise DataError(f"{out_dir} already holds {split}.tsv; pack into an empty directory")
    out_dir.mkdir(parents=True, exist_ok=True)

    from tqdm.auto import tqdm

    num_shards = -(-len(entries) // clips_per_shard)
    sources = [(root / rel, name) for (rel, _), name in zip(entries, names, strict=True)]
    new_entries: list[tuple[str, int]] = []
    total_samples = 0
    with tqdm(total=len(entries), unit="clip", desc="pack", disable=None) as bar:
        for shard_index in range(num_shards):
            shard = hdf5.shard_name(shard_index, num_shards)
            start = shard_index * clips_per_shard
            chunk = sources[start : start + clips_per_shard]
            lengths: list[int] = []
            with atomic_path(out_dir / shard) as tmp:
                hdf5.write_shard(tmp, _read_chunk(chunk, lengths, bar), hdf5.SHARD_SAMPLE_RATE)
            new_entries += [(f"{shard}/{name}", n) for (_, name), n in zip(chunk, lengths, strict=True)]
            total_samples += sum(lengths)
            logger.info("wrote %s (%d clips)", out_dir / shard, len(chunk))

    if rows is not None:
        # Keep each key when it still names its clip (EAT's keys are the file stems), else use the stem.
        write_lbl(
            out_dir / f"{split}.lbl",
            [
                (key if key in _keys_for(rel) else Path(rel).stem, labels)
                for (key, labels), (rel, _) in zip(rows, new_entries, strict=True)
            ],
        )
    for extra in [*(data_dir / name for name in LABEL_FILE_NAMES), *sorted(data_dir.glob("weight_*.csv"))]:
        if extra.is_file():
            shutil.copyfile(extra, out_dir / extra.name)
    write_tsv(out_dir / f"{split}.tsv", out_dir, new_entries)  # last: its presence means "complete"
    return {
        "num_clips": len(new_entries),
        "num_shards": num_shards,
        "seconds_of_audio": total_samples / hdf5.SHARD_SAMPLE_RATE,
    }


def _read_chunk(chunk: list[tuple[Path, str]], lengths: list[int], bar: Any) -> Iterator[tuple[str, np.ndarray]]:
    """``(name, 32 kHz samples)`` per clip, read one at a time; records each length in ``lengths``."""
    for path, name in chunk:
        samples = _at_shard_rate(path)
        lengths.append(len(samples))
        bar.update(1)
        yield name, samples


def _dataset_names(tsv_path: Path, rel_paths: list[str]) -> list[str]:
    """Each clip's dataset name: its file name, which must be unique (the official reader takes the
    last path component as the key)."""
    names = [Path(rel.replace("\\", "/")).name for rel in rel_paths]
    first_line: dict[str, int] = {}
    for line_no, name in enumerate(names, start=2):
        if name in first_line:
            raise DataError(
                f"{tsv_path}:{line_no}: file name {name!r} repeats line {first_line[name]}; HDF5 shards name "
                "each clip by its file name, so file names must be unique"
            )
        first_line[name] = line_no
    return names


def _at_shard_rate(path: Path) -> np.ndarray:
    """Mono float32 samples at the shards' 32 kHz (averaged channels; soxr HQ when the rate differs)."""
    data, rate = read_native(path)
    mono = data.mean(axis=1) if data.ndim == 2 else data
    if rate != hdf5.SHARD_SAMPLE_RATE and len(mono):
        mono = soxr.resample(mono, rate, hdf5.SHARD_SAMPLE_RATE, quality="HQ")
    return np.ascontiguousarray(mono, dtype=np.float32)


__all__ = ["DEFAULT_CLIPS_PER_SHARD", "add_arguments", "pack_split", "run"]
