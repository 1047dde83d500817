"""Reading audio out of an HTTP request: multipart ``file`` fields or a raw audio body.

The body-size limit is enforced while the bytes arrive (a declared Content-Length over the limit is
refused before reading anything), so an over-size upload never sits in memory whole. The content
type only decides *how* to read the body; the audio format itself is sniffed from the bytes.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.types import Message, Receive

from service.errors import BadRequest, PayloadTooLarge, UnsupportedMediaType
from service.inference import Upload

# Besides these, any audio/* type is accepted: the decoder sniffs the real format from the bytes.
RAW_TYPES: frozenset[str] = frozenset({"application/octet-stream", "video/webm", "video/mp4", "application/ogg"})


def _limited(receive: Receive, max_bytes: int) -> Receive:
    received = 0

    async def wrapped() -> Message:
        nonlocal received
        message = await receive()
        if message["type"] == "http.request":
            received += len(message.get("body", b""))
            if received > max_bytes:
                raise PayloadTooLarge(f"request body exceeds {max_bytes} bytes")
        return message

    return wrapped


async def read_uploads(request: Request, *, max_upload_bytes: int, max_files: int) -> list[Upload]:
    """All audio files of the request, or a ServiceError (400/413/415) saying why not."""
    mime = request.headers.get("content-type", "").split(";")[0].strip().lower()
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_upload_bytes:
        raise PayloadTooLarge(f"request body of {declared} bytes exceeds the limit of {max_upload_bytes}")
    limited = Request(request.scope, receive=_limited(request.receive, max_upload_bytes))
    if mime == "multipart/form-data":
        return await _read_multipart(limited, max_files=max_files)
    if mime.startswith("audio/") or mime in RAW_TYPES:
        body = await limited.body()
        filename = request.headers.get("x-filename") or "body"
        return [Upload(filename=filename[:255], data=body)]
    raise UnsupportedMediaType(
        f"unsupported Content-Type {mime or '(none)'!r}: send multipart/form-data with 'file' fields, "
        "or the raw file as audio/* or application/octet-stream"
    )


async def _read_multipart(request: Request, *, max_files: int) -> list[Upload]:
    try:
        form = await request.form(max_files=max_files, max_fields=max_files)
    except HTTPException as err:  # starlette's parser errors (malformed body, too many parts)
        raise BadRequest(f"malformed multipart body: {err.detail}") from err
    try:
        files = [item for item in form.getlist("file") if isinstance(item, UploadFile)]
        if not files:
            raise BadRequest("multipart body has no 'file' field holding a file")
        return [Upload(filename=(f.filename or f"file{i}")[:255], data=await f.read()) for i, f in enumerate(files)]
    finally:
        await form.close()


@contextlib.asynccontextmanager
async def watch_disconnect(request: Request) -> AsyncIterator[asyncio.Future]:
    """A future that completes if the client goes away while the request is being worked on.

    Once the body is read, the server's ``receive`` only returns to report a disconnect (or the end
    of the response, after which nobody looks at the future any more).
    """

    async def wait() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            await asyncio.sleep(0.01)  # never spin if a server reports stray empty body messages

    task = asyncio.ensure_future(wait())
    try:
        yield task
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
