"""Inverse block masks: exact counts, block geometry, and the statistics of the official generator
(fixtures/eat-official/mask_stats.json, 2000 rows) reproduced with our own rows."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from model.masking import MaskConfigError, block_cover, block_mask_plan, fix_count, inverse_block_mask

BASE_GRID = (64, 8)
NUM_STAT_ROWS = 20_000  # 10× the fixture's rows, so our sampling noise is a third of theirs


@pytest.fixture(scope="module")
def mask_stats(fixtures_dir: Path) -> dict:
    return json.loads((fixtures_dir / "eat-official" / "mask_stats.json").read_text())


@pytest.fixture(scope="module")
def sampled() -> tuple[torch.Tensor, torch.Tensor]:
    """(cover before the count correction, final visible cells) for NUM_STAT_ROWS rows, EAT-base setting."""
    plan = block_mask_plan(BASE_GRID)
    gen = torch.Generator().manual_seed(20240)
    cover = block_cover(NUM_STAT_ROWS, BASE_GRID, plan.num_centres, 5, gen)
    visible = fix_count(cover, plan.num_visible, gen)
    return cover, visible


def test_plans_match_the_reference_counts() -> None:
    base = block_mask_plan(BASE_GRID, 0.8, 0.07, 5)
    assert (base.num_cells, base.num_centres, base.num_visible, base.num_masked) == (512, 5, 102, 410)
    large = block_mask_plan(BASE_GRID, 0.75, 0.1, 5)
    assert (large.num_centres, large.num_visible, large.num_masked) == (7, 128, 384)
    short = block_mask_plan((16, 8))  # 256 frames
    assert (short.num_cells, short.num_centres, short.num_visible) == (128, 1, 25)


def test_every_row_has_exactly_k_visible_and_is_bool() -> None:
    mask = inverse_block_mask(2048, BASE_GRID, generator=torch.Generator().manual_seed(0))
    assert mask.dtype == torch.bool and mask.shape == (2048, 512)
    assert torch.all((~mask).sum(dim=1) == 102)
    large = inverse_block_mask(512, BASE_GRID, 0.75, 0.1, generator=torch.Generator().manual_seed(0))
    assert torch.all((~large).sum(dim=1) == 128)


def test_seeded_generator_is_reproducible_and_rows_are_independent() -> None:
    a = inverse_block_mask(32, BASE_GRID, generator=torch.Generator().manual_seed(7))
    b = inverse_block_mask(32, BASE_GRID, generator=torch.Generator().manual_seed(7))
    c = inverse_block_mask(32, BASE_GRID, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert len({tuple(row.tolist()) for row in a}) == 32  # clones of a clip get different masks


def test_public_function_is_cover_then_count_fix(sampled: tuple[torch.Tensor, torch.Tensor]) -> None:
    """The statistics below are taken on the two stages; make sure they compose to the public call."""
    _, visible = sampled
    mask = inverse_block_mask(NUM_STAT_ROWS, BASE_GRID, generator=torch.Generator().manual_seed(20240))
    assert torch.equal(mask, ~visible)


def test_single_block_is_a_clamped_square() -> None:
    grid = (6, 4)
    cover = block_cover(400, grid, num_centres=1, mask_length=5, generator=torch.Generator().manual_seed(3))
    for row in cover.view(-1, *grid):
        ts, fs = row.nonzero(as_tuple=True)
        t0, t1, f0, f1 = int(ts.min()), int(ts.max()), int(fs.min()), int(fs.max())
        # A full rectangle (clamped, never wrapped or dropped) of at most 5×5 cells.
        assert row[t0 : t1 + 1, f0 : f1 + 1].all() and int(row.sum()) == (t1 - t0 + 1) * (f1 - f0 + 1)
        assert 3 <= t1 - t0 + 1 <= 5 and 3 <= f1 - f0 + 1 <= 4


def test_count_fix_only_adds_or_only_removes(sampled: tuple[torch.Tensor, torch.Tensor]) -> None:
    cover, visible = sampled
    added = (visible & ~cover).sum(dim=1)
    removed = (cover & ~visible).sum(dim=1)
    assert torch.all((added == 0) | (removed == 0))
    assert torch.equal(added - removed, 102 - cover.sum(dim=1))


def test_pre_correction_coverage_matches_official(sampled: tuple[torch.Tensor, torch.Tensor], mask_stats: dict) -> None:
    cover, _ = sampled
    counts = cover.sum(dim=1).double()
    ref = mask_stats["pre_correction_visible_count"]
    # Standard errors: 11.8/√2000 = 0.26 (official) and 0.08 (ours) -> 4σ ≈ 1.1.
    assert abs(counts.mean().item() - ref["mean"]) < 1.2
    assert abs(counts.std().item() - ref["std"]) < 1.0
    # Between one 3×3 corner block (all centres coincide) and five disjoint full 5×5 blocks.
    assert counts.min().item() >= 9 and counts.max().item() <= 125
    # Whole distribution: total-variation distance between the histograms (noise floor ≈ 0.06).
    ours = torch.bincount(counts.long(), minlength=126).double() / len(counts)
    theirs = torch.zeros(126, dtype=torch.float64)
    for value, n in ref["histogram"].items():
        theirs[int(value)] = n / mask_stats["n_rows"]
    assert 0.5 * (ours - theirs).abs().sum().item() < 0.12


def test_topup_and_trim_shares_match_official(sampled: tuple[torch.Tensor, torch.Tensor], mask_stats: dict) -> None:
    cover, _ = sampled
    counts = cover.sum(dim=1)
    topped, trimmed = counts < 102, counts > 102
    # Binomial standard errors ≈ 0.011 (official 2000 rows) and 0.003 (ours) -> 4σ ≈ 0.045.
    assert abs(topped.double().mean().item() - mask_stats["frac_rows_topped_up"]) < 0.05
    assert abs(trimmed.double().mean().item() - mask_stats["frac_rows_trimmed"]) < 0.05
    assert abs((102 - counts[topped]).double().mean().item() - mask_stats["mean_cells_added_when_topped_up"]) < 1.0
    assert abs((counts[trimmed] - 102).double().mean().item() - mask_stats["mean_cells_removed_when_trimmed"]) < 1.0


def test_visibility_is_rarer_at_the_edges_as_official(
    sampled: tuple[torch.Tensor, torch.Tensor], mask_stats: dict
) -> None:
    _, visible = sampled
    freq = visible.double().mean(dim=0).view(BASE_GRID)  # [T, F]
    ref = torch.tensor(mask_stats["visible_frequency_per_cell_time_major_64x8"], dtype=torch.float64)
    by_freq = torch.tensor(mask_stats["visible_frequency_by_freq_column"], dtype=torch.float64)
    by_time = torch.tensor(mask_stats["visible_frequency_by_time_row"], dtype=torch.float64)
    assert freq.sum(dim=1).mean().item() == pytest.approx(102 / 64)  # 102 visible per row exactly
    # Per-cell: official binomial SE ≈ 0.009, ours 0.003 -> 0.05 is ≈ 5σ.
    assert (freq - ref).abs().max().item() < 0.05
    assert (freq.mean(dim=0) - by_freq).abs().max().item() < 0.01
    assert (freq.mean(dim=1) - by_time).abs().max().item() < 0.025
    # The clamping signature: edge columns ≈ 0.15, middle ≈ 0.23; time row 0 ≈ 0.13.
    middle = freq[8:56, 2:6].mean().item()
    assert math.isclose(freq[:, [0, 7]].mean().item(), 0.15, abs_tol=0.01)
    assert math.isclose(middle, 0.23, abs_tol=0.01)
    assert math.isclose(freq[0].mean().item(), 0.13, abs_tol=0.015)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(mask_prob=0.0),
        dict(mask_prob=1.0),
        dict(mask_length=1),
        dict(mask_prob_adjust=-0.1),
        dict(grid=(0, 8)),
        dict(grid=(1, 2), mask_prob=0.9),  # floor(2 * 0.1) = 0 visible
    ],
)
def test_bad_settings_raise_typed_errors(kwargs: dict) -> None:
    args = dict(num_rows=4, grid=BASE_GRID) | kwargs
    with pytest.raises(MaskConfigError):
        inverse_block_mask(**args)
