"""Multipart bodies parsed off the event loop: files found, other fields ignored, bad bodies a 400."""

from __future__ import annotations

import pytest

from service.errors import BadRequest
from service.uploads import parse_multipart

TYPE = "multipart/form-data; boundary=xyz"


def form(*parts: tuple[str, str | None, bytes]) -> bytes:
    out = b""
    for name, filename, data in parts:
        disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename is not None else "")
        out += f"--xyz\r\nContent-Disposition: {disposition}\r\n\r\n".encode() + data + b"\r\n"
    return out + b"--xyz--\r\n"


def test_files_in_order_other_fields_ignored() -> None:
    body = form(("file", "a.wav", b"AAAA\r\n--xy"), ("note", None, b"hello"), ("file", "b.flac", b"BB"))
    uploads = parse_multipart(body, TYPE, 4)
    assert [(u.filename, u.data) for u in uploads] == [("a.wav", b"AAAA\r\n--xy"), ("b.flac", b"BB")]


def test_a_large_file_arrives_whole() -> None:
    data = bytes(range(256)) * 40_000  # 10 MB, every byte value, many parser chunks
    assert parse_multipart(form(("file", "big.wav", data)), TYPE, 1)[0].data == data


@pytest.mark.parametrize(
    ("body", "content_type", "message"),
    [
        (form(("file", "a.wav", b"A")), "multipart/form-data", "boundary"),
        (form(("audio", "a.wav", b"A")), TYPE, "no 'file' field"),
        (form(("file", None, b"not a file")), TYPE, "no 'file' field"),
        (form(("file", "a.wav", b"A"))[:-9], TYPE, "closing boundary"),
        (b"--xyz\r\nnot multipart", TYPE, "malformed"),
        (b"--xyz\r\nX-Pad: " + b"a" * 10_000 + b"\r\n\r\nA\r\n--xyz--\r\n", TYPE, "malformed"),
        (form(*[("file", f"{i}.wav", b"A") for i in range(3)]), TYPE, "too many"),
        (form(*[("x", None, b"A") for i in range(5)]), TYPE, "too many"),
    ],
    ids=["no-boundary", "wrong-name", "no-filename", "truncated", "garbage", "huge-header", "files", "fields"],
)
def test_bad_bodies_are_400(body: bytes, content_type: str, message: str) -> None:
    with pytest.raises(BadRequest, match=message) as err:
        parse_multipart(body, content_type, 2)
    assert err.value.status == 400
