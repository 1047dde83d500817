"""Synthetic scenes: deterministic per seed, EAT-format output, and sounds that match their labels."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from training.data import synthetic
from training.data.manifest import read_labels_csv, read_weights
from training.data.splits import load_split

SR = synthetic.SAMPLE_RATE


def _index(name: str) -> int:
    return next(i for i, c in enumerate(synthetic.CLASSES) if c.name == name)


def _spectrum(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    power = np.abs(np.fft.rfft(x * np.hanning(len(x)))) ** 2
    return np.fft.rfftfreq(len(x), 1 / SR), power


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> synthetic.SyntheticData:
    return synthetic.generate(tmp_path_factory.mktemp("syn") / "a", num_train=12, num_eval=4, clip_seconds=1.0,
                              seed=7)


def test_writes_an_eat_data_directory(generated: synthetic.SyntheticData) -> None:
    train = load_split(generated.data_dir, "train", weights=generated.weights)
    evaluation = load_split(generated.data_dir, "eval")
    assert len(train) == 12 and len(evaluation) == 4
    assert train.num_classes == len(synthetic.CLASSES) >= 14
    assert all(1 <= len(it.targets) <= 3 for it in train.items)
    assert train.weights is not None and len(train.weights) == 12
    info = sf.info(str(train.items[0].path))
    assert (info.samplerate, info.channels, info.frames, info.subtype) == (SR, 1, SR, "PCM_16")
    assert train.items[0].num_samples == SR
    # Weights: rarer classes weigh more (1000 / count per label, summed over the clip's labels).
    counts = np.bincount([t for it in train.items for t in it.targets], minlength=train.num_classes)
    expected = [sum(1000 / (counts[t] + 0.01) for t in it.targets) for it in train.items]
    np.testing.assert_allclose(read_weights(generated.weights), expected, rtol=1e-5)


def test_same_seed_same_bytes_other_seed_other_audio(generated: synthetic.SyntheticData, tmp_path: Path) -> None:
    again = synthetic.generate(tmp_path / "b", num_train=12, num_eval=4, clip_seconds=1.0, seed=7)
    for name in ("train.lbl", "eval.lbl", "labels.csv", "weight_train_all.csv"):
        assert (again.data_dir / name).read_bytes() == (generated.data_dir / name).read_bytes()
    for split in ("train", "eval"):
        for wav in sorted((generated.data_dir / "audio" / split).glob("*.wav")):
            assert (again.data_dir / "audio" / split / wav.name).read_bytes() == wav.read_bytes()
    # Clip i does not depend on how many clips are generated.
    fewer = synthetic.generate(tmp_path / "c", num_train=3, num_eval=1, clip_seconds=1.0, seed=7)
    assert (fewer.data_dir / "audio/train/train_000002.wav").read_bytes() == \
        (generated.data_dir / "audio/train/train_000002.wav").read_bytes()
    other = synthetic.generate(tmp_path / "d", num_train=3, num_eval=1, clip_seconds=1.0, seed=8)
    a, _ = sf.read(other.data_dir / "audio/train/train_000000.wav")
    b, _ = sf.read(generated.data_dir / "audio/train/train_000000.wav")
    assert not np.array_equal(a, b)


def test_labels_are_real_audioset_classes(generated: synthetic.SyntheticData, shared_dir: Path) -> None:
    with open(shared_dir / "data" / "audioset_labels.csv", newline="") as f:
        audioset = {row[1]: row[2] for row in csv.reader(f)}
    labels = read_labels_csv(generated.labels_csv)
    assert [lb.index for lb in labels] == list(range(len(labels)))
    for label in labels:
        assert audioset.get(label.id) == label.display_name
    names = {lb.display_name for lb in labels}
    assert {"Sine wave", "Chirp tone", "White noise", "Pink noise", "Beep, bleep", "Clicking", "Dial tone",
            "Busy signal", "Siren", "Mains hum", "Buzz"} <= names


def test_single_label_mode_and_sine_clips_have_one_strong_peak(tmp_path: Path) -> None:
    data = synthetic.generate(tmp_path, num_train=40, num_eval=1, clip_seconds=1.0, seed=3, multi_label=False)
    train = load_split(data.data_dir, "train")
    assert train.is_single_label
    sines = [it for it in train.items if it.targets == (_index("Sine wave"),)]
    assert sines, "expected some sine clips among 40"
    for item in sines:
        wave, _ = sf.read(item.path)
        freqs, power = _spectrum(wave)
        peak = int(np.argmax(power))
        assert 190 <= freqs[peak] <= 4100
        assert power[max(0, peak - 3) : peak + 4].sum() > 0.9 * power.sum()


def test_event_generators_sound_like_their_names() -> None:
    rng = np.random.default_rng(0)
    n = SR
    freqs, power = _spectrum(synthetic.make_event(_index("Mains hum"), rng, n))
    assert min(abs(freqs[np.argmax(power)] - 50), abs(freqs[np.argmax(power)] - 60)) <= 2

    freqs, power = _spectrum(synthetic.make_event(_index("Dial tone"), rng, n))
    strong = freqs[power > 0.05 * power.max()]  # both tones, nothing else
    assert any(
        all(min(abs(f - low), abs(f - high)) < 5 for f in strong) and np.ptp(strong) > 40
        for low, high in ((350, 440), (400, 450))
    )

    # Chirp: the dominant frequency of the first and last quarter differ by at least an octave.
    chirp = synthetic.make_event(_index("Chirp tone"), rng, n)
    f_start = _spectrum(chirp[: n // 4])[0][np.argmax(_spectrum(chirp[: n // 4])[1])]
    f_end = _spectrum(chirp[-n // 4 :])[0][np.argmax(_spectrum(chirp[-n // 4 :])[1])]
    assert max(f_start, f_end) / min(f_start, f_end) > 1.6

    # White noise is flat; pink noise has ~10 dB less power per decade.
    def band_ratio_db(x: np.ndarray) -> float:
        f, p = _spectrum(x)
        return 10 * np.log10(p[(f > 200) & (f < 400)].mean() / p[(f > 2000) & (f < 4000)].mean())

    assert abs(band_ratio_db(synthetic.make_event(_index("White noise"), rng, n))) < 2
    assert 7 < band_ratio_db(synthetic.make_event(_index("Pink noise"), rng, n)) < 13

    # Busy signal is gated on and off; a dial tone is continuous.
    def envelope(x: np.ndarray) -> np.ndarray:
        return np.sqrt((x[: len(x) // 160 * 160].reshape(-1, 160) ** 2).mean(axis=1))

    assert envelope(synthetic.make_event(_index("Busy signal"), rng, n))[5:-5].min() < 0.01
    assert envelope(synthetic.make_event(_index("Dial tone"), rng, n))[5:-5].min() > 0.2


def test_every_class_makes_a_bounded_event() -> None:
    for index, cls in enumerate(synthetic.CLASSES):
        event = synthetic.make_event(index, np.random.default_rng(index), int(cls.min_s * SR))
        assert np.isfinite(event).all() and np.max(np.abs(event)) == pytest.approx(1.0), cls.name


def test_clip_levels_and_labels() -> None:
    wave, chosen = synthetic.make_clip(np.random.default_rng(5), 2 * SR, max_events=3)
    assert wave.dtype == np.float32 and wave.shape == (2 * SR,)
    assert 0.3 <= np.max(np.abs(wave)) <= 0.9
    assert chosen == sorted(set(chosen)) and 1 <= len(chosen) <= 3


def test_rejects_clips_eat_would_drop() -> None:
    with pytest.raises(ValueError, match="10000 samples"):
        synthetic.generate("/nonexistent", 1, 1, clip_seconds=0.5)
