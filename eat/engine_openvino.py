"""bf16 on the CPU through OpenVINO (``EAT_PROVIDER=openvino``): the same fp32 file, about 4x faster.

onnxruntime's x86 CPU provider has no bf16 GEMM, so on CPUs with AVX-512 BF16 or AMX units the model
runs in bf16 only through OpenVINO (measured in ``bench/engine.py``; docs/serving.md has the figures).
OpenVINO reads the ONNX file itself and keeps its float64 front-end ops in float64; its bf16 hint
lowers the matrix products. On CPUs without bf16 units it runs f32 (logged). ``info.provider`` is
``openvino``, ``info.precision`` what really runs.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import numpy as np

from eat.contract import ContractError, parse_metadata
from eat.engine import EngineStartError

logger = logging.getLogger(__name__)

# max abs difference from fp32 / max(1, max |fp32|), per output, as for eat export's int8. Measured with
# OpenVINO 2026.4: EAT-base (random weights, 8 noise/tone clips at -40..-6 dBFS) embedding 0.005, logits
# 0.007; the official fine-tuned fixture's logits vs the official 0.006. Top-5 sets equal on all of them.
BF16_RELATIVE_TOLERANCE = 2e-2


class OpenVinoEngine:
    """An fp32 ``eat export`` file on OpenVINO's CPU plugin, in bf16 where the CPU has it."""

    def __init__(self, model_path: Path, *, threads: int = 0, precision: str = "auto") -> None:
        try:
            import openvino as ov
        except ImportError as err:
            raise EngineStartError(
                "EAT_PROVIDER=openvino needs OpenVINO: pip install 'eat-audio[openvino]'"
            ) from err
        if not Path(model_path).is_file():
            raise EngineStartError(f"model file not found: {model_path} (set EAT_MODEL_PATH)")
        core = ov.Core()
        try:
            model = core.read_model(str(model_path))
        except RuntimeError as err:
            raise EngineStartError(f"OpenVINO cannot load {model_path}: {err}") from err
        # OpenVINO keeps an ONNX file's metadata_props under rt_info["framework"]
        framework = model.get_rt_info()["framework"] if model.has_rt_info("framework") else {}
        meta = {key: value.astype(str) for key, value in framework.items()}
        try:
            names = tuple(o.get_any_name() for o in model.outputs)
            info = parse_metadata(meta, provider="openvino", output_names=names)
        except ContractError as err:
            raise EngineStartError(f"{model_path}: {err}") from err
        if info.precision != "fp32":
            raise EngineStartError(
                f"{model_path} is {info.precision}; OpenVINO serving starts from the fp32 file of `eat export`"
            )
        if {p.get_any_name() for p in model.inputs} != {"waveform", "num_samples"}:
            raise EngineStartError(f"{model_path}: model inputs must be waveform and num_samples")
        if precision == "auto":
            precision = "bf16" if "BF16" in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES") else "f32"
            if precision == "f32":
                logger.warning("this CPU has no bf16 units: OpenVINO runs the model in f32")
        config = {"INFERENCE_PRECISION_HINT": precision, "NUM_STREAMS": 1, "PERFORMANCE_HINT": "LATENCY"}
        if threads:
            config["INFERENCE_NUM_THREADS"] = threads
        try:  # one request, reused: ``run`` is called from one thread (the Engine protocol)
            self._request = core.compile_model(model, "CPU", config).create_infer_request()
        except RuntimeError as err:
            raise EngineStartError(f"OpenVINO cannot compile {model_path}: {err}") from err
        self.info = dataclasses.replace(info, precision="bf16" if precision == "bf16" else "fp32")
        logger.info(
            "engine ready: model=%s provider=openvino precision=%s window_samples=%d classes=%d",
            info.model_name, self.info.precision, info.window_samples, info.num_classes,
        )

    def run(self, waveform: np.ndarray, num_samples: np.ndarray, outputs: tuple[str, ...]) -> dict[str, np.ndarray]:
        results = self._request.infer({"waveform": waveform, "num_samples": num_samples})  # outputs are copies
        return {name: results[name] for name in outputs}

    def close(self) -> None:
        self._request = None  # type: ignore[assignment]  # frees the compiled model now, not at GC
