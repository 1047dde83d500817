"""Aggregation: sigmoid scores, top-k/threshold, embedding pooling over valid token rows."""

from __future__ import annotations

import numpy as np
import pytest

from service.engine import Label, ModelInfo
from service.inference import hop_samples_for, pool_embedding, sigmoid, top_tags, valid_time_patches

LABELS = tuple(Label(i, f"id{i}", f"name{i}") for i in range(4))
INFO = ModelInfo(
    model_name="m",
    labels=LABELS,
    sample_rate=16_000,
    window_samples=10_480,
    target_frames=64,
    embedding_dim=3,
    num_classes=4,
    time_patches=4,
    freq_patches=8,
    precision="fp32",
    provider="cpu",
)


def test_sigmoid_is_stable_for_large_logits() -> None:
    scores = sigmoid(np.array([-1000.0, 0.0, 1000.0], np.float32))
    assert np.isfinite(scores).all() and scores.tolist() == [0.0, 0.5, 1.0]


def test_top_tags_order_k_and_threshold() -> None:
    scores = np.array([0.1, 0.9, 0.5, 0.7], np.float32)
    assert [t.index for t in top_tags(scores, LABELS, top_k=3, threshold=None)] == [1, 3, 2]
    assert [t.name for t in top_tags(scores, LABELS, top_k=4, threshold=0.6)] == ["name1", "name3"]


def test_valid_time_patches() -> None:
    # 10480 samples = 64 frames = 4 rows; 400 samples = 1 frame = 1 row; 3000 = 17 frames = 2 rows
    assert valid_time_patches(np.array([10_480, 400, 3000, 100]), 4).tolist() == [4, 1, 2, 1]


def test_pooling_uses_only_valid_rows() -> None:
    tokens = np.zeros((2, 32, 3), np.float32)  # [W, T*F, D]
    tokens[0] = 1.0
    tokens[1, :8] = 3.0  # valid row of the short last window
    tokens[1, 8:] = 100.0  # padding rows: must not count
    outputs = {"tokens": tokens, "embedding": np.array([[1, 2, 3], [3, 4, 5]], np.float32)}
    num_samples = np.array([10_480, 400])
    time_rows = pool_embedding("time", outputs, num_samples, INFO)
    assert time_rows.shape == (5, 3) and time_rows[:4].tolist() == [[1, 1, 1]] * 4 and time_rows[4].tolist() == [3] * 3
    np.testing.assert_allclose(pool_embedding("mean", outputs, num_samples, INFO), [1.4, 1.4, 1.4])
    assert pool_embedding("cls", outputs, num_samples, INFO).tolist() == [2, 3, 4]


def test_hop() -> None:
    assert hop_samples_for(None, 10_480) == 10_480
    assert hop_samples_for(0.5, 10_480) == 8000
    with pytest.raises(ValueError, match="exceeds"):
        hop_samples_for(1.0, 10_480)
