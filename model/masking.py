"""EAT's inverse block masks for pre-training (eat-reference.md §3.2).

Each clone row keeps a few 5×5 blocks of patches *visible* and masks the rest, with exactly the same
number of visible patches in every row so the student batch stays dense. The generator follows the
official algorithm step by step (centres drawn with replacement, clamped squares, a uniformly random
top-up or trim to the exact count) but runs vectorised over all rows and draws from an explicit
``torch.Generator``, so a data-loader worker can make masks reproducibly without global RNG state.

Convention everywhere in this project: ``True`` = masked, ``False`` = visible; cells are numbered
time-major, ``n = F·t + f`` for a ``(T, F)`` grid, matching the encoder's token order.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


class MaskConfigError(ValueError):
    """A masking setting that cannot produce a valid mask (e.g. a probability outside (0, 1))."""


@dataclass(frozen=True)
class BlockMaskPlan:
    """The integer quantities a mask setting implies for one grid (all derived in float64 like the original).

    ``num_centres`` = ⌊L·(p + adjust)/mask_length²⌋ block centres, ``num_visible`` = ⌊L·p⌋ kept cells,
    where ``p = 1 − mask_prob`` is the keep probability and ``L = T·F``.
    """

    num_cells: int
    num_centres: int
    num_visible: int

    @property
    def num_masked(self) -> int:
        return self.num_cells - self.num_visible


def block_mask_plan(
    grid: tuple[int, int], mask_prob: float = 0.8, mask_prob_adjust: float = 0.07, mask_length: int = 5
) -> BlockMaskPlan:
    """Validate a mask setting and derive its counts (base 64×8: 5 centres, 102 visible; large: 7, 128)."""
    num_time, num_freq = grid
    if num_time < 1 or num_freq < 1:
        raise MaskConfigError(f"grid must have positive sides, got {grid}")
    if not 0.0 < mask_prob < 1.0:
        raise MaskConfigError(f"mask_prob must be in (0, 1), got {mask_prob}")
    if mask_length < 2:
        raise MaskConfigError(f"mask_length must be >= 2, got {mask_length}")
    if mask_prob_adjust < 0:
        raise MaskConfigError(f"mask_prob_adjust must be >= 0, got {mask_prob_adjust}")
    num_cells = num_time * num_freq
    keep_prob = 1.0 - mask_prob  # inverse mode: blocks mark what stays visible
    num_centres = int(num_cells * ((keep_prob + mask_prob_adjust) / mask_length**2))
    num_visible = int(num_cells * keep_prob)
    if num_visible < 1:
        raise MaskConfigError(f"mask_prob {mask_prob} leaves no visible cell on a {grid} grid")
    return BlockMaskPlan(num_cells=num_cells, num_centres=num_centres, num_visible=num_visible)


def block_cover(
    num_rows: int,
    grid: tuple[int, int],
    num_centres: int,
    mask_length: int = 5,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Cells covered by ``num_centres`` random ``mask_length²`` squares per row -> bool ``[R, T·F]``.

    Centres are uniform over all cells *with replacement*; square coordinates outside the grid are
    clamped to its edge (not dropped), so squares at an edge are narrower — that is what makes edge
    cells rarer than middle ones (reference §3.2 step 3).
    """
    num_time, num_freq = grid
    num_cells = num_time * num_freq
    cover = torch.zeros(num_rows, num_cells, dtype=torch.bool, device=device)
    if num_centres == 0:
        return cover
    centres = torch.randint(0, num_cells, (num_rows, num_centres), generator=generator, device=device)
    offsets = torch.arange(mask_length, device=device) - mask_length // 2  # [-2..2] for 5
    t = (centres // num_freq)[:, :, None, None] + offsets[:, None]  # [R, C, l, 1]
    f = (centres % num_freq)[:, :, None, None] + offsets[None, :]  # [R, C, 1, l]
    t = t.clamp(0, num_time - 1)
    f = f.clamp(0, num_freq - 1)
    cells = (t * num_freq + f).reshape(num_rows, -1)  # [R, C·l·l]
    return cover.scatter_(1, cells, True)


def fix_count(selected: torch.Tensor, num_selected: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Force exactly ``num_selected`` True per row: drop a uniform random surplus, or add uniform
    random unselected cells (reference §3.2 step 4).

    One sort does both: every cell gets score ``selected + U[0, 1)`` and the top ``num_selected``
    win. Selected cells (score ≥ 1) always beat unselected ones, and ties inside each group are broken
    by the uniform keys, i.e. a uniformly random subset — the distribution of the original's
    sequential multinomial draws.
    """
    keys = torch.rand(selected.shape, generator=generator, device=selected.device)
    scores = selected.to(keys.dtype) + keys
    winners = scores.topk(num_selected, dim=1, sorted=False).indices  # [R, K]
    return torch.zeros_like(selected).scatter_(1, winners, True)


def inverse_block_mask(
    num_rows: int,
    grid: tuple[int, int],
    mask_prob: float = 0.8,
    mask_prob_adjust: float = 0.07,
    mask_length: int = 5,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Independent inverse block masks, bool ``[num_rows, T·F]``, True = masked.

    ``grid`` = (time patches, frequency patches), (64, 8) for 1024 frames. Every row has exactly
    ⌊L·(1 − mask_prob)⌋ visible cells (102 of 512 for EAT-base; 128 with the large setting
    ``mask_prob=0.75, mask_prob_adjust=0.1``). Rows are independent, so the 16 clones of a clip are
    simply 16 consecutive rows. ``generator`` must live on ``device`` (masks are normally made on the
    CPU, in the data loader, like the original's precomputed masks).
    """
    if num_rows < 0:
        raise MaskConfigError(f"num_rows must be >= 0, got {num_rows}")
    plan = block_mask_plan(grid, mask_prob, mask_prob_adjust, mask_length)
    visible = block_cover(num_rows, grid, plan.num_centres, mask_length, generator, device)
    visible = fix_count(visible, plan.num_visible, generator)
    return ~visible
