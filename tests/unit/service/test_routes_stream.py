"""``/v1/stream`` in-process: the same tags as /predict for the same audio and hop, the window buffer's
parity with ``cut_windows`` and its bound, the shared batcher, and a close code for every bad frame."""

from __future__ import annotations

import io
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from starlette.websockets import WebSocketDisconnect
from svc_helpers import wav_bytes
from svc_toy_model import siren_scene
from test_app import metric, wait_for_metric

from eat.contract import cut_windows
from service.routes_stream import StreamClosed, WindowBuffer

END = json.dumps({"type": "end"})


def pcm16(samples: np.ndarray) -> np.ndarray:
    return np.clip(np.round(samples * 32768), -32768, 32767).astype("<i2")


def stream_all(ws, chunks: list[bytes]) -> tuple[dict, list[dict], dict]:
    ready = ws.receive_json()
    messages: list[dict] = []
    for chunk in chunks:
        ws.send_bytes(chunk)
    ws.send_text(END)
    for _ in range(10_000):  # bounded: far more than any test's windows
        message = ws.receive_json()
        if message["type"] == "end":
            return ready, messages, message
        messages.append(message)
    raise AssertionError("no end message")


def close_code(ws) -> int:
    with pytest.raises(WebSocketDisconnect) as closed:
        for _ in range(100):
            ws.receive_json()
    return closed.value.code


@pytest.mark.parametrize(("model", "hop", "top_k"), [("detector", 1.0, 2), ("toy", 0.5, 5)])
def test_20_s_in_100_ms_chunks_gives_the_predict_timeline(
    make_client, detector_model_path: Path, toy_model_path: Path, model: str, hop: float, top_k: int
) -> None:
    samples = pcm16(siren_scene(20.0, 3.0, 6.0))  # 20 s of 16-bit PCM, as a microphone gives it
    wav = io.BytesIO()
    sf.write(wav, samples, 16_000, format="WAV", subtype="PCM_16")
    chunks = [samples[i : i + 1600].tobytes() for i in range(0, len(samples), 1600)]  # 100 ms each
    path = detector_model_path if model == "detector" else toy_model_path
    with make_client(model_path=path) as client:
        before = metric(client, "eat_queue_wait_seconds_count")
        with client.websocket_connect(f"/v1/stream?hop={hop}&top_k={top_k}") as ws:
            ready, streamed, end = stream_all(ws, chunks)
        through_batcher = metric(client, "eat_queue_wait_seconds_count") - before
        predicted = client.post(f"/predict?timeline=true&hop={hop}&top_k={top_k}", content=wav.getvalue(),
                                headers={"content-type": "audio/wav"}).json()["results"][0]
    assert ready["hop_s"] == pytest.approx(hop) and end["duration_s"] == 20.0
    timeline = predicted["timeline"]
    assert end["num_windows"] == len(streamed) == len(timeline) == through_batcher > 10
    for got, want in zip(streamed, timeline, strict=True):
        assert (got["start_s"], got["end_s"]) == (want["start_s"], want["end_s"])
        assert [t["name"] for t in got["tags"]] == [t["name"] for t in want["tags"]]
        np.testing.assert_allclose([t["score"] for t in got["tags"]], [t["score"] for t in want["tags"]], atol=1e-5)
    if model == "detector":  # the siren is tagged first exactly in the windows that hold it
        loud = [m["start_s"] for m in streamed if m["tags"][0]["name"] == "Siren"]
        assert loud and min(loud) > 3.0 - ready["window_s"] and max(loud) < 6.0


@pytest.mark.parametrize(("window", "hop"), [(100, 25), (100, 100), (100, 33), (64, 64)])
def test_window_buffer_cuts_what_cut_windows_cuts(window: int, hop: int) -> None:
    rng = np.random.default_rng(window + hop)
    for total in (1, 50, 100, 101, 333, 1000):
        samples = rng.normal(size=total).astype(np.float32)
        buffer = WindowBuffer(window, hop, max_frame=40, min_samples=25)
        size = len(buffer._buffer)
        got_wave, got_len, got_start = [], [], []
        position = 0
        while position < total:  # bounded by total: every pass consumes at least one sample
            step = int(rng.integers(1, 41))
            buffer.push(samples[position : position + step])
            position += step
            for part, into in zip(buffer.ready(), (got_wave, got_len, got_start), strict=True):
                into.append(part)
        if total >= 25:  # fewer is refused, as eat.audio refuses a file under one 25 ms frame
            for part, into in zip(buffer.rest(), (got_wave, got_len, got_start), strict=True):
                into.append(part)
        assert len(buffer._buffer) == size  # the buffer never grew
        if total < 25:
            continue
        want = cut_windows(samples, window_samples=window, hop_samples=hop)
        np.testing.assert_array_equal(np.concatenate(got_start), want.starts)
        np.testing.assert_array_equal(np.concatenate(got_len), want.num_samples)
        np.testing.assert_array_equal(np.concatenate(got_wave), want.waveform)


def test_window_buffer_refuses_more_than_its_bound() -> None:
    buffer = WindowBuffer(100, 50, max_frame=40)
    buffer.push(np.zeros(99, np.float32))
    with pytest.raises(StreamClosed) as refused:
        buffer.push(np.zeros(42, np.float32))
    assert refused.value.code == 1009


def test_another_rate_and_float_samples(make_client) -> None:
    rate = 44_100
    t = np.arange(3 * rate) / rate
    samples = (0.3 * np.sin(2 * np.pi * 440 * t)).astype("<f4")
    wav = io.BytesIO()
    sf.write(wav, samples, rate, format="WAV", subtype="FLOAT")
    chunks = [samples[i : i + 4410].tobytes() for i in range(0, len(samples), 4410)]
    with make_client() as client:
        with client.websocket_connect(f"/v1/stream?sample_rate={rate}&encoding=f32le&hop=0.3") as ws:
            _, streamed, end = stream_all(ws, chunks)
        timeline = client.post("/predict?timeline=true&hop=0.3", content=wav.getvalue(),
                               headers={"content-type": "audio/wav"}).json()["results"][0]["timeline"]
    assert end["num_windows"] == len(timeline) == len(streamed)
    for got, want in zip(streamed, timeline, strict=True):  # chunked resampling: close, not bit-equal
        assert got["start_s"] == want["start_s"]
        assert {t["name"]: t["score"] for t in got["tags"]} == pytest.approx(
            {t["name"]: t["score"] for t in want["tags"]}, abs=1e-3)


BAD_FRAMES = [
    ("odd bytes", "", lambda ws: ws.send_bytes(b"\x00\x01\x02"), 1007),
    ("NaN", "?encoding=f32le", lambda ws: ws.send_bytes(np.full(800, np.nan, "<f4").tobytes()), 1007),
    ("text", "", lambda ws: ws.send_text("hello"), 1003),
    ("wrong control", "", lambda ws: ws.send_text(json.dumps({"type": "pause"})), 1003),
    ("too big", "", lambda ws: ws.send_bytes(np.zeros(16_001, "<i2").tobytes()), 1009),
    ("too short", "", lambda ws: (ws.send_bytes(np.zeros(10, "<i2").tobytes()), ws.send_text(END)), 1007),
]


@pytest.mark.parametrize(("case", "query", "send", "code"), BAD_FRAMES, ids=[c[0] for c in BAD_FRAMES])
def test_bad_frames_close_with_a_code(make_client, case: str, query: str, send, code: int) -> None:
    with make_client() as client, client.websocket_connect(f"/v1/stream{query}") as ws:
        assert ws.receive_json()["type"] == "ready"
        send(ws)
        assert close_code(ws) == code, case


@pytest.mark.parametrize(
    "query",
    ["sample_rate=5", "sample_rate=x", "encoding=mp3", "hop=99", "hop=0", "hop=nan", "top_k=0", "threshold=2",
     "volume=11"],
)
def test_bad_parameters_close_with_1008(make_client, query: str) -> None:
    with make_client() as client, client.websocket_connect(f"/v1/stream?{query}") as ws:
        assert close_code(ws) == 1008


def test_api_keys_by_header_or_subprotocol(make_client, headless_model_path: Path) -> None:
    chunk = pcm16(np.full(1600, 0.1, np.float32)).tobytes()
    with make_client(api_keys=["k1"]) as client:
        with client.websocket_connect("/v1/stream") as ws:
            assert close_code(ws) == 1008
        with client.websocket_connect("/v1/stream", subprotocols=["eat", "eat.bearer.wrong"]) as ws:
            assert close_code(ws) == 1008
        with client.websocket_connect("/v1/stream", subprotocols=["eat", "eat.bearer.k1"]) as ws:
            assert ws.accepted_subprotocol == "eat"  # never the key
            assert stream_all(ws, [chunk])[2]["num_windows"] == 1
        with client.websocket_connect("/v1/stream?api_key=k1") as ws:  # keys stay out of URLs (and logs)
            assert close_code(ws) == 1008
        with client.websocket_connect("/v1/stream", headers={"authorization": "Bearer k1"}) as ws:
            assert stream_all(ws, [chunk])[2]["num_windows"] == 1
        assert metric(client, "eat_rejections_total", 'reason="unauthorized"') == 3  # a key in the URL counts as none
    with make_client(model_path=headless_model_path) as client, client.websocket_connect("/v1/stream") as ws:
        assert close_code(ws) == 1008


def test_a_full_queue_closes_with_1013_and_an_engine_failure_with_1011(make_client, gated_engine) -> None:
    frame = pcm16(np.full(16_000, 0.1, np.float32)).tobytes()  # 1 s: one full toy window at once
    post = lambda client, seconds: client.post(
        "/predict", content=wav_bytes(seconds), headers={"content-type": "audio/wav"})
    with make_client(engine=gated_engine, max_batch=2, batch_buckets="1,2", queue_size=2) as client:
        gated_engine.gate.clear()
        gated_engine.entered.clear()
        with ThreadPoolExecutor(3) as pool:  # the same filling as test_overload_answers_429_with_retry_after
            first = pool.submit(post, client, 0.3)
            assert gated_engine.entered.wait(10)
            waiting = [pool.submit(post, client, 1.3)]
            wait_for_metric(client, "eat_queue_wait_seconds_count", 3)
            waiting.append(pool.submit(post, client, 1.3))
            wait_for_metric(client, "eat_queue_depth", 2)
            with client.websocket_connect("/v1/stream") as ws:
                ws.receive_json()
                ws.send_bytes(frame)
                code = close_code(ws)
            gated_engine.gate.set()
            assert all(f.result().status_code == 200 for f in [first, *waiting])
        assert code == 1013
        assert metric(client, "eat_rejections_total", 'reason="queue_full"') == 1
        gated_engine.fail_next = True
        with client.websocket_connect("/v1/stream") as ws:
            ws.receive_json()
            ws.send_bytes(frame)
            assert close_code(ws) == 1011


def test_an_idle_stream_is_closed_with_1001(make_client) -> None:
    with make_client(request_timeout_s=0.2) as client, client.websocket_connect("/v1/stream") as ws:
        assert ws.receive_json()["type"] == "ready"
        assert close_code(ws) == 1001  # the server's own idle timer closes it; the test only waits for that
