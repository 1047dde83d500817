"""16 kHz waveform -> normalised Kaldi log-mel, as EAT computes it (eat-reference.md §1).

Plain torch ops on batches, so the front end runs on the GPU during training and is part of the
exported ONNX graph (the service never computes features itself; ARCHITECTURE.md).

Per row, with ``n`` valid samples (the rest of the row is padding):

1. subtract the mean of the ``n`` valid samples (whole-clip DC removal, §1.1 step 4);
2. snip-edges frames of 400 samples every 160: ``1 + (n - 400) // 160`` frames (§1.2);
3. per frame: remove its mean, pre-emphasise with 0.97 (``x[-1] := x[0]``), symmetric Hann(400),
   zero-pad to 512, power spectrum (257 bins);
4. 128 Kaldi mel triangles (no area normalisation, Nyquist weight 0), ``log(max(E, eps32))``;
5. EAT's length fix-up in the log-mel domain: zero rows past the clip's frames, keep the first
   ``target_frames`` (§1.3); then ``(x - mean) / (2·std)`` (§1.4).

Step 3 up to the FFT is linear in the frame, so it is folded with the real DFT into one constant
``[400, 2·257]`` matrix: one matmul gives the real and imaginary parts. Frames are assembled from
160-sample hops (frame t = hops t, t+1 and half of t+2): only reshapes, slices and matmuls, which
export to ONNX cleanly with a dynamic batch.

Precision: steps 1-4 run in float64, the log-mel is returned in float32. A float32 matmul DFT is
not enough: quiet bins (near the floor, or 30 dB under the frame's loudest bin) are sums of 400
terms that nearly cancel, and float32 rounding of the running sum left up to 1.6e-3 of log error on
the fixtures (torchaudio's float32 FFT: 8e-4). Worse, onnxruntime's CUDA provider runs float32
MatMul in TF32 by default (10-bit mantissa): emulated, that is 0.04-0.7 of log error. float64 is
exact to ~1e-12, immune to TF32 and skipped by autocast; its cost (~0.6 GFLOP per 10 s clip) is
small next to the encoder, except on GPUs with slow float64 (consumer cards: ~0.5 ms per clip).
The float64 constants stay float64 even after ``.half()``/``.float()`` on an enclosing model.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from eat.contract import FRAME_LENGTH_SAMPLES as WINDOW_SAMPLES
from eat.contract import FRAME_SHIFT_SAMPLES as HOP_SAMPLES
from eat.contract import SAMPLE_RATE as SAMPLE_RATE_HZ
from eat.contract import num_frames as _num_frames
from model.config import FrontendConfig

FFT_SIZE = 512  # next power of two above the window (Kaldi's round_to_power_of_two)
NUM_FFT_BINS = FFT_SIZE // 2 + 1  # 257
PREEMPHASIS = 0.97
LOG_FLOOR = float(torch.finfo(torch.float32).eps)  # 1.1920929e-07: torchaudio's floor for float32 input
COMPUTE_DTYPE = torch.float64


class FrontendError(ValueError):
    """Input the front end cannot turn into features (wrong rank, dtype or batch size)."""


def num_frames(num_samples: Tensor | int) -> Tensor | int:
    """Snip-edges frame count ``1 + (n - 400) // 160``, 0 when ``n < 400`` (reference §1.2).

    Written as ``(max(n, 240) - 240) // 160`` so the integer division never sees a negative number
    (ONNX integer ``Div`` truncates where torch floors).
    """
    if isinstance(num_samples, Tensor):
        offset = WINDOW_SAMPLES - HOP_SAMPLES
        return (num_samples.clamp(min=offset) - offset) // HOP_SAMPLES
    return int(_num_frames(int(num_samples)))


def kaldi_mel_banks(
    num_bins: int = 128,
    fft_size: int = FFT_SIZE,
    sample_rate: int = SAMPLE_RATE_HZ,
    low_hz: float = 20.0,
    high_hz: float = 8000.0,
) -> Tensor:
    """Kaldi mel filterbank ``[fft_size/2 + 1, num_bins]`` in float64 (reference §1.2).

    mel(f) = 1127·ln(1 + f/700); ``num_bins + 2`` equally spaced mel points from ``low_hz`` to
    ``high_hz``; triangles with peak 1 (no area normalisation) evaluated at the FFT bin frequencies;
    the Nyquist bin gets weight 0, as in Kaldi and torchaudio.
    """
    if not 0.0 <= low_hz < high_hz <= sample_rate / 2:
        raise ValueError(f"need 0 <= low_hz < high_hz <= Nyquist, got {low_hz}, {high_hz}")

    def mel(hz: Tensor) -> Tensor:
        return 1127.0 * torch.log1p(hz / 700.0)

    mel_low = mel(torch.tensor(low_hz, dtype=torch.float64))
    mel_high = mel(torch.tensor(high_hz, dtype=torch.float64))
    mel_step = (mel_high - mel_low) / (num_bins + 1)
    left = mel_low + torch.arange(num_bins, dtype=torch.float64)[None, :] * mel_step  # [1, M]
    center = left + mel_step
    right = center + mel_step
    bin_hz = torch.arange(fft_size // 2, dtype=torch.float64)[:, None] * (sample_rate / fft_size)  # [K, 1]
    bin_mel = mel(bin_hz)
    rising = (bin_mel - left) / (center - left)
    falling = (right - bin_mel) / (right - center)
    banks = torch.clamp(torch.minimum(rising, falling), min=0.0)  # [K, M]
    return F.pad(banks, (0, 0, 0, 1))  # Nyquist row of zeros -> [K + 1, M]


def folded_dft_matrix() -> Tensor:
    """``[400, 2·257]`` float64: frame -> (Re, Im) of its Kaldi-preprocessed 512-point DFT.

    Composes per-frame DC removal, pre-emphasis (``x[-1] := x[0]``), the symmetric Hann window and
    the real DFT; zero padding to 512 is implicit (those rows would multiply zeros).
    """
    n = WINDOW_SAMPLES
    eye = torch.eye(n, dtype=torch.float64)
    remove_dc = eye - 1.0 / n
    previous = torch.roll(eye, shifts=1, dims=0)  # row i picks x[i-1]
    previous[0] = eye[0]  # x[-1] := x[0]
    preemphasis = eye - PREEMPHASIS * previous
    hann = 0.5 - 0.5 * torch.cos(2.0 * math.pi * torch.arange(n, dtype=torch.float64) / (n - 1))
    # k·t reduced mod 512 in integers, so every angle is exact before the float64 cos/sin
    phase = (torch.arange(NUM_FFT_BINS)[:, None] * torch.arange(n)[None, :]) % FFT_SIZE  # [257, n]
    angle = (2.0 * math.pi / FFT_SIZE) * phase.to(torch.float64)
    dft = torch.cat([torch.cos(angle), -torch.sin(angle)], dim=0)  # [514, n]
    return (dft @ torch.diag(hann) @ preemphasis @ remove_dc).T.contiguous()  # [n, 514]


class LogMelFrontend(nn.Module):
    """``[B, S]`` float32 waveform + ``[B]`` valid sample counts -> ``[B, 1, target_frames, M]`` float32.

    Each row is an independent clip of ``num_samples`` samples (clamped to ``[0, S]``): its features
    equal what EAT computes for that clip alone, zero-padded (log-mel domain) or cropped to
    ``target_frames``. Constants are non-persistent buffers rebuilt from the config, never saved.
    """

    def __init__(self, cfg: FrontendConfig = FrontendConfig()) -> None:  # noqa: B008 (frozen, immutable)
        super().__init__()
        self.cfg = cfg
        self.target_frames = cfg.target_frames
        self.norm_mean = float(cfg.norm_mean)
        self.norm_scale = float(2.0 * cfg.norm_std)  # EAT divides by 2·std (reference §1.4)
        self.register_buffer("dft", folded_dft_matrix(), persistent=False)  # [400, 514] float64
        banks = kaldi_mel_banks(num_bins=cfg.num_mel_bins, sample_rate=cfg.sample_rate)
        self.register_buffer("mel_banks", banks, persistent=False)  # [257, M] float64

    def fbank(self, waveform: Tensor, num_samples: Tensor) -> tuple[Tensor, Tensor]:
        """Log-mel of every frame the row length allows: ``([B, T, M] float32, num_frames [B] int64)``.

        ``T = num_frames(S)``; rows at or past a row's own frame count are 0 (EAT's log-mel padding).
        """
        waveform, num_samples = self._check(waveform, num_samples)
        return self._logmel(waveform, num_samples, num_frames(waveform.shape[1]))

    def forward(self, waveform: Tensor, num_samples: Tensor) -> Tensor:
        """Normalised features ``[B, 1, target_frames, M]``.

        Only the first ``target_frames`` frames are computed (EAT keeps the first frames of a long
        clip, §1.3); the whole-clip mean still uses every valid sample, as EAT removes it first.
        """
        waveform, num_samples = self._check(waveform, num_samples)
        num_computed = min(num_frames(waveform.shape[1]), self.target_frames)
        logmel, _ = self._logmel(waveform, num_samples, num_computed)  # [B, num_computed, M]
        logmel = F.pad(logmel, (0, 0, 0, self.target_frames - num_computed))  # [B, target_frames, M]
        return ((logmel - self.norm_mean) / self.norm_scale).unsqueeze(1)

    def _check(self, waveform: Tensor, num_samples: Tensor) -> tuple[Tensor, Tensor]:
        if not isinstance(waveform, Tensor) or waveform.dim() != 2:
            raise FrontendError(f"waveform must be a [batch, samples] tensor, got {_describe(waveform)}")
        if not waveform.is_floating_point():
            raise FrontendError(
                f"waveform must be float in [-1, 1], got {waveform.dtype}; divide int16 PCM by 32768"
            )
        if not isinstance(num_samples, Tensor) or num_samples.dim() != 1:
            raise FrontendError(f"num_samples must be a [batch] integer tensor, got {_describe(num_samples)}")
        if num_samples.is_floating_point() or num_samples.is_complex() or num_samples.dtype == torch.bool:
            raise FrontendError(f"num_samples must be an integer tensor, got {num_samples.dtype}")
        if num_samples.shape[0] != waveform.shape[0]:
            raise FrontendError(
                f"num_samples has {num_samples.shape[0]} entries for a batch of {waveform.shape[0]} rows"
            )
        return waveform, num_samples.to(torch.int64)

    def _logmel(self, waveform: Tensor, num_samples: Tensor, num_out: int) -> tuple[Tensor, Tensor]:
        """float32 log-mel of the first ``num_out`` frames ``[B, num_out, M]`` and frame counts ``[B]``."""
        batch, length = waveform.shape
        signal = waveform.to(COMPUTE_DTYPE)
        valid_samples = num_samples.clamp(min=0, max=length)  # [B]
        row_frames = num_frames(valid_samples)  # [B]
        is_valid = torch.arange(length, device=signal.device)[None, :] < valid_samples[:, None]  # [B, S]
        signal = torch.where(is_valid, signal, 0.0)  # padding may hold anything, even NaN
        clip_mean = signal.sum(dim=1, keepdim=True) / valid_samples.clamp(min=1)[:, None].to(signal.dtype)
        signal = torch.where(is_valid, signal - clip_mean, 0.0)  # [B, S]

        # Frame t = hops t, t+1 and the first 80 samples of t+2. Frames inside the row never read
        # the zeros appended or the samples cut off here.
        num_hops = num_out + 2
        needed = num_hops * HOP_SAMPLES
        signal = F.pad(signal, (0, needed - length)) if needed > length else signal[:, :needed]
        hops = signal.reshape(batch, num_hops, HOP_SAMPLES)  # [B, T+2, 160]
        tail = WINDOW_SAMPLES - 2 * HOP_SAMPLES
        frames = torch.cat([hops[:, :num_out], hops[:, 1 : num_out + 1], hops[:, 2:, :tail]], dim=2)

        spectrum = frames @ self.dft  # [B, T, 514]
        real, imag = spectrum[..., :NUM_FFT_BINS], spectrum[..., NUM_FFT_BINS:]
        power = real * real + imag * imag  # [B, T, 257]
        logmel = torch.log(torch.clamp(power @ self.mel_banks, min=LOG_FLOOR)).to(torch.float32)

        frame_index = torch.arange(num_out, device=signal.device)  # [T]
        in_clip = frame_index[None, :] < row_frames[:, None]  # [B, T]
        return torch.where(in_clip[:, :, None], logmel, 0.0), row_frames  # [B, T, M]

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> LogMelFrontend:
        """Follow device moves but keep the constants float64 (``.half()`` would ruin the DFT)."""
        super()._apply(fn, recurse)
        for name in ("dft", "mel_banks"):
            buffer = getattr(self, name)
            if buffer.dtype != COMPUTE_DTYPE:
                fresh = folded_dft_matrix() if name == "dft" else kaldi_mel_banks(self.cfg.num_mel_bins)
                setattr(self, name, fresh.to(buffer.device))
        return self


def _describe(value: object) -> str:
    return f"shape {tuple(value.shape)}" if isinstance(value, Tensor) else type(value).__name__
