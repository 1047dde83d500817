"""Admission at the door and the request's deadline, as a plain ASGI middleware (issue 14).

Work requests (``POST /predict``, ``/embed``, ``/v1/embeddings`` and V2's ``/v2/models/{name}/infer``)
each take one of ``limit`` slots the moment the server hands them to the app: before any of the body
is read. With every slot taken, the answer is an immediate 429 with ``Retry-After`` and the body is
never read (uvicorn discards it and keeps the connection), so a flood costs the server one header
parse per refused request, as TEI's ``--max-concurrent-requests`` permit does. Other routes (health,
metrics, model info) never take a slot, so probes and scrapes are answered however busy the work
routes are.

Every request gets ``scope["state"]["deadline"]`` (``time.monotonic()`` seconds): arrival plus
``EAT_REQUEST_TIMEOUT_S``. This layer enforces it in two places the routes cannot:

- the body: each ``receive`` waits only until the deadline, so an upload that stalls or trickles ends
  in ``DeadlineExceeded`` (503) instead of holding its slot;
- the answer: a success that would start after the deadline is replaced by the 503, so no client
  ever gets a 2xx later than its deadline (the stages inside also check it and drop their work:
  decode waits are cancelled, the batcher drops expired windows before the engine).
"""

from __future__ import annotations

import asyncio
import time

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.errors import ConcurrencyLimit, DeadlineExceeded
from service.metrics import Metrics

WORK_ROUTES: frozenset[str] = frozenset({"/predict", "/embed", "/v1/embeddings"})


def is_work(method: str, path: str) -> bool:
    """A request that carries audio to the model: our routes, OpenAI's embeddings and KServe V2's infer."""
    return method == "POST" and (path in WORK_ROUTES or (path.startswith("/v2/models/") and path.endswith("/infer")))
RETRY_AFTER_S = 1  # slots free as fast as requests finish: a second is the smallest honest hint


def _error(status: int, message: str, error_type: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message, "error_type": error_type}, status_code=status, headers=headers)


class Admission:
    def __init__(self, app: ASGIApp, *, metrics: Metrics, limit: int, request_timeout_s: float) -> None:
        if limit < 1:
            raise ValueError("the concurrency limit must be at least 1")
        self.app = app
        self.limit = limit
        self.request_timeout_s = request_timeout_s
        self._metrics = metrics
        self._admitted = 0  # only the event loop touches it: no lock

    @property
    def admitted(self) -> int:
        return self._admitted

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        deadline = time.monotonic() + self.request_timeout_s
        scope.setdefault("state", {})["deadline"] = deadline
        if not is_work(scope["method"], scope["path"]):
            await self.app(scope, receive, send)
            return
        if self._admitted >= self.limit:
            self._metrics.reject(ConcurrencyLimit.reason)
            refusal = ConcurrencyLimit(f"{self._admitted} requests in flight, the limit is {self.limit}")
            headers = {"Retry-After": str(RETRY_AFTER_S)}
            await _error(refusal.status, refusal.message, refusal.error_type, headers)(scope, receive, send)
            return
        self._admitted += 1
        self._metrics.admitted.set(self._admitted)
        try:
            await self.app(scope, self._receive_until(deadline, receive), self._send_until(deadline, scope, send))
        finally:
            self._admitted -= 1
            self._metrics.admitted.set(self._admitted)

    def _receive_until(self, deadline: float, receive: Receive) -> Receive:
        """``receive`` bounded by the deadline until the body is complete; after it, unchanged (the
        disconnect watcher waits there for as long as the request is worked on)."""
        body_done = False

        async def bounded() -> Message:
            nonlocal body_done
            if body_done:
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), timeout=max(0.0, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                raise DeadlineExceeded(
                    f"the upload did not complete within the request's deadline of {self.request_timeout_s:g} s"
                ) from None
            if message["type"] != "http.request" or not message.get("more_body", False):
                body_done = True
            return message

        return bounded

    def _send_until(self, deadline: float, scope: Scope, send: Send) -> Send:
        """``send`` that turns a success starting after the deadline into the deadline's 503."""
        late = False

        async def guarded(message: Message) -> None:
            nonlocal late
            if late:
                return  # the body of the answer we replaced
            if message["type"] == "http.response.start" and message["status"] < 400 and time.monotonic() > deadline:
                late = True
                self._metrics.reject(DeadlineExceeded.reason)
                error = DeadlineExceeded(
                    f"the answer was ready after the request's deadline of {self.request_timeout_s:g} s"
                )
                await _error(error.status, error.message, error.error_type)(scope, _no_receive, send)
                return
            await send(message)

        return guarded


async def _no_receive() -> Message:
    raise RuntimeError("a replaced answer reads nothing")  # JSONResponse never calls it; a bug if it does
