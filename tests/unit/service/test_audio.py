"""Decoding every supported format to 16 kHz mono, refusing bad audio, and cutting windows."""

from __future__ import annotations

import numpy as np
import pytest
from svc_helpers import encode_pyav, encode_soundfile, sine

from eat import audio
from eat.audio import AudioTooLong, InvalidAudio, decode
from eat.contract import SAMPLE_RATE
from eat.contract import cut_windows as to_windows


def dominant_hz(samples: np.ndarray) -> float:
    spectrum = np.abs(np.fft.rfft(samples * np.hanning(len(samples))))
    return float(np.argmax(spectrum) * SAMPLE_RATE / len(samples))


SOUNDFILE_CASES = [
    ("WAV", "PCM_16", 22_050, 1),
    ("WAV", "PCM_24", 44_100, 1),
    ("WAV", "PCM_32", 16_000, 1),
    ("WAV", "PCM_U8", 8_000, 1),
    ("WAV", "FLOAT", 48_000, 1),
    ("WAV", "DOUBLE", 32_000, 1),
    ("WAV", "ULAW", 8_000, 1),
    ("WAVEX", "PCM_16", 48_000, 6),  # WAVE_EXTENSIBLE, 5.1 channels
    ("RF64", "PCM_16", 16_000, 2),
    ("FLAC", "PCM_16", 44_100, 2),
    ("OGG", "VORBIS", 22_050, 1),
    ("OGG", "OPUS", 48_000, 1),
    ("MP3", "MPEG_LAYER_III", 44_100, 2),
]


@pytest.mark.parametrize(("fmt", "subtype", "rate", "channels"), SOUNDFILE_CASES)
def test_soundfile_formats_decode_to_16k_mono(fmt: str, subtype: str, rate: int, channels: int) -> None:
    data = encode_soundfile(sine(1.5, rate, channels=channels), rate, fmt, subtype)
    clip = decode(data, max_duration_s=60)
    assert clip.samples.ndim == 1 and clip.samples.dtype == np.float32
    assert clip.source_rate == rate and clip.source_channels == channels
    assert abs(clip.duration_s - 1.5) < 0.1  # lossy codecs add a little padding
    assert abs(dominant_hz(clip.samples) - 440) < 5  # resampled, not sped up or slowed down
    assert 0.2 < np.abs(clip.samples).max() < 0.45


@pytest.mark.parametrize(
    ("container", "codec", "rate"), [("ipod", "aac", 22_050), ("adts", "aac", 44_100), ("webm", "libopus", 48_000)]
)
def test_pyav_formats_decode(container: str, codec: str, rate: int) -> None:
    data = encode_pyav(sine(1.5, rate, channels=2), rate, container, codec)
    clip = decode(data, max_duration_s=60)
    assert clip.source_channels == 2
    assert abs(clip.duration_s - 1.5) < 0.15
    assert abs(dominant_hz(clip.samples) - 440) < 5


def test_channels_are_averaged() -> None:
    left = sine(1.0, 16_000)
    stereo = np.stack([left, -left], axis=1)  # opposite phase: the mono mix is silence
    clip = decode(encode_soundfile(stereo, 16_000, "WAV", "FLOAT"), max_duration_s=60)
    assert np.abs(clip.samples).max() < 1e-6


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "empty"),
        (np.random.default_rng(0).bytes(20_000), "not a supported audio file"),
        (b"hello, this is text, not audio\n" * 50, "not a supported audio file"),
    ],
)
def test_non_audio_is_invalid(data: bytes, message: str) -> None:
    with pytest.raises(InvalidAudio, match=message):
        decode(data, max_duration_s=60)


@pytest.mark.parametrize("fmt", ["wav", "flac", "ogg", "m4a"])
def test_truncated_files_are_invalid(fmt: str) -> None:
    x = sine(2.0, 16_000)
    data = {
        "wav": lambda: encode_soundfile(x, 16_000, "WAV", "PCM_16")[:30],  # cut inside the header
        "flac": lambda: (lambda b: b[: len(b) // 2])(encode_soundfile(x, 16_000, "FLAC", "PCM_16")),
        "ogg": lambda: (lambda b: b[: len(b) // 2])(encode_soundfile(x, 16_000, "OGG", "VORBIS")),
        "m4a": lambda: (lambda b: b[: len(b) // 2])(encode_pyav(x, 16_000, "ipod", "aac")),
    }[fmt]()
    with pytest.raises(InvalidAudio):
        decode(data, max_duration_s=60)


def test_nan_and_inf_samples_are_refused() -> None:
    for bad in (np.nan, np.inf):
        x = sine(1.0, 16_000)
        x[100] = bad
        with pytest.raises(InvalidAudio, match="NaN or infinite"):
            decode(encode_soundfile(x, 16_000, "WAV", "FLOAT"), max_duration_s=60)


def test_zero_length_and_too_short_audio_are_refused() -> None:
    with pytest.raises(InvalidAudio, match="zero-length"):
        decode(encode_soundfile(np.zeros(0, np.float32), 16_000, "WAV", "PCM_16"), max_duration_s=60)
    with pytest.raises(InvalidAudio, match="at least 25 ms"):
        decode(encode_soundfile(sine(0.01, 16_000), 16_000, "WAV", "PCM_16"), max_duration_s=60)


def test_too_long_is_refused_from_the_header_before_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    data = encode_soundfile(sine(3.0, 16_000), 16_000, "WAV", "PCM_16")

    def no_reading(*args: object, **kwargs: object) -> None:
        raise AssertionError("decoded although the header already said too long")

    monkeypatch.setattr(audio.sf.SoundFile, "read", no_reading)
    with pytest.raises(AudioTooLong, match="limit is 2 s"):
        decode(data, max_duration_s=2.0)


def test_flac_decompression_bomb_is_refused() -> None:
    bomb = encode_soundfile(np.zeros(16_000 * 120, np.int16), 16_000, "FLAC", "PCM_16")  # 2 min of silence
    assert len(bomb) < 20_000  # a few kB that would expand to 3.8 MB of float32
    with pytest.raises(AudioTooLong):
        decode(bomb, max_duration_s=10)


def test_pyav_limit_holds_while_decoding_when_the_header_is_silent(monkeypatch: pytest.MonkeyPatch) -> None:
    data = encode_pyav(sine(3.0, 16_000), 16_000, "adts", "aac")
    monkeypatch.setattr(audio, "_header_duration_s", lambda container, stream: None)
    with pytest.raises(AudioTooLong):
        decode(data, max_duration_s=1.0)
    assert abs(decode(data, max_duration_s=10).duration_s - 3.0) < 0.1


def test_windows_cover_the_clip_and_pad_the_last() -> None:
    samples = np.arange(25, dtype=np.float32) + 1
    w = to_windows(samples, window_samples=10, hop_samples=10)
    assert w.waveform.shape == (3, 10)
    assert w.num_samples.tolist() == [10, 10, 5]
    assert w.starts.tolist() == [0, 10, 20]
    assert w.waveform[2, :5].tolist() == [21, 22, 23, 24, 25] and not w.waveform[2, 5:].any()


def test_windows_with_overlap_and_short_clip() -> None:
    samples = np.ones(25, np.float32)
    w = to_windows(samples, window_samples=10, hop_samples=5)
    assert w.starts.tolist() == [0, 5, 10, 15]  # the last window reaches the end (sample 25)
    assert w.num_samples.tolist() == [10, 10, 10, 10]
    short = to_windows(np.ones(4, np.float32), window_samples=10, hop_samples=10)
    assert len(short) == 1 and short.num_samples.tolist() == [4]
    with pytest.raises(ValueError, match="hop_samples"):
        to_windows(samples, window_samples=10, hop_samples=11)
