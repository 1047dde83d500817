"""Bulk inference benchmark: clips/s of ``eat.bulk`` with ``--engine local`` and ``--engine ray`` (a local Ray
of ``--ray-cpus`` CPUs, ``--num-actors`` actors) against the plain per-file loop (``Predictor.predict`` on
each path) and the engine alone (``Predictor.run`` on windows decoded beforehand), on the same clips.

The clips are generated (10 s of noise with a tone, 16 kHz WAV) so every run sees the same work. Each
pipeline writes a fresh output folder. The pipelines run interleaved ``--repeats`` times; the summary uses
each one's median (the best is kept too), since on a shared machine single runs measure the neighbours.
Ray's start-up (a local cluster: several seconds) is timed apart: a cluster is started once and then runs
many jobs, so the per-job figure excludes it; each job still starts its own actors, and that is timed.
Targets: Ray within 15 % of local; both >= 90 % of the engine alone.

    python bench/bulk.py --model /tmp/official.onnx        # e.g. `eat export` of the official fixture
    python bench/bulk.py --toy                             # the tests' contract model (no export needed)

Writes JSON (default ``bench/results/bulk.json``) and a PNG plot next to it.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import soundfile as sf

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from eat import Predictor  # noqa: E402
from eat.bulk import BulkSpec, run_bulk  # noqa: E402
from eat.bulk_ray import RayOptions  # noqa: E402
from eat.contract import SAMPLE_RATE  # noqa: E402
from eat.sources import list_sources  # noqa: E402


def write_clips(root: Path, count: int, seconds: float) -> list[Path]:
    rng = np.random.default_rng(0)
    t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    paths = []
    for i in range(count):
        wave = 0.05 * rng.standard_normal(len(t)) + 0.3 * np.sin(2 * np.pi * rng.uniform(200, 4000) * t)
        paths.append(root / f"d{i % 10}" / f"clip{i:04d}.wav")
        paths[-1].parent.mkdir(parents=True, exist_ok=True)
        sf.write(paths[-1], wave.astype(np.float32), SAMPLE_RATE, subtype="PCM_16")
    return paths


def build_toy(path: Path) -> Path:
    spec = importlib.util.spec_from_file_location("svc_toy_model", REPO_ROOT / "tests/unit/service/svc_toy_model.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.build_toy_model(path, target_frames=1024, embed_dim=64, num_classes=527, name="toy-contract")


# Every pipeline is timed the same way, from opening the model to the last result (no untimed warm-up),
# as a user's job runs: the bulk engines open their sessions inside run_bulk.


def engine_alone(model: Path, paths: list[Path], batch_size: int) -> float:
    """Clips/s of the engine only: every clip decoded and windowed beforehand (untimed), then the engine."""
    with Predictor.from_onnx(model, provider="cpu", batch_size=batch_size) as probe:
        clips = [probe.prepare(p) for p in paths]
    started = time.perf_counter()
    with Predictor.from_onnx(model, provider="cpu", batch_size=batch_size) as predictor:
        for clip in clips:
            predictor.run(clip.windows, ("logits",))
    return len(paths) / (time.perf_counter() - started)


def per_file_loop(model: Path, paths: list[Path], batch_size: int) -> float:
    """Clips/s of the obvious script: ``predict`` each path in turn (decode, window, engine, aggregate)."""
    started = time.perf_counter()
    with Predictor.from_onnx(model, provider="cpu", batch_size=batch_size) as predictor:
        for path in paths:
            predictor.predict(path).tags(12)
    return len(paths) / (time.perf_counter() - started)


def bulk(spec: BulkSpec, paths_root: Path, out: Path, engine: str, options: RayOptions | None) -> float:
    shutil.rmtree(out, ignore_errors=True)
    summary = run_bulk(spec, list_sources([str(paths_root)]), out, engine=engine,  # type: ignore[arg-type]
                       ray_options=options, progress=False)
    assert summary.failed == 0 and summary.processed == summary.files
    return summary.clips_per_s


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = ["engine alone", "per-file loop", "--engine local", "--engine ray"]
    values = [report["clips_per_s"][k] for k in ("engine_alone", "per_file_loop", "local", "ray")]
    fig, ax = plt.subplots(figsize=(7, 4))
    bars = ax.bar(names, values, color=["#777", "#999", "#1f77b4", "#ff7f0e"])
    ax.bar_label(bars, fmt="%.1f")
    ax.axhline(0.9 * values[0], color="r", linestyle=":", label="90 % of the engine alone")
    ax.set_xlabel(f"median of {report['meta']['repeats']} interleaved runs (shared machine)")
    ax.set_ylabel("clips / s")
    ax.legend(fontsize=8)
    meta = report["meta"]
    ax.set_title(f"{meta['model_name']}: {meta['clips']} x {meta['clip_seconds']:g} s clips, "
                 f"{meta['cpu_count']} CPUs, Ray {meta['num_actors']} actors", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=Path("models/default/model.onnx"))
    parser.add_argument("--toy", action="store_true", help="the stand-in contract model from the tests")
    parser.add_argument("--clips", type=int, default=200)
    parser.add_argument("--clip-seconds", type=float, default=10.0)
    parser.add_argument("--files-per-shard", type=int, default=25)
    parser.add_argument("--batch-size", type=int, default=1,
                        help="windows per engine call, for every pipeline (default 1: the fastest per window on "
                             "CPU here; 10 s clips are one window each, so the loops call the engine with 1)")
    parser.add_argument("--num-actors", type=int, default=2)
    parser.add_argument("--ray-cpus", type=int, default=2, help="CPUs of the local Ray cluster")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved runs per pipeline (median reported)")
    parser.add_argument("--out", type=Path, default=Path("bench/results/bulk.json"))
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="eat-bulk-bench-"))
    model = build_toy(work / "toy.onnx") if args.toy else args.model
    if not model.is_file():
        print(f"no model at {model}: build one with `eat demo` / `eat export`, or pass --toy", file=sys.stderr)
        return 2
    import ray

    try:
        paths = write_clips(work / "clips", args.clips, args.clip_seconds)
        spec = BulkSpec(model=str(model), task="predict", files_per_shard=args.files_per_shard,
                        batch_size=args.batch_size, provider="cpu")
        # Two actors share the CPUs with the decode tasks: each asks for (cpus - decode) / actors logical CPUs.
        decode_cpus = 0.5
        options = RayOptions(num_actors=args.num_actors, cpus_per_actor=(args.ray_cpus - decode_cpus) / args.num_actors,
                             decode_cpus=decode_cpus)
        started = time.perf_counter()
        ray.init(num_cpus=args.ray_cpus, include_dashboard=False, log_to_driver=False)
        ray_start_s = time.perf_counter() - started
        runs: dict[str, list[float]] = {"engine_alone": [], "per_file_loop": [], "local": [], "ray": []}
        for repeat in range(args.repeats):  # interleaved, so a busy spell on the machine hits every pipeline
            runs["engine_alone"].append(engine_alone(model, paths, args.batch_size))
            runs["per_file_loop"].append(per_file_loop(model, paths, args.batch_size))
            runs["local"].append(bulk(spec, work / "clips", work / "local.parquet", "local", None))
            runs["ray"].append(bulk(spec, work / "clips", work / "ray.parquet", "ray", options))
            print(f"repeat {repeat + 1}: " + "  ".join(f"{k} {v[-1]:.1f}" for k, v in runs.items()), flush=True)
        ray.shutdown()
        best = {k: round(max(v), 2) for k, v in runs.items()}
        median = {k: round(float(np.median(v)), 2) for k, v in runs.items()}
        summary = {
            "ray_vs_local": round(median["ray"] / median["local"], 3),
            "local_vs_engine": round(median["local"] / median["engine_alone"], 3),
            "ray_vs_engine": round(median["ray"] / median["engine_alone"], 3),
            "local_vs_per_file_loop": round(median["local"] / median["per_file_loop"], 3),
        }
        summary["ray_within_15pct_of_local"] = summary["ray_vs_local"] >= 0.85
        summary["both_at_least_90pct_of_engine"] = min(summary["local_vs_engine"], summary["ray_vs_engine"]) >= 0.9
        with Predictor.from_onnx(model, provider="cpu") as predictor:
            model_name = predictor.info.model_name
        report = {
            "meta": {
                "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "machine": platform.machine(),
                "cpu_count": os.cpu_count(),
                "shared_machine": "yes: other jobs may run beside the benchmark; "
                                  "the summary uses the median of interleaved runs",
                "model_path": str(model),
                "model_name": model_name,
                "clips": args.clips,
                "clip_seconds": args.clip_seconds,
                "files_per_shard": args.files_per_shard,
                "batch_size": args.batch_size,
                "num_actors": args.num_actors,
                "ray_cpus": args.ray_cpus,
                "cpus_per_actor": options.cpus_per_actor,
                "ray_start_s": round(ray_start_s, 2),
                "repeats": args.repeats,
            },
            "runs_clips_per_s": {k: [round(x, 2) for x in v] for k, v in runs.items()},
            "clips_per_s": median,
            "best_clips_per_s": best,
            "summary": summary,
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
        plot(report, args.out.with_suffix(".png"))
        print(json.dumps({"median_clips_per_s": median, **summary}, indent=2))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
