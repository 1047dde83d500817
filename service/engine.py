"""The onnxruntime session behind the batcher: one self-describing ONNX file, CPU or CUDA.

The file's ``metadata_props`` (ARCHITECTURE.md, "The ONNX contract") say everything the service
needs: labels, window length, embedding size, precision. ``Engine`` is the interface the batcher
uses; tests pass a fake with the same three members (``info``, ``run``, ``close``).

On CUDA the inputs are bound once per call and only the requested outputs are fetched (IO binding),
cuDNN picks convolution algorithms by heuristic instead of timing every shape, and fp16 models keep
float32 inputs and outputs, so nothing here depends on the precision.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

import numpy as np

logger = logging.getLogger(__name__)

OUTPUT_NAMES: tuple[str, ...] = ("embedding", "tokens", "logits")


class EngineStartError(RuntimeError):
    """The model cannot be served (missing file, broken contract, CUDA asked for but absent)."""


@dataclass(frozen=True)
class Label:
    index: int
    id: str
    display_name: str


@dataclass(frozen=True)
class ModelInfo:
    """What the ONNX metadata promises; the service trusts nothing else about the model."""

    model_name: str
    labels: tuple[Label, ...]
    sample_rate: int
    window_samples: int
    target_frames: int
    embedding_dim: int
    num_classes: int
    time_patches: int
    freq_patches: int
    precision: str
    provider: str
    source_sha256: str = ""
    format_version: str = "1"
    norm_mean: float = 0.0
    norm_std: float = 1.0

    @property
    def has_classifier(self) -> bool:
        return self.num_classes > 0

    @property
    def window_s(self) -> float:
        return self.window_samples / self.sample_rate


def parse_metadata(meta: dict[str, str], *, provider: str, output_names: tuple[str, ...]) -> ModelInfo:
    """Check and parse the ``eat.*`` metadata; a missing or inconsistent key is an EngineStartError."""
    try:
        raw_labels = json.loads(meta.get("eat.labels") or "[]")
        labels = tuple(Label(int(i), str(label_id), str(name)) for i, label_id, name in raw_labels)
        info = ModelInfo(
            model_name=meta.get("eat.model_name", "eat"),
            labels=labels,
            sample_rate=int(meta["eat.sample_rate"]),
            window_samples=int(meta["eat.window_samples"]),
            target_frames=int(meta["eat.target_frames"]),
            embedding_dim=int(meta["eat.embedding_dim"]),
            num_classes=int(meta.get("eat.num_classes", len(labels))),
            time_patches=int(meta.get("eat.time_patches", int(meta["eat.target_frames"]) // 16)),
            freq_patches=int(meta.get("eat.freq_patches", 8)),
            precision=meta.get("eat.precision", "fp32"),
            provider=provider,
            source_sha256=meta.get("eat.source_sha256", ""),
            format_version=meta.get("eat.format_version", "1"),
            norm_mean=float(meta.get("eat.norm_mean", 0.0)),
            norm_std=float(meta.get("eat.norm_std", 1.0)),
        )
    except (KeyError, ValueError, TypeError) as err:
        raise EngineStartError(f"the ONNX metadata breaks the EAT contract: {err!r}") from err
    if info.sample_rate != 16_000:
        raise EngineStartError(f"eat.sample_rate is {info.sample_rate}; the service decodes to 16000 Hz")
    missing = {"embedding", "tokens"} - set(output_names)
    if missing:
        raise EngineStartError(f"the model lacks the outputs {sorted(missing)}")
    if info.has_classifier:
        if "logits" not in output_names:
            raise EngineStartError(f"eat.num_classes is {info.num_classes} but the model has no 'logits' output")
        if len(labels) != info.num_classes or [lab.index for lab in labels] != list(range(len(labels))):
            raise EngineStartError("eat.labels must list indices 0..num_classes-1 in order")
    return info


class Engine(Protocol):
    """What the batcher needs from a model runner; ``run`` is called from one thread only."""

    info: ModelInfo

    def run(self, waveform: np.ndarray, num_samples: np.ndarray, outputs: tuple[str, ...]) -> dict[str, np.ndarray]:
        """``waveform`` [B, S] float32, ``num_samples`` [B] int64 -> the named outputs, batch-first."""
        ...

    def close(self) -> None: ...


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
        self.info = parse_metadata(meta, provider="cuda" if self._on_cuda else "cpu", output_names=output_names)
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
