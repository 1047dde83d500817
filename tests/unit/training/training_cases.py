"""What the training tests share: a network small enough for a few steps in about a second on a
2-core CPU (each test adds its own batch, steps and schedule), and a free port for gloo rendezvous."""

from __future__ import annotations

import socket

TINY_MODEL = [
    "model.embed_dim=32",
    "model.num_heads=2",
    "model.depth=2",
    "model.decoder_dim=32",
    "model.decoder_layers=1",
    "target_frames=96",
    "tensorboard=false",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
