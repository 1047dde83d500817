"""``/v1/stream``: tags for continuous audio over a WebSocket, one message per window, every hop.

Protocol (the README and docs/serving.md show a client):

- connect to ``/v1/stream?sample_rate=16000&encoding=pcm_s16le&hop=1.0&top_k=5&threshold=0.3``; every
  parameter is optional (defaults: 16 kHz, 16-bit little-endian PCM, the service's hop, 5 tags). With
  ``EAT_API_KEYS`` set, send ``Authorization: Bearer KEY`` or, from a browser (which cannot set
  WebSocket headers), offer the subprotocols ``eat`` and ``eat.bearer.KEY``: the server picks ``eat``,
  so the key is never echoed, and it stays out of URLs and access logs;
- the server answers ``{"type": "ready", ...}`` with the model, window and hop;
- the client sends binary frames of mono samples (``pcm_s16le`` or ``f32le``), each at most
  ``max_frame_samples`` (one second at the declared rate);
- for every window of the model's length, ``hop`` apart, the server sends
  ``{"type": "tags", "start_s", "end_s", "tags": [...]}`` — the same windows, numbers and tags as
  ``/predict?timeline=true`` gives for the same audio and hop;
- the text frame ``{"type": "end"}`` flushes the last, zero-padded windows (as ``/predict`` pads a
  file's tail), answers ``{"type": "end", "num_windows", "duration_s"}`` and closes with 1000.

Bounds: the buffer holds at most one window plus one frame (older samples are dropped once no window
needs them). The server reads the next frame only after the windows of the previous one have their
tags, so a client that sends faster than the model runs is held back by TCP (uvicorn queues at most a
few frames). Windows go through the same batcher as HTTP requests, so they share its batches, its
queue bound and its 429 logic. Close codes: 1000 done; 1001 idle past ``EAT_REQUEST_TIMEOUT_S`` or the
server is draining; 1003 a text frame that is not ``{"type": "end"}``; 1007 bad samples (a frame
that is not whole samples, NaN/Inf); 1008 bad parameters, no or a wrong API key, no classifier;
1009 a frame over the limit; 1011 the engine failed; 1013 the queue is full or a deadline passed,
retry later.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from dataclasses import dataclass

import numpy as np
import soxr
from fastapi import APIRouter, WebSocket, WebSocketDisconnect

from eat.audio import MIN_SAMPLES
from eat.contract import SAMPLE_RATE, sigmoid
from eat.predictor import top_tags
from service.app import ServiceState
from service.errors import Draining, EngineError, ServiceError
from service.inference import Inference, StageTimings

logger = logging.getLogger(__name__)

ENCODINGS = {"pcm_s16le": np.dtype("<i2"), "f32le": np.dtype("<f4")}
MIN_RATE, MAX_RATE = 1_000, 768_000
PROTOCOL, KEY_PROTOCOL = "eat", "eat.bearer."

router = APIRouter(tags=["streaming"])


class StreamClosed(Exception):
    """End the stream with a WebSocket close code and a reason (at most 123 bytes on the wire)."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code, self.reason = code, reason[:120]


@dataclass(frozen=True)
class StreamParams:
    sample_rate: int
    dtype: np.dtype
    hop_samples: int
    top_k: int
    threshold: float | None

    @property
    def max_frame_samples(self) -> int:
        return self.sample_rate  # one second of audio per frame at most


def _params(ws: WebSocket, inference: Inference) -> StreamParams:
    query = ws.query_params
    unknown = sorted(set(query) - {"sample_rate", "encoding", "hop", "top_k", "threshold"})
    if unknown:
        raise StreamClosed(1008, f"unknown parameters {unknown}")
    try:
        rate = int(query.get("sample_rate", SAMPLE_RATE))
        hop = float(query["hop"]) if "hop" in query else None
        top_k = int(query.get("top_k", 5))
        threshold = float(query["threshold"]) if "threshold" in query else None
    except ValueError as err:
        raise StreamClosed(1008, f"bad parameter: {err}") from None
    encoding = query.get("encoding", "pcm_s16le")
    if encoding not in ENCODINGS:
        raise StreamClosed(1008, f"encoding must be one of {', '.join(ENCODINGS)}")
    if not MIN_RATE <= rate <= MAX_RATE:
        raise StreamClosed(1008, f"sample_rate must be in [{MIN_RATE}, {MAX_RATE}] Hz")
    if not 1 <= top_k <= 1000 or (threshold is not None and not 0.0 <= threshold <= 1.0):
        raise StreamClosed(1008, "top_k must be in [1, 1000] and threshold in [0, 1]")
    if hop is not None and not (math.isfinite(hop) and 0 < hop <= inference.info.window_s):
        raise StreamClosed(1008, f"hop must be in (0, {inference.info.window_s:.3f}] seconds")
    return StreamParams(rate, ENCODINGS[encoding], inference.hop_samples_for(hop), top_k, threshold)


def _authorised(ws: WebSocket, keys: list[str]) -> bool:
    if not keys:
        return True
    scheme, _, token = ws.headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and token.strip() in keys:
        return True
    offered = ws.scope.get("subprotocols", [])
    return any(p.startswith(KEY_PROTOCOL) and p[len(KEY_PROTOCOL) :] in keys for p in offered)


class WindowBuffer:
    """The last samples of the stream, enough for the next window and one frame; windows ``hop`` apart.

    ``cut_windows`` semantics exactly: window ``k`` starts at ``k * hop``; a full window is ready once
    its last sample arrived; at the end the windows that reach past the audio are zero-padded, up to
    ``1 + ceil((N - window) / hop)`` windows (one for a stream shorter than a window).
    """

    def __init__(self, window: int, hop: int, max_frame: int, min_samples: int = MIN_SAMPLES) -> None:
        self.window, self.hop, self.min_samples = window, hop, min_samples
        self._buffer = np.zeros(window + max_frame, np.float32)  # the bound: never grows
        self._first = 0  # stream index of _buffer[0]
        self._filled = 0
        self.total = 0  # samples received so far (16 kHz)
        self.next_window = 0  # index k of the next window to send

    def push(self, samples: np.ndarray) -> None:
        if self._filled + len(samples) > len(self._buffer):
            raise StreamClosed(1009, f"frame of {len(samples)} samples exceeds the buffer")
        self._buffer[self._filled : self._filled + len(samples)] = samples
        self._filled += len(samples)
        self.total += len(samples)

    def _take(self, count: int, final: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        waveform = np.zeros((count, self.window), np.float32)  # [W, S]
        num_samples = np.empty(count, np.int64)
        starts = np.empty(count, np.int64)
        for row in range(count):
            start = (self.next_window + row) * self.hop
            piece = self._buffer[start - self._first : min(start + self.window, self.total) - self._first]
            waveform[row, : len(piece)] = piece
            num_samples[row], starts[row] = len(piece), start
        self.next_window += count
        keep_from = self.next_window * self.hop - self._first  # nothing before the next window is needed
        if keep_from > 0 and not final:
            kept = self._filled - keep_from
            self._buffer[:kept] = self._buffer[keep_from : self._filled]
            self._first += keep_from
            self._filled = kept
        return waveform, num_samples, starts

    def ready(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The full windows that can be sent now."""
        count = max(0, (self.total - self.window) // self.hop + 1 - self.next_window)
        return self._take(count, final=False)

    def rest(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """At the end of the stream: the remaining (padded) windows."""
        if self.total < self.min_samples and self.next_window == 0:  # /predict refuses such a file too
            raise StreamClosed(1007, f"the stream holds {self.total} samples; at least {self.min_samples} needed")
        last = 1 if self.total <= self.window else 1 + math.ceil((self.total - self.window) / self.hop)
        return self._take(max(0, last - self.next_window), final=True)


def _samples(data: bytes, params: StreamParams, resampler: soxr.ResampleStream | None) -> np.ndarray:
    width = params.dtype.itemsize
    if len(data) % width:
        raise StreamClosed(1007, f"a frame must hold whole {width}-byte samples, got {len(data)} bytes")
    if len(data) // width > params.max_frame_samples:
        raise StreamClosed(1009, f"a frame holds at most {params.max_frame_samples} samples (1 s)")
    raw = np.frombuffer(data, params.dtype)
    samples = raw / np.float32(32768) if params.dtype.kind == "i" else raw.astype(np.float32)
    if not np.isfinite(samples).all():
        raise StreamClosed(1007, "the audio contains NaN or infinite samples")
    if resampler is not None:
        samples = resampler.resample_chunk(samples)
    return samples.astype(np.float32, copy=False)


async def _send_windows(ws: WebSocket, state: ServiceState, inference: Inference, params: StreamParams,
                        cut: tuple[np.ndarray, np.ndarray, np.ndarray]) -> None:
    waveform, num_samples, starts = cut
    if not len(starts):
        return
    deadline = time.monotonic() + state.settings.request_timeout_s
    out = await inference.run_windows(waveform, num_samples, ("logits",), deadline=deadline,
                                      timings=StageTimings())
    scores = sigmoid(out["logits"])  # [W, C]
    for row, start in enumerate(starts):
        tags = top_tags(scores[row], inference.info.labels, top_k=params.top_k, threshold=params.threshold)
        await ws.send_text(json.dumps({
            "type": "tags",
            "start_s": round(float(start) / SAMPLE_RATE, 4),
            "end_s": round(float(start + num_samples[row]) / SAMPLE_RATE, 4),
            "tags": [vars(t) for t in tags],
        }))


def _close_code(err: ServiceError) -> int:
    if isinstance(err, Draining):
        return 1001
    if isinstance(err, EngineError):
        return 1011
    return 1013 if err.status in (429, 503) else 1008


@router.websocket("/v1/stream")
async def stream(ws: WebSocket) -> None:
    state: ServiceState = ws.app.state.eat
    await ws.accept(subprotocol=PROTOCOL if PROTOCOL in ws.scope.get("subprotocols", []) else None)
    code, reason = 1000, "done"
    try:
        try:
            await _serve(ws, state)
        except StreamClosed as err:
            code, reason = err.code, err.reason
            await ws.close(code, reason)
        except ServiceError as err:
            if err.reason is not None:
                state.metrics.reject(err.reason)
            code, reason = _close_code(err), err.message[:120]
            await ws.close(code, reason)
    except WebSocketDisconnect as err:
        code, reason = err.code, "the client closed the stream or went away"
    logger.info("stream closed with %d: %s", code, reason)  # one line per stream, as one per request


async def _serve(ws: WebSocket, state: ServiceState) -> None:
    inference, _ = state.running()
    if not _authorised(ws, state.settings.api_keys):
        state.metrics.reject("unauthorized")
        raise StreamClosed(1008, "missing or invalid API key: Authorization: Bearer KEY, or subprotocol eat.bearer.KEY")
    if not inference.info.has_classifier:
        raise StreamClosed(1008, "this model has no classifier head")
    params = _params(ws, inference)
    resampler = None
    if params.sample_rate != SAMPLE_RATE:
        resampler = soxr.ResampleStream(params.sample_rate, SAMPLE_RATE, 1, dtype="float32", quality="HQ")
    max_frame_16k = math.ceil(params.max_frame_samples * SAMPLE_RATE / params.sample_rate) + 1024  # + filter delay
    buffer = WindowBuffer(inference.info.window_samples, params.hop_samples, max_frame_16k)
    await ws.send_text(json.dumps({
        "type": "ready", "model": inference.info.model_name, "sample_rate": params.sample_rate,
        "window_s": inference.info.window_s, "hop_s": params.hop_samples / SAMPLE_RATE,
        "max_frame_samples": params.max_frame_samples,
    }))
    while True:
        try:
            message = await asyncio.wait_for(ws.receive(), timeout=state.settings.request_timeout_s)
        except asyncio.TimeoutError:
            raise StreamClosed(1001, "idle: no frame within EAT_REQUEST_TIMEOUT_S") from None
        if message["type"] == "websocket.disconnect":
            raise WebSocketDisconnect(message.get("code", 1005))
        if message.get("bytes") is not None:
            buffer.push(_samples(message["bytes"], params, resampler))
            await _send_windows(ws, state, inference, params, buffer.ready())
            continue
        try:
            control = json.loads(message.get("text") or "")
        except ValueError:
            control = None
        if not (isinstance(control, dict) and control.get("type") == "end"):
            raise StreamClosed(1003, 'text frames must be {"type": "end"}; send audio as binary frames')
        if resampler is not None:
            buffer.push(resampler.resample_chunk(np.zeros(0, np.float32), last=True))
        await _send_windows(ws, state, inference, params, buffer.ready())
        await _send_windows(ws, state, inference, params, buffer.rest())
        await ws.send_text(json.dumps({"type": "end", "num_windows": buffer.next_window,
                                       "duration_s": round(buffer.total / SAMPLE_RATE, 4)}))
        await ws.close(1000)
        return
