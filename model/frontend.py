"""16 kHz waveform -> normalised Kaldi log-mel, as EAT computes it (eat-reference.md §1).

Everything is plain torch ops on batches, so the front end runs on the GPU during training and is part
of the exported ONNX graph (the service never computes features itself; ARCHITECTURE.md).

Per row, with ``n`` valid samples (the rest of the row is padding):

1. subtract the mean of the ``n`` valid samples (whole-clip DC removal, §1.1 step 4);
2. cut snip-edges frames of 400 samples every 160 (``1 + (n - 400) // 160`` frames, §1.2);
3. per frame: remove its mean, pre-emphasise with 0.97 (``x[-1] := x[0]``), apply a symmetric
   Hann(400) window, zero-pad to 512 and take the power spectrum (257 bins);
4. 128 Kaldi mel triangles (no area normalisation, Nyquist weight 0), ``log(max(E, eps32))``;
5. EAT's length fix-up in the log-mel domain: zero rows past the clip's frames, keep the first
   ``target_frames`` (§1.3); then ``(x - mean) / (2·std)`` (§1.4).

Step 3 up to the FFT is linear in the frame, so it is folded with the real DFT into one constant
``[400, 514]`` matrix (built in float64, stored in float32): one matmul gives real and imaginary
parts. The frames are never materialised with a strided view: the row is reshaped into 160-sample
hops and frame ``t`` = hops ``t``, ``t+1`` and half of ``t+2``, so the graph has only reshapes,
slices and matmuls (clean ONNX with a dynamic batch).

Note: in exact arithmetic step 1 changes nothing (step 3 removes every frame's mean); it is kept
because it removes a large DC offset before the float32 matmul, where it would cost precision.

Precision: keep this module in float32 (also in an fp16 export): power spectra of loud audio exceed
the fp16 range, and the folded matmul must not run in TF32.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model.config import FrontendConfig

SAMPLE_RATE_HZ = 16_000
WINDOW_SAMPLES = 400  # 25 ms
HOP_SAMPLES = 160  # 10 ms
FFT_SIZE = 512  # next power of two above the window (round_to_power_of_two)
NUM_FFT_BINS = FFT_SIZE // 2 + 1  # 257
PREEMPHASIS = 0.97
_HOPS_PER_FRAME = 3  # a 400-sample frame spans 3 hops of 160 (160 + 160 + 80)
LOG_FLOOR = float(torch.finfo(torch.float32).eps)  # 1.1920929e-07, torchaudio's floor for float32 input


class FrontendError(ValueError):
    """Input the front end cannot turn into features (wrong rank, dtype or batch size)."""


def num_frames(num_samples: Tensor | int) -> Tensor | int:
    """Snip-edges frame count ``1 + (n - 400) // 160``, 0 when ``n < 400`` (reference §1.2).

    Written as ``(max(n, 240) - 240) // 160`` so integer division never sees a negative number (ONNX
    integer ``Div`` truncates, torch floors).
    """
    offset = WINDOW_SAMPLES - HOP_SAMPLES
    if isinstance(num_samples, Tensor):
        return (num_samples.clamp(min=offset) - offset) // HOP_SAMPLES
    return max(int(num_samples) - offset, 0) // HOP_SAMPLES


def kaldi_mel_banks(
    num_bins: int = 128,
    fft_size: int = FFT_SIZE,
    sample_rate: int = SAMPLE_RATE_HZ,
    low_hz: float = 20.0,
    high_hz: float = 8000.0,
) -> Tensor:
    """Kaldi mel filterbank ``[fft_size/2 + 1, num_bins]`` float64 (reference §1.2).

    mel(f) = 1127·ln(1 + f/700); ``num_bins + 2`` equally spaced mel points between ``low_hz`` and
    ``high_hz``; triangles with peak 1 (no area normalisation) evaluated at FFT bin frequencies; the
    Nyquist bin gets weight 0, as in Kaldi/torchaudio.
    """
    if not 0.0 <= low_hz < high_hz <= sample_rate / 2:
        raise ValueError(f"need 0 <= low_hz < high_hz <= Nyquist, got {low_hz}, {high_hz}")

    def mel(hz: Tensor) -> Tensor:
        return 1127.0 * torch.log1p(hz / 700.0)

    num_fft_bins = fft_size // 2
    mel_low = mel(torch.tensor(low_hz, dtype=torch.float64))
    mel_high = mel(torch.tensor(high_hz, dtype=torch.float64))
    mel_step = (mel_high - mel_low) / (num_bins + 1)
    left = mel_low + torch.arange(num_bins, dtype=torch.float64)[None, :] * mel_step  # [1, M]
    center = left + mel_step
    right = center + mel_step
    bin_hz = torch.arange(num_fft_bins, dtype=torch.float64)[:, None] * (sample_rate / fft_size)  # [K, 1]
    bin_mel = mel(bin_hz)
    up = (bin_mel - left) / (center - left)
    down = (right - bin_mel) / (right - center)
    banks = torch.clamp(torch.minimum(up, down), min=0.0)  # [K, M]
    return F.pad(banks, (0, 0, 0, 1))  # Nyquist row = 0 -> [K + 1, M]


def windowed_dft_matrix() -> tuple[Tensor, Tensor]:
    """Kaldi's per-frame processing as ``(matrix [400, 2·257], dc_response [2·257])`` in float64.

    For a frame ``x`` with mean ``mu`` and the row's pre-emphasised signal ``p[n] = x[n] - 0.97·x[n-1]``,
    the (Re, Im) spectrum of DC removal -> pre-emphasis (``x[-1] := x[0]``) -> symmetric Hann -> 512-point
    DFT is ``p_frame @ matrix - mu · dc_response``: after DC removal the pre-emphasised sample is
    ``p[n] - 0.03·mu`` for n >= 1, and sample 0 (the only one using ``x[-1] := x[0]``) has window weight 0.
    Pre-emphasising before the matmul matters for float32: it shrinks low-frequency energy (which the
    matrix would otherwise have to cancel) so quiet bins keep their precision.
    """
    n = WINDOW_SAMPLES
    hann = 0.5 - 0.5 * torch.cos(2.0 * math.pi * torch.arange(n, dtype=torch.float64) / (n - 1))
    assert hann[0] == 0.0  # the folding below relies on it
    # exact phases: reduce k·t mod 512 in integers before scaling
    phase = (torch.arange(n)[:, None] * torch.arange(NUM_FFT_BINS)[None, :]) % FFT_SIZE  # [n, 257]
    angle = 2.0 * math.pi * phase.to(torch.float64) / FFT_SIZE
    dft = torch.cat([torch.cos(angle), -torch.sin(angle)], dim=1)  # [n, 514]
    matrix = hann[:, None] * dft  # [n, 514]
    dc_response = (1.0 - PREEMPHASIS) * matrix.sum(dim=0)  # [514]
    return matrix, dc_response


class LogMelFrontend(nn.Module):
    """``[B, S]`` float32 waveform + ``[B]`` valid sample counts -> ``[B, 1, target_frames, 128]``.

    Rows are treated as independent clips of ``num_samples`` samples (clamped to ``[0, S]``): the
    features of a short row equal what EAT computes for that clip alone, padded to ``target_frames``.
    The constants are non-persistent buffers, rebuilt from the config, never stored in checkpoints.
    """

    def __init__(self, cfg: FrontendConfig = FrontendConfig()) -> None:  # noqa: B008 (frozen config)
        super().__init__()
        self.cfg = cfg
        self.num_mel_bins = cfg.num_mel_bins
        self.target_frames = cfg.target_frames
        self.norm_mean = float(cfg.norm_mean)
        self.norm_scale = float(2.0 * cfg.norm_std)  # EAT divides by 2·std (reference §1.4)
        matrix, dc_response = windowed_dft_matrix()  # [400, 514], [514]
        # Frames are read as 3 whole hops (480 samples); the 80 past the window get zero weight.
        matrix = F.pad(matrix, (0, 0, 0, _HOPS_PER_FRAME * HOP_SAMPLES - WINDOW_SAMPLES))  # [480, 514]
        self.register_buffer("dft", matrix.to(torch.float32), persistent=False)
        self.register_buffer("dc_response", dc_response.to(torch.float32), persistent=False)
        banks = kaldi_mel_banks(num_bins=cfg.num_mel_bins, sample_rate=cfg.sample_rate)
        self.register_buffer("mel_banks", banks.to(torch.float32), persistent=False)  # [257, M]

    def fbank(self, waveform: Tensor, num_samples: Tensor) -> tuple[Tensor, Tensor]:
        """Log-mel of every frame of the row: ``([B, T, M] float32, num_frames [B] int64)``.

        ``T = num_frames(S)``; rows at or past a row's own frame count are 0 (EAT's log-mel padding).
        """
        waveform, num_samples = self._check(waveform, num_samples)
        return self._logmel(waveform, num_samples, num_frames(waveform.shape[1]))

    def forward(self, waveform: Tensor, num_samples: Tensor) -> Tensor:
        """Normalised features ``[B, 1, target_frames, M]``: only the first ``target_frames`` frames are
        computed (EAT keeps the first frames of a long clip), missing ones are log-mel zeros."""
        waveform, num_samples = self._check(waveform, num_samples)
        computed = min(num_frames(waveform.shape[1]), self.target_frames)
        logmel, _ = self._logmel(waveform, num_samples, computed)  # [B, computed, M]
        logmel = F.pad(logmel, (0, 0, 0, self.target_frames - computed))  # [B, target_frames, M]
        normalised = (logmel - self.norm_mean) / self.norm_scale
        return normalised.unsqueeze(1)

    def _check(self, waveform: Tensor, num_samples: Tensor) -> tuple[Tensor, Tensor]:
        if waveform.dim() != 2:
            raise FrontendError(f"waveform must be [batch, samples], got shape {tuple(waveform.shape)}")
        if not waveform.is_floating_point():
            raise FrontendError(
                f"waveform must be float in [-1, 1], got {waveform.dtype}; divide int16 PCM by 32768"
            )
        if not isinstance(num_samples, Tensor) or num_samples.dim() != 1:
            raise FrontendError("num_samples must be a 1-D integer tensor with one count per row")
        if num_samples.is_floating_point() or num_samples.is_complex():
            raise FrontendError(f"num_samples must be an integer tensor, got {num_samples.dtype}")
        if num_samples.shape[0] != waveform.shape[0]:
            raise FrontendError(
                f"num_samples has {num_samples.shape[0]} entries for a batch of {waveform.shape[0]}"
            )
        # compute in the buffers' dtype: float32 normally, float64 after .double() (precision checks)
        return waveform.to(self.dft.dtype), num_samples.to(torch.int64)

    def _logmel(self, waveform: Tensor, num_samples: Tensor, num_out: int) -> tuple[Tensor, Tensor]:
        """Log-mel of the first ``num_out`` frames ``[B, num_out, M]`` and the frame counts ``[B]``."""
        batch, length = waveform.shape
        valid_samples = num_samples.clamp(min=0, max=length)  # [B]
        row_frames = num_frames(valid_samples)  # [B]
        is_valid = torch.arange(length, device=waveform.device)[None, :] < valid_samples[:, None]  # [B, S]
        kept = torch.where(is_valid, waveform, 0.0)
        clip_mean = kept.sum(dim=1, keepdim=True) / valid_samples.clamp(min=1)[:, None].to(kept.dtype)
        centred = torch.where(is_valid, waveform - clip_mean, 0.0)  # [B, S]
        emphasised = centred - PREEMPHASIS * F.pad(centred, (1, -1))  # [B, S]; sample 0 is never used

        # Frame t = hops t, t+1, t+2 (its last 80 samples get zero weight). A frame inside the row never
        # reads the zeros appended or the samples cut here.
        num_hops = num_out + _HOPS_PER_FRAME - 1
        centred_hops = self._hops(centred, num_hops)  # [B, T+2, 160]
        emphasised_hops = self._hops(emphasised, num_hops)
        frames = torch.cat([emphasised_hops[:, i : i + num_out] for i in range(_HOPS_PER_FRAME)], dim=2)
        hop_sums = centred_hops.sum(dim=2)  # [B, T+2]
        tail = WINDOW_SAMPLES - (_HOPS_PER_FRAME - 1) * HOP_SAMPLES  # 80 samples of the third hop
        tail_sums = centred_hops[:, :, :tail].sum(dim=2)
        frame_mean = (hop_sums[:, :num_out] + hop_sums[:, 1 : num_out + 1] + tail_sums[:, 2:]) / WINDOW_SAMPLES

        spectrum = frames @ self.dft - frame_mean[:, :, None] * self.dc_response  # [B, T, 514]
        real, imag = spectrum[..., :NUM_FFT_BINS], spectrum[..., NUM_FFT_BINS:]
        power = real * real + imag * imag  # [B, T, 257]
        mel = power @ self.mel_banks  # [B, T, M]
        logmel = torch.log(torch.clamp(mel, min=LOG_FLOOR))

        frame_index = torch.arange(num_out, device=waveform.device)  # [T]
        in_clip = frame_index[None, :] < row_frames[:, None]  # [B, T]
        logmel = torch.where(in_clip[:, :, None], logmel, 0.0)
        return logmel, row_frames

    @staticmethod
    def _hops(signal: Tensor, num_hops: int) -> Tensor:
        """``[B, S]`` -> ``[B, num_hops, 160]``, zero-padding or cutting the tail."""
        needed = num_hops * HOP_SAMPLES
        length = signal.shape[1]
        signal = F.pad(signal, (0, needed - length)) if needed > length else signal[:, :needed]
        return signal.reshape(signal.shape[0], num_hops, HOP_SAMPLES)
