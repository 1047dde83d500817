"""Recipes and ``--set`` overrides: typed, validated, unknown keys refused."""

from __future__ import annotations

from pathlib import Path

import pytest

from training.config import (
    ConfigError,
    FinetuneConfig,
    PretrainConfig,
    apply_overrides,
    config_from_dict,
    list_recipes,
    load_config,
)

PUBLISHED = ["pretrain_as2m", "finetune_as20k", "finetune_as2m", "finetune_esc50", "finetune_spcv2"]


def test_every_builtin_recipe_loads_with_its_loop() -> None:
    names = list_recipes()
    for name in [*PUBLISHED, "demo_pretrain", "demo_finetune"]:
        assert name in names
    for name in names:
        cls = PretrainConfig if name.startswith(("pretrain", "demo_pretrain")) else FinetuneConfig
        cfg = load_config(cls, name)
        assert cfg.eat_config() is not None


def test_published_pretraining_numbers() -> None:
    cfg = load_config(PretrainConfig, "pretrain_as2m")  # eat-reference.md §3.8
    assert (cfg.lr, cfg.warmup_steps, cfg.max_steps, cfg.batch_size, cfg.clone_batch) == (5e-4, 53_333, 400_000, 12, 16)
    assert cfg.betas == (0.9, 0.95) and cfg.weight_decay == 0.05 and cfg.grad_clip == 4.0
    assert (cfg.ema_decay, cfg.ema_end_decay, cfg.ema_anneal_end_step) == (0.9998, 0.99999, 100_000)
    assert cfg.eat_config().embed_dim == 768 and not cfg.exempt_1d_from_decay


@pytest.mark.parametrize(
    ("name", "expected"),
    [  # eat-reference.md §4.5
        ("finetune_as20k", dict(batch_size=48, max_steps=40_000, warmup_steps=4_000, lr=5e-5, mixup_alpha=0.8)),
        ("finetune_as2m", dict(batch_size=96, max_steps=300_000, num_draws=200_000, lr=5e-5)),
        (
            "finetune_esc50",
            dict(
                target_frames=512,
                norm="esc50",
                mixup_alpha=0.0,
                mask_ratio=0.4,
                loss="ce",
                label_smoothing=0.1,
                metric="accuracy",
                max_steps=4_000,
            ),
        ),
        (
            "finetune_spcv2",
            dict(
                target_frames=128,
                norm="spcv2",
                batch_size=256,
                lr=2e-4,
                loss="bce",
                bce_normalizer="batch",
                spec_noise=True,
                metric="accuracy",
                seed=42,
            ),
        ),
    ],
)
def test_published_finetuning_numbers(name: str, expected: dict) -> None:
    cfg = load_config(FinetuneConfig, name)
    for key, value in expected.items():
        assert getattr(cfg, key) == value, key
    assert cfg.layer_decay == 0.65 and cfg.min_lr == 1e-6
    assert cfg.eat_config(num_classes=3).drop_path_rate == 0.1


def test_overrides_are_typed_and_nested() -> None:
    cfg = load_config(
        PretrainConfig,
        "demo_pretrain",
        ["max_steps=7", "warmup_steps=0", "lr=2e-3", "compile=true", "model.depth=2", "betas=[0.8, 0.9]"],
    )
    assert cfg.max_steps == 7 and cfg.lr == 2e-3 and cfg.compile is True
    assert cfg.eat_config().depth == 2 and cfg.betas == (0.8, 0.9)
    # a fine-tuning override of one model field keeps the loop's default drop path
    ft = load_config(FinetuneConfig, "finetune_as20k", ["model.pooling=mean"])
    assert ft.model == {"drop_path_rate": 0.1, "pooling": "mean"}


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["max_step=10"], "unknown PretrainConfig keys: ['max_step']"),
        (["model.depht=2"], "unknown model keys"),
        (["max_steps=ten"], "max_steps must be an integer"),
        (["lr=fast"], "lr must be a number"),
        (["precision=fp16"], "precision must be one of"),
        (["compile=maybe"], "compile must be true or false"),
        (["warmup_steps=10", "max_steps=5"], "warmup_steps must be in"),
        (["mask_prob=1.5"], "mask_prob must be in (0, 1)"),
        (["model.num_heads=3"], "invalid model/audio settings"),
        (["target_frames=100"], "multiple of 16"),
        (["nokey"], "--set expects key=value"),
        (["a.b.c=1"], "at most one level"),
    ],
)
def test_bad_overrides_fail_with_a_clear_message(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(PretrainConfig, "demo_pretrain", overrides)
    assert message in str(info.value)
    assert isinstance(info.value, ValueError)  # the CLI turns these into one-line errors


def test_recipe_files_are_checked(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unknown recipe 'nope'"):
        load_config(PretrainConfig, "nope")
    bad = tmp_path / "bad.yaml"
    bad.write_text("batch_size: 4\nlayer_decay: 0.5\n")  # a fine-tuning key in a pre-training recipe
    with pytest.raises(ConfigError, match="layer_decay"):
        load_config(PretrainConfig, str(bad))
    bad.write_text("- a list\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(PretrainConfig, str(bad))
    with pytest.raises(ConfigError, match="not found"):
        load_config(PretrainConfig, str(tmp_path / "missing.yaml"))


def test_finetune_rules() -> None:
    with pytest.raises(ConfigError, match="batch_size must be even"):
        load_config(FinetuneConfig, "finetune_as20k", ["batch_size=7"])
    with pytest.raises(ConfigError, match="num_draws"):
        load_config(FinetuneConfig, "finetune_as20k", ["weights_file=w.csv"])


def test_round_trip_through_plain_dict() -> None:
    cfg = load_config(FinetuneConfig, "finetune_esc50", ["max_steps=9", "warmup_steps=1"])
    plain = cfg.to_dict()
    assert plain["betas"] == [0.9, 0.95]  # plain types only (checkpoints load with weights_only)
    assert config_from_dict(FinetuneConfig, plain) == cfg
    assert apply_overrides(plain, ["max_steps=3"])["max_steps"] == 3 and plain["max_steps"] == 9
