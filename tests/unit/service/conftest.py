"""Fixtures for the service tests: toy ONNX models, a controllable engine, test audio, app clients."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from svc_helpers import GatedEngine
from svc_toy_model import build_toy_model

from eat.engine import OnnxEngine
from service.app import create_app
from service.settings import Settings


@pytest.fixture(scope="session")
def toy_model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_toy_model(tmp_path_factory.mktemp("models") / "toy.onnx")


@pytest.fixture(scope="session")
def headless_model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_toy_model(tmp_path_factory.mktemp("models") / "headless.onnx", num_classes=0, name="toy-headless")


@pytest.fixture(scope="session")
def detector_model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two classes whose scores the tests control: "Siren" on loud windows, "Silence" on the others."""
    return build_toy_model(tmp_path_factory.mktemp("models") / "detector.onnx", target_frames=192, detector=True,
                           name="toy-detector")


@pytest.fixture
def toy_engine(toy_model_path: Path) -> OnnxEngine:
    return OnnxEngine(toy_model_path, intra_op_threads=1)


@pytest.fixture
def gated_engine(toy_engine: OnnxEngine) -> GatedEngine:
    return GatedEngine(toy_engine)


def settings_for(model_path: Path, **overrides: object) -> Settings:
    base: dict[str, object] = {
        "model_path": model_path,
        "intra_op_threads": 1,
        "max_batch": 8,
        "batch_buckets": [1, 2, 4, 8],
        "queue_size": 64,
        "max_duration_s": 30.0,
    }
    base.update(overrides)
    return Settings(**base)


@pytest.fixture
def make_client(toy_model_path: Path) -> Callable[..., object]:
    """``with make_client(engine=..., **settings) as client:`` runs the app's lifespan around the block."""

    @contextmanager
    def factory(engine: object = None, model_path: Path | None = None, **overrides: object) -> Iterator[TestClient]:
        app = create_app(settings_for(model_path or toy_model_path, **overrides), engine=engine)
        with TestClient(app, raise_server_exceptions=False) as client:
            yield client

    return factory
