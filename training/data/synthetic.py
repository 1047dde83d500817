"""Synthetic labelled scenes: short 16 kHz clips of simple sounds named after AudioSet classes.

Why: a fresh machine has no audio data, yet the demo must pre-train, fine-tune, evaluate and export a
model that does something recognisable. Each class is a small parametric generator (pitch, rate,
duration and onset randomised per event); a clip mixes 1-3 events at random levels over a quiet
background. The output is an EAT data directory (reference §7): ``train.tsv/.lbl``, ``eval.tsv/.lbl``,
``labels.csv`` with real AudioSet mids and names, and ``weight_train_all.csv``.

Everything is a function of ``seed``: clip *i* of a split is the same whatever the other sizes are.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf

from eat.contract import SAMPLE_RATE, Label
from training.data.manifest import EAT_MIN_SAMPLES, write_labels_csv, write_lbl, write_tsv, write_weights

logger = logging.getLogger(__name__)

EventFn = Callable[[np.random.Generator, int], np.ndarray]  # (rng, num_samples) -> [num_samples] float64


def _t(num_samples: int) -> np.ndarray:
    return np.arange(num_samples) / SAMPLE_RATE


def _log_uniform(rng: np.random.Generator, low: float, high: float) -> float:
    return float(np.exp(rng.uniform(np.log(low), np.log(high))))


def _tone(freqs_hz: np.ndarray | float, num_samples: int, rng: np.random.Generator) -> np.ndarray:
    """Sine with an instantaneous frequency (scalar or per sample) and a random start phase."""
    phase = 2 * np.pi * np.cumsum(np.broadcast_to(freqs_hz, (num_samples,))) / SAMPLE_RATE
    return np.sin(phase + rng.uniform(0, 2 * np.pi))


def _gate(num_samples: int, on_s: float, off_s: float, rng: np.random.Generator) -> np.ndarray:
    """0/1 on-off cadence with 5 ms ramps, starting at a random point of the cycle."""
    period = on_s + off_s
    phase = (_t(num_samples) + rng.uniform(0, period)) % period
    ramp = 0.005
    return np.clip(np.minimum(phase, on_s - phase) / ramp, 0.0, 1.0)


def _band_noise(rng: np.random.Generator, num_samples: int, low_hz: float, high_hz: float) -> np.ndarray:
    spectrum = np.fft.rfft(rng.standard_normal(num_samples))
    freqs = np.fft.rfftfreq(num_samples, 1 / SAMPLE_RATE)
    spectrum[(freqs < low_hz) | (freqs > high_hz)] = 0
    return np.fft.irfft(spectrum, num_samples)


def _fade(num_samples: int, ramp_s: float = 0.005) -> np.ndarray:
    ramp = max(1, min(int(ramp_s * SAMPLE_RATE), num_samples // 2))
    env = np.ones(num_samples)
    env[:ramp] = np.linspace(0, 1, ramp)
    env[num_samples - ramp :] = np.linspace(1, 0, ramp)
    return env


def _impulses(rng: np.random.Generator, num_samples: int, onsets: np.ndarray, shape: np.ndarray) -> np.ndarray:
    out = np.zeros(num_samples + len(shape))
    for onset in onsets:
        out[onset : onset + len(shape)] += shape
    return out[:num_samples]


# --------------------------------------------------------------------------------- event generators


def sine_wave(rng: np.random.Generator, n: int) -> np.ndarray:
    return _tone(_log_uniform(rng, 200, 4000), n, rng)


def chirp_tone(rng: np.random.Generator, n: int) -> np.ndarray:
    f0 = _log_uniform(rng, 150, 1500)
    f1 = f0 * _log_uniform(rng, 2, 5)
    if rng.random() < 0.5:
        f0, f1 = f1, f0
    frac = np.linspace(0, 1, n)
    sweep = f0 * (f1 / f0) ** frac if rng.random() < 0.5 else f0 + (f1 - f0) * frac
    return _tone(sweep, n, rng)


def white_noise(rng: np.random.Generator, n: int) -> np.ndarray:
    return rng.standard_normal(n)


def pink_noise(rng: np.random.Generator, n: int) -> np.ndarray:
    spectrum = np.fft.rfft(rng.standard_normal(n))
    freqs = np.fft.rfftfreq(n, 1 / SAMPLE_RATE)
    spectrum[1:] /= np.sqrt(freqs[1:])  # power ~ 1/f
    spectrum[0] = 0
    return np.fft.irfft(spectrum, n)


def beep(rng: np.random.Generator, n: int) -> np.ndarray:
    on_s = rng.uniform(0.06, 0.25)
    return _tone(_log_uniform(rng, 800, 3000), n, rng) * _gate(n, on_s, rng.uniform(0.06, 0.25), rng)


def clicking(rng: np.random.Generator, n: int) -> np.ndarray:
    """Irregular broadband clicks (Poisson onsets), unlike the regular, resonant ``tick``."""
    rate_hz = rng.uniform(5, 20)
    onsets = np.flatnonzero(rng.random(n) < rate_hz / SAMPLE_RATE)
    length = int(0.004 * SAMPLE_RATE)
    shape = rng.standard_normal(length) * np.exp(-np.arange(length) / (0.0008 * SAMPLE_RATE))
    return _impulses(rng, n, onsets, shape)


def dial_tone(rng: np.random.Generator, n: int) -> np.ndarray:
    low, high = [(350.0, 440.0), (400.0, 450.0)][rng.integers(2)]  # North American, British
    return _tone(low, n, rng) + _tone(high, n, rng)


def busy_signal(rng: np.random.Generator, n: int) -> np.ndarray:
    if rng.random() < 0.5:  # North American: 480 + 620 Hz, 0.5 s on / 0.5 s off
        tone, cadence = _tone(480.0, n, rng) + _tone(620.0, n, rng), (0.5, 0.5)
    else:  # much of Europe: 425 Hz, faster cadence
        tone, cadence = _tone(425.0, n, rng), (rng.uniform(0.2, 0.5), rng.uniform(0.2, 0.5))
    return tone * _gate(n, *cadence, rng)


def siren(rng: np.random.Generator, n: int) -> np.ndarray:
    centre, depth = rng.uniform(700, 1100), rng.uniform(200, 400)
    rate_hz = rng.uniform(0.3, 1.0) if rng.random() < 0.5 else rng.uniform(3, 6)  # wail or yelp
    freq = centre + depth * np.sin(2 * np.pi * rate_hz * _t(n) + rng.uniform(0, 2 * np.pi))
    return sum(_tone(k * freq, n, rng) / k**1.5 for k in (1, 2, 3))


def mains_hum(rng: np.random.Generator, n: int) -> np.ndarray:
    base_hz = 50.0 if rng.random() < 0.5 else 60.0
    return sum(rng.uniform(0.3, 1.0) / k * _tone(k * base_hz, n, rng) for k in range(1, 9))


def buzz(rng: np.random.Generator, n: int) -> np.ndarray:
    """Sawtooth with a wobbling pitch, like an insect or a vibrating reed."""
    base = rng.uniform(100, 300) * (1 + 0.02 * np.sin(2 * np.pi * rng.uniform(3, 8) * _t(n)))
    phase = np.cumsum(base) / SAMPLE_RATE + rng.random()
    return 2 * (phase % 1.0) - 1


def tick(rng: np.random.Generator, n: int) -> np.ndarray:
    """Regular short resonant knocks (a clock), unlike the irregular broadband ``clicking``."""
    period = int(SAMPLE_RATE / rng.uniform(2, 5))
    onsets = np.arange(rng.integers(period), n, period)
    length = int(0.015 * SAMPLE_RATE)
    k = np.arange(length)
    shape = np.sin(2 * np.pi * rng.uniform(2000, 5000) * k / SAMPLE_RATE) * np.exp(-k / (0.003 * SAMPLE_RATE))
    return _impulses(rng, n, onsets, shape)


def whistle(rng: np.random.Generator, n: int) -> np.ndarray:
    """A gliding tone with vibrato and a little breath noise around it (a sine wave has neither)."""
    start, end = _log_uniform(rng, 900, 2500), _log_uniform(rng, 900, 2500)
    vibrato = 1 + rng.uniform(0.02, 0.04) * np.sin(2 * np.pi * rng.uniform(4, 7) * _t(n))
    freq = np.geomspace(start, end, n) * vibrato
    centre = (start + end) / 2
    breath = _band_noise(rng, n, centre * 0.7, centre * 1.4)
    return _tone(freq, n, rng) + 0.1 * breath / (np.std(breath) + 1e-12)


def ping(rng: np.random.Generator, n: int) -> np.ndarray:
    """Struck, exponentially decaying tones repeated every 0.4-1 s (sonar-like)."""
    period = int(rng.uniform(0.4, 1.0) * SAMPLE_RATE)
    k = np.arange(min(period, n))
    shape = np.sin(2 * np.pi * _log_uniform(rng, 1000, 5000) * k / SAMPLE_RATE)
    shape *= np.exp(-k / (rng.uniform(0.05, 0.25) * SAMPLE_RATE))
    return _impulses(rng, n, np.arange(0, n, period), shape)


def dtmf(rng: np.random.Generator, n: int) -> np.ndarray:
    """Telephone keypad digits: a row and a column tone, 60-100 ms each with gaps."""
    rows, cols = (697.0, 770.0, 852.0, 941.0), (1209.0, 1336.0, 1477.0)
    digit_s, gap_s = rng.uniform(0.06, 0.1), rng.uniform(0.05, 0.1)
    step = int((digit_s + gap_s) * SAMPLE_RATE)
    out = np.zeros(n)
    for start in range(0, n, step):
        length = min(int(digit_s * SAMPLE_RATE), n - start)
        pair = _tone(rows[rng.integers(4)], length, rng) + _tone(cols[rng.integers(3)], length, rng)
        out[start : start + length] = pair * _fade(length)
    return out


@dataclass(frozen=True)
class SoundClass:
    """An AudioSet class we can synthesise, and the shortest event that still sounds like it."""

    mid: str
    name: str
    make: EventFn
    min_s: float = 0.3


# AudioSet ontology mids and display names (as in EAT's labels.csv). Order = label index.
CLASSES: tuple[SoundClass, ...] = (
    SoundClass("/m/01v_m0", "Sine wave", sine_wave),
    SoundClass("/m/0hdsk", "Chirp tone", chirp_tone, 0.4),
    SoundClass("/m/0chx_", "White noise", white_noise),
    SoundClass("/m/0cj0r", "Pink noise", pink_noise),
    SoundClass("/m/02fs_r", "Beep, bleep", beep, 0.6),
    SoundClass("/m/07qc9xj", "Clicking", clicking, 0.6),
    SoundClass("/m/015jpf", "Dial tone", dial_tone, 0.5),
    SoundClass("/m/01z47d", "Busy signal", busy_signal, 1.0),
    SoundClass("/m/03kmc9", "Siren", siren, 1.0),
    SoundClass("/m/06xkwv", "Mains hum", mains_hum, 0.5),
    SoundClass("/m/07pjwq1", "Buzz", buzz),
    SoundClass("/m/07qjznt", "Tick", tick, 0.8),
    SoundClass("/m/0l156k", "Whistle", whistle, 0.4),
    SoundClass("/m/07qwdck", "Ping", ping, 0.3),
    SoundClass("/m/02c8p", "Telephone dialing, DTMF", dtmf, 0.5),
)


def labels() -> list[Label]:
    return [Label(index=i, id=c.mid, display_name=c.name) for i, c in enumerate(CLASSES)]


def make_event(index: int, rng: np.random.Generator, num_samples: int) -> np.ndarray:
    """One event of class ``index``, ``num_samples`` long, peak 1, with 5 ms fades at both ends."""
    event = CLASSES[index].make(rng, num_samples) * _fade(num_samples)
    return event / (np.max(np.abs(event)) + 1e-12)


def make_clip(rng: np.random.Generator, num_samples: int, max_events: int = 3) -> tuple[np.ndarray, list[int]]:
    """A scene: 1..max_events distinct classes, random onsets/lengths/levels, over a quiet background.

    Levels: each event's peak is 0 to -12 dB relative to the loudest, the background's RMS 35-50 dB
    below it (so every event is clearly audible), then the whole clip gets a random peak of 0.3-0.9.
    Returns the float32 waveform and the sorted class indices present.
    """
    num_events = int(rng.integers(1, max_events + 1))
    chosen = sorted(int(c) for c in rng.choice(len(CLASSES), size=num_events, replace=False))
    # Background: brown (1/f^2) noise, spectrally unlike the white and pink noise classes.
    spectrum = np.fft.rfft(rng.standard_normal(num_samples))
    spectrum /= np.maximum(np.fft.rfftfreq(num_samples, 1 / SAMPLE_RATE), 20.0)
    background = np.fft.irfft(spectrum, num_samples)
    background *= 10 ** (-rng.uniform(35, 50) / 20) / (np.std(background) + 1e-12)
    levels = 10 ** (-rng.uniform(0, 12, size=num_events) / 20)
    levels /= levels.max()  # the loudest event sits at 0 dB, whichever class it is
    clip = background
    for cls, level in zip(chosen, levels, strict=True):
        min_len = min(num_samples, int(CLASSES[cls].min_s * SAMPLE_RATE))
        length = int(rng.integers(min_len, num_samples + 1))
        onset = int(rng.integers(0, num_samples - length + 1))
        clip[onset : onset + length] += level * make_event(cls, rng, length)
    clip *= rng.uniform(0.3, 0.9) / (np.max(np.abs(clip)) + 1e-12)
    return clip.astype(np.float32), chosen


@dataclass(frozen=True)
class SyntheticData:
    """Where ``generate`` wrote things; ``data_dir`` is what ``load_split`` / ``--data`` take."""

    data_dir: Path
    train_tsv: Path
    train_lbl: Path
    eval_tsv: Path
    eval_lbl: Path
    labels_csv: Path
    weights: Path


def balanced_weights(targets: list[list[int]], num_classes: int) -> np.ndarray:
    """Per-clip sampling weights: sum over the clip's labels of 1000 / (class count + 0.01).

    The AST/PSLA recipe that EAT's weight file most likely comes from (reference §4.6, [unknown]).
    """
    counts = np.zeros(num_classes)
    for t in targets:
        counts[t] += 1
    per_class = 1000.0 / (counts + 0.01)
    return np.array([per_class[t].sum() for t in targets])


def generate(
    out_dir: str | Path,
    num_train: int,
    num_eval: int,
    clip_seconds: float = 2.0,
    seed: int = 0,
    multi_label: bool = True,
) -> SyntheticData:
    """Write an EAT-format data directory of synthetic scenes (16-bit 16 kHz mono WAV).

    ``multi_label=False`` gives one event per clip (a single-label task scored by accuracy).
    """
    clip_samples = round(clip_seconds * SAMPLE_RATE)
    if clip_samples < EAT_MIN_SAMPLES:
        raise ValueError(
            f"clip_seconds={clip_seconds} gives {clip_samples} samples; EAT drops clips under "
            f"{EAT_MIN_SAMPLES} samples, so use at least {EAT_MIN_SAMPLES / SAMPLE_RATE} s"
        )
    if num_train < 1 or num_eval < 1:
        raise ValueError("num_train and num_eval must be at least 1")
    out_dir = Path(out_dir)
    audio_root = (out_dir / "audio").resolve()
    all_labels = labels()
    train_targets: list[list[int]] = []
    for split_code, (split, count) in enumerate((("train", num_train), ("eval", num_eval))):
        (audio_root / split).mkdir(parents=True, exist_ok=True)
        entries, rows = [], []
        for i in range(count):
            rng = np.random.default_rng([seed, split_code, i])
            wave, chosen = make_clip(rng, clip_samples, max_events=3 if multi_label else 1)
            key = f"{split}_{i:06d}"
            sf.write(audio_root / split / f"{key}.wav", wave, SAMPLE_RATE, subtype="PCM_16")
            entries.append((f"{split}/{key}.wav", clip_samples))
            rows.append((key, [all_labels[c].id for c in chosen]))
            if split == "train":
                train_targets.append(chosen)
        write_tsv(out_dir / f"{split}.tsv", audio_root, entries)
        write_lbl(out_dir / f"{split}.lbl", rows)
    write_labels_csv(out_dir / "labels.csv", all_labels)
    write_weights(out_dir / "weight_train_all.csv", balanced_weights(train_targets, len(all_labels)).tolist())
    logger.info("wrote %d train + %d eval synthetic clips of %.2f s to %s", num_train, num_eval,
                clip_seconds, out_dir)
    return SyntheticData(
        data_dir=out_dir,
        train_tsv=out_dir / "train.tsv",
        train_lbl=out_dir / "train.lbl",
        eval_tsv=out_dir / "eval.tsv",
        eval_lbl=out_dir / "eval.lbl",
        labels_csv=out_dir / "labels.csv",
        weights=out_dir / "weight_train_all.csv",
    )
