"""Fine-tuning augmentations on batched tensors, on the device (reference §1.1 step 5, §4.2).

Order in a training step (as EAT): ``roll_and_gain`` on waveforms -> front end (fbank, pad, normalise)
-> ``spectrogram_noise_and_roll`` (SPC-2 only) -> ``mixup`` -> ``spec_augment``.

Every function draws its randomness from ``generator`` when given, else from torch's global RNG; the
training loop owns that state and saves it with the checkpoint, so a resumed run draws the same masks.
Random numbers are drawn on the generator's device (the data's device when there is none) and moved
to the data: keep the generator on the data's device for the big draws (``spectrogram_noise_and_roll``).
The Gamma/Beta draws (gain, λ) are a few numbers per batch from a rejection sampler that checks for
leftovers; on a CUDA generator that check is a small device sync per call.
The functions are vectorised over the batch: no Python loop over rows.
"""

from __future__ import annotations

import math

import torch

# Reference §1.1: gain m = Beta(10, 10) + 0.5, range 0.5-1.5.
GAIN_BETA = 10.0
GAMMA_CANDIDATES = 4  # Marsaglia-Tsang accepts >= 95 %; four tries leave ~1e-5 for the retry loop


def _device(generator: torch.Generator | None, fallback: torch.device) -> torch.device:
    return generator.device if generator is not None else fallback


def _rand(size: tuple[int, ...], generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    return torch.rand(size, generator=generator, device=_device(generator, device)).to(device)


def sample_gamma(
    concentration: float, size: int, generator: torch.Generator | None = None, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """Gamma(concentration, 1) samples, float32 [size], from ``generator`` (torch's own Gamma has none).

    Marsaglia and Tsang's squeeze method (2000); below 1 the usual boost Gamma(a+1)·U^(1/a).
    """
    if concentration <= 0:
        raise ValueError(f"concentration must be positive, got {concentration}")
    draw_device = _device(generator, torch.device(device))
    a = concentration + 1.0 if concentration < 1 else concentration
    d = a - 1.0 / 3.0
    c = 1.0 / math.sqrt(9.0 * d)
    out = torch.empty(size, dtype=torch.float64, device=draw_device)
    todo = torch.ones(size, dtype=torch.bool, device=draw_device)
    while bool(todo.any()):
        rows = int(todo.sum())
        x = torch.randn((rows, GAMMA_CANDIDATES), generator=generator, device=draw_device, dtype=torch.float64)
        u = torch.rand((rows, GAMMA_CANDIDATES), generator=generator, device=draw_device, dtype=torch.float64)
        v = (1.0 + c * x) ** 3
        ok = (v > 0) & (torch.log(u) < 0.5 * x**2 + d - d * v + d * torch.log(v.clamp_min(1e-300)))
        first = ok.to(torch.int8).argmax(dim=1)  # first accepted candidate per row
        value = (d * v).gather(1, first[:, None])[:, 0]
        accepted = ok.any(dim=1)
        idx = todo.nonzero()[:, 0]
        out[idx[accepted]] = value[accepted]
        todo[idx[accepted]] = False
    if concentration < 1:
        u = torch.rand(size, generator=generator, device=draw_device, dtype=torch.float64)
        out = out * u ** (1.0 / concentration)
    return out.to(device=torch.device(device), dtype=torch.float32)


def sample_beta(
    alpha: float, beta: float, size: int, generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Beta(alpha, beta) samples, float32 [size]: X / (X + Y) with X, Y independent Gammas."""
    x = sample_gamma(alpha, size, generator, device)
    y = sample_gamma(beta, size, generator, device)
    return x / (x + y)


def roll_and_gain(
    waveform: torch.Tensor, num_samples: torch.Tensor, generator: torch.Generator | None = None
) -> torch.Tensor:
    """EAT's ``roll_aug``: roll each row circularly by U{0..n-1}, then scale by Beta(10,10) + 0.5.

    waveform: float [B, S]; num_samples: int [B]. Only each row's first ``n`` (valid) samples take part
    in its roll, so zero padding stays at the end, where the front end expects it (§1.1, §1.3).
    """
    batch, width = waveform.shape
    device = waveform.device
    valid = num_samples.to(device=device, dtype=torch.int64).clamp(1, width)[:, None]  # [B, 1]
    shift = (_rand((batch,), generator, device) * valid[:, 0]).long().clamp_max(valid[:, 0] - 1)[:, None]
    pos = torch.arange(width, device=device)[None, :]  # [1, S]
    source = torch.where(pos < valid, (pos - shift) % valid, pos)  # [B, S]
    rolled = torch.gather(waveform, 1, source)
    gain = sample_beta(GAIN_BETA, GAIN_BETA, batch, generator, device) + 0.5  # [B]
    return rolled * gain.to(waveform.dtype)[:, None]


def mixup(
    x: torch.Tensor, target: torch.Tensor, alpha: float, prob: float, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Batch mixup (timm's "batch" mode, §4.2): with probability ``prob`` mix every row with the batch
    reversed using one λ ~ Beta(α, α); targets (float [B, C]) mix with the same λ, no label smoothing.

    x: [B, ...] (EAT mixes the normalised fbank). Returns (x, target, λ as a 0-d tensor; 1 = no mix).
    λ stays a tensor so nothing waits for the device. An odd batch mixes its middle row with itself.
    """
    if not target.is_floating_point():
        raise TypeError("mixup needs float multi-hot / one-hot targets [B, C], not class indices")
    if alpha <= 0 or prob <= 0:
        return x, target, torch.ones((), device=x.device)
    coin = _rand((1,), generator, x.device)[0]
    lam = sample_beta(alpha, alpha, 1, generator, x.device)[0]
    lam = torch.where(coin < prob, lam, torch.ones_like(lam))
    mixed_x = x * lam.to(x.dtype) + x.flip(0) * (1 - lam).to(x.dtype)
    mixed_t = target * lam.to(target.dtype) + target.flip(0) * (1 - lam).to(target.dtype)
    return mixed_x, mixed_t, lam


def spec_augment_widths(mask_ratio: float, target_frames: int, num_mel_bins: int = 128) -> tuple[float, float]:
    """(freq, time) mask parameters from EAT's ``mask_ratio`` (§4.2, §9.14): 128·r bins, T·r frames."""
    return num_mel_bins * mask_ratio, target_frames * mask_ratio


def _band(
    batch: int, size: int, param: float, generator: torch.Generator | None, device: torch.device
) -> torch.Tensor:
    """[B, size] bool: one band per row, width floor(U·param), start floor(U·(size - width))."""
    param = min(param, float(size))
    r = _rand((batch, 2), generator, device)
    width = r[:, 0] * param
    start = r[:, 1] * (size - width)
    first = start.long()[:, None]
    last = first + width.long()[:, None]
    idx = torch.arange(size, device=device)[None, :]
    return (idx >= first) & (idx < last)


def spec_augment(
    fbank: torch.Tensor,
    freq_mask_param: float,
    time_mask_param: float,
    generator: torch.Generator | None = None,
    fill_value: float = 0.0,
) -> torch.Tensor:
    """One frequency mask and one time mask per example, set to ``fill_value`` (0 in the normalised
    domain, as EAT applies torchaudio's masking after normalisation and mixup, §4.2).

    fbank: [B, 1, T, F] or [B, T, F]; widths ~ U[0, param) like torchaudio's iid masks. The time mask
    may fall on padded frames, as in EAT. Returns a new tensor.
    """
    batch, frames, bins = fbank.shape[0], fbank.shape[-2], fbank.shape[-1]
    freq = _band(batch, bins, freq_mask_param, generator, fbank.device)  # [B, F]
    time = _band(batch, frames, time_mask_param, generator, fbank.device)  # [B, T]
    mask = time[:, :, None] | freq[:, None, :]  # [B, T, F]
    if fbank.dim() == 4:
        mask = mask[:, None]  # [B, 1, T, F]
    return fbank.masked_fill(mask, fill_value)


def spectrogram_noise_and_roll(
    fbank: torch.Tensor, generator: torch.Generator | None = None, max_shift: int = 10
) -> torch.Tensor:
    """SPC-2's extra augmentation (§4.2 step 1): add U(0,1)·rand(T, F)/10 (one scale per clip) in the
    normalised domain, then roll each clip along time by an integer in [-max_shift, max_shift - 1].

    fbank: [B, 1, T, F] or [B, T, F].
    """
    batch, frames = fbank.shape[0], fbank.shape[-2]
    device = fbank.device
    view = [batch] + [1] * (fbank.dim() - 1)
    scale = _rand((batch,), generator, device).view(view)
    noise = _rand(tuple(fbank.shape), generator, device)
    noisy = fbank + noise.to(fbank.dtype) * scale.to(fbank.dtype) / 10
    shift = (_rand((batch,), generator, device) * (2 * max_shift)).long() - max_shift  # [B] in [-m, m-1]
    source = (torch.arange(frames, device=device)[None, :] - shift[:, None]) % frames  # [B, T]
    index_shape = [batch] + [1] * (fbank.dim() - 3) + [frames, 1]
    index = source.view(index_shape).expand_as(noisy)
    return torch.gather(noisy, -2, index)
