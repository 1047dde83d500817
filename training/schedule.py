"""Learning-rate schedules and optimiser parameter groups, as pure functions of the step.

The LR of every group is recomputed from the step at each update (never stored state), so a resumed run
gets exactly the LR the uninterrupted run had (STYLE.md house rule 11).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import nn


def warmup_cosine(
    step: int,
    *,
    peak_lr: float,
    warmup_steps: int,
    max_steps: int,
    min_lr: float = 0.0,
    start_lr: float | None = None,
) -> float:
    """LR for the ``step``-th update (0-based): linear warm-up then one cosine cycle to ``min_lr``.

    As fairseq's cosine scheduler: update 0 runs at ``start_lr`` (default ``min_lr``; pre-training
    warms up from 0, §3.8; fine-tuning from ``min_lr``, §4.4); after ``max_steps`` the LR stays at
    ``min_lr``.
    """
    start = min_lr if start_lr is None else start_lr
    if step < warmup_steps:
        return start + (peak_lr - start) * step / warmup_steps
    span = max(max_steps - warmup_steps, 1)
    progress = min((step - warmup_steps) / span, 1.0)
    return min_lr + 0.5 * (peak_lr - min_lr) * (1.0 + math.cos(math.pi * progress))


def group_lr(step: int, *, lr: float, lr_scale: float, min_lr: float, warmup_steps: int, max_steps: int) -> float:
    """One parameter group's LR under EAT's per-group cosine (reference §4.4).

    Each group peaks at ``lr·lr_scale`` and ends at ``min_lr``, except that a group whose scaled peak is
    below ``min_lr`` gets its floor lowered to the peak, i.e. a constant LR (with 5e-5 and 0.65 layer
    decay that freezes the three lowest blocks' LRs).
    """
    peak = lr * lr_scale
    floor = min(min_lr, peak)
    return warmup_cosine(step, peak_lr=peak, warmup_steps=warmup_steps, max_steps=max_steps, min_lr=floor)


def set_lr(optimizer: torch.optim.Optimizer, step: int, cfg: Any) -> float:
    """Set every group's LR for ``step`` from ``cfg`` (lr, min_lr, warmup_steps, max_steps); return the
    base (scale 1) LR for logging."""
    for group in optimizer.param_groups:
        group["lr"] = group_lr(
            step,
            lr=cfg.lr,
            lr_scale=group.get("lr_scale", 1.0),
            min_lr=cfg.min_lr,
            warmup_steps=cfg.warmup_steps,
            max_steps=cfg.max_steps,
        )
    return group_lr(
        step, lr=cfg.lr, lr_scale=1.0, min_lr=cfg.min_lr, warmup_steps=cfg.warmup_steps, max_steps=cfg.max_steps
    )


def step_generator(generator: torch.Generator, seed: int, step: int, rank: int = 0) -> torch.Generator:
    """Re-seed ``generator`` from (seed, step, rank): per-step randomness (masks, augmentation) that is a
    pure function of the step, so a resumed run draws exactly what the uninterrupted one drew."""
    # Hashed through a SeedSequence: the CPU generator keeps only 32 bits of its seed, so plain
    # arithmetic like seed·2^40 + step would collide.
    mixed = np.random.SeedSequence([seed, step, rank]).generate_state(1, dtype=np.uint64)[0]
    return generator.manual_seed(int(mixed))


def _decays(name: str, param: nn.Parameter, exempt_1d: bool) -> bool:
    # The original marks biases and 1-D params for no decay but never applies the mark (§3.8 note),
    # so by default everything decays; ``exempt_1d`` is the deliberate deviation.
    return not (exempt_1d and (param.ndim <= 1 or name.endswith(".bias") or name.endswith("cls_token")))


def param_groups(
    model: nn.Module,
    *,
    weight_decay: float,
    exempt_1d: bool = False,
    layer_decay: float = 1.0,
    depth: int | None = None,
) -> list[dict[str, Any]]:
    """AdamW parameter groups with ``lr_scale`` and ``weight_decay`` per group.

    Layer-wise LR decay (fine-tuning, §4.4) touches only the transformer blocks: parameter names
    containing ``blocks.{i}.`` get ``layer_decay^(depth - i)``; the patch conv, CLS token, input
    LayerNorm, ``fc_norm`` and head keep scale 1. Frozen parameters (``requires_grad=False``) are left
    out.
    """
    groups: dict[tuple[float, float], dict[str, Any]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        scale = 1.0
        block = _block_index(name)
        if block is not None and layer_decay != 1.0:
            if depth is None:
                raise ValueError("layer_decay needs the encoder depth")
            scale = layer_decay ** (depth - block)
        decay = weight_decay if _decays(name, param, exempt_1d) else 0.0
        group = groups.setdefault((scale, decay), {"params": [], "names": [], "lr_scale": scale, "weight_decay": decay})
        group["params"].append(param)
        group["names"].append(name)
    # Sorted so the group order (and thus the optimizer state layout) never depends on dict order.
    return [groups[key] for key in sorted(groups)]


def _block_index(name: str) -> int | None:
    parts = name.split(".")
    for i, part in enumerate(parts[:-1]):
        if part == "blocks" and parts[i + 1].isdigit():
            return int(parts[i + 1])
    return None


def build_adamw(groups: list[dict[str, Any]], cfg: Any, fused: bool = False) -> torch.optim.AdamW:
    """AdamW with EAT's betas/eps; ``names`` are stripped (the optimizer state dict stays plain)."""
    clean = [{k: v for k, v in g.items() if k != "names"} for g in groups]
    kwargs: dict[str, Any] = {"lr": cfg.lr, "betas": tuple(cfg.betas), "eps": cfg.eps}
    if fused:
        kwargs["fused"] = True
    return torch.optim.AdamW(clean, **kwargs)


__all__ = ["build_adamw", "group_lr", "param_groups", "set_lr", "step_generator", "warmup_cosine"]
