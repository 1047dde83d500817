"""EAT pre-training: clone batch, EMA teacher targets, CNN decoder and the UFO loss (eat-reference.md §3).

How the training loop uses it (one update)::

    model = EATPretrainingModel(cfg, clone_batch=16)      # student encoder + decoder; DDP wraps this
    model.init_weights()                                   # or load a checkpoint instead
    teacher = make_teacher(model.encoder)                  # frozen EMA copy, lives outside DDP
    ...
    mask = inverse_block_mask(B * 16, (T // 16, 8), generator=g)   # model.masking, in the loader
    targets = teacher_targets(teacher, fbank)              # [B, N, D], no grad
    out = model(fbank, mask, targets)                      # PretrainLoss
    out.loss.backward(); optimizer.step()
    ema_update(teacher, unwrap(model).encoder, ema_decay(step))

State-dict keys are ``encoder.*`` and ``decoder.*`` (``decoder.blocks.{i}.conv.*``, ``decoder.proj.*``),
the names ``model.checkpoints`` maps the official ``modality_encoders.IMAGE.decoder.*`` keys onto.

Loss scaling (§3.6): by default the original's — the frame term is a mean over masked tokens, the
utterance term a *sum* over clone rows, both with per-token squared errors summed over channels and
divided by √D. ``loss_reduction="mean"`` averages the utterance term over rows instead, which keeps
the balance independent of the per-device batch (multiply ``utterance_weight`` by the row count to
get the original balance back).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from model.config import EATConfig
from model.encoder import Encoder
from model.masking import inverse_block_mask

__all__ = [
    "CNNDecoder",
    "EATPretrainingModel",
    "PretrainLoss",
    "ema_decay",
    "ema_update",
    "inverse_block_mask",
    "make_teacher",
    "teacher_targets",
]

TARGET_NORM_EPS = 1e-5  # instance norm per layer and final LayerNorm of the targets (§3.4)
DECODER_NORM_EPS = 1e-5  # channel LayerNorm in the decoder (fairseq LayerNorm default, §3.5)


# ---------------------------------------------------------------------------------------------
# Teacher


def make_teacher(encoder: Encoder) -> Encoder:
    """Frozen deep copy of the student encoder: the EMA teacher starts as an exact copy (§2.7)."""
    teacher = copy.deepcopy(encoder)
    teacher.requires_grad_(False)
    return teacher.eval()


@torch.no_grad()
def teacher_targets(teacher: Encoder, fbank: torch.Tensor, top_k: int | None = None) -> torch.Tensor:
    """Frame targets ``Y`` ``[B, N, D]`` float32 from the teacher on the *unmasked* clip (§3.4).

    Per block the FFN output (before residual and LN2, CLS dropped) is instance-normalised over the
    patch axis, the top ``top_k`` layers (default: all) are averaged, then LayerNorm-ed over channels;
    both norms have no affine and eps 1e-5 and run in float32 even under autocast.
    """
    depth = len(teacher.blocks)
    num_layers = depth if top_k is None else top_k
    if not 1 <= num_layers <= depth:
        raise ValueError(f"top_k must be in [1, {depth}], got {top_k}")
    teacher.eval()  # the original switches the EMA model to eval before every target pass
    _, ffn = teacher.forward_intermediates(fbank, num_layers, output="ffn")  # top-k blocks, in order
    total = None
    for m in ffn:
        layer = m[:, 1:].float()  # [B, N, D], CLS dropped
        mean = layer.mean(dim=1, keepdim=True)
        var = layer.var(dim=1, unbiased=False, keepdim=True)
        layer = (layer - mean) * torch.rsqrt(var + TARGET_NORM_EPS)
        total = layer if total is None else total + layer
    y = total / num_layers
    return F.layer_norm(y, y.shape[-1:], eps=TARGET_NORM_EPS)  # [B, N, D]


def ema_decay(step: int, start: float = 0.9998, end: float = 0.99999, anneal_steps: int = 100_000) -> float:
    """Teacher decay at update ``step``: linear from ``start`` to ``end`` over ``anneal_steps``, then
    constant (§3.7; large uses ``anneal_steps=150_000``). A pure function of the step, so resuming is exact.
    """
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if step >= anneal_steps:
        return end
    return end - (end - start) * (1.0 - step / anneal_steps)


@torch.no_grad()
def ema_update(teacher: Encoder, student_encoder: nn.Module, decay: float) -> None:
    """``θ_T ← decay·θ_T + (1 − decay)·θ_S`` for every trainable student parameter the teacher has,
    computed in float32; frozen parameters and buffers (the positional table) are copied (§3.7).

    Student entries the teacher lacks (e.g. a decoder) are skipped; a shape mismatch is an error.
    """
    if not 0.0 <= decay <= 1.0:
        raise ValueError(f"decay must be in [0, 1], got {decay}")
    teacher_params = dict(teacher.named_parameters())
    teacher_buffers = dict(teacher.named_buffers())
    for name, param in student_encoder.named_parameters():
        target = teacher_params.get(name)
        if target is None:
            continue
        _check_shape(name, target, param)
        if not param.requires_grad:
            target.copy_(param)
        elif target.dtype == torch.float32:
            target.mul_(decay).add_(param.detach().float(), alpha=1.0 - decay)
        else:  # a low-precision teacher: do the arithmetic in fp32, round once
            target.copy_(target.float().mul_(decay).add_(param.detach().float(), alpha=1.0 - decay))
    for name, buffer in student_encoder.named_buffers():
        target = teacher_buffers.get(name)
        if target is not None:
            _check_shape(name, target, buffer)
            target.copy_(buffer)


def _check_shape(name: str, teacher_value: torch.Tensor, student_value: torch.Tensor) -> None:
    if teacher_value.shape != student_value.shape:
        raise ValueError(
            f"EMA shape mismatch for {name}: teacher {tuple(teacher_value.shape)} "
            f"vs student {tuple(student_value.shape)}"
        )


# ---------------------------------------------------------------------------------------------
# Decoder


class DecoderLayer(nn.Module):
    """Grouped conv -> channel LayerNorm (no affine) -> GELU on a ``[R, C, T, F]`` map (§3.5)."""

    def __init__(self, in_dim: int, out_dim: int, kernel: int, groups: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_dim, out_dim, kernel_size=kernel, padding=kernel // 2, groups=groups)
        self.out_dim = out_dim
        # "Same" padding for even kernels: the padded conv yields one extra row/column; drop it.
        self.crop = kernel % 2 == 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        if self.crop:
            x = x[:, :, :-1, :-1]
        x = F.layer_norm(x.permute(0, 2, 3, 1), (self.out_dim,), eps=DECODER_NORM_EPS)  # channels last
        return F.gelu(x.permute(0, 3, 1, 2))


class CNNDecoder(nn.Module):
    """EAT's lightweight 2-D CNN decoder: ``[R, N, D]`` tokens in grid order -> ``[R, N, D]`` predictions.

    Layers are residual whenever input and output widths match (always, except a first layer when
    ``decoder_dim != D``); no positions are added (§3.5, pitfall §9.6).
    """

    def __init__(self, cfg: EATConfig) -> None:
        super().__init__()
        dims = [cfg.embed_dim] + [cfg.decoder_dim] * cfg.decoder_layers
        self.blocks = nn.ModuleList(
            DecoderLayer(dims[i], dims[i + 1], cfg.decoder_kernel, cfg.decoder_groups)
            for i in range(cfg.decoder_layers)
        )
        self.residual = [dims[i] == dims[i + 1] for i in range(cfg.decoder_layers)]
        self.proj = nn.Linear(cfg.decoder_dim, cfg.embed_dim)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """PyTorch default init for the convs and the output Linear, as the original leaves them (§2.7)."""
        for block in self.blocks:
            block.conv.reset_parameters()
        self.proj.reset_parameters()

    def forward(self, tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        num_rows, num_tokens, dim = tokens.shape
        num_time, num_freq = grid
        if num_time * num_freq != num_tokens:
            raise ValueError(f"grid {grid} does not hold {num_tokens} tokens")
        x = tokens.transpose(1, 2).reshape(num_rows, dim, num_time, num_freq)  # [R, D, T, F]
        for block, residual in zip(self.blocks, self.residual, strict=True):
            x = block(x) + x if residual else block(x)
        return self.proj(x.flatten(2).transpose(1, 2))  # [R, N, D]


# ---------------------------------------------------------------------------------------------
# Student + loss


@dataclass
class PretrainLoss:
    """One UFO loss evaluation (§3.6). ``loss`` is what to backpropagate.

    ``frame_loss_sum`` = S_f, ``utterance_loss_sum`` = S_u (both already divided by √D),
    ``sample_size`` = number of masked tokens |M|. ``predictions`` ``[R, N, D]`` are the decoder
    outputs at every grid position and ``cls_pred`` ``[R, D]`` the student CLS outputs (for logging
    and tests; detach before keeping them).
    """

    loss: torch.Tensor
    frame_loss_sum: torch.Tensor
    utterance_loss_sum: torch.Tensor
    sample_size: torch.Tensor
    predictions: torch.Tensor
    cls_pred: torch.Tensor


class EATPretrainingModel(nn.Module):
    """Student encoder + CNN decoder, computing the UFO loss against given teacher targets.

    ``forward(fbank [B,1,T,128], mask bool [B·clone_batch, N] (True = masked), targets [B, N, D])``:
    embeds each clip once, repeats it ``clone_batch`` times (clip-major: clip0-clone0…clip0-clone15,
    clip1-clone0…), runs the encoder on the visible tokens only, fills masked positions with fresh
    N(0, ``mask_noise_std``²) noise, decodes on the (T/16, F) grid and scores masked positions.
    """

    def __init__(
        self,
        cfg: EATConfig,
        clone_batch: int = 16,
        mask_noise_std: float = 0.01,
        utterance_weight: float = 1.0,
        loss_reduction: Literal["original", "mean"] = "original",
    ) -> None:
        super().__init__()
        if clone_batch < 1:
            raise ValueError(f"clone_batch must be >= 1, got {clone_batch}")
        if mask_noise_std < 0:
            raise ValueError(f"mask_noise_std must be >= 0, got {mask_noise_std}")
        if loss_reduction not in ("original", "mean"):
            raise ValueError(f"loss_reduction must be 'original' or 'mean', got {loss_reduction!r}")
        self.cfg = cfg
        self.clone_batch = clone_batch
        self.mask_noise_std = mask_noise_std
        self.utterance_weight = utterance_weight
        self.loss_reduction = loss_reduction
        self.encoder = Encoder(cfg)
        self.decoder = CNNDecoder(cfg)

    @torch.no_grad()
    def init_weights(self) -> None:
        """From-scratch init (§2.7): EAT's encoder init, PyTorch defaults for the decoder."""
        self.encoder.init_weights()
        self.decoder.reset_parameters()

    def forward(self, fbank: torch.Tensor, mask: torch.Tensor, targets: torch.Tensor) -> PretrainLoss:
        tokens = self.encoder.embed(fbank)  # [B, N, D], once per clip
        num_clips, num_tokens, dim = tokens.shape
        grid = (num_tokens // self.cfg.freq_patches, self.cfg.freq_patches)
        num_visible = self._check_inputs(mask, targets, num_clips, num_tokens, dim)
        num_rows = num_clips * self.clone_batch

        # Visible first in ascending position order, then masked (stable sort on the 0/1 mask).
        order = torch.argsort(mask.to(torch.uint8), dim=1, stable=True)  # [R, N]
        keep = order[:, :num_visible]  # [R, K]
        clip_of_row = torch.arange(num_clips, device=tokens.device).repeat_interleave(self.clone_batch)
        flat = (clip_of_row[:, None] * num_tokens + keep).reshape(-1)
        visible = tokens.reshape(-1, dim)[flat].reshape(num_rows, num_visible, dim)  # [R, K, D]

        out = self.encoder.forward_tokens(visible)  # [R, 1+K, D]
        cls_pred = out[:, 0]  # [R, D]

        # Fresh noise mask tokens, not a learned token (§9.6); std 0 gives exact zeros.
        noise_shape = (num_rows, num_tokens - num_visible, dim)
        noise = torch.randn(noise_shape, device=out.device, dtype=out.dtype) * self.mask_noise_std
        restore = torch.argsort(order, dim=1)[..., None].expand(-1, -1, dim)  # [R, N, D]
        grid_tokens = torch.cat([out[:, 1:], noise], dim=1).gather(1, restore)  # [R, N, D] grid order
        predictions = self.decoder(grid_tokens, grid)  # [R, N, D]

        return self._loss(predictions, cls_pred, mask, targets)

    def _check_inputs(
        self, mask: torch.Tensor, targets: torch.Tensor, num_clips: int, num_tokens: int, dim: int
    ) -> int:
        """Validate shapes and return the (common) number of visible tokens per row."""
        num_rows = num_clips * self.clone_batch
        if mask.dtype != torch.bool:
            raise TypeError(f"mask must be a bool tensor (True = masked), got {mask.dtype}")
        if tuple(mask.shape) != (num_rows, num_tokens):
            raise ValueError(
                f"mask must be [{num_rows}, {num_tokens}] ({num_clips} clips × clone_batch "
                f"{self.clone_batch}, {num_tokens} tokens), got {tuple(mask.shape)}"
            )
        if tuple(targets.shape) != (num_clips, num_tokens, dim):
            raise ValueError(f"targets must be [{num_clips}, {num_tokens}, {dim}], got {tuple(targets.shape)}")
        # One host sync per step: the visible count sizes the student batch (as in the original).
        lo, hi = (num_tokens - mask.sum(dim=1)).aminmax()
        lo, hi = int(lo), int(hi)
        if lo != hi:
            raise ValueError(f"every mask row needs the same number of visible tokens, got {lo}..{hi}")
        if lo < 1 or lo == num_tokens:
            raise ValueError(f"masks must keep at least one token visible and mask at least one, got {lo}")
        return lo

    def _loss(
        self, predictions: torch.Tensor, cls_pred: torch.Tensor, mask: torch.Tensor, targets: torch.Tensor
    ) -> PretrainLoss:
        num_rows, num_tokens, dim = predictions.shape
        scale = 1.0 / math.sqrt(dim)
        y = targets.float()
        # Broadcast the clip's targets over its clones instead of materialising ×clone_batch copies.
        pred = predictions.float().view(-1, self.clone_batch, num_tokens, dim)
        token_err = (pred - y[:, None]).square().sum(dim=-1).reshape(num_rows, num_tokens)  # [R, N]
        frame_sum = (token_err * mask).sum() * scale
        sample_size = mask.sum()

        utterance_target = y.mean(dim=1).repeat_interleave(self.clone_batch, dim=0)  # [R, D]
        utterance_sum = (cls_pred.float() - utterance_target).square().sum() * scale

        frame_term = frame_sum / sample_size
        utterance_term = utterance_sum if self.loss_reduction == "original" else utterance_sum / num_rows
        return PretrainLoss(
            loss=frame_term + self.utterance_weight * utterance_term,
            frame_loss_sum=frame_sum,
            utterance_loss_sum=utterance_sum,
            sample_size=sample_size,
            predictions=predictions,
            cls_pred=cls_pred,
        )
