"""``eat.events``: events from overlapping windows, on synthetic window scores and end to end through
``Predictor`` and ``eat predict --events`` with a model whose scores the test controls."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from eat import Predictor
from eat.contract import Label
from eat.events import EventOptions, Thresholds, detect_events, read_thresholds
from eat.predict_cli import add_arguments, run

LABELS = (Label(0, "/m/03kmc9", "Siren"), Label(1, "/m/0bt9lr", "Dog"))
RATE = 16_000


def _toy_module():
    path = Path(__file__).resolve().parents[1] / "service" / "svc_toy_model.py"
    spec = importlib.util.spec_from_file_location("svc_toy_model_events", path)
    module = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(module)
    return module


def windows(duration_s: float, window_s: float, hop_s: float) -> tuple[np.ndarray, np.ndarray]:
    """Window spans as ``eat.contract.cut_windows`` lays them out (the last one cut at the clip's end)."""
    count = 1 + int(np.ceil(max(duration_s - window_s, 0) / hop_s))
    starts = np.arange(count) * hop_s
    return starts, np.minimum(starts + window_s, duration_s)


def ideal_scores(starts: np.ndarray, ends: np.ndarray, spans: list[tuple[int, float, float]]) -> np.ndarray:
    """Scores [W, 2] of a model that fires (0.9) on any window overlapping one of ``spans`` (class, on, off)."""
    scores = np.full((len(starts), len(LABELS)), 0.05, np.float32)
    for c, onset, offset in spans:
        scores[(starts < offset) & (ends > onset), c] = 0.9
    return scores


@pytest.mark.parametrize(("window_s", "hop_s"), [(2.0, 0.5), (1.0, 0.25), (10.0, 1.0)])
def test_an_interior_event_is_recovered_to_within_a_hop(window_s: float, hop_s: float) -> None:
    duration, onset, offset = 3 * window_s + 10, window_s + 3.0, window_s + 6.0
    starts, ends = windows(duration, window_s, hop_s)
    events = detect_events(ideal_scores(starts, ends, [(0, onset, offset)]), starts, ends, LABELS)
    assert [e.name for e in events] == ["Siren"]
    assert abs(events[0].onset_s - onset) <= hop_s and abs(events[0].offset_s - offset) <= hop_s
    assert events[0].peak_score == pytest.approx(0.9)


def test_the_issue_clip_siren_from_3_to_6_s_with_short_windows() -> None:
    starts, ends = windows(12.0, 1.0, 0.25)
    events = detect_events(ideal_scores(starts, ends, [(0, 3.0, 6.0)]), starts, ends, LABELS)
    assert len(events) == 1
    assert abs(events[0].onset_s - 3.0) <= 0.5 and abs(events[0].offset_s - 6.0) <= 0.5


def test_median_smoothing_bridges_a_window_that_misses() -> None:
    starts, ends = windows(20.0, 2.0, 0.5)
    scores = ideal_scores(starts, ends, [(0, 6.0, 12.0)])
    scores[np.flatnonzero(scores[:, 0] > 0.5)[5], 0] = 0.05  # one window in the middle misses
    smoothed = detect_events(scores, starts, ends, LABELS, options=EventOptions(merge_gap_s=0.0))
    raw = detect_events(scores, starts, ends, LABELS, options=EventOptions(median_windows=1, merge_gap_s=0.0))
    assert len(smoothed) == 1 and len(raw) == 2


def test_close_segments_merge_and_short_ones_drop() -> None:
    starts, ends = windows(30.0, 1.0, 0.25)
    scores = ideal_scores(starts, ends, [(0, 5.0, 8.0), (0, 9.5, 12.0), (0, 20.0, 20.5)])
    merged = detect_events(scores, starts, ends, LABELS, options=EventOptions(merge_gap_s=2.0))
    assert [(e.onset_s, e.offset_s) for e in merged] == [(5.0, 12.0), (20.0, 20.5)]
    apart = detect_events(scores, starts, ends, LABELS)  # the default gap (1 s) is under the 1.5 s one
    assert [(e.onset_s, e.offset_s) for e in apart] == [(5.0, 8.0), (9.5, 12.0), (20.0, 20.5)]
    long_only = detect_events(scores, starts, ends, LABELS, options=EventOptions(merge_gap_s=2.0, min_duration_s=1.0))
    assert [(e.onset_s, e.offset_s) for e in long_only] == [(5.0, 12.0)]


def test_without_overlap_a_one_window_sound_survives() -> None:
    starts, ends = windows(10.0, 1.0, 1.0)
    events = detect_events(ideal_scores(starts, ends, [(1, 4.2, 4.6)]), starts, ends, LABELS)
    assert [(e.name, e.onset_s, e.offset_s) for e in events] == [("Dog", 4.0, 5.0)]


def test_per_class_thresholds_fall_back_to_the_global_one(tmp_path: Path) -> None:
    starts, ends = windows(10.0, 1.0, 0.5)
    scores = ideal_scores(starts, ends, [(0, 2.0, 4.0), (1, 6.0, 8.0)])
    scores[scores == 0.9] = 0.6
    path = tmp_path / "thresholds.json"
    path.write_text(json.dumps({"default": 0.7, "classes": {"Siren": 0.5}}))
    thresholds = read_thresholds(path)
    found = detect_events(scores, starts, ends, LABELS, thresholds=thresholds.for_labels(LABELS))
    assert [e.name for e in found] == ["Siren"]  # Dog at 0.6 stays under the global 0.7
    by_id = Thresholds(0.7, {"/m/0bt9lr": 0.5}).for_labels(LABELS)
    assert [e.name for e in detect_events(scores, starts, ends, LABELS, thresholds=by_id)] == ["Dog"]
    assert [e.name for e in detect_events(scores, starts, ends, LABELS, thresholds=0.5)] == ["Siren", "Dog"]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", "cannot read"),
        ('{"default": 0.5, "extra": 1}', "expected"),
        ('{"classes": ["Siren"]}', "must map"),
        ('{"classes": {"Siren": 1.5}}', "in [0, 1]"),
        ('{"default": "high"}', "in [0, 1]"),
    ],
)
def test_malformed_threshold_files_are_refused(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "t.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        read_thresholds(path)


def test_a_threshold_for_an_unknown_class_is_an_error() -> None:
    with pytest.raises(ValueError, match="Cat"):
        Thresholds(0.5, {"Cat": 0.2}).for_labels(LABELS)


def test_option_checks() -> None:
    with pytest.raises(ValueError, match="odd"):
        EventOptions(median_windows=2)
    with pytest.raises(ValueError, match="negative"):
        EventOptions(merge_gap_s=-1)


# ---- end to end: a model whose scores the test controls --------------------------------------------------


@pytest.fixture(scope="module")
def detector(tmp_path_factory: pytest.TempPathFactory) -> Path:
    toy = _toy_module()
    return toy.build_toy_model(tmp_path_factory.mktemp("det") / "det.onnx", target_frames=192, detector=True,
                               name="toy-detector")


@pytest.fixture(scope="module")
def siren_wav(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("clips") / "siren.wav"
    sf.write(path, _toy_module().siren_scene(10.0, 3.0, 6.0), RATE, subtype="PCM_16")
    return path


def test_predictor_finds_the_siren_from_3_to_6_s(detector: Path, siren_wav: Path) -> None:
    with Predictor.from_onnx(detector, hop_seconds=0.5) as predictor:
        events = predictor.predict(siren_wav).events()
    sirens = [e for e in events if e.name == "Siren"]
    assert len(sirens) == 1
    assert abs(sirens[0].onset_s - 3.0) <= 0.5 and abs(sirens[0].offset_s - 6.0) <= 0.5
    assert sirens[0].peak_score > 0.99
    silences = [e for e in events if e.name == "Silence"]
    assert silences and all(e.offset_s <= 3.0 or e.onset_s >= 6.0 for e in silences)


def test_eat_predict_events(detector: Path, siren_wav: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import argparse

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert run(parser.parse_args([str(siren_wav), "--model", str(detector), "--hop", "0.5", "--events", "--json"])) == 0
    result = json.loads(capsys.readouterr().out)
    sirens = [e for e in result["events"] if e["name"] == "Siren"]
    assert len(sirens) == 1 and abs(sirens[0]["onset_s"] - 3.0) <= 0.5 and abs(sirens[0]["offset_s"] - 6.0) <= 0.5
    assert run(parser.parse_args([str(siren_wav), "--model", str(detector), "--hop", "0.5", "--events"])) == 0
    table = capsys.readouterr().out
    assert "events" in table and "Siren" in table
