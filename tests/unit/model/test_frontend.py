"""The log-mel front end against EAT's own features (../shared/fixtures/fbank, README §1).

Measured differences are printed (``pytest -s`` or ``-rA`` shows them): the lead quotes them.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from model.config import NORM_STATS, FrontendConfig
from model.frontend import FrontendError, LogMelFrontend, kaldi_mel_banks, num_frames

EPS32 = float(np.finfo(np.float32).eps)
AUDIOSET_PAD = 0.467060626  # (0 - (-4.268)) / (2 * 4.569) in float32, fixtures README §1


@pytest.fixture(scope="module")
def cases(fixtures_dir: Path) -> dict[str, dict[str, np.ndarray]]:
    """Every fixture case: wav, fbank (torchaudio float32), fbank64, eat, and pcm16 where present."""
    meta = json.loads((fixtures_dir / "fbank" / "cases.json").read_text())
    with np.load(fixtures_dir / "fbank" / "cases.npz") as npz:
        arrays = {key: npz[key] for key in npz.files}
    out = {}
    for case in meta["cases"]:
        name = case["name"]
        out[name] = {kind: arrays[f"{kind}_{name}"] for kind in ("wav", "fbank", "fbank64", "eat")}
        if f"pcm16_{name}" in arrays:
            out[name]["pcm16"] = arrays[f"pcm16_{name}"]
        assert out[name]["fbank64"].shape[0] == case["n_frames"]
    return out


CASE_NAMES = ["noise10", "sine440", "clip3p3", "clip0p7", "clip12", "silence2", "int16clip"]


@pytest.fixture(scope="module")
def frontend() -> LogMelFrontend:
    return LogMelFrontend().eval()


def numpy_fbank(wav: np.ndarray) -> np.ndarray:
    """Independent float64 Kaldi fbank (numpy FFT, reference §1.1-1.2) for lengths the fixtures lack."""
    x = wav.astype(np.float64)
    x = x - x.mean()
    count = 1 + (len(x) - 400) // 160 if len(x) >= 400 else 0
    frames = x[np.arange(count)[:, None] * 160 + np.arange(400)[None, :]]
    frames = frames - frames.mean(axis=1, keepdims=True)
    frames = frames - 0.97 * np.concatenate([frames[:, :1], frames[:, :-1]], axis=1)
    frames = frames * np.hanning(400)  # symmetric Hann
    power = np.abs(np.fft.rfft(frames, 512)) ** 2  # [T, 257]

    def mel(hz: np.ndarray) -> np.ndarray:
        return 1127.0 * np.log1p(hz / 700.0)

    points = np.linspace(mel(np.array(20.0)), mel(np.array(8000.0)), 130)
    bin_mel = mel(np.arange(256) * 31.25)[:, None]
    rising = (bin_mel - points[None, :-2]) / (points[None, 1:-1] - points[None, :-2])
    falling = (points[None, 2:] - bin_mel) / (points[None, 2:] - points[None, 1:-1])
    banks = np.vstack([np.maximum(0.0, np.minimum(rising, falling)), np.zeros((1, 128))])
    return np.log(np.maximum(power @ banks, EPS32))


def run_fbank(fe: LogMelFrontend, wav: np.ndarray) -> tuple[np.ndarray, int]:
    logmel, count = fe.fbank(torch.from_numpy(wav)[None], torch.tensor([len(wav)]))
    assert logmel.dtype == torch.float32 and count.dtype == torch.int64
    return logmel[0].numpy(), int(count[0])


def run_forward(fe: LogMelFrontend, wav: np.ndarray) -> np.ndarray:
    out = fe(torch.from_numpy(wav)[None], torch.tensor([len(wav)]))
    assert out.shape == (1, 1, fe.target_frames, 128) and out.dtype == torch.float32
    return out[0, 0].numpy()


# --- parity with the fixtures --------------------------------------------------------------------


@pytest.mark.parametrize("name", CASE_NAMES)
def test_fbank_matches_float64_reference_and_torchaudio(name, cases, frontend):
    case = cases[name]
    logmel, count = run_fbank(frontend, case["wav"])
    assert count == case["fbank64"].shape[0] == num_frames(len(case["wav"]))
    assert logmel.shape == case["fbank64"].shape
    diff64 = np.abs(logmel.astype(np.float64) - case["fbank64"])
    diff32 = np.abs(logmel - case["fbank"])
    print(
        f"[frontend] {name}: fbank vs fbank64 max {diff64.max():.2e}; vs torchaudio f32 max "
        f"{diff32.max():.2e} mean {diff32.mean():.2e}"
    )
    # Computed in float64 and rounded once, so far inside the 1e-3 budget; this catches a
    # regression to a float32 DFT (1.6e-3 on sine440).
    assert diff64.max() <= 1e-5
    assert diff32.max() <= 3e-3
    assert diff32.mean() <= 1e-5


@pytest.mark.parametrize("name", CASE_NAMES)
def test_forward_matches_eat_front_end(name, cases, frontend):
    case = cases[name]
    out = run_forward(frontend, case["wav"])
    num_content = min(case["fbank64"].shape[0], 1024)
    diff = np.abs(out - case["eat"])
    pad_diff = np.abs(out[num_content:] - case["eat"][num_content:])
    print(
        f"[frontend] {name}: forward vs eat max {diff.max():.2e}; padded rows {1024 - num_content}, "
        f"max {pad_diff.max() if pad_diff.size else 0.0:.2e}"
    )
    assert diff.max() <= 3e-4
    if pad_diff.size:
        assert pad_diff.max() <= 1e-6
        np.testing.assert_allclose(out[num_content:], AUDIOSET_PAD, atol=1e-6)
    # the content rows are the clip's first frames: a shifted crop would be far off
    expected = (case["fbank64"][:num_content] + 4.268) / (2 * 4.569)
    np.testing.assert_allclose(out[:num_content], expected, atol=1e-5)


def test_int16_clip_is_read_as_float(cases, frontend):
    case = cases["int16clip"]
    assert case["pcm16"].dtype == np.int16
    as_float = case["pcm16"].astype(np.float32) / 32768.0
    np.testing.assert_array_equal(as_float, case["wav"])
    np.testing.assert_allclose(run_forward(frontend, as_float), case["eat"], atol=3e-4)
    with pytest.raises(FrontendError, match="32768"):
        frontend(torch.from_numpy(case["pcm16"])[None], torch.tensor([len(case["pcm16"])]))


# --- padding, batching and lengths ---------------------------------------------------------------


def test_batched_rows_equal_each_clip_alone(cases, frontend):
    """Rows of different valid lengths, padded with garbage to one S, match each clip on its own."""
    clips = [cases[n]["wav"] for n in ("clip12", "clip3p3", "clip0p7", "silence2", "int16clip")]
    clips += [cases["noise10"]["wav"][:399], cases["noise10"]["wav"][:0]]  # < 1 frame, empty
    width = 170_000  # clip12 is longer (crop path), the rest shorter
    rng = np.random.default_rng(0)
    batch = rng.normal(0.0, 5.0, (len(clips), width)).astype(np.float32)
    batch[:, -7:] = np.nan  # padding is ignored, whatever it holds
    for row, clip in enumerate(clips):
        batch[row, : len(clip)] = clip[:width]
    counts = torch.tensor([len(c) for c in clips])  # clip12's count exceeds S: clamped
    logmel, frame_counts = frontend.fbank(torch.from_numpy(batch), counts)
    out = frontend(torch.from_numpy(batch), counts)
    assert torch.isfinite(out).all() and torch.isfinite(logmel).all()
    expected_counts = [num_frames(min(len(c), width)) for c in clips]
    assert frame_counts.tolist() == expected_counts
    worst = 0.0
    for row, clip in enumerate(clips):
        clip = clip[:width]
        alone = run_forward(frontend, clip)
        worst = max(worst, float(np.abs(out[row, 0].numpy() - alone).max()))
        alone_logmel, _ = run_fbank(frontend, clip)
        np.testing.assert_allclose(logmel[row, : len(alone_logmel)].numpy(), alone_logmel, atol=1e-5)
        assert (logmel[row, len(alone_logmel) :] == 0).all()
    print(f"[frontend] batched vs alone: max {worst:.2e}")
    assert worst <= 1e-5


@pytest.mark.parametrize(
    ("seconds", "target_frames"), [(0.5, 1024), (3.0, 1024), (10.0, 1024), (120.0, 12288), (120.0, 1024)]
)
def test_lengths_against_independent_numpy_reference(seconds, target_frames):
    num_samples = int(seconds * 16_000)
    rng = np.random.default_rng(int(seconds * 10))
    t = np.arange(num_samples) / 16_000
    tone = 0.3 * np.sin(2 * np.pi * 700 * t) * (1 + np.sin(2 * np.pi * 0.3 * t))  # AM tone
    wav = (tone + rng.normal(0, 0.03, num_samples)).astype(np.float32)
    fe = LogMelFrontend(FrontendConfig(target_frames=target_frames))
    reference = numpy_fbank(wav)
    out = run_forward(fe, wav)
    num_content = min(len(reference), target_frames)
    expected = np.zeros((target_frames, 128))
    expected[:num_content] = reference[:num_content]
    expected = (expected + 4.268) / (2 * 4.569)
    diff = np.abs(out - expected).max()
    print(f"[frontend] {seconds} s, target {target_frames}: {len(reference)} frames, vs numpy max {diff:.2e}")
    assert diff <= 1e-5


def test_num_samples_zero_or_out_of_range(frontend):
    width = 16_000
    wav = torch.randn(4, width) * 0.1
    counts = torch.tensor([0, -5, width + 1000, 300])
    out = frontend(wav, counts)
    np.testing.assert_allclose(out[[0, 1, 3]].numpy(), AUDIOSET_PAD, atol=1e-6)
    full = frontend(wav[2:3], torch.tensor([width]))
    torch.testing.assert_close(out[2:3], full, rtol=0, atol=1e-6)
    logmel, counts_out = frontend.fbank(wav, counts)
    assert counts_out.tolist() == [0, 0, num_frames(width), 0]
    assert logmel.shape == (4, num_frames(width), 128)


def test_shorter_than_one_window():
    fe = LogMelFrontend(FrontendConfig(target_frames=32))
    logmel, counts = fe.fbank(torch.randn(2, 399), torch.tensor([399, 399]))
    assert logmel.shape == (2, 0, 128) and counts.tolist() == [0, 0]
    out = fe(torch.randn(2, 100), torch.tensor([100, 50]))
    assert out.shape == (2, 1, 32, 128)
    np.testing.assert_allclose(out.numpy(), AUDIOSET_PAD, atol=1e-6)


PRESET_CASES = [("esc50", 512, 0.6183), ("spcv2", 128, 0.6151)]  # pad values: reference §1.4 table


@pytest.mark.parametrize(("preset", "target_frames", "pad_value"), PRESET_CASES)
def test_normalisation_presets(preset, target_frames, pad_value, cases):
    mean, std = NORM_STATS[preset]
    fe = LogMelFrontend(FrontendConfig.preset(preset, target_frames))
    case = cases["clip0p7"]  # 68 frames: content, then padding
    out = run_forward(fe, case["wav"])
    assert out.shape == (target_frames, 128)
    np.testing.assert_allclose(out[68:], -mean / (2 * std), atol=1e-6)
    np.testing.assert_allclose(out[68:], pad_value, atol=1e-4)
    np.testing.assert_allclose(out[:68], (case["fbank64"] - mean) / (2 * std), atol=1e-5)


# --- building blocks -----------------------------------------------------------------------------


def test_num_frames_formula():
    counts = torch.arange(0, 2000)
    expected = [1 + (n - 400) // 160 if n >= 400 else 0 for n in range(2000)]
    assert num_frames(counts).tolist() == expected
    assert [num_frames(n) for n in range(2000)] == expected
    assert (num_frames(160_000), num_frames(80_000), num_frames(16_000)) == (998, 498, 98)
    assert num_frames(FrontendConfig(target_frames=1024).window_samples) == 1024


def test_mel_banks_shape_and_kaldi_properties():
    banks = kaldi_mel_banks()
    assert banks.shape == (257, 128)
    assert (banks[256] == 0).all() and (banks[0] == 0).all()  # Nyquist weight 0; DC is below 20 Hz
    assert banks.min() >= 0 and banks.max() <= 1.0
    assert banks.max(dim=0).values.min() < 0.5 < banks.max()  # peaks are not renormalised
    # The narrowest low triangle (filter 3) falls between two FFT bins: Kaldi leaves it empty, so
    # it sits at the log floor in every fixture case.
    assert torch.nonzero(banks.sum(dim=0) == 0).flatten().tolist() == [3]
    peaks = banks.argmax(dim=0)[banks.sum(dim=0) > 0]  # triangles move up in frequency
    assert (peaks[1:] >= peaks[:-1]).all()


def test_constants_are_not_state_and_survive_dtype_casts(cases):
    fe = LogMelFrontend()
    assert fe.state_dict() == {}
    fe.half()
    assert fe.dft.dtype == torch.float64 and fe.mel_banks.dtype == torch.float64
    case = cases["sine440"]
    np.testing.assert_allclose(run_fbank(fe, case["wav"])[0], case["fbank64"], atol=1e-5)


def test_autocast_does_not_lower_precision(cases, frontend):
    """Training runs under autocast; the float64 spectral path must not be cast down."""
    case = cases["sine440"]
    wav, count = torch.from_numpy(case["wav"])[None], torch.tensor([len(case["wav"])])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logmel, _ = frontend.fbank(wav, count)
        out = frontend(wav, count)
    assert logmel.dtype == out.dtype == torch.float32
    np.testing.assert_allclose(logmel[0].numpy(), case["fbank64"], atol=1e-5)
    np.testing.assert_allclose(out[0, 0].numpy(), case["eat"], atol=3e-4)


def test_bad_inputs_raise_frontend_error(frontend):
    with pytest.raises(FrontendError, match=r"\[batch, samples\]"):
        frontend(torch.zeros(16_000), torch.tensor([16_000]))
    with pytest.raises(FrontendError, match="entries for a batch"):
        frontend(torch.zeros(2, 16_000), torch.tensor([16_000]))
    with pytest.raises(FrontendError, match="integer"):
        frontend(torch.zeros(1, 16_000), torch.tensor([16_000.0]))
    with pytest.raises(FrontendError, match="integer"):
        frontend(torch.zeros(1, 16_000), 16_000)
    assert issubclass(FrontendError, ValueError)


# --- export --------------------------------------------------------------------------------------


def test_onnx_round_trip_with_dynamic_batch(tmp_path, cases):
    ort = pytest.importorskip("onnxruntime")
    cfg = FrontendConfig(target_frames=64)  # small window keeps the export quick
    fe = LogMelFrontend(cfg).eval()
    width = cfg.window_samples
    batch = torch.export.Dim("batch", min=1, max=256)
    example = (torch.randn(2, width) * 0.1, torch.tensor([width, 3000]))
    program = torch.onnx.export(
        fe,
        example,
        input_names=["waveform", "num_samples"],
        output_names=["fbank"],
        dynamo=True,
        opset_version=18,
        dynamic_shapes={"waveform": {0: batch}, "num_samples": {0: batch}},
    )
    path = tmp_path / "frontend.onnx"
    program.save(str(path))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    inputs = {i.name: i for i in session.get_inputs()}
    assert isinstance(inputs["waveform"].shape[0], str) and inputs["waveform"].type == "tensor(float)"
    assert inputs["num_samples"].type == "tensor(int64)"

    speech = cases["sine440"]["wav"][: 5 * width].reshape(5, width)
    worst = 0.0
    for rows, counts in ((speech[:1], [width]), (speech, [width, 5000, 0, width + 99, 10_000])):
        got = session.run(None, {"waveform": rows, "num_samples": np.array(counts, dtype=np.int64)})[0]
        want = fe(torch.from_numpy(rows), torch.tensor(counts)).numpy()
        assert got.shape == want.shape == (len(rows), 1, 64, 128) and got.dtype == np.float32
        worst = max(worst, float(np.abs(got - want).max()))
    print(f"[frontend] onnxruntime vs torch: max {worst:.2e}")
    assert worst <= 1e-4


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_matches_cpu(cases):
    case = cases["sine440"]
    fe = LogMelFrontend().cuda()
    wav = torch.from_numpy(case["wav"])[None]
    out = fe(wav.cuda(), torch.tensor([len(case["wav"])]).cuda()).cpu().numpy()[0, 0]
    np.testing.assert_allclose(out, case["eat"], atol=3e-4)
    np.testing.assert_allclose(out, run_forward(LogMelFrontend(), case["wav"]), atol=1e-5)
