"""The onnxruntime engine on the toy contract model: metadata, outputs, start-up failures."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest

from eat.contract import ContractError, parse_metadata
from eat.engine import EngineStartError, OnnxEngine


def test_metadata_and_outputs(toy_model_path: Path) -> None:
    engine = OnnxEngine(toy_model_path, provider="cpu", intra_op_threads=1)
    info = engine.info
    assert (info.model_name, info.provider, info.precision) == ("toy-eat", "cpu", "fp32")
    assert (info.window_samples, info.time_patches, info.freq_patches, info.embedding_dim) == (10_480, 4, 8, 16)
    assert info.has_classifier and [lab.id for lab in info.labels] == [f"/m/toy{i}" for i in range(5)]
    waveform = np.random.default_rng(0).normal(size=(3, 10_480)).astype(np.float32)
    num_samples = np.array([10_480, 5000, 400], np.int64)
    out = engine.run(waveform, num_samples, ("logits",))
    assert set(out) == {"logits"} and out["logits"].shape == (3, 5) and out["logits"].dtype == np.float32
    every = engine.run(waveform, num_samples, ("embedding", "tokens", "logits"))
    assert every["tokens"].shape == (3, 32, 16) and every["embedding"].shape == (3, 16)
    np.testing.assert_allclose(every["logits"], out["logits"], rtol=1e-6)
    other = engine.run(waveform, np.array([10_480, 10_480, 10_480], np.int64), ("embedding",))
    assert not np.allclose(other["embedding"][1:], every["embedding"][1:])  # num_samples reaches the model


def test_headless_model(headless_model_path: Path) -> None:
    engine = OnnxEngine(headless_model_path)
    assert not engine.info.has_classifier and engine.info.labels == ()


def test_missing_file_and_cuda_requests_fail_loudly(tmp_path: Path, toy_model_path: Path) -> None:
    with pytest.raises(EngineStartError, match="not found"):
        OnnxEngine(tmp_path / "absent.onnx")
    import onnxruntime

    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        with pytest.raises(EngineStartError, match="EAT_PROVIDER=cuda"):
            OnnxEngine(toy_model_path, provider="cuda")


def test_broken_contract_is_refused(tmp_path: Path, toy_model_path: Path) -> None:
    model = onnx.load(str(toy_model_path))
    meta = {p.key: p.value for p in model.metadata_props}
    del model.metadata_props[:]
    onnx.helper.set_model_props(model, {k: v for k, v in meta.items() if k != "eat.window_samples"})
    onnx.save(model, str(tmp_path / "broken.onnx"))
    with pytest.raises(EngineStartError, match="eat.window_samples"):
        OnnxEngine(tmp_path / "broken.onnx")
    (tmp_path / "junk.onnx").write_bytes(b"not a model")
    with pytest.raises(EngineStartError, match="cannot load"):
        OnnxEngine(tmp_path / "junk.onnx")


def test_parse_metadata_checks_labels_against_outputs() -> None:
    meta = {
        "eat.sample_rate": "16000",
        "eat.window_samples": "10480",
        "eat.target_frames": "64",
        "eat.embedding_dim": "16",
        "eat.num_classes": "2",
        "eat.labels": json.dumps([[0, "a", "A"], [1, "b", "B"]]),
    }
    info = parse_metadata(meta, provider="cpu", output_names=("embedding", "tokens", "logits"))
    assert info.num_classes == 2 and info.time_patches == 4
    with pytest.raises(ContractError, match="no 'logits' output"):
        parse_metadata(meta, provider="cpu", output_names=("embedding", "tokens"))
    with pytest.raises(ContractError, match="16000"):
        parse_metadata({**meta, "eat.sample_rate": "8000"}, provider="cpu", output_names=("embedding", "tokens"))
