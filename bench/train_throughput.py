"""Training throughput of EAT pre-training and fine-tuning steps: clips/s and model-FLOPs utilisation.

Runs the same operations as one step of ``training/pretrain.py`` (front end, teacher targets, masks,
student + decoder, backward, AdamW, EMA) and of ``training/finetune.py`` (roll, front end, mixup,
SpecAugment, classifier, backward, AdamW) on random waveforms, so no data is needed.

MFU counts model FLOPs only (PaLM appendix B style: matmuls and attention, 2 FLOPs per MAC):
- pre-training: student on ``batch·clone_batch`` rows of ``1 + visible`` tokens and the CNN decoder
  on every grid position, each ×3 (forward + backward), plus one teacher forward on ``1 + N`` tokens;
- fine-tuning: classifier on ``1 + N`` tokens, ×3.
The log-mel front end, norms, the optimizer and the EMA update are left out (they are < 1 %).
Peak FLOP/s: ``--peak-tflops``, or a known device (H100 SXM bf16 dense 989 TFLOP/s); none for CPUs.

    python bench/train_throughput.py --device cpu --batch-size 2 --steps 3
    python bench/train_throughput.py --device cuda --dtype bf16 --batch-size 12 --steps 20 --compile
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from model.classifier import EATClassifier
from model.config import EATConfig, FrontendConfig, preset
from model.encoder import flops_per_token
from model.frontend import LogMelFrontend
from model.masking import block_mask_plan, inverse_block_mask
from model.pretraining import EATPretrainingModel, ema_update, make_teacher, teacher_targets
from training.augment import mixup, roll_and_gain, spec_augment
from training.distributed import autocast

# Dense bf16 peak FLOP/s by device-name substring (vendor datasheets).
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L4": 121.0, "A10G": 70.0}


def patch_embed_flops(cfg: EATConfig, num_tokens: int) -> float:
    return 2.0 * cfg.patch_size**2 * cfg.embed_dim * num_tokens


def decoder_flops(cfg: EATConfig, num_positions: int) -> float:
    """Grouped convs (k×k, C_in/groups inputs per output channel) then the output Linear, per position."""
    conv = 0.0
    in_dim = cfg.embed_dim
    for _ in range(cfg.decoder_layers):
        conv += 2.0 * (in_dim // cfg.decoder_groups) * cfg.decoder_kernel**2 * cfg.decoder_dim
        in_dim = cfg.decoder_dim
    return (conv + 2.0 * cfg.decoder_dim * cfg.embed_dim) * num_positions


def pretrain_step_flops(cfg: EATConfig, batch: int, clone_batch: int, num_tokens: int, num_visible: int) -> float:
    rows = batch * clone_batch
    student = rows * (1 + num_visible) * flops_per_token(cfg, 1 + num_visible) + patch_embed_flops(
        cfg, batch * num_tokens
    )
    decoder = decoder_flops(cfg, rows * num_tokens)
    teacher = batch * (1 + num_tokens) * flops_per_token(cfg, 1 + num_tokens) + patch_embed_flops(
        cfg, batch * num_tokens
    )
    return 3.0 * (student + decoder) + teacher


def finetune_step_flops(cfg: EATConfig, batch: int, num_tokens: int) -> float:
    encoder = batch * (1 + num_tokens) * flops_per_token(cfg, 1 + num_tokens) + patch_embed_flops(
        cfg, batch * num_tokens
    )
    head = 2.0 * batch * cfg.embed_dim * cfg.num_classes
    return 3.0 * (encoder + head)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_steps(step: Any, device: torch.device, warmup: int, steps: int) -> float:
    for _ in range(warmup):
        step()
    _sync(device)
    started = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    return (time.perf_counter() - started) / steps


def bench_pretrain(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    cfg = preset(args.preset)
    front = FrontendConfig(target_frames=args.target_frames)
    model = EATPretrainingModel(cfg, clone_batch=args.clone_batch).to(device)
    model.init_weights()
    teacher = make_teacher(model.encoder)
    frontend = LogMelFrontend(front).to(device)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.05, fused=device.type == "cuda"
    )
    forward = torch.compile(model) if args.compile else model
    grid = (args.target_frames // cfg.patch_size, cfg.freq_patches)
    generator = torch.Generator(device=device).manual_seed(0)
    waveform = torch.randn(args.batch_size, front.window_samples, device=device) * 0.1
    num_samples = torch.full((args.batch_size,), front.window_samples, device=device)

    def step() -> None:
        with torch.no_grad():
            fbank = frontend(waveform, num_samples)
            with autocast(device.type, args.dtype):
                targets = teacher_targets(teacher, fbank)
        mask = inverse_block_mask(args.batch_size * args.clone_batch, grid, generator=generator, device=device)
        with autocast(device.type, args.dtype):
            out = forward(fbank, mask, targets)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 4.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        ema_update(teacher, model.encoder, 0.9999)

    seconds = _time_steps(step, device, args.warmup_steps, args.steps)
    plan = block_mask_plan(grid)
    flops = pretrain_step_flops(cfg, args.batch_size, args.clone_batch, plan.num_cells, plan.num_visible)
    return _result(
        "pretrain", seconds, flops, args, {"clone_batch": args.clone_batch, "visible_tokens": plan.num_visible}
    )


def bench_finetune(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    cfg = preset(args.preset, num_classes=527, drop_path_rate=0.1)
    front = FrontendConfig(target_frames=args.target_frames)
    model = EATClassifier(cfg).to(device)
    model.init_weights()
    frontend = LogMelFrontend(front).to(device)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.05, fused=device.type == "cuda"
    )
    forward = torch.compile(model) if args.compile else model
    generator = torch.Generator(device=device).manual_seed(0)
    waveform = torch.randn(args.batch_size, front.window_samples, device=device) * 0.1
    num_samples = torch.full((args.batch_size,), front.window_samples, device=device)
    target = (torch.rand(args.batch_size, 527, device=device) < 0.01).float()

    def step() -> None:
        with torch.no_grad():
            fbank = frontend(roll_and_gain(waveform, num_samples, generator), num_samples)
            fbank, mixed, _ = mixup(fbank, target, 0.8, 0.9, generator)
            fbank = spec_augment(fbank, 25.6, 0.2 * args.target_frames, generator)
        with autocast(device.type, args.dtype):
            logits = forward(fbank)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits.float(), mixed, reduction="sum")
        (loss / mixed.sum().clamp_min(1e-6)).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    seconds = _time_steps(step, device, args.warmup_steps, args.steps)
    num_tokens = (args.target_frames // cfg.patch_size) * cfg.freq_patches
    return _result("finetune", seconds, finetune_step_flops(cfg, args.batch_size, num_tokens), args, {})


def _peak_flops(args: argparse.Namespace, device: torch.device) -> float | None:
    if args.peak_tflops:
        return args.peak_tflops * 1e12
    if device.type == "cuda" and args.dtype != "fp32":
        name = torch.cuda.get_device_name(device)
        for key, tflops in PEAK_TFLOPS.items():
            if key in name:
                return tflops * 1e12
    return None


def _result(kind: str, seconds: float, flops: float, args: argparse.Namespace, extra: dict[str, Any]) -> dict[str, Any]:
    achieved = flops / seconds
    peak = args.peak_flops
    return {
        "step": kind,
        "batch_size": args.batch_size,
        "seconds_per_step": seconds,
        "clips_per_s": args.batch_size / seconds,
        "audio_hours_per_s": args.batch_size * args.target_frames * 0.01 / 3600 / seconds,
        "model_tflops_per_step": flops / 1e12,
        "achieved_tflops": achieved / 1e12,
        "mfu": achieved / peak if peak else None,
        **extra,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["bf16", "fp32"], default=None, help="default: bf16 on GPU, fp32 on CPU")
    parser.add_argument("--preset", default="base", choices=["tiny", "base", "large"])
    parser.add_argument("--batch-size", type=int, default=12, help="clips per step (EAT: 12 per GPU)")
    parser.add_argument("--clone-batch", type=int, default=16)
    parser.add_argument("--target-frames", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=10, help="timed steps")
    parser.add_argument("--warmup-steps", type=int, default=2)
    parser.add_argument("--compile", action="store_true", help="torch.compile the student / classifier")
    parser.add_argument("--peak-tflops", type=float, default=None, help="device peak for MFU (TFLOP/s)")
    parser.add_argument("--which", choices=["pretrain", "finetune", "both"], default="both")
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).resolve().parent / "results" / "train_throughput.json"
    )
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    args.dtype = args.dtype or ("bf16" if device.type == "cuda" else "fp32")
    args.peak_flops = _peak_flops(args, device)
    torch.manual_seed(0)

    results = []
    if args.which in ("pretrain", "both"):
        results.append(bench_pretrain(args, device))
    if args.which in ("finetune", "both"):
        results.append(bench_finetune(args, device))
    report = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "device_type": device.type,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "dtype": args.dtype,
        "preset": args.preset,
        "target_frames": args.target_frames,
        "compile": args.compile,
        "peak_tflops": args.peak_flops / 1e12 if args.peak_flops else None,
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    for r in results:
        mfu = f"{100 * r['mfu']:.1f} %" if r["mfu"] is not None else "n/a (no peak given)"
        print(f"{r['step']:>9}: {r['clips_per_s']:.2f} clips/s, {r['achieved_tflops']:.3f} TFLOP/s, MFU {mfu}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
