"""Audio bytes, a file or an array -> 16 kHz mono float32, the only input EAT models take.

The decoder never trusts a file's size to say how long its audio is: a few kB of FLAC or Opus can
hold hours of silence. So the duration limit is checked twice: against the header (soundfile's
frame count, the container's duration) before anything is decoded, and again while decoding, block by
block, so that a lying or missing header cannot expand past ``max_duration_s`` either.

soundfile (libsndfile) reads WAV in all its flavours (PCM 8-32 bit, float, mu-law, WAVE_EXTENSIBLE,
RF64), FLAC, Ogg Vorbis/Opus and MP3. Everything else (AAC/M4A, WebM, ...) goes through PyAV.
Channels are averaged to mono and the rate converted with soxr. Non-finite samples are refused
rather than silently cleaned, because they mean the file is broken. Errors are ``AudioError``s
(``InvalidAudio``, ``AudioTooLong``); the service maps them to 422 and 413.
"""

from __future__ import annotations

import io
import math
import os
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np
import soundfile as sf
import soxr

from eat.contract import FRAME_LENGTH_SAMPLES, SAMPLE_RATE

MIN_SAMPLES = FRAME_LENGTH_SAMPLES  # one 25 ms analysis frame: less gives the model no frame at all
MAX_SOURCE_RATE = 768_000
_BLOCK_SAMPLES = 1 << 20  # per read, over all channels: bounds memory even for 1000-channel files
_UNKNOWN_FRAMES = 2**62  # libsndfile reports ~SF_COUNT_MAX when a stream does not state its length


class AudioError(ValueError):
    """Audio that cannot be used: the message says why, in words a user can act on."""


class InvalidAudio(AudioError):
    """Not audio we can decode, or unusable audio (empty, NaN/Inf, shorter than one 25 ms frame)."""


class AudioTooLong(AudioError):
    """Longer than the caller's limit; found from the header or while decoding, never after."""


@dataclass(frozen=True)
class Audio:
    samples: np.ndarray  # [S] float32, mono, SAMPLE_RATE
    source_rate: int
    source_channels: int

    @property
    def duration_s(self) -> float:
        return len(self.samples) / SAMPLE_RATE


def decode(data: bytes, *, max_duration_s: float | None = None) -> Audio:
    """Decode any supported file to 16 kHz mono float32, refusing over-long audio before decoding it.

    Raises ``InvalidAudio`` (not audio, corrupt, empty, NaN/Inf, shorter than 25 ms) or
    ``AudioTooLong`` (only with a ``max_duration_s``).
    """
    if not data:
        raise InvalidAudio("empty upload: no audio bytes")
    limit_s = math.inf if max_duration_s is None else max_duration_s
    try:
        sound = sf.SoundFile(io.BytesIO(data))
    except (sf.LibsndfileError, RuntimeError, TypeError):
        samples, rate, channels = _decode_pyav(data, max_duration_s=limit_s)
    else:
        with sound:
            samples, rate, channels = _decode_soundfile(sound, max_duration_s=limit_s)
    return _finish(samples, rate, channels)


def from_array(samples: np.ndarray, sample_rate: int, *, max_duration_s: float | None = None) -> Audio:
    """A waveform already in memory: ``[S]`` mono or ``[S, C]`` channels-last, float in [-1, 1]."""
    samples = np.asarray(samples)
    if samples.ndim not in (1, 2) or not np.issubdtype(samples.dtype, np.floating):
        raise InvalidAudio(f"expected a float [samples] or [samples, channels] array, got {samples.dtype} "
                           f"{samples.shape}; divide int16 PCM by 32768")
    _check_rate(int(sample_rate))
    channels = 1 if samples.ndim == 1 else samples.shape[1]
    if max_duration_s is not None and len(samples) > max_duration_s * sample_rate:
        raise _too_long(len(samples) / sample_rate, max_duration_s)
    mono = samples.mean(axis=1) if samples.ndim == 2 else samples
    return _finish(mono.astype(np.float32), int(sample_rate), channels)


def load(
    audio: str | os.PathLike[str] | bytes | np.ndarray,
    *,
    sample_rate: int | None = None,
    max_duration_s: float | None = None,
) -> Audio:
    """A path, the bytes of a file, or an array with its ``sample_rate`` -> 16 kHz mono ``Audio``."""
    if isinstance(audio, np.ndarray):
        if sample_rate is None:
            raise ValueError("a waveform array needs its sample_rate")
        return from_array(audio, sample_rate, max_duration_s=max_duration_s)
    if sample_rate is not None:
        raise ValueError("sample_rate is only for arrays: a file states its own rate")
    if isinstance(audio, bytes | bytearray | memoryview):
        return decode(bytes(audio), max_duration_s=max_duration_s)
    path = Path(audio)
    try:
        data = path.read_bytes()
    except IsADirectoryError:
        raise InvalidAudio(f"{path} is a directory, not an audio file") from None
    return decode(data, max_duration_s=max_duration_s)


def _finish(samples: np.ndarray, rate: int, channels: int) -> Audio:
    if samples.size == 0:
        raise InvalidAudio("the file holds no audio samples (zero-length audio)")
    if not np.isfinite(samples).all():
        raise InvalidAudio("the audio contains NaN or infinite samples")
    if rate != SAMPLE_RATE:
        samples = soxr.resample(samples, rate, SAMPLE_RATE, quality="HQ").astype(np.float32, copy=False)
    if len(samples) < MIN_SAMPLES:
        raise InvalidAudio(f"audio is {len(samples) / SAMPLE_RATE * 1000:.1f} ms long; at least 25 ms is needed")
    return Audio(samples=np.ascontiguousarray(samples, dtype=np.float32), source_rate=rate, source_channels=channels)


def _check_rate(rate: int) -> None:
    if not 0 < rate <= MAX_SOURCE_RATE:
        raise InvalidAudio(f"unsupported sample rate {rate} Hz")


def _too_long(duration_s: float, max_duration_s: float) -> AudioTooLong:
    return AudioTooLong(f"audio is {duration_s:.1f} s long; the limit is {max_duration_s:g} s")


def _decode_soundfile(sound: sf.SoundFile, *, max_duration_s: float) -> tuple[np.ndarray, int, int]:
    rate, channels = int(sound.samplerate), int(sound.channels)
    _check_rate(rate)
    if channels < 1:
        raise InvalidAudio("the file declares no audio channels")
    max_frames = math.ceil(max_duration_s * rate) if math.isfinite(max_duration_s) else _UNKNOWN_FRAMES
    if _UNKNOWN_FRAMES > sound.frames > max_frames:  # the header alone proves it is too long
        raise _too_long(sound.frames / rate, max_duration_s)
    blocks: list[np.ndarray] = []
    num_frames = 0
    block_frames = max(1024, _BLOCK_SAMPLES // channels)
    try:
        while True:
            block = sound.read(block_frames, dtype="float32", always_2d=True)  # [n, C]
            if len(block) == 0:
                break
            num_frames += len(block)
            if num_frames > max_frames:  # the header lied or was silent about the length
                raise _too_long(num_frames / rate, max_duration_s)
            blocks.append(block.mean(axis=1) if channels > 1 else block[:, 0].copy())
    except (sf.LibsndfileError, RuntimeError) as err:
        raise InvalidAudio(f"corrupt audio: {err}") from err
    samples = np.concatenate(blocks) if blocks else np.zeros(0, np.float32)
    return samples, rate, channels


def _decode_pyav(data: bytes, *, max_duration_s: float) -> tuple[np.ndarray, int, int]:
    try:
        container = av.open(io.BytesIO(data), mode="r", metadata_errors="ignore")
    except (av.FFmpegError, ValueError, UnicodeDecodeError) as err:
        raise InvalidAudio("not a supported audio file (unrecognised or corrupt format)") from err
    with container:
        if not container.streams.audio:
            raise InvalidAudio("the file has no audio stream")
        stream = container.streams.audio[0]
        header_s = _header_duration_s(container, stream)
        if header_s is not None and header_s > max_duration_s:
            raise _too_long(header_s, max_duration_s)
        # fltp keeps the layout and rate of the first frame; later frames are converted to match.
        resampler = av.AudioResampler(format="fltp")
        blocks: list[np.ndarray] = []
        num_frames, rate, channels = 0, 0, 0
        try:
            for packet in container.demux(stream):
                for frame in packet.decode():
                    for out in resampler.resample(frame):
                        planes = out.to_ndarray()  # [C, n] float32
                        rate, channels = int(out.sample_rate), planes.shape[0]
                        _check_rate(rate)
                        num_frames += planes.shape[1]
                        if num_frames > max_duration_s * rate:  # decompression bomb guard
                            raise _too_long(num_frames / rate, max_duration_s)
                        blocks.append(planes.mean(axis=0) if channels > 1 else planes[0].copy())
            for out in resampler.resample(None):
                planes = out.to_ndarray()
                blocks.append(planes.mean(axis=0) if planes.shape[0] > 1 else planes[0].copy())
        except AudioError:
            raise
        except (av.FFmpegError, ValueError) as err:
            raise InvalidAudio(f"corrupt audio: {err}") from err
    if not blocks:
        raise InvalidAudio("the file holds no audio samples (zero-length audio)")
    return np.concatenate(blocks).astype(np.float32, copy=False), rate, channels


def _header_duration_s(container: av.container.InputContainer, stream: av.audio.AudioStream) -> float | None:
    """What the container claims, before decoding; None when it does not say."""
    if stream.duration is not None and stream.time_base is not None:
        return float(stream.duration * stream.time_base)
    if container.duration is not None:
        return container.duration / av.time_base
    return None
