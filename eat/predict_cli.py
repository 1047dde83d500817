"""``eat predict FILES...``: the top AudioSet (or your model's) labels of each clip, as a table or JSON.

The table is the original inference script's answer (top 12 by default); ``--timeline`` adds each
window's tags, ``--json`` prints the service's ``/predict`` result shape instead. A file that cannot be
decoded is reported on stderr and the others are still tagged; the exit status is then 1.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from eat.audio import AudioError
from eat.bulk import add_engine_arguments, run_from_args
from eat.events import Thresholds, read_thresholds
from eat.inputs import add_model_arguments, list_inputs, open_predictor
from eat.predictor import DEFAULT_TOP_K, Prediction, Tag
from eat.sources import list_sources


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("files", nargs="+", help="audio files, folders (searched recursively) or EAT .tsv manifests")
    add_model_arguments(parser)
    parser.add_argument("--top-k", type=int, default=DEFAULT_TOP_K, help=f"labels per clip (default: {DEFAULT_TOP_K})")
    parser.add_argument("--threshold", type=float, default=None, help="leave out labels scoring below this")
    parser.add_argument("--hop", type=float, default=None,
                        help="seconds between windows in windows mode (default: the window, no overlap)")
    parser.add_argument("--timeline", action="store_true", help="also show each window's labels")
    parser.add_argument("--json", action="store_true", help="print JSON (one object per file) instead of tables")
    parser.add_argument("--out", default=None,
                        help="write each window's top tags to this Parquet dataset (a folder, resumable) instead")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (with --out)")
    add_engine_arguments(parser)
    parser.add_argument("--events", action="store_true",
                        help="also list sound events (onset, offset, peak) per class; use a --hop under the window")
    parser.add_argument("--thresholds", default=None,
                        help='event thresholds JSON {"default": 0.5, "classes": {"Siren": 0.3}} (default: 0.5)')


def _row(rank: int, tag: Tag) -> str:
    return f"  {rank:>4}  {tag.score:.4f}  {tag.name}  ({tag.id})"


def format_table(p: Prediction, *, top_k: int, threshold: float | None, timeline: bool,
                 events: Thresholds | None = None) -> str:
    windows = "window" if p.num_windows == 1 else "windows"
    lines = [f"{p.name}  ({p.duration_s:.2f} s, {p.num_windows} {windows})", "  rank  score   label"]
    lines += [_row(rank, tag) for rank, tag in enumerate(p.tags(top_k, threshold), start=1)]
    if timeline:
        for w in p.timeline(top_k, threshold):
            lines.append(f"  [{w.start_s:8.2f} s - {w.end_s:8.2f} s]")
            lines += ["  " + _row(rank, tag) for rank, tag in enumerate(w.tags, start=1)]
    if events is not None:
        lines.append("  events: onset_s  offset_s  peak  label")
        lines += [f"  {e.onset_s:14.2f}  {e.offset_s:8.2f}  {e.peak_score:.4f}  {e.name}  ({e.id})"
                  for e in p.events(events)]
    return "\n".join(lines)


def as_json(p: Prediction, *, top_k: int, threshold: float | None, timeline: bool,
            events: Thresholds | None = None) -> dict:
    result = {
        "filename": p.name,
        "duration_s": p.duration_s,
        "num_windows": p.num_windows,
        "tags": [dataclasses.asdict(t) for t in p.tags(top_k, threshold)],
    }
    if timeline:
        result["timeline"] = [dataclasses.asdict(w) for w in p.timeline(top_k, threshold)]
    if events is not None:
        result["events"] = [dataclasses.asdict(e) for e in p.events(events)]
    return result


def run(args: argparse.Namespace) -> int:
    if args.top_k < 1:
        raise ValueError("--top-k must be at least 1")
    if args.out is not None:
        return run_from_args(args, task="predict", sources=list_sources(args.files), out=args.out,
                             top_k=args.top_k, hop_seconds=args.hop)
    if args.engine != "local":
        raise ValueError("--engine ray needs --out results.parquet")
    inputs = [item for source in args.files for item in list_inputs(source)]
    if not inputs:
        raise ValueError(f"no audio files in {' '.join(args.files)}")
    failed = 0
    with open_predictor(args, hop_seconds=args.hop) as predictor:
        if not predictor.info.has_classifier:
            raise ValueError(f"{predictor.info.model_name} has no classifier head; use `eat extract` for embeddings")
        events = None
        if args.events:
            events = read_thresholds(args.thresholds) if args.thresholds else Thresholds()
            events.for_labels(predictor.info.labels)  # a class the model lacks fails before any file
        options = {"top_k": args.top_k, "threshold": args.threshold, "timeline": args.timeline, "events": events}
        for item in inputs:
            try:
                p = predictor.predict(item.path, mode=args.mode, name=str(item.path))
            except (AudioError, OSError) as err:
                failed += 1
                print(f"eat predict: skipped {item.path}: {err}", file=sys.stderr)
                continue
            print(json.dumps(as_json(p, **options)) if args.json else format_table(p, **options) + "\n", flush=True)
    if failed:
        print(f"eat predict: {failed} of {len(inputs)} files failed", file=sys.stderr)
    return 1 if failed else 0
