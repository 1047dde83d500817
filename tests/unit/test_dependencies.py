"""House rule 2: `eat` (the contract, decoding, Predictor) -> numpy and onnxruntime (OpenVINO only inside
``eat.engine_openvino``'s engine, for ``EAT_PROVIDER=openvino``); `model` -> torch
and `eat.contract`; `training` -> `model`, `eat`; `service` -> `eat`, never torch (the serving image has
none). Checked on the import statements of every module, and by importing the service in a fresh
interpreter. The exceptions: `eat` may import `model` and `torch` inside a function, for the optional
PyTorch backend of ``Predictor.from_checkpoint`` and for HEAR callers that pass torch tensors; neither
runs unless asked for."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FORBIDDEN = {
    "eat": {"model", "training", "service", "torch", "torchaudio", "safetensors", "fastapi", "starlette"},
    "model": {"training", "service"},
    "training": {"service"},
    "service": {"model", "training", "torch", "torchaudio", "safetensors"},
}

LAZY_ALLOWED = {"eat": {"model", "torch"}}  # imported inside a function only (see the docstring)


def _imported_top_levels(path: Path, *, module_level_only: bool = False) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names = set()
    for node in (tree.body if module_level_only else ast.walk(tree)):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_imports_point_one_way(package: str) -> None:
    offenders = {
        str(path.relative_to(ROOT)): sorted(
            (_imported_top_levels(path) & FORBIDDEN[package] - LAZY_ALLOWED.get(package, set()))
            | (_imported_top_levels(path, module_level_only=True) & FORBIDDEN[package])
        )
        for path in sorted((ROOT / package).rglob("*.py"))
    }
    offenders = {k: v for k, v in offenders.items() if v}
    assert not offenders, f"{package} imports what it must not: {offenders}"


def test_service_and_cli_serve_import_without_torch() -> None:
    code = (
        "import sys, importlib\n"
        "for name in ['service.app', 'service.server', 'training.cli', 'eat.predictor', 'eat.hear']:\n"
        "    importlib.import_module(name)\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in {'torch', 'model', 'openvino'})\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_training_data_reads_manifests_without_the_predictor() -> None:
    """training's manifest reader shares ``eat.inputs.read_tsv``; that must not load the inference stack."""
    code = (
        "import sys, training.data.manifest\n"
        "bad = sorted(m for m in sys.modules if m in {'eat.predictor', 'eat.events', 'onnxruntime'})\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
