"""``eat pretrain``: EAT's self-supervised pre-training loop (eat-reference.md §3), top to bottom.

One update: waveforms -> log-mel on the device -> EMA-teacher targets (no grad) -> inverse block masks
for ``clone_batch`` clones per clip -> student + CNN decoder -> UFO loss -> backward -> clip (norm 4)
-> AdamW -> EMA update of the teacher with the annealed decay. The LR, EMA decay and masks are pure
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
from torch.nn.parallel import DistributedDataParallel

from model.checkpoints import load_checkpoint, load_weights, save_checkpoint
from model.frontend import LogMelFrontend
from model.masking import inverse_block_mask
from model.pretraining import EATPretrainingModel, ema_decay, ema_update, make_teacher, teacher_targets
from training.checkpoint import (
    CHECKPOINT_NAME,
    capture_rng_state,
    load_training_checkpoint,
    require_world_size,
    restore_rng_state,
    save_training_checkpoint,
    unwrap,
)
from training.config import PretrainConfig, apply_overrides, config_from_dict, load_config
from training.data.dataset import AudioDataset
from training.data.sampler import ResumableSampler, make_loader
from training.data.splits import load_split
from training.distributed import (
    DistEnv,
    Reporter,
    all_gather_object,
    all_reduce_mean,
    autocast,
    init_distributed,
    shutdown,
)
from training.schedule import build_adamw, param_groups, set_lr, step_generator

logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--recipe", help="recipe name (training/recipes/NAME.yaml) or a YAML path")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a recipe key, e.g. --set max_steps=1000 --set model.depth=4",
    )
    parser.add_argument("--data", required=True, type=Path, help="data directory with train.tsv (or folders)")
    parser.add_argument("--out", required=True, type=Path, help="run directory (checkpoints, logs, model)")
    parser.add_argument("--init", default=None, help="start from these weights instead of a random init")
    parser.add_argument(
        "--resume", action="store_true", help="continue from RUN/checkpoint.pt if it exists (config comes from it)"
    )
    # Fault injection for the resume test: SIGKILL this process when step N is about to run.
    parser.add_argument("--debug-sigkill-at-step", type=int, default=None, help=argparse.SUPPRESS)


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
    """The run's config, and the checkpoint state when resuming (its saved config wins over the recipe;
    ``--set`` still applies, e.g. to raise ``max_steps``)."""
    path = Path(out_dir) / CHECKPOINT_NAME
    if resume and path.is_file():
        state = load_training_checkpoint(path, kind="pretrain")
        cfg = config_from_dict(PretrainConfig, apply_overrides(state["config"], overrides))
        return cfg, state
    if resume:
        logger.info("no checkpoint in %s: starting a new run", out_dir)
    if not recipe:
        raise ValueError("--recipe is required (unless --resume finds a checkpoint)")
    return load_config(PretrainConfig, recipe, overrides), None


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
    loader = make_loader(
        dataset, cfg.batch_size, sampler, cfg.num_workers, drop_last=True, pin_memory=device.type == "cuda"
    )
    # A private generator for the loader's worker seeds: otherwise each new iterator draws from the
    # global RNG, whose stream (decoder noise) would then depend on where a run was restarted.
    loader.loader.generator = torch.Generator().manual_seed(cfg.seed)
    if len(loader) == 0:
        raise ValueError(
            f"{len(dataset)} clips per epoch over {env.world_size} rank(s) cannot fill one batch "
            f"of {cfg.batch_size}; lower batch_size"
        )

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
        require_world_size(state, env.world_size)
        model.load_state_dict(state["model"])
        teacher.load_state_dict(state["teacher"])
        optimizer.load_state_dict(state["optimizer"])
        sampler.load_state_dict(state["data"])
        restore_rng_state(state["rng"][env.rank])
        step = int(state["step"])
        logger.info("resumed from %s at step %d", out_dir / CHECKPOINT_NAME, step)

    if cfg.compile:
        model = torch.compile(model)
    targets_fn = torch.compile(teacher_targets) if cfg.compile else teacher_targets
    ddp_model = DistributedDataParallel(model) if env.backend else model
    top_k = cfg.average_top_k_layers or None
    grid = (cfg.target_frames // model_cfg.patch_size, model_cfg.freq_patches)
    mask_generator = torch.Generator(device=device)

    def save(step: int, loss: float) -> None:
        rng = all_gather_object(capture_rng_state(), env)  # collective: every rank calls it
        if not env.is_main:
            return
        save_training_checkpoint(
            out_dir / CHECKPOINT_NAME,
            kind="pretrain",
            step=step,
            config=cfg.to_dict(),
            model=unwrap(model).state_dict(),
            teacher=teacher.state_dict(),
            optimizer=optimizer.state_dict(),
            data=sampler.state_dict(),
            rng=rng,
            world_size=env.world_size,
            loss=loss,
        )

    def batches() -> Any:
        while True:
            yield from loader

    reporter = Reporter(
        env,
        out_dir,
        total_steps=cfg.max_steps,
        start_step=step,
        clips_per_step=cfg.batch_size * env.world_size,
        tensorboard=cfg.tensorboard,
        desc="pre-train",
    )
    data = batches()
    loss_value = float("nan")
    ddp_model.train()
    while step < cfg.max_steps:
        if sigkill_at_step is not None and step == sigkill_at_step:
            os.kill(os.getpid(), signal.SIGKILL)  # simulated crash: no cleanup, no final save
        lr = set_lr(optimizer, step, cfg)  # warm-up + cosine, a function of the step (§3.8)
        batch = next(data)
        waveform = batch["waveform"].to(device, non_blocking=True)  # [B, S]
        num_samples = batch["num_samples"].to(device, non_blocking=True)  # [B]
        with torch.no_grad():
            fbank = frontend(waveform, num_samples)  # [B, 1, T, 128], always fp32 (frontend docstring)
            with autocast(device.type, cfg.precision):
                targets = targets_fn(teacher, fbank, top_k)  # [B, N, D] fp32
        # Masks are made on the device from a generator seeded by (seed, step, rank): reproducible,
        # nothing to save, and independent of how many steps ran before a restart.
        step_generator(mask_generator, cfg.seed, step, env.rank)
        mask = inverse_block_mask(
            fbank.shape[0] * cfg.clone_batch,
            grid,
            cfg.mask_prob,
            cfg.mask_prob_adjust,
            cfg.mask_length,
            generator=mask_generator,
            device=device,
        )  # [B·clones, N]
        with autocast(device.type, cfg.precision):
            out = ddp_model(fbank, mask, targets)
        out.loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip or float("inf"))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        decay = ema_decay(step, cfg.ema_decay, cfg.ema_end_decay, cfg.ema_anneal_end_step)
        ema_update(teacher, unwrap(model).encoder, decay)  # after every update, as fairseq (§3.7)
        reporter.advance()

        if step % cfg.log_every == 0 or step == cfg.max_steps:
            # .item() forces a device sync: only on log steps.
            loss_value = float(all_reduce_mean(out.loss.detach(), env).item())
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
        if step % cfg.save_every == 0 or step == cfg.max_steps:
            save(step, loss_value)

    reporter.close()
    model_path = out_dir / "model.safetensors"
    if env.is_main:
        # Student encoder + decoder in our format (fine-tuning starts from the student, §4.1), and
        # the EMA teacher beside it.
        save_checkpoint(model_path, unwrap(model), frontend_cfg, name=out_dir.name or "eat-pretrain")
        save_checkpoint(out_dir / "teacher.safetensors", teacher, frontend_cfg, name="eat-pretrain-teacher")
    # The modules too, for in-process callers (demo, tests); the CLI prints only the numbers.
    return {"step": step, "loss": loss_value, "model_path": str(model_path), "model": unwrap(model), "teacher": teacher}


__all__ = ["add_arguments", "resolve_config", "run", "train"]
