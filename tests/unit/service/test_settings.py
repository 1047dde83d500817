"""EAT_* settings: parsing from the environment and the cross-field checks."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from service.settings import Settings


def test_defaults_match_the_documented_ones(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("EAT_MODEL_PATH", "EAT_MAX_BATCH", "EAT_BATCH_BUCKETS", "EAT_PORT", "EAT_API_KEYS"):
        monkeypatch.delenv(name, raising=False)
    s = Settings()
    assert s.model_path == Path("models/default/model.onnx")
    assert (s.host, s.port, s.provider) == ("0.0.0.0", 8000, "auto")
    assert (s.max_batch, s.batch_buckets, s.max_delay_ms, s.queue_size) == (32, [1, 2, 4, 8, 16, 32], 5.0, 256)
    assert (s.request_timeout_s, s.drain_timeout_s, s.max_upload_bytes, s.max_duration_s) == (30, 30, 50_000_000, 600)
    assert s.hop_seconds is None and s.intra_op_threads == 0 and s.api_keys == [] and s.log_level == "INFO"


def test_environment_is_read_with_the_eat_prefix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EAT_MODEL_PATH", "/models/x.onnx")
    monkeypatch.setenv("EAT_BATCH_BUCKETS", "8, 1,4")
    monkeypatch.setenv("EAT_MAX_BATCH", "8")
    monkeypatch.setenv("EAT_API_KEYS", "alpha, beta")
    monkeypatch.setenv("EAT_CORS_ORIGINS", "https://a.example,https://b.example")
    monkeypatch.setenv("EAT_PROVIDER", "cpu")
    monkeypatch.setenv("EAT_HOP_SECONDS", "5")
    monkeypatch.setenv("EAT_LOG_LEVEL", "debug")
    s = Settings()
    assert s.model_path == Path("/models/x.onnx") and s.provider == "cpu" and s.hop_seconds == 5.0
    assert s.batch_buckets == [1, 4, 8] and s.max_batch == 8
    assert s.api_keys == ["alpha", "beta"] and s.cors_origins == ["https://a.example", "https://b.example"]
    assert s.log_level == "DEBUG"
    assert [s.bucket_for(n) for n in (1, 2, 4, 5, 8)] == [1, 4, 4, 8, 8]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"max_batch": 64}, "exceeds the largest batch bucket"),
        ({"max_batch": 8, "queue_size": 4}, "must hold at least max_batch"),
        ({"batch_buckets": "0,2"}, "positive integers"),
        ({"provider": "tpu"}, "provider"),
        ({"max_delay_ms": -1}, "max_delay_ms"),
        ({"port": 70_000}, "port"),
    ],
)
def test_bad_settings_fail_at_construction(overrides: dict, message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        Settings(**overrides)


def test_concurrency_limit_defaults_to_the_queue_or_two_batches(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("EAT_MAX_CONCURRENT_REQUESTS", "EAT_DECODE_QUEUE_SIZE", "EAT_QUEUE_SIZE", "EAT_MAX_BATCH"):
        monkeypatch.delenv(name, raising=False)
    s = Settings()
    assert (s.max_concurrent_requests, s.concurrency_limit, s.decode_pool_size) == (None, 256, 256)
    assert Settings(queue_size=12, max_batch=4, batch_buckets=[1, 2, 4]).concurrency_limit == 12
    small = Settings(queue_size=6, max_batch=4, batch_buckets=[1, 2, 4])
    assert small.concurrency_limit == 8 and small.decode_pool_size == 8  # two batches: one runs, one waits
    monkeypatch.setenv("EAT_MAX_CONCURRENT_REQUESTS", "5")
    monkeypatch.setenv("EAT_DECODE_QUEUE_SIZE", "3")
    assert (Settings().concurrency_limit, Settings().decode_pool_size) == (5, 3)
    with pytest.raises(ValidationError):
        Settings(max_concurrent_requests=0)
