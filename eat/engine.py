"""The onnxruntime session behind ``Predictor`` and the service's batcher: one self-describing ONNX file.

The file's ``metadata_props`` (``eat.contract``) say everything a caller needs: labels, window length,
embedding size, precision. ``Engine`` is the interface ``Predictor`` and the batcher use; the PyTorch
twin (``model.pipeline.TorchEngine``) and the tests' fakes have the same three members (``info``,
``run``, ``close``).

On CUDA the inputs are bound once per call and only the requested outputs are fetched (IO binding),
cuDNN picks convolution algorithms by heuristic instead of timing every shape, and fp16 models keep
float32 inputs and outputs, so nothing here depends on the precision.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Literal, Protocol, get_args

import numpy as np

from eat.contract import ContractError, ModelInfo, parse_metadata

logger = logging.getLogger(__name__)


class EngineStartError(RuntimeError):
    """The model cannot be opened (missing file, broken contract, CUDA asked for but absent)."""


class Engine(Protocol):
    """What the batcher needs from a model runner; ``run`` is called from one thread only."""

    info: ModelInfo

    def run(self, waveform: np.ndarray, num_samples: np.ndarray, outputs: tuple[str, ...]) -> dict[str, np.ndarray]:
        """``waveform`` [B, S] float32, ``num_samples`` [B] int64 -> the named outputs, batch-first."""
        ...

    def close(self) -> None: ...


Provider = Literal["auto", "cpu", "cuda", "openvino"]
PROVIDERS: tuple[str, ...] = get_args(Provider)


def open_engine(model_path: Path, *, provider: Provider = "auto", intra_op_threads: int = 0) -> Engine:
    """The engine for ``provider``: onnxruntime (auto/cpu/cuda), or OpenVINO bf16 (``eat.engine_openvino``)."""
    if provider == "openvino":
        from eat.engine_openvino import OpenVinoEngine

        return OpenVinoEngine(Path(model_path), threads=intra_op_threads)
    return OnnxEngine(Path(model_path), provider=provider, intra_op_threads=intra_op_threads)


class OnnxEngine:
    """An onnxruntime session on the best (or the requested) provider."""

    def __init__(
        self,
        model_path: Path,
        *,
        provider: Literal["auto", "cpu", "cuda"] = "auto",
        intra_op_threads: int = 0,
    ) -> None:
        import onnxruntime as ort  # imported here so that importing the service stays cheap

        if not Path(model_path).is_file():
            raise EngineStartError(f"model file not found: {model_path} (set EAT_MODEL_PATH)")
        available = ort.get_available_providers()
        want_cuda = provider == "cuda" or (provider == "auto" and "CUDAExecutionProvider" in available)
        if provider == "cuda" and "CUDAExecutionProvider" not in available:
            raise EngineStartError(
                f"EAT_PROVIDER=cuda but this onnxruntime has no CUDA provider (available: {available})"
            )
        if want_cuda and hasattr(ort, "preload_dlls"):
            ort.preload_dlls()  # find the CUDA/cuDNN libraries installed as pip packages
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = intra_op_threads
        options.inter_op_num_threads = 1
        providers: list = ["CPUExecutionProvider"]
        if want_cuda:
            providers.insert(0, ("CUDAExecutionProvider", {"cudnn_conv_algo_search": "HEURISTIC"}))
        try:
            self._session = ort.InferenceSession(str(model_path), sess_options=options, providers=providers)
        except Exception as err:  # onnxruntime raises its own untyped errors for unreadable models
            raise EngineStartError(f"onnxruntime cannot load {model_path}: {err}") from err
        active = self._session.get_providers()
        # onnxruntime silently falls back to CPU when CUDA fails to initialise: check what we got.
        self._on_cuda = active[0] == "CUDAExecutionProvider"
        if want_cuda and not self._on_cuda:
            message = f"CUDA was requested but the session runs on {active}"
            if provider == "cuda":
                raise EngineStartError(message)
            logger.warning("%s; serving on CPU", message)
        output_names = tuple(o.name for o in self._session.get_outputs())
        meta = self._session.get_modelmeta().custom_metadata_map
        try:
            self.info = parse_metadata(meta, provider="cuda" if self._on_cuda else "cpu", output_names=output_names)
        except ContractError as err:
            raise EngineStartError(f"{model_path}: {err}") from err
        self._check_inputs()
        logger.info(
            "engine ready: model=%s provider=%s precision=%s window_samples=%d classes=%d",
            self.info.model_name,
            self.info.provider,
            self.info.precision,
            self.info.window_samples,
            self.info.num_classes,
        )

    def _check_inputs(self) -> None:
        inputs = {i.name: i for i in self._session.get_inputs()}
        if set(inputs) != {"waveform", "num_samples"}:
            raise EngineStartError(f"model inputs must be waveform and num_samples, got {sorted(inputs)}")
        for name, want in (("waveform", "tensor(float)"), ("num_samples", "tensor(int64)")):
            if inputs[name].type != want:  # fp16 exports keep float32 I/O (the contract)
                raise EngineStartError(f"input {name} must be {want}, got {inputs[name].type}")
        samples_dim = inputs["waveform"].shape[1]
        if isinstance(samples_dim, int) and samples_dim != self.info.window_samples:
            raise EngineStartError(
                f"waveform input has {samples_dim} samples but eat.window_samples is {self.info.window_samples}"
            )

    def run(self, waveform: np.ndarray, num_samples: np.ndarray, outputs: tuple[str, ...]) -> dict[str, np.ndarray]:
        feeds = {"waveform": waveform, "num_samples": num_samples}
        if not self._on_cuda:
            return dict(zip(outputs, self._session.run(list(outputs), feeds), strict=True))
        binding = self._session.io_binding()
        for name, value in feeds.items():
            binding.bind_cpu_input(name, value)
        for name in outputs:
            binding.bind_output(name, "cuda")
        self._session.run_with_iobinding(binding)
        return dict(zip(outputs, binding.copy_outputs_to_cpu(), strict=True))

    def close(self) -> None:
        self._session = None  # type: ignore[assignment]  # frees the session's memory now, not at GC
