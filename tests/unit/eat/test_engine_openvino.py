"""``EAT_PROVIDER=openvino``: the fp32 file in bf16 through OpenVINO keeps the official answers (within
the documented tolerance, same top-5), serves unchanged, and refuses what it cannot run with a reason."""

from __future__ import annotations

import json
import sys

import numpy as np
import openvino as ov
import pytest
from eat_cases import case_path
from fastapi.testclient import TestClient

from eat import Predictor
from eat.engine import EngineStartError, open_engine
from eat.engine_openvino import BF16_RELATIVE_TOLERANCE
from service.app import create_app
from service.settings import Settings
from training.cli import main as eat_main
from training.export import export_onnx

CPU_HAS_BF16 = "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")


def _top5(logits: np.ndarray) -> list[set[int]]:
    return [set(np.argsort(-row)[:5].tolist()) for row in logits]


@pytest.fixture(scope="module")
def official_logits_bf16(exact_onnx, official_io, case_dir) -> np.ndarray:
    predictor = Predictor.from_onnx(exact_onnx, provider="openvino")
    assert predictor.info.provider == "openvino"
    assert predictor.info.precision == ("bf16" if CPU_HAS_BF16 else "fp32")
    rows = []
    for name in (str(n) for n in official_io["all_case_names"]):
        clip = predictor.prepare(case_path(case_dir, name), mode="original")
        rows.append(predictor.run(clip.windows, ("logits",))["logits"][0])
    return np.stack(rows)


def test_bf16_logits_stay_within_the_tolerance_of_the_official(official_logits_bf16, official_io) -> None:
    want = official_io["finetune_logits_all"]
    scale = max(1.0, float(np.abs(want).max()))
    error = float(np.abs(official_logits_bf16 - want).max()) / scale
    print(f"openvino {'bf16' if CPU_HAS_BF16 else 'f32'}: max |logits - official| / max(1, max |official|) = "
          f"{error:.4f}")
    assert error <= BF16_RELATIVE_TOLERANCE
    assert _top5(official_logits_bf16) == _top5(want)


def test_the_service_serves_the_fp32_file_in_bf16(ten_second_onnx, case_dir) -> None:
    reference = Predictor.from_onnx(ten_second_onnx, provider="cpu")
    settings = Settings(model_path=ten_second_onnx, provider="openvino", max_batch=4, batch_buckets=[1, 2, 4],
                        queue_size=16)
    path = case_path(case_dir, "clip12")
    with TestClient(create_app(settings)) as client:
        model = client.get("/v1/model").json()
        assert (model["provider"], model["precision"]) == ("openvino", "bf16" if CPU_HAS_BF16 else "fp32")
        answer = client.post("/predict?top_k=5", files={"file": ("clip12.wav", path.read_bytes())})
        assert answer.status_code == 200, answer.text
        tags = answer.json()["results"][0]["tags"]
    want = reference.predict(path).tags(top_k=5)
    assert {t["index"] for t in tags} == {t.index for t in want}
    for got, expected in zip(sorted(tags, key=lambda t: t["index"]), sorted(want, key=lambda t: t.index),
                             strict=True):
        assert got["score"] == pytest.approx(expected.score, abs=BF16_RELATIVE_TOLERANCE)


def test_cli_predicts_with_openvino(ten_second_onnx, case_dir, capsys) -> None:
    path = case_path(case_dir, "clip12")
    assert eat_main(["predict", str(path), "--model", str(ten_second_onnx), "--json"]) == 0
    on_ort = capsys.readouterr().out
    assert eat_main(["predict", str(path), "--model", str(ten_second_onnx), "--json", "--provider", "openvino"]) == 0
    on_openvino = capsys.readouterr().out
    assert {t["index"] for t in json.loads(on_ort)["tags"]} == {t["index"] for t in json.loads(on_openvino)["tags"]}


def test_refusals_say_why(official, tmp_path, monkeypatch) -> None:
    fp16 = tmp_path / "fp16.onnx"
    export_onnx(official / "finetune.pt", fp16, fp16=True)
    with pytest.raises(EngineStartError, match="fp16; OpenVINO serving starts from the fp32 file"):
        open_engine(fp16, provider="openvino")
    with pytest.raises(EngineStartError, match="model file not found"):
        open_engine(tmp_path / "missing.onnx", provider="openvino")
    monkeypatch.setitem(sys.modules, "openvino", None)  # as if the extra were not installed
    with pytest.raises(EngineStartError, match=r"pip install 'eat-audio\[openvino\]'"):
        open_engine(fp16, provider="openvino")
