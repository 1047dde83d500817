"""The encoder's shapes, positions, attention paths and presets."""

from __future__ import annotations

import pytest
import torch

from model.classifier import EATClassifier
from model.config import EATConfig, FrontendConfig, base, large, preset, tiny
from model.encoder import Encoder, count_params, sincos_position_table


def test_position_table_matches_reference_vectors() -> None:
    # eat-reference.md §2.3 test vectors (D = 768).
    t = sincos_position_table(768, 8, 768)
    assert t.shape == (6144, 768)
    row1, row8, row83 = t[1], t[8], t[83]
    assert row1[0] == pytest.approx(0.841471, abs=1e-6) and row1[192] == pytest.approx(0.540302, abs=1e-6)
    assert row1[384] == pytest.approx(0.0, abs=1e-12) and row1[576] == pytest.approx(1.0, abs=1e-12)
    assert row8[0] == pytest.approx(0.0, abs=1e-12) and row8[192] == pytest.approx(1.0, abs=1e-12)
    assert row8[384] == pytest.approx(0.841471, abs=1e-6) and row8[576] == pytest.approx(0.540302, abs=1e-6)
    assert row83[1] == pytest.approx(0.27838, abs=1e-5) and row83[385] == pytest.approx(-0.10664, abs=1e-5)


def test_base_and_large_parameter_counts_match_the_paper() -> None:
    # reference §2.1: encoder only, without the fixed table: 85.25 M (base), 302.6 M (large).
    assert count_params(Encoder(base())) == pytest.approx(85.25e6, rel=1e-3)
    assert count_params(Encoder(large())) == pytest.approx(302.6e6, rel=1e-3)


@pytest.mark.parametrize("frames", [16, 128, 512, 1024, 3008])
def test_any_multiple_of_16_frames_gives_time_major_tokens(frames: int) -> None:
    enc = Encoder(tiny()).eval()
    out = enc(torch.randn(2, 1, frames, 128))
    assert out.shape == (2, 1 + frames // 16 * 8, 128)


def test_tokens_are_time_major() -> None:
    # Changing only frames 16..31 (time row 1) changes exactly patch tokens 8..15 before attention.
    enc = Encoder(tiny()).eval()
    x = torch.randn(1, 1, 64, 128)
    y = x.clone()
    y[:, :, 16:32] += 1.0
    diff = (enc.embed(x) - enc.embed(y)).abs().amax(dim=-1)[0]
    changed = torch.nonzero(diff > 0).flatten().tolist()
    assert changed == list(range(8, 16))


def test_positions_slice_to_the_input_length() -> None:
    enc = Encoder(tiny()).eval()
    short, long = enc.embed(torch.zeros(1, 1, 32, 128)), enc.embed(torch.zeros(1, 1, 64, 128))
    torch.testing.assert_close(short, long[:, :16])


def test_longest_input_uses_the_whole_table() -> None:
    cfg = tiny(depth=1)
    enc = Encoder(cfg).eval()
    with torch.no_grad():
        out = enc(torch.randn(1, 1, 768 * 16, 128))  # 122.9 s, the limit of EAT's table
    assert out.shape == (1, 1 + 6144, cfg.embed_dim)
    with pytest.raises(RuntimeError):
        enc(torch.randn(1, 1, 769 * 16, 128))


def test_sdpa_and_math_attention_agree() -> None:
    torch.manual_seed(0)
    a = Encoder(tiny(attn_impl="sdpa")).eval()
    a.init_weights()
    b = Encoder(tiny(attn_impl="math")).eval()
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 1, 128, 128)
    torch.testing.assert_close(a(x), b(x), atol=1e-5, rtol=1e-5)


def test_block_is_post_ln() -> None:
    # A post-LN block's output is a LayerNorm output: zero mean, unit variance per token (affine 1/0).
    enc = Encoder(tiny()).eval()
    enc.init_weights()
    out = enc(torch.randn(1, 1, 32, 128))
    torch.testing.assert_close(out.mean(-1), torch.zeros(out.shape[:2]), atol=1e-5, rtol=0)
    torch.testing.assert_close(out.var(-1, unbiased=False), torch.ones(out.shape[:2]), atol=1e-3, rtol=0)


def test_drop_path_is_identity_in_eval_and_random_in_train() -> None:
    torch.manual_seed(0)
    enc = Encoder(tiny(drop_path_rate=0.5))
    enc.init_weights()
    x = torch.randn(4, 1, 32, 128)
    enc.eval()
    torch.testing.assert_close(enc(x), enc(x))
    enc.train()
    assert not torch.allclose(enc(x), enc(x))


def test_classifier_pooling_options() -> None:
    torch.manual_seed(0)
    cls_model = EATClassifier(tiny(num_classes=5)).eval()
    mean_model = EATClassifier(tiny(num_classes=5, pooling="mean")).eval()
    mean_model.load_state_dict(cls_model.state_dict())
    feats = cls_model.encoder(torch.randn(2, 1, 32, 128))
    torch.testing.assert_close(cls_model.pool(feats), feats[:, 0])
    torch.testing.assert_close(mean_model.pool(feats), feats[:, 1:].mean(1))
    assert cls_model(torch.randn(3, 1, 32, 128)).shape == (3, 5)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        (dict(num_heads=5), "num_heads"),
        (dict(drop_path_rate=1.0), "drop_path_rate"),
        (dict(attn_impl="flash"), "attn_impl"),
        (dict(pooling="max"), "pooling"),
        (dict(decoder_groups=7), "decoder_groups"),
    ],
)
def test_bad_configs_fail_at_construction(changes: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        EATConfig(**changes)


def test_presets_and_frontend_config() -> None:
    assert preset("base") == base()
    assert preset("tiny", depth=2).depth == 2
    with pytest.raises(ValueError, match="unknown preset"):
        preset("huge")
    with pytest.raises(ValueError, match="multiple of 16"):
        FrontendConfig(target_frames=1000)
    assert FrontendConfig().window_samples == 400 + 160 * 1023
    esc = FrontendConfig.preset("esc50", 512)
    assert (esc.norm_mean, esc.norm_std, esc.target_frames) == (-6.627, 5.359, 512)
    assert EATConfig.from_dict(base().to_dict()) == base()
    with pytest.raises(ValueError, match="unknown EATConfig fields"):
        EATConfig.from_dict({"width": 3})


def test_forward_intermediates_returns_the_chosen_blocks_in_order() -> None:
    torch.manual_seed(3)
    enc = Encoder(tiny()).eval()
    fbank = torch.randn(2, 1, 64, 128)
    # Walk the blocks by hand: block outputs and FFN outputs (before residual and LN2).
    x = enc._prepend_cls(enc.embed(fbank))
    outputs, ffns = [], []
    for block in enc.blocks:
        a = block.norm1(x + block.attn(x))
        ffns.append(block.mlp(a))
        x = block.norm2(a + ffns[-1])
        outputs.append(x)
    depth = len(enc.blocks)
    final, taken = enc.forward_intermediates(fbank, [0, -1])
    torch.testing.assert_close(final, enc.forward_features(fbank))
    torch.testing.assert_close(final, outputs[-1])
    assert len(taken) == 2
    torch.testing.assert_close(taken[0], outputs[0])
    torch.testing.assert_close(taken[1], outputs[-1])
    _, last_two = enc.forward_intermediates(fbank, 2, output="ffn")
    torch.testing.assert_close(last_two[0], ffns[depth - 2])
    torch.testing.assert_close(last_two[1], ffns[depth - 1])
    early, only_first = enc.forward_intermediates(fbank, [0], stop_early=True)
    torch.testing.assert_close(early, outputs[0])
    torch.testing.assert_close(only_first[0], outputs[0])
    assert len(enc.forward_intermediates(fbank)[1]) == depth
    for bad in (0, depth + 1, [depth], [-depth - 1], []):
        with pytest.raises(ValueError, match="blocks|indices"):
            enc.forward_intermediates(fbank, bad)
    with pytest.raises(ValueError, match="output"):
        enc.forward_intermediates(fbank, 1, output="attn")  # type: ignore[arg-type]


def test_classifier_stages_compose_to_forward() -> None:
    torch.manual_seed(4)
    model = EATClassifier(tiny().replace(num_classes=5)).eval()
    model.init_weights()
    fbank = torch.randn(3, 1, 32, 128)
    features = model.forward_features(fbank)
    assert features.shape == (3, 1 + 2 * 8, model.cfg.embed_dim)
    logits = model.forward_head(features)
    torch.testing.assert_close(logits, model(fbank))
    embedding = model.forward_head(features, pre_logits=True)  # pooled + fc_norm, before the Linear
    assert embedding.shape == (3, model.cfg.embed_dim)
    torch.testing.assert_close(model.head(embedding), logits)
