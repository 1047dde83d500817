"""Metrics (mAP, accuracy), a batched evaluation pass, and the ``eat evaluate`` command.

mAP follows EAT (reference §4.7): scores and targets of the whole split are concatenated, scikit-learn's
``average_precision_score`` runs per class, and the mean skips classes without a positive clip. (EAT's
fairseq validation also reports 0 below 100 clips; we always compute it.)

Classes without a positive clip, as the original's scikit-learn counts them: before scikit-learn 1.1,
``average_precision_score`` on an all-negative column divided 0 by 0 and returned NaN, and EAT's
NaN-ignoring mean left the class out. Since 1.1 (scikit-learn PR #19085) it returns 0 with a warning,
which would pull the mean down with every absent class (on AudioSet's eval set, a few rare classes;
on small validation splits, many). We call it only for classes that have a positive and leave the
others out (NaN in ``per_class_ap``), so the mAP is the original's whatever scikit-learn is installed.

Accuracy is the fraction of clips whose arg-max logit is the arg-max target (ESC-50 / SPC-2 style).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import average_precision_score
from torch import nn

from model.checkpoints import build_model, load_checkpoint
from model.config import Label
from model.frontend import LogMelFrontend
from training.data.dataset import AudioDataset
from training.data.manifest import read_labels_csv
from training.data.sampler import ResumableLoader, ResumableSampler, make_loader
from training.data.splits import load_split
from training.data.windows import window_loader

logger = logging.getLogger(__name__)

AP_NAME_WIDTH = 50  # EAT's results/*.txt: display name padded to 50 characters (§8.3)


def _numpy(x: torch.Tensor | np.ndarray) -> np.ndarray:
    return x.detach().cpu().double().numpy() if isinstance(x, torch.Tensor) else np.asarray(x, dtype=np.float64)


def mean_average_precision(
    scores: torch.Tensor | np.ndarray, targets: torch.Tensor | np.ndarray
) -> tuple[float, np.ndarray]:
    """(mAP, per-class AP [C]) for scores [N, C] and 0/1 targets [N, C] (soft targets: >= 0.5 is positive).

    Classes without a positive clip get AP NaN and are left out of the mean (NaN when no class has one).
    """
    s, t = _numpy(scores), _numpy(targets) >= 0.5
    if s.ndim != 2 or s.shape != t.shape:
        raise ValueError(f"scores {s.shape} and targets {t.shape} must both be [N, C]")
    per_class = np.full(s.shape[1], np.nan)
    for c in np.flatnonzero(t.any(axis=0)):
        per_class[c] = average_precision_score(t[:, c], s[:, c])
    has_positive = ~np.isnan(per_class)
    return (float(per_class[has_positive].mean()) if has_positive.any() else float("nan")), per_class


def accuracy(logits: torch.Tensor | np.ndarray, targets: torch.Tensor | np.ndarray) -> float:
    """Fraction in [0, 1] of rows whose arg-max logit equals the target class.

    targets: class indices [N] or (multi/one-hot, possibly mixed) vectors [N, C] (arg-max taken).
    """
    predicted = _numpy(logits).argmax(axis=1)
    t = _numpy(targets)
    truth = t.argmax(axis=1) if t.ndim == 2 else t.astype(np.int64)
    if predicted.shape != truth.shape:
        raise ValueError(f"{predicted.shape[0]} predictions for {truth.shape[0]} targets")
    return float((predicted == truth).mean()) if len(truth) else float("nan")


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: Iterable[dict[str, torch.Tensor]],
    frontend: nn.Module,
    device: torch.device | str,
    multi_label: bool,
    autocast_dtype: torch.dtype | None = None,
) -> dict[str, Any]:
    """Run ``model`` (fbank -> logits) over ``loader``'s batches; the front end runs on ``device``.

    ``autocast_dtype`` (e.g. ``torch.bfloat16`` on a GPU) runs the model, not the front end, under
    autocast: the front end's power spectra need float32.

    Returns ``mAP``, ``accuracy``, ``loss`` (BCE summed over classes for multi-label, else cross-entropy;
    mean over clips), ``num_clips`` and ``per_class_ap`` (numpy [C]). Scores are sigmoids for
    multi-label models, softmax otherwise. The model's train/eval mode is restored afterwards.
    """
    device = torch.device(device)
    if isinstance(loader, ResumableLoader):
        loader.restart()  # a pass broken off earlier must not shorten this one
    was_training = model.training
    model.eval()
    frontend = frontend.to(device).eval()
    all_logits, all_targets, all_clips = [], [], []
    try:
        for batch in loader:
            waveform = batch["waveform"].to(device, non_blocking=True)  # [B, S]
            num_samples = batch["num_samples"].to(device, non_blocking=True)  # [B]
            fbank = frontend(waveform, num_samples)  # [B, 1, T, 128], float32
            with torch.autocast(device.type, dtype=autocast_dtype or torch.float32,
                                enabled=autocast_dtype is not None):
                logits = model(fbank).float()  # [B, C]
            if logits.dim() != 2:
                raise ValueError(f"the model returned shape {tuple(logits.shape)}, not logits [B, C]")
            target = batch["target"].to(device)
            if not target.is_floating_point():  # class indices -> one-hot
                target = F.one_hot(target, logits.shape[1]).float()
            if target.shape != logits.shape:
                raise ValueError(f"targets {tuple(target.shape)} do not match logits {tuple(logits.shape)}")
            all_logits.append(logits.cpu())
            all_targets.append(target.float().cpu())
            if "clip" in batch:
                all_clips.append(batch["clip"])
    finally:
        model.train(was_training)
    if not all_logits:
        raise ValueError("evaluation data is empty")
    logits, targets = torch.cat(all_logits), torch.cat(all_targets)  # [N, C]
    if all_clips:  # rows are windows (training.data.windows): each clip's logits are its windows' max
        logits, targets = max_over_windows(logits, targets, torch.cat(all_clips))
    if multi_label:
        scores = torch.sigmoid(logits)
        loss = F.binary_cross_entropy_with_logits(logits, targets, reduction="sum") / len(logits)
    else:
        scores = torch.softmax(logits, dim=1)
        loss = F.cross_entropy(logits, targets)
    m_ap, per_class = mean_average_precision(scores, targets)
    return {
        "mAP": m_ap,
        "accuracy": accuracy(logits, targets),
        "loss": float(loss),
        "num_clips": len(logits),
        "per_class_ap": per_class,
    }


def max_over_windows(
    logits: torch.Tensor, targets: torch.Tensor, clips: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Window rows [N, C] -> clip rows [K, C], the max logit per class, as the service scores a clip
    (the max of sigmoids is the sigmoid of the max). A clip's windows must be consecutive rows."""
    _, inverse = torch.unique_consecutive(clips, return_inverse=True)  # a clip's windows are consecutive
    num_clips = int(inverse.max()) + 1
    out = torch.full((num_clips, logits.shape[1]), -torch.inf, dtype=logits.dtype)
    out = out.scatter_reduce(0, inverse[:, None].expand_as(logits), logits, reduce="amax")
    clip_targets = torch.zeros(num_clips, targets.shape[1], dtype=targets.dtype).index_copy(0, inverse, targets)
    return out, clip_targets


def write_ap_log(path: str | Path, labels: Sequence[Label], per_class_ap: np.ndarray) -> None:
    """EAT's per-class results format (§8.3): a header, then name padded to 50 chars + AP with 4 decimals.

    Classes without a positive clip are written as ``nan``.
    """
    lines = [f"{'Class':<{AP_NAME_WIDTH}} AP"]
    lines += [
        f"{(label.display_name or label.id):<{AP_NAME_WIDTH}} {ap:.4f}"
        for label, ap in zip(labels, per_class_ap, strict=True)
    ]
    Path(path).write_text("\n".join(lines) + "\n", encoding="utf-8")


# ------------------------------------------------------------------------------------- the command


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="our .safetensors, an official fairseq .pt or a Hugging Face folder")
    parser.add_argument("--data", required=True, type=Path,
                        help="data directory: EAT manifests (<split>.tsv/.lbl + labels.csv) or class folders")
    parser.add_argument("--split", default="eval", help="split name (default: eval)")
    parser.add_argument("--labels", type=Path, default=None,
                        help="label CSV (index,id,display_name) mapping .lbl keys to the model's outputs "
                             "(default: the checkpoint's labels, else the data directory's labels.csv)")
    parser.add_argument("--batch-size", type=int, default=32, help="clips per batch (default: 32, as EAT)")
    parser.add_argument("--num-workers", type=int, default=0, help="data loading processes (default: 0)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ... (default: auto)")
    parser.add_argument("--target-frames", type=int, default=None,
                        help="front-end frames (default: the checkpoint's, e.g. 1024 for 10 s)")
    parser.add_argument("--task", choices=("auto", "multi-label", "single-label"), default="auto",
                        help="sigmoid + mAP or softmax + accuracy focus (auto: single-label when every clip "
                             "has exactly one label)")
    parser.add_argument("--min-samples", type=int, default=10_000,
                        help="drop clips shorter than this many samples, as EAT's training-time validation "
                             "does (EAT's standalone eval.py keeps them: pass 0)")
    parser.add_argument("--aggregate", choices=("first", "max"), default="first",
                        help="first: score each clip's first window, as EAT evaluates (default); max: cover the "
                             "whole clip with windows and take the max, as the service and `eat predict` do")
    parser.add_argument("--ap-log", type=Path, default=None, help="write per-class AP in EAT's results format")
    parser.add_argument("--json", type=Path, default=None, help="write the metrics as JSON")


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name!r} is not a torch device (auto, cpu, cuda, cuda:1, ...)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available on this machine")
    return device


def run(args: argparse.Namespace) -> int:
    if args.batch_size < 1:
        raise ValueError("--batch-size must be at least 1")
    device = _device(args.device)
    loaded = load_checkpoint(args.checkpoint)
    if not loaded.has_head:
        raise ValueError(f"{args.checkpoint} has no classifier head (a pre-trained encoder); fine-tune it first")
    labels = read_labels_csv(args.labels) if args.labels else loaded.labels
    manifest = load_split(args.data, args.split, labels=labels, min_samples=args.min_samples)
    if manifest.num_classes != loaded.config.num_classes:
        raise ValueError(
            f"the data has {manifest.num_classes} classes but the model outputs {loaded.config.num_classes}; "
            "pass --labels with the model's label CSV"
        )
    frontend_cfg = loaded.frontend
    if args.target_frames is not None:
        frontend_cfg = dataclasses.replace(frontend_cfg, target_frames=args.target_frames)
    multi_label = not manifest.is_single_label if args.task == "auto" else args.task == "multi-label"

    if args.aggregate == "max":  # whole clips in windows of exactly target_frames frames (the twin's rule)
        loader = window_loader(manifest, frontend_cfg.window_samples, args.batch_size, args.num_workers)
    else:
        dataset = AudioDataset(manifest, clip_samples=frontend_cfg.window_samples)
        sampler = ResumableSampler(len(dataset), shuffle=False)
        loader = make_loader(dataset, args.batch_size, sampler, args.num_workers, pin_memory=device.type == "cuda")
    model = build_model(loaded).to(device)
    logger.info("evaluating %s on %d clips of %s/%s (%s, %s, %s)", loaded.name, len(manifest), args.data,
                args.split, "multi-label" if multi_label else "single-label", device, args.aggregate)
    result = evaluate(model, loader, LogMelFrontend(frontend_cfg), device, multi_label)

    num_scored = int(np.count_nonzero(~np.isnan(result["per_class_ap"])))
    print(f"clips: {result['num_clips']}  classes: {manifest.num_classes} ({num_scored} with positives)")
    print(f"mAP: {result['mAP']:.4f}")
    print(f"accuracy: {100 * result['accuracy']:.2f}%")
    print(f"loss: {result['loss']:.4f}")
    if args.ap_log:
        write_ap_log(args.ap_log, manifest.labels, result["per_class_ap"])
        print(f"per-class AP written to {args.ap_log}")
    if args.json:
        def finite(x: float) -> float | None:  # JSON has no NaN
            return None if np.isnan(x) else float(x)

        summary: dict[str, Any] = {k: v for k, v in result.items() if k != "per_class_ap"}
        summary["mAP"] = finite(result["mAP"])
        summary["accuracy"] = finite(result["accuracy"])
        summary["per_class_ap"] = [finite(ap) for ap in result["per_class_ap"]]
        summary.update(checkpoint=str(args.checkpoint), split=args.split, multi_label=multi_label)
        args.json.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return 0
