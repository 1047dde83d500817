"""``eat extract`` and ``eat predict`` as a user runs them: parity with the official features and logits,
every layout, resuming, and bad files that are reported while the rest is written."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import soundfile as sf
from eat_cases import case_path

from eat import Predictor
from eat.contract import SAMPLE_RATE, sigmoid
from eat.extract import extract
from eat.inputs import list_inputs
from training import cli

TOLERANCE = 1e-4


def _eat(*args: object) -> int:
    return cli.main([str(a) for a in args])


def test_extract_frame_and_utterance_match_the_official_features(exact_onnx, official_io, case_dir, tmp_path):
    for granularity in ("frame", "utterance"):
        out = tmp_path / granularity
        assert _eat("extract", case_dir, out, "--model", exact_onnx, "--mode", "original", "--granularity",
                    granularity, "--no-progress") == 0
        assert (out / "sub" / "clip12.npy").is_file()  # the folder tree is mirrored
        for row, name in enumerate(str(n) for n in official_io["case_names"]):
            got = np.load(out / f"{name}.npy")
            want = official_io["finetune_features"][row]
            want = want[1:] if granularity == "frame" else want[0]
            assert got.dtype == np.float32 and got.shape == want.shape
            np.testing.assert_allclose(got, want, atol=TOLERANCE, rtol=0)


def test_extract_from_a_checkpoint_equals_the_onnx_file(exact_onnx, official, case_dir, tmp_path):
    """The same command on the fairseq file (PyTorch twin, window fitted to 1024 frames)."""
    clip = case_path(case_dir, "clip12")
    assert _eat("extract", clip, tmp_path / "pt.npy", "--model", official / "finetune.pt", "--mode", "original",
                "--granularity", "all", "--no-progress") == 0
    assert _eat("extract", clip, tmp_path / "onnx.npy", "--model", exact_onnx, "--mode", "original",
                "--granularity", "all", "--no-progress") == 0
    np.testing.assert_allclose(np.load(tmp_path / "pt.npy"), np.load(tmp_path / "onnx.npy"), atol=TOLERANCE)


def test_predict_original_prints_the_official_scores(exact_onnx, official_io, case_dir, capsys):
    names = [str(n) for n in official_io["all_case_names"]]
    files = [case_path(case_dir, n) for n in names]
    assert _eat("predict", *files, "--model", exact_onnx, "--mode", "original", "--json", "--top-k", 10) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == len(names)
    for line, name, logits in zip(lines, names, official_io["finetune_logits_all"], strict=True):
        result = json.loads(line)
        assert result["filename"].endswith(f"{name}.wav")
        want = sigmoid(logits)
        assert [t["index"] for t in result["tags"]] == np.argsort(-want, kind="stable").tolist()
        np.testing.assert_allclose([t["score"] for t in result["tags"]], np.sort(want)[::-1], atol=TOLERANCE)


def test_predict_table_timeline_and_threshold(ten_second_onnx, case_dir, capsys):
    assert _eat("predict", case_path(case_dir, "clip12"), "--model", ten_second_onnx, "--top-k", 3, "--timeline",
                "--hop", "5") == 0
    table = capsys.readouterr().out
    assert "clip12.wav  (12.00 s, 2 windows)" in table and "rank  score   label" in table
    assert "[    0.00 s -    10.00 s]" in table and "[    5.00 s -    12.00 s]" in table
    assert table.count("/m/fix") == 2 * 3 * 3  # 3 labels (name and id) for the clip and for each window
    assert _eat("predict", case_path(case_dir, "clip12"), "--model", ten_second_onnx, "--threshold", "1.0",
                "--json") == 0
    assert json.loads(capsys.readouterr().out)["tags"] == []


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """Six short clips in two sub-folders, plus a text file the extractor must ignore."""
    rng = np.random.default_rng(0)
    root = tmp_path / "clips"
    for i in range(6):
        path = root / f"part{i % 2}" / f"clip{i}.wav"
        path.parent.mkdir(parents=True, exist_ok=True)
        sf.write(path, (0.1 * rng.standard_normal(SAMPLE_RATE // 2)).astype(np.float32), SAMPLE_RATE)
    (root / "notes.txt").write_text("not audio")
    return root


def test_layouts_hold_the_same_arrays(ten_second_onnx, folder, tmp_path):
    assert _eat("extract", folder, tmp_path / "npy", "--model", ten_second_onnx, "--granularity", "time",
                "--no-progress") == 0
    assert _eat("extract", folder, tmp_path / "all.npz", "--model", ten_second_onnx, "--granularity", "time",
                "--no-progress") == 0
    assert _eat("extract", folder, tmp_path / "all.parquet", "--model", ten_second_onnx, "--granularity", "time",
                "--no-progress") == 0
    npz = np.load(tmp_path / "all.npz")
    table = pq.read_table(tmp_path / "all.parquet").to_pylist()
    assert sorted(npz.files) == [r["path"] for r in table] == sorted(i.rel for i in list_inputs(folder))
    assert not (tmp_path / "all.npz.parts").exists() and not (tmp_path / "all.parquet.parts").exists()
    for row in table:
        from_npy = np.load(tmp_path / "npy" / Path(row["path"]).with_suffix(".npy"))
        assert from_npy.shape == (3, 64) == tuple(row["shape"])  # 0.5 s = 48 frames = 3 rows of 160 ms
        np.testing.assert_array_equal(from_npy, npz[row["path"]])
        np.testing.assert_array_equal(from_npy.ravel(), np.asarray(row["embedding"], np.float32))


class _StopAfter:
    """Wraps a Predictor so that the n-th clip raises KeyboardInterrupt, as a user's Ctrl-C would."""

    def __init__(self, predictor: Predictor, n: int) -> None:
        self.predictor, self.left = predictor, n

    def embed(self, *args, **kwargs):
        if self.left == 0:
            raise KeyboardInterrupt
        self.left -= 1
        return self.predictor.embed(*args, **kwargs)


def test_an_interrupted_run_resumes_without_redoing_work(ten_second_onnx, folder, tmp_path):
    predictor = Predictor.from_onnx(ten_second_onnx, provider="cpu")
    inputs = list_inputs(folder)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        extract(_StopAfter(predictor, 3), inputs, out, granularity="utterance", progress=False)  # type: ignore[arg-type]
    written = sorted(out.rglob("*"))
    assert len([p for p in written if p.is_file()]) == 3 and not any(".tmp" in p.name for p in written)
    mtimes = {p: p.stat().st_mtime_ns for p in out.rglob("*.npy")}
    summary = extract(predictor, inputs, out, granularity="utterance", progress=False)
    assert (summary.written, summary.skipped, summary.failed) == (3, 3, [])
    assert all(p.stat().st_mtime_ns == t for p, t in mtimes.items())  # done files are not rewritten
    again = extract(predictor, inputs, out, granularity="utterance", progress=False)
    assert (again.written, again.skipped) == (0, 6)


def test_a_corrupt_file_is_reported_and_the_rest_written(ten_second_onnx, folder, tmp_path, capsys):
    (folder / "part1" / "broken.wav").write_bytes(b"RIFF" + bytes(range(256)) * 4)
    status = _eat("extract", folder, tmp_path / "out", "--model", ten_second_onnx, "--granularity", "mean",
                  "--no-progress")
    captured = capsys.readouterr()
    assert status == 1
    assert "broken.wav" in captured.err and "6 written, 0 already done, 1 failed" in captured.out
    assert len(list((tmp_path / "out").rglob("*.npy"))) == 6
    # A single-file layout keeps the finished clips in OUT.parts until every clip is done.
    assert _eat("extract", folder, tmp_path / "all.npz", "--model", ten_second_onnx, "--no-progress") == 1
    assert not (tmp_path / "all.npz").exists() and len(list((tmp_path / "all.npz.parts").rglob("*.npy"))) == 6


def test_clear_errors_for_bad_arguments(ten_second_onnx, folder, tmp_path, capsys):
    assert _eat("extract", tmp_path / "missing", tmp_path / "o", "--model", ten_second_onnx) == 2
    assert "no such file or folder" in capsys.readouterr().err
    assert _eat("extract", folder, tmp_path / "o", "--model", tmp_path / "none.onnx") == 2
    assert "model not found" in capsys.readouterr().err
    assert _eat("extract", folder, tmp_path / "o", "--model", ten_second_onnx, "--target-length", "512") == 2
    assert "exported for 1024 frames" in capsys.readouterr().err
    (folder / "part0" / "clip0.flac").write_bytes((folder / "part0" / "clip0.wav").read_bytes())
    assert _eat("extract", folder, tmp_path / "o", "--model", ten_second_onnx) == 2
    assert "would both be written to part0/clip0.npy" in capsys.readouterr().err
