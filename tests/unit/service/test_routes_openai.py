"""``POST /v1/embeddings`` in-process: OpenAI's answer shape, base64 in and out, parity with /embed,
and a clear 4xx for every malformed request."""

from __future__ import annotations

import base64

import numpy as np
import pytest
from svc_helpers import encode_soundfile, sine, wav_bytes


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def test_shape_and_parity_with_embed(make_client) -> None:
    one, two = wav_bytes(1.0), encode_soundfile(sine(2.5, 44_100, 700.0), 44_100, "FLAC", "PCM_16")
    with make_client() as client:
        answer = client.post("/v1/embeddings", json={"input": [b64(one), "data:audio/flac;base64," + b64(two)],
                                                     "model": "toy-eat"})
        assert answer.status_code == 200, answer.text
        body = answer.json()
        assert body["object"] == "list" and body["model"] == "toy-eat"
        assert [d["index"] for d in body["data"]] == [0, 1] and all(d["object"] == "embedding" for d in body["data"])
        assert body["usage"] == {"prompt_tokens": 7 + 16, "total_tokens": 7 + 16}  # ceil(1/0.16), ceil(2.5/0.16)
        for item, data in zip(body["data"], (one, two), strict=True):
            reference = client.post("/embed", content=data, headers={"content-type": "audio/wav"}).json()
            np.testing.assert_allclose(item["embedding"], reference["results"][0]["embedding"], atol=1e-6)
        packed = client.post("/v1/embeddings", json={"input": b64(one), "encoding_format": "base64",
                                                     "pooling": "mean", "dimensions": 16}).json()
        mean = client.post("/embed?pooling=mean", content=one, headers={"content-type": "audio/wav"}).json()
    vector = np.frombuffer(base64.b64decode(packed["data"][0]["embedding"]), "<f4")
    np.testing.assert_allclose(vector, mean["results"][0]["embedding"], atol=1e-6)


BAD = [
    ("not json", {"content": b"{", "headers": {"content-type": "application/json"}}, 400),
    ("not an object", {"json": ["x"]}, 400),
    ("text content type", {"content": b"{}", "headers": {"content-type": "text/plain"}}, 415),
    ("no input", {"json": {"model": "toy-eat"}}, 400),
    ("empty list", {"json": {"input": []}}, 400),
    ("token ids", {"json": {"input": [[1, 2, 3]]}}, 400),
    ("not base64", {"json": {"input": "***"}}, 400),
    ("bad data url", {"json": {"input": "data:text/plain,hello"}}, 400),
    ("base64 text", {"json": {"input": b64(b"hello, this is text")}}, 422),
    ("other model", {"json": {"input": b64(wav_bytes()), "model": "text-embedding-3-small"}}, 404),
    ("bad encoding", {"json": {"input": b64(wav_bytes()), "encoding_format": "int8"}}, 400),
    ("bad pooling", {"json": {"input": b64(wav_bytes()), "pooling": "time"}}, 400),
    ("dimensions", {"json": {"input": b64(wav_bytes()), "dimensions": 8}}, 400),
    ("unknown field", {"json": {"input": b64(wav_bytes()), "temperature": 1}}, 400),
    ("too many", {"json": {"input": [b64(wav_bytes(0.1))] * 17}}, 400),
]


@pytest.mark.parametrize(("case", "kwargs", "status"), BAD, ids=[c[0] for c in BAD])
def test_bad_requests_are_4xx(make_client, case: str, kwargs: dict, status: int) -> None:
    with make_client() as client:
        answer = client.post("/v1/embeddings", **kwargs)
    assert answer.status_code == status, (case, answer.text)
    assert answer.json()["error"], case


def test_api_key_and_size_limit(make_client) -> None:
    payload = {"input": b64(wav_bytes())}
    with make_client(api_keys=["k1"], max_upload_bytes=10_000) as client:
        assert client.post("/v1/embeddings", json=payload).status_code == 401
        assert client.post("/v1/embeddings", json=payload, headers={"authorization": "Bearer k1"}).status_code == 413
        small = {"input": b64(wav_bytes(0.1))}
        assert client.post("/v1/embeddings", json=small, headers={"authorization": "Bearer k1"}).status_code == 200
