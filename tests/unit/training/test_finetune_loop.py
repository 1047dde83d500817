"""The fine-tuning loop: losses as EAT normalises them, initialisation, outputs, sampling, CLI errors."""

from __future__ import annotations

import dataclasses
import functools
import json
import operator
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from training_cases import TINY_MODEL

from model.checkpoints import load_checkpoint, save_checkpoint
from model.config import FrontendConfig
from model.pretraining import EATPretrainingModel
from training import cli, finetune
from training.config import FinetuneConfig, load_config
from training.data.synthetic import generate

TINY = [
    *TINY_MODEL,
    "batch_size=4",
    "num_workers=0",
    "warmup_steps=1",
    "log_every=1",
    "eval_batch_size=8",
]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate(
        tmp_path_factory.mktemp("finetune-data"), num_train=8, num_eval=6, clip_seconds=1.0, seed=5
    ).data_dir


def _cfg(*overrides: str) -> FinetuneConfig:
    return load_config(FinetuneConfig, "demo_finetune", [*TINY, *overrides])


def test_bce_is_normalised_by_the_positive_label_mass() -> None:
    logits = torch.randn(4, 6)
    target = torch.zeros(4, 6)
    target[0, 1] = target[1, 2] = target[1, 3] = 1.0
    target[2] = 0.25 * target[1] + 0.75 * target[0]  # a mixed row: mass 0.25·2 + 0.75·1
    summed = F.binary_cross_entropy_with_logits(logits, target, reduction="sum")
    loss = finetune.classification_loss(logits, target, _cfg("loss=bce", "bce_normalizer=positives"))
    torch.testing.assert_close(loss, summed / 4.25)  # 1 + 2 + 1.25 positives, not 4 × 6 (§4.3, §9.15)
    loss = finetune.classification_loss(logits, target, _cfg("loss=bce", "bce_normalizer=batch"))
    torch.testing.assert_close(loss, summed / 4)  # SPC-2: per clip


def test_single_label_losses() -> None:
    logits = torch.randn(4, 5)
    one_hot = F.one_hot(torch.tensor([0, 3, 1, 4]), 5).float()
    smoothed = finetune.classification_loss(logits, one_hot, _cfg("loss=ce", "mixup_alpha=0", "label_smoothing=0.1"))
    torch.testing.assert_close(smoothed, F.cross_entropy(logits, one_hot.argmax(1), label_smoothing=0.1))
    mixed = 0.7 * one_hot + 0.3 * one_hot.flip(0)
    soft = finetune.classification_loss(logits, mixed, _cfg("loss=ce", "mixup_alpha=0.8", "label_smoothing=0.1"))
    torch.testing.assert_close(soft, -(mixed * logits.log_softmax(1)).sum(1).mean())  # no smoothing on mixes


def test_classifier_starts_from_the_pretrained_student(tmp_path: Path) -> None:
    cfg = _cfg("model.drop_path_rate=0.2")
    pre = EATPretrainingModel(cfg.eat_config(), clone_batch=2)
    pre.init_weights()
    path = save_checkpoint(tmp_path / "pre.safetensors", pre, FrontendConfig(target_frames=96))
    model = finetune.build_classifier(dataclasses.replace(cfg, init=str(path)), num_classes=7)
    for key, value in pre.encoder.state_dict().items():
        assert torch.equal(model.encoder.state_dict()[key], value), key
    assert model.cfg.num_classes == 7 and model.cfg.drop_path_rate == 0.2  # fine-tuning knobs from the recipe
    assert torch.equal(model.head.bias, torch.zeros(7)) and torch.equal(model.fc_norm.weight, torch.ones(32))
    random = finetune.build_classifier(dataclasses.replace(cfg, init="random"), num_classes=7)
    assert not torch.equal(random.encoder.blocks[0].attn.qkv.weight, pre.encoder.blocks[0].attn.qkv.weight)


def test_a_short_run_evaluates_and_saves_a_labelled_model(data_dir: Path, tmp_path: Path) -> None:
    cfg = _cfg("init=random", "max_steps=3", "eval_every=2", "save_every=3")
    summary = finetune.train(cfg, data_dir, tmp_path)
    lines = [json.loads(line) for line in (tmp_path / "eval.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [2, 3]
    assert all(0.0 <= line["mAP"] <= 1.0 and line["num_clips"] == 6 for line in lines)
    assert summary["best"]["value"] == max(line["mAP"] for line in lines)
    assert summary["final"]["mAP"] == lines[-1]["mAP"]
    loaded = load_checkpoint(summary["model_path"])
    assert loaded.labels is not None and [lb.id for lb in loaded.labels] == [lb.id for lb in summary["labels"]]
    assert loaded.config.num_classes == 15 and loaded.frontend.target_frames == 96
    assert (tmp_path / "best.safetensors").is_file()


def test_weighted_sampling_draws_from_the_weights_file(data_dir: Path, tmp_path: Path) -> None:
    cfg = _cfg(
        "init=random",
        "max_steps=2",
        "eval_every=100",
        "weights_file=weight_train_all.csv",
        "num_draws=4",
        "mixup_alpha=0",
        "loss=bce",
    )
    summary = finetune.train(cfg, data_dir, tmp_path)
    assert summary["step"] == 2
    with pytest.raises(ValueError, match="missing.csv: file not found"):
        finetune.train(dataclasses.replace(cfg, weights_file="missing.csv"), data_dir, tmp_path / "x")


def test_cli_reports_bad_manifests_in_one_line(
    data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad"
    bad.mkdir()
    for name in ("train.tsv", "labels.csv"):
        (bad / name).write_text((data_dir / name).read_text())
    (bad / "train.lbl").write_text("only-one-line\t/m/01v_m0\n")  # 8 clips, 1 label line
    code = cli.main(
        [
            "finetune",
            "--recipe",
            "demo_finetune",
            "--init",
            "random",
            "--data",
            str(bad),
            "--out",
            str(tmp_path / "run"),
        ]
    )
    err = capsys.readouterr().err.strip()
    assert code == 2 and "train.lbl: 1 lines but" in err and "\n" not in err
    code = cli.main(
        [
            "finetune",
            "--recipe",
            "demo_finetune",
            "--init",
            str(tmp_path / "missing.safetensors"),
            "--data",
            str(data_dir),
            "--out",
            str(tmp_path / "run2"),
            *functools.reduce(operator.iadd, (["--set", s] for s in TINY), []),
        ]
    )
    assert code == 2 and "checkpoint not found" in capsys.readouterr().err
