"""The pre-training loop: EMA schedule inside the loop, outputs, CLI errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from training_cases import TINY_MODEL

from model.checkpoints import load_checkpoint
from model.pretraining import ema_decay
from training import cli, pretrain
from training.checkpoint import CHECKPOINT_NAME, load_training_checkpoint
from training.config import PretrainConfig, load_config
from training.data.synthetic import generate

TINY = [
    *TINY_MODEL,
    "batch_size=4",
    "clone_batch=2",
    "num_workers=0",
    "warmup_steps=2",
    "log_every=1",
]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate(
        tmp_path_factory.mktemp("pretrain-data"), num_train=12, num_eval=2, clip_seconds=1.0, seed=3
    ).data_dir


def test_ema_follows_the_annealed_schedule_inside_the_loop(
    data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Replays every EMA update from the student weights the loop had after each step: the teacher must
    be exactly that average, with the decay of §3.7 at update k = 1, 2, ..."""
    cfg = load_config(
        PretrainConfig,
        "demo_pretrain",
        [*TINY, "max_steps=4", "save_every=4", "ema_decay=0.9", "ema_end_decay=0.99", "ema_anneal_end_step=3"],
    )
    calls: list[tuple[float, dict[str, torch.Tensor]]] = []
    real_update = pretrain.ema_update

    def spy(teacher: torch.nn.Module, student: torch.nn.Module, decay: float) -> None:
        if not calls:
            calls.append((float("nan"), {k: v.clone() for k, v in teacher.state_dict().items()}))
        calls.append((decay, {k: v.detach().clone() for k, v in student.state_dict().items()}))
        real_update(teacher, student, decay)

    monkeypatch.setattr(pretrain, "ema_update", spy)
    summary = pretrain.train(cfg, data_dir, tmp_path)

    decays = [d for d, _ in calls[1:]]
    assert decays == [ema_decay(k, 0.9, 0.99, 3) for k in (1, 2, 3, 4)]
    assert decays[0] == pytest.approx(0.93) and decays[2:] == [0.99, 0.99]  # linear, then constant
    expected = calls[0][1]  # the teacher starts as a copy of the initial student
    for decay, student in calls[1:]:
        expected = {
            k: decay * v + (1 - decay) * student[k] if k != "pos_embed" else student[k] for k, v in expected.items()
        }
    teacher = summary["teacher"].state_dict()
    for key, value in expected.items():
        torch.testing.assert_close(teacher[key], value, rtol=1e-5, atol=1e-6, msg=key)
    assert not torch.equal(teacher["blocks.0.mlp.fc1.weight"], calls[-1][1]["blocks.0.mlp.fc1.weight"])


def test_outputs_of_a_run(data_dir: Path, tmp_path: Path) -> None:
    cfg = load_config(PretrainConfig, "demo_pretrain", [*TINY, "max_steps=2", "save_every=1", "tensorboard=true"])
    summary = pretrain.train(cfg, data_dir, tmp_path)
    assert summary["step"] == 2 and torch.isfinite(torch.tensor(summary["loss"]))

    state = load_training_checkpoint(tmp_path / CHECKPOINT_NAME, kind="pretrain")  # weights_only=True
    assert state["step"] == 2 and state["world_size"] == 1 and state["config"] == cfg.to_dict()
    assert state["data"]["position"] == 8  # two batches of 4 clips handed out in epoch 0
    assert {"model", "teacher", "optimizer", "rng"} <= set(state)
    loaded = load_checkpoint(summary["model_path"])
    assert loaded.config.embed_dim == 32 and any(k.startswith("decoder.") for k in loaded.state_dict)
    assert loaded.frontend.target_frames == 96
    assert load_checkpoint(tmp_path / "teacher.safetensors").config.depth == 2
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))


def test_cli_errors_are_one_line(data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = cli.main(
        ["pretrain", "--recipe", "demo_pretrain", "--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "run")]
    )
    err = capsys.readouterr().err.strip()
    assert code == 2 and "data directory not found" in err and "\n" not in err

    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "train.tsv").write_text("/root\nclip.wav\tnot-a-number\n")
    code = cli.main(
        ["pretrain", "--recipe", "demo_pretrain", "--data", str(tmp_path / "bad"), "--out", str(tmp_path / "run")]
    )
    err = capsys.readouterr().err.strip()
    assert code == 2 and "train.tsv:2" in err and "\n" not in err

    code = cli.main(
        [
            "pretrain",
            "--recipe",
            "demo_pretrain",
            "--set",
            "max_step=3",
            "--data",
            str(data_dir),
            "--out",
            str(tmp_path / "run"),
        ]
    )
    assert code == 2 and "unknown PretrainConfig keys" in capsys.readouterr().err


def test_resume_refuses_a_finetuning_checkpoint(tmp_path: Path) -> None:
    from training.checkpoint import save_training_checkpoint

    save_training_checkpoint(tmp_path / CHECKPOINT_NAME, kind="finetune", step=1)
    with pytest.raises(ValueError, match="'finetune' checkpoint, expected 'pretrain'"):
        pretrain.resolve_config(None, [], tmp_path, resume=True)
    with pytest.raises(ValueError, match="--recipe is required"):
        pretrain.resolve_config(None, [], tmp_path / "empty", resume=True)
