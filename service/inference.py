"""A request's way through the service: uploads -> decode (thread pool) -> windows -> batcher -> answer.

``Inference`` knows nothing of HTTP; routes hand it ``Upload`` objects and get result models back.
All windows of one request (all its files) enter the batcher as one ticket, so admission is
all-or-nothing. Aggregation is plain functions: clip scores are the max of the window scores, and
embeddings are pooled over the valid (unpadded) part of each window only.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import math
import time
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Literal

import numpy as np

from service.audio import SAMPLE_RATE, Audio, Windows, decode, to_windows
from service.batcher import Batcher
from service.engine import Label, ModelInfo
from service.errors import Cancelled, DeadlineExceeded, NoClassifier
from service.metrics import Metrics
from service.schemas import EmbedResult, PredictResult, Tag, WindowTags

Pooling = Literal["cls", "mean", "time"]
FRAME_SHIFT_SAMPLES = 160  # 10 ms at 16 kHz (Kaldi fbank framing, eat-reference.md §1.2)
FRAME_LENGTH_SAMPLES = 400  # 25 ms
PATCH_FRAMES = 16  # frames per time patch: one token row covers 160 ms


@dataclass
class Upload:
    filename: str
    data: bytes


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


@dataclass(frozen=True)
class _Decoded:
    filename: str
    audio: Audio
    windows: Windows


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
    ) -> None:
        self.info = info
        self._batcher = batcher
        self._metrics = metrics
        self._executor = executor
        self._hop_samples = hop_samples
        self._max_duration_s = max_duration_s

    async def predict(
        self,
        uploads: list[Upload],
        *,
        top_k: int,
        threshold: float | None,
        timeline: bool,
        deadline: float,
        timings: StageTimings,
        disconnected: asyncio.Future | None = None,
    ) -> list[PredictResult]:
        if not self.info.has_classifier:
            raise NoClassifier("this model has no classifier head; use /embed")
        decoded = await self._decode_all(uploads, deadline=deadline, timings=timings)
        outputs = await self._infer(decoded, ("logits",), deadline=deadline, timings=timings, disconnected=disconnected)
        return [
            predict_result(d, out["logits"], self.info.labels, top_k=top_k, threshold=threshold, timeline=timeline)
            for d, out in zip(decoded, outputs, strict=True)
        ]

    async def embed(
        self,
        uploads: list[Upload],
        *,
        pooling: Pooling,
        deadline: float,
        timings: StageTimings,
        disconnected: asyncio.Future | None = None,
    ) -> list[tuple[EmbedResult, np.ndarray]]:
        """Returns each file's result model and its pooled array ([D] or [T, D]) for .npy answers."""
        decoded = await self._decode_all(uploads, deadline=deadline, timings=timings)
        wanted = ("embedding",) if pooling == "cls" else ("tokens",)
        outputs = await self._infer(decoded, wanted, deadline=deadline, timings=timings, disconnected=disconnected)
        results = []
        for d, out in zip(decoded, outputs, strict=True):
            pooled = pool_embedding(pooling, out, d.windows.num_samples, self.info)
            result = EmbedResult(
                filename=d.filename,
                duration_s=round(d.audio.duration_s, 4),
                num_windows=len(d.windows),
                pooling=pooling,
                dim=int(pooled.shape[-1]),
                embedding=pooled.tolist(),
                time_step_s=PATCH_FRAMES * FRAME_SHIFT_SAMPLES / SAMPLE_RATE if pooling == "time" else None,
            )
            results.append((result, pooled))
        return results

    async def _decode_all(self, uploads: list[Upload], *, deadline: float, timings: StageTimings) -> list[_Decoded]:
        loop = asyncio.get_running_loop()
        start = time.monotonic()
        jobs = []
        for upload in uploads:
            # copy_context: the decode thread logs with this request's id (STYLE.md §5)
            call = functools.partial(contextvars.copy_context().run, self._decode_one, upload)
            jobs.append(loop.run_in_executor(self._executor, call))
        decoded = await asyncio.gather(*jobs)
        timings.decode_s = time.monotonic() - start
        if time.monotonic() >= deadline:
            raise DeadlineExceeded("the request's deadline passed while decoding")
        return list(decoded)

    def _decode_one(self, upload: Upload) -> _Decoded:
        start = time.monotonic()
        audio = decode(upload.data, max_duration_s=self._max_duration_s)
        windows = to_windows(audio.samples, window_samples=self.info.window_samples, hop_samples=self._hop_samples)
        self._metrics.decode_duration.observe(time.monotonic() - start)
        self._metrics.audio_seconds.inc(audio.duration_s)
        return _Decoded(upload.filename, audio, windows)

    async def _infer(
        self,
        decoded: list[_Decoded],
        outputs: tuple[str, ...],
        *,
        deadline: float,
        timings: StageTimings,
        disconnected: asyncio.Future | None,
    ) -> list[dict[str, np.ndarray]]:
        """Run all windows of all files as one ticket; split the rows back per file."""
        waveform = np.concatenate([d.windows.waveform for d in decoded])  # [sum W, S]
        num_samples = np.concatenate([d.windows.num_samples for d in decoded])  # [sum W]
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
        per_file, offset = [], 0
        for d in decoded:
            rows = slice(offset, offset + len(d.windows))
            per_file.append({name: ticket.results[name][rows] for name in outputs})
            offset = rows.stop
        return per_file


def sigmoid(logits: np.ndarray) -> np.ndarray:
    return np.exp(-np.logaddexp(0.0, -logits)).astype(np.float32)  # no overflow for large |logits|


def top_tags(scores: np.ndarray, labels: tuple[Label, ...], *, top_k: int, threshold: float | None) -> list[Tag]:
    """The ``top_k`` best classes of ``scores`` [C], best first, dropping those under ``threshold``."""
    order = np.argsort(-scores, kind="stable")[:top_k]
    return [
        Tag(index=labels[i].index, id=labels[i].id, name=labels[i].display_name, score=round(float(scores[i]), 6))
        for i in order
        if threshold is None or scores[i] >= threshold
    ]


def predict_result(
    decoded: _Decoded,
    logits: np.ndarray,
    labels: tuple[Label, ...],
    *,
    top_k: int,
    threshold: float | None,
    timeline: bool,
) -> PredictResult:
    scores = sigmoid(logits)  # [W, C]
    windows = decoded.windows
    rows = None
    if timeline:
        rows = [
            WindowTags(
                start_s=round(int(start) / SAMPLE_RATE, 4),
                end_s=round(int(start + n) / SAMPLE_RATE, 4),
                tags=top_tags(scores[w], labels, top_k=top_k, threshold=threshold),
            )
            for w, (start, n) in enumerate(zip(windows.starts, windows.num_samples, strict=True))
        ]
    return PredictResult(
        filename=decoded.filename,
        duration_s=round(decoded.audio.duration_s, 4),
        num_windows=len(windows),
        tags=top_tags(scores.max(axis=0), labels, top_k=top_k, threshold=threshold),  # clip = max over windows
        timeline=rows,
    )


def valid_time_patches(num_samples: np.ndarray, time_patches: int) -> np.ndarray:
    """Token rows per window that hold audio, not padding: ceil(frames / 16), at least 1."""
    frames = np.where(
        num_samples >= FRAME_LENGTH_SAMPLES, 1 + (num_samples - FRAME_LENGTH_SAMPLES) // FRAME_SHIFT_SAMPLES, 0
    )
    return np.clip(-(-frames // PATCH_FRAMES), 1, time_patches)


def pool_embedding(
    pooling: Pooling, outputs: dict[str, np.ndarray], num_samples: np.ndarray, info: ModelInfo
) -> np.ndarray:
    """cls: mean of the windows' CLS vectors [D]; mean: mean of all valid tokens [D];
    time: per 160 ms row, tokens averaged over frequency, windows concatenated [T, D]."""
    if pooling == "cls":
        return outputs["embedding"].mean(axis=0)  # [W, D] -> [D]
    tokens = outputs["tokens"]  # [W, N, D], time-major: token 8*t + f
    num_windows, num_tokens, dim = tokens.shape
    if num_tokens != info.time_patches * info.freq_patches:
        raise AssertionError(
            f"model gave {num_tokens} tokens, metadata promises {info.time_patches}x{info.freq_patches}"
        )
    grid = tokens.reshape(num_windows, info.time_patches, info.freq_patches, dim)  # [W, T, F, D]
    valid = valid_time_patches(num_samples, info.time_patches)
    rows = np.concatenate([grid[w, : valid[w]] for w in range(num_windows)])  # [sum T_valid, F, D]
    if pooling == "mean":
        return rows.mean(axis=(0, 1))
    if pooling == "time":
        return rows.mean(axis=1)
    raise ValueError(f"unknown pooling {pooling!r}")


def hop_samples_for(hop_seconds: float | None, window_samples: int) -> int:
    """The window hop in samples; None = no overlap. A hop longer than the window would skip audio."""
    if hop_seconds is None:
        return window_samples
    hop = math.ceil(hop_seconds * SAMPLE_RATE)
    if hop > window_samples:
        window_s = window_samples / SAMPLE_RATE
        raise ValueError(f"EAT_HOP_SECONDS={hop_seconds} exceeds the model's window of {window_s} s")
    return hop
