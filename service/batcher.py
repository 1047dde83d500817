"""Dynamic batching: windows from all requests share engine calls (STYLE.md §3, §5).

Two threads own the work. The *collector* forms batches: it closes one at once when the engine is
idle (no waiting), and while the engine is busy it lets the next batch grow for up to ``max_delay``
(or until ``max_batch`` windows), then pads it to a bucket size and parks it in a one-batch slot: the
prefetch. With ``pad_to_bucket=False`` (the CPU choice: there a padded row costs as much as a real one)
a batch is cut down to the largest bucket it fills instead, so shapes stay in the bucket set with no
wasted rows. The *engine thread* takes the parked batch, runs it and scatters the rows back to their
requests. So at most one batch waits ready while another runs; under sustained load each batch holds
what arrived during the previous engine call.

A request enters as one ``Ticket``; admission is all-or-nothing for its windows, and refused at once
(429) when the bounded queue cannot take them. Tickets whose deadline passed or whose client left are
removed before their windows reach the engine, and counted by reason. A failing ``Engine.run`` fails
exactly the tickets of that batch with ``EngineError``; if the engine thread itself dies, every
waiting ticket fails and the batcher refuses new work.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import math
import threading
import time
from dataclasses import dataclass, field

import numpy as np

from eat.contract import OUTPUT_NAMES
from eat.engine import Engine
from service.errors import AudioTooLong, DeadlineExceeded, Draining, EngineError, Overloaded, ServiceError
from service.metrics import Metrics

logger = logging.getLogger(__name__)


@dataclass(eq=False)
class Ticket:
    """One request's windows in flight. Results are filled by the engine thread, row by row."""

    waveform: np.ndarray  # [W, S] float32
    num_samples: np.ndarray  # [W] int64
    outputs: tuple[str, ...]
    deadline: float  # time.monotonic() seconds
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop
    results: dict[str, np.ndarray] = field(default_factory=dict)  # name -> [W, ...]
    num_done: int = 0
    finished: bool = False  # resolved or failed; guarded by the batcher's lock
    queue_wait_s: float = 0.0  # longest wait of any of its windows
    inference_s: float = 0.0  # summed duration of the engine calls it took part in

    @property
    def num_windows(self) -> int:
        return len(self.num_samples)


@dataclass
class _Item:
    ticket: Ticket
    row: int
    enqueued_at: float


@dataclass
class _Batch:
    items: list[_Item]
    waveform: np.ndarray  # [bucket, S]
    num_samples: np.ndarray  # [bucket]
    outputs: tuple[str, ...]


class Batcher:
    """Bounded window queue + collector thread + engine thread. Start/stop only from the app's lifespan."""

    def __init__(
        self,
        engine: Engine,
        *,
        metrics: Metrics,
        max_batch: int,
        batch_buckets: list[int],
        max_delay_s: float,
        queue_size: int,
        pad_to_bucket: bool = True,
    ) -> None:
        if max_batch > max(batch_buckets):
            raise ValueError("max_batch exceeds the largest batch bucket")
        self._engine = engine
        self._metrics = metrics
        self._window_samples = engine.info.window_samples
        self.max_batch = max_batch
        self._buckets = sorted(batch_buckets)
        self._pad_to_bucket = pad_to_bucket
        self._max_delay_s = max_delay_s
        self.queue_size = queue_size
        self._cond = threading.Condition()
        self._queue: collections.deque[_Item] = collections.deque()
        self._slot: _Batch | None = None  # the one prefetched batch
        self._running: _Batch | None = None  # the batch in the engine now
        self._engine_idle = True
        self._accepting = False
        self._stopping = False
        self._collector_done = False
        self._failed: BaseException | None = None
        self._batch_s_ema = 0.05  # running engine-call time, for Retry-After
        self._threads: list[threading.Thread] = []

    # ---- lifecycle (lifespan only) -------------------------------------------------------------------
    def start(self) -> None:
        self._accepting = True
        self._threads = [
            threading.Thread(target=self._guard, args=(self._collect_loop,), name="eat-collector", daemon=True),
            threading.Thread(target=self._guard, args=(self._engine_loop,), name="eat-engine", daemon=True),
        ]
        for thread in self._threads:
            thread.start()

    def stop(self, *, timeout_s: float) -> None:
        """Refuse new work, let accepted windows finish (up to ``timeout_s``), then stop the threads."""
        with self._cond:
            self._accepting = False
            self._stopping = True
            self._cond.notify_all()
        end = time.monotonic() + timeout_s
        for thread in self._threads:
            thread.join(max(0.0, end - time.monotonic()))
        if any(thread.is_alive() for thread in self._threads):
            logger.error("batcher did not drain within %.1f s; failing what is left", timeout_s)
            self._fail_all(Draining("the server stopped before this request was processed"))

    @property
    def healthy(self) -> bool:
        return self._failed is None

    @property
    def depth(self) -> int:
        return len(self._queue)

    # ---- admission (event-loop thread) ---------------------------------------------------------------
    def submit(
        self, waveform: np.ndarray, num_samples: np.ndarray, *, outputs: tuple[str, ...], deadline: float
    ) -> Ticket:
        """Queue all windows of one request, or none: raises Overloaded / Draining / EngineError."""
        loop = asyncio.get_running_loop()
        ticket = Ticket(waveform, num_samples, outputs, deadline, loop.create_future(), loop)
        with self._cond:
            if self._failed is not None:
                raise EngineError("the inference engine has failed; the server must be restarted")
            if not self._accepting:
                raise Draining("the server is shutting down")
            if ticket.num_windows > self.queue_size:
                raise AudioTooLong(
                    f"the request needs {ticket.num_windows} windows; at most {self.queue_size} fit the queue"
                )
            if len(self._queue) + ticket.num_windows > self.queue_size:
                batches_ahead = math.ceil(len(self._queue) / self.max_batch) + 1
                raise Overloaded(
                    f"queue full ({len(self._queue)} of {self.queue_size} windows waiting)",
                    retry_after_s=max(1.0, batches_ahead * self._batch_s_ema),
                )
            now = time.monotonic()
            self._queue.extend(_Item(ticket, row, now) for row in range(ticket.num_windows))
            self._metrics.queue_depth.set(len(self._queue))
            self._cond.notify_all()
        return ticket

    def abandon(self, ticket: Ticket, error: ServiceError) -> None:
        """The request gave up (deadline, disconnect): drop its queued windows and count it once."""
        with self._cond:
            if ticket.finished:
                return
            self._finish_locked(ticket, error)
            self._queue = collections.deque(item for item in self._queue if item.ticket is not ticket)
            self._metrics.queue_depth.set(len(self._queue))

    # ---- the two threads -----------------------------------------------------------------------------
    def _guard(self, loop_fn) -> None:
        try:
            loop_fn()
        except BaseException as err:  # a bug or a dead engine: fail loudly, never hang the requests
            logger.exception("batcher thread %s died", threading.current_thread().name)
            with self._cond:
                self._failed = err
                self._collector_done = True
                self._cond.notify_all()
            self._fail_all(EngineError(f"the inference engine failed: {err!r}"))

    def _collect_loop(self) -> None:
        while True:
            with self._cond:
                items = self._wait_for_batch_locked()
                if items is None:
                    self._collector_done = True
                    self._cond.notify_all()
                    return
            batch = self._assemble(items)  # pad outside the lock: this is the prefetch work
            with self._cond:
                self._slot = batch
                self._cond.notify_all()

    def _wait_for_batch_locked(self) -> list[_Item] | None:
        """Block until a batch should close; pop its live items. None = stopped and drained."""
        while True:
            self._drop_dead_locked()
            if not self._queue:
                if self._stopping or self._failed is not None:
                    return None
                self._cond.wait()
                continue
            if self._slot is not None:  # one batch already prefetched: wait for the engine to take it
                self._cond.wait()
                continue
            wait_s = self._queue[0].enqueued_at + self._max_delay_s - time.monotonic()
            if len(self._queue) >= self.max_batch or self._engine_idle or self._stopping or wait_s <= 0:
                break
            self._cond.wait(timeout=wait_s)
        now = time.monotonic()
        size = min(self.max_batch, len(self._queue))
        if not self._pad_to_bucket:  # take the largest bucket that is full; the rest waits for the next call
            size = max(b for b in self._buckets if b <= size) if size >= self._buckets[0] else size
        items = [self._queue.popleft() for _ in range(size)]
        self._metrics.queue_depth.set(len(self._queue))
        for item in items:
            wait_s = now - item.enqueued_at
            self._metrics.queue_wait.observe(wait_s)
            item.ticket.queue_wait_s = max(item.ticket.queue_wait_s, wait_s)
        return items

    def _drop_dead_locked(self) -> None:
        now = time.monotonic()
        while self._queue and (self._queue[0].ticket.finished or self._queue[0].ticket.deadline <= now):
            ticket = self._queue.popleft().ticket
            if not ticket.finished:
                self._finish_locked(ticket, DeadlineExceeded("the request's deadline passed while queued"))
        self._metrics.queue_depth.set(len(self._queue))

    def _assemble(self, items: list[_Item]) -> _Batch:
        bucket = next(b for b in self._buckets if b >= len(items))
        waveform = np.zeros((bucket, self._window_samples), dtype=np.float32)  # [bucket, S]
        # Padding rows are full-length silence: a zero-length row would give the front end no frame.
        num_samples = np.full(bucket, self._window_samples, dtype=np.int64)  # [bucket]
        wanted: set[str] = set()
        for i, item in enumerate(items):
            waveform[i] = item.ticket.waveform[item.row]
            num_samples[i] = item.ticket.num_samples[item.row]
            wanted.update(item.ticket.outputs)
        outputs = tuple(name for name in OUTPUT_NAMES if name in wanted)
        return _Batch(items, waveform, num_samples, outputs)

    def _engine_loop(self) -> None:
        while True:
            with self._cond:
                self._running = None
                self._engine_idle = True
                self._cond.notify_all()
                while self._slot is None and not self._collector_done:
                    self._cond.wait()
                if self._slot is None:
                    return
                batch, self._slot = self._slot, None
                self._running = batch
                self._engine_idle = False
                self._cond.notify_all()
                # Requests that expired or gave up while their batch was parked never reach the engine.
                now = time.monotonic()
                for item in batch.items:
                    if not item.ticket.finished and item.ticket.deadline <= now:
                        self._finish_locked(item.ticket, DeadlineExceeded("the request's deadline passed"))
                live = [item for item in batch.items if not item.ticket.finished]
            if not live:
                continue
            if len(live) < len(batch.items):
                batch = self._assemble(live)
            start = time.monotonic()
            try:
                out = self._engine.run(batch.waveform, batch.num_samples, batch.outputs)
            except Exception as err:  # onnxruntime raises untyped errors; they fail this batch only
                logger.exception("engine call failed on a batch of %d windows", len(batch.items))
                with self._cond:
                    for item in batch.items:
                        self._finish_locked(item.ticket, EngineError(f"inference failed: {err}"))
                continue
            elapsed_s = time.monotonic() - start
            self._batch_s_ema = 0.8 * self._batch_s_ema + 0.2 * elapsed_s
            self._metrics.inference_duration.observe(elapsed_s)
            self._metrics.batch_size.observe(len(batch.items))
            self._scatter(batch, out, elapsed_s)

    def _scatter(self, batch: _Batch, out: dict[str, np.ndarray], elapsed_s: float) -> None:
        with self._cond:
            seen: set[int] = set()
            for i, item in enumerate(batch.items):
                ticket = item.ticket
                if ticket.finished:
                    continue
                for name in ticket.outputs:
                    if name not in ticket.results:
                        ticket.results[name] = np.empty((ticket.num_windows, *out[name].shape[1:]), np.float32)
                    ticket.results[name][item.row] = out[name][i]
                if id(ticket) not in seen:
                    seen.add(id(ticket))
                    ticket.inference_s += elapsed_s
                ticket.num_done += 1
                if ticket.num_done == ticket.num_windows:
                    self._finish_locked(ticket, None)

    # ---- completion ----------------------------------------------------------------------------------
    def _finish_locked(self, ticket: Ticket, error: ServiceError | None) -> None:
        """Resolve a ticket exactly once. Rejections are counted by the app's error handler, once."""
        if ticket.finished:
            return
        ticket.finished = True
        with contextlib.suppress(RuntimeError):  # a closed event loop: nobody is waiting any more
            ticket.loop.call_soon_threadsafe(_resolve, ticket.future, error)

    def _fail_all(self, error: ServiceError) -> None:
        with self._cond:
            pending = [item.ticket for item in self._queue]
            for batch in (self._slot, self._running):
                if batch is not None:
                    pending += [item.ticket for item in batch.items]
            self._slot = None
            self._queue.clear()
            self._metrics.queue_depth.set(0)
            for ticket in pending:
                self._finish_locked(ticket, error)


def _resolve(future: asyncio.Future, error: ServiceError | None) -> None:
    if future.done():  # the awaiting coroutine was cancelled
        return
    if error is None:
        future.set_result(None)
    else:
        future.set_exception(error)
