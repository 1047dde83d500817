"""``/predict?events=true``: sound events with times over HTTP, thresholds from ``EAT_THRESHOLDS``."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import soundfile as sf
from svc_toy_model import siren_scene

from service.app import create_app
from service.settings import Settings


def siren_wav(seconds: float = 10.0) -> bytes:
    buffer = io.BytesIO()
    sf.write(buffer, siren_scene(seconds, 3.0, 6.0), 16_000, format="WAV", subtype="PCM_16")
    return buffer.getvalue()


def post(client, query: str, body: bytes):
    return client.post(f"/predict?{query}", content=body, headers={"content-type": "audio/wav"})


def test_events_of_the_siren_clip(make_client, detector_model_path: Path) -> None:
    with make_client(model_path=detector_model_path) as client:
        answer = post(client, "events=true&hop=0.5&timeline=true", siren_wav())
    assert answer.status_code == 200, answer.text
    result = answer.json()["results"][0]
    assert result["num_windows"] == len(result["timeline"]) == 18  # 10 s in 1.935 s windows, 0.5 s apart
    sirens = [e for e in result["events"] if e["name"] == "Siren"]
    assert len(sirens) == 1, result["events"]
    assert abs(sirens[0]["onset_s"] - 3.0) <= 0.5 and abs(sirens[0]["offset_s"] - 6.0) <= 0.5
    assert set(sirens[0]) == {"index", "id", "name", "onset_s", "offset_s", "peak_score"}


def test_without_events_the_answer_has_none(make_client, detector_model_path: Path) -> None:
    with make_client(model_path=detector_model_path) as client:
        result = post(client, "hop=0.5", siren_wav())
    assert result.status_code == 200 and result.json()["results"][0]["events"] is None


def test_thresholds_file_and_request_threshold(make_client, detector_model_path: Path, tmp_path: Path) -> None:
    path = tmp_path / "thresholds.json"
    path.write_text(json.dumps({"default": 0.5, "classes": {"Siren": 1.0}}))  # Siren can never reach 1.0
    with make_client(model_path=detector_model_path, thresholds=path) as client:
        names = {e["name"] for e in post(client, "events=true&hop=0.5", siren_wav()).json()["results"][0]["events"]}
        assert names == {"Silence"}
        lowered = post(client, "events=true&hop=0.5&event_threshold=0.99", siren_wav()).json()["results"][0]
        assert {e["name"] for e in lowered["events"]} == set()  # Silence peaks at 0.96 < 0.99; Siren kept at 1.0


@pytest.mark.parametrize(
    ("query", "status"),
    [("events=true&hop=0", 422), ("events=true&hop=5", 422), ("events=true&hop=x", 422),
     ("events=true&event_threshold=2", 422), ("events=maybe", 422)],
)
def test_bad_event_parameters_are_4xx(make_client, detector_model_path: Path, query: str, status: int) -> None:
    with make_client(model_path=detector_model_path) as client:
        answer = post(client, query, siren_wav(8.0))
    assert answer.status_code == status and answer.json()["error_type"] == "bad_request", answer.text


def test_a_threshold_for_a_class_the_model_lacks_stops_the_start(detector_model_path: Path, tmp_path: Path) -> None:
    from fastapi.testclient import TestClient

    path = tmp_path / "thresholds.json"
    path.write_text(json.dumps({"classes": {"Dog": 0.3}}))
    app = create_app(Settings(model_path=detector_model_path, thresholds=path, intra_op_threads=1, max_batch=8,
                              batch_buckets=[1, 2, 4, 8]))
    with pytest.raises(ValueError, match="Dog"), TestClient(app):
        pass
