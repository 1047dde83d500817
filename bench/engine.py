"""Engine benchmark: onnxruntime throughput (clips/s) and latency per batch size, fp32, fp16 and (CPU)
int8, on CPU and (when present) CUDA with IO binding, against PyTorch eager on the same device; and
bf16 on the CPU: the fp32 file through OpenVINO (``EAT_PROVIDER=openvino``), when it is installed.

The models have random weights (speed does not depend on them) and are exported with
``training.export.export_onnx``, so what is timed is exactly the file the service loads, front end
included, and each file passed the exporter's verification. The precisions are timed interleaved:
for each batch size every repeat runs each precision once in turn, so a neighbour's load on a
shared machine slows them alike and the ratios between them stay fair. Writes JSON (default
``bench/results/engine.json``, with each export's accuracy and the speed ratios to fp32) and a PNG
plot next to it.

    python bench/engine.py                                   # EAT-base + tiny, CPU, batches 1 2 4 8
    python bench/engine.py --models base --precisions fp32,fp16,int8,bf16 --threads 2
    python bench/engine.py --models base --providers cuda --batch-sizes 1,2,4,8,16,32,64,128,256
"""

from __future__ import annotations

import argparse
import importlib.util
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

from eat.contract import OUTPUT_NAMES
from model.classifier import EATClassifier
from model.config import FrontendConfig, preset
from model.frontend import LogMelFrontend
from model.pipeline import ClassifierHeads, WaveformModel
from training.export import ExportReport, export_onnx
from training.onnx_int8 import top_k_agreement

log = logging.getLogger("bench.engine")

CPU_BATCHES = (1, 2, 4, 8)
GPU_BATCHES = (1, 2, 4, 8, 16, 32, 64, 128, 256)
ORT_PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}
PRECISIONS = ("fp32", "fp16", "int8", "bf16")  # bf16: the fp32 file on OpenVINO (CPU)
HAS_OPENVINO = importlib.util.find_spec("openvino") is not None


@dataclass(frozen=True)
class Result:
    model: str
    runtime: str  # "onnxruntime" | "openvino" | "torch-eager"
    provider: str  # "cpu" | "cuda"
    precision: str  # "fp32" | "fp16" | "int8" | "bf16"
    batch_size: int
    latency_ms_median: float
    latency_ms_p90: float
    clips_per_s: float
    audio_s_per_s: float  # seconds of audio processed per wall-clock second


def time_calls(call: Callable[[], object], warmup: int, repeats: int) -> list[float]:
    """Wall-clock seconds of ``repeats`` calls after ``warmup`` untimed ones (``call`` must block)."""
    return time_interleaved({"only": call}, warmup, repeats)["only"]


def time_interleaved(calls: dict[str, Callable[[], object]], warmup: int, repeats: int) -> dict[str, list[float]]:
    """Like ``time_calls`` for several calls at once: each round runs every call once, in turn, so
    load that comes and goes during the run falls on all of them alike."""
    for call in calls.values():
        for _ in range(warmup):
            call()
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(repeats):
        for name, call in calls.items():
            start = time.perf_counter()
            call()
            times[name].append(time.perf_counter() - start)
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


def openvino_runner(engine: object, batch: int, window: int) -> Callable[[], object]:
    waveform, num_samples = clips(batch, window)
    return lambda: engine.run(waveform, num_samples, OUTPUT_NAMES)


def bf16_accuracy(engine: object, fp32: ort.InferenceSession, window: int) -> dict:
    """bf16 against the fp32 file on onnxruntime, in the exporter's terms, on 8 clips at -40..-6 dBFS."""
    from eat.engine_openvino import BF16_RELATIVE_TOLERANCE

    rng = np.random.default_rng(1)
    tone = np.sin(2 * np.pi * 440 * np.arange(window) / 16_000)
    waveform = np.stack([10 ** rng.uniform(-2, -0.3) * (rng.standard_normal(window) + (i % 2) * tone)
                         for i in range(8)]).astype(np.float32)
    num_samples = np.full(8, window, dtype=np.int64)
    names = [o.name for o in fp32.get_outputs()]
    want = dict(zip(names, fp32.run(names, {"waveform": waveform, "num_samples": num_samples}), strict=True))
    got = engine.run(waveform, num_samples, tuple(names))
    relative = {k: float(np.abs(got[k] - want[k]).max()) / max(1.0, float(np.abs(want[k]).max())) for k in names}
    return {"reference": "the fp32 file on onnxruntime", "max_relative_diff": relative,
            "tolerance": BF16_RELATIVE_TOLERANCE, "top5_agreement": top_k_agreement(got["logits"], want["logits"], 5)}


def export_accuracy(report: ExportReport) -> dict:
    """What the exporter measured against PyTorch on its check inputs (and int8 check clips)."""
    return {
        "size_mib": round(report.size_bytes / 2**20, 1),
        "max_abs_diff": report.max_abs_diff,
        "tolerance": report.tolerance,
        "top5_agree": report.top5_agree,
        "top5_agreement": report.top5_agreement,
    }


def bench_model(size: str, args: argparse.Namespace, workdir: Path, accuracy: dict) -> list[Result]:
    torch.manual_seed(0)
    network = EATClassifier(preset(size, num_classes=527)).eval()
    network.init_weights()
    results: list[Result] = []
    paths: dict[str, Path] = {}
    for precision in [p for p in args.precisions if p != "bf16"]:  # bf16 runs the fp32 file
        path = workdir / f"eat-{size}-{precision}.onnx"
        report = export_onnx(
            network,
            path,
            fp16=precision == "fp16",
            int8=precision == "int8",
            window_seconds=args.window_seconds,
            name=f"eat-{size}",
        )
        paths[precision] = path
        accuracy[f"{size} {precision}"] = export_accuracy(report)
        log.info(
            "%s %s: %.0f MiB, fused %s, export+verify %.0f s, max abs diff %s, top-5 set agreement %s",
            size,
            precision,
            report.size_bytes / 2**20,
            report.fusions,
            report.seconds,
            {k: f"{v:.2g}" for k, v in report.max_abs_diff.items()},
            report.top5_agreement,
        )
    for provider in args.providers:
        sessions = {p: ort_session(paths[p], provider, args.threads) for p in paths}
        bf16 = None
        if "bf16" in args.precisions:  # parse_args allows it on CPU only, and with fp32
            from eat.engine_openvino import OpenVinoEngine

            bf16 = OpenVinoEngine(paths["fp32"], threads=args.threads, precision="bf16")
            accuracy[f"{size} bf16"] = bf16_accuracy(bf16, sessions["fp32"], report.window_samples)
            log.info("%s bf16 (openvino) vs fp32: %s", size, accuracy[f"{size} bf16"])
        for batch in args.batch_sizes:
            calls = {p: ort_runner(s, provider, batch, report.window_samples) for p, s in sessions.items()}
            if bf16 is not None:
                calls["bf16"] = openvino_runner(bf16, batch, report.window_samples)
            for precision, times in time_interleaved(calls, args.warmup, args.repeats).items():
                results.append(
                    summarise(
                        times,
                        batch,
                        args.window_seconds,
                        model=size,
                        runtime="openvino" if precision == "bf16" else "onnxruntime",
                        provider=provider,
                        precision=precision,
                    )
                )
                log.info("%s", results[-1])
        del sessions, bf16
    if args.torch:  # the same front end (AudioSet normalisation, same frames) as the file holds
        frontend = LogMelFrontend(FrontendConfig(target_frames=report.target_frames))
        model = WaveformModel(frontend, ClassifierHeads(network))
        for provider in args.providers:
            # fp16 eager on a CPU is not a deployment choice, nor int8 eager anywhere: fp32 on CPU, fp16 on CUDA.
            for precision in [p for p in args.precisions if p == "fp32" or (provider == "cuda" and p == "fp16")]:
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


def speed_ratios(results: list[Result]) -> dict[str, dict[str, float]]:
    """``"<model> <provider> <precision>/fp32" -> {batch: clips/s ratio}`` for onnxruntime and openvino rows."""
    fp32 = {
        (r.model, r.provider, r.batch_size): r.clips_per_s
        for r in results
        if r.runtime == "onnxruntime" and r.precision == "fp32"
    }
    ratios: dict[str, dict[str, float]] = {}
    for r in results:
        base = fp32.get((r.model, r.provider, r.batch_size))
        if r.runtime in ("onnxruntime", "openvino") and r.precision != "fp32" and base:
            key = f"{r.model} {r.provider} {r.precision}/fp32"
            ratios.setdefault(key, {})[str(r.batch_size)] = round(r.clips_per_s / base, 3)
    return ratios


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
    parser.add_argument(
        "--precisions",
        default=None,
        help="comma list of fp32, fp16, int8, bf16 (default: all on CPU, bf16 only with openvino installed; "
        "fp32 and fp16 with CUDA)",
    )
    parser.add_argument("--threads", type=int, default=0, help="intra-op threads for ORT and torch (0 = default)")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per point")
    parser.add_argument("--warmup", type=int, default=2, help="untimed runs per point")
    parser.add_argument("--no-torch", dest="torch", action="store_false", help="skip the PyTorch eager baseline")
    parser.add_argument("--out", type=Path, default=Path("bench/results/engine.json"))
    parser.add_argument(
        "--keep-models", type=Path, default=None, help="write the exported files here (eat-<model>-<precision>.onnx)"
    )
    parser.add_argument("--note", default="", help="free text for the JSON, e.g. what else loaded the machine")
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
    if args.precisions is None:
        skip = set() if HAS_OPENVINO else {"bf16"}
        if "cuda" in args.providers:
            skip |= {"int8", "bf16"}  # the CPU precisions
        args.precisions = [p for p in PRECISIONS if p not in skip]
    else:
        args.precisions = [p.strip() for p in args.precisions.split(",") if p.strip()]
    if (
        not args.precisions
        or set(args.precisions) - set(PRECISIONS)
        or len(set(args.precisions)) < len(args.precisions)
    ):
        parser.error(f"--precisions takes distinct values from {', '.join(PRECISIONS)}")
    if "int8" in args.precisions and "cuda" in args.providers:
        # onnxruntime's CUDA provider has no kernel for the int8 MatMuls; they would run on the CPU.
        parser.error("int8 is a CPU precision; leave it out with --providers cuda")
    if "bf16" in args.precisions:
        if "cuda" in args.providers:
            parser.error("bf16 runs on the CPU through OpenVINO; leave it out with --providers cuda")
        if "fp32" not in args.precisions:
            parser.error("bf16 runs the fp32 file and is compared with it: add fp32 to --precisions")
        if not HAS_OPENVINO:
            parser.error("bf16 needs OpenVINO: pip install 'eat-audio[openvino]'")
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
    accuracy: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="eat-bench-") as tmp:
        workdir = args.keep_models or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        for size in args.models:
            results.extend(bench_model(size, args, workdir, accuracy))
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
            "note": args.note,
        },
        "command": "python bench/engine.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "export_accuracy": accuracy,
        "speed_ratios": speed_ratios(results),
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
    for key, per_batch in payload["speed_ratios"].items():
        print(f"{key}: " + ", ".join(f"B={b} {x:.2f}x" for b, x in per_batch.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
