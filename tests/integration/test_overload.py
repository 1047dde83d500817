"""Overload refused at the door, on a real uvicorn process with a slow fake engine (issue 14).

Uploads are written by hand on raw sockets where the test must control how much of the body has been
sent. Every loop is bounded in count and time, talks only to 127.0.0.1 and ends by itself. Nothing
here asserts a latency: the assertions are on status codes, counters and the order of events (the
latency goals are measured by ``bench/overload.py``).
"""

from __future__ import annotations

import asyncio
import socket
import time
from pathlib import Path

import httpx
import pytest
from test_server_process import wav

LIMIT = 3
TIMEOUT_S = 4.0


@pytest.fixture(scope="module")
def gate_server(toy_onnx: Path, tmp_path_factory: pytest.TempPathFactory, start_server, slow_server_args):
    env = {
        "EAT_MODEL_PATH": str(toy_onnx),
        "EAT_MAX_BATCH": "2",
        "EAT_BATCH_BUCKETS": "1,2",
        "EAT_QUEUE_SIZE": "4",
        "EAT_MAX_CONCURRENT_REQUESTS": str(LIMIT),
        "EAT_REQUEST_TIMEOUT_S": str(TIMEOUT_S),
        "EAT_LOG_LEVEL": "WARNING",
    }
    with start_server([*slow_server_args, "0.1"], env, tmp_path_factory.mktemp("gate")) as server:
        yield server


def start_upload(url: str, body: bytes, send_bytes: int) -> socket.socket:
    """Open a connection, send the request head and the first ``send_bytes`` of ``body``; keep the rest."""
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=30)
    head = (
        f"POST /predict HTTP/1.1\r\nHost: {host}\r\nContent-Type: audio/wav\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    sock.sendall(head + body[:send_bytes])
    return sock


def read_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed before a response: {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {name.strip().lower(): value.strip() for name, value in (line.split(":", 1) for line in lines)}
    while len(body) < int(headers.get("content-length", "0")):
        chunk = sock.recv(65536)
        assert chunk, "connection closed inside the response body"
        body += chunk
    return int(status_line.split()[1]), headers, body


def wait_for(server, name: str, value: float, timeout_s: float = 20.0) -> None:
    end = time.monotonic() + timeout_s
    while server.metric(name) != value:
        assert time.monotonic() < end, f"{name} never reached {value} (now {server.metric(name)})"
        time.sleep(0.02)


def test_the_extra_upload_gets_429_before_its_body_is_sent(gate_server) -> None:
    wait_for(gate_server, "eat_admitted_requests", 0)
    refused_before = gate_server.metric("eat_rejections_total", 'reason="concurrency_limit"')
    body = wav(0.3)
    held = [start_upload(gate_server.url, body, 1000) for _ in range(LIMIT)]
    extra = None
    try:
        wait_for(gate_server, "eat_admitted_requests", LIMIT)  # all three wait inside, reading their bodies
        extra = start_upload(gate_server.url, body, 1000)  # 1000 of ~9,600 bytes sent, the rest never
        status, headers, answer = read_response(extra)
        assert status == 429 and headers["retry-after"] == "1" and b'"overloaded"' in answer
        assert gate_server.metric("eat_rejections_total", 'reason="concurrency_limit"') == refused_before + 1
        for sock in held:  # the admitted ones finish their uploads and are answered
            sock.sendall(body[1000:])
        assert [read_response(sock)[0] for sock in held] == [200] * LIMIT
    finally:
        for sock in [*held, extra]:
            if sock is not None:
                sock.close()
    wait_for(gate_server, "eat_admitted_requests", 0)


def test_a_stalled_upload_is_answered_at_its_deadline(gate_server) -> None:
    wait_for(gate_server, "eat_admitted_requests", 0)
    deadlines = gate_server.metric("eat_rejections_total", 'reason="deadline"')
    body = wav(0.3)
    with start_upload(gate_server.url, body, 500) as sock:  # and then nothing more
        status, _, answer = read_response(sock)
    assert status == 503 and b'"deadline_exceeded"' in answer and b"upload did not complete" in answer
    assert gate_server.metric("eat_rejections_total", 'reason="deadline"') == deadlines + 1
    wait_for(gate_server, "eat_admitted_requests", 0)  # its slot came back


def test_health_answers_through_a_flood(gate_server) -> None:
    """60 uploads at 30/s (open loop) against 3 slots, with /health/live and /metrics probed meanwhile."""
    wait_for(gate_server, "eat_admitted_requests", 0)
    reasons = ("concurrency_limit", "queue_full", "decode_queue_full", "deadline")
    before = {r: gate_server.metric("eat_rejections_total", f'reason="{r}"') for r in reasons}
    body = wav(0.3)

    async def flood() -> tuple[list[int], list[tuple[float, int]], float, float]:
        limits = httpx.Limits(max_connections=80, max_keepalive_connections=80)
        async with httpx.AsyncClient(base_url=gate_server.url, timeout=30, limits=limits) as client:
            start = time.monotonic()
            work_done: list[float] = []

            async def one(i: int) -> int:
                await asyncio.sleep(max(0.0, start + i / 30 - time.monotonic()))
                response = await client.post("/predict", content=body, headers={"content-type": "audio/wav"})
                work_done.append(time.monotonic())
                return response.status_code

            async def probe() -> list[tuple[float, int]]:
                answers = []
                for i in range(300):  # bounded: at most 300 probes, stops when the flood is over
                    if len(work_done) == 60:
                        break
                    path = "/metrics" if i % 5 == 4 else "/health/live"
                    answers.append((time.monotonic(), (await client.get(path)).status_code))
                    await asyncio.sleep(0.02)
                return answers

            statuses, probes = await asyncio.gather(asyncio.gather(*(one(i) for i in range(60))), probe())
            return list(statuses), probes, start, max(work_done)

    statuses, probes, start, last_work = asyncio.run(flood())
    assert set(statuses) <= {200, 429}, statuses  # no 5xx, no deadline answers
    assert statuses.count(200) >= LIMIT and statuses.count(429) > 0
    after = {r: gate_server.metric("eat_rejections_total", f'reason="{r}"') for r in reasons}
    assert sum(after[r] - before[r] for r in reasons) == statuses.count(429)
    assert after["deadline"] == before["deadline"]
    assert all(status == 200 for _, status in probes)
    during = [t for t, _ in probes if start < t < last_work]
    assert len(during) >= 5, "the probes were not answered while the work was in flight"


def test_deadline_expiry_during_decode(toy_onnx: Path, tmp_path: Path, start_server, slow_server_args) -> None:
    """Every decode takes 3 s and the deadline is 1 s: the answer is the 503, and nothing of the request
    reaches the batcher (its coroutine has ended with the answer, so no later submit is possible)."""
    env = {"EAT_MODEL_PATH": str(toy_onnx), "EAT_REQUEST_TIMEOUT_S": "1", "EAT_LOG_LEVEL": "WARNING"}
    with start_server([*slow_server_args, "0", "3"], env, tmp_path) as server:
        response = httpx.post(
            f"{server.url}/predict", content=wav(0.3), headers={"content-type": "audio/wav"}, timeout=30
        )
        assert response.status_code == 503 and response.json()["error_type"] == "deadline_exceeded"
        assert "while decoding" in response.json()["error"]
        assert server.metric("eat_rejections_total", 'reason="deadline"') == 1
        assert server.metric("eat_queue_wait_seconds_count") == 0 and server.metric("eat_batch_size_count") == 0
        wait_for(server, "eat_decode_pending", 0)  # the decode thread finished; its result went nowhere
        assert server.metric("eat_decode_duration_seconds_count") == 1
        assert server.metric("eat_queue_wait_seconds_count") == 0
