"""``eat serve``: the service under uvicorn, with settings from ``EAT_*`` variables.

Shutdown on SIGTERM/SIGINT: ``/health/ready`` turns 503 at once, uvicorn stops listening and lets
requests in flight finish (up to ``EAT_DRAIN_TIMEOUT_S``), then the lifespan drains the batcher and
closes the engine. A clean drain exits with status 0.
"""

from __future__ import annotations

import argparse
import logging
import math
import signal
from types import FrameType

import uvicorn
from pydantic import ValidationError

from eat.contract import hop_samples_for
from eat.engine import Engine, EngineStartError, open_engine
from service.app import ServiceState, create_app
from service.log import configure_logging
from service.settings import Settings

logger = logging.getLogger(__name__)


class _DrainingServer(uvicorn.Server):
    """uvicorn's server, plus: mark the app as draining the moment a stop signal arrives."""

    def __init__(self, config: uvicorn.Config, state: ServiceState) -> None:
        super().__init__(config)
        self._eat_state = state

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self._eat_state.draining = True
        self._eat_state.ready = False
        super().handle_exit(sig, frame)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default=None, help="interface to bind (default: EAT_HOST or 0.0.0.0)")
    parser.add_argument("--port", type=int, default=None, help="port (default: EAT_PORT or 8000)")
    parser.add_argument("--model", default=None, help="ONNX model (default: EAT_MODEL_PATH)")


def serve(settings: Settings, engine: Engine | None = None) -> int:
    """Run until SIGTERM/SIGINT; returns the process exit status."""
    app = create_app(settings, engine=engine)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=math.ceil(settings.drain_timeout_s),
        lifespan="on",
    )
    server = _DrainingServer(config, app.state.eat)
    # uvicorn re-raises the stop signal after a graceful shutdown; with this handler it ends the
    # process with status 0 instead of "killed by SIGTERM".
    previous = signal.signal(signal.SIGTERM, lambda sig, frame: None)
    try:
        server.run()
    finally:
        signal.signal(signal.SIGTERM, previous)
    return 0 if server.started else 1


def run(args: argparse.Namespace) -> int:
    overrides = {k: v for k, v in (("host", args.host), ("port", args.port), ("model_path", args.model)) if v}
    try:
        settings = Settings(**overrides)
    except ValidationError as err:
        raise ValueError(f"invalid EAT_* settings: {err}") from err
    configure_logging(settings.log_level)
    try:  # open the model before binding the port, so a bad model or missing CUDA fails loudly here
        engine = open_engine(
            settings.model_path, provider=settings.provider, intra_op_threads=settings.intra_op_threads
        )
    except EngineStartError as err:
        raise ValueError(str(err)) from err
    try:
        hop_samples_for(settings.hop_seconds, engine.info.window_samples)
    except ValueError as err:
        raise ValueError(f"EAT_HOP_SECONDS: {err}") from None
    return serve(settings, engine)


def main() -> int:
    """``python -m service.server``: the same as ``eat serve``."""
    parser = argparse.ArgumentParser(prog="python -m service.server")
    add_arguments(parser)
    try:
        return run(parser.parse_args())
    except ValueError as err:
        parser.exit(2, f"{parser.prog}: error: {err}\n")


if __name__ == "__main__":
    raise SystemExit(main())
