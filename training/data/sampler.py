"""A deterministic, resumable, DDP-sharded sampler, and the loader that keeps its position.

The epoch order is a pure function of ``(seed, epoch)``: a uniform shuffle, or -- with weights --
``num_draws`` weighted draws without replacement, redrawn every epoch (AS-2M balanced sampling,
reference §4.6). Every rank computes the same global order and takes every ``world_size``-th entry.

Resuming: the position is the number of this rank's items *handed to the training loop* in the current
epoch. ``ResumableLoader`` advances it when it yields a batch (not when workers prefetch), so a
checkpoint written after step k resumes with batch k+1, exactly.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from training.data.dataset import collate

logger = logging.getLogger(__name__)


class ResumableSampler(Sampler[int]):
    """Yields this rank's indices for the current epoch, starting at the saved position.

    ``drop_last``: when the epoch's length does not divide by ``world_size``, drop the tail (True) or
    wrap around to pad it (False, like ``DistributedSampler``), so every rank runs the same number of
    steps. ``num_draws`` defaults to ``num_items`` and only applies with ``weights``.
    """

    def __init__(
        self,
        num_items: int,
        seed: int = 0,
        shuffle: bool = True,
        weights: Sequence[float] | np.ndarray | None = None,
        num_draws: int | None = None,
        rank: int = 0,
        world_size: int = 1,
        drop_last: bool = False,
    ) -> None:
        if num_items < 1:
            raise ValueError(f"num_items must be at least 1, got {num_items}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        self.weights: np.ndarray | None = None
        if weights is not None:
            self.weights = np.asarray(weights, dtype=np.float64)
            if self.weights.shape != (num_items,):
                raise ValueError(f"expected {num_items} weights, got {self.weights.shape[0]}")
            if not np.all(np.isfinite(self.weights)) or np.any(self.weights < 0):
                raise ValueError("weights must be finite and >= 0")
            num_positive = int(np.count_nonzero(self.weights))
            num_draws = num_positive if num_draws is None else num_draws
            if not 1 <= num_draws <= num_positive:
                raise ValueError(f"num_draws {num_draws} must be in [1, {num_positive}] (items with weight > 0)")
        elif num_draws is not None and num_draws != num_items:
            raise ValueError("num_draws needs weights (uniform sampling uses every item once per epoch)")
        self.num_items = num_items
        self.num_draws = num_draws if num_draws is not None else num_items
        self.seed = seed
        self.shuffle = shuffle
        self.rank = rank
        self.world_size = world_size
        self.drop_last = drop_last
        if drop_last and self.num_draws < world_size:
            raise ValueError(f"{self.num_draws} items per epoch cannot feed {world_size} ranks with drop_last")
        self.epoch = 0
        self.position = 0

    def __len__(self) -> int:
        """Indices this rank yields in a full epoch."""
        if self.drop_last:
            return self.num_draws // self.world_size
        return -(-self.num_draws // self.world_size)

    def epoch_order(self, epoch: int) -> np.ndarray:
        """The global order of ``epoch`` (before sharding): int64 [num_draws]."""
        rng = np.random.default_rng([self.seed, epoch])
        if self.weights is not None:
            # Weighted sampling without replacement (Efraimidis-Spirakis): the k largest u^(1/w) are a
            # sequential draw proportional to the weights; sorting them gives the draw order.
            with np.errstate(divide="ignore"):
                keys = np.log(rng.random(self.num_items)) / self.weights  # -inf for weight 0
            top = np.argpartition(-keys, self.num_draws - 1)[: self.num_draws]
            return top[np.argsort(-keys[top], kind="stable")].astype(np.int64)
        if self.shuffle:
            return rng.permutation(self.num_items).astype(np.int64)
        return np.arange(self.num_items, dtype=np.int64)

    def rank_order(self, epoch: int) -> np.ndarray:
        """This rank's share of ``epoch_order``: every ``world_size``-th entry from ``rank``."""
        order = self.epoch_order(epoch)
        total = len(self) * self.world_size
        if total > len(order):  # pad by wrapping around
            order = np.concatenate([order, np.resize(order, total - len(order))])
        return order[:total][self.rank :: self.world_size]

    def __iter__(self) -> Iterator[int]:
        return iter(self.rank_order(self.epoch)[self.position :].tolist())

    def set_epoch(self, epoch: int) -> None:
        """Start ``epoch`` from its beginning, unless it is the current one (keeps a resumed position)."""
        if epoch != self.epoch:
            self.epoch = epoch
            self.position = 0

    def advance(self, num_items: int) -> None:
        """Mark ``num_items`` more of this epoch as consumed by the training loop."""
        self.position = min(self.position + num_items, len(self))

    def finish_epoch(self) -> None:
        self.epoch += 1
        self.position = 0

    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "position": self.position,
            "seed": self.seed,
            "num_items": self.num_items,
            "num_draws": self.num_draws,
            "world_size": self.world_size,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore (epoch, position); refuses a state from a different data set, seed or world size."""
        for key in ("seed", "num_items", "num_draws", "world_size"):
            if key in state and state[key] != getattr(self, key):
                raise ValueError(
                    f"sampler state has {key}={state[key]} but this run has {getattr(self, key)}; "
                    "the data order cannot be resumed exactly"
                )
        position = int(state["position"])
        if not 0 <= position <= len(self):
            raise ValueError(f"sampler position {position} is outside this epoch's [0, {len(self)}]")
        self.epoch = int(state["epoch"])
        self.position = position


class ResumableLoader:
    """A ``DataLoader`` over a ``ResumableSampler`` that tracks what the loop has consumed.

    Iterating runs the rest of the current epoch; a pass that ends normally moves the sampler to the
    next epoch (breaking out early does not). ``state_dict()`` is the sampler's.
    """

    def __init__(self, loader: DataLoader, sampler: ResumableSampler) -> None:
        self.loader = loader
        self.sampler = sampler

    def __len__(self) -> int:
        """Batches in a full epoch."""
        return len(self.loader.batch_sampler) if self.loader.batch_sampler is not None else len(self.loader)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        for batch in self.loader:
            # Counted as consumed when handed out: a checkpoint taken while it trains resumes after it.
            self.sampler.advance(int(batch["num_samples"].shape[0]))
            yield batch
        self.sampler.finish_epoch()

    @property
    def epoch(self) -> int:
        return self.sampler.epoch

    def restart(self) -> None:
        """Back to the start of the current epoch (evaluation wants every clip, even after an
        interrupted pass)."""
        self.sampler.position = 0

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    def state_dict(self) -> dict[str, Any]:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sampler.load_state_dict(state)


def make_loader(
    dataset: Dataset,
    batch_size: int,
    sampler: ResumableSampler,
    num_workers: int = 0,
    *,
    drop_last: bool = False,
    pin_memory: bool = False,
) -> ResumableLoader:
    """Batches of ``collate`` dicts in the sampler's order; ``drop_last`` drops a short final batch.

    Training with mixup wants ``drop_last=True`` and an even ``batch_size`` (EAT mixes each clip
    with the batch reversed, §4.2).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        collate_fn=collate,
        drop_last=drop_last,
        pin_memory=pin_memory,
        persistent_workers=num_workers > 0,
    )
    return ResumableLoader(loader, sampler)
