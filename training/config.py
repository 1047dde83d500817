"""Training configs: one frozen dataclass per loop, filled from a YAML recipe plus ``--set`` overrides.

A recipe sets only what differs from the defaults below (which are EAT-base's published numbers,
eat-reference.md §3.8 and §4.4-4.5). Every key is type-checked and an unknown key is an error, so a
typo never silently trains with a default (STYLE.md §2). The resolved config is logged once and saved
in every training checkpoint as plain types.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

import yaml

from model.config import NORM_STATS, PRESET_NAMES, EATConfig, FrontendConfig, preset

RECIPES_DIR = Path(__file__).resolve().parent / "recipes"


class ConfigError(ValueError):
    """A recipe or override the loops cannot run with; the CLI prints it as one line."""


@dataclass(frozen=True)
class CommonConfig:
    """Fields both loops share: model, audio, optimiser basics and runtime."""

    # Model: a preset from model/config.py plus per-field overrides (``--set model.depth=2``).
    model_preset: str = "base"
    model: dict[str, Any] = field(default_factory=dict)
    # Audio front end (reference §1.3-1.4): frames per clip and which normalisation statistics.
    target_frames: int = 1024
    norm: Literal["audioset", "esc50", "spcv2"] = "audioset"
    # Data: clips per rank per micro-batch. An update sums the gradients of ``accum_steps`` micro-batches
    # (DDP syncs on the last only), so its global batch is batch_size × accum_steps × ranks: EAT's 48
    # clips per update (§3.1) fit 1 GPU as batch_size 12 × accum_steps 4.
    batch_size: int = 12
    accum_steps: int = 1
    num_workers: int = 2
    # Optimiser (fairseq Adam = AdamW-style decoupled decay, §3.8). The original decays every
    # parameter (the 1-D exemption was a no-op there); ``exempt_1d_from_decay`` is our opt-in fix.
    lr: float = 5e-4
    min_lr: float = 0.0
    warmup_steps: int = 53_333
    max_steps: int = 400_000
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.05
    exempt_1d_from_decay: bool = False
    grad_clip: float = 4.0  # global L2 norm; 0 = off
    # Runtime.
    seed: int = 1
    device: str = "auto"  # auto | cpu | cuda | cuda:N (torchrun picks cuda:LOCAL_RANK)
    precision: Literal["auto", "bf16", "fp32"] = "auto"  # auto = bf16 autocast on GPU, fp32 on CPU
    compile: bool = False
    log_every: int = 200
    save_every: int = 10_000
    tensorboard: bool = True
    # Dense peak of one accelerator in TFLOP/s for the MFU in the log line; 0 = look the GPU up in
    # training.loop.BF16_PEAK_FLOPS (no MFU on the CPU or an unlisted GPU).
    peak_tflops: float = 0.0

    def __post_init__(self) -> None:
        if self.model_preset not in PRESET_NAMES:
            raise ConfigError(f"model_preset must be one of {PRESET_NAMES}, got {self.model_preset!r}")
        for name in ("batch_size", "accum_steps", "max_steps", "log_every", "save_every"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        if not 0 <= self.warmup_steps <= self.max_steps:
            raise ConfigError(f"warmup_steps must be in [0, max_steps], got {self.warmup_steps}")
        if self.lr <= 0 or self.min_lr < 0:
            raise ConfigError("lr must be positive and min_lr non-negative")
        if self.num_workers < 0 or self.grad_clip < 0 or self.weight_decay < 0 or self.peak_tflops < 0:
            raise ConfigError("num_workers, grad_clip, weight_decay and peak_tflops must be non-negative")
        if not all(0.0 <= b < 1.0 for b in self.betas):
            raise ConfigError(f"betas must be in [0, 1), got {self.betas}")
        try:
            self.frontend_config()
            self.eat_config()
        except (ValueError, TypeError) as err:
            raise ConfigError(f"invalid model/audio settings: {err}") from err

    def eat_config(self, num_classes: int = 0) -> EATConfig:
        return preset(self.model_preset, **{**self.model, "num_classes": num_classes})

    def frontend_config(self) -> FrontendConfig:
        return FrontendConfig.preset(self.norm, target_frames=self.target_frames)

    def to_dict(self) -> dict[str, Any]:
        """Plain YAML/JSON/``weights_only``-safe types (tuples become lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}


@dataclass(frozen=True)
class PretrainConfig(CommonConfig):
    """Self-supervised EAT pre-training (reference §3); defaults = EAT-base on AS-2M."""

    # Clone batch and inverse block masking (§3.1-3.2).
    clone_batch: int = 16
    mask_prob: float = 0.8
    mask_prob_adjust: float = 0.07
    mask_length: int = 5
    mask_noise_std: float = 0.01
    # Teacher targets (§3.4): average of the top-k blocks' FFN outputs; 0 = all blocks.
    average_top_k_layers: int = 0
    # UFO loss (§3.6): "original" reproduces the per-GPU sum of the utterance term.
    utterance_weight: float = 1.0
    loss_reduction: Literal["original", "mean"] = "original"
    # EMA teacher (§3.7): linear anneal, constant afterwards.
    ema_decay: float = 0.9998
    ema_end_decay: float = 0.99999
    ema_anneal_end_step: int = 100_000

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.clone_batch < 1:
            raise ConfigError("clone_batch must be >= 1")
        if not 0.0 < self.mask_prob < 1.0:
            raise ConfigError(f"mask_prob must be in (0, 1), got {self.mask_prob}")
        if self.mask_length < 1:
            raise ConfigError("mask_length must be >= 1")
        if not 0.0 <= self.ema_decay <= self.ema_end_decay <= 1.0:
            raise ConfigError("need 0 <= ema_decay <= ema_end_decay <= 1")
        if self.average_top_k_layers < 0 or self.average_top_k_layers > self.eat_config().depth:
            raise ConfigError("average_top_k_layers must be in [0, depth] (0 = all)")


@dataclass(frozen=True)
class FinetuneConfig(CommonConfig):
    """Supervised fine-tuning (reference §4); defaults = EAT-base on AS-20K."""

    model: dict[str, Any] = field(default_factory=lambda: {"drop_path_rate": 0.1})
    batch_size: int = 48
    lr: float = 5e-5
    min_lr: float = 1e-6
    warmup_steps: int = 4_000
    max_steps: int = 40_000
    grad_clip: float = 0.0  # fairseq's default clip_norm 0: the fine-tuning scripts do not clip
    layer_decay: float = 0.65  # blocks only: 0.65^(depth - i) (§4.4)
    # Loss (§4.3): BCE for multi-label (and SPC-2), CE for single-label tasks.
    loss: Literal["bce", "ce"] = "bce"
    bce_normalizer: Literal["positives", "batch"] = "positives"
    label_smoothing: float = 0.0
    # Augmentation (§4.2), in this order: roll (+gain) -> fbank -> [SPC noise] -> mixup -> SpecAugment.
    roll_aug: bool = True
    spec_noise: bool = False
    mixup_alpha: float = 0.8  # 0 = off
    mixup_prob: float = 0.9
    mask_ratio: float = 0.2  # SpecAugment widths: 128·r bins, target_frames·r frames; 0 = off
    # Sampling (§4.6): a weights file in the data directory draws ``num_draws`` clips per epoch.
    weights_file: str = ""
    num_draws: int = 0
    # Evaluation and best-checkpoint tracking (§4.7). As fairseq: after every epoch (on by default;
    # the original's epochs are ≈410 / 2,083 / 33 / 331 updates on AS-20K / AS-2M / ESC-50 / SPC-2),
    # every ``eval_every`` updates, and after the last update. The best score by ``metric`` is kept.
    metric: Literal["map", "accuracy"] = "map"
    eval_every: int = 1_000
    eval_at_epoch_end: bool = True
    eval_batch_size: int = 32
    init: str = "random"  # a checkpoint path (ours, fairseq .pt, HF folder) or "random"

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 < self.layer_decay <= 1.0:
            raise ConfigError("layer_decay must be in (0, 1]")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ConfigError("label_smoothing must be in [0, 1)")
        if self.mixup_alpha < 0 or not 0.0 <= self.mixup_prob <= 1.0:
            raise ConfigError("mixup_alpha must be >= 0 and mixup_prob in [0, 1]")
        if self.mixup_alpha > 0 and self.batch_size % 2:
            raise ConfigError("mixup pairs each clip with the reversed batch: batch_size must be even")
        if not 0.0 <= self.mask_ratio < 1.0:
            raise ConfigError("mask_ratio must be in [0, 1)")
        if self.eval_every <= 0 or self.eval_batch_size <= 0 or self.num_draws < 0:
            raise ConfigError("eval_every and eval_batch_size must be positive, num_draws >= 0")
        if self.weights_file and self.num_draws == 0:
            raise ConfigError("weights_file needs num_draws > 0 (clips drawn per epoch)")


C = TypeVar("C", bound=CommonConfig)


def _coerce(name: str, value: Any, hint: Any) -> Any:
    """Check/convert one value against a field's type hint; YAML gives '5e-4' as a string."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{name} must be one of {list(args)}, got {value!r}")
        return value
    if origin in (Union, types.UnionType):
        for arg in args:
            try:
                return _coerce(name, value, arg)
            except ConfigError:
                continue
        raise ConfigError(f"{name}: {value!r} does not match {hint}")
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        raise ConfigError(f"{name} must be true or false, got {value!r}")
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise ConfigError(f"{name} must be an integer, got {value!r}")
        try:
            return int(value)
        except ValueError:
            raise ConfigError(f"{name} must be an integer, got {value!r}") from None
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ConfigError(f"{name} must be a number, got {value!r}")
        try:
            return float(value)
        except ValueError:
            raise ConfigError(f"{name} must be a number, got {value!r}") from None
    if hint is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{name} must be a string, got {value!r}")
        return str(value)
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{name} must be a list of {len(args)} values, got {value!r}")
        return tuple(_coerce(f"{name}[{i}]", v, a) for i, (v, a) in enumerate(zip(value, args, strict=False)))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{name} must be a mapping, got {value!r}")
        return dict(value)
    raise ConfigError(f"{name}: unsupported field type {hint}")  # our bug, but say so clearly


def config_from_dict(cls: type[C], values: dict[str, Any]) -> C:
    """Build ``cls`` from plain values, refusing unknown keys and ill-typed values."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(values) - set(names))
    if unknown:
        raise ConfigError(f"unknown {cls.__name__} keys: {unknown} (known: {', '.join(names)})")
    kwargs = {k: _coerce(k, v, hints[k]) for k, v in values.items()}
    if "model" in kwargs:  # check model overrides against EATConfig's own fields
        known = {f.name for f in dataclasses.fields(EATConfig)} - {"num_classes"}
        bad = sorted(set(kwargs["model"]) - known)
        if bad:
            raise ConfigError(f"unknown model keys: {bad} (known: {', '.join(sorted(known))})")
    return cls(**kwargs)


def recipe_path(name_or_path: str) -> Path:
    """A recipe file path, or a name of ``training/recipes/NAME.yaml``."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise ConfigError(f"recipe file not found: {path}")
        return path
    candidate = RECIPES_DIR / f"{name_or_path}.yaml"
    if not candidate.is_file():
        raise ConfigError(f"unknown recipe {name_or_path!r}; built-in recipes: {', '.join(list_recipes())}")
    return candidate


def list_recipes() -> list[str]:
    return sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))


def read_recipe(name_or_path: str) -> dict[str, Any]:
    path = recipe_path(name_or_path)
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"recipe {path} is not valid YAML: {err}") from err
    if not isinstance(values, dict):
        raise ConfigError(f"recipe {path} must be a mapping of key: value")
    return values


def apply_overrides(values: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``key=value`` strings (``model.depth=2`` sets inside the ``model`` mapping)."""
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in values.items()}
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"--set expects key=value, got {item!r}")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        parts = key.split(".")
        if len(parts) == 1:
            out[key] = value
        elif len(parts) == 2:
            section = out.setdefault(parts[0], {})
            if not isinstance(section, dict):
                raise ConfigError(f"--set {key}: {parts[0]} is not a mapping")
            section[parts[1]] = value
        else:
            raise ConfigError(f"--set {key}: at most one level of nesting (e.g. model.depth)")
    return out


def load_config(cls: type[C], recipe: str, overrides: list[str] | None = None) -> C:
    """Defaults <- recipe file <- ``--set`` overrides, validated."""
    values = read_recipe(recipe)
    recipe_model = values.get("model") or {}
    if not isinstance(recipe_model, dict):
        raise ConfigError("recipe key 'model' must be a mapping of EATConfig fields")
    # Recipes and overrides change model fields on top of the loop's default model mapping.
    model_field = next(f for f in dataclasses.fields(cls) if f.name == "model")
    values["model"] = {**model_field.default_factory(), **recipe_model}  # type: ignore[misc]
    return config_from_dict(cls, apply_overrides(values, overrides or []))


__all__ = [
    "NORM_STATS",
    "RECIPES_DIR",
    "CommonConfig",
    "ConfigError",
    "FinetuneConfig",
    "PretrainConfig",
    "apply_overrides",
    "config_from_dict",
    "list_recipes",
    "load_config",
    "read_recipe",
    "recipe_path",
]
