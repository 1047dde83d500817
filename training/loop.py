"""What ``eat pretrain`` and ``eat finetune`` share, so each loop keeps only its own step.

Both loops have the same life: parse the command line, resolve the config (the checkpoint's when
resuming), build the resumable loader, seed, restore the training state, wrap the model
(``torch.compile``, DDP), then per update run ``accum_steps`` micro-batches (DDP syncs gradients only on
the last), clip, step, log and save atomically. The pieces here are plain functions and two small
classes, called from the loops in that order (STYLE.md §2: no callbacks, no hooks):

- ``add_arguments`` / ``resolve_config``: the command line and config resolution;
- ``make_train_loader``: a ``ResumableLoader`` whose worker seeds stay out of the global RNG;
- ``Batches``: the infinite batch stream that fetches the next batch when the loop asks (right after the
  forward pass) and reports the data position *of the batches handed out*, so a checkpoint written
  while one batch waits resumes with that batch;
- ``micro_step``: DDP's ``no_sync`` on every micro-batch but the last;
- ``save_state`` / ``restore_state``: the training checkpoint, written by rank 0 only;
- ``peak_flops``: the accelerator's dense peak, for the MFU in the log line (where it is known).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import nn

from training.checkpoint import (
    CHECKPOINT_NAME,
    capture_rng_state,
    load_training_checkpoint,
    require_world_size,
    restore_rng_state,
    save_training_checkpoint,
    unwrap,
)
from training.config import CommonConfig, apply_overrides, config_from_dict, load_config
from training.data.sampler import ResumableLoader, ResumableSampler, make_loader
from training.distributed import DistEnv, all_gather_object

logger = logging.getLogger(__name__)

C = TypeVar("C", bound=CommonConfig)

# Dense bf16 tensor-core peaks in FLOP/s from the vendors' data sheets (no sparsity), matched on the
# CUDA device name. MFU is reported only for these, and only under bf16 autocast: a guessed peak would
# make the number meaningless. ``peak_tflops`` in a recipe overrides the table (e.g. for a PCIe H100).
BF16_PEAK_FLOPS = {
    "H200": 989.4e12,
    "H100": 989.4e12,  # SXM; the PCIe card peaks at 756 TFLOP/s: set peak_tflops
    "A100": 312e12,
    "L40S": 362.05e12,
    "L4": 121e12,
}


def add_arguments(parser: argparse.ArgumentParser, *, init_help: str) -> None:
    """The options both training commands take."""
    parser.add_argument("--recipe", help="recipe name (training/recipes/NAME.yaml) or a YAML path")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a recipe key, e.g. --set max_steps=1000 --set model.depth=4",
    )
    parser.add_argument("--data", required=True, type=Path, help="data directory (EAT manifests or class folders)")
    parser.add_argument("--out", required=True, type=Path, help="run directory (checkpoints, logs, model)")
    parser.add_argument("--init", default=None, help=init_help)
    parser.add_argument(
        "--resume", action="store_true", help="continue from RUN/checkpoint.pt if it exists (config comes from it)"
    )
    # Fault injection for the resume tests: SIGKILL this process when update N is about to run.
    parser.add_argument("--debug-sigkill-at-step", type=int, default=None, help=argparse.SUPPRESS)


def resolve_config(
    cls: type[C], kind: str, recipe: str | None, overrides: list[str], out_dir: Path, resume: bool
) -> tuple[C, dict[str, Any] | None]:
    """The run's config and, when resuming, the checkpoint state (its saved config wins over the
    recipe; ``--set`` still applies, e.g. to raise ``max_steps``)."""
    path = Path(out_dir) / CHECKPOINT_NAME
    if resume and path.is_file():
        state = load_training_checkpoint(path, kind=kind)
        return config_from_dict(cls, apply_overrides(state["config"], overrides)), state
    if resume:
        logger.info("no checkpoint in %s: starting a new run", out_dir)
    if not recipe:
        raise ValueError("--recipe is required (unless --resume finds a checkpoint)")
    return load_config(cls, recipe, overrides), None


def make_train_loader(
    dataset: torch.utils.data.Dataset, sampler: ResumableSampler, cfg: CommonConfig, device: torch.device
) -> ResumableLoader:
    """Full batches of ``cfg.batch_size`` (one micro-batch) in the sampler's order."""
    loader = make_loader(
        dataset, cfg.batch_size, sampler, cfg.num_workers, drop_last=True, pin_memory=device.type == "cuda"
    )
    # A private generator for the loader's worker seeds: otherwise each new iterator draws from the
    # global RNG, whose stream (decoder noise, drop path) would then depend on where a run restarted.
    loader.loader.generator = torch.Generator().manual_seed(cfg.seed)
    if len(loader) == 0:
        raise ValueError(
            f"{len(sampler)} clips per epoch and rank cannot fill one batch of {cfg.batch_size}; lower batch_size"
        )
    return loader


class Batches:
    """An endless stream of batches on the device, fetched one ahead when the loop says so.

    ``next()`` hands out the waiting batch (fetching one if none waits). ``prefetch()`` fetches the
    next batch now: the loops call it right after the forward pass, so the loader's work and the
    host-to-device copy (pinned memory, ``non_blocking``) overlap the backward pass (nanoGPT's habit).

    The sampler counts a batch as consumed when the loader yields it, i.e. at prefetch time;
    ``state_dict()`` therefore returns the position *before* a waiting batch, which a resumed run must
    read again. ``epochs_done`` counts the epochs whose last batch has been handed out: the fine-tuning
    loop validates after the update in which it grows (fairseq validates at epoch ends). It is decided
    from the sampler position alone, so a resumed run sees the same epoch ends as an uninterrupted one.
    """

    def __init__(self, loader: ResumableLoader, device: torch.device) -> None:
        self.loader = loader
        self.device = device
        self.epochs_done = 0
        self._iterator: Iterator[dict[str, torch.Tensor]] | None = None
        self._waiting: tuple[dict[str, torch.Tensor], bool] | None = None
        self._state_before_waiting: dict[str, Any] | None = None

    def _fetch(self) -> tuple[dict[str, torch.Tensor], bool]:
        """The next batch on the device, and whether it is the last full batch of its epoch."""
        state = self.loader.sampler.state_dict()
        batch = None
        while batch is None:
            if self._iterator is None:
                self._iterator = iter(self.loader)
            try:
                batch = next(self._iterator)
            except StopIteration:  # the epoch is over (the loader moved the sampler on): start the next
                self._iterator = None
        sampler = self.loader.sampler
        batch_size = int(batch["num_samples"].shape[0])
        ends_epoch = sampler.position + batch_size > len(sampler)  # no full batch left (drop_last)
        self._state_before_waiting = state
        return {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}, ends_epoch

    def prefetch(self) -> None:
        if self._waiting is None:
            self._waiting = self._fetch()

    def next(self) -> dict[str, torch.Tensor]:
        batch, ends_epoch = self._waiting if self._waiting is not None else self._fetch()
        self._waiting = None
        self.epochs_done += ends_epoch
        return batch

    def state_dict(self) -> dict[str, Any]:
        """The sampler position as of the batches handed to the loop (a waiting one is not counted)."""
        if self._waiting is not None and self._state_before_waiting is not None:
            return dict(self._state_before_waiting)
        return self.loader.sampler.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self._waiting is not None or self._iterator is not None:
            raise RuntimeError("restore the data position before the first batch is fetched")
        self.loader.sampler.load_state_dict(state)


def micro_step(ddp_model: nn.Module, index: int, accum_steps: int) -> contextlib.AbstractContextManager[Any]:
    """Around the forward *and* backward of micro-batch ``index``: DDP all-reduces gradients only on the
    last micro-batch of an update; the others only accumulate locally (``no_sync``)."""
    if index < accum_steps - 1 and isinstance(ddp_model, torch.nn.parallel.DistributedDataParallel):
        return ddp_model.no_sync()
    return contextlib.nullcontext()


def is_last(step: int, accum_index: int, cfg: CommonConfig) -> bool:
    """True for the final micro-batch of the final update: nothing is left to prefetch."""
    return step == cfg.max_steps - 1 and accum_index == cfg.accum_steps - 1


def due(step: int, every: int, cfg: CommonConfig) -> bool:
    """Every ``every`` updates, and after the last one."""
    return step % every == 0 or step == cfg.max_steps


def wrap_model(model: nn.Module, cfg: CommonConfig, env: DistEnv) -> nn.Module:
    """``torch.compile`` (if configured) inside DDP (on when torchrun started us)."""
    wrapped = torch.compile(model) if cfg.compile else model
    return torch.nn.parallel.DistributedDataParallel(wrapped) if env.backend else wrapped


def restore_state(
    state: dict[str, Any],
    env: DistEnv,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    batches: Batches,
    out_dir: Path,
) -> int:
    """Load what every run checkpoints (model, optimizer, data position, this rank's RNG); returns the
    step to continue from. Loop-specific entries (teacher, best score) are the loop's to restore."""
    require_world_size(state, env.world_size)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    batches.load_state_dict(state["data"])
    restore_rng_state(state["rng"][env.rank])
    step = int(state["step"])
    logger.info("resumed from %s at step %d", out_dir / CHECKPOINT_NAME, step)
    return step


def save_state(
    out_dir: Path,
    env: DistEnv,
    *,
    kind: str,
    step: int,
    cfg: CommonConfig,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    batches: Batches,
    **extra: Any,
) -> None:
    """Write ``checkpoint.pt`` atomically. A collective (every rank sends its RNG state): call on all
    ranks; only rank 0 writes. ``model`` may be wrapped: the plain module's weights are saved."""
    rng = all_gather_object(capture_rng_state(), env)
    if not env.is_main:
        return
    save_training_checkpoint(
        out_dir / CHECKPOINT_NAME,
        kind=kind,
        step=step,
        config=cfg.to_dict(),
        model=unwrap(model).state_dict(),
        optimizer=optimizer.state_dict(),
        data=batches.state_dict(),
        rng=rng,
        world_size=env.world_size,
        **extra,
    )


def peak_flops(device: torch.device, cfg: CommonConfig) -> float | None:
    """The device's dense peak FLOP/s for this run's precision, or None when unknown (CPU, fp32,
    an unlisted GPU): then the log line has no MFU."""
    if cfg.peak_tflops > 0:
        return cfg.peak_tflops * 1e12
    bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda")
    if device.type != "cuda" or not bf16:
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in BF16_PEAK_FLOPS.items() if key in name), None)


__all__ = [
    "BF16_PEAK_FLOPS",
    "Batches",
    "add_arguments",
    "due",
    "is_last",
    "make_train_loader",
    "micro_step",
    "peak_flops",
    "resolve_config",
    "restore_state",
    "save_state",
    "wrap_model",
]
