"""The bounded decode pool: refuses at once when full, frees a slot on every way a job can end."""

from __future__ import annotations

import threading

import pytest

from service.decode_pool import BoundedPool
from service.errors import DecodeQueueFull
from service.metrics import Metrics


def test_full_pool_refuses_at_once_and_frees_slots() -> None:
    metrics = Metrics()
    pool = BoundedPool(num_threads=1, max_jobs=2, metrics=metrics)
    release = threading.Event()
    started = threading.Event()
    try:

        def held() -> str:
            started.set()
            assert release.wait(10)
            return "done"

        running = pool.submit(held)
        assert started.wait(10)
        queued = pool.submit(lambda: "queued ran")
        assert pool.held == 2 and metrics.decode_pending._value.get() == 2
        with pytest.raises(DecodeQueueFull) as refused:
            pool.submit(lambda: "never")
        assert refused.value.status == 429 and refused.value.reason == "decode_queue_full"
        assert refused.value.retry_after_s is not None
        assert queued.cancel()  # a job that has not started can be dropped: its slot is free at once
        assert pool.held == 1
        release.set()
        assert running.result(10) == "done"
    finally:
        release.set()
        pool.shutdown(wait=True)  # the workers exit after their done-callbacks ran
    assert pool.held == 0 and metrics.decode_pending._value.get() == 0


def test_finished_failed_and_refused_jobs_give_their_slots_back() -> None:
    pool = BoundedPool(num_threads=2, max_jobs=2, metrics=Metrics())
    ok, failing = pool.submit(lambda: 7), pool.submit(lambda: 1 / 0)
    assert ok.result(10) == 7
    with pytest.raises(ZeroDivisionError):
        failing.result(10)
    pool.shutdown(wait=True)
    assert pool.held == 0
    with pytest.raises(RuntimeError):  # after shutdown the error goes up, and no slot leaks
        pool.submit(lambda: None)
    assert pool.held == 0


def test_pool_needs_room_for_one_job() -> None:
    with pytest.raises(ValueError):
        BoundedPool(num_threads=1, max_jobs=0, metrics=Metrics())
