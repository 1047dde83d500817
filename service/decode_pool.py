"""The decode pool: worker threads behind a bounded queue that refuses at once when full (issue 14).

``ThreadPoolExecutor`` queues without limit, so under overload decode jobs pile up and each waits longer
than the last. ``BoundedPool`` counts the jobs it holds (queued or running) and raises
``DecodeQueueFull`` (429) from ``submit`` when it holds ``max_jobs``; nothing of the refused job is
queued. ``loop.run_in_executor`` calls ``submit`` directly, so the refusal reaches the request at once.

A job whose awaiting request gave up (deadline, disconnect) is cancelled by asyncio; a cancelled job
that has not started never runs, and its slot is freed at once.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from typing import Any, TypeVar

from service.errors import DecodeQueueFull
from service.metrics import Metrics

T = TypeVar("T")


class BoundedPool(Executor):
    def __init__(self, *, num_threads: int, max_jobs: int, metrics: Metrics) -> None:
        if max_jobs < 1:
            raise ValueError("max_jobs must be at least 1")
        self.max_jobs = max_jobs
        self._pool = ThreadPoolExecutor(num_threads, thread_name_prefix="eat-decode")
        self._metrics = metrics
        self._lock = threading.Lock()
        self._held = 0  # jobs queued or running; changed under the lock from the loop and the workers

    @property
    def held(self) -> int:
        return self._held

    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> Future[T]:
        with self._lock:
            if self._held >= self.max_jobs:
                raise DecodeQueueFull(
                    f"decode pool full ({self._held} of {self.max_jobs} jobs)", retry_after_s=1.0
                )
            self._held += 1
            self._metrics.decode_pending.set(self._held)
        try:
            future = self._pool.submit(fn, *args, **kwargs)
        except BaseException:  # shut down: give the slot back before the error goes up
            self._release(None)
            raise
        future.add_done_callback(self._release)  # runs on completion, failure and cancellation alike
        return future

    def _release(self, _future: Future | None) -> None:
        with self._lock:
            self._held -= 1
            self._metrics.decode_pending.set(self._held)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        self._pool.shutdown(wait=wait, cancel_futures=cancel_futures)
