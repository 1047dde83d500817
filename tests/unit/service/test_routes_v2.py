"""The KServe V2 / Open Inference Protocol routes in-process: shapes, parity with /predict and /embed,
the binary tensor extension, and a clear 4xx for every malformed request."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import soundfile as sf

RATE = 16_000


def float_wav(samples: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    sf.write(buffer, samples, RATE, format="WAV", subtype="FLOAT")
    return buffer.getvalue()


def clips() -> list[np.ndarray]:
    rng = np.random.default_rng(3)
    return [rng.normal(0, 0.1, 20_000).astype(np.float32), rng.normal(0, 0.2, 7_000).astype(np.float32)]


def ragged_request(binary: bool = False) -> tuple[dict, bytes]:
    a, b = clips()
    waveform = np.zeros((2, len(a)), np.float32)
    waveform[0], waveform[1, : len(b)] = a, b
    lengths = np.array([len(a), len(b)], np.int64)
    inputs = [{"name": "waveform", "shape": [2, len(a)], "datatype": "FP32"},
              {"name": "num_samples", "shape": [2], "datatype": "INT64"}]
    if not binary:
        inputs[0]["data"], inputs[1]["data"] = waveform.tolist(), lengths.tolist()
        return {"inputs": inputs}, b""
    inputs[0]["parameters"] = {"binary_data_size": waveform.nbytes}
    inputs[1]["parameters"] = {"binary_data_size": lengths.nbytes}
    return {"inputs": inputs}, waveform.astype("<f4").tobytes() + lengths.astype("<i8").tobytes()


def test_health_metadata_and_ready(make_client) -> None:
    with make_client() as client:
        assert client.get("/v2/health/live").json() == {"live": True}
        assert client.get("/v2/health/ready").json() == {"ready": True}
        assert client.get("/v2").json()["extensions"] == ["binary_tensor_data"]
        meta = client.get("/v2/models/toy-eat").json()
        assert meta["name"] == "toy-eat" and meta["versions"] == ["1"]
        assert [i["name"] for i in meta["inputs"]] == ["waveform", "num_samples"]
        assert {o["name"]: o["shape"] for o in meta["outputs"]} == {"scores": [-1, 5], "embedding": [-1, 16]}
        assert client.get("/v2/models/toy-eat/ready").json() == {"name": "toy-eat", "ready": True}
        assert client.get("/v2/models/toy-eat/versions/1/ready").status_code == 200
        for path in ("/v2/models/other", "/v2/models/other/ready", "/v2/models/toy-eat/versions/7"):
            answer = client.get(path)
            assert answer.status_code == 404 and "toy-eat" in answer.json()["error"], path


def test_infer_matches_predict_and_embed(make_client) -> None:
    request, _ = ragged_request()
    with make_client() as client:
        answer = client.post("/v2/models/toy-eat/infer", json={**request, "id": "r1"})
        assert answer.status_code == 200, answer.text
        body = answer.json()
        assert body["id"] == "r1" and body["model_name"] == "toy-eat"
        out = {o["name"]: np.array(o["data"], np.float32).reshape(o["shape"]) for o in body["outputs"]}
        assert out["scores"].shape == (2, 5) and out["embedding"].shape == (2, 16)
        for row, clip in enumerate(clips()):
            wav = float_wav(clip)
            tags = client.post("/predict?top_k=5", content=wav, headers={"content-type": "audio/wav"}).json()
            expected = np.zeros(5, np.float32)
            for tag in tags["results"][0]["tags"]:
                expected[tag["index"]] = tag["score"]
            np.testing.assert_allclose(out["scores"][row], expected, atol=1e-5)
            embedded = client.post("/embed", content=wav, headers={"content-type": "audio/wav"}).json()
            np.testing.assert_allclose(out["embedding"][row], embedded["results"][0]["embedding"], atol=1e-5)


def test_binary_tensors_in_and_out(make_client) -> None:
    request, raw = ragged_request(binary=True)
    request["outputs"] = [{"name": "embedding", "parameters": {"binary_data": True}}, {"name": "scores"}]
    header = json.dumps(request).encode()
    with make_client() as client:
        json_answer = client.post("/v2/models/toy-eat/infer", json=ragged_request()[0]).json()
        answer = client.post("/v2/models/toy-eat/infer", content=header + raw,
                             headers={"inference-header-content-length": str(len(header)),
                                      "content-type": "application/octet-stream"})
    assert answer.status_code == 200, answer.text
    size = int(answer.headers["inference-header-content-length"])
    head = json.loads(answer.content[:size])
    assert [o["name"] for o in head["outputs"]] == ["embedding", "scores"]
    embedding = np.frombuffer(answer.content[size:], "<f4").reshape(head["outputs"][0]["shape"])
    assert head["outputs"][0]["parameters"]["binary_data_size"] == embedding.nbytes
    reference = {o["name"]: o["data"] for o in json_answer["outputs"]}
    np.testing.assert_allclose(embedding.reshape(-1), reference["embedding"], atol=1e-6)
    np.testing.assert_allclose(head["outputs"][1]["data"], reference["scores"], atol=1e-6)


def test_other_rates_and_one_dimensional_waveforms(make_client) -> None:
    clip = clips()[0]
    with make_client() as client:
        at_16k = client.post("/v2/models/toy-eat/infer", json={"inputs": [
            {"name": "waveform", "shape": [len(clip)], "datatype": "FP32", "data": clip.tolist()}]})
        doubled = np.repeat(clip, 2)
        at_32k = client.post("/v2/models/toy-eat/infer", json={"parameters": {"sample_rate": 32_000}, "inputs": [
            {"name": "waveform", "shape": [1, len(doubled)], "datatype": "FP32", "data": doubled.tolist()}]})
    assert at_16k.status_code == at_32k.status_code == 200
    assert at_16k.json()["outputs"][0]["shape"] == [1, 5] and at_32k.json()["outputs"][0]["shape"] == [1, 5]


def _waveform(data: object, shape: object = None, datatype: str = "FP32") -> dict:
    return {"inputs": [{"name": "waveform", "shape": shape if shape is not None else [len(data)],  # type: ignore[arg-type]
                        "datatype": datatype, "data": data}]}


BAD_REQUESTS = [
    ("not json", {"content": b"{nope"}, 400),
    ("a list", {"json": [1, 2]}, 400),
    ("no inputs", {"json": {"inputs": []}}, 400),
    ("nameless input", {"json": {"inputs": [{"shape": [3], "datatype": "FP32", "data": [0, 0, 0]}]}}, 400),
    ("BYTES", {"json": _waveform(["a"], datatype="BYTES")}, 400),
    ("int waveform", {"json": _waveform([1, 2, 3], datatype="INT32")}, 400),
    ("3-d shape", {"json": _waveform([0.0] * 8, shape=[2, 2, 2])}, 400),
    ("negative shape", {"json": _waveform([0.0], shape=[-1])}, 400),
    ("count mismatch", {"json": _waveform([0.0] * 10, shape=[11])}, 400),
    ("strings as data", {"json": _waveform(["x"] * 3)}, 400),
    ("unknown input", {"json": {"inputs": [*_waveform([0.0])["inputs"],
                                           {"name": "x", "shape": [1], "datatype": "FP32", "data": [1]}]}}, 400),
    ("no waveform", {"json": {"inputs": [{"name": "num_samples", "shape": [1], "datatype": "INT64", "data": [1]}]}},
     400),
    ("num_samples too big", {"json": {"inputs": [*_waveform([0.0] * 4, shape=[1, 4])["inputs"],
                                                 {"name": "num_samples", "shape": [1], "datatype": "INT64",
                                                  "data": [5]}]}}, 400),
    ("unknown output", {"json": {**_waveform([0.1] * 800), "outputs": [{"name": "logits"}]}}, 400),
    ("bad rate", {"json": {**_waveform([0.1] * 800), "parameters": {"sample_rate": "fast"}}}, 400),
    ("too many clips", {"json": _waveform([0.1] * 17 * 800, shape=[17, 800])}, 400),
    ("header length too big", {"content": b"{}", "headers": {"inference-header-content-length": "99"}}, 400),
    ("binary size wrong", {"content": json.dumps({"inputs": [{"name": "waveform", "shape": [4], "datatype": "FP32",
                                                              "parameters": {"binary_data_size": 12}}]}).encode()
                           + b"\0" * 12, "header_length": True}, 400),
    ("empty clip", {"json": _waveform([], shape=[1, 0])}, 422),
    ("NaN", {"content": json.dumps(_waveform([float("nan")] * 800)).encode()}, 422),  # Python's JSON allows NaN
    ("too short", {"json": _waveform([0.1] * 10)}, 422),
]


@pytest.mark.parametrize(("case", "kwargs", "status"), BAD_REQUESTS, ids=[c[0] for c in BAD_REQUESTS])
def test_bad_requests_are_4xx_with_an_error(make_client, case: str, kwargs: dict, status: int) -> None:
    kwargs = dict(kwargs)
    if kwargs.pop("header_length", False):
        size = kwargs["content"].index(b"}]}") + 3
        kwargs["headers"] = {"inference-header-content-length": str(size)}
    with make_client() as client:
        answer = client.post("/v2/models/toy-eat/infer", **kwargs)
    assert answer.status_code == status, (case, answer.text)
    assert answer.json()["error"], case


def test_oversized_body_is_413_and_wrong_model_404(make_client) -> None:
    with make_client(max_upload_bytes=1000) as client:
        big = client.post("/v2/models/toy-eat/infer", json=_waveform([0.1] * 800))
        wrong = client.post("/v2/models/other/infer", json=_waveform([0.1] * 800))
    assert big.status_code == 413 and wrong.status_code == 404


def test_api_keys_guard_v2_but_not_its_health(make_client) -> None:
    with make_client(api_keys=["k1"]) as client:
        assert client.get("/v2/health/ready").status_code == 200
        assert client.get("/v2/models/toy-eat").status_code == 401
        assert client.post("/v2/models/toy-eat/infer", json=_waveform([0.1] * 800)).status_code == 401
        ok = client.post("/v2/models/toy-eat/infer", json=_waveform([0.1] * 800),
                         headers={"authorization": "Bearer k1"})
        assert ok.status_code == 200
