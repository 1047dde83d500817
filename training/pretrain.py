"""``eat pretrain``: EAT's self-supervised pre-training loop (eat-reference.md §3), top to bottom.

One update: per micro-batch (``accum_steps`` of them), waveforms -> log-mel on the device ->
EMA-teacher targets (no grad) -> inverse block masks for ``clone_batch`` clones per clip -> student +
CNN decoder -> UFO loss -> backward; then clip (norm 4) -> AdamW -> EMA update of the teacher with the
annealed decay. What both loops share (arguments, config, loader, resume, DDP, saving) is in
``training.loop``. The LR, EMA decay and masks are pure
functions of the step, and the checkpoint holds everything else (model, teacher, optimizer, RNG
states, data position, config), so a killed run resumes exactly where it stopped.

Single process: ``eat pretrain --recipe pretrain_as2m --data DIR --out RUN``; many GPUs or nodes:
``torchrun --nproc-per-node 4 -m training.cli pretrain ...`` (``batch_size`` is per rank).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
from pathlib import Path
from typing import Any

import torch

from model.checkpoints import load_checkpoint, load_weights, save_checkpoint
from model.config import EATConfig
from model.encoder import flops_per_token
from model.frontend import LogMelFrontend
from model.masking import block_mask_plan, inverse_block_mask
from model.pretraining import EATPretrainingModel, ema_decay, ema_update, make_teacher, teacher_targets
from training import loop
from training.checkpoint import unwrap
from training.config import PretrainConfig
from training.data.dataset import AudioDataset
from training.data.sampler import ResumableSampler
from training.data.splits import load_split
from training.distributed import DistEnv, Reporter, all_reduce_mean, autocast, init_distributed, shutdown
from training.schedule import build_adamw, param_groups, set_lr, step_generator

logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    loop.add_arguments(parser, init_help="start from these weights instead of a random init")


def run(args: argparse.Namespace) -> int:
    cfg, state = resolve_config(args.recipe, args.overrides, args.out, args.resume)
    env = init_distributed(os.environ, cfg.device)
    try:
        summary = train(
            cfg, args.data, args.out, env, state=state, init=args.init, sigkill_at_step=args.debug_sigkill_at_step
        )
        if env.is_main:
            print(
                f"pre-training done: step {summary['step']}, loss {summary['loss']:.4f}, model {summary['model_path']}"
            )
    finally:
        shutdown(env)
    return 0


def resolve_config(
    recipe: str | None, overrides: list[str], out_dir: Path, resume: bool
) -> tuple[PretrainConfig, dict[str, Any] | None]:
    """The run's config, and the checkpoint state when resuming (see ``training.loop.resolve_config``)."""
    return loop.resolve_config(PretrainConfig, "pretrain", recipe, overrides, out_dir, resume)


def update_flops(cfg: EATConfig, num_clips: int, clone_batch: int, num_tokens: int, num_visible: int) -> float:
    """Model FLOPs of one micro-batch: the teacher's forward on every patch, the student's forward and
    backward (3× forward) on the visible patches of every clone; the small CNN decoder is left out."""
    teacher = num_clips * (1 + num_tokens) * flops_per_token(cfg, 1 + num_tokens)
    student = num_clips * clone_batch * (1 + num_visible) * flops_per_token(cfg, 1 + num_visible)
    return teacher + 3 * student


def train(
    cfg: PretrainConfig,
    data_dir: str | Path,
    out_dir: str | Path,
    env: DistEnv | None = None,
    *,
    state: dict[str, Any] | None = None,
    init: str | None = None,
    sigkill_at_step: int | None = None,
) -> dict[str, Any]:
    """Run (or continue, given a checkpoint ``state``) pre-training; returns a summary dict."""
    env = env or init_distributed({}, cfg.device)
    out_dir = Path(out_dir)
    device = torch.device(env.device)
    if env.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        logger.info("pre-training config: %s", cfg.to_dict())

    # Data: raw waveforms; every rank reads its own shard of the same seeded order.
    frontend_cfg = cfg.frontend_config()
    manifest = load_split(data_dir, "train", require_labels=False)
    dataset = AudioDataset(manifest, clip_samples=frontend_cfg.window_samples, target="none")
    sampler = ResumableSampler(len(dataset), seed=cfg.seed, rank=env.rank, world_size=env.world_size)
    batches = loop.Batches(loop.make_train_loader(dataset, sampler, cfg, device), device)

    # Model: same init on every rank (DDP also broadcasts rank 0's weights), then per-rank RNG.
    torch.manual_seed(cfg.seed)
    model_cfg = cfg.eat_config()
    model = EATPretrainingModel(
        model_cfg,
        clone_batch=cfg.clone_batch,
        mask_noise_std=cfg.mask_noise_std,
        utterance_weight=cfg.utterance_weight,
        loss_reduction=cfg.loss_reduction,
    )
    model.init_weights()
    if init is not None and state is None:
        loaded = load_checkpoint(init)
        if loaded.config.replace(num_classes=0) != model_cfg:
            raise ValueError(f"--init {init}: its architecture differs from the recipe's model")
        load_weights(model, {k: v for k, v in loaded.state_dict.items() if not k.startswith(("head.", "fc_norm."))})
    model.to(device)
    teacher = make_teacher(model.encoder)  # frozen fp32 EMA copy, outside DDP (§3.7)
    frontend = LogMelFrontend(frontend_cfg).to(device)
    optimizer = build_adamw(
        param_groups(model, weight_decay=cfg.weight_decay, exempt_1d=cfg.exempt_1d_from_decay),
        cfg,
        fused=device.type == "cuda",
    )
    torch.manual_seed(cfg.seed + env.rank)  # decoder noise and anything else stochastic differs per rank

    step = 0
    if state is not None:
        step = loop.restore_state(state, env, model=model, optimizer=optimizer, batches=batches, out_dir=out_dir)
        teacher.load_state_dict(state["teacher"])

    ddp_model = loop.wrap_model(model, cfg, env)
    targets_fn = torch.compile(teacher_targets) if cfg.compile else teacher_targets
    top_k = cfg.average_top_k_layers or None
    grid = (cfg.target_frames // model_cfg.patch_size, model_cfg.freq_patches)
    num_tokens = grid[0] * grid[1]
    mask_generator = torch.Generator(device=device)
    # Every mask row keeps the same number of patches visible (the plan's count): for the FLOP count.
    num_visible = block_mask_plan(grid, cfg.mask_prob, cfg.mask_prob_adjust, cfg.mask_length).num_visible
    reporter = Reporter(
        env,
        out_dir,
        total_steps=cfg.max_steps,
        start_step=step,
        clips_per_step=cfg.batch_size * cfg.accum_steps * env.world_size,
        tensorboard=cfg.tensorboard,
        desc="pre-train",
        flops_per_step=cfg.accum_steps
        * update_flops(model_cfg, cfg.batch_size, cfg.clone_batch, num_tokens, num_visible),
        peak_flops=loop.peak_flops(device, cfg),
    )
    loss_value = float("nan")
    ddp_model.train()
    while step < cfg.max_steps:
        if sigkill_at_step is not None and step == sigkill_at_step:
            os.kill(os.getpid(), signal.SIGKILL)  # simulated crash: no cleanup, no final save
        lr = set_lr(optimizer, step, cfg)  # warm-up + cosine, a function of the step (§3.8)
        loss_sum = torch.zeros((), device=device)
        for micro in range(cfg.accum_steps):
            batch = batches.next()
            waveform, num_samples = batch["waveform"], batch["num_samples"]  # [B, S], [B]
            with torch.no_grad():
                fbank = frontend(waveform, num_samples)  # [B, 1, T, 128], always fp32 (frontend docstring)
                with autocast(device.type, cfg.precision):
                    targets = targets_fn(teacher, fbank, top_k)  # [B, N, D] fp32
            # Masks are made on the device from a generator seeded by (seed, micro-batch, rank):
            # reproducible, nothing to save, independent of how many steps ran before a restart.
            step_generator(mask_generator, cfg.seed, step * cfg.accum_steps + micro, env.rank)
            mask = inverse_block_mask(
                fbank.shape[0] * cfg.clone_batch,
                grid,
                cfg.mask_prob,
                cfg.mask_prob_adjust,
                cfg.mask_length,
                generator=mask_generator,
                device=device,
            )  # [B·clones, N]
            with loop.micro_step(ddp_model, micro, cfg.accum_steps):
                with autocast(device.type, cfg.precision):
                    out = ddp_model(fbank, mask, targets)
                if not loop.is_last(step, micro, cfg):
                    batches.prefetch()  # the loader's work overlaps the backward pass
                (out.loss / cfg.accum_steps).backward()
            loss_sum += out.loss.detach()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip or float("inf"))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        decay = ema_decay(step, cfg.ema_decay, cfg.ema_end_decay, cfg.ema_anneal_end_step)
        ema_update(teacher, unwrap(model).encoder, decay)  # after every update, as fairseq (§3.7)
        reporter.advance()

        if loop.due(step, cfg.log_every, cfg):
            # .item() forces a device sync: only on log steps. The terms are the last micro-batch's.
            loss_value = float(all_reduce_mean(loss_sum / cfg.accum_steps, env).item())
            reporter.log(
                step,
                {
                    "loss": loss_value,
                    "frame_loss": float(out.frame_loss_sum.item() / out.sample_size.item()),
                    "utterance_loss": float(out.utterance_loss_sum.item() / mask.shape[0]),
                    "lr": lr,
                    "ema_decay": decay,
                    "grad_norm": float(grad_norm.item()),
                },
            )
        if loop.due(step, cfg.save_every, cfg):
            loop.save_state(
                out_dir,
                env,
                kind="pretrain",
                step=step,
                cfg=cfg,
                model=model,
                optimizer=optimizer,
                batches=batches,
                teacher=teacher.state_dict(),
                loss=loss_value,
            )

    reporter.close()
    model_path = out_dir / "model.safetensors"
    if env.is_main:
        # Student encoder + decoder in our format (fine-tuning starts from the student, §4.1), and
        # the EMA teacher beside it.
        save_checkpoint(model_path, unwrap(model), frontend_cfg, name=out_dir.name or "eat-pretrain")
        save_checkpoint(out_dir / "teacher.safetensors", teacher, frontend_cfg, name="eat-pretrain-teacher")
    # The modules too, for in-process callers (demo, tests); the CLI prints only the numbers.
    return {"step": step, "loss": loss_value, "model_path": str(model_path), "model": unwrap(model), "teacher": teacher}


__all__ = ["add_arguments", "resolve_config", "run", "train", "update_flops"]
