"""Atomic, complete training-state checkpoints (STYLE.md house rule 11).

A training checkpoint holds everything a run needs to continue as if it had never stopped: the
unwrapped model, the EMA teacher, the optimizer, the step, the RNG states of torch (CPU and CUDA),
numpy and Python, the sampler position and the resolved config. Only plain types and tensors are
stored, so it loads with ``torch.load(weights_only=True)`` (no pickle code execution).

Writes go to a temporary file in the same directory, are fsync-ed, then ``os.replace``-d over the
old file: a run killed at any instant leaves either the previous checkpoint or the new one, never a
torn file. (The *model* checkpoint users share is the separate ``model/checkpoints.py`` format.)
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from model.files import atomic_path

CHECKPOINT_NAME = "checkpoint.pt"
FORMAT_VERSION = 1


class TrainingCheckpointError(ValueError):
    """A training checkpoint that is missing, unreadable or from another kind of run."""


def capture_rng_state() -> dict[str, Any]:
    """Every global RNG a step may draw from, as tensors and plain types."""
    np_state = np.random.get_state()
    py_version, py_internal, py_gauss = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "keys": torch.from_numpy(np.asarray(np_state[1], dtype=np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "python": {
            "version": int(py_version),
            "internal": torch.tensor(py_internal, dtype=torch.int64),
            "gauss_next": py_gauss,
        },
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np_state = state["numpy"]
    np.random.set_state(
        (
            "MT19937",
            np_state["keys"].numpy().astype(np.uint32),
            np_state["pos"],
            np_state["has_gauss"],
            np_state["cached_gaussian"],
        )
    )
    py = state["python"]
    random.setstate((py["version"], tuple(int(v) for v in py["internal"].tolist()), py["gauss_next"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_atomic(obj: Any, path: str | os.PathLike[str]) -> Path:
    """``torch.save`` through ``model.files.atomic_path`` (temp file, fsync, rename)."""
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)
    return Path(path)


def save_training_checkpoint(path: str | os.PathLike[str], *, kind: str, **state: Any) -> Path:
    """Write a training checkpoint; ``kind`` ('pretrain' | 'finetune') guards against mix-ups."""
    return save_atomic({"format_version": FORMAT_VERSION, "kind": kind, **state}, path)


def load_training_checkpoint(path: str | os.PathLike[str], *, kind: str) -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_training_checkpoint` (``weights_only=True``)."""
    path = Path(path)
    if not path.is_file():
        raise TrainingCheckpointError(f"no training checkpoint at {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a foreign or corrupt file: say which, not a pickle traceback
        raise TrainingCheckpointError(f"cannot read training checkpoint {path}: {err}") from err
    if not isinstance(state, dict) or state.get("format_version") != FORMAT_VERSION:
        raise TrainingCheckpointError(f"{path} is not a training checkpoint of format {FORMAT_VERSION}")
    if state.get("kind") != kind:
        raise TrainingCheckpointError(f"{path} is a {state.get('kind')!r} checkpoint, expected {kind!r}")
    return state


def require_world_size(state: dict[str, Any], world_size: int) -> None:
    """Exact resume needs the same ranks: the sampler shards and the RNG states are per rank."""
    if state["world_size"] != world_size:
        raise TrainingCheckpointError(
            f"checkpoint was written by {state['world_size']} rank(s), this run has "
            f"{world_size}; resume with the same world size"
        )


def unwrap(module: torch.nn.Module) -> torch.nn.Module:
    """The plain module inside DDP and/or ``torch.compile`` wrappers (checkpoints have no prefixes)."""
    while True:
        if isinstance(module, torch.nn.parallel.DistributedDataParallel):
            module = module.module
        elif hasattr(module, "_orig_mod"):
            module = module._orig_mod  # torch.compile's OptimizedModule
        else:
            return module


__all__ = [
    "CHECKPOINT_NAME",
    "TrainingCheckpointError",
    "capture_rng_state",
    "load_training_checkpoint",
    "restore_rng_state",
    "save_atomic",
    "save_training_checkpoint",
    "unwrap",
]
