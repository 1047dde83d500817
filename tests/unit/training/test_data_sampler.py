"""The resumable sampler: deterministic orders, exact resume mid-epoch, DDP shards, weighted draws."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import Dataset

from training.data.sampler import ResumableSampler, make_loader


class _Indices(Dataset):
    """Each item carries its own index, so a batch shows which items the sampler chose."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        return {"waveform": torch.tensor([float(i)]), "num_samples": i}


def _ids(batch: dict) -> list[int]:
    return batch["num_samples"].tolist()


def test_order_is_a_function_of_seed_and_epoch() -> None:
    a, b = ResumableSampler(50, seed=1), ResumableSampler(50, seed=1)
    assert list(a) == list(b)
    assert sorted(a) == list(range(50))
    assert list(a) != list(ResumableSampler(50, seed=2))
    first = list(a)
    a.set_epoch(1)
    assert list(a) != first and sorted(a) == list(range(50))
    assert list(ResumableSampler(7, shuffle=False)) == list(range(7))


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_mid_epoch_gives_exactly_the_same_next_batches(num_workers: int) -> None:
    def run(batches: int, state: dict | None = None) -> tuple[list[list[int]], dict]:
        sampler = ResumableSampler(23, seed=5)
        loader = make_loader(_Indices(23), 4, sampler, num_workers=num_workers, drop_last=True)
        if state is not None:
            loader.load_state_dict(state)
        seen: list[list[int]] = []
        while len(seen) < batches:
            for batch in loader:
                seen.append(_ids(batch))
                if len(seen) == batches:
                    break
        return seen, loader.state_dict()

    reference, _ = run(14)  # 5 full batches per epoch -> crosses two epoch boundaries
    for cut in (3, 5, 7):  # mid-epoch, exactly at an epoch's end, early in the next epoch
        first, state = run(cut)
        rest, _ = run(14 - cut, state)
        assert first + rest == reference, f"resume after {cut} batches diverged"
    assert run(7)[1]["epoch"] == 1 and run(7)[1]["position"] == 8


def test_set_epoch_keeps_a_resumed_position_but_restarts_new_epochs() -> None:
    sampler = ResumableSampler(10, seed=0)
    order = list(sampler)
    sampler.load_state_dict({"epoch": 0, "position": 6})
    sampler.set_epoch(0)  # a loop that calls set_epoch(epoch) after resuming
    assert list(sampler) == order[6:]
    sampler.set_epoch(1)
    assert sampler.position == 0 and len(list(sampler)) == 10


def test_state_from_another_run_is_refused() -> None:
    state = ResumableSampler(10, seed=0).state_dict()
    with pytest.raises(ValueError, match="seed"):
        ResumableSampler(10, seed=1).load_state_dict(state)
    with pytest.raises(ValueError, match="num_items"):
        ResumableSampler(11, seed=0).load_state_dict(state)
    with pytest.raises(ValueError, match="world_size"):
        ResumableSampler(10, seed=0, world_size=2).load_state_dict(state)


def test_ranks_split_the_epoch_between_them() -> None:
    shards = [list(ResumableSampler(10, seed=3, rank=r, world_size=3)) for r in range(3)]
    assert [len(s) for s in shards] == [4, 4, 4]  # padded by wrapping around
    everything = np.concatenate(shards)
    assert set(everything) == set(range(10)) and len(everything) == 12
    order = ResumableSampler(10, seed=3).epoch_order(0)
    assert shards[1] == np.resize(order, 12)[1::3].tolist()  # padding wraps to the start
    dropped = [list(ResumableSampler(10, seed=3, rank=r, world_size=3, drop_last=True)) for r in range(3)]
    flat = np.concatenate(dropped)
    assert [len(s) for s in dropped] == [3, 3, 3] and len(set(flat)) == 9
    with pytest.raises(ValueError, match="rank"):
        ResumableSampler(10, rank=2, world_size=2)


def test_weighted_draws_without_replacement_redrawn_each_epoch() -> None:
    weights = np.r_[np.zeros(10), np.ones(40), np.full(50, 10.0)]
    sampler = ResumableSampler(100, seed=0, weights=weights, num_draws=20)
    assert len(sampler) == 20
    heavy = 0
    orders = []
    for epoch in range(100):
        sampler.set_epoch(epoch)
        order = list(sampler)
        orders.append(order)
        assert len(set(order)) == 20 and min(order) >= 10  # no repeats, weight 0 never drawn
        heavy += sum(i >= 50 for i in order)
    assert orders[0] != orders[1]
    assert heavy / 2000 > 0.85  # the ten-times-heavier half dominates
    # First draw of each epoch ~ weights / sum (a sequential weighted draw).
    first = ResumableSampler(100, seed=1, weights=weights, num_draws=1)
    firsts = np.array([first.epoch_order(e)[0] for e in range(3000)])
    p_heavy = 500 / 540
    assert abs((firsts >= 50).mean() - p_heavy) < 4 * np.sqrt(p_heavy * (1 - p_heavy) / 3000)


def test_weighted_sampler_validates_its_inputs() -> None:
    with pytest.raises(ValueError, match="expected 5 weights"):
        ResumableSampler(5, weights=[1.0] * 4)
    with pytest.raises(ValueError, match="num_draws"):
        ResumableSampler(3, weights=[1.0, 0.0, 1.0], num_draws=3)
    with pytest.raises(ValueError, match=">= 0"):
        ResumableSampler(2, weights=[1.0, -1.0])
    with pytest.raises(ValueError, match="needs weights"):
        ResumableSampler(5, num_draws=3)
    assert len(ResumableSampler(3, weights=[1.0, 0.0, 2.0])) == 2  # default: every positive item once
