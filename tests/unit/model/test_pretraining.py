"""Pre-training model: parity with the official loss fixture, EMA teacher, decoder and loss options."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from model.checkpoints import fairseq_to_ours
from model.config import EATConfig
from model.encoder import Encoder
from model.masking import inverse_block_mask
from model.pretraining import (
    CNNDecoder,
    EATPretrainingModel,
    ema_decay,
    ema_update,
    make_teacher,
    teacher_targets,
)

# The official fixture model (fixtures/README.md §2).
FIXTURE_CFG = EATConfig(
    embed_dim=64, depth=2, num_heads=2, decoder_dim=64, decoder_layers=2, decoder_kernel=3, decoder_groups=16
)
SMALL_CFG = EATConfig(embed_dim=32, depth=2, num_heads=2, decoder_dim=32, decoder_layers=2, decoder_groups=16)


@pytest.fixture(scope="module")
def official(fixtures_dir: Path) -> dict:
    folder = fixtures_dir / "eat-official"
    ckpt = torch.load(folder / "pretrain.pt", map_location="cpu", weights_only=True)
    student = EATPretrainingModel(FIXTURE_CFG, clone_batch=16, mask_noise_std=0.0)
    student.load_state_dict(fairseq_to_ours(ckpt["model"]), strict=True)
    teacher = Encoder(FIXTURE_CFG)
    teacher_state = fairseq_to_ours(ckpt["model"], teacher=True)
    teacher.load_state_dict({k.removeprefix("encoder."): v for k, v in teacher_state.items()}, strict=True)
    return {
        "student": student,
        "teacher": make_teacher(teacher),
        "io": dict(np.load(folder / "io.npz")),
        "loss": dict(np.load(folder / "loss.npz")),
    }


def _max_abs(a: torch.Tensor, b: np.ndarray) -> float:
    return (a.detach().double() - torch.from_numpy(b).double()).abs().max().item()


def test_teacher_targets_match_official(official: dict) -> None:
    y = teacher_targets(official["teacher"], torch.from_numpy(official["io"]["fbank"]))
    assert y.shape == (2, 512, 64) and y.dtype == torch.float32 and not y.requires_grad
    assert _max_abs(y, official["loss"]["targets"]) <= 1e-4  # measured 7.5e-6


def test_pretraining_loss_matches_official(official: dict) -> None:
    ref = official["loss"]
    fbank = torch.from_numpy(official["io"]["fbank"])
    targets = teacher_targets(official["teacher"], fbank)
    out = official["student"](fbank, torch.from_numpy(ref["mask"]).bool(), targets)

    assert _max_abs(out.cls_pred, ref["cls_pred"]) <= 1e-4  # measured 2.2e-6
    rows = torch.from_numpy(ref["decoder_out_row_index"])
    assert _max_abs(out.predictions[rows], ref["decoder_out_rows"]) <= 1e-4  # measured 2.9e-6
    assert int(out.sample_size) == int(ref["sample_size"]) == 13120
    assert out.frame_loss_sum.item() == pytest.approx(float(ref["frame_loss_sum"]), rel=1e-5)
    assert out.utterance_loss_sum.item() == pytest.approx(float(ref["utterance_loss_sum"]), rel=1e-5)
    reported = float(ref["criterion_loss"]) / float(ref["sample_size"])
    assert out.loss.item() == pytest.approx(reported, rel=1e-5)
    assert out.loss.item() == pytest.approx(float(ref["reported_loss"]), rel=1e-5)


def test_utterance_target_is_mean_of_frame_targets(official: dict) -> None:
    ref = official["loss"]
    assert np.allclose(ref["targets"].mean(axis=1), ref["cls_target"], atol=1e-6)


def test_state_dict_keys_are_encoder_and_decoder() -> None:
    model = EATPretrainingModel(SMALL_CFG)
    keys = set(model.state_dict())
    assert all(k.startswith(("encoder.", "decoder.")) for k in keys)
    assert {"decoder.blocks.0.conv.weight", "decoder.blocks.1.conv.bias", "decoder.proj.weight"} <= keys
    assert model.decoder.blocks[0].conv.groups == 16


def _random_inputs(cfg: EATConfig, num_clips: int, num_frames: int, clone_batch: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    fbank = torch.randn(num_clips, 1, num_frames, 128, generator=gen)
    grid = (num_frames // 16, 8)
    mask = inverse_block_mask(num_clips * clone_batch, grid, generator=gen)
    return fbank, mask


def test_gradients_reach_student_and_decoder_but_not_teacher() -> None:
    torch.manual_seed(0)
    model = EATPretrainingModel(SMALL_CFG, clone_batch=4)
    model.init_weights()
    teacher = make_teacher(model.encoder)
    assert not any(p.requires_grad for p in teacher.parameters()) and not teacher.training
    fbank, mask = _random_inputs(SMALL_CFG, 2, 256, 4)
    targets = teacher_targets(teacher, fbank)
    assert not targets.requires_grad
    out = model(fbank, mask, targets)
    out.loss.backward()
    for name, param in model.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name
    assert all(p.grad is None for p in teacher.parameters())


def test_clone_rows_are_clip_major_and_see_only_visible_tokens() -> None:
    torch.manual_seed(1)
    model = EATPretrainingModel(SMALL_CFG, clone_batch=3, mask_noise_std=0.0)
    model.init_weights()
    fbank, mask = _random_inputs(SMALL_CFG, 2, 256, 3, seed=1)
    targets = torch.zeros(2, 128, 32)
    out = model(fbank, mask, targets)
    tokens = model.encoder.embed(fbank)
    for row in range(6):
        clip = row // 3  # rows 0-2: clip 0, rows 3-5: clip 1
        expected = model.encoder.forward_tokens(tokens[clip : clip + 1, ~mask[row]])[0, 0]
        assert torch.allclose(out.cls_pred[row], expected, atol=1e-5), row


def test_mean_reduction_and_utterance_weight() -> None:
    torch.manual_seed(2)
    fbank, mask = _random_inputs(SMALL_CFG, 2, 256, 4, seed=2)
    targets = torch.randn(2, 128, 32)
    original = EATPretrainingModel(SMALL_CFG, clone_batch=4, mask_noise_std=0.0)
    original.init_weights()
    mean = EATPretrainingModel(
        SMALL_CFG, clone_batch=4, mask_noise_std=0.0, utterance_weight=0.5, loss_reduction="mean"
    )
    mean.load_state_dict(original.state_dict())
    a, b = original(fbank, mask, targets), mean(fbank, mask, targets)
    assert torch.allclose(a.frame_loss_sum, b.frame_loss_sum)
    assert torch.allclose(a.utterance_loss_sum, b.utterance_loss_sum)
    num_rows, sample_size = 8, 8 * (128 - 25)
    assert int(a.sample_size) == sample_size
    frame_mean = a.frame_loss_sum / sample_size
    assert a.loss.item() == pytest.approx((frame_mean + a.utterance_loss_sum).item(), rel=1e-6)
    assert b.loss.item() == pytest.approx((frame_mean + 0.5 * a.utterance_loss_sum / num_rows).item(), rel=1e-6)
    # The frame sum is over masked positions only, with per-token squared error / √D.
    pred = a.predictions.detach().view(2, 4, 128, 32)
    err = ((pred - targets[:, None]) ** 2).sum(-1).view(8, 128)
    assert a.frame_loss_sum.item() == pytest.approx((err[mask].sum() / math.sqrt(32)).item(), rel=1e-5)


def test_base_grid_drop_in_with_generated_masks() -> None:
    """1024 frames -> the 64×8 grid and 102 visible tokens of EAT-base, with the real mask generator."""
    torch.manual_seed(3)
    model = EATPretrainingModel(SMALL_CFG, clone_batch=16)
    model.init_weights()
    teacher = make_teacher(model.encoder)
    fbank, mask = _random_inputs(SMALL_CFG, 2, 1024, 16, seed=3)
    out = model(fbank, mask, teacher_targets(teacher, fbank))
    assert out.predictions.shape == (32, 512, 32) and out.cls_pred.shape == (32, 32)
    assert int(out.sample_size) == 32 * 410
    assert torch.isfinite(out.loss)


def test_mask_noise_is_fresh_per_call_and_zero_means_zeros() -> None:
    torch.manual_seed(4)
    fbank, mask = _random_inputs(SMALL_CFG, 1, 256, 2, seed=4)
    targets = torch.zeros(1, 128, 32)
    noisy = EATPretrainingModel(SMALL_CFG, clone_batch=2, mask_noise_std=0.01)
    noisy.init_weights()
    quiet = EATPretrainingModel(SMALL_CFG, clone_batch=2, mask_noise_std=0.0)
    quiet.load_state_dict(noisy.state_dict())
    with torch.no_grad():
        assert not torch.equal(noisy(fbank, mask, targets).predictions, noisy(fbank, mask, targets).predictions)
        assert torch.equal(quiet(fbank, mask, targets).predictions, quiet(fbank, mask, targets).predictions)
        # The CLS path never sees the mask tokens.
        assert torch.equal(noisy(fbank, mask, targets).cls_pred, quiet(fbank, mask, targets).cls_pred)


def test_init_keeps_pytorch_default_for_decoder() -> None:
    torch.manual_seed(5)
    cfg = SMALL_CFG.replace(embed_dim=128, num_heads=4, decoder_dim=128)
    model = EATPretrainingModel(cfg)
    model.init_weights()
    bound = 1 / math.sqrt(128)  # Kaiming-uniform(a=√5) default of nn.Linear
    proj = model.decoder.proj.weight
    assert proj.abs().max() <= bound and proj.std() > 0.8 * bound / math.sqrt(3)
    assert model.encoder.blocks[0].mlp.fc1.weight.std().item() == pytest.approx(0.02, rel=0.1)


def test_decoder_handles_other_widths_and_even_kernels() -> None:
    tokens = torch.randn(3, 16 * 8, 32)
    narrow = CNNDecoder(SMALL_CFG.replace(decoder_dim=16))  # first layer 32 -> 16, no residual
    assert narrow(tokens, (16, 8)).shape == (3, 128, 32)
    even = CNNDecoder(SMALL_CFG.replace(decoder_kernel=4))
    assert even(tokens, (16, 8)).shape == (3, 128, 32)
    with pytest.raises(ValueError, match="grid"):
        even(tokens, (8, 8))


def test_teacher_targets_normalisation_and_top_k() -> None:
    torch.manual_seed(6)
    teacher = Encoder(SMALL_CFG)
    teacher.init_weights()
    teacher = make_teacher(teacher)
    fbank = torch.randn(2, 1, 256, 128)
    y = teacher_targets(teacher, fbank)
    assert torch.allclose(y.mean(-1), torch.zeros(2, 128), atol=1e-5)
    assert torch.allclose(y.var(-1, unbiased=False), torch.ones(2, 128), atol=1e-3)
    # top_k=1 uses the last block's FFN output alone.
    _, ffn = teacher.forward_intermediates(fbank, [-1], output="ffn")
    last = torch.nn.functional.instance_norm(ffn[0][:, 1:].transpose(1, 2), eps=1e-5).transpose(1, 2)
    expected = torch.nn.functional.layer_norm(last, (32,), eps=1e-5)
    assert torch.allclose(teacher_targets(teacher, fbank, top_k=1), expected, atol=1e-5)
    with pytest.raises(ValueError, match="top_k"):
        teacher_targets(teacher, fbank, top_k=3)


def test_ema_decay_schedule() -> None:
    assert ema_decay(0) == pytest.approx(0.9998, abs=1e-12)
    assert ema_decay(50_000) == pytest.approx((0.9998 + 0.99999) / 2, abs=1e-12)
    assert ema_decay(100_000) == 0.99999
    assert ema_decay(1_000_000) == 0.99999
    assert ema_decay(75_000, anneal_steps=150_000) == pytest.approx((0.9998 + 0.99999) / 2, abs=1e-12)
    assert ema_decay(10, anneal_steps=0) == 0.99999
    with pytest.raises(ValueError):
        ema_decay(-1)


def test_ema_update_math_and_copies() -> None:
    torch.manual_seed(7)
    student = Encoder(SMALL_CFG)
    student.init_weights()
    student.extra = torch.nn.Parameter(torch.ones(3))  # e.g. a decoder part: not in the teacher, skipped
    teacher = Encoder(SMALL_CFG)
    teacher.init_weights()
    teacher.requires_grad_(False)
    with torch.no_grad():
        student.pos_embed.add_(1.0)  # non-trainable: must be copied, not averaged
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    ema_update(teacher, student, 0.9)
    params = dict(student.named_parameters())
    for name, value in teacher.state_dict().items():
        if name == "pos_embed":
            assert torch.equal(value, student.pos_embed)
        else:
            expected = 0.9 * before[name] + 0.1 * params[name].detach()
            assert torch.allclose(value, expected, atol=1e-7), name
    # decay 1 keeps the teacher, decay 0 copies the student.
    kept = teacher.blocks[0].attn.qkv.weight.clone()
    ema_update(teacher, student, 1.0)
    assert torch.equal(teacher.blocks[0].attn.qkv.weight, kept)
    ema_update(teacher, student, 0.0)
    assert torch.equal(teacher.blocks[0].attn.qkv.weight, student.blocks[0].attn.qkv.weight)


def test_ema_update_rejects_mismatches() -> None:
    teacher = Encoder(SMALL_CFG)
    other = Encoder(SMALL_CFG.replace(embed_dim=64))
    with pytest.raises(ValueError, match="shape mismatch"):
        ema_update(teacher, other, 0.99)
    with pytest.raises(ValueError, match="decay"):
        ema_update(teacher, teacher, 1.5)


@pytest.mark.parametrize(
    ("change", "error", "match"),
    [
        (lambda m, t: (m[:, :100], t), ValueError, "mask must be"),
        (lambda m, t: (m.to(torch.uint8), t), TypeError, "bool"),
        (lambda m, t: (torch.cat([m[:1] & False, m[1:]]), t), ValueError, "same number"),
        (lambda m, t: (m, t[:, :64]), ValueError, "targets must be"),
    ],
)
def test_bad_inputs_raise_clear_errors(change, error, match) -> None:
    model = EATPretrainingModel(SMALL_CFG, clone_batch=2)
    fbank, mask = _random_inputs(SMALL_CFG, 1, 256, 2)
    bad_mask, bad_targets = change(mask, torch.zeros(1, 128, 32))
    with pytest.raises(error, match=match):
        model(fbank, bad_mask, bad_targets)


def test_constructor_validates_options() -> None:
    with pytest.raises(ValueError, match="loss_reduction"):
        EATPretrainingModel(SMALL_CFG, loss_reduction="sum")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="clone_batch"):
        EATPretrainingModel(SMALL_CFG, clone_batch=0)
