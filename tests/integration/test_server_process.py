"""The service as a real uvicorn process: `eat serve` end to end, batching, overload, SIGTERM drain."""

from __future__ import annotations

import asyncio
import io
import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import soundfile as sf

REPO_ROOT = Path(__file__).resolve().parents[2]


def wav(seconds: float, rate: int = 16_000, fmt: str = "WAV", subtype: str = "PCM_16") -> bytes:
    t = np.arange(round(seconds * rate)) / rate
    buffer = io.BytesIO()
    sf.write(buffer, (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32), rate, format=fmt, subtype=subtype)
    return buffer.getvalue()


async def post_many(url: str, count: int, seconds: float = 0.3) -> list[httpx.Response]:
    async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=count)) as client:
        return await asyncio.gather(
            *(
                client.post(f"{url}/predict", content=wav(seconds), headers={"content-type": "audio/wav"})
                for _ in range(count)
            )
        )


@pytest.fixture(scope="module")
def eat_serve(toy_onnx: Path, tmp_path_factory: pytest.TempPathFactory, start_server):
    """The real command: `python -m training.cli serve` (what `eat serve` runs)."""
    with start_server(
        ["-m", "training.cli", "serve"],
        {"EAT_MODEL_PATH": str(toy_onnx), "EAT_MAX_BATCH": "8", "EAT_BATCH_BUCKETS": "1,2,4,8"},
        tmp_path_factory.mktemp("serve"),
    ) as server:
        yield server


def test_every_endpoint_of_eat_serve(eat_serve) -> None:
    url = eat_serve.url
    assert httpx.get(f"{url}/health/live").json() == {"status": "ok"}
    assert httpx.get(f"{url}/health/ready").json() == {"status": "ok"}
    model = httpx.get(f"{url}/v1/model").json()
    assert model["model_name"] == "toy-eat" and model["provider"] == "cpu" and model["batch_buckets"] == [1, 2, 4, 8]
    assert len(httpx.get(f"{url}/v1/labels").json()["labels"]) == 5
    assert httpx.get(f"{url}/docs").status_code == 200
    predicted = httpx.post(
        f"{url}/predict",
        params={"timeline": "true"},
        files=[("file", ("a.wav", wav(1.5))), ("file", ("b.mp3", wav(1.0, 44_100, "MP3", "MPEG_LAYER_III")))],
        headers={"x-request-id": "it-works"},
    )
    assert predicted.status_code == 200, predicted.text
    a, b = predicted.json()["results"]
    assert (a["num_windows"], len(a["timeline"]), b["filename"]) == (3, 3, "b.mp3")
    assert predicted.headers["x-request-id"] == "it-works" and float(predicted.headers["x-total-time"]) > 0
    embedded = httpx.post(
        f"{url}/embed",
        content=wav(1.0, fmt="FLAC", subtype="PCM_16"),
        params={"pooling": "time"},
        headers={"content-type": "audio/flac", "accept": "application/x-npy"},
    )
    assert embedded.status_code == 200 and np.load(io.BytesIO(embedded.content)).shape == (
        4 + 3,
        16,
    )  # 5520 samples: 33 frames, 3 rows
    metrics = httpx.get(f"{url}/metrics").text
    assert 'eat_requests_total{endpoint="/predict",status="200"}' in metrics
    assert 'eat_model_info{max_batch="8",model_name="toy-eat",precision="fp32",provider="cpu"' in metrics
    lines = [json.loads(line) for line in eat_serve.log().splitlines() if line.startswith("{")]
    mine = [line for line in lines if line.get("request_id") == "it-works" and line.get("path") == "/predict"]
    assert mine and mine[0]["status"] == 200 and {"decode_ms", "queue_ms", "inference_ms"} <= set(mine[0])


def test_bad_requests_are_4xx_on_the_wire(eat_serve) -> None:
    url = eat_serve.url
    cases = [
        httpx.post(f"{url}/predict", content=b"", headers={"content-type": "audio/wav"}),
        httpx.post(
            f"{url}/predict",
            content=np.random.default_rng(2).bytes(4096),
            headers={"content-type": "application/octet-stream"},
        ),
        httpx.post(f"{url}/predict", content=b"{}", headers={"content-type": "application/json"}),
        httpx.post(f"{url}/predict", content=wav(1.0)[:200], headers={"content-type": "audio/wav"}),
    ]
    statuses = [r.status_code for r in cases]
    assert all(400 <= s < 500 for s in statuses), statuses
    # 100 KB of headers: h11 refuses the request while it is still arriving and closes the connection, so
    # the client reads either the 400 or, when unread bytes were still in flight, a reset. Never a 5xx.
    try:
        huge = httpx.get(f"{url}/health/live", headers={"x-huge": "a" * 100_000}).status_code
    except (httpx.NetworkError, httpx.RemoteProtocolError):  # reset while reading or still sending
        huge = "reset"
    assert huge == "reset" or 400 <= huge < 500, huge
    assert httpx.get(f"{url}/health/ready").status_code == 200  # the server is unharmed


@pytest.fixture(scope="module")
def slow_server(toy_onnx: Path, tmp_path_factory: pytest.TempPathFactory, start_server, slow_server_args):
    env = {
        "EAT_MODEL_PATH": str(toy_onnx),
        "EAT_MAX_BATCH": "4",
        "EAT_BATCH_BUCKETS": "1,2,4",
        "EAT_QUEUE_SIZE": "8",
        "EAT_MAX_DELAY_MS": "5",
    }
    with start_server([*slow_server_args, "0.25"], env, tmp_path_factory.mktemp("slow")) as server:
        yield server


def test_concurrent_requests_form_batches(slow_server) -> None:
    before_count = slow_server.metric("eat_batch_size_count")
    before_ones = slow_server.metric("eat_batch_size_bucket", 'le="1.0"')
    responses = asyncio.run(post_many(slow_server.url, 8))
    assert [r.status_code for r in responses] == [200] * 8
    calls = slow_server.metric("eat_batch_size_count") - before_count
    single = slow_server.metric("eat_batch_size_bucket", 'le="1.0"') - before_ones
    assert calls < 8 and single < calls  # windows of different requests shared engine calls


def test_overload_gives_429_with_retry_after(slow_server) -> None:
    responses = asyncio.run(post_many(slow_server.url, 30))
    statuses = [r.status_code for r in responses]
    assert set(statuses) <= {200, 429} and statuses.count(429) > 0 and statuses.count(200) >= 8
    refused = next(r for r in responses if r.status_code == 429)
    assert int(refused.headers["retry-after"]) >= 1 and refused.json()["error_type"] == "overloaded"
    # 8 admitted at once (the queue's 8 windows); the rest refused at the door, or by the queue
    at_door = slow_server.metric("eat_rejections_total", 'reason="concurrency_limit"')
    at_queue = slow_server.metric("eat_rejections_total", 'reason="queue_full"')
    assert at_door > 0 and at_door + at_queue == statuses.count(429)


def test_sigterm_drains_accepted_requests(toy_onnx: Path, tmp_path: Path, start_server, slow_server_args) -> None:
    env = {
        "EAT_MODEL_PATH": str(toy_onnx),
        "EAT_MAX_BATCH": "2",
        "EAT_BATCH_BUCKETS": "1,2",
        "EAT_QUEUE_SIZE": "32",
        "EAT_DRAIN_TIMEOUT_S": "20",
    }
    with start_server([*slow_server_args, "0.2"], env, tmp_path) as server:

        async def scenario() -> tuple[list[httpx.Response], int | None]:
            requests = asyncio.ensure_future(post_many(server.url, 6, seconds=1.0))  # 2 windows each
            end = time.monotonic() + 20
            while server.metric("eat_inflight_requests") < 7:  # 6 + this scrape
                assert time.monotonic() < end, "requests never arrived"
                await asyncio.sleep(0.02)
            server.process.send_signal(signal.SIGTERM)
            responses = await requests
            return responses, await asyncio.to_thread(server.process.wait, 30)

        responses, exit_code = asyncio.run(scenario())
        assert [r.status_code for r in responses] == [200] * 6  # nothing accepted was lost
        assert exit_code == 0
        with pytest.raises(httpx.TransportError):
            httpx.get(f"{server.url}/health/live", timeout=2)
        assert "stopped" in server.log()


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"EAT_MODEL_PATH": "/nonexistent/model.onnx"}, "model file not found"),
        ({"EAT_PROVIDER": "cuda"}, "EAT_PROVIDER=cuda"),
        ({"EAT_MAX_BATCH": "64"}, "exceeds the largest batch bucket"),
    ],
)
def test_eat_serve_fails_loudly_at_start(toy_onnx: Path, env: dict, message: str) -> None:
    import onnxruntime

    if "EAT_PROVIDER" in env and "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("this machine has CUDA")
    result = subprocess.run(
        [sys.executable, "-m", "training.cli", "serve", "--port", "1"],
        env={"PATH": "/usr/bin:/bin", "EAT_MODEL_PATH": str(toy_onnx), **env},
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr


def test_client_disconnect_drops_queued_work(slow_server) -> None:
    """A client that gives up while its window waits: the window never reaches the engine."""
    windows_before = slow_server.metric("eat_batch_size_sum")
    left_queue = slow_server.metric("eat_queue_wait_seconds_count")
    cancelled = slow_server.metric("eat_rejections_total", 'reason="cancelled"')
    holder = threading.Thread(
        target=httpx.post,
        args=(f"{slow_server.url}/predict",),
        kwargs={"content": wav(2.5), "headers": {"content-type": "audio/wav"}, "timeout": 30},
    )
    holder.start()  # 4 windows = one full batch, 0.25 s in the engine
    end = time.monotonic() + 20
    while slow_server.metric("eat_queue_wait_seconds_count") < left_queue + 4:
        assert time.monotonic() < end
        time.sleep(0.01)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{slow_server.url}/predict", content=wav(0.3), headers={"content-type": "audio/wav"}, timeout=0.1)
    holder.join(30)
    end = time.monotonic() + 10
    while slow_server.metric("eat_rejections_total", 'reason="cancelled"') < cancelled + 1:
        assert time.monotonic() < end, "the disconnect was not noticed"
        time.sleep(0.02)
    # Proof by order, not by waiting: the queue is first in, first out, so had the cancelled window
    # stayed queued it would run no later than a request sent after it. Once that request is answered,
    # the engine has seen exactly the holder's 4 windows and the new one.
    follow_up = httpx.post(
        f"{slow_server.url}/predict", content=wav(0.3), headers={"content-type": "audio/wav"}, timeout=30
    )
    assert follow_up.status_code == 200
    assert slow_server.metric("eat_batch_size_sum") - windows_before == 4 + 1
