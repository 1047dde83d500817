"""Offline EAT inference without PyTorch: the ONNX contract, audio decoding, ``Predictor`` and the HEAR API.

``eat.contract`` is the one place that knows the model's audio maths (rate, frames, patches, windows) and
its ``eat.*`` metadata; ``model/``, ``training/`` and ``service/`` all read it from there. Importing this
package is cheap: ``Predictor`` and friends load (with numpy, the decoders and onnxruntime) on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["Embedding", "Prediction", "Predictor", "Tag"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        return getattr(importlib.import_module("eat.predictor"), name)
    raise AttributeError(f"module 'eat' has no attribute {name!r}")
