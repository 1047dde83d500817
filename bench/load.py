"""Service load benchmark: /predict throughput and latency against a real server process, compared
with the engine alone (the same ONNX file and thread count, ``Engine.run`` timed directly).

For each concurrency level, that many clients post 10 s WAV files back to back (closed loop, keep-alive)
for a fixed time; we report requests/s and p50/p95/p99 latency. The engine baseline is the best
windows/s over the batch sizes the service may use, and the latency of one batch-1 call. Targets: the
service reaches >= 80 % of the engine's throughput, and at concurrency 1 its p50 is within 5 ms of one
engine call. The clients run on the same machine as the server, so on a small machine they take CPU
from it: the numbers are a lower bound for the service.

    python bench/load.py                                   # models/default/model.onnx
    python bench/load.py --model /tmp/eat-tiny.onnx --concurrency 1,2,4,8,16 --seconds 10
    python bench/load.py --toy                             # a stand-in contract model (no torch needed)
    python bench/load.py --model eat-base.onnx --provider openvino --threads 1 --max-batch 4  # bf16 on CPU

Writes JSON (default ``bench/results/load.json``) and a PNG plot next to it. No torch is imported.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import io
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import httpx
import numpy as np
import soundfile as sf

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from eat.contract import SAMPLE_RATE, cut_windows  # noqa: E402
from eat.engine import PROVIDERS, open_engine  # noqa: E402  (after the path set-up, so `python bench/load.py` works)


def percentiles_ms(latencies_s: list[float]) -> dict[str, float]:
    values = np.array(latencies_s) * 1000
    return {f"p{q}_ms": round(float(np.percentile(values, q)), 2) for q in (50, 95, 99)}


def engine_baseline(model: Path, provider: str, threads: int, batch_sizes: list[int], repeats: int) -> dict:
    """Time ``Engine.run`` directly: per batch size, median call time and windows/s."""
    engine = open_engine(model, provider=provider, intra_op_threads=threads)
    info = engine.info
    outputs = ("logits",) if info.has_classifier else ("embedding",)
    rng = np.random.default_rng(0)
    rows = []
    for batch in batch_sizes:
        waveform = (0.1 * rng.standard_normal((batch, info.window_samples))).astype(np.float32)
        num_samples = np.full(batch, info.window_samples, np.int64)
        engine.run(waveform, num_samples, outputs)  # warm-up
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            engine.run(waveform, num_samples, outputs)
            times.append(time.perf_counter() - start)
        median_s = float(np.median(times))
        rows.append(
            {
                "batch_size": batch,
                "call_ms_median": round(median_s * 1000, 2),
                "windows_per_s": round(batch / median_s, 2),
            }
        )
        print(f"engine batch {batch:3d}: {median_s * 1000:8.1f} ms/call  {batch / median_s:8.2f} windows/s", flush=True)
    engine.close()
    return {
        "model_name": info.model_name,
        "window_samples": info.window_samples,
        "provider": info.provider,
        "precision": info.precision,
        "per_batch": rows,
        "best_windows_per_s": max(r["windows_per_s"] for r in rows),
        "batch1_call_ms": rows[0]["call_ms_median"] if rows[0]["batch_size"] == 1 else None,
    }


def ten_second_wav(seconds: float = 10.0) -> bytes:
    rng = np.random.default_rng(1)
    t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    x = 0.2 * np.sin(2 * np.pi * 440 * t) + 0.05 * rng.standard_normal(len(t))
    buffer = io.BytesIO()
    sf.write(buffer, x.astype(np.float32), SAMPLE_RATE, format="WAV", subtype="PCM_16")
    return buffer.getvalue()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(model: Path, settings: dict[str, str]) -> tuple[subprocess.Popen, str]:
    """``eat serve`` on a free local port with ``settings`` (``EAT_*`` variables); returns once ready.
    The server's log goes to this process's stderr, so a failed start explains itself there."""
    port = free_port()
    env = {**os.environ, "EAT_MODEL_PATH": str(model), "EAT_HOST": "127.0.0.1", "EAT_PORT": str(port),
           "EAT_LOG_LEVEL": "WARNING", **settings}
    process = subprocess.Popen(
        [sys.executable, "-m", "training.cli", "serve"], cwd=REPO_ROOT, env=env, stdout=subprocess.DEVNULL
    )
    url = f"http://127.0.0.1:{port}"
    end = time.monotonic() + 120
    while time.monotonic() < end:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with status {process.returncode} (its log is above)")
        try:
            if httpx.get(f"{url}/health/ready", timeout=1).status_code == 200:
                return process, url
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    process.kill()
    raise RuntimeError("server did not become ready in 120 s")


async def load_level(url: str, body: bytes, concurrency: int, seconds: float, warmup: int) -> dict:
    """Closed loop: ``concurrency`` clients, each posting the next request when the last returns."""
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=300, limits=limits) as client:

        async def one() -> None:
            start = time.perf_counter()
            response = await client.post(f"{url}/predict", content=body, headers={"content-type": "audio/wav"})
            latencies.append(time.perf_counter() - start)
            statuses[response.status_code] = statuses.get(response.status_code, 0) + 1

        await asyncio.gather(*(one() for _ in range(max(warmup, concurrency))))  # connections + warm paths
        latencies.clear()
        statuses.clear()
        end = time.perf_counter() + seconds
        started = time.perf_counter()

        async def worker() -> None:
            while time.perf_counter() < end:
                await one()

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    ok = statuses.get(200, 0)
    return {
        "concurrency": concurrency,
        "requests": len(latencies),
        "ok": ok,
        "statuses": statuses,
        "seconds": round(elapsed, 2),
        "requests_per_s": round(ok / elapsed, 3),
        **percentiles_ms(latencies),
    }


def batch_histogram(url: str) -> tuple[float, float]:
    """(windows, engine calls) so far, from the eat_batch_size histogram in /metrics."""
    values = {}
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if line.startswith(("eat_batch_size_sum ", "eat_batch_size_count ")):
            name, value = line.split()
            values[name] = float(value)
    return values.get("eat_batch_size_sum", 0.0), values.get("eat_batch_size_count", 0.0)


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    levels = report["service"]
    conc = [r["concurrency"] for r in levels]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    ax1.plot(conc, [r["requests_per_s"] for r in levels], "o-", label="service /predict (10 s clips)")
    best = report["engine"]["best_windows_per_s"]
    ax1.axhline(best, color="k", linestyle="--", label=f"engine alone, best ({best:.2f}/s)")
    ax1.axhline(0.8 * best, color="r", linestyle=":", label="80 % of engine")
    ax1.set_xscale("log", base=2)
    ax1.set_ylim(bottom=0)
    ax1.set_xlabel("concurrent clients")
    ax1.set_ylabel("clips / s")
    ax1.legend(fontsize=8)
    for q in ("p50_ms", "p95_ms", "p99_ms"):
        ax2.plot(conc, [r[q] for r in levels], "o-", label=q[:-3])
    if report["engine"]["batch1_call_ms"]:
        ax2.axhline(report["engine"]["batch1_call_ms"], color="k", linestyle="--", label="one engine call (batch 1)")
    ax2.set_xscale("log", base=2)
    ax2.set_yscale("log")
    ax2.set_xlabel("concurrent clients")
    ax2.set_ylabel("latency (ms)")
    ax2.legend(fontsize=8)
    fig.suptitle(f"{report['engine']['model_name']}: service vs engine ({report['meta']['cpu_count']} CPUs)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def build_toy(path: Path) -> Path:
    spec = importlib.util.spec_from_file_location("svc_toy_model", REPO_ROOT / "tests/unit/service/svc_toy_model.py")
    module = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(module)
    return module.build_toy_model(path, target_frames=1024, embed_dim=64, num_classes=527, name="toy-contract")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=Path("models/default/model.onnx"))
    parser.add_argument("--toy", action="store_true", help="serve the stand-in contract model from the tests")
    parser.add_argument("--concurrency", default="1,2,4,8,16", help="comma list of client counts")
    parser.add_argument("--seconds", type=float, default=10.0, help="measured time per concurrency level")
    parser.add_argument("--provider", default="auto", choices=PROVIDERS,
                        help="EAT_PROVIDER of the server and the engine baseline (default: auto)")
    parser.add_argument("--threads", type=int, default=0, help="engine intra-op threads (0 = its default)")
    parser.add_argument("--max-batch", type=int, default=16, help="EAT_MAX_BATCH for the server")
    parser.add_argument("--repeats", type=int, default=5, help="timed engine calls per batch size")
    parser.add_argument("--out", type=Path, default=Path("bench/results/load.json"))
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    levels = [int(c) for c in args.concurrency.split(",")]
    model = args.model
    if args.toy:
        model = build_toy(Path(tempfile.mkdtemp(prefix="eat-load-")) / "toy.onnx")
    if not model.is_file():
        print(f"no model at {model}: build one with `eat demo` / `eat export`, or pass --toy", file=sys.stderr)
        return 2
    batch_sizes = [b for b in (1, 2, 4, 8, 16, 32) if b <= max(max(levels), 1) and b <= args.max_batch]
    engine = engine_baseline(model, args.provider, args.threads, batch_sizes, args.repeats)
    body = ten_second_wav()
    process, url = start_server(model, {
        "EAT_PROVIDER": args.provider,
        "EAT_INTRA_OP_THREADS": str(args.threads),
        "EAT_MAX_BATCH": str(args.max_batch),
        "EAT_REQUEST_TIMEOUT_S": "300",
        "EAT_QUEUE_SIZE": "1024",
    })
    service = []
    try:
        for concurrency in levels:
            windows_before, calls_before = batch_histogram(url)
            row = asyncio.run(load_level(url, body, concurrency, args.seconds, warmup=2))
            windows_after, calls_after = batch_histogram(url)
            calls = calls_after - calls_before
            row["engine_calls"] = calls
            row["mean_batch"] = round((windows_after - windows_before) / calls, 2) if calls else None
            service.append(row)
            print(
                f"service c={concurrency:3d}: {row['requests_per_s']:7.2f} req/s  p50 {row['p50_ms']:8.1f} ms  "
                f"p95 {row['p95_ms']:8.1f}  p99 {row['p99_ms']:8.1f}  mean batch {row['mean_batch']}",
                flush=True,
            )
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(60)
    # Measure the engine again after the service: on a shared machine the less disturbed run is kept.
    again = engine_baseline(model, args.provider, args.threads, batch_sizes, args.repeats)
    engine["per_batch"] = [
        min(a, b, key=lambda r: r["call_ms_median"])
        for a, b in zip(engine["per_batch"], again["per_batch"], strict=True)
    ]
    engine["best_windows_per_s"] = max(r["windows_per_s"] for r in engine["per_batch"])
    engine["batch1_call_ms"] = engine["per_batch"][0]["call_ms_median"] if batch_sizes[0] == 1 else None
    # A 10 s upload is one window for a 10 s model but several for a shorter one: compare windows/s,
    # and at concurrency 1 compare with the engine calls that one request's windows need.
    clip = np.zeros(10 * SAMPLE_RATE, np.float32)  # the uploads of ten_second_wav()
    windows_per_request = len(
        cut_windows(clip, window_samples=engine["window_samples"], hop_samples=engine["window_samples"])
    )
    call_ms = {r["batch_size"]: r["call_ms_median"] for r in engine["per_batch"]}
    full, rest = divmod(windows_per_request, max(call_ms))
    request_engine_ms = full * call_ms[max(call_ms)] + (call_ms[min(b for b in call_ms if b >= rest)] if rest else 0)
    best_service = max(r["requests_per_s"] for r in service) * windows_per_request
    c1 = next((r for r in service if r["concurrency"] == 1), None)
    summary = {
        "windows_per_request": windows_per_request,
        "service_best_windows_per_s": round(best_service, 2),
        "engine_best_windows_per_s": engine["best_windows_per_s"],
        "throughput_ratio": round(best_service / engine["best_windows_per_s"], 3),
        "throughput_target_met": best_service >= 0.8 * engine["best_windows_per_s"],
        "engine_ms_per_request": round(request_engine_ms, 2),
        "c1_p50_overhead_ms": round(c1["p50_ms"] - request_engine_ms, 2) if c1 else None,
    }
    summary["latency_target_met"] = summary["c1_p50_overhead_ms"] is not None and summary["c1_p50_overhead_ms"] <= 5
    report = {
        "meta": {
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "machine": platform.machine(),
            "cpu_count": os.cpu_count(),
            "threads": args.threads,
            "seconds_per_level": args.seconds,
            "clip_seconds": 10.0,
            "model_path": str(model),
            "max_batch": args.max_batch,
            "clients": "same machine as the server (httpx, asyncio)",
        },
        "engine": engine,
        "service": service,
        "summary": summary,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    plot(report, args.out.with_suffix(".png"))
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
