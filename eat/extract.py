"""``eat extract INPUT OUT``: embeddings of every clip of a file, folder or EAT manifest, saved as numpy.

Granularities (``eat.contract.pool``): ``all`` [1+N, D], ``frame`` [N, D] (the original's ~50 Hz patch
tokens, time-major), ``utterance`` [D] (CLS), ``mean`` [D], ``time`` [T, D] (one row per 160 ms).

Outputs: a folder gets one ``.npy`` per clip, mirroring the input tree (``a/b.wav`` -> ``OUT/a/b.npy``);
``OUT.npz`` gets one file keyed by the clip's relative path; ``OUT.parquet`` is a sharded Parquet dataset
(a folder: one row per window, errors table, resumable; ``eat.bulk``), with ``--engine local`` (default)
or ``--engine ray``. Every clip is written
atomically (a temporary name, then a rename), so a killed run leaves only whole files, and a rerun
skips what is already there: for ``.npz`` the clips gather in ``OUT.parts/`` and are packed into the
single file at the end. A clip that cannot be decoded is reported and skipped; the others are
still written, and the exit status is 1.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import shutil
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
from tqdm import tqdm

from eat.audio import AudioError
from eat.bulk import add_engine_arguments, run_from_args
from eat.contract import GRANULARITIES, Granularity
from eat.inputs import Input, add_model_arguments, list_inputs, open_predictor
from eat.predictor import Mode, Predictor
from eat.sources import list_sources

logger = logging.getLogger(__name__)
Layout = Literal["npy", "npz", "parquet"]


@dataclass
class ExtractSummary:
    written: int = 0
    skipped: int = 0  # already written by an earlier run
    failed: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    seconds: float = 0.0
    out: Path | None = None

    @property
    def clips_per_s(self) -> float:
        return self.written / self.seconds if self.seconds > 0 else 0.0


def layout_of(out: Path) -> Layout:
    return "npz" if out.suffix == ".npz" else "parquet" if out.suffix == ".parquet" else "npy"


def npy_name(rel: str) -> str:
    """``a/b.wav`` -> ``a/b.npy``: the folder tree mirrored, the audio suffix replaced."""
    return str(Path(rel).with_suffix(".npy"))


@contextlib.contextmanager
def atomic_file(path: Path) -> Iterator[Path]:
    """A temporary path beside ``path``, renamed onto it only if the block finishes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def save_npy(path: Path, array: np.ndarray) -> None:
    with atomic_file(path) as tmp, open(tmp, "wb") as f:
        np.save(f, np.ascontiguousarray(array, dtype=np.float32), allow_pickle=False)


def _check_names(inputs: list[Input]) -> None:
    seen: dict[str, str] = {}
    for item in inputs:
        name = npy_name(item.rel)
        if name in seen:
            raise ValueError(f"{seen[name]} and {item.rel} would both be written to {name}; rename one")
        seen[name] = item.rel


def extract(
    predictor: Predictor,
    inputs: list[Input],
    out: str | os.PathLike[str],
    *,
    granularity: Granularity = "frame",
    mode: Mode = "windows",
    progress: bool = True,
) -> ExtractSummary:
    """Embed every input into ``out`` (a folder, ``.npz`` or ``.parquet``), skipping what is already there."""
    out = Path(out)
    layout = layout_of(out)
    _check_names(inputs)
    parts = out if layout == "npy" else out.with_name(out.name + ".parts")
    summary = ExtractSummary(out=out)
    if layout != "npy" and out.exists() and not parts.exists():
        summary.skipped = len(inputs)  # packed by an earlier run that finished
        return summary
    started = time.perf_counter()
    bar = tqdm(total=len(inputs), unit="clip", desc="extract", disable=not progress, file=sys.stderr, smoothing=0.1)
    with bar:
        for item in inputs:
            target = parts / npy_name(item.rel)
            if target.exists():
                summary.skipped += 1
            else:
                try:
                    vector = predictor.embed(item.path, granularity=granularity, mode=mode, name=item.rel).vector
                except (AudioError, OSError) as err:
                    summary.failed.append((str(item.path), str(err)))
                    bar.write(f"eat extract: skipped {item.path}: {err}", file=sys.stderr)
                else:
                    save_npy(target, vector)
                    summary.written += 1
            bar.update(1)
    summary.seconds = time.perf_counter() - started
    if layout != "npy" and not summary.failed:
        pack(parts, out, [item.rel for item in inputs], layout, granularity)
        shutil.rmtree(parts)
    return summary


def pack(parts: Path, out: Path, rels: list[str], layout: Layout, granularity: str) -> None:
    """Gather the per-clip ``.npy`` parts into one ``.npz`` (keys: relative paths) or Parquet table."""
    arrays = {rel: np.load(parts / npy_name(rel)) for rel in rels}
    with atomic_file(out) as tmp:
        if layout == "npz":
            with open(tmp, "wb") as f:
                np.savez(f, **arrays)
            return
        try:
            import pyarrow as pa
            import pyarrow.parquet as pq
        except ImportError:
            raise ValueError("Parquet output needs pyarrow: pip install 'eat-audio[bulk]'") from None
        table = pa.table({
            "path": list(arrays),
            "granularity": [granularity] * len(arrays),
            "shape": [list(a.shape) for a in arrays.values()],
            "embedding": [a.ravel() for a in arrays.values()],
        })
        pq.write_table(table, tmp)


# ----------------------------------------------------------------------------------------- the command


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("input", help="an audio file, a folder (searched recursively) or an EAT .tsv manifest")
    parser.add_argument("out", help="a folder (one .npy per clip, mirroring the input tree), or a .npz / .parquet")
    parser.add_argument("--granularity", choices=GRANULARITIES, default="frame",
                        help="frame: patch tokens [N, D] (default, as the original); utterance: CLS [D]; "
                             "all: [1+N, D]; mean: [D]; time: [T, D], one row per 160 ms")
    add_model_arguments(parser)
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_engine_arguments(parser)


def run(args: argparse.Namespace) -> int:
    if layout_of(Path(args.out)) == "parquet":  # the bulk pipeline: local or Ray, sharded and resumable
        return run_from_args(args, task="embed", sources=list_sources([args.input]), out=args.out,
                             granularity=args.granularity)
    if args.engine != "local":
        raise ValueError("--engine ray writes Parquet: give an OUT ending in .parquet")
    inputs = list_inputs(args.input)
    if not inputs:
        raise ValueError(f"no audio files in {args.input}")
    out = Path(args.out)
    if len(inputs) == 1 and out.suffix == ".npy":  # one clip, one named array
        inputs = [Input(inputs[0].path, out.name)]
        out = out.parent
    with open_predictor(args) as predictor:
        summary = extract(predictor, inputs, out, granularity=args.granularity, mode=args.mode,
                          progress=not args.no_progress)
    print(f"eat extract: {summary.written} written, {summary.skipped} already done, {len(summary.failed)} failed "
          f"in {summary.seconds:.1f} s ({summary.clips_per_s:.1f} clips/s) -> {summary.out}")
    for path, reason in summary.failed:
        print(f"  failed: {path}: {reason}", file=sys.stderr)
    if summary.failed and layout_of(out) != "npy":
        print(f"  the other clips wait in {out.name}.parts/; fix or remove the failed files and rerun to pack them",
              file=sys.stderr)
    return 1 if summary.failed else 0
