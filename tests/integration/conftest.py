"""Fixtures that run the service as a real process (uvicorn) on a free port."""

from __future__ import annotations

import importlib.util
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]

# A server whose engine sleeps before each call, so batching, overload and drain are deterministic;
# an optional second argument makes every file's decode sleep too (deadline tests).
SLOW_SERVER = """
import sys, time
import service.inference
from eat.engine import OnnxEngine
from service.log import configure_logging
from service.server import serve
from service.settings import Settings

class SlowEngine:
    def __init__(self, inner, delay_s):
        self.inner, self.info, self.delay_s = inner, inner.info, delay_s
    def run(self, waveform, num_samples, outputs):
        time.sleep(self.delay_s)
        return self.inner.run(waveform, num_samples, outputs)
    def close(self):
        self.inner.close()

if len(sys.argv) > 2:
    real_prepare, decode_delay_s = service.inference.prepare, float(sys.argv[2])
    def slow_prepare(data, **kwargs):
        time.sleep(decode_delay_s)
        return real_prepare(data, **kwargs)
    service.inference.prepare = slow_prepare

settings = Settings()
configure_logging(settings.log_level)
engine = OnnxEngine(settings.model_path, intra_op_threads=1)
sys.exit(serve(settings, SlowEngine(engine, float(sys.argv[1]))))
"""


def _load_toy_builder():
    path = REPO_ROOT / "tests" / "unit" / "service" / "svc_toy_model.py"
    spec = importlib.util.spec_from_file_location("svc_toy_model_integration", path)
    module = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(module)
    return module.build_toy_model


@pytest.fixture(scope="session")
def toy_onnx(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _load_toy_builder()(tmp_path_factory.mktemp("served") / "toy.onnx")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    def __init__(self, process: subprocess.Popen, url: str, log_path: Path) -> None:
        self.process, self.url, self.log_path = process, url, log_path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def metric(self, name: str, labels: str = "") -> float:
        prefix = f"{name}{{{labels}}}" if labels else name
        for line in httpx.get(f"{self.url}/metrics", timeout=10).text.splitlines():
            if line.startswith(prefix + " "):
                return float(line.split()[-1])
        return 0.0


@contextmanager
def _run_server(args: list[str], env: dict[str, str], tmp_path: Path, startup_s: float = 60) -> Iterator[Server]:
    """Start ``python <args>`` with EAT_* ``env`` on a free port; wait until /health/ready is 200."""
    port = free_port()
    log_path = tmp_path / f"server-{port}.log"
    full_env = {**os.environ, "EAT_HOST": "127.0.0.1", "EAT_PORT": str(port), "EAT_INTRA_OP_THREADS": "1", **env}
    with log_path.open("w") as log:
        process = subprocess.Popen(
            [sys.executable, *args], cwd=REPO_ROOT, env=full_env, stdout=log, stderr=subprocess.STDOUT
        )
    server = Server(process, f"http://127.0.0.1:{port}", log_path)
    try:
        end = time.monotonic() + startup_s
        while True:
            if process.poll() is not None:
                pytest.fail(f"server exited with {process.returncode}:\n{server.log()}")
            try:
                if httpx.get(f"{server.url}/health/ready", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > end:
                pytest.fail(f"server not ready after {startup_s} s:\n{server.log()}")
            time.sleep(0.1)
        yield server
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


@pytest.fixture(scope="session")
def start_server():
    """``with start_server(args, env, tmp_path) as server:`` (a ``Server``: url, process, log(), metric())."""
    return _run_server


@pytest.fixture(scope="session")
def slow_server_args() -> list[str]:
    """``python`` arguments for a server whose engine sleeps; append the delay in seconds (and optionally
    a decode delay in seconds)."""
    return ["-c", SLOW_SERVER]
