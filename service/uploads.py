"""Reading audio out of an HTTP request: multipart ``file`` fields or a raw audio body.

The body-size limit is enforced while the bytes arrive (a declared Content-Length over the limit is
refused before reading anything), so an over-size upload never sits in memory whole. The content
type only decides *how* to read the body; the audio format itself is sniffed from the bytes.

The event loop only collects the body's bytes; a multipart body is parsed in the decode pool, so a
large form never holds up the loop (and with it health checks and other uploads; issue 14). The wait
for the parse ends at the request's deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from concurrent.futures import Executor
from dataclasses import dataclass, field

from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, MultipartState, parse_options_header
from starlette.requests import Request
from starlette.types import Message, Receive

from service.errors import BadRequest, DeadlineExceeded, PayloadTooLarge, UnsupportedMediaType
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


async def read_uploads(
    request: Request, *, max_upload_bytes: int, max_files: int, parse_pool: Executor, deadline: float
) -> list[Upload]:
    """All audio files of the request, or a ServiceError (400/413/415/429/503) saying why not."""
    mime = request.headers.get("content-type", "").split(";")[0].strip().lower()
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_upload_bytes:
        raise PayloadTooLarge(f"request body of {declared} bytes exceeds the limit of {max_upload_bytes}")
    limited = Request(request.scope, receive=_limited(request.receive, max_upload_bytes))
    if mime == "multipart/form-data":
        body = await limited.body()
        loop = asyncio.get_running_loop()
        parsing = loop.run_in_executor(parse_pool, parse_multipart, body, request.headers["content-type"], max_files)
        try:
            return await asyncio.wait_for(parsing, timeout=max(0.0, deadline - time.monotonic()))
        except asyncio.TimeoutError:
            raise DeadlineExceeded("the request's deadline passed while its multipart body was parsed") from None
    if mime.startswith("audio/") or mime in RAW_TYPES:
        body = await limited.body()
        filename = request.headers.get("x-filename") or "body"
        return [Upload(filename=filename[:255], data=body)]
    raise UnsupportedMediaType(
        f"unsupported Content-Type {mime or '(none)'!r}: send multipart/form-data with 'file' fields, "
        "or the raw file as audio/* or application/octet-stream"
    )


# A part's headers are a few short lines; python-multipart refuses longer ones (as starlette did).
MAX_PART_HEADER_BYTES = 4096
MAX_PART_HEADERS = 8


@dataclass
class _Part:
    headers: dict[bytes, bytes] = field(default_factory=dict)
    chunks: list[bytes] = field(default_factory=list)


def parse_multipart(body: bytes, content_type: str, max_files: int) -> list[Upload]:
    """The ``file`` fields of a complete ``multipart/form-data`` body (runs in a worker thread).

    Only parts named ``file`` that carry a filename are audio; other fields are allowed but ignored,
    up to ``max_files`` of each kind. Malformed or truncated bodies are a 400.
    """
    _, params = parse_options_header(content_type)
    boundary = params.get(b"boundary")
    if not boundary:
        raise BadRequest("multipart/form-data without a boundary parameter")
    parts: list[_Part] = []
    header_name, header_value = bytearray(), bytearray()

    def on_part_begin() -> None:
        if len(parts) >= 2 * max_files:
            raise BadRequest(f"too many multipart fields: at most {max_files} files")
        parts.append(_Part())

    def on_header_end() -> None:
        parts[-1].headers[bytes(header_name).lower()] = bytes(header_value)
        header_name.clear()
        header_value.clear()

    callbacks = {
        "on_part_begin": on_part_begin,
        "on_part_data": lambda data, start, end: parts[-1].chunks.append(data[start:end]),
        "on_header_field": lambda data, start, end: header_name.extend(data[start:end]),
        "on_header_value": lambda data, start, end: header_value.extend(data[start:end]),
        "on_header_end": on_header_end,
    }
    try:
        parser = MultipartParser(
            boundary, callbacks, max_header_count=MAX_PART_HEADERS, max_header_size=MAX_PART_HEADER_BYTES
        )
        parser.write(body)
    except (MultipartParseError, ValueError) as err:
        raise BadRequest(f"malformed multipart body: {err}") from err
    if parser.state != MultipartState.END:
        raise BadRequest("malformed multipart body: it ends before the closing boundary")
    uploads = []
    for part in parts:
        _, disposition = parse_options_header(part.headers.get(b"content-disposition", b""))
        if disposition.get(b"name") != b"file" or b"filename" not in disposition:
            continue
        filename = disposition[b"filename"].decode("utf-8", "replace") or f"file{len(uploads)}"
        uploads.append(Upload(filename=filename[:255], data=b"".join(part.chunks)))
    if not uploads:
        raise BadRequest("multipart body has no 'file' field holding a file")
    if len(uploads) > max_files:
        raise BadRequest(f"too many files: {len(uploads)}, at most {max_files} per request")
    return uploads


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
