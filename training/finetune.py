"""``eat finetune``: supervised fine-tuning of an EAT classifier (eat-reference.md §4), top to bottom.

One update: waveforms -> roll + gain -> log-mel on the device -> [SPC noise + time roll] -> mixup ->
SpecAugment -> encoder + CLS head -> loss -> backward -> [clip] -> AdamW with layer-wise LR decay and
per-group cosine floors. Every ``eval_every`` steps rank 0 scores the eval split (mAP or accuracy) and
keeps the best weights. Augmentation randomness comes from a generator seeded by (seed, step, rank), so
a resumed run draws the same masks and mixes as the uninterrupted one.

Outputs in the run directory: ``model.safetensors`` (final weights, with labels: what ``eat export``
takes), ``best.safetensors`` (best eval score), ``checkpoint.pt`` (training state), ``eval.jsonl``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import signal
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from model.checkpoints import load_checkpoint, load_weights, save_checkpoint
from model.classifier import EATClassifier
from model.config import EATConfig, Label
from model.frontend import LogMelFrontend
from training.augment import mixup, roll_and_gain, spec_augment, spec_augment_widths, spectrogram_noise_and_roll
from training.checkpoint import (
    CHECKPOINT_NAME,
    capture_rng_state,
    load_training_checkpoint,
    require_world_size,
    restore_rng_state,
    save_training_checkpoint,
    unwrap,
)
from training.config import FinetuneConfig, apply_overrides, config_from_dict, load_config
from training.data.dataset import AudioDataset
from training.data.sampler import ResumableSampler, make_loader
from training.data.splits import load_split
from training.distributed import (
    DistEnv,
    Reporter,
    all_gather_object,
    all_reduce_mean,
    autocast,
    barrier,
    init_distributed,
    shutdown,
)
from training.evaluate import evaluate
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
        help="override a recipe key, e.g. --set max_steps=1000 --set lr=1e-4",
    )
    parser.add_argument(
        "--init", default=None, help="checkpoint to start from (ours, fairseq .pt, HF folder) or 'random'"
    )
    parser.add_argument("--data", required=True, type=Path, help="data directory with train/eval splits")
    parser.add_argument("--out", required=True, type=Path, help="run directory (checkpoints, logs, model)")
    parser.add_argument(
        "--resume", action="store_true", help="continue from RUN/checkpoint.pt if it exists (config comes from it)"
    )
    parser.add_argument("--debug-sigkill-at-step", type=int, default=None, help=argparse.SUPPRESS)


def run(args: argparse.Namespace) -> int:
    cfg, state = resolve_config(args.recipe, args.overrides, args.out, args.resume, args.init)
    env = init_distributed(os.environ, cfg.device)
    try:
        summary = train(cfg, args.data, args.out, env, state=state, sigkill_at_step=args.debug_sigkill_at_step)
        if env.is_main:
            best = summary["best"]
            print(
                f"fine-tuning done: step {summary['step']}, final {cfg.metric} "
                f"{summary['final'].get(_metric_key(cfg), float('nan')):.4f}, best {best['value']:.4f} "
                f"at step {best['step']}; model {summary['model_path']}"
            )
    finally:
        shutdown(env)
    return 0


def resolve_config(
    recipe: str | None, overrides: list[str], out_dir: Path, resume: bool, init: str | None = None
) -> tuple[FinetuneConfig, dict[str, Any] | None]:
    """The run's config (``--init`` wins over the recipe's ``init``), plus the checkpoint when resuming."""
    path = Path(out_dir) / CHECKPOINT_NAME
    if resume and path.is_file():
        state = load_training_checkpoint(path, kind="finetune")
        return config_from_dict(FinetuneConfig, apply_overrides(state["config"], overrides)), state
    if resume:
        logger.info("no checkpoint in %s: starting a new run", out_dir)
    if not recipe:
        raise ValueError("--recipe is required (unless --resume finds a checkpoint)")
    cfg = load_config(FinetuneConfig, recipe, overrides)
    if init is not None:
        cfg = dataclasses.replace(cfg, init=init)
    if cfg.init != "random":  # absolute, so a resumed run started elsewhere finds it
        cfg = dataclasses.replace(cfg, init=str(Path(cfg.init).resolve()))
    return cfg, None


def build_classifier(cfg: FinetuneConfig, num_classes: int) -> EATClassifier:
    """A classifier with a fresh head on top of ``cfg.init``'s (student) encoder, or randomly initialised.

    With a checkpoint its architecture wins; the recipe only sets the fine-tuning knobs (drop path,
    attention kernel, pooling) and the number of classes.
    """
    wanted = cfg.eat_config(num_classes)
    if cfg.init == "random":
        model = EATClassifier(wanted)
        model.init_weights()
        return model
    loaded = load_checkpoint(cfg.init)  # student weights for fairseq pre-training files (§4.1)
    arch: EATConfig = loaded.config.replace(
        num_classes=num_classes,
        drop_path_rate=wanted.drop_path_rate,
        attn_impl=wanted.attn_impl,
        pooling=wanted.pooling,
    )
    model = EATClassifier(arch)
    model.init_weights()
    encoder_state = {k.removeprefix("encoder."): v for k, v in loaded.state_dict.items() if k.startswith("encoder.")}
    load_weights(model.encoder, encoder_state)
    model.init_head()
    logger.info("initialised the encoder from %s (%s); new %d-class head", cfg.init, loaded.source_format, num_classes)
    return model


def classification_loss(logits: torch.Tensor, target: torch.Tensor, cfg: FinetuneConfig) -> torch.Tensor:
    """EAT's losses (§4.3). logits, target: float [B, C] (target multi-hot/one-hot, possibly mixed).

    - BCE summed over batch × classes, divided by the positive label mass (AudioSet) or the batch (SPC-2);
    - CE with label smoothing on the class index when there is no mixup (ESC-50);
    - soft-target CE (no smoothing) when mixup may mix the one-hot targets.
    """
    if cfg.loss == "bce":
        total = F.binary_cross_entropy_with_logits(logits, target, reduction="sum")
        norm = target.sum() if cfg.bce_normalizer == "positives" else target.new_tensor(float(len(target)))
        return total / norm.clamp_min(1e-6)
    if cfg.mixup_alpha > 0:
        return -(target * F.log_softmax(logits, dim=-1)).sum(dim=-1).mean()
    return F.cross_entropy(logits, target.argmax(dim=-1), label_smoothing=cfg.label_smoothing)


def _metric_key(cfg: FinetuneConfig) -> str:
    return "mAP" if cfg.metric == "map" else "accuracy"


def train(
    cfg: FinetuneConfig,
    data_dir: str | Path,
    out_dir: str | Path,
    env: DistEnv | None = None,
    *,
    state: dict[str, Any] | None = None,
    sigkill_at_step: int | None = None,
) -> dict[str, Any]:
    """Run (or continue, given a checkpoint ``state``) fine-tuning; returns a summary dict."""
    env = env or init_distributed({}, cfg.device)
    out_dir, data_dir = Path(out_dir), Path(data_dir)
    device = torch.device(env.device)
    if env.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        logger.info("fine-tuning config: %s", cfg.to_dict())

    # Data: labelled train split (optionally weight-sampled, §4.6) and the eval split.
    frontend_cfg = cfg.frontend_config()
    weights = data_dir / cfg.weights_file if cfg.weights_file else None
    train_split = load_split(data_dir, "train", weights=weights)
    labels: list[Label] = list(train_split.labels)
    eval_split = load_split(data_dir, "eval", labels=labels) if _has_split(data_dir, "eval") else None
    if eval_split is None:
        logger.warning("%s has no eval split: no periodic evaluation or best-checkpoint tracking", data_dir)
    dataset = AudioDataset(train_split, clip_samples=frontend_cfg.window_samples, target="multi_hot")
    sampler = ResumableSampler(
        len(dataset),
        seed=cfg.seed,
        weights=train_split.weights,
        num_draws=(cfg.num_draws or None) if train_split.weights else None,
        rank=env.rank,
        world_size=env.world_size,
    )
    loader = make_loader(
        dataset, cfg.batch_size, sampler, cfg.num_workers, drop_last=True, pin_memory=device.type == "cuda"
    )
    loader.loader.generator = torch.Generator().manual_seed(cfg.seed)  # keep the global RNG out of it
    if len(loader) == 0:
        raise ValueError(f"{len(sampler)} clips per epoch and rank cannot fill one batch of {cfg.batch_size}")

    torch.manual_seed(cfg.seed)
    model = build_classifier(cfg, len(labels)).to(device)
    frontend = LogMelFrontend(frontend_cfg).to(device)
    groups = param_groups(
        model,
        weight_decay=cfg.weight_decay,
        exempt_1d=cfg.exempt_1d_from_decay,
        layer_decay=cfg.layer_decay,
        depth=model.cfg.depth,
    )
    optimizer = build_adamw(groups, cfg, fused=device.type == "cuda")
    torch.manual_seed(cfg.seed + env.rank)  # drop path differs per rank

    step = 0
    best = {"value": float("-inf"), "step": 0}
    if state is not None:
        require_world_size(state, env.world_size)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        sampler.load_state_dict(state["data"])
        restore_rng_state(state["rng"][env.rank])
        step, best = int(state["step"]), dict(state["best"])
        logger.info("resumed from %s at step %d", out_dir / CHECKPOINT_NAME, step)

    compiled = torch.compile(model) if cfg.compile else model
    ddp_model = DistributedDataParallel(compiled) if env.backend else compiled
    aug_generator = torch.Generator(device=device)
    freq_width, time_width = spec_augment_widths(cfg.mask_ratio, cfg.target_frames, frontend_cfg.num_mel_bins)
    eval_loader = None
    if eval_split is not None and env.is_main:
        eval_data = AudioDataset(eval_split, clip_samples=frontend_cfg.window_samples, target="multi_hot")
        eval_loader = make_loader(
            eval_data, cfg.eval_batch_size, ResumableSampler(len(eval_data), shuffle=False), cfg.num_workers
        )
    multi_label = cfg.loss == "bce"

    def run_eval(step: int) -> dict[str, Any]:
        """Rank 0 scores the eval split with the plain module (no DDP collectives); others wait."""
        result: dict[str, Any] = {}
        if eval_loader is not None:
            # fp32 on purpose: the front end inside must not run under bf16 autocast.
            result = evaluate(unwrap(model), eval_loader, frontend, device, multi_label)
            result = {k: v for k, v in result.items() if k != "per_class_ap"}
            reporter.log(step, result, prefix="eval")
            with open(out_dir / "eval.jsonl", "a") as handle:
                handle.write(json.dumps({"step": step, **result}) + "\n")
            value = result[_metric_key(cfg)]
            if value > best["value"]:
                best.update(value=value, step=step)
                save_checkpoint(
                    out_dir / "best.safetensors",
                    unwrap(model),
                    frontend_cfg,
                    labels,
                    name=f"{out_dir.name or 'eat'}-best",
                )
        barrier(env)
        return result

    def save(step: int, loss: float) -> None:
        rng = all_gather_object(capture_rng_state(), env)  # collective: every rank calls it
        if env.is_main:
            save_training_checkpoint(
                out_dir / CHECKPOINT_NAME,
                kind="finetune",
                step=step,
                config=cfg.to_dict(),
                model=unwrap(model).state_dict(),
                optimizer=optimizer.state_dict(),
                data=sampler.state_dict(),
                rng=rng,
                world_size=env.world_size,
                loss=loss,
                best=best,
                labels=[[lb.index, lb.id, lb.display_name] for lb in labels],
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
        desc="fine-tune",
    )
    data = batches()
    loss_value = float("nan")
    final: dict[str, Any] = {}
    ddp_model.train()
    while step < cfg.max_steps:
        if sigkill_at_step is not None and step == sigkill_at_step:
            os.kill(os.getpid(), signal.SIGKILL)  # simulated crash (SIGKILL): no cleanup, no final save
        lr = set_lr(optimizer, step, cfg)  # per-group warm-up + cosine with floors (§4.4)
        batch = next(data)
        waveform = batch["waveform"].to(device, non_blocking=True)  # [B, S]
        num_samples = batch["num_samples"].to(device, non_blocking=True)  # [B]
        target = batch["target"].to(device, non_blocking=True)  # [B, C] multi-hot / one-hot
        generator = step_generator(aug_generator, cfg.seed, step, env.rank)
        with torch.no_grad():  # augmentation in EAT's order (§4.2)
            if cfg.roll_aug:
                waveform = roll_and_gain(waveform, num_samples, generator)
            fbank = frontend(waveform, num_samples)  # [B, 1, T, 128] fp32
            if cfg.spec_noise:
                fbank = spectrogram_noise_and_roll(fbank, generator)
            fbank, target, _ = mixup(fbank, target, cfg.mixup_alpha, cfg.mixup_prob, generator)
            if cfg.mask_ratio > 0:
                fbank = spec_augment(fbank, freq_width, time_width, generator)
        with autocast(device.type, cfg.precision):
            logits = ddp_model(fbank)  # [B, C]
        loss = classification_loss(logits.float(), target, cfg)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip or float("inf"))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        reporter.advance()

        if step % cfg.log_every == 0 or step == cfg.max_steps:
            loss_value = float(all_reduce_mean(loss.detach(), env).item())  # .item(): a device sync
            reporter.log(step, {"loss": loss_value, "lr": lr, "grad_norm": float(grad_norm.item())})
        if step % cfg.eval_every == 0 or step == cfg.max_steps:
            final = run_eval(step)
        if step % cfg.save_every == 0 or step == cfg.max_steps:
            save(step, loss_value)

    reporter.close()
    model_path = out_dir / "model.safetensors"
    if env.is_main:
        save_checkpoint(model_path, unwrap(model), frontend_cfg, labels, name=out_dir.name or "eat-finetuned")
    return {
        "step": step,
        "loss": loss_value,
        "final": final,
        "best": best,
        "model_path": str(model_path),
        "labels": labels,
        "model": unwrap(model),
    }


def _has_split(data_dir: Path, split: str) -> bool:
    return (data_dir / f"{split}.tsv").is_file() or (data_dir / split).is_dir()


__all__ = ["add_arguments", "build_classifier", "classification_loss", "resolve_config", "run", "train"]
