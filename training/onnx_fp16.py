"""ONNX graph surgery for the exported model: transformer fusions, the fp16 encoder, and joining the
float32 front end to the encoder graph.

The front end and the encoder are exported as two graphs and joined here, so the fp16 variant can
convert the encoder alone. The front end must stay float32 (power spectra of loud audio exceed the
fp16 range and the log floor 1.19e-7 is below fp16's smallest normal, see ``model/frontend.py``).
Marking its nodes with a node block list is not enough: onnxruntime's converter still casts every
tensor *between* two blocked nodes to fp16 and back, which moved the features by 0.18 when tried.

Fusions come from ``onnxscript.rewriter.ort_fusions``, whose patterns match what the dynamo exporter
emits (decomposed SDPA, native LayerNormalization, erf GELU). ``onnxruntime.transformers.optimizer``
targets the old TorchScript exporter's patterns and fused only GELU on this graph (measured, ORT
1.32), so it is not used. The fp32 export is left unfused: on CPU the fused EAT-base encoder ran
slower (0.90 s vs 0.37 s per 10 s clip, 2 threads), and onnxruntime applies its own fusions at load.

Precision of the fp16 encoder: inputs and outputs stay float32 (``keep_io_types``); ``Softmax`` and
the plain ``LayerNormalization`` nodes (input norm, head norm) run in float32 behind casts; the fused
``SkipLayerNormalization`` and ``MultiHeadAttention`` kernels accumulate their statistics and softmax
in float32 internally, so they are left in fp16.
"""

from __future__ import annotations

import logging
from collections import Counter

import onnx
import onnx_ir as ir
from onnx import compose
from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16
from onnxscript.rewriter.ort_fusions import optimize_for_ort

log = logging.getLogger(__name__)

# Fused op type -> the family it is reported under (attention, LayerNorm, GELU).
FUSED_OP_FAMILIES: dict[str, str] = {
    "Attention": "attention",
    "MultiHeadAttention": "attention",
    "SkipLayerNormalization": "layer_norm",
    "LayerNormalization": "layer_norm",
    "BiasGelu": "gelu",
    "FastGelu": "gelu",
    "Gelu": "gelu",
}
FP32_OP_TYPES = ("Softmax", "LayerNormalization")  # kept float32 in the fp16 encoder


def fuse_transformer(model: onnx.ModelProto) -> onnx.ModelProto:
    """Attention, skip-LayerNorm and bias-GELU fusions for onnxruntime (``com.microsoft`` ops)."""
    fused, rule_counts = optimize_for_ort(ir.from_proto(model))
    log.debug("onnxscript ort_fusions rule counts: %s", {k: v for k, v in rule_counts.items() if v})
    return ir.to_proto(fused)


def count_fused_ops(model: onnx.ModelProto) -> dict[str, int]:
    """How many fused onnxruntime nodes of each type the graph holds, e.g. ``{"MultiHeadAttention": 12}``.

    Only ``com.microsoft`` ops count: a standard ``LayerNormalization`` is the exporter's, not a fusion.
    """
    counts = Counter(
        node.op_type
        for node in model.graph.node
        if node.domain == "com.microsoft" and node.op_type in FUSED_OP_FAMILIES
    )
    return dict(sorted(counts.items()))


def fusion_summary(counts: dict[str, int]) -> dict[str, int]:
    """Per-family totals (attention, layer_norm, gelu) of ``count_fused_ops``'s result."""
    families = dict.fromkeys(("attention", "layer_norm", "gelu"), 0)
    for op_type, count in counts.items():
        families[FUSED_OP_FAMILIES[op_type]] += count
    return families


def encoder_to_fp16(model: onnx.ModelProto) -> onnx.ModelProto:
    """Fused fp16 encoder with float32 inputs/outputs; softmax and plain LayerNorm stay float32."""
    converted = convert_float_to_float16(
        fuse_transformer(model),
        keep_io_types=True,
        op_block_list=[*DEFAULT_OP_BLOCK_LIST, *FP32_OP_TYPES],
    )
    # The converter appends its input casts at the end of the node list; ONNX wants topological order.
    graph = ir.from_proto(converted)
    graph.graph.sort()
    return ir.to_proto(graph)


def join_frontend(frontend: onnx.ModelProto, encoder: onnx.ModelProto, feature_name: str) -> onnx.ModelProto:
    """One graph: the front end's ``feature_name`` output feeds the encoder's input of that name.

    Node and tensor names of the two graphs are prefixed so they cannot collide; the graph inputs and
    outputs keep their contract names.
    """
    parts = []
    for part, prefix in ((frontend, "frontend/"), (encoder, "encoder/")):
        parts.append(compose.add_prefix(part, prefix, rename_inputs=False, rename_outputs=False))
    front, enc = parts
    # merge_models needs one IR version; the higher one reads the lower one's graph unchanged.
    front.ir_version = enc.ir_version = max(front.ir_version, enc.ir_version)
    joined = compose.merge_models(front, enc, io_map=[(feature_name, feature_name)], producer_name="eat export")
    opsets: dict[str, int] = {}
    for entry in joined.opset_import:  # merge_models lists a domain once per part
        opsets[entry.domain] = max(opsets.get(entry.domain, 0), entry.version)
    del joined.opset_import[:]
    joined.opset_import.extend(onnx.helper.make_opsetid(d, v) for d, v in sorted(opsets.items()))
    onnx.checker.check_model(joined)
    return joined
