"""The waveform dataset: float decoding, channel averaging, resampling, first-samples crop, padding."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from model.config import Label
from training.data.dataset import AudioDataset, collate, load_audio
from training.data.manifest import AudioItem, DataError, Manifest
from training.data.sampler import ResumableSampler, make_loader

SR = 16_000
LABELS = (Label(0, "a", "A"), Label(1, "b", "B"), Label(2, "c", "C"))


def _manifest(items: list[tuple[Path, tuple[int, ...]]]) -> Manifest:
    return Manifest(
        name="t", labels=LABELS,
        items=tuple(AudioItem(path=p, num_samples=-1, targets=t, key=p.stem) for p, t in items),
    )


def test_pcm16_decodes_to_float_and_pads(tmp_path: Path) -> None:
    pcm = np.array([16384, -32768, 8192] * 100, dtype=np.int16)
    sf.write(tmp_path / "x.wav", pcm, SR, subtype="PCM_16")
    ds = AudioDataset(_manifest([(tmp_path / "x.wav", (1, 2))]), clip_samples=1000)
    sample = ds[0]
    assert sample["num_samples"] == 300
    wave = sample["waveform"]
    assert wave.dtype == torch.float32 and wave.shape == (1000,)
    np.testing.assert_array_equal(wave[:3].numpy(), [0.5, -1.0, 0.25])  # soundfile float scale, /32768
    assert torch.all(wave[300:] == 0)
    assert sample["target"].tolist() == [0.0, 1.0, 1.0]


def test_long_clips_keep_their_first_samples(tmp_path: Path) -> None:
    ramp = (np.arange(5000) / 5000).astype(np.float32)
    sf.write(tmp_path / "long.wav", ramp, SR, subtype="FLOAT")
    sample = AudioDataset(_manifest([(tmp_path / "long.wav", (0,))]), clip_samples=1200)[0]
    assert sample["num_samples"] == 1200
    np.testing.assert_array_equal(sample["waveform"].numpy(), ramp[:1200])


def test_stereo_is_averaged_and_other_rates_resampled(tmp_path: Path) -> None:
    rate = 44_100
    t = np.arange(rate) / rate  # 1 s
    tone = np.sin(2 * np.pi * 440 * t)
    stereo = np.stack([0.6 * tone, 0.2 * tone], axis=1).astype(np.float32)
    sf.write(tmp_path / "st.wav", stereo, rate, subtype="FLOAT")
    full = load_audio(str(tmp_path / "st.wav"))
    assert abs(len(full) - SR) <= 1
    spectrum = np.abs(np.fft.rfft(full))
    assert np.argmax(spectrum) * SR / len(full) == pytest.approx(440, abs=2)
    np.testing.assert_allclose(np.abs(full[2000:14000]).max(), 0.4, atol=5e-3)  # mean of 0.6 and 0.2
    # Reading only the frames a crop needs gives the same samples as cropping the full decode.
    cropped = AudioDataset(_manifest([(tmp_path / "st.wav", (0,))]), clip_samples=8000)[0]["waveform"]
    np.testing.assert_allclose(cropped.numpy(), full[:8000], atol=1e-4)


def test_targets_as_indices_and_collate(tmp_path: Path) -> None:
    for name, n in (("a", 400), ("b", 900)):
        sf.write(tmp_path / f"{name}.wav", np.full(n, 0.1, np.float32), SR)
    manifest = _manifest([(tmp_path / "a.wav", (2,)), (tmp_path / "b.wav", (0,))])
    batch = collate([AudioDataset(manifest, 600, target="index")[i] for i in range(2)])
    assert batch["waveform"].shape == (2, 600) and batch["waveform"].dtype == torch.float32
    assert batch["num_samples"].tolist() == [400, 600] and batch["num_samples"].dtype == torch.int64
    assert batch["target"].tolist() == [2, 0] and batch["target"].dtype == torch.int64
    multi = collate([AudioDataset(manifest, 600)[i] for i in range(2)])
    assert multi["target"].shape == (2, 3) and multi["target"].dtype == torch.float32
    assert "target" not in collate([AudioDataset(manifest, 600, target="none")[0]])


def test_loader_yields_every_clip_once(tmp_path: Path) -> None:
    items = []
    for i in range(5):
        sf.write(tmp_path / f"{i}.wav", np.full(100 + i, i / 10, np.float32), SR, subtype="FLOAT")
        items.append((tmp_path / f"{i}.wav", (i % 3,)))
    dataset = AudioDataset(_manifest(items), 200)
    loader = make_loader(dataset, 2, ResumableSampler(5, shuffle=False))
    batches = list(loader)
    assert len(loader) == 3 and [b["waveform"].shape[0] for b in batches] == [2, 2, 1]
    assert torch.cat([b["num_samples"] for b in batches]).tolist() == [100, 101, 102, 103, 104]


def test_bad_input_errors(tmp_path: Path) -> None:
    (tmp_path / "junk.wav").write_bytes(b"not audio at all")
    with pytest.raises(DataError, match="junk.wav"):
        AudioDataset(_manifest([(tmp_path / "junk.wav", (0,))]), 100)[0]
    sf.write(tmp_path / "ok.wav", np.zeros(10, np.float32), SR)
    with pytest.raises(DataError, match="0 or several labels"):
        AudioDataset(_manifest([(tmp_path / "ok.wav", (0, 1))]), 100, target="index")
    with pytest.raises(ValueError, match="clip_samples"):
        AudioDataset(_manifest([(tmp_path / "ok.wav", (0,))]), 0)
    unlabelled = Manifest(name="u", items=(AudioItem(tmp_path / "ok.wav", 10, (), "ok"),), labels=())
    with pytest.raises(DataError, match="no labels"):
        AudioDataset(unlabelled, 100)
    assert AudioDataset(unlabelled, 100, target="none")[0]["num_samples"] == 10
