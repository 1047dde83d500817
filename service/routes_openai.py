"""``POST /v1/embeddings`` in the shape of OpenAI's embeddings API, for tools that already speak it.

Each ``input`` string is one audio file, base64-encoded, bare or as a data URL
(``data:audio/wav;base64,...``); any format ``/embed`` reads. The answer is OpenAI's
``{"object": "list", "data": [{"object": "embedding", "embedding": [...], "index": i}], "model",
"usage"}``. ``encoding_format: "base64"`` (what the ``openai`` client asks for by default) returns each
vector as base64 of little-endian float32. The vector is ``/embed``'s ``pooling=cls`` (or ``mean`` with
the extra field ``"pooling": "mean"``). ``usage`` counts audio tokens: one per 160 ms token row of audio,
the model's own time step. ``dimensions`` is accepted only when it equals the model's.
"""

from __future__ import annotations

import base64
import binascii
import math
import re
from typing import Any

import numpy as np
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from eat.contract import PATCH_SECONDS
from service.app import AuthDep, StateDep, _deadline, _timings
from service.bodies import parse_object, read_body, require_json
from service.errors import BadRequest, ModelNotFound
from service.inference import Upload
from service.uploads import watch_disconnect

_DATA_URL = re.compile(r"^data:(?:audio|video|application)/[-+.\w]+(?:;[-\w]+=[-\w.]+)*;base64,", re.ASCII)
_KNOWN = frozenset({"input", "model", "encoding_format", "dimensions", "user", "pooling"})

router = APIRouter(prefix="/v1", tags=["openai"], dependencies=[AuthDep])


def _audio_bytes(item: Any, index: int) -> bytes:
    if not isinstance(item, str) or not item:
        raise BadRequest(f"input[{index}] must be a non-empty base64 string (or data:audio/...;base64, URL) "
                         "holding an audio file; token arrays are for text models")
    match = _DATA_URL.match(item)
    payload = item[match.end():] if match else item
    if item.startswith("data:") and match is None:
        raise BadRequest(f"input[{index}]: a data URL must look like data:audio/wav;base64,...")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise BadRequest(f"input[{index}] is not valid base64") from None


@router.post("/embeddings")
async def embeddings(request: Request, state: StateDep) -> JSONResponse:
    """Audio embeddings, OpenAI style; the fields are documented in this module."""
    inference, _ = state.running()
    deadline = _deadline(request)  # from arrival, set by the admission layer
    require_json(request)
    body = parse_object(await read_body(request, max_bytes=state.settings.max_upload_bytes), "the request body")
    unknown = sorted(set(body) - _KNOWN)
    if unknown:
        raise BadRequest(f"unknown fields {unknown}; accepted: {sorted(_KNOWN)}")
    info = inference.info
    model = body.get("model", info.model_name)
    if model != info.model_name:
        raise ModelNotFound(f"model {model!r} is not served here; this server has {info.model_name!r}")
    encoding = body.get("encoding_format", "float")
    if encoding not in ("float", "base64"):
        raise BadRequest(f"encoding_format must be 'float' or 'base64', got {encoding!r}")
    pooling = body.get("pooling", "cls")
    if pooling not in ("cls", "mean"):
        raise BadRequest(f"pooling must be 'cls' or 'mean', got {pooling!r}")
    dimensions = body.get("dimensions")
    if dimensions is not None and dimensions != info.embedding_dim:
        raise BadRequest(f"dimensions must be {info.embedding_dim} (this model's), got {dimensions!r}")
    items = body.get("input")
    items = [items] if isinstance(items, str) else items
    if not isinstance(items, list) or not 1 <= len(items) <= state.settings.max_files:
        raise BadRequest(f"input must be a string or a list of 1 to {state.settings.max_files} strings")
    uploads = [Upload(f"input[{i}]", _audio_bytes(item, i)) for i, item in enumerate(items)]
    async with watch_disconnect(request) as gone:
        vectors = await inference.embed(uploads, pooling=pooling, deadline=deadline, timings=_timings(request),
                                        disconnected=gone)
    data = []
    for index, result in enumerate(vectors):
        vector = np.ascontiguousarray(result.vector, dtype="<f4")
        encoded: list[float] | str = (base64.b64encode(vector.tobytes()).decode("ascii") if encoding == "base64"
                                      else vector.tolist())
        data.append({"object": "embedding", "embedding": encoded, "index": index})
    tokens = sum(math.ceil(v.duration_s / PATCH_SECONDS) for v in vectors)
    answer = {"object": "list", "data": data, "model": info.model_name,
              "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}
    return JSONResponse(answer, headers=_timings(request).headers())
