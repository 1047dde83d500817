"""The standard APIs against a real server process, through the client libraries people use:
``tritonclient[http]`` for the Open Inference Protocol (KServe V2), ``openai`` for ``/v1/embeddings``."""

from __future__ import annotations

import base64
import io
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
import soundfile as sf
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException

KEY = "integration-key"
AUTH = {"Authorization": f"Bearer {KEY}"}


def auth() -> dict[str, str]:
    """A fresh headers dict: tritonclient adds its own entries to the one it is given."""
    return dict(AUTH)


@pytest.fixture(scope="module")
def server(toy_onnx: Path, tmp_path_factory: pytest.TempPathFactory, start_server):
    env = {"EAT_MODEL_PATH": str(toy_onnx), "EAT_API_KEYS": KEY, "EAT_MAX_BATCH": "4", "EAT_BATCH_BUCKETS": "1,2,4"}
    with start_server(["-m", "service.server"], env, tmp_path_factory.mktemp("std")) as running:
        yield running


def clip(seconds: float, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(0, 0.1, round(seconds * 16_000)).astype(np.float32)


def float_wav(samples: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    sf.write(buffer, samples, 16_000, format="WAV", subtype="FLOAT")
    return buffer.getvalue()


def predict_scores(url: str, samples: np.ndarray) -> np.ndarray:
    answer = httpx.post(f"{url}/predict?top_k=5", content=float_wav(samples),
                        headers={**AUTH, "content-type": "audio/wav"}, timeout=30)
    scores = np.zeros(5, np.float32)
    for tag in answer.json()["results"][0]["tags"]:
        scores[tag["index"]] = tag["score"]
    return scores


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_tritonclient_infer(server, binary: bool) -> None:
    client = triton.InferenceServerClient(url=server.url.removeprefix("http://"))
    try:
        assert client.is_server_live() and client.is_server_ready()
        assert client.is_model_ready("toy-eat", headers=auth())
        meta = client.get_model_metadata("toy-eat", headers=auth())
        assert [o["name"] for o in meta["outputs"]] == ["scores", "embedding"]
        a, b = clip(1.5, 1), clip(0.4, 2)
        waveform = np.zeros((2, len(a)), np.float32)
        waveform[0], waveform[1, : len(b)] = a, b
        inputs = [triton.InferInput("waveform", list(waveform.shape), "FP32"),
                  triton.InferInput("num_samples", [2], "INT64")]
        inputs[0].set_data_from_numpy(waveform, binary_data=binary)
        inputs[1].set_data_from_numpy(np.array([len(a), len(b)], np.int64), binary_data=binary)
        outputs = [triton.InferRequestedOutput("scores", binary_data=binary),
                   triton.InferRequestedOutput("embedding", binary_data=binary)]
        result = client.infer("toy-eat", inputs, outputs=outputs, headers=auth(), request_id="req-7")
        scores, embedding = result.as_numpy("scores"), result.as_numpy("embedding")
        assert result.get_response()["id"] == "req-7"
        assert scores.shape == (2, 5) and embedding.shape == (2, 16)
        np.testing.assert_allclose(scores[0], predict_scores(server.url, a), atol=1e-5)
        np.testing.assert_allclose(scores[1], predict_scores(server.url, b), atol=1e-5)
        with pytest.raises(InferenceServerException, match="unknown outputs"):
            client.infer("toy-eat", inputs, outputs=[triton.InferRequestedOutput("logits")], headers=auth())
        with pytest.raises(InferenceServerException, match="API key"):
            client.infer("toy-eat", inputs)
        with pytest.raises(InferenceServerException, match="no model"):
            client.infer("someone-else", inputs, headers=auth())
    finally:
        client.close()


def test_openai_embeddings(server) -> None:
    data = [float_wav(clip(1.0, 3)), float_wav(clip(2.0, 4))]
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0)
    try:
        # The client asks for base64 by default and decodes it; ask for floats once as well.
        packed = client.embeddings.create(model="toy-eat", input=[base64.b64encode(d).decode() for d in data])
        plain = client.embeddings.create(model="toy-eat", encoding_format="float",
                                         input=["data:audio/wav;base64," + base64.b64encode(data[0]).decode()])
        assert [e.index for e in packed.data] == [0, 1] and packed.model == "toy-eat"
        assert packed.usage.prompt_tokens == 7 + 13
        reference = httpx.post(f"{server.url}/embed", content=data[0], headers={**AUTH, "content-type": "audio/wav"},
                               timeout=30).json()["results"][0]["embedding"]
        np.testing.assert_allclose(packed.data[0].embedding, reference, atol=1e-6)
        np.testing.assert_allclose(plain.data[0].embedding, reference, atol=1e-6)
        with pytest.raises(openai.BadRequestError):
            client.embeddings.create(model="toy-eat", input="not base64 at all!")
        with pytest.raises(openai.NotFoundError):
            client.embeddings.create(model="text-embedding-3-small", input=base64.b64encode(data[0]).decode())
    finally:
        client.close()
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0).embeddings.create(
            model="toy-eat", input=base64.b64encode(data[0]).decode())
