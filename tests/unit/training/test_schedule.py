"""LR schedules, per-group cosine floors and layer-wise decay groups (eat-reference.md §3.8, §4.4)."""

from __future__ import annotations

import math

import pytest
import torch

from model.classifier import EATClassifier
from model.config import tiny
from model.pretraining import EATPretrainingModel
from training.config import FinetuneConfig, load_config
from training.schedule import build_adamw, group_lr, param_groups, set_lr, step_generator, warmup_cosine


def test_pretraining_schedule_warms_up_from_zero_and_ends_at_zero() -> None:
    kw = dict(peak_lr=5e-4, warmup_steps=53_333, max_steps=400_000)
    assert warmup_cosine(0, **kw) == 0.0  # fairseq's first update runs at the warm-up start
    assert warmup_cosine(53_333 // 2, **kw) == pytest.approx(2.5e-4, rel=1e-4)
    assert warmup_cosine(53_333, **kw) == pytest.approx(5e-4)
    mid = 53_333 + (400_000 - 53_333) // 2
    assert warmup_cosine(mid, **kw) == pytest.approx(2.5e-4, rel=1e-4)
    assert warmup_cosine(400_000, **kw) == pytest.approx(0.0, abs=1e-15)
    assert warmup_cosine(500_000, **kw) == pytest.approx(0.0, abs=1e-15)  # stays at the floor


def test_finetuning_schedule_starts_and_ends_at_min_lr() -> None:
    kw = dict(peak_lr=5e-5, warmup_steps=4_000, max_steps=40_000, min_lr=1e-6)
    assert warmup_cosine(0, **kw) == 1e-6
    assert warmup_cosine(4_000, **kw) == pytest.approx(5e-5)
    assert warmup_cosine(40_000, **kw) == pytest.approx(1e-6)


def test_layer_decay_groups_and_lr_floors_match_the_reference() -> None:
    cfg = load_config(FinetuneConfig, "finetune_as20k")
    model = EATClassifier(cfg.eat_config(num_classes=5))  # EAT-base: 12 blocks
    groups = param_groups(model, weight_decay=0.05, layer_decay=0.65, depth=12)
    scale_of = {name: g["lr_scale"] for g in groups for name in g["names"]}
    for i in range(12):
        assert scale_of[f"encoder.blocks.{i}.attn.qkv.weight"] == pytest.approx(0.65 ** (12 - i))
    for name in (
        "encoder.patch_embed.proj.weight",
        "encoder.cls_token",
        "encoder.pre_norm.weight",
        "fc_norm.weight",
        "head.weight",
        "head.bias",
    ):
        assert scale_of[name] == 1.0, name
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    assert all(g["weight_decay"] == 0.05 for g in groups)  # the original decays everything (§3.8)

    def lr_at(step: int, block: int) -> float:
        return group_lr(step, lr=5e-5, lr_scale=0.65 ** (12 - block), min_lr=1e-6, warmup_steps=4_000, max_steps=40_000)

    # blocks 0-2 peak below min_lr: constant LRs 2.84e-7, 4.38e-7, 6.73e-7 (§4.4)
    for block, value in [(0, 2.84e-7), (1, 4.38e-7), (2, 6.73e-7)]:
        values = {lr_at(s, block) for s in (0, 2_000, 4_000, 20_000, 40_000)}
        assert len(values) == 1 and values.pop() == pytest.approx(value, rel=3e-3)
    assert lr_at(4_000, 3) == pytest.approx(1.04e-6, rel=5e-3) and lr_at(40_000, 3) == pytest.approx(1e-6)
    assert lr_at(4_000, 11) == pytest.approx(3.25e-5, rel=1e-3)
    assert lr_at(0, 11) == pytest.approx(1e-6)


def test_set_lr_applies_each_groups_scale() -> None:
    cfg = load_config(FinetuneConfig, "demo_finetune")
    model = EATClassifier(tiny(num_classes=3))
    optimizer = build_adamw(param_groups(model, weight_decay=0.05, layer_decay=0.5, depth=4), cfg)
    base = set_lr(optimizer, cfg.warmup_steps, cfg)
    assert base == pytest.approx(cfg.lr)
    by_scale = {g["lr_scale"]: g["lr"] for g in optimizer.param_groups}
    assert by_scale[1.0] == pytest.approx(cfg.lr) and by_scale[0.5**4] == pytest.approx(cfg.lr / 16)
    assert "names" not in optimizer.param_groups[0]  # the state dict stays plain


def test_exempting_1d_params_is_an_option() -> None:
    model = EATPretrainingModel(tiny(), clone_batch=2)
    default = param_groups(model, weight_decay=0.05)
    assert [g["weight_decay"] for g in default] == [0.05]
    exempt = {g["weight_decay"]: set(g["names"]) for g in param_groups(model, weight_decay=0.05, exempt_1d=True)}
    assert "encoder.blocks.0.norm1.weight" in exempt[0.0] and "encoder.cls_token" in exempt[0.0]
    assert "encoder.blocks.0.attn.qkv.bias" in exempt[0.0]
    assert "encoder.blocks.0.attn.qkv.weight" in exempt[0.05] and "decoder.blocks.0.conv.weight" in exempt[0.05]


def test_step_generator_is_a_function_of_seed_step_and_rank() -> None:
    g = torch.Generator()
    first = torch.rand(4, generator=step_generator(g, 1, 10, 0))
    torch.rand(100, generator=g)  # whatever ran in between
    assert torch.equal(torch.rand(4, generator=step_generator(g, 1, 10, 0)), first)
    assert not torch.equal(torch.rand(4, generator=step_generator(g, 1, 11, 0)), first)
    assert not torch.equal(torch.rand(4, generator=step_generator(g, 1, 10, 1)), first)
    assert not torch.equal(torch.rand(4, generator=step_generator(g, 2, 10, 0)), first)
    assert math.isfinite(float(first.sum()))
