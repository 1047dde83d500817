"""Admission and the request deadline: the ASGI layer on its own, then inside the app.

The ASGI tests drive ``Admission`` with scripted ``receive``/``send`` callables, so they see exactly
which messages were read and sent. The app tests hold the engine or the decoder at a gate, which makes
"in flight" and "past the deadline" states the test decides, not the scheduler.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from starlette.types import Message, Receive, Scope, Send
from svc_helpers import GatedEngine, wav_bytes
from test_app import metric, wait_for_metric

import service.inference
from service.admission import Admission, is_work
from service.errors import DeadlineExceeded
from service.metrics import Metrics
from service.middleware import V2_INFER, endpoint_label


def http_scope(method: str = "POST", path: str = "/predict") -> Scope:
    return {"type": "http", "method": method, "path": path, "headers": []}


def rejections(metrics: Metrics, reason: str) -> float:
    return metrics.rejections.labels(reason=reason)._value.get()


class Recorder:
    """A ``send`` that keeps every message."""

    def __init__(self) -> None:
        self.messages: list[Message] = []

    async def __call__(self, message: Message) -> None:
        self.messages.append(message)

    @property
    def status(self) -> int:
        return next(m["status"] for m in self.messages if m["type"] == "http.response.start")

    @property
    def json(self) -> dict:
        return json.loads(b"".join(m.get("body", b"") for m in self.messages if m["type"] == "http.response.body"))

    def header(self, name: bytes) -> bytes | None:
        start = next(m for m in self.messages if m["type"] == "http.response.start")
        return dict(start["headers"]).get(name)


async def never_read() -> Message:
    raise AssertionError("the body must not be read")


async def answer_ok(send: Send) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": b"{}"})


def test_over_the_limit_is_429_before_the_body_is_read() -> None:
    metrics = Metrics()

    async def scenario() -> tuple[Recorder, Recorder, Recorder]:
        held = asyncio.Event()
        inside = asyncio.Event()

        async def app(scope: Scope, receive: Receive, send: Send) -> None:
            if scope["path"] == "/predict":
                inside.set()
                await held.wait()
            await answer_ok(send)

        admission = Admission(app, metrics=metrics, limit=1, request_timeout_s=30)
        first = Recorder()
        task = asyncio.ensure_future(admission(http_scope(), never_read, first))
        await inside.wait()
        assert admission.admitted == 1 and metrics.admitted._value.get() == 1
        refused, probe = Recorder(), Recorder()
        await admission(http_scope(path="/embed"), never_read, refused)
        await admission(http_scope("GET", "/health/live"), never_read, probe)  # not work: never refused
        held.set()
        await task
        return first, refused, probe

    first, refused, probe = asyncio.run(scenario())
    assert (first.status, refused.status, probe.status) == (200, 429, 200)
    assert refused.json["error_type"] == "overloaded" and "limit is 1" in refused.json["error"]
    assert refused.header(b"retry-after") == b"1"
    assert rejections(metrics, "concurrency_limit") == 1 and metrics.admitted._value.get() == 0


def test_a_stalled_upload_meets_the_deadline() -> None:
    metrics = Metrics()
    caught: list[BaseException] = []

    async def scenario() -> None:
        stalled = asyncio.Event()  # never set: the client stops sending after the first chunk
        chunks = [{"type": "http.request", "body": b"abc", "more_body": True}]

        async def receive() -> Message:
            if chunks:
                return chunks.pop()
            await stalled.wait()
            raise AssertionError("unreachable")

        async def app(scope: Scope, receive: Receive, send: Send) -> None:
            assert (await receive())["body"] == b"abc"
            try:
                await receive()
            except DeadlineExceeded as err:
                caught.append(err)
                raise

        with pytest.raises(DeadlineExceeded):
            await Admission(app, metrics=metrics, limit=2, request_timeout_s=0.05)(http_scope(), receive, Recorder())

    asyncio.run(scenario())
    assert caught and "upload did not complete" in caught[0].message
    assert metrics.admitted._value.get() == 0  # the slot came back


def test_after_the_body_receive_is_no_longer_bounded() -> None:
    """The disconnect watcher waits on ``receive`` past the deadline; that must not look like an error."""

    async def scenario() -> Message:
        later = asyncio.Event()
        messages = [{"type": "http.disconnect"}, {"type": "http.request", "body": b"all", "more_body": False}]

        async def receive() -> Message:
            if len(messages) == 1:
                await later.wait()
            return messages.pop()

        seen: list[Message] = []

        async def app(scope: Scope, receive_: Receive, send: Send) -> None:
            seen.append(await receive_())
            deadline = scope["state"]["deadline"]
            while time.monotonic() <= deadline:  # bounded: the deadline is 20 ms away
                await asyncio.sleep(0.005)
            later.set()
            seen.append(await receive_())

        await Admission(app, metrics=Metrics(), limit=1, request_timeout_s=0.02)(http_scope(), receive, Recorder())
        return seen[-1]

    assert asyncio.run(scenario())["type"] == "http.disconnect"


def test_a_success_ready_after_the_deadline_becomes_503() -> None:
    metrics = Metrics()

    async def scenario() -> Recorder:
        async def app(scope: Scope, receive: Receive, send: Send) -> None:
            deadline = scope["state"]["deadline"]
            while time.monotonic() <= deadline:  # bounded: the deadline is 20 ms away
                await asyncio.sleep(0.005)
            await answer_ok(send)

        sent = Recorder()
        await Admission(app, metrics=metrics, limit=1, request_timeout_s=0.02)(http_scope(), never_read, sent)
        return sent

    sent = asyncio.run(scenario())
    assert sent.status == 503 and sent.json["error_type"] == "deadline_exceeded"
    assert [m["type"] for m in sent.messages] == ["http.response.start", "http.response.body"]  # late body dropped
    assert rejections(metrics, "deadline") == 1


def test_errors_after_the_deadline_pass_unchanged() -> None:
    async def scenario() -> Recorder:
        async def app(scope: Scope, receive: Receive, send: Send) -> None:
            while time.monotonic() <= scope["state"]["deadline"]:
                await asyncio.sleep(0.005)
            await send({"type": "http.response.start", "status": 422, "headers": []})
            await send({"type": "http.response.body", "body": b"{}"})

        sent = Recorder()
        await Admission(app, metrics=Metrics(), limit=1, request_timeout_s=0.02)(http_scope(), never_read, sent)
        return sent

    assert asyncio.run(scenario()).status == 422


# ---- inside the app ----------------------------------------------------------------------------------------
def post(client, seconds: float = 0.3):
    return client.post("/predict", content=wav_bytes(seconds), headers={"content-type": "audio/wav"})


class GatedDecode:
    """Replaces ``service.inference.prepare`` (decode + windows): every call waits at the gate, then runs for real."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.gate = threading.Event()
        self.entered = threading.Event()
        self.finished = 0
        real = service.inference.prepare

        def gated(data: bytes, **kwargs):
            self.entered.set()
            assert self.gate.wait(10)
            try:
                return real(data, **kwargs)
            finally:
                self.finished += 1

        monkeypatch.setattr(service.inference, "prepare", gated)


def test_the_cap_refuses_work_in_the_app(make_client, gated_engine: GatedEngine) -> None:
    with make_client(engine=gated_engine, max_concurrent_requests=1) as client:
        gated_engine.gate.clear()
        gated_engine.entered.clear()
        with ThreadPoolExecutor(1) as pool:
            first = pool.submit(post, client)
            assert gated_engine.entered.wait(10)
            refused = post(client)
            model = client.get("/v1/model")  # other routes are never refused
            gated_engine.gate.set()
            assert first.result().status_code == 200
        assert metric(client, "eat_rejections_total", 'reason="concurrency_limit"') == 1
        assert metric(client, "eat_admitted_requests") == 0
        assert post(client).status_code == 200
    assert refused.status_code == 429 and refused.json()["error_type"] == "overloaded"
    assert refused.headers["retry-after"] == "1" and model.status_code == 200


def test_deadline_during_decode_drops_the_work(make_client, gated_engine: GatedEngine, monkeypatch) -> None:
    decode = GatedDecode(monkeypatch)
    with make_client(engine=gated_engine, request_timeout_s=0.3) as client:
        submitted: list[object] = []
        batcher = client.app.state.eat.batcher
        real_submit = batcher.submit
        batcher.submit = lambda *a, **k: submitted.append(a) or real_submit(*a, **k)
        calls_before = len(gated_engine.calls)
        response = post(client)  # the decoder holds it past its deadline
        assert decode.finished == 0  # the answer did not wait for the decode
        decode.gate.set()
        client.app.state.eat.decode_pool.shutdown(wait=True)  # the held job ends; its result goes nowhere
        assert decode.finished == 1
        assert metric(client, "eat_rejections_total", 'reason="deadline"') == 1
        assert metric(client, "eat_decode_pending") == 0
    assert response.status_code == 503 and response.json()["error_type"] == "deadline_exceeded"
    assert "while decoding" in response.json()["error"]
    assert submitted == [] and len(gated_engine.calls) == calls_before  # nothing reached the batcher


def test_a_full_decode_pool_is_429(make_client, monkeypatch) -> None:
    decode = GatedDecode(monkeypatch)
    with make_client(decode_threads=1, decode_queue_size=1) as client:
        with ThreadPoolExecutor(1) as pool:
            first = pool.submit(post, client)
            assert decode.entered.wait(10)
            wait_for_metric(client, "eat_decode_pending", 1)
            refused = post(client)
            decode.gate.set()
            assert first.result().status_code == 200
        assert metric(client, "eat_rejections_total", 'reason="decode_queue_full"') == 1
    assert refused.status_code == 429 and refused.json()["error_type"] == "overloaded"
    assert int(refused.headers["retry-after"]) >= 1


def test_a_request_refused_by_the_decode_pool_drops_its_other_files(make_client, monkeypatch) -> None:
    """Three files, one decode thread, room for two jobs: files 1 and 2 are queued, file 3 is refused.
    The 429 takes file 2 out of the pool too: it never runs (file 1 may have started; it is held at the
    gate until the answer is in, so file 2 cannot start before it is cancelled)."""
    decode = GatedDecode(monkeypatch)
    calls: list[str] = []
    gated = service.inference.prepare
    monkeypatch.setattr(service.inference, "prepare", lambda data, **kw: calls.append(kw["name"]) or gated(data, **kw))
    files = [("file", (f"{i}.wav", wav_bytes(0.3))) for i in range(3)]
    with make_client(decode_threads=1, decode_queue_size=2) as client:
        response = client.post("/predict", files=files)
        decode.gate.set()
        pool = client.app.state.eat.decode_pool
        pool.shutdown(wait=True)
        assert pool.held == 0
        assert metric(client, "eat_rejections_total", 'reason="decode_queue_full"') == 1
    assert response.status_code == 429 and response.json()["error_type"] == "overloaded"
    assert calls in ([], ["0.wav"])


@pytest.mark.parametrize(
    ("method", "path", "work"),
    [
        ("POST", "/predict", True),
        ("POST", "/embed", True),
        ("POST", "/v1/embeddings", True),
        ("POST", "/v2/models/toy-eat/infer", True),
        ("POST", "/v2/models/toy-eat/versions/1/infer", True),
        ("GET", "/v2/models/toy-eat", False),
        ("GET", "/health/ready", False),
        ("GET", "/metrics", False),
    ],
)
def test_every_route_that_carries_audio_takes_a_slot(method: str, path: str, work: bool) -> None:
    assert is_work(method, path) is work


def test_endpoint_labels_stay_bounded() -> None:
    assert endpoint_label("/v2/models/any-name/infer") == endpoint_label("/v2/models/other/infer") == V2_INFER
    assert endpoint_label("/v2/models/any-name") == "/v2" and endpoint_label("/v1/embeddings") == "/v1/embeddings"
    assert endpoint_label("/nonsense/123") == "other"
