"""A request's way through the service: uploads -> decode (thread pool) -> windows -> batcher -> answer.

``Inference`` is ``eat.Predictor``'s asynchronous, batched twin: the same ``prepare`` (decode and cut
into windows) and the same aggregation (``prediction``, ``embedding``: clip score = max over windows,
embeddings pooled over valid token rows), with the shared batcher in place of a direct engine call.
It knows nothing of HTTP: routes hand it ``Upload`` objects and turn its dataclasses into schemas. All
windows of one request (all its files) enter the batcher as one ticket, so admission is all-or-nothing.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import time
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Literal

import numpy as np

from eat import audio
from eat.contract import Granularity, ModelInfo, hop_samples_for, outputs_for
from eat.events import Thresholds
from eat.predictor import Clip, Embedding, Prediction, embedding, prediction, prepare
from service.batcher import Batcher
from service.errors import (
    AudioTooLong,
    Cancelled,
    DeadlineExceeded,
    InvalidAudio,
    InvalidParameter,
    NoClassifier,
    ServiceError,
)
from service.metrics import Metrics

# /embed's names: `cls` is the utterance (CLS) vector; the rest are eat.contract's granularities.
Pooling = Literal["cls", "mean", "time", "frame", "all"]


@dataclass
class Upload:
    """A file's bytes (any format), or a waveform [S] / [S, C] at ``sample_rate`` (V2 tensors)."""

    filename: str
    data: bytes | np.ndarray
    sample_rate: int | None = None


@dataclass
class StageTimings:
    """Per-request stage durations, for the x-*-time headers and the request's log line."""

    decode_s: float = 0.0
    queue_s: float = 0.0
    inference_s: float = 0.0

    def headers(self) -> dict[str, str]:
        return {
            "x-decode-time": f"{self.decode_s * 1000:.2f}",
            "x-queue-time": f"{self.queue_s * 1000:.2f}",
            "x-inference-time": f"{self.inference_s * 1000:.2f}",
        }


class Inference:
    def __init__(
        self,
        *,
        info: ModelInfo,
        batcher: Batcher,
        metrics: Metrics,
        executor: Executor,
        hop_samples: int,
        max_duration_s: float,
        thresholds: Thresholds | None = None,
    ) -> None:
        self.info = info
        self.thresholds = thresholds or Thresholds()  # sound-event thresholds, checked against the labels
        self._batcher = batcher
        self._metrics = metrics
        self._executor = executor
        self._hop_samples = hop_samples
        self._max_duration_s = max_duration_s

    async def predict(
        self,
        uploads: list[Upload],
        *,
        deadline: float,
        timings: StageTimings,
        disconnected: asyncio.Future | None = None,
        hop_s: float | None = None,
    ) -> list[Prediction]:
        """``hop_s`` overrides the service's window hop for this request (overlapping windows for events)."""
        if not self.info.has_classifier:
            raise NoClassifier("this model has no classifier head; use /embed")
        done = await self.infer(uploads, ("logits",), deadline=deadline, timings=timings, disconnected=disconnected,
                                hop_s=hop_s)
        return [prediction(clip, out["logits"], self.info.labels) for clip, out in done]

    async def infer(
        self,
        uploads: list[Upload],
        outputs: tuple[str, ...],
        *,
        deadline: float,
        timings: StageTimings,
        disconnected: asyncio.Future | None = None,
        hop_s: float | None = None,
    ) -> list[tuple[Clip, dict[str, np.ndarray]]]:
        """Each file's clip with its windows' raw ``outputs``, for routes that shape their own answers."""
        hop_samples = self.hop_samples_for(hop_s)
        clips = await self._decode_all(uploads, deadline=deadline, timings=timings, hop_samples=hop_samples)
        results = await self._infer(clips, outputs, deadline=deadline, timings=timings, disconnected=disconnected)
        return list(zip(clips, results, strict=True))

    def hop_samples_for(self, hop_s: float | None) -> int:
        if hop_s is None:
            return self._hop_samples
        try:
            return hop_samples_for(hop_s, self.info.window_samples)
        except ValueError as err:
            raise InvalidParameter(f"hop: {err}") from None

    async def embed(
        self,
        uploads: list[Upload],
        *,
        pooling: Pooling,
        deadline: float,
        timings: StageTimings,
        disconnected: asyncio.Future | None = None,
    ) -> list[Embedding]:
        """Each file's embedding: ``[D]`` (cls, mean) or ``[rows, D]`` (time, frame, all)."""
        granularity: Granularity = "utterance" if pooling == "cls" else pooling
        clips = await self._decode_all(uploads, deadline=deadline, timings=timings)
        wanted = outputs_for(granularity)
        outputs = await self._infer(clips, wanted, deadline=deadline, timings=timings, disconnected=disconnected)
        return [embedding(clip, out, self.info, granularity) for clip, out in zip(clips, outputs, strict=True)]

    async def _decode_all(
        self, uploads: list[Upload], *, deadline: float, timings: StageTimings, hop_samples: int | None = None
    ) -> list[Clip]:
        loop = asyncio.get_running_loop()
        start = time.monotonic()
        jobs = []
        try:
            for upload in uploads:
                # copy_context: the decode thread logs with this request's id (STYLE.md §5)
                call = functools.partial(contextvars.copy_context().run, self._decode_one, upload,
                                         hop_samples or self._hop_samples)
                jobs.append(loop.run_in_executor(self._executor, call))
        except ServiceError:  # a full decode pool refused a file: drop this request's other files too
            for job in jobs:
                job.cancel()
            raise
        try:  # stop waiting at the deadline; cancelling drops the jobs that have not started
            decoded = await asyncio.wait_for(asyncio.gather(*jobs), timeout=max(0.0, deadline - time.monotonic()))
        except asyncio.TimeoutError:
            raise DeadlineExceeded("the request's deadline passed while decoding") from None
        timings.decode_s = time.monotonic() - start
        return list(decoded)

    def _decode_one(self, upload: Upload, hop_samples: int) -> Clip:
        start = time.monotonic()
        try:
            clip = prepare(upload.data, info=self.info, hop_samples=hop_samples, sample_rate=upload.sample_rate,
                           max_duration_s=self._max_duration_s, name=upload.filename)
        except audio.AudioTooLong as err:
            raise AudioTooLong(str(err)) from None
        except audio.AudioError as err:
            raise InvalidAudio(str(err)) from None
        self._metrics.decode_duration.observe(time.monotonic() - start)
        self._metrics.audio_seconds.inc(clip.audio.duration_s)
        return clip

    async def _infer(
        self,
        decoded: list[Clip],
        outputs: tuple[str, ...],
        *,
        deadline: float,
        timings: StageTimings,
        disconnected: asyncio.Future | None,
    ) -> list[dict[str, np.ndarray]]:
        """Run all windows of all files as one ticket; split the rows back per file."""
        waveform = np.concatenate([d.windows.waveform for d in decoded])  # [sum W, S]
        num_samples = np.concatenate([d.windows.num_samples for d in decoded])  # [sum W]
        results = await self.run_windows(waveform, num_samples, outputs, deadline=deadline, timings=timings,
                                         disconnected=disconnected)
        per_file, offset = [], 0
        for d in decoded:
            rows = slice(offset, offset + len(d.windows))
            per_file.append({name: results[name][rows] for name in outputs})
            offset = rows.stop
        return per_file

    async def run_windows(
        self,
        waveform: np.ndarray,
        num_samples: np.ndarray,
        outputs: tuple[str, ...],
        *,
        deadline: float,
        timings: StageTimings,
        disconnected: asyncio.Future | None = None,
    ) -> dict[str, np.ndarray]:
        """Windows already cut (``waveform`` [W, S], ``num_samples`` [W]) through the shared batcher, as
        one all-or-nothing ticket; the streaming route sends its windows this way."""
        ticket = self._batcher.submit(waveform, num_samples, outputs=outputs, deadline=deadline)
        waiters: set[asyncio.Future] = {ticket.future}
        if disconnected is not None:
            waiters.add(disconnected)
        try:
            done, _ = await asyncio.wait(
                waiters, timeout=max(0.0, deadline - time.monotonic()), return_when=asyncio.FIRST_COMPLETED
            )
        except asyncio.CancelledError:  # no error handler will see this one: count it here
            self._batcher.abandon(ticket, Cancelled("the request was cancelled"))
            ticket.future.cancel()
            self._metrics.reject("cancelled")
            raise
        if ticket.future not in done:
            error = (
                Cancelled("the client disconnected")
                if disconnected in done
                else DeadlineExceeded("the request's deadline passed before inference finished")
            )
            self._batcher.abandon(ticket, error)
            ticket.future.cancel()  # nobody will read it now
            raise error
        ticket.future.result()  # raises the ticket's ServiceError (deadline in queue, engine failure)
        timings.queue_s, timings.inference_s = ticket.queue_wait_s, ticket.inference_s
        return {name: ticket.results[name] for name in outputs}
