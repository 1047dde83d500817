"""The service's error types and their one mapping to HTTP (STYLE.md §3, house rule 9).

Every error a request can meet is a ``ServiceError`` subclass that carries its HTTP status, a stable
``error_type`` for clients and, where the error is a refusal, the ``reason`` label under which
``eat_rejections_total`` counts it. The app has a single exception handler that reads these fields, so
no route picks a status code by itself.

Status choices: bad input is 4xx (400/413/415/422); only a failing engine is 5xx. Overload is 429 with
``Retry-After``, whichever bound refused the request (requests in flight, the decode pool, the batcher's
queue); the reason label says which. A request whose deadline passes, or that arrives while the server
drains, is 503: the input was fine and a retry elsewhere or later should succeed. We chose 503 over 504
for the deadline because 504 says an *upstream* server failed to answer a gateway, and load balancers
treat it so; here the service itself ran out of its own time budget, which is what 503 means.
"""

from __future__ import annotations


class ServiceError(Exception):
    """Base class: ``status`` and ``error_type`` go to the client, ``reason`` to the rejection counter."""

    status: int = 500
    error_type: str = "internal"
    reason: str | None = None  # label of eat_rejections_total, None = not a counted rejection

    def __init__(self, message: str, *, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after_s = retry_after_s


class BadRequest(ServiceError):
    """A malformed request (missing file field, bad query value) that is not about the audio itself."""

    status = 400
    error_type = "bad_request"


class InvalidParameter(ServiceError):
    """A parameter whose range depends on the model (a hop longer than its window, a foreign model name)."""

    status = 422
    error_type = "bad_request"


class ModelNotFound(ServiceError):
    """A standard API (V2, OpenAI-style) named a model this server does not serve."""

    status = 404
    error_type = "model_not_found"


class InvalidAudio(ServiceError):
    """The bytes are not audio we can decode, or the decoded audio is unusable (empty, NaN, too short)."""

    status = 422
    error_type = "invalid_audio"
    reason = "invalid_audio"


class UnsupportedMediaType(ServiceError):
    status = 415
    error_type = "unsupported_media_type"
    reason = "unsupported_media_type"


class PayloadTooLarge(ServiceError):
    status = 413
    error_type = "payload_too_large"
    reason = "payload_too_large"


class AudioTooLong(ServiceError):
    """Longer than ``EAT_MAX_DURATION_S``; detected from the header or while decoding, never after."""

    status = 413
    error_type = "too_long"
    reason = "too_long"


class NotAcceptable(ServiceError):
    status = 406
    error_type = "not_acceptable"


class Unauthorized(ServiceError):
    status = 401
    error_type = "unauthorized"
    reason = "unauthorized"


class NoClassifier(ServiceError):
    """``/predict`` on an encoder-only model: the request is valid, this model cannot answer it."""

    status = 422
    error_type = "no_classifier"
    reason = "no_classifier"


class Overloaded(ServiceError):
    """The batcher's queue cannot take all windows of the request; nothing of it was queued."""

    status = 429
    error_type = "overloaded"
    reason = "queue_full"


class ConcurrencyLimit(Overloaded):
    """``EAT_MAX_CONCURRENT_REQUESTS`` work requests are already in flight; refused before the body is read."""

    reason = "concurrency_limit"


class DecodeQueueFull(Overloaded):
    """The decode pool's bounded queue (``EAT_DECODE_QUEUE_SIZE`` jobs) is full; the job was not queued."""

    reason = "decode_queue_full"


class DeadlineExceeded(ServiceError):
    """``EAT_REQUEST_TIMEOUT_S`` passed, counted from the request's arrival; its work is dropped."""

    status = 503
    error_type = "deadline_exceeded"
    reason = "deadline"


class Cancelled(ServiceError):
    """The client went away; nobody reads the answer, but the rejection is still counted."""

    status = 499
    error_type = "cancelled"
    reason = "cancelled"


class Draining(ServiceError):
    status = 503
    error_type = "draining"
    reason = "draining"


class EngineError(ServiceError):
    """onnxruntime failed on a batch (or the engine thread died): the only 5xx the service returns."""

    status = 500
    error_type = "engine_error"
