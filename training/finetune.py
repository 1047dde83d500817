"""``eat finetune``: supervised fine-tuning of an EAT classifier (eat-reference.md §4), top to bottom.

One update: per micro-batch (``accum_steps`` of them), waveforms -> roll + gain -> log-mel on the
device -> [SPC noise + time roll] -> mixup -> SpecAugment -> encoder + CLS head -> loss -> backward;
then [clip] -> AdamW with layer-wise LR decay and per-group cosine floors. As fairseq, rank 0 scores
the eval split (mAP or accuracy) after every epoch, every ``eval_every`` updates and after the last,
and keeps the best weights by the task's metric. Augmentation randomness comes from a generator seeded
by (seed, micro-batch, rank), so a resumed run draws the same masks and mixes as the uninterrupted one.
What both loops share (arguments, config, loader, resume, DDP, saving) is in ``training.loop``.

Resuming never reads ``init`` again: the checkpoint holds the architecture and the weights, so a run
resumes even after the pre-trained file it started from has moved.

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

from model.checkpoints import load_checkpoint, load_weights, save_checkpoint
from model.classifier import EATClassifier
from model.config import EATConfig, Label
from model.encoder import flops_per_token
from model.frontend import LogMelFrontend
from training import loop
from training.augment import mixup, roll_and_gain, spec_augment, spec_augment_widths, spectrogram_noise_and_roll
from training.checkpoint import unwrap
from training.config import FinetuneConfig
from training.data.dataset import AudioDataset
from training.data.sampler import ResumableSampler, make_loader
from training.data.splits import load_split
from training.distributed import DistEnv, Reporter, all_reduce_mean, autocast, barrier, init_distributed, shutdown
from training.evaluate import evaluate
from training.schedule import build_adamw, param_groups, set_lr, step_generator

logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    loop.add_arguments(parser, init_help="checkpoint to start from (ours, fairseq .pt, HF folder) or 'random'")


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
    cfg, state = loop.resolve_config(FinetuneConfig, "finetune", recipe, overrides, out_dir, resume)
    if state is not None:
        return cfg, state
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


def classifier_flops(cfg: EATConfig, num_clips: int, num_tokens: int) -> float:
    """Model FLOPs of one micro-batch: forward + backward (3× forward) of the encoder on every patch."""
    return 3 * num_clips * (1 + num_tokens) * flops_per_token(cfg, 1 + num_tokens)


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
    batches = loop.Batches(loop.make_train_loader(dataset, sampler, cfg, device), device)

    torch.manual_seed(cfg.seed)
    # Resuming takes the checkpoint's architecture (its weights come below): ``cfg.init`` may have moved.
    model = build_classifier(cfg, len(labels)) if state is None else _resumed_classifier(state, cfg, len(labels))
    model.to(device)
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
        step = loop.restore_state(state, env, model=model, optimizer=optimizer, batches=batches, out_dir=out_dir)
        best = dict(state["best"])

    ddp_model = loop.wrap_model(model, cfg, env)
    aug_generator = torch.Generator(device=device)
    freq_width, time_width = spec_augment_widths(cfg.mask_ratio, cfg.target_frames, frontend_cfg.num_mel_bins)
    eval_loader = None
    if eval_split is not None and env.is_main:
        eval_data = AudioDataset(eval_split, clip_samples=frontend_cfg.window_samples, target="multi_hot")
        eval_loader = make_loader(
            eval_data, cfg.eval_batch_size, ResumableSampler(len(eval_data), shuffle=False), cfg.num_workers
        )
        # Its own worker-seed generator: an evaluation must not draw from the global RNG, or the training
        # stream after it (drop path) would depend on how many evaluations ran.
        eval_loader.loader.generator = torch.Generator().manual_seed(cfg.seed)
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

    reporter = Reporter(
        env,
        out_dir,
        total_steps=cfg.max_steps,
        start_step=step,
        clips_per_step=cfg.batch_size * cfg.accum_steps * env.world_size,
        tensorboard=cfg.tensorboard,
        desc="fine-tune",
        flops_per_step=cfg.accum_steps * classifier_flops(model.cfg, cfg.batch_size, _num_patches(cfg, model.cfg)),
        peak_flops=loop.peak_flops(device, cfg),
    )
    loss_value = float("nan")
    final: dict[str, Any] = {}
    epochs_evaluated = batches.epochs_done
    ddp_model.train()
    while step < cfg.max_steps:
        if sigkill_at_step is not None and step == sigkill_at_step:
            os.kill(os.getpid(), signal.SIGKILL)  # simulated crash (SIGKILL): no cleanup, no final save
        lr = set_lr(optimizer, step, cfg)  # per-group warm-up + cosine with floors (§4.4)
        loss_sum = torch.zeros((), device=device)
        for micro in range(cfg.accum_steps):
            batch = batches.next()
            waveform, num_samples = batch["waveform"], batch["num_samples"]  # [B, S], [B]
            target = batch["target"]  # [B, C] multi-hot / one-hot
            generator = step_generator(aug_generator, cfg.seed, step * cfg.accum_steps + micro, env.rank)
            with torch.no_grad():  # augmentation in EAT's order (§4.2)
                if cfg.roll_aug:
                    waveform = roll_and_gain(waveform, num_samples, generator)
                fbank = frontend(waveform, num_samples)  # [B, 1, T, 128] fp32
                if cfg.spec_noise:
                    fbank = spectrogram_noise_and_roll(fbank, generator)
                fbank, target, _ = mixup(fbank, target, cfg.mixup_alpha, cfg.mixup_prob, generator)
                if cfg.mask_ratio > 0:
                    fbank = spec_augment(fbank, freq_width, time_width, generator)
            with loop.micro_step(ddp_model, micro, cfg.accum_steps):
                with autocast(device.type, cfg.precision):
                    logits = ddp_model(fbank)  # [B, C]
                if not loop.is_last(step, micro, cfg):
                    batches.prefetch()  # the loader's work overlaps the backward pass
                # Each micro-batch is normalised on its own (as each rank is under DDP): with BCE over
                # the positive label mass, accumulation differs from one big batch in that divisor only.
                loss = classification_loss(logits.float(), target, cfg)
                (loss / cfg.accum_steps).backward()
            loss_sum += loss.detach()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip or float("inf"))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        reporter.advance()

        if loop.due(step, cfg.log_every, cfg):
            loss_value = float(all_reduce_mean(loss_sum / cfg.accum_steps, env).item())  # .item(): a device sync
            reporter.log(step, {"loss": loss_value, "lr": lr, "grad_norm": float(grad_norm.item())})
        epoch_ended = cfg.eval_at_epoch_end and batches.epochs_done > epochs_evaluated
        epochs_evaluated = batches.epochs_done
        if loop.due(step, cfg.eval_every, cfg) or epoch_ended:
            final = run_eval(step)
        if loop.due(step, cfg.save_every, cfg):
            loop.save_state(
                out_dir,
                env,
                kind="finetune",
                step=step,
                cfg=cfg,
                model=model,
                optimizer=optimizer,
                batches=batches,
                arch=model.cfg.to_dict(),
                loss=loss_value,
                best=best,
                labels=[[lb.index, lb.id, lb.display_name] for lb in labels],
            )

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


def _resumed_classifier(state: dict[str, Any], cfg: FinetuneConfig, num_classes: int) -> EATClassifier:
    """An (uninitialised) classifier shaped as the checkpoint's; checkpoints from before the
    architecture was saved in them fall back to reading ``cfg.init``."""
    if "arch" not in state:
        return build_classifier(cfg, num_classes)
    arch = EATConfig.from_dict(state["arch"])
    if arch.num_classes != num_classes:
        raise ValueError(f"the checkpoint's model has {arch.num_classes} classes, the data {num_classes}")
    return EATClassifier(arch)


def _num_patches(cfg: FinetuneConfig, arch: EATConfig) -> int:
    return cfg.target_frames // arch.patch_size * arch.freq_patches


def _has_split(data_dir: Path, split: str) -> bool:
    return (data_dir / f"{split}.tsv").is_file() or (data_dir / split).is_dir()


__all__ = [
    "add_arguments",
    "build_classifier",
    "classification_loss",
    "classifier_flops",
    "resolve_config",
    "run",
    "train",
]
