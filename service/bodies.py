"""Bounded reading of JSON (and JSON + binary) request bodies for the V2 and OpenAI-style routes.

The size limit is ``EAT_MAX_UPLOAD_BYTES``, enforced on the declared length and again while the bytes
arrive, as ``service.uploads`` does for audio uploads. Malformed JSON is a 400, never a 500.
"""

from __future__ import annotations

import json

from starlette.requests import Request

from service.errors import BadRequest, PayloadTooLarge, UnsupportedMediaType


async def read_body(request: Request, *, max_bytes: int) -> bytes:
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_bytes:
        raise PayloadTooLarge(f"request body of {declared} bytes exceeds the limit of {max_bytes}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise PayloadTooLarge(f"request body exceeds {max_bytes} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def parse_object(data: bytes, what: str) -> dict:
    """``data`` as a JSON object, or a 400 saying what was expected."""
    try:
        value = json.loads(data)
    except (ValueError, UnicodeDecodeError) as err:
        raise BadRequest(f"{what} is not valid JSON: {err}") from None
    if not isinstance(value, dict):
        raise BadRequest(f"{what} must be a JSON object")
    return value


def require_json(request: Request) -> None:
    mime = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if mime not in ("application/json", ""):
        raise UnsupportedMediaType(f"send the request as application/json, not {mime!r}")
