"""The batcher: shared batches, bucket padding, bounded admission, deadlines, failures, drain."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest
from svc_helpers import GatedEngine

from service.batcher import Batcher, Ticket
from service.errors import AudioTooLong, DeadlineExceeded, Draining, EngineError, Overloaded
from service.metrics import Metrics


def make_batcher(engine: GatedEngine, **overrides: object) -> Batcher:
    options: dict = {"max_batch": 4, "batch_buckets": [1, 2, 4], "max_delay_s": 0.005, "queue_size": 16}
    options.update(overrides)
    return Batcher(engine, metrics=Metrics(), **options)


def windows(engine: GatedEngine, count: int, value: float) -> tuple[np.ndarray, np.ndarray]:
    """``count`` windows filled with ``value`` (non-zero, so the engine can tell real rows from padding)."""
    size = engine.info.window_samples
    return np.full((count, size), value, np.float32), np.full(count, size, np.int64)


def submit(batcher: Batcher, engine: GatedEngine, count: int, value: float, timeout_s: float = 30) -> Ticket:
    waveform, num_samples = windows(engine, count, value)
    return batcher.submit(waveform, num_samples, outputs=("embedding",), deadline=time.monotonic() + timeout_s)


async def wait_until(condition, timeout_s: float = 10.0) -> None:
    end = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < end, "condition not reached"
        await asyncio.sleep(0.005)


def test_results_go_back_to_their_own_requests(gated_engine: GatedEngine) -> None:
    async def main() -> None:
        batcher = make_batcher(gated_engine)
        batcher.start()
        gated_engine.gate.clear()
        tickets = [submit(batcher, gated_engine, count, value) for count, value in [(1, 0.1), (3, 0.2), (2, 0.3)]]
        await wait_until(gated_engine.entered.is_set)
        gated_engine.gate.set()
        await asyncio.gather(*(t.future for t in tickets))
        batcher.stop(timeout_s=5)
        for ticket in tickets:
            expected = gated_engine.inner.run(ticket.waveform, ticket.num_samples, ("embedding",))["embedding"]
            np.testing.assert_allclose(ticket.results["embedding"], expected, rtol=1e-5, atol=1e-5)

    asyncio.run(main())


def test_batches_grow_under_load_and_pad_to_buckets(gated_engine: GatedEngine) -> None:
    async def main() -> None:
        batcher = make_batcher(gated_engine)
        batcher.start()
        gated_engine.gate.clear()
        first = submit(batcher, gated_engine, 1, 0.5)  # taken at once by the idle engine, held at the gate
        await wait_until(gated_engine.entered.is_set)
        rest = [submit(batcher, gated_engine, 1, 0.5) for _ in range(7)]
        gated_engine.gate.set()
        await asyncio.gather(first.future, *(t.future for t in rest))
        batcher.stop(timeout_s=5)

    asyncio.run(main())
    real_rows = [real for _, real, _ in gated_engine.calls]
    assert real_rows[0] == 1 and sum(real_rows) == 8
    assert max(real_rows) > 1  # later windows shared engine calls
    assert all(real <= 4 for real in real_rows)  # never more than max_batch
    assert all(rows in (1, 2, 4) and rows >= real for rows, real, _ in gated_engine.calls)  # padded to a bucket


def test_cpu_batches_are_cut_to_a_full_bucket_not_padded(gated_engine: GatedEngine) -> None:
    async def main() -> None:
        batcher = make_batcher(gated_engine, pad_to_bucket=False)
        batcher.start()
        gated_engine.gate.clear()
        first = submit(batcher, gated_engine, 1, 0.5)
        await wait_until(gated_engine.entered.is_set)
        rest = [submit(batcher, gated_engine, 1, 0.5) for _ in range(7)]
        gated_engine.gate.set()
        await asyncio.gather(first.future, *(t.future for t in rest))
        batcher.stop(timeout_s=5)

    asyncio.run(main())
    assert sum(real for _, real, _ in gated_engine.calls) == 8
    assert all(rows == real and rows in (1, 2, 4) for rows, real, _ in gated_engine.calls)  # no padding rows


def test_idle_engine_does_not_wait_for_max_delay(gated_engine: GatedEngine) -> None:
    async def main() -> None:
        batcher = make_batcher(gated_engine, max_delay_s=60.0)
        batcher.start()
        ticket = submit(batcher, gated_engine, 1, 0.5)
        await asyncio.wait_for(ticket.future, timeout=10)  # far less than max_delay
        batcher.stop(timeout_s=5)

    asyncio.run(main())


def test_full_queue_refuses_the_whole_request_at_once(gated_engine: GatedEngine) -> None:
    async def main() -> None:
        batcher = make_batcher(gated_engine, queue_size=6)
        batcher.start()
        gated_engine.gate.clear()
        running = submit(batcher, gated_engine, 1, 0.5)
        await wait_until(gated_engine.entered.is_set)
        prefetched = submit(batcher, gated_engine, 4, 0.5)  # a full batch, parked in the prefetch slot
        await wait_until(lambda: batcher.depth == 0)
        queued = submit(batcher, gated_engine, 5, 0.5)  # the collector holds these: the slot is taken
        with pytest.raises(Overloaded) as info:
            submit(batcher, gated_engine, 2, 0.5)  # 5 + 2 > 6: none of the two is queued
        assert info.value.retry_after_s is not None and info.value.retry_after_s >= 1
        assert batcher.depth == 5
        fits = submit(batcher, gated_engine, 1, 0.5)
        with pytest.raises(AudioTooLong):
            submit(batcher, gated_engine, 7, 0.5)  # could never fit
        gated_engine.gate.set()
        await asyncio.gather(running.future, prefetched.future, queued.future, fits.future)
        batcher.stop(timeout_s=5)

    asyncio.run(main())
    assert sum(real for _, real, _ in gated_engine.calls) == 11


def test_expired_and_abandoned_requests_never_reach_the_engine(gated_engine: GatedEngine) -> None:
    async def main() -> None:
        batcher = make_batcher(gated_engine)
        batcher.start()
        gated_engine.gate.clear()
        running = submit(batcher, gated_engine, 1, 0.1)
        await wait_until(gated_engine.entered.is_set)
        expiring = submit(batcher, gated_engine, 2, 0.7, timeout_s=0.05)
        abandoned = submit(batcher, gated_engine, 2, 0.9)
        batcher.abandon(abandoned, DeadlineExceeded("gave up"))
        await asyncio.sleep(0.1)  # let the first deadline pass while the engine is held
        gated_engine.gate.set()
        await running.future
        with pytest.raises(DeadlineExceeded):
            await expiring.future
        with pytest.raises(DeadlineExceeded):
            await abandoned.future
        batcher.stop(timeout_s=5)

    asyncio.run(main())
    seen = np.concatenate(gated_engine.seen_waveforms)
    assert not np.isclose(seen, 0.7).any() and not np.isclose(seen, 0.9).any()


def test_engine_failure_fails_that_batch_only(gated_engine: GatedEngine) -> None:
    async def main() -> None:
        batcher = make_batcher(gated_engine)
        batcher.start()
        gated_engine.fail_next = True
        with pytest.raises(EngineError, match="simulated"):
            await submit(batcher, gated_engine, 2, 0.5).future
        await submit(batcher, gated_engine, 2, 0.5).future  # the engine keeps serving
        assert batcher.healthy
        batcher.stop(timeout_s=5)

    asyncio.run(main())


def test_dead_engine_thread_fails_every_waiting_request(gated_engine: GatedEngine) -> None:
    async def main() -> None:
        batcher = make_batcher(gated_engine)
        batcher.start()
        gated_engine.gate.clear()
        running = submit(batcher, gated_engine, 1, 0.5)
        await wait_until(gated_engine.entered.is_set)
        waiting = submit(batcher, gated_engine, 3, 0.5)

        def explode(*args: object) -> None:
            raise SystemError("scatter bug")

        batcher._scatter = explode  # type: ignore[method-assign]  # a bug outside Engine.run
        gated_engine.gate.set()
        for ticket in (running, waiting):
            with pytest.raises(EngineError):
                await asyncio.wait_for(ticket.future, timeout=10)
        assert not batcher.healthy
        with pytest.raises(EngineError):
            submit(batcher, gated_engine, 1, 0.5)
        batcher.stop(timeout_s=5)

    asyncio.run(main())


def test_stop_drains_accepted_work_then_refuses(gated_engine: GatedEngine) -> None:
    async def main() -> None:
        gated_engine.delay_s = 0.02
        batcher = make_batcher(gated_engine)
        batcher.start()
        tickets = [submit(batcher, gated_engine, 3, 0.5) for _ in range(4)]
        await asyncio.to_thread(batcher.stop, timeout_s=10)
        await asyncio.gather(*(t.future for t in tickets))  # all accepted windows were processed
        with pytest.raises(Draining):
            submit(batcher, gated_engine, 1, 0.5)

    asyncio.run(main())
    assert sum(real for _, real, _ in gated_engine.calls) == 12


def test_only_requested_outputs_are_fetched(gated_engine: GatedEngine) -> None:
    async def main() -> None:
        batcher = make_batcher(gated_engine)
        batcher.start()
        waveform, num_samples = windows(gated_engine, 1, 0.5)
        ticket = batcher.submit(waveform, num_samples, outputs=("logits",), deadline=time.monotonic() + 30)
        await ticket.future
        batcher.stop(timeout_s=5)
        assert set(ticket.results) == {"logits"}

    asyncio.run(main())
    assert gated_engine.calls[0][2] == ("logits",)
