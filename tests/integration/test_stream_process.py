"""``/v1/stream`` through uvicorn's WebSocket server and the ``websockets`` client: the same tags as
``/predict`` with the same hop, an API key as a subprotocol (the browser's way), a close code for a bad frame."""

from __future__ import annotations

import asyncio
import io
import json
from pathlib import Path

import httpx
import numpy as np
import pytest
import soundfile as sf
import websockets

KEY = "stream-key"


@pytest.fixture(scope="module")
def server(toy_onnx: Path, tmp_path_factory: pytest.TempPathFactory, start_server):
    env = {"EAT_MODEL_PATH": str(toy_onnx), "EAT_API_KEYS": KEY, "EAT_MAX_BATCH": "4", "EAT_BATCH_BUCKETS": "1,2,4"}
    with start_server(["-m", "service.server"], env, tmp_path_factory.mktemp("stream")) as running:
        yield running


async def stream(url: str, chunks: list[bytes]) -> list[dict]:
    async with websockets.connect(url, subprotocols=["eat", f"eat.bearer.{KEY}"]) as ws:
        assert json.loads(await ws.recv())["type"] == "ready"
        for chunk in chunks:
            await ws.send(chunk)
        await ws.send(json.dumps({"type": "end"}))
        messages = [json.loads(m) async for m in ws]  # until the server closes with 1000
        assert ws.close_code == 1000
    return messages


def test_stream_matches_predict(server) -> None:
    samples = (np.random.default_rng(5).normal(0, 0.1, 5 * 16_000) * 32767).astype("<i2")
    chunks = [samples[i : i + 1600].tobytes() for i in range(0, len(samples), 1600)]
    ws_url = server.url.replace("http://", "ws://") + "/v1/stream?hop=0.5&top_k=3"
    messages = asyncio.run(stream(ws_url, chunks))
    wav = io.BytesIO()
    sf.write(wav, samples, 16_000, format="WAV", subtype="PCM_16")
    timeline = httpx.post(f"{server.url}/predict?timeline=true&hop=0.5&top_k=3", content=wav.getvalue(),
                          headers={"content-type": "audio/wav", "authorization": f"Bearer {KEY}"},
                          timeout=30).json()["results"][0]["timeline"]
    assert messages[-1] == {"type": "end", "num_windows": len(timeline), "duration_s": 5.0}
    for got, want in zip(messages[:-1], timeline, strict=True):
        assert got["start_s"] == want["start_s"] and [t["name"] for t in got["tags"]] == [t["name"] for t in
                                                                                        want["tags"]]


def test_bad_frame_and_missing_key_close_cleanly(server) -> None:
    async def run() -> tuple[int, int]:
        ws_url = server.url.replace("http://", "ws://") + "/v1/stream"
        async with websockets.connect(ws_url) as ws:
            with pytest.raises(websockets.ConnectionClosed):
                await ws.recv()
            no_key = ws.close_code
        async with websockets.connect(ws_url, additional_headers={"Authorization": f"Bearer {KEY}"}) as ws:
            await ws.recv()
            await ws.send(b"\x01\x02\x03")
            with pytest.raises(websockets.ConnectionClosed):
                await ws.recv()
            bad_frame = ws.close_code
        return no_key, bad_frame

    assert asyncio.run(run()) == (1008, 1007)
    assert httpx.get(f"{server.url}/health/ready").status_code == 200
