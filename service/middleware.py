"""Per-request bookkeeping as a plain ASGI middleware: id, timing headers, metrics, one log line.

Plain ASGI rather than Starlette's BaseHTTPMiddleware, which runs the route in another task and so
breaks cancellation on disconnect. The route fills ``scope["state"]["timings"]``; this layer turns it
into ``x-*-time`` headers (milliseconds) and the request's log line.
"""

from __future__ import annotations

import logging
import re
import time
import uuid

from starlette.datastructures import MutableHeaders
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.inference import StageTimings
from service.log import REQUEST_ID
from service.metrics import Metrics

logger = logging.getLogger("service.access")

ENDPOINTS: frozenset[str] = frozenset(
    {"/predict", "/embed", "/v1/embeddings", "/health/live", "/health/ready", "/v1/model", "/v1/labels", "/metrics",
     "/"}
)
V2_INFER = "/v2/models/{name}/infer"


def endpoint_label(path: str) -> str:
    """The ``endpoint`` label of a path: bounded values, V2's model name folded into a template."""
    if path in ENDPOINTS:
        return path
    if path.startswith("/v2/models/") and path.endswith("/infer"):
        return V2_INFER
    return "/v2" if path.startswith("/v2/") or path == "/v2" else "other"


_QUIET = frozenset({"/health/live", "/health/ready", "/metrics"})  # probes and scrapes log at DEBUG
_CLIENT_ID = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")
# h11 bounds headers that arrive in pieces; a large block that arrives at once is refused here.
MAX_HEADER_BYTES = 32 * 1024


class RequestContext:
    def __init__(self, app: ASGIApp, *, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        path = scope["path"]
        endpoint = endpoint_label(path)
        given = dict(scope["headers"]).get(b"x-request-id", b"").decode("latin-1")
        request_id = given if _CLIENT_ID.match(given) else uuid.uuid4().hex
        timings = StageTimings()
        scope.setdefault("state", {})["timings"] = timings
        token = REQUEST_ID.set(request_id)
        status = 500  # if the app dies before answering, uvicorn sends a 500

        async def send_with_headers(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                elapsed_s = time.perf_counter() - start
                headers = MutableHeaders(scope=message)
                headers["x-request-id"] = request_id
                headers["x-total-time"] = f"{elapsed_s * 1000:.2f}"
                self.metrics.request_duration.labels(endpoint=endpoint).observe(elapsed_s)
            await send(message)

        self.metrics.inflight.inc()
        try:
            if sum(len(k) + len(v) for k, v in scope["headers"]) > MAX_HEADER_BYTES:
                await JSONResponse(
                    {"error": f"request headers exceed {MAX_HEADER_BYTES} bytes", "error_type": "headers_too_large"},
                    status_code=431,
                )(scope, receive, send_with_headers)
                return
            await self.app(scope, receive, send_with_headers)
        finally:
            self.metrics.inflight.dec()
            self.metrics.requests.labels(endpoint=endpoint, status=str(status)).inc()
            logger.log(
                logging.DEBUG if path in _QUIET else logging.INFO,
                "%s %s %d",
                scope["method"],
                path,
                status,
                extra={
                    "method": scope["method"],
                    "path": path,
                    "status": status,
                    "total_ms": round((time.perf_counter() - start) * 1000, 2),
                    "decode_ms": round(timings.decode_s * 1000, 2),
                    "queue_ms": round(timings.queue_s * 1000, 2),
                    "inference_ms": round(timings.inference_s * 1000, 2),
                },
            )
            REQUEST_ID.reset(token)
