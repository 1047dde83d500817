"""EAT's HDF5 shards: ``eat data pack`` writes the official AS-2M layout and the loaders read it back."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest
import soxr
import torch

from training import cli
from training.data import hdf5
from training.data.dataset import AudioDataset, load_audio
from training.data.manifest import DataError, load_manifest, read_tsv
from training.data.pack import pack_split
from training.data.synthetic import generate


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate(tmp_path_factory.mktemp("h5-src"), num_train=5, num_eval=1, clip_seconds=1.0, seed=9).data_dir


@pytest.fixture(scope="module")
def packed(source: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("h5-packed") / "as2m"
    summary = pack_split(source, "train", out, clips_per_shard=2)
    assert summary == {"num_clips": 5, "num_shards": 3, "seconds_of_audio": 5.0}
    return out


def test_pack_writes_the_official_layout(packed: Path) -> None:
    assert sorted(p.name for p in packed.glob("*.h5")) == ["00.h5", "01.h5", "02.h5"]
    root, entries = read_tsv(packed / "train.tsv")
    assert root == packed and (packed / "train.tsv").read_text().splitlines()[0] == str(packed)  # absolute
    assert entries[0] == ("00.h5/train_000000.wav", 32_000)  # samples at 32 kHz
    assert [rel.split("/")[0] for rel, _ in entries] == ["00.h5", "00.h5", "01.h5", "01.h5", "02.h5"]
    for rel, num_samples in entries:
        # What the official reader does: open root/<shard>, read the dataset named by the last component.
        shard, name = rel.split("/")
        with h5py.File(packed / shard, "r") as f:
            samples = f[name][:]
            assert samples.dtype == np.float32 and samples.shape == (num_samples,)
            assert f.attrs["sample_rate"] == 32_000
    assert (packed / "labels.csv").is_file() and (packed / "weight_train_all.csv").is_file()


def test_packed_clips_read_back_as_the_original_audio(source: Path, packed: Path) -> None:
    original = load_manifest(source, "train")
    again = load_manifest(packed, "train")
    assert [item.targets for item in again.items] == [item.targets for item in original.items]
    assert [lb.id for lb in again.labels] == [lb.id for lb in original.labels]
    assert again.weights is None and original.weights is None
    clip = 16_000
    before, after = AudioDataset(original, clip), AudioDataset(again, clip)
    for i, (item, packed_item) in enumerate(zip(original.items, again.items, strict=True)):
        a, b = before[i], after[i]
        assert b["num_samples"] == a["num_samples"] == clip
        # The shard holds the 16 kHz file resampled to 32 kHz (soxr HQ), and reading resamples it back.
        shard, name = hdf5.locate(packed_item.path)
        with h5py.File(shard, "r") as f:
            stored = f[name][:]
        up = soxr.resample(load_audio(str(item.path)), 16_000, 32_000, quality="HQ").astype(np.float32)
        np.testing.assert_array_equal(stored, up)
        down = soxr.resample(stored, 32_000, 16_000, quality="HQ")[:clip]
        np.testing.assert_array_equal(b["waveform"].numpy(), down)
        # Below 7 kHz (under both resamplers' roll-off) the round trip keeps the audio.
        spectrum = [np.abs(np.fft.rfft(w["waveform"].numpy()))[:7_000] for w in (a, b)]
        assert np.abs(spectrum[1] - spectrum[0]).max() < 1e-2 * spectrum[0].max()
        assert torch.equal(b["target"], a["target"])


def test_an_official_shard_without_a_rate_is_read_as_32_khz(tmp_path: Path) -> None:
    t = np.arange(32_000) / 32_000
    stereo = np.stack([np.sin(2 * np.pi * 440 * t), 0.5 * np.sin(2 * np.pi * 440 * t)], axis=1)
    with h5py.File(tmp_path / "07.h5", "w") as f:  # as the official files: no attributes
        f.create_dataset("Y-abc.wav", data=stereo.astype(np.float32))
    wave = load_audio(str(tmp_path / "07.h5" / "Y-abc.wav"), max_samples=8_000)
    expected = soxr.resample(stereo.mean(axis=1).astype(np.float32), 32_000, 16_000, quality="HQ")[:8_000]
    np.testing.assert_allclose(wave, expected, atol=1e-4)  # channels averaged, 32 kHz -> 16 kHz
    assert wave.shape == (8_000,)


def test_missing_shards_and_clips_are_named_up_front(packed: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    broken.mkdir()
    lines = (packed / "train.tsv").read_text().splitlines()
    lines[2] = "01.h5/not-there.wav\t32000"
    lines[5] = "99.h5/train_000004.wav\t32000"
    (broken / "train.tsv").write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"2 audio file\(s\) not found: line 3: .*not-there.wav; line 6: .*99.h5"):
        load_manifest(broken, "train", require_labels=False)
    with pytest.raises(DataError, match="no dataset 'nope.wav'"):
        load_audio(str(packed / "00.h5" / "nope.wav"))
    (tmp_path / "00.h5").write_bytes(b"not hdf5")
    with pytest.raises(DataError, match="cannot read HDF5 shard"):
        load_audio(str(tmp_path / "00.h5" / "x.wav"))


def test_pack_refuses_clashing_names_and_a_used_directory(source: Path, packed: Path, tmp_path: Path) -> None:
    clash = tmp_path / "clash"
    clash.mkdir()
    lines = (source / "train.tsv").read_text().splitlines()
    lines[2] = lines[1].replace("train/", "eval/../train/")  # another path, the same file name
    (clash / "train.tsv").write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match="train.tsv:3: file name 'train_000000.wav' repeats line 2"):
        pack_split(clash, "train", tmp_path / "out")
    with pytest.raises(DataError, match="already holds train.tsv"):
        pack_split(source, "train", packed)
    with pytest.raises(ValueError, match="clips-per-shard"):
        pack_split(source, "train", tmp_path / "out", clips_per_shard=0)


def test_eat_data_pack_command(source: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "packed"
    code = cli.main(["data", "pack", "--data", str(source), "--split", "eval", "--out", str(out)])
    assert code == 0 and "packed 1 clips" in capsys.readouterr().out
    assert hdf5.locate(read_tsv(out / "eval.tsv")[0] / "00.h5/eval_000000.wav") == (out / "00.h5", "eval_000000.wav")
    assert len(load_manifest(out, "eval")) == 1
    assert cli.main(["data", "pack", "--data", str(source), "--split", "eval", "--out", str(out)]) == 2
    assert "already holds eval.tsv" in capsys.readouterr().err
