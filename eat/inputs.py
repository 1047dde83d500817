"""What an offline job reads (one file, a folder searched recursively, or an EAT ``.tsv`` manifest) and
the options every offline command shares for opening a model.

Each input keeps the path it is known by relative to its root, so outputs can mirror the folder tree
(``a/b/c.wav`` -> ``OUT/a/b/c.npy``) and a rerun finds what it already wrote.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from eat.engine import PROVIDERS

if TYPE_CHECKING:
    from eat.predictor import Predictor

# What the decoder reads (eat.audio): soundfile's formats, and PyAV's containers for the rest.
AUDIO_SUFFIXES = frozenset(
    {".wav", ".flac", ".ogg", ".oga", ".opus", ".mp3", ".m4a", ".aac", ".mp4", ".webm", ".wma", ".aif", ".aiff"}
)
DEFAULT_MODEL = "models/default/model.onnx"


@dataclass(frozen=True)
class Input:
    path: Path  # where to read it
    rel: str  # its name under the input root, '/'-separated


def read_tsv(path: str | os.PathLike[str]) -> tuple[Path, list[tuple[str, int]]]:
    """EAT's manifest: the audio root on the first line, then ``relative/path<TAB>num_samples`` lines.

    A relative root is resolved against the manifest's folder, so a data directory can be moved.
    """
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise ValueError(f"{path}: file not found") from None
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: not UTF-8 text ({err})") from None
    while lines and not lines[-1].strip():
        lines.pop()
    if not lines or not lines[0].strip():
        raise ValueError(f"{path}:1: expected the audio root directory on the first line")
    root = Path(lines[0].strip())
    if not root.is_absolute():
        root = path.parent / root
    entries = []
    for line_no, line in enumerate(lines[1:], start=2):
        fields = line.split("\t")
        if len(fields) != 2 or not fields[0].strip():
            raise ValueError(f"{path}:{line_no}: expected 'relative_path<TAB>num_samples', got {line!r}")
        try:
            count = int(fields[1].strip())
        except ValueError:
            raise ValueError(f"{path}:{line_no}: num_samples {fields[1].strip()!r} is not an integer") from None
        if count < 0:
            raise ValueError(f"{path}:{line_no}: num_samples {count} is negative")
        entries.append((fields[0].strip(), count))
    return root, entries


def list_inputs(source: str | os.PathLike[str]) -> list[Input]:
    """The audio files of ``source``, sorted: a file, a folder (recursive, by suffix) or a ``.tsv``."""
    source = Path(source)
    if source.is_dir():
        files = sorted(p for p in source.rglob("*") if p.suffix.lower() in AUDIO_SUFFIXES and p.is_file())
        return [Input(p, p.relative_to(source).as_posix()) for p in files]
    if not source.exists():
        raise FileNotFoundError(f"{source}: no such file or folder")
    if source.suffix == ".tsv":
        root, entries = read_tsv(source)
        return [Input(root / rel, Path(rel).as_posix()) for rel, _ in entries]
    return [Input(source, source.name)]


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None,
                        help=f"an ONNX file, or a checkpoint (ours, fairseq .pt, HF folder; needs torch) "
                             f"(default: $EAT_MODEL_PATH or {DEFAULT_MODEL})")
    from eat.predictor import MODES  # here, not at the top: training's data code imports read_tsv alone

    parser.add_argument("--mode", choices=MODES, default="windows",
                        help="windows: cover the whole clip with the model's windows (default); original: only "
                             "the first target-length frames, exactly as the original EAT")
    parser.add_argument("--provider", choices=PROVIDERS, default="auto",
                        help="for ONNX files: onnxruntime auto/cpu/cuda, or openvino (bf16 on CPU) (default: auto)")
    parser.add_argument("--device", default="cpu", help="torch device for checkpoints (default: cpu)")
    parser.add_argument("--target-length", type=int, default=None,
                        help="frames the encoder sees, a multiple of 16 (checkpoints only; an ONNX file has its own)")
    parser.add_argument("--batch-size", type=int, default=8, help="windows per model call (default: 8)")


def open_predictor(args: argparse.Namespace, *, hop_seconds: float | None = None) -> Predictor:
    """The model of ``--model`` as a ``Predictor``, checked against ``--target-length``."""
    from eat.predictor import Predictor

    path = args.model or os.environ.get("EAT_MODEL_PATH") or DEFAULT_MODEL
    if not Path(path).exists():
        raise FileNotFoundError(f"model not found: {path} (pass --model, or run `eat demo` for the default model)")
    options = {"hop_seconds": hop_seconds, "batch_size": args.batch_size}
    if str(path).endswith(".onnx"):
        predictor = Predictor.from_onnx(path, provider=args.provider, **options)
        if args.target_length is not None and args.target_length != predictor.info.target_frames:
            raise ValueError(f"{path} was exported for {predictor.info.target_frames} frames; --target-length "
                             f"{args.target_length} needs `eat export --target-frames {args.target_length}`")
        return predictor
    # original: a window exactly as long as the frames, so a long clip is cropped where EAT crops it
    window_seconds = None if args.mode == "original" else 10.0
    return Predictor.from_checkpoint(path, device=args.device, window_seconds=window_seconds,
                                     target_frames=args.target_length, **options)
