"""bf16 on the CPU's AMX / AVX-512 BF16 units through OpenVINO's onnxruntime provider, against our fp32
and int8 files on the CPU provider: is a bf16 path worth it? (issue 11)

onnxruntime's own CPU provider has no bf16 GEMM for x86 (its only bf16 switch,
``mlas.enable_gemm_fastmath_arm64_bfloat16``, is for Arm), so bf16 needs OpenVINO. ``onnxruntime-openvino``
replaces ``onnxruntime`` (same import name), so run this from a throwaway environment, never the
project's:

    python3 -m venv /tmp/ov && /tmp/ov/bin/pip install onnxruntime-openvino onnx numpy
    /tmp/ov/bin/python bench/openvino_bf16.py --fp32 eat-base-fp32.onnx --int8 eat-base-int8.onnx

The fp32 file is cut at the ``fbank`` tensor into the front end and the encoder. OpenVINO runs the
encoder with ``INFERENCE_PRECISION_HINT=bf16``; the front end stays on onnxruntime's CPU provider,
because OpenVINO computes its float64 DFT in lower precision (the whole file through OpenVINO is
measured too, to show by how much). Accuracy is against the fp32 file on onnxruntime; all variants are
timed interleaved, so a shared machine's load falls on them alike. Writes JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx.utils import extract_model

FEATURE_NAME = "fbank"
OUTPUTS = ["embedding", "tokens", "logits"]


def cpu_session(path: Path, threads: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def openvino_session(path: Path, threads: int, hint: str) -> ort.InferenceSession:
    config = {
        "device_type": "CPU",
        "num_of_threads": str(threads),
        "load_config": json.dumps({"CPU": {"INFERENCE_PRECISION_HINT": hint}}),
    }
    session = ort.InferenceSession(str(path), ort.SessionOptions(), providers=[("OpenVINOExecutionProvider", config)])
    if session.get_providers()[0] != "OpenVINOExecutionProvider":
        raise RuntimeError("OpenVINOExecutionProvider is not active (is onnxruntime-openvino installed?)")
    return session


def clips(batch: int, window_samples: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Noise and tones at mixed levels, full length (what the engine bench times, plus tones)."""
    rng = np.random.default_rng(seed)
    t = np.arange(window_samples) / 16_000
    rows = []
    for i in range(batch):
        level = 10 ** rng.uniform(-2, -0.5)
        rows.append(level * (rng.standard_normal(window_samples) + (i % 2) * np.sin(2 * np.pi * (200 + 300 * i) * t)))
    return np.asarray(rows, dtype=np.float32), np.full(batch, window_samples, dtype=np.int64)


def top5_agreement(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.mean([set(np.argsort(-g)[:5]) == set(np.argsort(-w)[:5]) for g, w in zip(got, want, strict=True)]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fp32", type=Path, required=True, help="an fp32 file from eat export")
    parser.add_argument("--int8", type=Path, default=None, help="the int8 file of the same model, to compare")
    parser.add_argument("--batch-sizes", default="1,2,4,8")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("bench/results/openvino_bf16.json"))
    parser.add_argument("--note", default="")
    args = parser.parse_args(argv)
    batches = [int(b) for b in args.batch_sizes.split(",")]
    meta = {p.key: p.value for p in onnx.load(str(args.fp32), load_external_data=False).metadata_props}
    window = int(meta["eat.window_samples"])

    with tempfile.TemporaryDirectory(prefix="eat-ov-") as tmp:
        front_path, encoder_path = Path(tmp) / "front.onnx", Path(tmp) / "encoder.onnx"
        extract_model(str(args.fp32), str(front_path), ["waveform", "num_samples"], [FEATURE_NAME])
        extract_model(str(args.fp32), str(encoder_path), [FEATURE_NAME], OUTPUTS)
        fp32 = cpu_session(args.fp32, args.threads)
        front = cpu_session(front_path, args.threads)
        encoder_bf16 = openvino_session(encoder_path, args.threads, "bf16")
        whole_bf16 = openvino_session(args.fp32, args.threads, "bf16")
        int8 = cpu_session(args.int8, args.threads) if args.int8 else None

    def run_fp32(feeds):
        return fp32.run(OUTPUTS, feeds)

    def run_hybrid(feeds):
        return encoder_bf16.run(OUTPUTS, {FEATURE_NAME: front.run([FEATURE_NAME], feeds)[0]})

    variants = {"ort-cpu fp32": run_fp32, "ort-cpu front + openvino bf16 encoder": run_hybrid}
    variants["openvino bf16 whole file"] = lambda feeds: whole_bf16.run(OUTPUTS, feeds)
    if int8 is not None:
        variants["ort-cpu int8"] = lambda feeds: int8.run(OUTPUTS, feeds)

    accuracy: dict[str, dict] = {}
    waveform, num_samples = clips(8, window, seed=1)
    feeds = {"waveform": waveform, "num_samples": num_samples}
    want = run_fp32(feeds)
    for name, call in variants.items():
        got = call(feeds)
        accuracy[name] = {
            "max_abs_diff": {o: float(np.abs(g - w).max()) for o, g, w in zip(OUTPUTS, got, want, strict=True)},
            "max_abs_reference": {o: float(np.abs(w).max()) for o, w in zip(OUTPUTS, want, strict=True)},
            "top5_set_agreement": top5_agreement(got[2], want[2]),
        }
        print(f"{name}: {accuracy[name]['max_abs_diff']}, top-5 sets {accuracy[name]['top5_set_agreement']:.0%}")

    rows = []
    for batch in batches:
        waveform, num_samples = clips(batch, window)
        feeds = {"waveform": waveform, "num_samples": num_samples}
        for call in variants.values():
            call(feeds)  # warm-up
        times: dict[str, list[float]] = {name: [] for name in variants}
        for _ in range(args.repeats):
            for name, call in variants.items():
                start = time.perf_counter()
                call(feeds)
                times[name].append(time.perf_counter() - start)
        base = statistics.median(times["ort-cpu fp32"])
        for name, ts in times.items():
            median = statistics.median(ts)
            rows.append({"variant": name, "batch_size": batch, "latency_ms_median": 1e3 * median,
                         "clips_per_s": batch / median, "vs_fp32": base / median})  # fmt: skip
            print(f"B={batch} {name:40s} {1e3 * median:8.0f} ms {batch / median:6.2f} clips/s {base / median:5.2f}x")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    command = "python bench/openvino_bf16.py " + " ".join(sys.argv[1:] if argv is None else argv)
    payload = {
        "meta": {
            "onnxruntime": ort.__version__,
            "providers": ort.get_available_providers(),
            "threads": args.threads,
            "repeats": args.repeats,
            "window_samples": window,
            "model": meta.get("eat.model_name"),
            "note": args.note,
            "command": command,
        },
        "accuracy_vs_ort_fp32": accuracy,
        "results": rows,
    }
    args.out.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
