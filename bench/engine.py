"""Engine benchmark: onnxruntime throughput (clips/s) and latency per batch size, fp32 and fp16, on
CPU and (when present) CUDA with IO binding, against PyTorch eager on the same device.

The models have random weights (speed does not depend on them) and are exported with
``training.export.export_onnx``, so what is timed is exactly the file the service loads, front end
included. Writes JSON (default ``bench/results/engine.json``) and a PNG plot next to it.

    python bench/engine.py                                   # EAT-base + tiny, CPU, batches 1 2 4 8
    python bench/engine.py --models base --providers cuda --batch-sizes 1,2,4,8,16,32,64,128,256
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from model.classifier import EATClassifier
from model.config import FrontendConfig, preset
from model.frontend import LogMelFrontend
from training.export import ClassifierHeads, WaveformModel, export_onnx

log = logging.getLogger("bench.engine")

CPU_BATCHES = (1, 2, 4, 8)
GPU_BATCHES = (1, 2, 4, 8, 16, 32, 64, 128, 256)
ORT_PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}


@dataclass(frozen=True)
class Result:
    model: str
    runtime: str  # "onnxruntime" | "torch-eager"
    provider: str  # "cpu" | "cuda"
    precision: str  # "fp32" | "fp16"
    batch_size: int
    latency_ms_median: float
    latency_ms_p90: float
    clips_per_s: float
    audio_s_per_s: float  # seconds of audio processed per wall-clock second


def time_calls(call: Callable[[], object], warmup: int, repeats: int) -> list[float]:
    """Wall-clock seconds of ``repeats`` calls after ``warmup`` untimed ones (``call`` must block)."""
    for _ in range(warmup):
        call()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return times


def summarise(times: list[float], batch: int, window_s: float, **labels: str) -> Result:
    median = statistics.median(times)
    p90 = float(np.percentile(times, 90))
    return Result(
        batch_size=batch,
        latency_ms_median=1e3 * median,
        latency_ms_p90=1e3 * p90,
        clips_per_s=batch / median,
        audio_s_per_s=batch * window_s / median,
        **labels,
    )


def clips(batch: int, window_samples: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    waveform = (0.1 * rng.standard_normal((batch, window_samples))).astype(np.float32)
    return waveform, np.full(batch, window_samples, dtype=np.int64)


def ort_session(path: Path, provider: str, threads: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    providers = [ORT_PROVIDERS[provider]] + (["CPUExecutionProvider"] if provider == "cuda" else [])
    session = ort.InferenceSession(str(path), options, providers=providers)
    if provider == "cuda" and session.get_providers()[0] != "CUDAExecutionProvider":
        raise RuntimeError("onnxruntime did not enable CUDAExecutionProvider (is onnxruntime-gpu installed?)")
    return session


def ort_runner(session: ort.InferenceSession, provider: str, batch: int, window: int) -> Callable[[], object]:
    """A blocking call that runs one batch. On CUDA the inputs are copied to the device once and the
    outputs stay there (IO binding), so the timing is the engine, not host transfers."""
    waveform, num_samples = clips(batch, window)
    outputs = [o.name for o in session.get_outputs()]
    if provider == "cpu":
        feeds = {"waveform": waveform, "num_samples": num_samples}
        return lambda: session.run(outputs, feeds)
    binding = session.io_binding()
    binding.bind_ortvalue_input("waveform", ort.OrtValue.ortvalue_from_numpy(waveform, "cuda", 0))
    binding.bind_ortvalue_input("num_samples", ort.OrtValue.ortvalue_from_numpy(num_samples, "cuda", 0))
    for name in outputs:
        binding.bind_output(name, "cuda", 0)

    def call() -> None:
        session.run_with_iobinding(binding)
        binding.synchronize_outputs()

    return call


def torch_runner(model: WaveformModel, device: str, precision: str, batch: int, window: int) -> Callable[[], object]:
    """PyTorch eager on the same inputs; fp16 = autocast for the encoder, the front end stays fp32."""
    waveform, num_samples = (torch.from_numpy(a).to(device) for a in clips(batch, window))
    model = model.to(device).eval()

    def call() -> None:
        with torch.inference_mode():
            fbank = model.frontend(waveform, num_samples)
            with torch.autocast(device, dtype=torch.float16, enabled=precision == "fp16"):
                model.heads(fbank)
        if device == "cuda":
            torch.cuda.synchronize()

    return call


def bench_model(size: str, args: argparse.Namespace, workdir: Path) -> list[Result]:
    torch.manual_seed(0)
    network = EATClassifier(preset(size, num_classes=527)).eval()
    network.init_weights()
    results: list[Result] = []
    for precision in args.precisions:
        path = workdir / f"eat-{size}-{precision}.onnx"
        report = export_onnx(
            network, path, fp16=precision == "fp16", window_seconds=args.window_seconds, name=f"eat-{size}"
        )
        log.info(
            "%s %s: %.0f MiB, fused %s, export+verify %.0f s",
            size,
            precision,
            report.size_bytes / 2**20,
            report.fusions,
            report.seconds,
        )
        for provider in args.providers:
            session = ort_session(path, provider, args.threads)
            for batch in args.batch_sizes:
                call = ort_runner(session, provider, batch, report.window_samples)
                times = time_calls(call, args.warmup, args.repeats)
                results.append(
                    summarise(
                        times,
                        batch,
                        args.window_seconds,
                        model=size,
                        runtime="onnxruntime",
                        provider=provider,
                        precision=precision,
                    )
                )
                log.info("%s", results[-1])
            del session
    if args.torch:  # the same front end (AudioSet normalisation, same frames) as the file holds
        frontend = LogMelFrontend(FrontendConfig(target_frames=report.target_frames))
        model = WaveformModel(frontend, ClassifierHeads(network))
        for provider in args.providers:
            # fp16 eager on a CPU is not a deployment choice; compare it on CUDA only.
            for precision in [p for p in args.precisions if provider == "cuda" or p == "fp32"]:
                for batch in args.batch_sizes:
                    call = torch_runner(model, provider, precision, batch, report.window_samples)
                    times = time_calls(call, args.warmup, args.repeats)
                    results.append(
                        summarise(
                            times,
                            batch,
                            args.window_seconds,
                            model=size,
                            runtime="torch-eager",
                            provider=provider,
                            precision=precision,
                        )
                    )
                    log.info("%s", results[-1])
    return results


def plot(results: list[Result], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = sorted({r.model for r in results})
    fig, axes = plt.subplots(2, len(models), figsize=(6 * len(models), 8), squeeze=False)
    for col, size in enumerate(models):
        series: dict[str, list[Result]] = {}
        for r in results:
            if r.model == size:
                series.setdefault(f"{r.runtime} {r.provider} {r.precision}", []).append(r)
        for label, rows in sorted(series.items()):
            rows.sort(key=lambda r: r.batch_size)
            batches = [r.batch_size for r in rows]
            axes[0][col].plot(batches, [r.clips_per_s for r in rows], marker="o", label=label)
            axes[1][col].plot(batches, [r.latency_ms_median for r in rows], marker="o", label=label)
        for row, ylabel in enumerate(("clips / s", "latency per batch (ms, median)")):
            ax = axes[row][col]
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("batch size")
            ax.set_ylabel(ylabel)
            ax.grid(True, which="both", alpha=0.3)
        axes[0][col].set_title(f"EAT-{size}")
        axes[0][col].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="base,tiny", help="comma list of presets (tiny, base, large)")
    parser.add_argument(
        "--batch-sizes", default=None, help=f"comma list (default {CPU_BATCHES} on CPU, {GPU_BATCHES} with CUDA)"
    )
    parser.add_argument("--window-seconds", type=float, default=10.0)
    parser.add_argument(
        "--providers", default=None, help="comma list of cpu, cuda (default: cuda if available, and cpu)"
    )
    parser.add_argument("--precisions", default="fp32,fp16", help="comma list of fp32, fp16")
    parser.add_argument("--threads", type=int, default=0, help="intra-op threads for ORT and torch (0 = default)")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per point")
    parser.add_argument("--warmup", type=int, default=2, help="untimed runs per point")
    parser.add_argument("--no-torch", dest="torch", action="store_false", help="skip the PyTorch eager baseline")
    parser.add_argument("--out", type=Path, default=Path("bench/results/engine.json"))
    args = parser.parse_args(argv)
    available = ort.get_available_providers()
    if args.providers is None:
        args.providers = ["cuda", "cpu"] if "CUDAExecutionProvider" in available else ["cpu"]
    else:
        args.providers = [p.strip() for p in args.providers.split(",") if p.strip()]
    for p in args.providers:
        if p not in ORT_PROVIDERS:
            parser.error(f"unknown provider {p!r}; choose from {sorted(ORT_PROVIDERS)}")
        if ORT_PROVIDERS[p] not in available:
            parser.error(f"{ORT_PROVIDERS[p]} is not available in this onnxruntime build ({available})")
    if args.batch_sizes is None:
        args.batch_sizes = list(GPU_BATCHES if "cuda" in args.providers else CPU_BATCHES)
    else:
        try:
            args.batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
        except ValueError:
            parser.error(f"--batch-sizes must be a comma list of integers, got {args.batch_sizes!r}")
        if any(b < 1 for b in args.batch_sizes):
            parser.error("batch sizes must be >= 1")
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    args.precisions = [p.strip() for p in args.precisions.split(",") if p.strip()]
    if not args.precisions or set(args.precisions) - {"fp32", "fp16"}:
        parser.error("--precisions takes fp32 and/or fp16")
    if not args.models:
        parser.error("--models needs at least one preset")
    if args.repeats < 1 or args.warmup < 0:
        parser.error("--repeats must be >= 1 and --warmup >= 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("onnx_ir", "onnxscript", "torch.onnx", "onnxruntime.transformers"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    if args.threads:
        torch.set_num_threads(args.threads)
    results: list[Result] = []
    with tempfile.TemporaryDirectory(prefix="eat-bench-") as tmp:
        for size in args.models:
            results.extend(bench_model(size, args, Path(tmp)))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "meta": {
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "machine": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "cuda_device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "onnxruntime": ort.__version__,
            "torch": torch.__version__,
            "window_seconds": args.window_seconds,
            "threads": args.threads,
            "repeats": args.repeats,
            "warmup": args.warmup,
            "weights": "random (EATClassifier.init_weights, 527 classes)",
        },
        "results": [asdict(r) for r in results],
    }
    args.out.write_text(json.dumps(payload, indent=2) + "\n")
    plot(results, args.out.with_suffix(".png"))
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")
    for r in results:
        print(
            f"{r.model:5s} {r.runtime:12s} {r.provider:4s} {r.precision} B={r.batch_size:<4d} "
            f"{r.latency_ms_median:9.1f} ms  {r.clips_per_s:8.2f} clips/s"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
