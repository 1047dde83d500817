"""Batched augmentations: shapes, what each leaves untouched, and the statistics of their draws."""

from __future__ import annotations

import math

import pytest
import torch

from training import augment


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize(("a", "b"), [(0.8, 0.8), (10.0, 10.0), (2.0, 0.5)])
def test_beta_samples_have_the_right_moments(a: float, b: float) -> None:
    x = augment.sample_beta(a, b, 20_000, _gen())
    assert x.dtype == torch.float32 and x.shape == (20_000,) and x.min() >= 0 and x.max() <= 1
    mean, var = a / (a + b), a * b / ((a + b) ** 2 * (a + b + 1))
    assert float(x.mean()) == pytest.approx(mean, abs=4 * math.sqrt(var / 20_000))
    assert float(x.var()) == pytest.approx(var, rel=0.05)


def test_roll_and_gain_rolls_inside_the_valid_part_only() -> None:
    batch, width = 64, 50
    num_samples = torch.randint(1, width + 1, (batch,), generator=_gen(1))
    pos = torch.arange(width)
    wave = torch.where(pos < num_samples[:, None], pos + 1.0, torch.zeros(()))  # 1..n then zero padding
    out = augment.roll_and_gain(wave, num_samples, _gen(2))
    assert out.shape == wave.shape and out.dtype == wave.dtype
    shifts = []
    for row in range(batch):
        n = int(num_samples[row])
        gain = float(out[row].abs().max() / n)  # the largest value n moved somewhere; scale recovers gain
        assert 0.5 <= gain <= 1.5
        assert torch.all(out[row, n:] == 0)  # padding untouched
        restored = torch.round(out[row, :n] / gain)
        shift = (n - int(restored[0]) + 1) % n  # out[i] = wave[(i - shift) mod n]
        expected = torch.roll(wave[row, :n], shift)
        torch.testing.assert_close(restored, expected)
        shifts.append(shift / max(n - 1, 1))
    assert 0.3 < sum(shifts) / batch < 0.7  # shifts spread over [0, n)


def test_roll_gain_statistics_and_determinism() -> None:
    wave = torch.ones(4000, 16)
    out = augment.roll_and_gain(wave, torch.full((4000,), 16), _gen(3))
    gain = out[:, 0]
    assert torch.allclose(out, gain[:, None].expand_as(out))  # a constant row stays constant
    assert float(gain.mean()) == pytest.approx(1.0, abs=0.01)
    assert float(gain.std()) == pytest.approx(math.sqrt(100 / (20**2 * 21)), rel=0.05)  # Beta(10,10) std
    assert float(gain.min()) >= 0.5 and float(gain.max()) <= 1.5
    again = augment.roll_and_gain(wave, torch.full((4000,), 16), _gen(3))
    assert torch.equal(out, again)
    torch.manual_seed(0)  # the global RNG path works too
    assert augment.roll_and_gain(wave[:2], torch.tensor([16, 3])).shape == (2, 16)


def test_mixup_mixes_inputs_and_targets_with_one_lambda() -> None:
    x = torch.randn(6, 1, 8, 4, generator=_gen(0))
    target = torch.eye(6)[:, :5]
    mixed, mixed_target, lam = augment.mixup(x, target, alpha=0.8, prob=1.0, generator=_gen(1))
    assert lam.dim() == 0 and 0 < float(lam) < 1
    torch.testing.assert_close(mixed, lam * x + (1 - lam) * x.flip(0))
    torch.testing.assert_close(mixed_target, lam * target + (1 - lam) * target.flip(0))
    same, same_target, one = augment.mixup(x, target, alpha=0.8, prob=0.0, generator=_gen(1))
    assert float(one) == 1.0 and same is x and same_target is target
    with pytest.raises(TypeError, match="float"):
        augment.mixup(x, torch.arange(6), 0.8, 1.0)


def test_mixup_applies_with_probability_prob() -> None:
    g = _gen(2)
    x, target = torch.zeros(2, 3), torch.zeros(2, 3)
    lams = torch.stack([augment.mixup(x, target, 0.8, 0.7, g)[2] for _ in range(1000)])
    applied = lams < 1
    assert 0.65 < float(applied.float().mean()) < 0.75
    assert float(lams[applied].mean()) == pytest.approx(0.5, abs=0.04)


def test_spec_augment_masks_one_band_per_axis_per_example() -> None:
    batch, frames, bins = 500, 64, 128
    fbank = torch.rand(batch, 1, frames, bins, generator=_gen(0)) + 1.0  # never 0 before masking
    freq_param, time_param = augment.spec_augment_widths(0.2, frames, bins)
    assert (freq_param, time_param) == pytest.approx((25.6, 12.8))
    out = augment.spec_augment(fbank, freq_param, time_param, _gen(1))
    assert out.shape == fbank.shape
    zero = out[:, 0] == 0  # [B, T, F]
    unmasked = ~zero
    assert torch.equal(out[:, 0][unmasked], fbank[:, 0][unmasked])  # everything else untouched
    time_masked = zero.all(dim=2)  # whole frames set to 0
    freq_masked = zero.all(dim=1)  # whole bins set to 0
    # Every zero lies in a masked frame or a masked bin, and each mask is one contiguous band.
    assert torch.equal(zero, time_masked[:, :, None] | freq_masked[:, None, :])
    for masks, param in ((freq_masked, freq_param), (time_masked, time_param)):
        widths = masks.sum(dim=1).float()
        assert float(widths.max()) < param
        assert float(widths.mean()) == pytest.approx(param / 2 - 0.5, abs=1.0)  # floor(U[0, param))
        for row in masks[:50]:
            idx = row.nonzero()[:, 0]
            if len(idx):
                assert int(idx[-1] - idx[0]) + 1 == len(idx)
    three_d = augment.spec_augment(fbank[:, 0], freq_param, time_param, _gen(1), fill_value=-1.0)
    assert torch.equal(three_d == -1.0, zero)  # same draws, other fill value, [B, T, F] input
    assert torch.equal(augment.spec_augment(fbank, 0.0, 0.0, _gen(1)), fbank)


def test_spectrogram_noise_and_roll() -> None:
    batch, frames, bins = 300, 32, 8
    step = torch.arange(frames, dtype=torch.float32)[None, None, :, None] * 1000
    fbank = step.expand(batch, 1, frames, bins).clone()
    out = augment.spectrogram_noise_and_roll(fbank, _gen(0))
    assert out.shape == fbank.shape
    source = torch.floor(out / 1000)  # the noise is < 0.1, so the frame index survives
    noise = out - source * 1000
    assert float(noise.min()) >= 0 and float(noise.max()) < 0.1 + 1e-3
    shift = (torch.arange(frames)[None, :] - source[:, 0, :, 0].long()) % frames  # [B, T], constant per row
    assert torch.all(shift == shift[:, :1])
    signed = torch.where(shift[:, 0] >= frames // 2, shift[:, 0] - frames, shift[:, 0])
    assert int(signed.min()) == -10 and int(signed.max()) == 9
    # One noise scale per clip: the per-clip maximum noise varies between clips, up to ~0.1.
    per_clip_max = noise.amax(dim=(1, 2, 3))
    assert float(per_clip_max.max()) > 0.09 and float(per_clip_max.min()) < 0.03
