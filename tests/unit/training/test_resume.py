"""Exact resume: a run SIGKILLed after a checkpoint and resumed ends exactly where an uninterrupted run
ends (weights, EMA teacher, optimizer, data position, loss). Also: checkpoint writes are atomic."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from training_cases import TINY_MODEL

from training.checkpoint import (
    CHECKPOINT_NAME,
    capture_rng_state,
    load_training_checkpoint,
    restore_rng_state,
    save_atomic,
)
from training.data.synthetic import generate

REPO = Path(__file__).resolve().parents[3]
TINY = [
    *TINY_MODEL,
    "batch_size=4",
    "warmup_steps=2",
    "log_every=1",
    "save_every=2",
]
PRETRAIN = [*TINY, "clone_batch=2", "num_workers=0", "max_steps=5", "ema_anneal_end_step=4"]
# Every stochastic part on: roll + gain, mixup, SpecAugment, drop path; a loader worker process.
FINETUNE = [
    *TINY,
    "num_workers=1",
    "max_steps=5",
    "eval_every=100",
    "mixup_alpha=0.8",
    "mixup_prob=1.0",
    "mask_ratio=0.3",
    "model.drop_path_rate=0.3",
]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate(tmp_path_factory.mktemp("resume-data"), num_train=10, num_eval=4, clip_seconds=1.0, seed=7).data_dir


def _eat(command: str, data_dir: Path, out: Path, *extra: str, sets: list[str] = ()) -> subprocess.CompletedProcess:
    args = [
        sys.executable,
        "-m",
        "training.cli",
        "--log-level",
        "WARNING",
        command,
        "--data",
        str(data_dir),
        "--out",
        str(out),
        *extra,
    ]
    for item in sets:
        args += ["--set", item]
    return subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=240)


def _assert_same(a: Any, b: Any, where: str = "") -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.shape == b.shape, where
        torch.testing.assert_close(a.float(), b.float(), rtol=1e-5, atol=1e-6, msg=where)
    elif isinstance(a, dict):
        assert set(a) == set(b), where
        for key in a:
            _assert_same(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=False)):
            _assert_same(x, y, f"{where}[{i}]")
    elif isinstance(a, float):
        assert a == pytest.approx(b, rel=1e-5, abs=1e-6, nan_ok=True), where
    else:
        assert a == b, where


@pytest.mark.parametrize(
    ("command", "recipe", "sets"), [("pretrain", "demo_pretrain", PRETRAIN), ("finetune", "demo_finetune", FINETUNE)]
)
def test_sigkill_then_resume_matches_an_uninterrupted_run(
    command: str, recipe: str, sets: list[str], data_dir: Path, tmp_path: Path
) -> None:
    extra = ["--recipe", recipe] + (["--init", "random"] if command == "finetune" else [])
    reference = _eat(command, data_dir, tmp_path / "reference", *extra, sets=sets)
    assert reference.returncode == 0, reference.stderr

    killed = _eat(command, data_dir, tmp_path / "crashed", *extra, "--debug-sigkill-at-step", "3", sets=sets)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    partial = load_training_checkpoint(tmp_path / "crashed" / CHECKPOINT_NAME, kind=command)
    assert partial["step"] == 2  # the step-3 work was lost with the process
    assert not (tmp_path / "crashed" / "model.safetensors").exists()

    resumed = _eat(command, data_dir, tmp_path / "crashed", "--resume")  # no recipe: the checkpoint has it
    assert resumed.returncode == 0, resumed.stderr

    want = load_training_checkpoint(tmp_path / "reference" / CHECKPOINT_NAME, kind=command)
    got = load_training_checkpoint(tmp_path / "crashed" / CHECKPOINT_NAME, kind=command)
    assert got["step"] == want["step"] == 5
    for key in want:
        if key not in ("rng", "best"):
            _assert_same(want[key], got[key], key)
    assert want["loss"] == pytest.approx(got["loss"], rel=1e-5)


def test_checkpoint_writes_are_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / CHECKPOINT_NAME
    save_atomic({"step": 1, "w": torch.ones(3)}, path)

    def torn_write(obj: Any, target: Any) -> None:
        Path(target).write_bytes(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", torn_write)
    with pytest.raises(OSError, match="disk full"):
        save_atomic({"step": 2, "w": torch.zeros(3)}, path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=True)["step"] == 1  # the old file is untouched
    assert [p.name for p in tmp_path.iterdir()] == [CHECKPOINT_NAME]  # and no temp file is left


def test_rng_states_round_trip_through_weights_only_load(tmp_path: Path) -> None:
    import random

    import numpy as np

    save_atomic({"rng": capture_rng_state()}, tmp_path / "rng.pt")
    want = (torch.rand(3), np.random.rand(3), random.random())
    restore_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True)["rng"])
    got = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(want[0], got[0]) and np.array_equal(want[1], got[1]) and want[2] == got[2]


def test_resume_with_another_world_size_is_refused() -> None:
    from training.checkpoint import TrainingCheckpointError, require_world_size

    require_world_size({"world_size": 2}, 2)
    with pytest.raises(TrainingCheckpointError, match="written by 2 rank"):
        require_world_size({"world_size": 2}, 1)


def test_finetuning_resumes_after_its_init_file_moved(data_dir: Path, tmp_path: Path) -> None:
    # Issue 13: resuming rebuilt the model from cfg.init, so a moved pre-trained file broke the resume.
    from model.checkpoints import save_checkpoint
    from model.config import FrontendConfig
    from model.pretraining import EATPretrainingModel
    from training.config import FinetuneConfig, load_config

    cfg = load_config(FinetuneConfig, "demo_finetune", FINETUNE)
    pre = EATPretrainingModel(cfg.eat_config(), clone_batch=2)
    pre.init_weights()
    init = save_checkpoint(tmp_path / "pre.safetensors", pre, FrontendConfig(target_frames=96))
    extra = ["--recipe", "demo_finetune", "--init", str(init)]
    reference = _eat("finetune", data_dir, tmp_path / "reference", *extra, sets=FINETUNE)
    assert reference.returncode == 0, reference.stderr
    killed = _eat("finetune", data_dir, tmp_path / "run", *extra, "--debug-sigkill-at-step", "3", sets=FINETUNE)
    assert killed.returncode == -signal.SIGKILL, killed.stderr

    init.rename(tmp_path / "moved.safetensors")
    resumed = _eat("finetune", data_dir, tmp_path / "run", "--resume")
    assert resumed.returncode == 0, resumed.stderr
    want = load_training_checkpoint(tmp_path / "reference" / CHECKPOINT_NAME, kind="finetune")
    got = load_training_checkpoint(tmp_path / "run" / CHECKPOINT_NAME, kind="finetune")
    assert got["step"] == 5
    _assert_same(want["model"], got["model"], "model")  # it went on from the pre-trained start
