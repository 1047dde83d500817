"""The service's configuration: ``EAT_*`` environment variables, read once at the edge (house rule 3).

``Settings()`` reads the environment; tests build ``Settings(model_path=..., max_batch=4)`` directly.
Nothing below ``create_app`` reads ``os.environ``. Each field's description gives its unit and the
trade-off; ``docs/serving.md`` lists them all.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from eat.engine import Provider


def _split_csv(value: object) -> object:
    """``"a, b,,c"`` -> ``["a", "b", "c"]``; lists pass through (so tests can give lists)."""
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="EAT_", frozen=True, extra="ignore")

    model_path: Path = Field(Path("models/default/model.onnx"), description="the ONNX file exported by `eat export`")
    provider: Provider = Field(
        "auto",
        description="auto = CUDA when onnxruntime has it, else CPU; cuda = fail at start-up without it; "
        "openvino = the fp32 file in bf16 on the CPU through OpenVINO (the openvino extra), 3-4x onnxruntime's fp32",
    )
    host: str = "0.0.0.0"
    port: int = Field(8000, ge=0, le=65535)
    max_batch: int = Field(32, ge=1, description="most windows per engine call")
    batch_buckets: Annotated[list[int], NoDecode] = Field(
        default_factory=lambda: [1, 2, 4, 8, 16, 32],
        description="batch sizes the engine sees; a batch is zero-padded up to the next bucket",
    )
    max_delay_ms: float = Field(
        5.0, ge=0, description="under load, how long a batch may wait to grow; ~half the fastest engine call"
    )
    queue_size: int = Field(256, ge=1, description="most windows waiting for the engine; beyond it: 429")
    request_timeout_s: float = Field(30.0, gt=0, description="deadline per request, from arrival")
    drain_timeout_s: float = Field(30.0, ge=0, description="on SIGTERM, how long accepted work may finish")
    max_upload_bytes: int = Field(50_000_000, ge=1, description="largest request body")
    max_duration_s: float = Field(600.0, gt=0, description="longest audio per file, checked before decoding")
    hop_seconds: float | None = Field(None, gt=0, description="window hop; None = the model's window (no overlap)")
    intra_op_threads: int = Field(0, ge=0, description="onnxruntime intra-op threads; 0 = its default")
    api_keys: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="accepted Bearer tokens; empty = no authentication"
    )
    cors_origins: Annotated[list[str], NoDecode] = Field(default_factory=list)
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] = "INFO"
    decode_threads: int = Field(2, ge=1, description="threads decoding and resampling uploads")
    max_concurrent_requests: int | None = Field(
        None,
        ge=1,
        description="most /predict + /embed requests in flight, checked before the body is read; beyond it: 429. "
        "None = max(queue_size, 2 * max_batch) (see concurrency_limit)",
    )
    decode_queue_size: int | None = Field(
        None,
        ge=1,
        description="most jobs queued or running in the decode pool; beyond it: 429. None = concurrency_limit",
    )
    max_files: int = Field(16, ge=1, description="most files in one multipart request")
    thresholds: Path | None = Field(
        None, description='sound-event thresholds JSON {"default": 0.5, "classes": {"Siren": 0.3}}; None = 0.5'
    )

    @field_validator("batch_buckets", "api_keys", "cors_origins", mode="before")
    @classmethod
    def _csv(cls, value: object) -> object:
        return _split_csv(value)

    @field_validator("batch_buckets")
    @classmethod
    def _buckets_sorted(cls, value: list[int]) -> list[int]:
        if not value or any(b < 1 for b in value):
            raise ValueError("batch_buckets must be positive integers, e.g. 1,2,4,8,16,32")
        return sorted(set(value))

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper(cls, value: object) -> object:
        return value.upper() if isinstance(value, str) else value

    @model_validator(mode="after")
    def _cross_checks(self) -> Settings:
        if self.max_batch > self.batch_buckets[-1]:
            raise ValueError(
                f"max_batch ({self.max_batch}) exceeds the largest batch bucket ({self.batch_buckets[-1]})"
            )
        if self.queue_size < self.max_batch:
            raise ValueError(f"queue_size ({self.queue_size}) must hold at least max_batch ({self.max_batch})")
        return self

    @property
    def concurrency_limit(self) -> int:
        """Requests admitted at once: ``EAT_MAX_CONCURRENT_REQUESTS``, else ``max(queue_size, 2 * max_batch)``.

        Counting one window per request (a 10 s clip on EAT's 10 s window), admitting at most a queue's
        worth of requests means an admitted request has at most one queue's worth of windows ahead of it,
        so its latency stays within one queue of engine time plus its own batch and decode: half of
        issue 14's goal, the rest left for the CPU that uploads and decodes share with the engine. The
        floor of two batches keeps the engine busy (one batch running, the next one prefetched) when the
        queue is small. Requests with more windows still meet the batcher's own bound (429 queue_full).
        In bench/overload.py runs (official-fixture model, batch 4, queue 8), a limit of queue + one batch
        (12) kept accepted p99 30-45 % over the goal at 4x and 8x; this one (8) cut p50 from ~225 to
        ~150 ms for about a tenth less throughput (docs/serving.md has the figures).
        """
        return self.max_concurrent_requests or max(self.queue_size, 2 * self.max_batch)

    @property
    def decode_pool_size(self) -> int:
        """Jobs the decode pool may hold; by default one per admitted request, so one-file requests
        never meet this bound and it only stops multi-file requests from flooding the pool."""
        return self.decode_queue_size or self.concurrency_limit

    def bucket_for(self, num_windows: int) -> int:
        """Smallest bucket that holds ``num_windows`` (<= max_batch by construction of batches)."""
        return next(b for b in self.batch_buckets if b >= num_windows)
