"""Helpers for the service tests: a controllable engine wrapper and test-audio encoders."""

from __future__ import annotations

import io
import threading
import time

import av
import numpy as np
import soundfile as sf

from eat.contract import ModelInfo
from eat.engine import OnnxEngine


class GatedEngine:
    """Wraps a real engine; records every call and can be held (gate) or made to sleep or fail.

    The gate makes overload, deadline and batching tests deterministic: while it is closed the
    engine thread blocks inside ``run``, so the queue fills exactly as the test decides.
    """

    def __init__(self, inner: OnnxEngine, *, delay_s: float = 0.0) -> None:
        self.inner = inner
        self.info: ModelInfo = inner.info
        self.delay_s = delay_s
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()  # set when a call has started (and is maybe held at the gate)
        self.calls: list[tuple[int, int, tuple[str, ...]]] = []  # (rows incl. padding, real rows, outputs)
        self.seen_waveforms: list[np.ndarray] = []
        self.fail_next = False
        self.closed = False

    def run(self, waveform: np.ndarray, num_samples: np.ndarray, outputs: tuple[str, ...]) -> dict[str, np.ndarray]:
        self.entered.set()
        self.gate.wait(timeout=10)
        if self.delay_s:
            time.sleep(self.delay_s)
        real = int((np.abs(waveform).sum(axis=1) > 0).sum())
        self.calls.append((len(waveform), real, outputs))
        self.seen_waveforms.append(waveform.copy())
        if self.fail_next:
            self.fail_next = False
            raise RuntimeError("simulated onnxruntime failure")
        return self.inner.run(waveform, num_samples, outputs)

    def close(self) -> None:
        self.closed = True


# ---- test audio -----------------------------------------------------------------------------------------
def sine(seconds: float, rate: int, freq_hz: float = 440.0, channels: int = 1, amplitude: float = 0.3) -> np.ndarray:
    t = np.arange(round(seconds * rate)) / rate
    x = (amplitude * np.sin(2 * np.pi * freq_hz * t)).astype(np.float32)
    return x if channels == 1 else np.stack([x] * channels, axis=1)


def encode_soundfile(data: np.ndarray, rate: int, fmt: str, subtype: str) -> bytes:
    buffer = io.BytesIO()
    sf.write(buffer, data, rate, format=fmt, subtype=subtype)
    return buffer.getvalue()


def encode_pyav(data: np.ndarray, rate: int, container: str, codec: str) -> bytes:
    """``data`` [S] or [S, C] float32 -> bytes of the container (e.g. ipod/aac = .m4a)."""
    planes = np.ascontiguousarray(data.T if data.ndim == 2 else data[None])  # [C, S]
    layout = "mono" if planes.shape[0] == 1 else "stereo"
    buffer = io.BytesIO()
    with av.open(buffer, "w", format=container) as out:
        stream = out.add_stream(codec, rate=rate, layout=layout)
        frame = av.AudioFrame.from_ndarray(planes, format="fltp", layout=layout)
        frame.sample_rate = rate
        for packet in stream.encode(frame):
            out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    return buffer.getvalue()


def wav_bytes(seconds: float = 1.0, rate: int = 16_000) -> bytes:
    return encode_soundfile(sine(seconds, rate), rate, "WAV", "PCM_16")
