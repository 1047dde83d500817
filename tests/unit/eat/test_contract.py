"""The contract's maths: frames, windows, hops, sigmoid scores, top-k/threshold, pooling over valid token rows."""

from __future__ import annotations

import numpy as np
import pytest

from eat.contract import (
    Label,
    ModelInfo,
    first_window,
    hop_samples_for,
    num_frames,
    pool,
    sigmoid,
    valid_time_patches,
    window_samples_for,
)
from eat.predictor import top_tags

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
    time_rows = pool("time", outputs, num_samples, INFO)
    assert time_rows.shape == (5, 3) and time_rows[:4].tolist() == [[1, 1, 1]] * 4 and time_rows[4].tolist() == [3] * 3
    np.testing.assert_allclose(pool("mean", outputs, num_samples, INFO), [1.4, 1.4, 1.4])
    assert pool("utterance", outputs, num_samples, INFO).tolist() == [2, 3, 4]


def test_hop() -> None:
    assert hop_samples_for(None, 10_480) == 10_480
    assert hop_samples_for(0.5, 10_480) == 8000
    with pytest.raises(ValueError, match="exceeds"):
        hop_samples_for(1.0, 10_480)


def test_frame_maths_match_eat() -> None:
    assert num_frames(160_000) == 998 and num_frames(399) == 0 and num_frames(400) == 1  # reference §1.2
    assert num_frames(np.array([192_000, 11_200])).tolist() == [1198, 68]
    assert window_samples_for(1024) == 164_080 and num_frames(window_samples_for(1024)) == 1024


def test_frame_and_all_keep_time_major_tokens() -> None:
    tokens = np.arange(2 * 32 * 3, dtype=np.float32).reshape(2, 32, 3)  # [W, T*F, D]
    outputs = {"tokens": tokens, "embedding": np.array([[1, 2, 3], [3, 4, 5]], np.float32)}
    num_samples = np.array([10_480, 3000])  # the second window: 2 valid rows of 4
    frame = pool("frame", outputs, num_samples, INFO)
    assert frame.shape == (32 + 16, 3)
    np.testing.assert_array_equal(frame[:32], tokens[0])
    np.testing.assert_array_equal(frame[32:], tokens[1, :16])  # rows past the audio are dropped
    everything = pool("all", outputs, num_samples, INFO)
    assert everything.tolist()[0] == [2, 3, 4] and np.array_equal(everything[1:], frame)
    untrimmed = pool("frame", outputs, num_samples, INFO, trim=False)  # the original keeps padded rows
    assert untrimmed.shape == (64, 3)


def test_first_window_drops_the_rest() -> None:
    samples = np.arange(25, dtype=np.float32)
    w = first_window(samples, window_samples=10)
    assert len(w) == 1 and w.num_samples.tolist() == [10] and w.waveform[0].tolist() == list(range(10))
