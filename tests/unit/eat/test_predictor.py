"""``Predictor`` against the official EAT: logits and features of the official fixture, ONNX and its
PyTorch twin, the HTTP service, and the HEAR API built on it."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from eat_cases import case_path
from fastapi.testclient import TestClient

from eat import Predictor, hear
from eat.audio import InvalidAudio
from eat.contract import SAMPLE_RATE
from service.app import create_app
from service.settings import Settings

TOLERANCE = 1e-4  # fixtures README §4


def _original_logits(predictor: Predictor, path: Path) -> np.ndarray:
    clip = predictor.prepare(path, mode="original")
    assert len(clip.windows) == 1
    return predictor.run(clip.windows, ("logits",))["logits"][0]


@pytest.mark.parametrize("backend", ["onnx", "checkpoint"])
def test_original_mode_reproduces_the_official_logits(backend, exact_onnx, official, official_io, case_dir) -> None:
    if backend == "onnx":
        predictor = Predictor.from_onnx(exact_onnx, provider="cpu")
    else:  # window_seconds=None: the window is exactly the checkpoint's 1024 frames
        predictor = Predictor.from_checkpoint(official / "finetune.pt", window_seconds=None)
    names = [str(n) for n in official_io["all_case_names"]]
    got = np.stack([_original_logits(predictor, case_path(case_dir, n)) for n in names])
    diff = np.abs(got - official_io["finetune_logits_all"]).max(axis=1)
    print(f"{backend}: original-mode logits vs official, per case:", dict(zip(names, diff.round(7).tolist(),
                                                                                strict=True)))
    assert diff.max() <= TOLERANCE


def test_original_mode_features_match_the_official_features(exact_onnx, official_io, case_dir) -> None:
    predictor = Predictor.from_onnx(exact_onnx, provider="cpu")
    for row, name in enumerate(str(n) for n in official_io["case_names"]):
        features = predictor.embed(case_path(case_dir, name), granularity="all", mode="original").vector
        assert features.shape == official_io["finetune_features"][row].shape == (513, 64)
        np.testing.assert_allclose(features, official_io["finetune_features"][row], atol=TOLERANCE, rtol=0)
    for row, name in enumerate(str(n) for n in official_io["all_case_names"]):
        cls = predictor.embed(case_path(case_dir, name), granularity="utterance", mode="original").vector
        np.testing.assert_allclose(cls, official_io["finetune_cls_all"][row], atol=TOLERANCE, rtol=0)


def test_checkpoint_twin_gives_the_onnx_answers(ten_second_onnx, official) -> None:
    """Windows mode on a 23 s clip (3 windows, the last one short): same scores and embeddings."""
    rng = np.random.default_rng(0)
    wave = (0.1 * rng.standard_normal(23 * SAMPLE_RATE)).astype(np.float32)
    wave[5 * SAMPLE_RATE : 7 * SAMPLE_RATE] += 0.5 * np.sin(2 * np.pi * 880 * np.arange(2 * SAMPLE_RATE) / SAMPLE_RATE)
    onnx_p = Predictor.from_onnx(ten_second_onnx, provider="cpu", hop_seconds=5.0)
    torch_p = Predictor.from_checkpoint(official / "finetune.pt", hop_seconds=5.0)
    assert onnx_p.info.window_samples == torch_p.info.window_samples == 160_000
    a, b = onnx_p.predict(wave, sample_rate=SAMPLE_RATE), torch_p.predict(wave, sample_rate=SAMPLE_RATE)
    assert a.num_windows == b.num_windows == 4
    np.testing.assert_allclose(a.window_scores, b.window_scores, atol=TOLERANCE)
    for granularity in ("frame", "time", "mean", "utterance"):
        x = onnx_p.embed(wave, sample_rate=SAMPLE_RATE, granularity=granularity).vector
        y = torch_p.embed(wave, sample_rate=SAMPLE_RATE, granularity=granularity).vector
        assert x.shape == y.shape
        np.testing.assert_allclose(x, y, atol=TOLERANCE)


def test_windows_mode_takes_the_max_over_windows(ten_second_onnx) -> None:
    predictor = Predictor.from_onnx(ten_second_onnx, provider="cpu")
    rng = np.random.default_rng(1)
    wave = (0.05 * rng.standard_normal(25 * SAMPLE_RATE)).astype(np.float32)
    p = predictor.predict(wave, sample_rate=SAMPLE_RATE)
    assert p.num_windows == 3 and p.window_end_s.tolist() == [10.0, 20.0, 25.0]
    np.testing.assert_array_equal(p.scores, p.window_scores.max(axis=0))
    original = predictor.predict(wave, sample_rate=SAMPLE_RATE, mode="original")
    assert original.num_windows == 1
    np.testing.assert_allclose(original.scores, p.window_scores[0], atol=1e-6)
    assert [t.index for t in p.tags(top_k=3)] == list(np.argsort(-p.scores, kind="stable")[:3])


def test_inputs_path_bytes_and_arrays_agree(ten_second_onnx, case_dir) -> None:
    predictor = Predictor.from_onnx(ten_second_onnx, provider="cpu")
    path = case_path(case_dir, "clip3p3")
    wave, rate = sf.read(path, dtype="float32")
    stereo_48k = np.repeat(wave[:, None], 2, axis=1)  # a channels-last array at its own rate
    scores = [
        predictor.predict(path).scores,
        predictor.predict(path.read_bytes()).scores,
        predictor.predict(wave, sample_rate=rate).scores,
        predictor.predict(stereo_48k, sample_rate=rate).scores,
    ]
    for other in scores[1:]:
        np.testing.assert_array_equal(scores[0], other)
    with pytest.raises(ValueError, match="sample_rate"):
        predictor.predict(wave)
    with pytest.raises(InvalidAudio):
        predictor.predict(b"not audio at all" * 10)


def test_predictor_and_http_give_identical_answers(ten_second_onnx, case_dir) -> None:
    predictor = Predictor.from_onnx(ten_second_onnx, provider="cpu", hop_seconds=4.0)
    path = case_path(case_dir, "clip12")
    settings = Settings(model_path=ten_second_onnx, intra_op_threads=1, max_batch=4, batch_buckets=[1, 2, 4],
                        queue_size=16, hop_seconds=4.0)
    with TestClient(create_app(settings)) as client:
        answer = client.post("/predict?top_k=5&timeline=true", files={"file": ("clip12.wav", path.read_bytes())})
        assert answer.status_code == 200, answer.text
        result = answer.json()["results"][0]
        p = predictor.predict(path)
        assert result["num_windows"] == p.num_windows == 2  # 12 s, windows of 10 s every 4 s
        assert result["tags"] == [vars(t) for t in p.tags(top_k=5)]
        assert [w["tags"] for w in result["timeline"]] == [[vars(t) for t in w.tags] for w in p.timeline(top_k=5)]
        for pooling, granularity in (("frame", "frame"), ("all", "all"), ("cls", "utterance")):
            answer = client.post(f"/embed?pooling={pooling}", files={"file": ("clip12.wav", path.read_bytes())},
                                 headers={"accept": "application/x-npy"})
            assert answer.status_code == 200, answer.text
            via_http = np.load(io.BytesIO(answer.content))
            np.testing.assert_array_equal(via_http, predictor.embed(path, granularity=granularity).vector)


def test_hear_api_shapes_and_timestamps(exact_onnx) -> None:
    model = hear.load_model(str(exact_onnx))
    assert model.sample_rate == 16_000 and model.scene_embedding_size == model.timestamp_embedding_size == 64
    rng = np.random.default_rng(2)
    audio = torch.from_numpy((0.1 * rng.standard_normal((3, 3 * SAMPLE_RATE))).astype(np.float32))
    scene = hear.get_scene_embeddings(audio, model)
    assert isinstance(scene, torch.Tensor) and scene.shape == (3, 64)
    embeddings, stamps = hear.get_timestamp_embeddings(audio, model)
    rows = 19  # 3 s = 298 frames -> ceil(298 / 16) token rows
    assert embeddings.shape == (3, rows, 64) and stamps.shape == (3, rows)
    np.testing.assert_allclose(stamps[0].numpy(), 87.5 + 160.0 * np.arange(rows))
    # numpy in, numpy out; each sound is embedded on its own (batch position does not matter)
    single = hear.get_scene_embeddings(audio[1:2].numpy(), model)
    assert isinstance(single, np.ndarray)
    np.testing.assert_allclose(single[0], scene[1].numpy(), atol=1e-6)


def test_hear_timestamps_continue_across_windows(ten_second_onnx) -> None:
    model = hear.load_model(str(ten_second_onnx))
    audio = np.zeros((1, 12 * SAMPLE_RATE), np.float32)  # a 10 s window, then a 2 s one
    _, stamps = hear.get_timestamp_embeddings(audio, model)
    first = 63  # 998 frames -> 63 rows in the 10 s window; 2 s = 198 frames -> 13 rows in the next
    assert stamps.shape == (1, first + 13)
    assert stamps[0, first] == pytest.approx(10_000 + 87.5)
