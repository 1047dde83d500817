"""The int8 encoder for CPU serving, and the clips an int8 file is checked on.

What is quantised: the encoder's weight MatMuls (QKV, attention projection, both MLP layers of every
block; 4 x depth nodes) get int8 weights, one scale per output channel, and their float32 inputs are
quantised to uint8 on every call (onnxruntime's *dynamic* quantisation). At load onnxruntime fuses
each of them into one ``DynamicQuantizeMatMul``, a u8 x s8 GEMM that uses AVX-512 VNNI / AMX where
the CPU has them. Everything else stays float32: the front end (it is not in the graph that is
quantised at all; its DFT is float64), the patch-embedding Conv, the classifier head (its error would
land on the logits unscaled, for 0.001 % of the FLOPs), and the fp16 path's fusions, which the encoder
gets first (``onnx_fp16.fuse_transformer``) and which stay float32 here: ``MultiHeadAttention`` (Q·Kᵀ,
softmax and attention·V, whose operands are all activations), ``SkipLayerNormalization`` and
``BiasGelu``. Once the MatMuls are int8, those float32 parts are most of the time left, and fusing
them made the int8 EAT-base encoder 1.10x faster (2.37x vs 2.15x the unfused fp32 encoder at batch 2;
erf GELU + bias alone: 1.14x at batch 1; onnxruntime's own load-time fusions miss the dynamo
exporter's GELU and attention patterns).

Why dynamic and not static (measured before the fusions on EAT-base, 10 s, batch 1, 2 onnxruntime
threads, ORT 1.32, interleaved runs on a shared 2-core Sapphire Rapids; logits max abs diff vs fp32
with max |logit| 1.99):

=============================================  ==========  ====================
variant                                         vs fp32     logits max abs diff
=============================================  ==========  ====================
dynamic, per-channel weights (chosen)           2.1x        0.044
dynamic, per-tensor weights                     1.9x        0.059
dynamic, also Q·Kᵀ and attention·V              1.9x        0.041
static QOperator (QLinearMatMul), 8 scenes      1.75x       0.088
static QDQ, 8 scenes                            1.0x        0.097
=============================================  ==========  ====================

The file as exported (fused, dynamic int8) against the fp32 file, EAT-base at 10 s, one interleaved
``bench/engine.py`` run on 2 threads: 2.30x / 2.66x / 2.43x / 2.56x clips/s at batch 1 / 2 / 4 / 8
(``bench/results/engine.json``).

Static quantisation fixes each activation's range from calibration clips, so it needs requantise
steps around every MatMul (QDQ: onnxruntime did not fuse them at all here) and clips whatever a real
clip exceeds the calibration range by; dynamic ranges follow each call. The catch of dynamic ranges:
one scale covers the whole batch tensor, so a clip's int8 result moves slightly with the clips it is
batched with (bounded by the tolerance in ``training.export``, which the batch-1 check also meets).
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
from onnxruntime.quantization import QuantType, quantize_dynamic

from training.data.dataset import load_audio
from training.data.synthetic import make_clip
from training.onnx_fp16 import fuse_transformer

log = logging.getLogger(__name__)

AUDIO_SUFFIXES = (".wav", ".flac", ".ogg")  # what soundfile decodes without extra codecs
MAX_CHECK_CLIPS = 16  # clips per check set: enough for a 95 % agreement rate to mean one miss at most


def quantizable_matmuls(encoder: onnx.ModelProto) -> list[str]:
    """Names of the ``MatMul`` nodes whose right operand is a float32 weight (an initializer), except the
    classifier head's: the one that the ``logits`` output comes from through bias Adds alone."""
    weights = {t.name for t in encoder.graph.initializer if t.data_type == onnx.TensorProto.FLOAT}
    producers = {out: node for node in encoder.graph.node for out in node.output}
    head = producers.get("logits")
    while head is not None and head.op_type != "MatMul":
        computed = [name for name in head.input if name in producers]
        head = producers[computed[0]] if head.op_type == "Add" and len(computed) == 1 else None
    return [
        node.name
        for node in encoder.graph.node
        if node.op_type == "MatMul" and node.input[1] in weights and node is not head
    ]


class _DropAdvice(logging.Filter):
    """The quantiser logs on the root logger: one INFO line per tensor it leaves alone, and a warning
    to "run pre-processing" for every model, whose shape inference changes nothing for a graph the
    dynamo exporter already typed. Both are dropped while it runs; other warnings pass."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING and "pre-processing before quantization" not in record.getMessage()


@contextlib.contextmanager
def _quiet_root() -> Iterator[None]:
    root, advice = logging.getLogger(), _DropAdvice()
    root.addFilter(advice)
    try:
        yield
    finally:
        root.removeFilter(advice)


def encoder_to_int8(encoder: onnx.ModelProto) -> onnx.ModelProto:
    """The fused encoder graph with int8 weight MatMuls (see the module docstring); inputs and outputs
    stay float32, so the front end joins it exactly as it joins the float32 encoder."""
    encoder = fuse_transformer(encoder)
    nodes = quantizable_matmuls(encoder)
    if not nodes:
        raise ValueError("the encoder graph has no MatMul with a float32 weight to quantise")
    with tempfile.TemporaryDirectory(prefix="eat-int8-") as tmp, _quiet_root():
        out = Path(tmp) / "encoder-int8.onnx"
        quantize_dynamic(
            encoder,
            out,
            op_types_to_quantize=["MatMul"],
            nodes_to_quantize=nodes,
            per_channel=True,
            weight_type=QuantType.QInt8,  # u8 activations x s8 weights: the VNNI / AMX kernel
            extra_options={"MatMulConstBOnly": True},
        )
        quantized = onnx.load(str(out))
    log.info("int8: quantised %d weight MatMuls", len(nodes))
    return quantized


def count_int8_matmuls(model: onnx.ModelProto) -> int:
    """How many ``MatMulInteger`` nodes (one per quantised MatMul) the graph holds."""
    return sum(node.op_type == "MatMulInteger" for node in model.graph.node)


def check_clips(
    window_samples: int, directory: str | Path | None = None, max_clips: int = MAX_CHECK_CLIPS, seed: int = 0
) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Names, waveforms ``[N, S]`` float32 and valid counts ``[N]`` int64 of the clips an int8 export
    must agree on: the first ``max_clips`` audio files of ``directory`` (sorted, recursive, cut to the
    window, resampled to 16 kHz), or by default synthetic scenes of the demo's data (1-3 events each).
    """
    if directory is None:
        rng = np.random.default_rng(seed)
        audio = [make_clip(rng, window_samples)[0] for _ in range(max_clips)]
        names = [f"scene_{i:02d}" for i in range(max_clips)]
    else:
        root = Path(directory)
        if not root.is_dir():
            raise FileNotFoundError(f"check-clip folder not found: {root}")
        files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in AUDIO_SUFFIXES)[:max_clips]
        if not files:
            raise FileNotFoundError(f"no {'/'.join(AUDIO_SUFFIXES)} files under {root}")
        audio = [load_audio(str(p), max_samples=window_samples) for p in files]
        names = [str(p.relative_to(root)) for p in files]
    waveform = np.zeros((len(audio), window_samples), dtype=np.float32)
    num_samples = np.zeros(len(audio), dtype=np.int64)
    for row, clip in enumerate(audio):
        valid = min(len(clip), window_samples)
        waveform[row, :valid] = clip[:valid]
        num_samples[row] = max(valid, 1)  # an empty file is a silent clip of one sample
    return names, waveform, num_samples


def top_k_agreement(got: np.ndarray, want: np.ndarray, k: int) -> float:
    """Fraction of rows ``[B, C]`` whose top-``k`` classes are the same set in ``got`` and ``want``
    (order within the k ignored, no allowance for near ties)."""
    k = min(k, want.shape[1])
    same = [
        set(np.argsort(-g)[:k].tolist()) == set(np.argsort(-w)[:k].tolist()) for g, w in zip(got, want, strict=True)
    ]
    return float(np.mean(same))
