"""Prometheus collectors, one registry per app (so tests can build many apps), buckets in one place.

The names are fixed by BRIEF.md: the Grafana dashboards and alerts in ``deploy/`` query exactly these.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

# Every *_duration/_wait histogram shares one bucket rule (seconds), from a fast CPU call to a timeout.
DURATION_BUCKETS_S: tuple[float, ...] = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
)
# Windows per engine call: powers of two match the default batch buckets.
BATCH_SIZE_BUCKETS: tuple[float, ...] = (1, 2, 4, 8, 16, 32, 64, 128)

REJECTION_REASONS: tuple[str, ...] = (
    "queue_full",
    "concurrency_limit",
    "decode_queue_full",
    "deadline",
    "cancelled",
    "payload_too_large",
    "too_long",
    "invalid_audio",
    "unsupported_media_type",
    "unauthorized",
    "draining",
    "no_classifier",
)


class Metrics:
    """All collectors of one service instance, registered in its own ``CollectorRegistry``."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "eat_requests_total", "HTTP requests by endpoint and status code", ["endpoint", "status"], registry=r
        )
        self.request_duration = Histogram(
            "eat_request_duration_seconds",
            "Time from request start to response start",
            ["endpoint"],
            buckets=DURATION_BUCKETS_S,
            registry=r,
        )
        self.queue_wait = Histogram(
            "eat_queue_wait_seconds",
            "Time a window waits in the batcher queue before its engine call",
            buckets=DURATION_BUCKETS_S,
            registry=r,
        )
        self.decode_duration = Histogram(
            "eat_decode_duration_seconds",
            "Decode + resample + windowing time per file",
            buckets=DURATION_BUCKETS_S,
            registry=r,
        )
        self.inference_duration = Histogram(
            "eat_inference_duration_seconds",
            "Duration of one engine call (one padded batch)",
            buckets=DURATION_BUCKETS_S,
            registry=r,
        )
        self.batch_size = Histogram(
            "eat_batch_size", "Real (unpadded) windows per engine call", buckets=BATCH_SIZE_BUCKETS, registry=r
        )
        self.queue_depth = Gauge("eat_queue_depth", "Windows waiting for the engine", registry=r)
        self.inflight = Gauge("eat_inflight_requests", "HTTP requests being handled", registry=r)
        self.admitted = Gauge(
            "eat_admitted_requests", "Work requests (/predict, /embed) holding an admission slot", registry=r
        )
        self.decode_pending = Gauge(
            "eat_decode_pending",
            "Jobs (a multipart parse or one file's decode) queued or running in the decode pool",
            registry=r,
        )
        self.audio_seconds = Counter("eat_audio_seconds_total", "Seconds of audio decoded", registry=r)
        self.rejections = Counter(
            "eat_rejections_total", "Requests refused or dropped, by reason", ["reason"], registry=r
        )
        for reason in REJECTION_REASONS:  # export zeros so rate() works from the first scrape
            self.rejections.labels(reason=reason)
        self.model_info = Gauge(
            "eat_model_info",
            "The served model (value is always 1)",
            ["model_name", "provider", "precision", "window_samples", "max_batch"],
            registry=r,
        )

    def reject(self, reason: str) -> None:
        if reason not in REJECTION_REASONS:
            raise ValueError(f"unknown rejection reason {reason!r}")  # a bug: reasons are a fixed set
        self.rejections.labels(reason=reason).inc()

    def exposition(self) -> bytes:
        """The text exposition format for ``GET /metrics``."""
        return generate_latest(self.registry)
