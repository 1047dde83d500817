"""Fixtures for the offline-inference tests: the official fine-tuned fixture exported to ONNX (two
windows: exactly 1024 frames, as the original crops, and the default 10 s), and its clips as files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from eat.contract import SAMPLE_RATE, window_samples_for
from training.export import export_onnx

EXACT_WINDOW_S = window_samples_for(1024) / SAMPLE_RATE  # 10.255 s: the original's 1024 frames exactly


@pytest.fixture(scope="session")
def official(fixtures_dir: Path) -> Path:
    return fixtures_dir / "eat-official"


@pytest.fixture(scope="session")
def official_io(official: Path) -> np.lib.npyio.NpzFile:
    return np.load(official / "io.npz")


@pytest.fixture(scope="session")
def exact_onnx(official: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("onnx") / "official-exact.onnx"
    export_onnx(official / "finetune.pt", out, window_seconds=EXACT_WINDOW_S)
    return out


@pytest.fixture(scope="session")
def ten_second_onnx(official: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("onnx") / "official-10s.onnx"
    export_onnx(official / "finetune.pt", out)
    return out


@pytest.fixture(scope="session")
def case_dir(fixtures_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The official cases as float WAV files (bit-exact samples), one sub-folder deep."""
    cases = np.load(fixtures_dir / "fbank" / "cases.npz")
    root = tmp_path_factory.mktemp("cases")
    (root / "sub").mkdir()
    for key in cases.files:
        if key.startswith("wav_"):
            name = key.removeprefix("wav_")
            folder = root / "sub" if name == "clip12" else root
            sf.write(folder / f"{name}.wav", cases[key], SAMPLE_RATE, subtype="FLOAT")
    return root

