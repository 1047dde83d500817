"""The Open Inference Protocol (KServe V2) REST routes, beside our own, from the same ``Inference``.

Spec: https://kserve.github.io/website/latest/modelserving/data_plane/v2_protocol/ and Triton's
binary tensor extension. What the served model looks like through this protocol:

- input ``waveform``: FP32 (or FP64/FP16) ``[B, S]`` — B clips of S samples, or ``[S]`` for one clip —
  at the request parameter ``sample_rate`` (default 16 000 Hz; other rates are resampled);
- optional input ``num_samples``: INT64/INT32 ``[B]``, valid samples per row (ragged clips in one tensor);
- outputs ``scores`` FP32 ``[B, C]`` (sigmoids, max over the clip's windows, as ``/predict``) and
  ``embedding`` FP32 ``[B, D]`` (the CLS vector averaged over windows, as ``/embed``); without an
  ``outputs`` list, every output the model has.

Clips of any length are cut into the model's windows and batched with every other request, exactly
as uploads to ``/predict`` are. Tensors may come as JSON ``data`` or, with the
``Inference-Header-Content-Length`` header, as raw little-endian bytes after the JSON
(``parameters.binary_data_size``); outputs are binary when asked (``parameters.binary_data`` per output,
or ``binary_data_output`` for all). Errors are ``{"error": ...}`` with a 4xx, as the protocol asks.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse

from eat.contract import SAMPLE_RATE, clip_scores, sigmoid
from service.app import AuthDep, ServiceState, StateDep, _deadline, _timings
from service.bodies import parse_object, read_body
from service.errors import BadRequest, ModelNotFound, NoClassifier
from service.inference import Upload
from service.uploads import watch_disconnect

HEADER_LENGTH = "inference-header-content-length"
VERSION = "1"
_FLOATS = {"FP16": np.float16, "FP32": np.float32, "FP64": np.float64}
_INTS = {"INT32": np.int32, "INT64": np.int64}
_BINARY_TYPE = "application/octet-stream"

router = APIRouter(prefix="/v2", tags=["kserve-v2"])
protected = APIRouter(prefix="/v2", tags=["kserve-v2"], dependencies=[AuthDep])


def _ready(state: ServiceState) -> bool:
    return state.ready and not state.draining and (state.batcher is None or state.batcher.healthy)


def _model(state: ServiceState, name: str, version: str | None = None) -> ServiceState:
    info = state.model()
    if name != info.model_name or version not in (None, "", VERSION):
        raise ModelNotFound(f"no model {name!r} version {version or VERSION!r}; this server has "
                            f"{info.model_name!r} version {VERSION!r}")
    return state


@router.get("/health/live")
def live() -> dict[str, bool]:
    return {"live": True}


@router.get("/health/ready")
def ready(state: StateDep) -> JSONResponse:
    ok = _ready(state)
    return JSONResponse({"ready": ok}, status_code=200 if ok else 503)


@protected.get("")
def server_metadata(state: StateDep) -> dict[str, Any]:
    return {"name": "eat", "version": "0.1.0", "extensions": ["binary_tensor_data"]}


def _outputs_of(state: ServiceState) -> list[dict[str, Any]]:
    info = state.model()
    outputs = [{"name": "embedding", "datatype": "FP32", "shape": [-1, info.embedding_dim]}]
    if info.has_classifier:
        outputs.insert(0, {"name": "scores", "datatype": "FP32", "shape": [-1, info.num_classes]})
    return outputs


@protected.get("/models/{name}")
@protected.get("/models/{name}/versions/{version}")
def model_metadata(name: str, state: StateDep, version: str | None = None) -> dict[str, Any]:
    _model(state, name, version)
    return {
        "name": name,
        "versions": [VERSION],
        "platform": "onnxruntime_onnx",
        "inputs": [
            {"name": "waveform", "datatype": "FP32", "shape": [-1, -1]},
            {"name": "num_samples", "datatype": "INT64", "shape": [-1]},
        ],
        "outputs": _outputs_of(state),
        "parameters": {"sample_rate": SAMPLE_RATE, "labels": [lab.display_name for lab in state.model().labels]},
    }


@protected.get("/models/{name}/ready")
@protected.get("/models/{name}/versions/{version}/ready")
def model_ready(name: str, state: StateDep, version: str | None = None) -> JSONResponse:
    _model(state, name, version)
    ok = _ready(state)
    return JSONResponse({"name": name, "ready": ok}, status_code=200 if ok else 503)


# ---- infer ------------------------------------------------------------------------------------------------
def _split_body(body: bytes, header_length: str | None) -> tuple[dict, memoryview]:
    if header_length is None:
        return parse_object(body, "the inference request"), memoryview(b"")
    if not header_length.isdigit() or int(header_length) > len(body):
        raise BadRequest(f"Inference-Header-Content-Length {header_length!r} does not fit a {len(body)}-byte body")
    size = int(header_length)
    return parse_object(body[:size], "the inference request's JSON header"), memoryview(body)[size:]


def _tensor(spec: Any, binary: memoryview, offset: int) -> tuple[str, np.ndarray, int]:
    """One input tensor as an array; returns its name, the array and the new binary offset."""
    if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
        raise BadRequest("each input needs a 'name', 'shape', 'datatype' and 'data' (or binary_data_size)")
    name, datatype, shape = spec["name"], spec.get("datatype"), spec.get("shape")
    dtype = {**_FLOATS, **_INTS}.get(datatype)
    if dtype is None:
        raise BadRequest(f"input {name!r}: datatype {datatype!r} is not one of {', '.join([*_FLOATS, *_INTS])}")
    if not (isinstance(shape, list) and 1 <= len(shape) <= 2
            and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)):
        raise BadRequest(f"input {name!r}: shape must be a list of one or two sizes, got {shape!r}")
    count = int(np.prod(shape))
    size = (spec.get("parameters") or {}).get("binary_data_size")
    if size is not None:
        if not isinstance(size, int) or size != count * np.dtype(dtype).itemsize or offset + size > len(binary):
            raise BadRequest(f"input {name!r}: binary_data_size {size!r} does not match shape {shape} {datatype} "
                             "or the bytes sent")
        array = np.frombuffer(binary[offset : offset + size], dtype=np.dtype(dtype).newbyteorder("<"))
        return name, array.reshape(shape), offset + size
    data = spec.get("data")
    try:
        array = np.asarray(data, dtype=dtype)
    except (TypeError, ValueError, OverflowError):
        raise BadRequest(f"input {name!r}: 'data' must be a (flat or nested) list of numbers") from None
    if array.size != count:
        raise BadRequest(f"input {name!r}: {array.size} values for shape {shape}")
    return name, array.reshape(shape), offset


def _clips(tensors: dict[str, np.ndarray], max_clips: int) -> list[np.ndarray]:
    if set(tensors) - {"waveform", "num_samples"} or "waveform" not in tensors:
        raise BadRequest(f"inputs are 'waveform' and optionally 'num_samples'; got {sorted(tensors)}")
    waveform = tensors["waveform"]
    if waveform.dtype.kind != "f":
        raise BadRequest("input 'waveform' must be FP32, FP64 or FP16")
    if waveform.ndim == 1:
        waveform = waveform[None]  # [1, S]
    if not 1 <= len(waveform) <= max_clips:
        raise BadRequest(f"'waveform' holds {len(waveform)} clips; send 1 to {max_clips} per request")
    lengths = np.full(len(waveform), waveform.shape[1], np.int64)
    if "num_samples" in tensors:
        lengths = tensors["num_samples"].reshape(-1)
        if lengths.dtype.kind != "i" or len(lengths) != len(waveform) or (lengths < 0).any() or (
                lengths > waveform.shape[1]).any():
            raise BadRequest(f"'num_samples' must hold {len(waveform)} integers in [0, {waveform.shape[1]}]")
    return [waveform[b, : int(n)].astype(np.float32) for b, n in enumerate(lengths)]


def _wanted(request_json: dict, available: list[str]) -> tuple[list[str], set[str]]:
    """Output names in order, and those to send as binary."""
    every_binary = bool((request_json.get("parameters") or {}).get("binary_data_output", False))
    asked = request_json.get("outputs")
    if asked is None:
        return available, set(available) if every_binary else set()
    if not isinstance(asked, list) or not all(isinstance(o, dict) and isinstance(o.get("name"), str) for o in asked):
        raise BadRequest("'outputs' must be a list of {\"name\": ...} objects")
    names = [o["name"] for o in asked]
    unknown = sorted(set(names) - set(available))
    if unknown:
        raise BadRequest(f"unknown outputs {unknown}; this model has {available}")
    binary = {o["name"] for o in asked if every_binary or (o.get("parameters") or {}).get("binary_data", False)}
    return names, binary


@protected.post("/models/{name}/infer")
@protected.post("/models/{name}/versions/{version}/infer")
async def infer(name: str, request: Request, state: StateDep, version: str | None = None) -> Response:
    _model(state, name, version)
    inference, _ = state.running()
    deadline = _deadline(request)  # from arrival, set by the admission layer
    body = await read_body(request, max_bytes=state.settings.max_upload_bytes)
    request_json, binary = _split_body(body, request.headers.get(HEADER_LENGTH))
    specs = request_json.get("inputs")
    if not isinstance(specs, list) or not specs:
        raise BadRequest("'inputs' must be a non-empty list of tensors")
    tensors, offset = {}, 0
    for spec in specs:
        tensor_name, array, offset = _tensor(spec, binary, offset)
        tensors[tensor_name] = array
    parameters = request_json.get("parameters") or {}
    rate = parameters.get("sample_rate", SAMPLE_RATE)
    if not isinstance(rate, int) or isinstance(rate, bool) or rate <= 0:
        raise BadRequest(f"parameter 'sample_rate' must be a positive integer, got {rate!r}")
    available = [o["name"] for o in _outputs_of(state)]
    names, as_binary = _wanted(request_json, available)
    if "scores" in names and not inference.info.has_classifier:
        raise NoClassifier("this model has no classifier head")
    uploads = [Upload(f"waveform[{b}]", clip, sample_rate=rate)
               for b, clip in enumerate(_clips(tensors, state.settings.max_files))]
    model_outputs = tuple(n for n, wanted in (("logits", "scores"), ("embedding", "embedding")) if wanted in names)
    async with watch_disconnect(request) as gone:
        done = await inference.infer(uploads, model_outputs, deadline=deadline, timings=_timings(request),
                                     disconnected=gone)
    results: dict[str, np.ndarray] = {}
    if "scores" in names:
        results["scores"] = np.stack([clip_scores(sigmoid(out["logits"])) for _, out in done])  # [B, C]
    if "embedding" in names:
        results["embedding"] = np.stack([out["embedding"].mean(axis=0) for _, out in done]).astype(np.float32)
    return _respond(request_json, name, names, as_binary, results, _timings(request).headers())


def _respond(request_json: dict, name: str, names: list[str], as_binary: set[str], results: dict[str, np.ndarray],
             headers: dict[str, str]) -> Response:
    outputs, chunks = [], []
    for output in names:
        array = np.ascontiguousarray(results[output], dtype="<f4")
        tensor: dict[str, Any] = {"name": output, "datatype": "FP32", "shape": list(array.shape)}
        if output in as_binary:
            raw = array.tobytes()
            tensor["parameters"] = {"binary_data_size": len(raw)}
            chunks.append(raw)
        else:
            tensor["data"] = array.reshape(-1).tolist()
        outputs.append(tensor)
    answer: dict[str, Any] = {"model_name": name, "model_version": VERSION, "outputs": outputs}
    if isinstance(request_json.get("id"), str):
        answer["id"] = request_json["id"]
    if not chunks:
        return JSONResponse(answer, headers=headers)
    header = json.dumps(answer).encode()
    headers = {**headers, "Inference-Header-Content-Length": str(len(header))}
    return Response(header + b"".join(chunks), media_type=_BINARY_TYPE, headers=headers)


routers = (router, protected)
