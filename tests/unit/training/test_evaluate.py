"""mAP and accuracy, the batched evaluation pass, and the ``eat evaluate`` command."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score

from eat import Predictor
from model.checkpoints import save_checkpoint
from model.classifier import EATClassifier
from model.config import FrontendConfig, tiny
from model.encoder import Encoder
from model.frontend import LogMelFrontend
from training import evaluate as ev
from training.cli import main
from training.data import synthetic
from training.data.dataset import AudioDataset
from training.data.sampler import ResumableSampler, make_loader
from training.data.splits import load_split

FRONTEND = FrontendConfig(target_frames=96)  # ~1 s clips keep the tiny model fast


def test_map_on_a_hand_computed_case() -> None:
    scores = np.array([[0.9, 0.1, 0.5], [0.8, 0.7, 0.4], [0.3, 0.2, 0.3], [0.1, 0.6, 0.2]])
    targets = np.array([[1, 0, 0], [0, 1, 0], [1, 0, 0], [0, 0, 0]])
    m_ap, per_class = ev.mean_average_precision(scores, targets)
    # Class 0: ranks 1 (hit), 2, 3 (hit) -> AP = (1/1 + 2/3) / 2. Class 1: its positive ranks first -> 1.
    # Class 2 has no positive clip: NaN, left out of the mean (the original's scikit-learn gave NaN and
    # EAT took a NaN-ignoring mean; scikit-learn >= 1.1 would give 0 and a mean of (5/6 + 1 + 0) / 3).
    np.testing.assert_allclose(per_class[:2], [5 / 6, 1.0])
    assert np.isnan(per_class[2])
    assert m_ap == pytest.approx((5 / 6 + 1.0) / 2)
    assert np.isnan(ev.mean_average_precision(scores, np.zeros_like(targets))[0])
    with pytest.raises(ValueError, match=r"\[N, C\]"):
        ev.mean_average_precision(scores, targets[:, :2])


def test_map_matches_sklearn_macro_average() -> None:
    rng = np.random.default_rng(0)
    targets = (rng.random((200, 12)) < 0.2).astype(np.float32)
    scores = torch.tensor(targets + rng.normal(0, 0.8, targets.shape))  # torch input works too
    m_ap, per_class = ev.mean_average_precision(scores, torch.tensor(targets))
    assert m_ap == pytest.approx(average_precision_score(targets, scores.numpy(), average="macro"))
    np.testing.assert_allclose(per_class, average_precision_score(targets, scores.numpy(), average=None))


def test_accuracy_with_indices_and_one_hot_targets() -> None:
    logits = torch.tensor([[2.0, 1.0, 0.0], [0.0, 3.0, 1.0], [1.0, 0.0, 5.0], [9.0, 0.0, 0.0]])
    assert ev.accuracy(logits, torch.tensor([0, 1, 1, 2])) == pytest.approx(0.5)
    assert ev.accuracy(logits, torch.eye(3)[[0, 1, 2, 0]]) == pytest.approx(1.0)


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> synthetic.SyntheticData:
    return synthetic.generate(tmp_path_factory.mktemp("eval"), num_train=2, num_eval=6, clip_seconds=1.0, seed=0)


@pytest.fixture(scope="module")
def classifier() -> EATClassifier:
    torch.manual_seed(0)
    model = EATClassifier(tiny(num_classes=len(synthetic.CLASSES), depth=1))
    model.init_weights()
    return model


def test_evaluate_runs_batched_and_restores_train_mode(data, classifier: EATClassifier) -> None:
    manifest = load_split(data.data_dir, "eval")
    dataset = AudioDataset(manifest, FRONTEND.window_samples)
    loader = make_loader(dataset, 4, ResumableSampler(len(dataset), shuffle=False))
    frontend = LogMelFrontend(FRONTEND)
    classifier.train()
    result = ev.evaluate(classifier, loader, frontend, "cpu", multi_label=True)
    assert classifier.training
    assert result["num_clips"] == 6 and result["per_class_ap"].shape == (len(synthetic.CLASSES),)
    # Same numbers as one unbatched pass by hand.
    batch = next(iter(make_loader(dataset, 6, ResumableSampler(6, shuffle=False))))
    classifier.eval()
    with torch.no_grad():
        logits = classifier(frontend(batch["waveform"], batch["num_samples"]))
    expected_map, _ = ev.mean_average_precision(torch.sigmoid(logits), batch["target"])
    assert result["mAP"] == pytest.approx(expected_map, abs=1e-6)
    assert result["accuracy"] == pytest.approx(ev.accuracy(logits, batch["target"]))
    bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, batch["target"], reduction="sum") / 6
    assert result["loss"] == pytest.approx(float(bce), rel=1e-5)


def test_evaluate_checks_what_the_model_returns(data, classifier: EATClassifier) -> None:
    dataset = AudioDataset(load_split(data.data_dir, "eval"), FRONTEND.window_samples)
    loader = make_loader(dataset, 3, ResumableSampler(len(dataset), shuffle=False))
    frontend = LogMelFrontend(FRONTEND)
    with pytest.raises(ValueError, match="not logits"):
        ev.evaluate(Encoder(tiny(depth=1)), loader, frontend, "cpu", multi_label=True)
    # The failed pass stopped after one batch; the next pass still covers every clip.
    bf16 = ev.evaluate(classifier, loader, frontend, "cpu", multi_label=False, autocast_dtype=torch.bfloat16)
    assert bf16["num_clips"] == 6 and np.isfinite(bf16["loss"])


def test_eat_evaluate_command(data, classifier: EATClassifier, tmp_path: Path, capsys) -> None:
    ckpt = save_checkpoint(tmp_path / "clf.safetensors", classifier, FRONTEND, labels=synthetic.labels())
    ap_log, json_path = tmp_path / "ap.txt", tmp_path / "metrics.json"
    rc = main(["evaluate", str(ckpt), "--data", str(data.data_dir), "--batch-size", "4",
               "--ap-log", str(ap_log), "--json", str(json_path)])
    assert rc == 0
    out = capsys.readouterr().out
    assert "mAP:" in out and "accuracy:" in out and "clips: 6" in out
    lines = ap_log.read_text().splitlines()
    assert len(lines) == 1 + len(synthetic.CLASSES)
    assert lines[1].startswith("Sine wave" + " " * (50 - len("Sine wave")) + " ")
    assert all(line[51:] == "nan" or len(line[51:].split(".")[1]) == 4 for line in lines[1:])
    metrics = json.loads(json_path.read_text())
    assert metrics["num_clips"] == 6 and len(metrics["per_class_ap"]) == len(synthetic.CLASSES)


def test_eat_evaluate_user_errors(data, tmp_path: Path, capsys) -> None:
    encoder_only = save_checkpoint(tmp_path / "enc.safetensors", Encoder(tiny(depth=1)), FRONTEND)
    assert main(["evaluate", str(encoder_only), "--data", str(data.data_dir)]) == 2
    assert "no classifier head" in capsys.readouterr().err
    wrong = save_checkpoint(tmp_path / "c3.safetensors", EATClassifier(tiny(num_classes=3, depth=1)), FRONTEND)
    assert main(["evaluate", str(wrong), "--data", str(data.data_dir)]) == 2
    assert "15 classes but the model outputs 3" in capsys.readouterr().err
    assert main(["evaluate", str(wrong), "--data", str(tmp_path / "nothing")]) == 2
    assert "not found" in capsys.readouterr().err
    assert main(["evaluate", str(wrong), "--data", str(data.data_dir), "--device", "gpu7"]) == 2
    assert "not a torch device" in capsys.readouterr().err


def test_max_over_windows_gives_each_clip_its_best_window() -> None:
    logits = torch.tensor([[0.0, 5.0], [2.0, -1.0], [1.0, 1.0], [-3.0, 4.0], [7.0, 0.0]])
    targets = torch.tensor([[1.0, 0.0]] * 2 + [[0.0, 1.0]] * 3)
    clip_logits, clip_targets = ev.max_over_windows(logits, targets, torch.tensor([4, 4, 9, 9, 9]))
    assert clip_logits.tolist() == [[2.0, 5.0], [7.0, 4.0]]
    assert clip_targets.tolist() == [[1.0, 0.0], [0.0, 1.0]]


def test_eat_evaluate_aggregate_max_scores_clips_as_the_predictor(data, classifier, tmp_path, capsys) -> None:
    """With --aggregate max, each 1 s clip is three 0.49 s windows; the mAP equals the one computed from
    eat.Predictor's clip scores (the service's rule), and differs from scoring the first window only."""
    short = FrontendConfig(target_frames=48)
    ckpt = save_checkpoint(tmp_path / "clf.safetensors", classifier, short, labels=synthetic.labels())
    json_max, json_first = tmp_path / "max.json", tmp_path / "first.json"
    assert main(["evaluate", str(ckpt), "--data", str(data.data_dir), "--aggregate", "max", "--json",
                 str(json_max), "--batch-size", "2"]) == 0
    assert main(["evaluate", str(ckpt), "--data", str(data.data_dir), "--json", str(json_first)]) == 0
    capsys.readouterr()
    manifest = load_split(data.data_dir, "eval")
    predictor = Predictor.from_checkpoint(ckpt, window_seconds=None)
    assert predictor.info.window_samples == short.window_samples
    scores = np.stack([predictor.predict(item.path).scores for item in manifest.items])
    assert all(predictor.predict(item.path).num_windows == 3 for item in manifest.items)
    targets = np.zeros_like(scores)
    for row, item in enumerate(manifest.items):
        targets[row, list(item.targets)] = 1.0
    expected, _ = ev.mean_average_precision(scores, targets)
    got = json.loads(json_max.read_text())
    assert got["num_clips"] == 6
    assert got["mAP"] == pytest.approx(expected, abs=1e-4)
    assert got["mAP"] != json.loads(json_first.read_text())["mAP"]
