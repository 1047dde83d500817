"""The HTTP API: routes translate, ``Inference`` works (STYLE.md §4).

``create_app(settings, engine=None)`` assembles the app. Its lifespan opens the engine (unless one
is injected, as tests do with a fake), warms it up, starts the batcher, and on exit drains the
batcher and closes the engine. All errors go through one handler that maps ``ServiceError`` to its
status, counts the rejection and adds ``Retry-After`` where it applies. Admission (the concurrency
cap, checked before a body is read) and the request deadline live in ``service.admission``.
"""

from __future__ import annotations

import asyncio
import io
import logging
import math
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Annotated, Literal

import numpy as np
from fastapi import Depends, FastAPI, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from eat.contract import ModelInfo, hop_samples_for
from eat.engine import Engine, open_engine
from eat.events import Thresholds, read_thresholds
from eat.predictor import Embedding, Prediction
from service.admission import Admission
from service.batcher import Batcher
from service.decode_pool import BoundedPool
from service.errors import Draining, NoClassifier, NotAcceptable, ServiceError, Unauthorized
from service.inference import Inference, Pooling, StageTimings
from service.metrics import Metrics
from service.middleware import RequestContext
from service.schemas import (
    EmbedResponse,
    EmbedResult,
    ErrorBody,
    EventOut,
    Health,
    LabelOut,
    LabelsResponse,
    ModelResponse,
    PredictResponse,
    PredictResult,
    Tag,
    WindowTags,
)
from service.settings import Settings
from service.uploads import read_uploads, watch_disconnect

logger = logging.getLogger(__name__)

NPY_TYPE = "application/x-npy"
_ERRORS = {code: {"model": ErrorBody} for code in (400, 401, 406, 413, 415, 422, 429, 500, 503)}
_UPLOAD_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {"file": {"type": "array", "items": {"type": "string", "format": "binary"}}},
                    "required": ["file"],
                }
            },
            "audio/*": {"schema": {"type": "string", "format": "binary"}},
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
        },
    }
}


@dataclass
class ServiceState:
    """Everything one app instance owns; lives on ``app.state.eat`` (no module globals)."""

    settings: Settings
    metrics: Metrics
    engine: Engine | None = None
    inference: Inference | None = None
    batcher: Batcher | None = None
    decode_pool: BoundedPool | None = None
    ready: bool = False
    draining: bool = False

    def running(self) -> tuple[Inference, BoundedPool]:
        """The inference pipeline and the decode pool, for new work: refused while draining."""
        if self.draining or self.inference is None or self.decode_pool is None:
            raise Draining("the server is not accepting work (starting or shutting down)")
        return self.inference, self.decode_pool

    def model(self) -> ModelInfo:
        """The model's metadata, answered also while draining."""
        if self.engine is None:
            raise Draining("the server is starting")
        return self.engine.info


def _state(request: Request) -> ServiceState:
    return request.app.state.eat


StateDep = Annotated[ServiceState, Depends(_state)]


def _require_key(request: Request, state: StateDep) -> None:
    keys = state.settings.api_keys
    if not keys:
        return
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or token.strip() not in keys:
        raise Unauthorized("missing or invalid API key: send 'Authorization: Bearer <key>'")


AuthDep = Depends(_require_key)


def _deadline(request: Request) -> float:
    """Set by ``Admission`` at the request's arrival: the body, decode, queue and engine all count."""
    return request.scope["state"]["deadline"]


def _timings(request: Request) -> StageTimings:
    return request.scope["state"]["timings"]


async def predict(
    request: Request,
    response: Response,
    state: StateDep,
    top_k: Annotated[int, Query(ge=1, le=1000, description="tags per file (and per window)")] = 5,
    threshold: Annotated[float | None, Query(ge=0.0, le=1.0, description="drop tags scoring below")] = None,
    timeline: Annotated[bool, Query(description="add per-window tags (start_s, end_s)")] = False,
    events: Annotated[bool, Query(description="add sound events (onset_s, offset_s, peak_score)")] = False,
    hop: Annotated[float | None, Query(gt=0, description="seconds between windows, < window for events")] = None,
    event_threshold: Annotated[float | None, Query(ge=0.0, le=1.0, description="global event threshold")] = None,
) -> PredictResponse:
    """Tag audio: clip scores are the max over the model's windows; `timeline=true` adds each window."""
    inference, pool = state.running()
    deadline = _deadline(request)
    if not inference.info.has_classifier:  # refuse before reading a large body
        raise NoClassifier("this model has no classifier head; use /embed for embeddings")
    uploads = await read_uploads(
        request,
        max_upload_bytes=state.settings.max_upload_bytes,
        max_files=state.settings.max_files,
        parse_pool=pool,
        deadline=deadline,
    )
    async with watch_disconnect(request) as gone:
        predictions = await inference.predict(
            uploads,
            deadline=deadline,
            timings=_timings(request),
            disconnected=gone,
            hop_s=hop,
        )
    response.headers.update(_timings(request).headers())
    thresholds = inference.thresholds.with_default(event_threshold) if events else None
    results = [predict_result(p, top_k=top_k, threshold=threshold, timeline=timeline, events=thresholds)
               for p in predictions]
    return PredictResponse(model=inference.info.model_name, results=results)


async def embed(
    request: Request,
    response: Response,
    state: StateDep,
    pooling: Annotated[
        Pooling, Query(description="cls | mean | time (per 160 ms) | frame (all patch tokens) | all (CLS + frame)")
    ] = "cls",
) -> EmbedResponse:
    """Embed audio. JSON by default; `Accept: application/x-npy` returns the array of a single file
    (float32 [D], or [T, D] for pooling=time); several files with that Accept are refused with 406."""
    inference, pool = state.running()
    deadline = _deadline(request)
    want_npy = NPY_TYPE in request.headers.get("accept", "")
    uploads = await read_uploads(
        request,
        max_upload_bytes=state.settings.max_upload_bytes,
        max_files=state.settings.max_files,
        parse_pool=pool,
        deadline=deadline,
    )
    if want_npy and len(uploads) != 1:
        raise NotAcceptable(f"{NPY_TYPE} holds one array: send one file per request, or ask for JSON")
    async with watch_disconnect(request) as gone:
        embeddings = await inference.embed(
            uploads, pooling=pooling, deadline=deadline, timings=_timings(request), disconnected=gone
        )
    headers = _timings(request).headers()
    if want_npy:
        buffer = io.BytesIO()
        np.save(buffer, embeddings[0].vector, allow_pickle=False)
        return Response(buffer.getvalue(), media_type=NPY_TYPE, headers=headers)  # type: ignore[return-value]
    response.headers.update(headers)
    results = [embed_result(e, pooling) for e in embeddings]
    return EmbedResponse(model=inference.info.model_name, results=results)


def predict_result(
    p: Prediction, *, top_k: int, threshold: float | None, timeline: bool, events: Thresholds | None = None
) -> PredictResult:
    rows = None
    if timeline:
        rows = [WindowTags(start_s=w.start_s, end_s=w.end_s, tags=[Tag(**vars(t)) for t in w.tags])
                for w in p.timeline(top_k, threshold)]
    return PredictResult(
        filename=p.name,
        duration_s=p.duration_s,
        num_windows=p.num_windows,
        tags=[Tag(**vars(t)) for t in p.tags(top_k, threshold)],
        timeline=rows,
        events=None if events is None else [EventOut(**vars(e)) for e in p.events(events)],
    )


def embed_result(e: Embedding, pooling: Pooling) -> EmbedResult:
    return EmbedResult(
        filename=e.name,
        duration_s=e.duration_s,
        num_windows=e.num_windows,
        pooling=pooling,
        dim=int(e.vector.shape[-1]),
        embedding=e.vector.tolist(),
        time_step_s=e.time_step_s,
    )


# The health routes (and /metrics) are coroutines: they answer on the event loop with no hop to a
# thread, which under load would queue them behind other threads' work for the GIL (issue 14).
async def live() -> Health:
    return Health(status="ok")


async def ready(state: StateDep, response: Response) -> Health:
    """200 only after the warm-up inference and while the batcher is healthy; 503 when draining."""
    if state.draining:
        status: Literal["ok", "starting", "draining", "failed"] = "draining"
    elif state.batcher is not None and not state.batcher.healthy:
        status = "failed"
    else:
        status = "ok" if state.ready else "starting"
    if status != "ok":
        response.status_code = 503
    return Health(status=status)


def model_info(state: StateDep) -> ModelResponse:
    info, s = state.model(), state.settings
    hop = hop_samples_for(s.hop_seconds, info.window_samples)
    return ModelResponse(
        model_name=info.model_name,
        format_version=info.format_version,
        provider=info.provider,
        precision=info.precision,
        sample_rate=info.sample_rate,
        window_samples=info.window_samples,
        window_s=info.window_s,
        hop_s=hop / info.sample_rate,
        target_frames=info.target_frames,
        embedding_dim=info.embedding_dim,
        num_classes=info.num_classes,
        has_classifier=info.has_classifier,
        time_patches=info.time_patches,
        freq_patches=info.freq_patches,
        source_sha256=info.source_sha256,
        max_batch=s.max_batch,
        batch_buckets=s.batch_buckets,
        max_delay_ms=s.max_delay_ms,
        queue_size=s.queue_size,
        max_concurrent_requests=s.concurrency_limit,
        max_upload_bytes=s.max_upload_bytes,
        max_duration_s=s.max_duration_s,
        request_timeout_s=s.request_timeout_s,
    )


def labels(state: StateDep) -> LabelsResponse:
    info = state.model()
    return LabelsResponse(
        model=info.model_name,
        num_classes=info.num_classes,
        labels=[LabelOut(index=lab.index, id=lab.id, name=lab.display_name) for lab in info.labels],
    )


async def metrics(state: StateDep) -> Response:
    """On the loop too: rendering the registry takes about a millisecond, less than a thread hop under load."""
    return Response(state.metrics.exposition(), media_type="text/plain; version=0.0.4; charset=utf-8")


# ---- errors: one table, one handler (house rule 9) ---------------------------------------------------------
def _error_response(status: int, message: str, error_type: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message, "error_type": error_type}, status_code=status, headers=headers)


def _install_error_handlers(app: FastAPI, metrics_: Metrics) -> None:
    async def on_service_error(request: Request, err: Exception) -> JSONResponse:
        assert isinstance(err, ServiceError)
        if err.reason is not None:
            metrics_.reject(err.reason)
        headers = {}
        if err.retry_after_s is not None:
            headers["Retry-After"] = str(max(1, math.ceil(err.retry_after_s)))
        if err.status == 401:
            headers["WWW-Authenticate"] = "Bearer"
        if err.status >= 500:
            logger.warning("%s: %s", err.error_type, err.message)
        return _error_response(err.status, err.message, err.error_type, headers)

    async def on_http_error(request: Request, err: Exception) -> JSONResponse:
        assert isinstance(err, StarletteHTTPException)
        return _error_response(err.status_code, str(err.detail), f"http_{err.status_code}", err.headers)

    async def on_validation_error(request: Request, err: Exception) -> JSONResponse:
        assert isinstance(err, RequestValidationError)
        parts = [f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in err.errors()]
        return _error_response(422, "; ".join(parts), "bad_request")

    app.add_exception_handler(ServiceError, on_service_error)
    app.add_exception_handler(StarletteHTTPException, on_http_error)
    app.add_exception_handler(RequestValidationError, on_validation_error)


# ---- assembly ---------------------------------------------------------------------------------------------
def _warm_up(engine: Engine, buckets: list[int]) -> None:
    """Run every bucket shape once so the first real request does not pay for allocation/tuning."""
    info = engine.info
    outputs = ("embedding", "tokens", "logits") if info.has_classifier else ("embedding", "tokens")
    for bucket in buckets:
        waveform = np.zeros((bucket, info.window_samples), np.float32)
        engine.run(waveform, np.full(bucket, info.window_samples, np.int64), outputs)


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    state: ServiceState = app.state.eat
    s = state.settings
    if state.engine is None:
        state.engine = await asyncio.to_thread(
            open_engine, s.model_path, provider=s.provider, intra_op_threads=s.intra_op_threads
        )
    engine = state.engine
    info = engine.info
    hop_samples = hop_samples_for(s.hop_seconds, info.window_samples)
    thresholds = read_thresholds(s.thresholds) if s.thresholds else Thresholds()
    thresholds.for_labels(info.labels)  # a class the model lacks stops the start, with its name
    state.metrics.model_info.labels(
        model_name=info.model_name,
        provider=info.provider,
        precision=info.precision,
        window_samples=str(info.window_samples),
        max_batch=str(s.max_batch),
    ).set(1)
    # CPU: one shape is enough to page the weights in; GPU: every bucket up to max_batch (cuDNN plans).
    used = [b for b in s.batch_buckets if b <= s.bucket_for(s.max_batch)]
    await asyncio.to_thread(_warm_up, engine, used if info.provider == "cuda" else used[:1])
    state.batcher = Batcher(
        engine,
        metrics=state.metrics,
        max_batch=s.max_batch,
        batch_buckets=s.batch_buckets,
        max_delay_s=s.max_delay_ms / 1000,
        queue_size=s.queue_size,
        pad_to_bucket=info.provider == "cuda",  # on CPU a padded row costs a full row: cut down instead
    )
    executor = BoundedPool(num_threads=s.decode_threads, max_jobs=s.decode_pool_size, metrics=state.metrics)
    state.decode_pool = executor
    state.inference = Inference(
        info=info,
        batcher=state.batcher,
        metrics=state.metrics,
        executor=executor,
        hop_samples=hop_samples,
        max_duration_s=s.max_duration_s,
        thresholds=thresholds,
    )
    state.batcher.start()
    state.ready = True
    logger.info("ready: model=%s provider=%s", info.model_name, info.provider)
    try:
        yield
    finally:
        state.ready, state.draining = False, True
        await asyncio.to_thread(state.batcher.stop, timeout_s=s.drain_timeout_s)
        executor.shutdown(wait=False, cancel_futures=True)
        engine.close()
        logger.info("stopped")


def create_app(settings: Settings, engine: Engine | None = None) -> FastAPI:
    """One service instance with its own metrics registry; ``engine`` replaces the ONNX session."""
    app = FastAPI(
        title="EAT audio service",
        summary="Audio tagging and embeddings with an EAT model exported to ONNX",
        version="0.1.0",
        lifespan=_lifespan,
    )
    state = ServiceState(settings=settings, metrics=Metrics(), engine=engine)
    app.state.eat = state
    _install_error_handlers(app, state.metrics)
    protected = {"dependencies": [AuthDep], "responses": _ERRORS}
    app.add_api_route(
        "/predict",
        predict,
        methods=["POST"],
        response_model=PredictResponse,
        openapi_extra=_UPLOAD_BODY,
        tags=["inference"],
        **protected,
    )
    app.add_api_route(
        "/embed",
        embed,
        methods=["POST"],
        response_model=EmbedResponse,
        openapi_extra=_UPLOAD_BODY,
        tags=["inference"],
        dependencies=[AuthDep],
        responses={**_ERRORS, 200: {"content": {NPY_TYPE: {"schema": {"type": "string", "format": "binary"}}}}},
    )
    app.add_api_route(
        "/v1/model", model_info, methods=["GET"], response_model=ModelResponse, tags=["model"], **protected
    )
    app.add_api_route("/v1/labels", labels, methods=["GET"], response_model=LabelsResponse, tags=["model"], **protected)
    app.add_api_route("/health/live", live, methods=["GET"], response_model=Health, tags=["health"])
    app.add_api_route(
        "/health/ready",
        ready,
        methods=["GET"],
        response_model=Health,
        tags=["health"],
        responses={503: {"model": Health}},
    )
    app.add_api_route("/metrics", metrics, methods=["GET"], tags=["health"], response_class=Response)
    # Imported here: these modules import this one's dependencies (state, auth), so not at the top.
    from service import routes_openai, routes_page, routes_stream, routes_v2

    for router in (*routes_v2.routers, routes_openai.router, routes_stream.router, routes_page.page_router()):
        app.include_router(router, responses=_ERRORS)
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST"],
            allow_headers=["*"],
            expose_headers=["x-request-id", "x-total-time"],
        )
    # Added last = outermost: RequestContext (ids, timing, access log) sees every answer, Admission's too.
    app.add_middleware(
        Admission,
        metrics=state.metrics,
        limit=settings.concurrency_limit,
        request_timeout_s=settings.request_timeout_s,
    )
    app.add_middleware(RequestContext, metrics=state.metrics)
    return app
