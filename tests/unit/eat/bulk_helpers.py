"""Helpers for the bulk tests: generated clips, the service's toy ONNX model, and model openers that fail on
purpose (an interrupt half-way, a worker process that dies). The openers are pickled to Ray's workers by
value (``ray.cloudpickle.register_pickle_by_value``), since those workers cannot import the tests' folder."""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf

from eat import Predictor
from eat.contract import SAMPLE_RATE

_TOY_PATH = Path(__file__).resolve().parents[1] / "service" / "svc_toy_model.py"


def build_toy_model(path: Path, **options: object) -> Path:
    spec = importlib.util.spec_from_file_location("svc_toy_model", _TOY_PATH)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.build_toy_model(path, **options)


def write_clips(root: Path, count: int, *, seed: int = 0) -> list[Path]:
    """``count`` noise clips of 0.3-2.5 s (one to four toy-model windows) in three sub-folders."""
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        folder = root / f"g{i % 3}"
        folder.mkdir(parents=True, exist_ok=True)
        samples = (0.1 * rng.standard_normal(int(SAMPLE_RATE * rng.uniform(0.3, 2.5)))).astype(np.float32)
        paths.append(folder / f"clip{i:03d}.wav")
        sf.write(paths[-1], samples, SAMPLE_RATE)
    return paths


class Interrupted(RuntimeError):
    """Raised by ``FailingEngine``: stands for a job stopped half-way."""


class FailingEngine:
    """Wraps a real engine; raises ``Interrupted`` at its ``fail_at``-th call, or with ``crash_marker`` set,
    kills its own process at the first call of the first process to create the marker file."""

    def __init__(self, inner, *, fail_at: int | None, crash_marker: str | None) -> None:
        self.info = inner.info
        self._inner = inner
        self._calls = 0
        self._fail_at = fail_at
        self._crash_marker = crash_marker

    def run(self, waveform, num_samples, outputs):
        self._calls += 1
        if self._fail_at is not None and self._calls >= self._fail_at:
            raise Interrupted(f"stopped at engine call {self._calls}")
        if self._crash_marker is not None:
            try:
                fd = os.open(self._crash_marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                pass  # a restarted worker: run normally
            else:
                os.write(fd, str(os.getpid()).encode())
                os.close(fd)
                os._exit(1)  # as if the node were lost: no exception, no cleanup
        return self._inner.run(waveform, num_samples, outputs)

    def close(self) -> None:
        self._inner.close()


@dataclass(frozen=True)
class FailingOpener:
    """An ``eat.bulk.OpenPredictor`` whose engine fails as ``FailingEngine`` says."""

    model: str
    fail_at: int | None = None
    crash_marker: str | None = None

    def __call__(self, intra_op_threads: int) -> Predictor:
        real = Predictor.from_onnx(self.model, provider="cpu", intra_op_threads=intra_op_threads)
        return Predictor(FailingEngine(real.engine, fail_at=self.fail_at, crash_marker=self.crash_marker))
