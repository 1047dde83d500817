"""A tiny ONNX model that follows the EAT contract, built with onnx.helper (no torch).

It keeps the service's tests independent of the real export: same inputs, outputs and metadata,
trivial maths. Tokens are a linear map of waveform chunks (plus a term in ``num_samples``, so a test
can see that input matters), the embedding is their mean, logits a linear head on it.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from eat.contract import window_samples_for

FREQ_PATCHES = 8


def toy_labels(num_classes: int) -> list[list]:
    return [[i, f"/m/toy{i}", f"Toy sound {i}"] for i in range(num_classes)]


# The detector's classes: AudioSet's ids for these two sounds.
DETECTOR_LABELS = [[0, "/m/03kmc9", "Siren"], [1, "/m/028v0c", "Silence"]]
DETECTOR_LEVEL = 0.15  # |sample| above which a window holds the "siren"


def build_toy_model(
    path: Path,
    *,
    target_frames: int = 64,
    embed_dim: int = 16,
    num_classes: int = 5,
    seed: int = 0,
    name: str = "toy-eat",
    detector: bool = False,
) -> Path:
    """Write the model to ``path``; ``num_classes=0`` gives a headless (encoder-only) model.

    ``detector=True`` gives a model whose scores a test controls: two classes, "Siren" fires on any
    window holding a sample louder than ``DETECTOR_LEVEL`` (logit 30 * (max|x| - level)) and
    "Silence" on any other window. Padding is zeros, so it never fires.
    """
    if detector:
        num_classes = len(DETECTOR_LABELS)
    rng = np.random.default_rng(seed)
    window = window_samples_for(target_frames)
    time_patches = target_frames // 16
    num_tokens = time_patches * FREQ_PATCHES
    chunk = window // num_tokens
    init = [
        numpy_helper.from_array(np.array([0], np.int64), "starts"),
        numpy_helper.from_array(np.array([num_tokens * chunk], np.int64), "ends"),
        numpy_helper.from_array(np.array([1], np.int64), "axes"),
        numpy_helper.from_array(np.array([-1, num_tokens, chunk], np.int64), "chunk_shape"),
        numpy_helper.from_array(np.array([-1, 1, 1], np.int64), "col_shape"),
        numpy_helper.from_array(rng.normal(0, 1, (chunk, embed_dim)).astype(np.float32), "w_tok"),
        numpy_helper.from_array(rng.normal(0, 1, (1, 1, embed_dim)).astype(np.float32), "w_len"),
        numpy_helper.from_array(np.array(window, np.float32), "window"),
    ]
    nodes = [
        helper.make_node("Slice", ["waveform", "starts", "ends", "axes"], ["used"]),
        helper.make_node("Reshape", ["used", "chunk_shape"], ["chunks"]),  # [B, N, K]
        helper.make_node("MatMul", ["chunks", "w_tok"], ["proj"]),  # [B, N, D]
        helper.make_node("Cast", ["num_samples"], ["ns_f"], to=TensorProto.FLOAT),
        helper.make_node("Div", ["ns_f", "window"], ["ns_frac"]),
        helper.make_node("Reshape", ["ns_frac", "col_shape"], ["ns_col"]),  # [B, 1, 1]
        helper.make_node("Mul", ["ns_col", "w_len"], ["len_term"]),  # [B, 1, D]
        helper.make_node("Add", ["proj", "len_term"], ["tokens"]),  # [B, N, D]
        helper.make_node("ReduceMean", ["tokens"], ["embedding"], axes=[1], keepdims=0),  # [B, D]
    ]
    outputs = [
        helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["batch", embed_dim]),
        helper.make_tensor_value_info("tokens", TensorProto.FLOAT, ["batch", num_tokens, embed_dim]),
    ]
    if detector:
        init += [
            numpy_helper.from_array(np.array([[30.0, -30.0]], np.float32), "w_det"),
            numpy_helper.from_array(np.array([-30.0 * DETECTOR_LEVEL, 30.0 * DETECTOR_LEVEL], np.float32), "b_det"),
        ]
        nodes += [
            helper.make_node("Abs", ["waveform"], ["magnitude"]),
            helper.make_node("ReduceMax", ["magnitude"], ["peak"], axes=[1], keepdims=1),  # [B, 1]
            helper.make_node("MatMul", ["peak", "w_det"], ["head"]),
            helper.make_node("Add", ["head", "b_det"], ["logits"]),  # [B, 2]
        ]
        outputs.append(helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", num_classes]))
    elif num_classes:
        init += [
            numpy_helper.from_array(rng.normal(0, 0.5, (embed_dim, num_classes)).astype(np.float32), "w_head"),
            numpy_helper.from_array(rng.normal(0, 0.5, (num_classes,)).astype(np.float32), "b_head"),
        ]
        nodes += [
            helper.make_node("MatMul", ["embedding", "w_head"], ["head"]),
            helper.make_node("Add", ["head", "b_head"], ["logits"]),  # [B, C]
        ]
        outputs.append(helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", num_classes]))
    graph = helper.make_graph(
        nodes,
        name,
        [
            helper.make_tensor_value_info("waveform", TensorProto.FLOAT, ["batch", window]),
            helper.make_tensor_value_info("num_samples", TensorProto.INT64, ["batch"]),
        ],
        outputs,
        initializer=init,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    metadata = {
        "eat.format_version": "1",
        "eat.model_name": name,
        "eat.labels": json.dumps(DETECTOR_LABELS if detector else toy_labels(num_classes)),
        "eat.sample_rate": "16000",
        "eat.window_samples": str(window),
        "eat.target_frames": str(target_frames),
        "eat.norm_mean": "-4.268",
        "eat.norm_std": "4.569",
        "eat.embedding_dim": str(embed_dim),
        "eat.num_classes": str(num_classes),
        "eat.precision": "fp32",
        "eat.source_sha256": "0" * 64,
        "eat.time_patches": str(time_patches),
        "eat.freq_patches": str(FREQ_PATCHES),
    }
    helper.set_model_props(model, metadata)
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def siren_scene(seconds: float = 10.0, onset_s: float = 3.0, offset_s: float = 6.0, seed: int = 0) -> np.ndarray:
    """16 kHz float32: quiet noise with a rising-and-falling siren (600-1200 Hz, 0.5) from onset to offset."""
    rate = 16_000
    rng = np.random.default_rng(seed)
    samples = (0.01 * rng.standard_normal(round(seconds * rate))).astype(np.float32)
    t = np.arange(round(onset_s * rate), round(offset_s * rate)) / rate
    freq = 900 + 300 * np.sin(2 * np.pi * 0.5 * t)  # Hz, two sweeps per 4 s
    phase = 2 * np.pi * np.cumsum(freq) / rate
    samples[round(onset_s * rate) : round(offset_s * rate)] += (0.5 * np.sin(phase)).astype(np.float32)
    return samples
