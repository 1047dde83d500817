"""``eat demo``: synthetic scenes -> pre-train a tiny EAT -> fine-tune -> evaluate -> export, on a CPU.

It is the project's end-to-end smoke test and how a fresh machine gets a model to serve
(``make serve``). Many unlabelled clips feed self-supervised pre-training; a few labelled clips per
class then fine-tune two copies of the same tiny network with the same recipe: one from the
pre-trained student, one from a random init. Both are scored on the same held-out clips, and the
pre-trained one should win: that is what EAT's pre-training is for, at toy scale.

Everything is a function of ``--seed`` (data, init, masks, augmentation), so two runs on the same
machine give the same numbers. The recipes are sized for about 90 s on 2 quiet CPU cores (issue 13:
``make serve`` on a fresh machine waits for it, and CI runs it): 750 pre-training updates of 16
clips, then 250 fine-tuning updates, short enough that the pre-trained start still shows in the
score; it runs on one thread (``DemoPlan.torch_threads``). Outputs in ``--out``: ``model.safetensors``
(the fine-tuned classifier), ``model.onnx`` (its verified export), ``demo.json`` (mAPs and timings)
and ``work/`` (runs; the generated audio is deleted unless ``--keep-data``).
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

from eat.contract import SAMPLE_RATE
from training import finetune, pretrain
from training.config import FinetuneConfig, PretrainConfig, load_config
from training.data.synthetic import generate
from training.distributed import DistEnv, init_distributed

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DemoPlan:
    """Sizes of the demo's data; the training settings live in the demo_* recipes."""

    clip_seconds: float = 1.0  # 98 frames; the recipes keep the first 96 (a multiple of 16)
    num_unlabelled: int = 800  # pre-training clips (labels unused)
    num_labelled: int = 60  # fine-tuning clips: about 8 positives per class (1-3 events per clip)
    num_eval: int = 300
    pretrain_recipe: str = "demo_pretrain"
    finetune_recipe: str = "demo_finetune"
    # Intra-op threads while the demo runs (restored afterwards). The tiny model's ops are small, and on
    # a busy 2-core machine two threads spin-waited: 5 CPU-minutes without reaching pre-training update
    # 500, where one thread finished the whole demo in 100 CPU-seconds (issue 13: CI timed out on a busy
    # machine). One thread keeps the demo's time predictable.
    torch_threads: int = 1


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, default=Path("models/default"), help="output directory")
    parser.add_argument("--seed", type=int, default=0, help="seed for data, init, masks and augmentation")
    parser.add_argument("--keep-data", action="store_true", help="keep the generated audio in OUT/work/data")


def run(args: argparse.Namespace) -> int:
    summary = run_demo(args.out, seed=args.seed, keep_data=args.keep_data)
    print(
        f"demo done in {summary['seconds']['total']:.0f} s: eval mAP {summary['map_pretrained']:.3f} "
        f"pre-trained vs {summary['map_random_init']:.3f} from random init; "
        f"model {summary['files']['onnx'] or summary['files']['checkpoint']}"
    )
    return 0


def _time(seconds: dict[str, float], key: str, started: float) -> float:
    seconds[key] = round(time.perf_counter() - started, 2)
    return time.perf_counter()


def run_demo(
    out_dir: str | Path, seed: int = 0, plan: DemoPlan = DemoPlan(), keep_data: bool = False
) -> dict[str, Any]:
    """Run the whole demo into ``out_dir``; returns (and writes to ``demo.json``) the summary."""
    out_dir = Path(out_dir)
    work = out_dir / "work"
    if work.exists():  # a fresh start: stale runs would otherwise be resumed or mixed in
        shutil.rmtree(work)
    env = init_distributed({}, "auto")
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(plan.torch_threads)
    try:
        return _run(out_dir, work, env, seed, plan, keep_data)
    finally:
        torch.set_num_threads(previous_threads)


def _run(out_dir: Path, work: Path, env: DistEnv, seed: int, plan: DemoPlan, keep_data: bool) -> dict[str, Any]:
    seconds: dict[str, float] = {}
    started = t = time.perf_counter()

    # 1. Data: the labelled set's train clips are the first clips of the unlabelled set (same seed), and
    #    its eval clips come from a different stream, never seen in pre-training.
    unlabelled = generate(work / "data" / "unlabelled", plan.num_unlabelled, 1, plan.clip_seconds, seed).data_dir
    labelled = generate(work / "data" / "labelled", plan.num_labelled, plan.num_eval, plan.clip_seconds, seed).data_dir
    t = _time(seconds, "data", t)

    # 2. Self-supervised pre-training on the unlabelled clips.
    pre_cfg = load_config(PretrainConfig, plan.pretrain_recipe, [f"seed={seed}"])
    pre = pretrain.train(pre_cfg, unlabelled, work / "pretrain", env)
    t = _time(seconds, "pretrain", t)

    # 3. The same fine-tuning recipe from the pre-trained student and from a random init.
    ft_cfg = replace(
        load_config(FinetuneConfig, plan.finetune_recipe, [f"seed={seed}"]), init=str(Path(pre["model_path"]).resolve())
    )
    tuned = finetune.train(ft_cfg, labelled, work / "finetune", env)
    t = _time(seconds, "finetune", t)
    rand_cfg = load_config(FinetuneConfig, plan.finetune_recipe, [f"seed={seed}", "init=random"])
    baseline = finetune.train(rand_cfg, labelled, work / "finetune_random", env)
    t = _time(seconds, "finetune_random", t)

    # 4. The deliverables: our checkpoint and its verified ONNX export.
    checkpoint = out_dir / "model.safetensors"
    shutil.copyfile(tuned["model_path"], checkpoint)
    onnx_path: Path | None = out_dir / "model.onnx"
    try:
        from training.export import export_onnx

        # The window the model was trained on: exactly target_frames frames (0.975 s for 96).
        window_s = ft_cfg.frontend_config().window_samples / SAMPLE_RATE
        export_onnx(checkpoint, onnx_path, window_seconds=window_s, name=f"eat-demo-seed{seed}")
    except ImportError as err:  # export needs onnx/onnxruntime, which a training-only install may lack
        logger.warning("skipping the ONNX export: %s", err)
        onnx_path = None
    t = _time(seconds, "export", t)
    if not keep_data:
        shutil.rmtree(work / "data")
    seconds["total"] = round(time.perf_counter() - started, 2)

    metric = "mAP"
    summary = {
        "seed": seed,
        "device": env.device,
        "torch_threads": torch.get_num_threads(),
        "plan": asdict(plan),
        "map_pretrained": tuned["final"][metric],
        "map_random_init": baseline["final"][metric],
        "pretrained_wins": tuned["final"][metric] > baseline["final"][metric],
        "eval_pretrained": tuned["final"],
        "eval_random_init": baseline["final"],
        "pretrain_loss": pre["loss"],
        "seconds": seconds,
        "files": {"checkpoint": str(checkpoint), "onnx": str(onnx_path) if onnx_path else None},
        "recipes": {"pretrain": pre_cfg.to_dict(), "finetune": ft_cfg.to_dict()},
    }
    (out_dir / "demo.json").write_text(json.dumps(summary, indent=2) + "\n")
    logger.info(
        "demo: mAP %.3f pre-trained vs %.3f random init (%.0f s)",
        summary["map_pretrained"],
        summary["map_random_init"],
        seconds["total"],
    )
    return summary


__all__ = ["DemoPlan", "add_arguments", "run", "run_demo"]
