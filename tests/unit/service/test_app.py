"""The HTTP API in-process (TestClient runs the lifespan): endpoints, formats, errors, overload."""

from __future__ import annotations

import asyncio
import io
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from svc_helpers import GatedEngine, encode_pyav, encode_soundfile, sine, wav_bytes

from service.inference import StageTimings, Upload
from service.metrics import REJECTION_REASONS

WINDOW_S = 10_480 / 16_000  # the toy model's window


def metric(client, name: str, labels: str = "") -> float:
    """Value of one sample in /metrics (0 when absent)."""
    prefix = f"{name}{{{labels}}}" if labels else name
    for line in client.get("/metrics").text.splitlines():
        if line.startswith(prefix + " "):
            return float(line.split()[-1])
    return 0.0


def wait_for_metric(client, name: str, value: float, timeout_s: float = 10.0) -> None:
    end = time.monotonic() + timeout_s
    while metric(client, name) != value:
        assert time.monotonic() < end, f"{name} never reached {value}"
        time.sleep(0.01)


def test_health_model_labels_docs(make_client) -> None:
    with make_client() as client:
        assert client.get("/health/live").json() == {"status": "ok"}
        assert client.get("/health/ready").status_code == 200
        model = client.get("/v1/model").json()
        assert model["model_name"] == "toy-eat" and model["provider"] == "cpu" and model["precision"] == "fp32"
        assert model["window_samples"] == 10_480 and model["max_batch"] == 8 and model["has_classifier"]
        labels = client.get("/v1/labels").json()
        assert labels["num_classes"] == 5 and labels["labels"][2] == {
            "index": 2,
            "id": "/m/toy2",
            "name": "Toy sound 2",
        }
        assert client.get("/docs").status_code == 200
        paths = client.get("/openapi.json").json()["paths"]
        assert {"/predict", "/embed", "/v1/model", "/v1/labels", "/health/ready", "/metrics"} <= set(paths)
        assert "multipart/form-data" in paths["/predict"]["post"]["requestBody"]["content"]


def test_metrics_exposition_has_the_fixed_names(make_client) -> None:
    with make_client() as client:
        client.post("/predict", content=wav_bytes(), headers={"content-type": "audio/wav"})
        text = client.get("/metrics").text
    for name in (
        "eat_requests_total",
        "eat_request_duration_seconds_bucket",
        "eat_queue_wait_seconds_bucket",
        "eat_decode_duration_seconds_bucket",
        "eat_inference_duration_seconds_bucket",
        "eat_batch_size_bucket",
        "eat_queue_depth",
        "eat_inflight_requests",
        "eat_audio_seconds_total",
        "eat_rejections_total",
    ):
        assert name in text, name
    assert (
        'eat_model_info{max_batch="8",model_name="toy-eat",precision="fp32",provider="cpu",window_samples="10480"} 1.0'
        in text
    )
    for reason in REJECTION_REASONS:
        assert f'eat_rejections_total{{reason="{reason}"}}' in text
    assert 'eat_requests_total{endpoint="/predict",status="200"} 1.0' in text


def test_predict_multipart_several_files(make_client) -> None:
    files = [
        ("file", ("a.wav", wav_bytes(0.3), "audio/wav")),
        ("file", ("b.flac", encode_soundfile(sine(2.0, 44_100), 44_100, "FLAC", "PCM_16"), "audio/flac")),
    ]
    with make_client() as client:
        response = client.post("/predict", files=files, params={"top_k": 3})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model"] == "toy-eat"
    a, b = body["results"]
    assert (a["filename"], b["filename"]) == ("a.wav", "b.flac")
    assert a["num_windows"] == 1 and b["num_windows"] == 4  # 2 s / 0.655 s windows
    assert abs(b["duration_s"] - 2.0) < 1e-3
    assert len(a["tags"]) == 3 and a["timeline"] is None
    scores = [t["score"] for t in a["tags"]]
    assert scores == sorted(scores, reverse=True) and all(0 < s < 1 for s in scores)
    assert set(a["tags"][0]) == {"index", "id", "name", "score"}
    for header in ("x-decode-time", "x-queue-time", "x-inference-time", "x-total-time", "x-request-id"):
        assert header in response.headers


def test_predict_timeline_and_threshold(make_client) -> None:
    data = wav_bytes(1.5)
    with make_client() as client:
        full = client.post(
            "/predict", content=data, headers={"content-type": "audio/x-wav"}, params={"timeline": "true", "top_k": 5}
        ).json()["results"][0]
        kept = client.post(
            "/predict", content=data, headers={"content-type": "audio/wav"}, params={"threshold": 0.5, "top_k": 5}
        ).json()["results"][0]
    timeline = full["timeline"]
    assert [(w["start_s"], round(w["end_s"], 3)) for w in timeline] == [
        (0.0, round(WINDOW_S, 3)),
        (round(WINDOW_S, 4), round(2 * WINDOW_S, 3)),
        (round(2 * WINDOW_S, 4), 1.5),
    ]
    for tag in full["tags"]:  # clip score = max over the windows
        assert tag["score"] == pytest.approx(
            max(t["score"] for w in timeline for t in w["tags"] if t["index"] == tag["index"]), abs=1e-6
        )
    assert [t["index"] for t in kept["tags"]] == [t["index"] for t in full["tags"] if t["score"] >= 0.5]


@pytest.mark.parametrize(
    ("name", "content_type", "make"),
    [
        ("pcm16.wav", "audio/wav", lambda: encode_soundfile(sine(1, 22_050), 22_050, "WAV", "PCM_16")),
        ("pcm24.wav", "audio/wav", lambda: encode_soundfile(sine(1, 44_100), 44_100, "WAV", "PCM_24")),
        ("pcm32.wav", "audio/wav", lambda: encode_soundfile(sine(1, 16_000), 16_000, "WAV", "PCM_32")),
        ("u8.wav", "audio/wav", lambda: encode_soundfile(sine(1, 8_000), 8_000, "WAV", "PCM_U8")),
        ("float.wav", "audio/wav", lambda: encode_soundfile(sine(1, 48_000), 48_000, "WAV", "FLOAT")),
        ("double.wav", "audio/wav", lambda: encode_soundfile(sine(1, 16_000), 16_000, "WAV", "DOUBLE")),
        ("ulaw.wav", "audio/wav", lambda: encode_soundfile(sine(1, 8_000), 8_000, "WAV", "ULAW")),
        ("ext.wav", "audio/wav", lambda: encode_soundfile(sine(1, 48_000, channels=4), 48_000, "WAVEX", "PCM_16")),
        ("rf64.wav", "audio/wav", lambda: encode_soundfile(sine(1, 16_000), 16_000, "RF64", "PCM_16")),
        ("a.flac", "audio/flac", lambda: encode_soundfile(sine(1, 44_100, channels=2), 44_100, "FLAC", "PCM_24")),
        ("a.ogg", "audio/ogg", lambda: encode_soundfile(sine(1, 22_050), 22_050, "OGG", "VORBIS")),
        ("a.opus", "audio/ogg", lambda: encode_soundfile(sine(1, 48_000), 48_000, "OGG", "OPUS")),
        ("a.mp3", "audio/mpeg", lambda: encode_soundfile(sine(1, 44_100), 44_100, "MP3", "MPEG_LAYER_III")),
        ("a.m4a", "audio/mp4", lambda: encode_pyav(sine(1, 44_100, channels=2), 44_100, "ipod", "aac")),
        ("a.aac", "audio/aac", lambda: encode_pyav(sine(1, 22_050), 22_050, "adts", "aac")),
        ("a.webm", "audio/webm", lambda: encode_pyav(sine(1, 48_000), 48_000, "webm", "libopus")),
    ],
)
def test_every_format_as_raw_body_and_multipart(make_client, name: str, content_type: str, make) -> None:
    data = make()
    with make_client() as client:
        raw = client.post("/predict", content=data, headers={"content-type": content_type, "x-filename": name})
        multi = client.post("/embed", files={"file": (name, data, "application/octet-stream")})
    assert raw.status_code == 200, raw.text
    result = raw.json()["results"][0]
    assert result["filename"] == name and abs(result["duration_s"] - 1.0) < 0.1
    assert multi.status_code == 200, multi.text
    assert multi.json()["results"][0]["dim"] == 16


def test_embed_poolings_json_and_npy(make_client) -> None:
    data = wav_bytes(1.5)  # 3 windows; the last holds 0.19 s = 18 frames = 2 token rows
    with make_client() as client:
        cls = client.post("/embed", files={"file": ("x.wav", data)}).json()["results"][0]
        mean = client.post("/embed", files={"file": ("x.wav", data)}, params={"pooling": "mean"}).json()["results"][0]
        time_ = client.post("/embed", files={"file": ("x.wav", data)}, params={"pooling": "time"}).json()["results"][0]
        npy = client.post(
            "/embed",
            files={"file": ("x.wav", data)},
            params={"pooling": "time"},
            headers={"accept": "application/x-npy"},
        )
        two = client.post(
            "/embed",
            files=[("file", ("a.wav", data)), ("file", ("b.wav", data))],
            headers={"accept": "application/x-npy"},
        )
        bad = client.post("/embed", files={"file": ("x.wav", data)}, params={"pooling": "max"})
    assert cls["pooling"] == "cls" and len(cls["embedding"]) == 16 and cls["time_step_s"] is None
    assert len(mean["embedding"]) == 16 and mean["embedding"] != cls["embedding"]
    assert np.array(time_["embedding"]).shape == (4 + 4 + 2, 16) and time_["time_step_s"] == 0.16
    # mean of tokens == mean of the per-time-step vectors (equal frequency rows in each)
    np.testing.assert_allclose(np.mean(time_["embedding"], axis=0), mean["embedding"], rtol=1e-4, atol=1e-5)
    assert npy.status_code == 200 and npy.headers["content-type"] == "application/x-npy"
    array = np.load(io.BytesIO(npy.content), allow_pickle=False)
    assert array.dtype == np.float32 and array.shape == (10, 16)
    np.testing.assert_allclose(array, time_["embedding"], rtol=1e-5, atol=1e-6)
    assert two.status_code == 406 and two.json()["error_type"] == "not_acceptable"
    assert bad.status_code == 422


def test_headless_model_serves_embed_and_refuses_predict(make_client, headless_model_path) -> None:
    with make_client(model_path=headless_model_path) as client:
        refused = client.post("/predict", content=wav_bytes(), headers={"content-type": "audio/wav"})
        embedded = client.post("/embed", content=wav_bytes(), headers={"content-type": "audio/wav"})
        assert client.get("/v1/labels").json()["labels"] == []
        assert metric(client, "eat_rejections_total", 'reason="no_classifier"') == 1
    assert refused.status_code == 422
    assert refused.json() == {
        "error": "this model has no classifier head; use /embed for embeddings",
        "error_type": "no_classifier",
    }
    assert embedded.status_code == 200


def test_api_keys(make_client) -> None:
    with make_client(api_keys="k1,k2") as client:
        missing = client.post("/predict", content=wav_bytes(), headers={"content-type": "audio/wav"})
        wrong = client.get("/v1/model", headers={"authorization": "Bearer nope"})
        ok = client.post(
            "/predict", content=wav_bytes(), headers={"content-type": "audio/wav", "authorization": "Bearer k2"}
        )
        assert client.get("/health/live").status_code == 200
        assert client.get("/health/ready").status_code == 200
        assert client.get("/metrics").status_code == 200
        assert metric(client, "eat_rejections_total", 'reason="unauthorized"') == 2
    assert missing.status_code == 401 and missing.headers["www-authenticate"] == "Bearer"
    assert wrong.status_code == 401 and ok.status_code == 200


def test_cors_and_request_id(make_client) -> None:
    with make_client(cors_origins="https://app.example") as client:
        response = client.get("/health/live", headers={"origin": "https://app.example", "x-request-id": "abc-123"})
        other = client.get("/health/live", headers={"x-request-id": "bad id with spaces"})
    assert response.headers["access-control-allow-origin"] == "https://app.example"
    assert response.headers["x-request-id"] == "abc-123"
    assert other.headers["x-request-id"] != "bad id with spaces" and len(other.headers["x-request-id"]) == 32


def _nan_wav() -> bytes:
    x = sine(1, 16_000)
    x[10] = np.nan
    return encode_soundfile(x, 16_000, "WAV", "FLOAT")


@pytest.mark.parametrize(
    ("kwargs", "status", "error_type"),
    [
        ({"content": b"", "headers": {"content-type": "audio/wav"}}, 422, "invalid_audio"),
        (
            {"content": np.random.default_rng(1).bytes(5000), "headers": {"content-type": "audio/wav"}},
            422,
            "invalid_audio",
        ),
        ({"content": wav_bytes()[:40], "headers": {"content-type": "audio/wav"}}, 422, "invalid_audio"),
        ({"content": wav_bytes(), "headers": {"content-type": "text/plain"}}, 415, "unsupported_media_type"),
        ({"content": wav_bytes(), "headers": {"content-type": "application/json"}}, 415, "unsupported_media_type"),
        ({"content": wav_bytes()}, 415, "unsupported_media_type"),
        ({"files": {"audio": ("x.wav", b"RIFF")}}, 400, "bad_request"),
        (
            {"content": b"--xx\r\nnot multipart", "headers": {"content-type": "multipart/form-data; boundary=xx"}},
            400,
            "bad_request",
        ),
        (
            {
                "content": encode_soundfile(np.zeros(0, np.float32), 16_000, "WAV", "PCM_16"),
                "headers": {"content-type": "audio/wav"},
            },
            422,
            "invalid_audio",
        ),
        ({"content": _nan_wav(), "headers": {"content-type": "audio/wav"}}, 422, "invalid_audio"),
        (
            {"content": wav_bytes(), "headers": {"content-type": "audio/wav"}, "params": {"top_k": 0}},
            422,
            "bad_request",
        ),
        ({"content": wav_bytes(40.0), "headers": {"content-type": "audio/wav"}}, 413, "too_long"),
        (
            {
                "content": encode_soundfile(np.zeros(16_000 * 60, np.int16), 16_000, "FLAC", "PCM_16"),
                "headers": {"content-type": "audio/flac"},
            },
            413,
            "too_long",
        ),
    ],
    ids=[
        "empty",
        "random",
        "truncated",
        "text",
        "json",
        "no-type",
        "no-file-field",
        "bad-multipart",
        "zero-length",
        "nan",
        "top_k",
        "too-long",
        "flac-bomb",
    ],
)
def test_bad_inputs_are_clear_4xx(make_client, kwargs: dict, status: int, error_type: str) -> None:
    with make_client() as client:
        response = client.post("/predict", **kwargs)
    assert response.status_code == status, response.text
    assert response.json()["error_type"] == error_type and response.json()["error"]


def test_upload_size_limit(make_client) -> None:
    data = wav_bytes(1.0)  # 32 kB
    with make_client(max_upload_bytes=10_000) as client:
        declared = client.post("/predict", content=data, headers={"content-type": "audio/wav"})
        streamed = client.post(
            "/predict", content=iter([data[:8000], data[8000:]]), headers={"content-type": "audio/wav"}
        )  # chunked: no Content-Length
        multipart = client.post("/embed", files={"file": ("x.wav", data)})
        assert metric(client, "eat_rejections_total", 'reason="payload_too_large"') == 3
    for response in (declared, streamed, multipart):
        assert response.status_code == 413 and response.json()["error_type"] == "payload_too_large"


def test_huge_multipart_headers_are_refused(make_client) -> None:
    body = (
        b'--b\r\nContent-Disposition: form-data; name="file"; filename="x.wav"\r\nX-Pad: '
        + b"a" * 200_000
        + b"\r\n\r\n"
        + wav_bytes()
        + b"\r\n--b--\r\n"
    )
    with make_client() as client:
        response = client.post("/predict", content=body, headers={"content-type": "multipart/form-data; boundary=b"})
    assert 400 <= response.status_code < 500


def test_overload_answers_429_with_retry_after(make_client, gated_engine: GatedEngine) -> None:
    post = lambda client, seconds: client.post(
        "/predict", content=wav_bytes(seconds), headers={"content-type": "audio/wav"}
    )
    with make_client(engine=gated_engine, max_batch=2, batch_buckets="1,2", queue_size=2) as client:
        gated_engine.gate.clear()
        gated_engine.entered.clear()
        with ThreadPoolExecutor(4) as pool:
            first = pool.submit(post, client, 0.3)
            assert gated_engine.entered.wait(10)  # the engine holds request 1
            # 2 windows each: the first pair moves on to the prefetch slot, the second fills the queue
            waiting = [pool.submit(post, client, 1.3)]
            wait_for_metric(client, "eat_queue_wait_seconds_count", 3)  # 1 + 2 windows left the queue
            waiting.append(pool.submit(post, client, 1.3))
            wait_for_metric(client, "eat_queue_depth", 2)
            refused = post(client, 0.3)
            gated_engine.gate.set()
            assert all(f.result().status_code == 200 for f in [first, *waiting])
        assert metric(client, "eat_rejections_total", 'reason="queue_full"') == 1
        assert post(client, 0.3).status_code == 200  # capacity is back
    assert refused.status_code == 429 and refused.json()["error_type"] == "overloaded"
    assert int(refused.headers["retry-after"]) >= 1


def test_deadline_expiry_is_503_and_counted(make_client, gated_engine: GatedEngine) -> None:
    with make_client(engine=gated_engine, request_timeout_s=0.3) as client:
        gated_engine.gate.clear()
        response = client.post("/predict", content=wav_bytes(), headers={"content-type": "audio/wav"})
        gated_engine.gate.set()
        assert metric(client, "eat_rejections_total", 'reason="deadline"') == 1
    assert response.status_code == 503 and response.json()["error_type"] == "deadline_exceeded"


def test_engine_failure_is_500(make_client, gated_engine: GatedEngine) -> None:
    with make_client(engine=gated_engine) as client:
        gated_engine.fail_next = True
        failed = client.post("/predict", content=wav_bytes(), headers={"content-type": "audio/wav"})
        recovered = client.post("/predict", content=wav_bytes(), headers={"content-type": "audio/wav"})
    assert failed.status_code == 500 and failed.json()["error_type"] == "engine_error"
    assert recovered.status_code == 200


def test_concurrent_requests_share_batches(make_client, gated_engine: GatedEngine) -> None:
    gated_engine.delay_s = 0.02
    with make_client(engine=gated_engine) as client:
        with ThreadPoolExecutor(8) as pool:
            responses = list(
                pool.map(
                    lambda i: client.post("/predict", content=wav_bytes(0.5), headers={"content-type": "audio/wav"}),
                    range(16),
                )
            )
        assert all(r.status_code == 200 for r in responses)
        assert metric(client, "eat_batch_size_count") == len(gated_engine.calls) - 1 < 16  # minus the warm-up
        assert metric(client, "eat_batch_size_bucket", 'le="1.0"') < metric(client, "eat_batch_size_count")


def test_lifespan_warms_up_and_closes_engine(make_client, gated_engine: GatedEngine) -> None:
    with make_client(engine=gated_engine) as client:
        assert len(gated_engine.calls) == 1  # the warm-up inference ran before ready
        assert client.get("/health/ready").json() == {"status": "ok"}
    assert gated_engine.closed


def test_cancelled_request_never_reaches_the_engine(make_client, gated_engine: GatedEngine) -> None:
    """A client that goes away: its windows are dropped from the queue and counted as cancelled."""
    with make_client(engine=gated_engine) as client:
        gated_engine.gate.clear()
        gated_engine.entered.clear()
        blocker = threading.Thread(
            target=client.post,
            args=("/predict",),
            kwargs={"content": wav_bytes(0.2), "headers": {"content-type": "audio/wav"}},
        )
        blocker.start()
        assert gated_engine.entered.wait(10)
        state = client.app.state.eat
        ticket_holder: list = []
        original = state.batcher.submit

        def spy(*args, **kwargs):
            ticket = original(*args, **kwargs)
            ticket_holder.append(ticket)
            return ticket

        state.batcher.submit = spy
        upload = Upload("x.wav", encode_soundfile(np.full(16_000, 0.77, np.float32), 16_000, "WAV", "FLOAT"))

        async def cancel_soon() -> None:
            task = asyncio.ensure_future(
                state.inference.predict(
                    [upload],
                    deadline=time.monotonic() + 30,
                    timings=StageTimings(),
                )
            )
            while not ticket_holder:
                await asyncio.sleep(0.01)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task

        client.portal.call(cancel_soon)
        gated_engine.gate.set()
        blocker.join(10)
        assert metric(client, "eat_rejections_total", 'reason="cancelled"') == 1
    seen = np.concatenate(gated_engine.seen_waveforms)
    assert not np.isclose(seen, 0.77).any()


def test_draining_turns_ready_and_work_to_503(make_client) -> None:
    import uvicorn

    from service.server import _DrainingServer

    with make_client() as client:
        state = client.app.state.eat
        server = _DrainingServer(uvicorn.Config(client.app), state)
        server.handle_exit(15, None)  # what SIGTERM calls
        assert server.should_exit and state.draining
        ready = client.get("/health/ready")
        work = client.post("/predict", content=wav_bytes(), headers={"content-type": "audio/wav"})
        assert client.get("/health/live").status_code == 200
        assert metric(client, "eat_rejections_total", 'reason="draining"') == 1
    assert ready.status_code == 503 and ready.json() == {"status": "draining"}
    assert work.status_code == 503 and work.json()["error_type"] == "draining"
