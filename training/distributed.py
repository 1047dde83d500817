"""torchrun / DDP set-up in a few lines, driven only by the environment torchrun provides.

DDP is on when ``RANK`` is set (nanoGPT's rule, STYLE.md §2). Each rank uses ``cuda:LOCAL_RANK`` with
NCCL on GPU machines and the CPU with gloo otherwise (that is how the tests run two processes on two
cores). The loops branch only on ``DistEnv.is_main``: rank 0 alone logs, writes checkpoints and
TensorBoard scalars.

The CLI reads ``os.environ`` and passes it in; nothing below it touches the environment (house rule 3).
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)


class DistributedError(ValueError):
    """An inconsistent torchrun environment (e.g. RANK set without WORLD_SIZE)."""


@dataclass(frozen=True)
class DistEnv:
    """This process's place in the job: rank, local rank, world size, device and backend."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: str = "cpu"
    backend: str = ""  # "" = single process, else "nccl" | "gloo"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1 or bool(self.backend)

    @property
    def device_type(self) -> str:
        return torch.device(self.device).type


def resolve_device(preference: str, local_rank: int = 0) -> str:
    """``auto`` -> ``cuda:LOCAL_RANK`` when a GPU is present, else ``cpu``; explicit choices are checked."""
    if preference == "auto":
        return f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    if preference.startswith("cuda"):
        if not torch.cuda.is_available():
            raise DistributedError(f"device {preference!r} requested but CUDA is not available")
        return f"cuda:{local_rank}" if preference == "cuda" else preference
    if preference != "cpu":
        raise DistributedError(f"device must be auto, cpu, cuda or cuda:N, got {preference!r}")
    return "cpu"


def init_distributed(environ: Mapping[str, str], device: str = "auto", timeout_s: float = 600.0) -> DistEnv:
    """Read torchrun's variables, pick the device and join the process group when ``RANK`` is set."""
    if "RANK" not in environ:
        return DistEnv(device=resolve_device(device))
    try:
        rank = int(environ["RANK"])
        world_size = int(environ["WORLD_SIZE"])
        local_rank = int(environ.get("LOCAL_RANK", rank))
    except (KeyError, ValueError) as err:
        raise DistributedError(f"RANK is set but the torchrun environment is incomplete: {err}") from err
    if not 0 <= rank < world_size:
        raise DistributedError(f"RANK {rank} out of range for WORLD_SIZE {world_size}")
    dev = resolve_device(device, local_rank)
    backend = "nccl" if dev.startswith("cuda") else "gloo"
    if dev.startswith("cuda"):
        torch.cuda.set_device(torch.device(dev))
    if not dist.is_initialized():
        dist.init_process_group(
            backend=backend,
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(seconds=timeout_s),
        )
    return DistEnv(rank=rank, local_rank=local_rank, world_size=world_size, device=dev, backend=backend)


def shutdown(env: DistEnv) -> None:
    if env.backend and dist.is_initialized():
        dist.destroy_process_group()


def barrier(env: DistEnv) -> None:
    if env.backend:
        dist.barrier()


def all_reduce_mean(value: torch.Tensor, env: DistEnv) -> torch.Tensor:
    """Mean of a tensor over ranks (for logging a loss every rank computed on its own shard)."""
    if not env.backend:
        return value
    value = value.detach().clone()
    dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value / env.world_size


def broadcast_object(obj: object, env: DistEnv) -> object:
    """Rank 0's value of a small picklable object, on every rank."""
    if not env.backend:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_gather_object(obj: object, env: DistEnv) -> list[object]:
    """Every rank's value, in rank order (e.g. per-rank RNG states for a checkpoint)."""
    if not env.backend:
        return [obj]
    out: list[object] = [None] * env.world_size
    dist.all_gather_object(out, obj)
    return out


def autocast(device_type: str, precision: str) -> contextlib.AbstractContextManager[Any]:
    """The one precision context of a step: bf16 autocast on GPU ("auto"), nothing (fp32) on CPU.

    bf16 needs no grad scaler (its exponent range is fp32's), unlike the original's fp16 (§3.8).
    """
    if precision == "fp32" or (precision == "auto" and device_type != "cuda"):
        return contextlib.nullcontext()
    return torch.autocast(device_type=device_type, dtype=torch.bfloat16)


class Reporter:
    """Rank-0 progress: a tqdm bar counting clips (rate and ETA), a log line and TensorBoard scalars
    every ``log`` call. Other ranks get a silent instance, so loops never test the rank to report.

    Train lines carry clips/s and, when both ``flops_per_step`` (model FLOPs of one update on one
    rank: forward + backward) and ``peak_flops`` (the device's dense peak) are known, the model FLOPs
    utilisation ``mfu`` (PaLM, Chowdhery et al. 2022, appendix B): achieved / peak, in [0, 1].
    """

    def __init__(
        self,
        env: DistEnv,
        out_dir: Path,
        *,
        total_steps: int,
        start_step: int,
        clips_per_step: int,
        tensorboard: bool,
        desc: str,
        flops_per_step: float = 0.0,
        peak_flops: float | None = None,
    ) -> None:
        self.active = env.is_main
        self.clips_per_step = clips_per_step
        self.flops_per_step = flops_per_step
        self.peak_flops = peak_flops
        self._bar = None
        self._writer = None
        self._last_time = time.perf_counter()
        self._last_step = start_step
        if not self.active:
            return
        from tqdm.auto import tqdm  # imported here: rank 0 only, and not at import time

        # Counting steps scaled to clips: tqdm then shows clips done, clips/s and the ETA.
        self._bar = tqdm(
            total=total_steps,
            initial=start_step,
            unit="clip",
            unit_scale=clips_per_step,
            desc=desc,
            dynamic_ncols=True,
            disable=None,  # None: no bar when stderr is not a terminal
        )
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(log_dir=str(out_dir / "tensorboard"), purge_step=start_step)

    def advance(self) -> None:
        if self._bar is not None:
            self._bar.update(1)

    def log(self, step: int, scalars: dict[str, float], prefix: str = "train") -> dict[str, float]:
        """Write ``scalars`` (plus clips/s since the last call); returns what was logged."""
        now = time.perf_counter()
        steps = step - self._last_step
        if steps > 0 and prefix == "train":
            seconds = max(now - self._last_time, 1e-9)
            scalars = {**scalars, "clips_per_s": steps * self.clips_per_step / seconds}
            if self.flops_per_step > 0 and self.peak_flops:
                scalars["mfu"] = steps * self.flops_per_step / seconds / self.peak_flops
            self._last_time, self._last_step = now, step
        if not self.active:
            return scalars
        if self._writer is not None:
            for key, value in scalars.items():
                self._writer.add_scalar(f"{prefix}/{key}", value, step)
        text = " ".join(f"{k} {v:.4g}" for k, v in scalars.items())
        logger.info("%s step %d: %s", prefix, step, text)
        if self._bar is not None and prefix == "train":
            self._bar.set_postfix({k: f"{v:.3g}" for k, v in scalars.items() if k in ("loss", "lr")})
        return scalars

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._writer is not None:
            self._writer.close()


__all__ = [
    "DistEnv",
    "DistributedError",
    "Reporter",
    "all_gather_object",
    "all_reduce_mean",
    "autocast",
    "barrier",
    "broadcast_object",
    "init_distributed",
    "resolve_device",
    "shutdown",
]
