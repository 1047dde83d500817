"""Checkpoints: our own format, and importers for the official fairseq and Hugging Face files.

Our format is one ``.safetensors`` file: the state dict (``encoder.*``, optional ``fc_norm.*``/``head.*``
and ``decoder.*``) plus header metadata holding the architecture, the front end, the labels, a name
and the sha256 of the file it was converted from. Safetensors cannot run code, unlike a pickle.

Official fairseq ``.pt`` files are pickles. They are read with torch's ``weights_only`` unpickler;
the few harmless globals other fairseq versions store (``argparse.Namespace``, numpy scalars) are
allow-listed and fairseq/omegaconf objects become inert stand-ins, since only tensors are used
(eat-reference.md §6, fixtures README §3). Anything else is refused by name.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import pickle
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from model.classifier import EATClassifier
from model.config import EATConfig, FrontendConfig, Label
from model.encoder import Encoder, sincos_position_table
from model.files import atomic_path

FORMAT_VERSION = "1"
_FAIRSEQ_PREFIX = "modality_encoders.IMAGE."


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read or does not hold an EAT model; the message says why."""


@dataclass
class LoadedCheckpoint:
    config: EATConfig
    frontend: FrontendConfig
    state_dict: dict[str, torch.Tensor]
    labels: list[Label] | None
    name: str
    source_sha256: str
    source_format: str  # "eat" | "fairseq" | "fairseq-finetuned" | "huggingface"

    @property
    def has_head(self) -> bool:
        return self.config.num_classes > 0


# ----------------------------------------------------------------------------- reading pickles


class _Inert:
    """Stands in for a fairseq / omegaconf object: keeps its state as data, runs nothing."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args, self.kwargs, self.state = args, kwargs, None

    def __setstate__(self, state: Any) -> None:
        self.state = state


def _plain(obj: Any) -> Any:
    """Best-effort plain view of a config: omegaconf containers keep their values under ``_content``
    (nodes under ``_val``), ``argparse.Namespace`` under its attributes."""
    if isinstance(obj, _Inert):
        state = obj.state if isinstance(obj.state, dict) else {}
        return _plain(state["_content"] if "_content" in state else state.get("_val"))
    if isinstance(obj, argparse.Namespace):
        return _plain(vars(obj))
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_plain(v) for v in obj]
    return obj


def _harmless_globals() -> dict[str, Any]:
    core = getattr(np, "_core", None) or np.core
    names: dict[str, Any] = {
        "argparse.Namespace": argparse.Namespace,
        "numpy.dtype": np.dtype,
        "numpy.ndarray": np.ndarray,
        "numpy.core.multiarray.scalar": core.multiarray.scalar,
        "numpy._core.multiarray.scalar": core.multiarray.scalar,
        "numpy.core.multiarray._reconstruct": core.multiarray._reconstruct,
        "numpy._core.multiarray._reconstruct": core.multiarray._reconstruct,
    }
    for dtype_cls in vars(np.dtypes).values():
        if isinstance(dtype_cls, type):
            names[f"numpy.dtypes.{dtype_cls.__name__}"] = dtype_cls
    return names


# How torch names what its weights-only unpickler refused: a global to import, or a type to build.
_UNSUPPORTED_GLOBAL = re.compile(r"GLOBAL ([\w.]+)|but got <class '([\w.]+)'>")


def read_torch_pickle(path: Path) -> Any:
    """``torch.load`` with the weights-only unpickler, widened only by the names above."""
    harmless = _harmless_globals()
    allowed: list[Any] = []
    for _ in range(64):  # each round admits one more named global, or refuses it
        try:
            with torch.serialization.safe_globals(allowed):
                return torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as err:
            match = _UNSUPPORTED_GLOBAL.search(str(err))
            if match is None:
                raise CheckpointError(f"{path}: cannot unpickle: {str(err).splitlines()[0]}") from None
            name = match.group(1) or match.group(2)
            if name in harmless:
                allowed.append((harmless[name], name))
            elif name.split(".")[0] in ("fairseq", "omegaconf"):
                allowed.append((_Inert, name))
            else:
                raise CheckpointError(
                    f"{path} refers to the Python global {name!r}, which no EAT checkpoint needs; refusing to "
                    "load it (unpickling it could run arbitrary code)"
                ) from None
        except Exception as err:  # garbage bytes fail anywhere in the unpickler (KeyError, ...)
            raise CheckpointError(
                f"{path}: not a readable PyTorch checkpoint (truncated or corrupt?): {str(err).splitlines()[0]}"
            ) from None
    raise CheckpointError(f"{path}: too many distinct globals in the pickle; refusing to load")


# ----------------------------------------------------------------------------- key conversion


_FAIRSEQ_RENAMES = [  # (official prefix, our prefix), checked in order
    (_FAIRSEQ_PREFIX + "local_encoder.proj.", "encoder.patch_embed.proj."),
    (_FAIRSEQ_PREFIX + "extra_tokens", "encoder.cls_token"),
    (_FAIRSEQ_PREFIX + "fixed_positional_encoder.positions", "encoder.pos_embed"),
    (_FAIRSEQ_PREFIX + "fixed_positional_encoder.pos_embed", "encoder.pos_embed"),  # legacy name
    (_FAIRSEQ_PREFIX + "context_encoder.norm.", "encoder.pre_norm."),
    (_FAIRSEQ_PREFIX + "decoder.proj.", "decoder.proj."),
    ("blocks.", "encoder.blocks."),
    ("fc_norm.", "fc_norm."),
    ("head.", "head."),
]
_FAIRSEQ_DECODER_CONV = re.compile(re.escape(_FAIRSEQ_PREFIX) + r"decoder\.blocks\.(\d+)\.0\.(weight|bias)$")
# Tensors of the data2vec family that EAT never uses (reference §6.2).
_FAIRSEQ_DROPPED = ("alibi_bias", "alibi_scale", "encoder_mask")

_HF_RENAMES = [
    ("local_encoder.proj.", "encoder.patch_embed.proj."),
    ("extra_tokens", "encoder.cls_token"),
    ("fixed_positional_encoder.positions", "encoder.pos_embed"),
    ("pre_norm.", "encoder.pre_norm."),
    ("blocks.", "encoder.blocks."),
    ("fc_norm.", "fc_norm."),
    ("head.", "head."),
]


def _rename(state: dict[str, Any], renames: list[tuple[str, str]], source: str) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    unknown = []
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            unknown.append(key)
            continue
        if key.endswith(_FAIRSEQ_DROPPED):
            continue
        conv = _FAIRSEQ_DECODER_CONV.match(key)
        if conv:
            out[f"decoder.blocks.{conv.group(1)}.conv.{conv.group(2)}"] = value
            continue
        for old, new in renames:
            if key.startswith(old):
                out[new + key[len(old) :]] = value
                break
        else:
            unknown.append(key)
    if unknown:
        raise CheckpointError(f"{source}: keys that belong to no EAT module: {sorted(unknown)[:20]}")
    return {k: v.float() for k, v in out.items()}


def fairseq_to_ours(model_state: dict[str, Any], teacher: bool = False) -> dict[str, torch.Tensor]:
    """Official fairseq ``ckpt["model"]`` -> our key names, fp32 (reference §6.5).

    ``teacher=True`` takes the EMA teacher from the nested ``_ema`` dict (pre-training files only).
    Fine-tuned files (keys under ``model.``) are recognised by their prefix.
    """
    if teacher:
        ema = model_state.get("_ema")
        if not isinstance(ema, dict):
            raise CheckpointError("--teacher: this checkpoint has no EMA teacher (no '_ema' entry)")
        return _rename(ema, _FAIRSEQ_RENAMES, "fairseq teacher")
    state = {k: v for k, v in model_state.items() if k != "_ema"}
    if any(k.startswith("model.") for k in state):
        state = {k.removeprefix("model."): v for k, v in state.items()}
    return _rename(state, _FAIRSEQ_RENAMES, "fairseq checkpoint")


def hf_to_ours(hf_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Hugging Face ``worstchan/EAT-*`` keys (all under ``model.``) -> our key names, fp32 (§6.4)."""
    not_prefixed = [k for k in hf_state if not k.startswith("model.")]
    if not_prefixed:
        raise CheckpointError(f"not a Hugging Face EAT file: keys outside 'model.': {not_prefixed[:10]}")
    return _rename({k.removeprefix("model."): v for k, v in hf_state.items()}, _HF_RENAMES, "Hugging Face file")


# ----------------------------------------------------------------------------- architecture inference


def _infer_config(state: dict[str, torch.Tensor], hints: dict[str, Any]) -> EATConfig:
    """Shapes settle every size; ``hints`` (from the file's config) give heads, eps and pooling."""
    if "encoder.cls_token" not in state or "encoder.patch_embed.proj.weight" not in state:
        raise CheckpointError("no EAT encoder found: missing 'encoder.cls_token' / patch embedding tensors")
    dim = state["encoder.cls_token"].shape[-1]
    depth = 1 + max(int(k.split(".")[2]) for k in state if k.startswith("encoder.blocks."))
    hidden = state["encoder.blocks.0.mlp.fc1.weight"].shape[0]
    values: dict[str, Any] = dict(
        embed_dim=dim,
        depth=depth,
        num_heads=int(hints.get("num_heads") or dim // 64),  # every EAT size uses 64-dim heads
        mlp_ratio=hidden / dim,
        patch_size=state["encoder.patch_embed.proj.weight"].shape[-1],
        norm_eps=float(hints.get("norm_eps") or 1e-6),
        num_classes=state["head.weight"].shape[0] if "head.weight" in state else 0,
        pooling=hints.get("pooling", "cls"),
    )
    if "decoder.proj.weight" in state:
        conv = state["decoder.blocks.0.conv.weight"]  # [decoder_dim, in/groups, k, k]
        values.update(
            decoder_dim=conv.shape[0],
            decoder_layers=1 + max(int(k.split(".")[2]) for k in state if k.startswith("decoder.blocks.")),
            decoder_kernel=conv.shape[-1],
            decoder_groups=dim // conv.shape[1],
        )
    return EATConfig(**values)


def _full_position_table(state: dict[str, torch.Tensor], cfg: EATConfig) -> None:
    """Grow an old 512-row table to the model's full size with exact values; keep stored rows as they
    are (they are fp16-rounded, and that rounding is part of what the original computes)."""
    stored = state.get("encoder.pos_embed")
    if stored is None:
        raise CheckpointError("missing keys: ['encoder.pos_embed'] (the fixed positional table)")
    rows = cfg.max_time_patches * cfg.freq_patches
    if stored.shape[1] >= rows:
        state["encoder.pos_embed"] = stored[:, :rows].contiguous()
        return
    full = sincos_position_table(cfg.max_time_patches, cfg.freq_patches, cfg.embed_dim).float()[None]
    full[:, : stored.shape[1]] = stored
    state["encoder.pos_embed"] = full


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


# ----------------------------------------------------------------------------- the three sources


def _fairseq_frontend(cfg_model: dict[str, Any], cfg_task: dict[str, Any]) -> FrontendConfig:
    target = int(cfg_model.get("target_length") or cfg_task.get("target_length") or 1024)
    if cfg_model.get("esc50_eval") or cfg_task.get("esc50_eval"):
        return FrontendConfig.preset("esc50", target)
    if cfg_model.get("spcv2_eval") or cfg_task.get("spcv2_eval"):
        return FrontendConfig.preset("spcv2", target)
    return FrontendConfig.preset("audioset", target)


def _load_fairseq(path: Path, teacher: bool) -> LoadedCheckpoint:
    ckpt = read_torch_pickle(path)
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("model"), dict):
        raise CheckpointError(f"{path}: not a fairseq checkpoint (no 'model' state dict inside)")
    cfg = _plain(ckpt.get("cfg"))
    cfg = cfg if isinstance(cfg, dict) else {}
    cfg_model = cfg.get("model") if isinstance(cfg.get("model"), dict) else {}
    cfg_task = cfg.get("task") if isinstance(cfg.get("task"), dict) else {}
    finetuned = any(k.startswith("model.") for k in ckpt["model"])
    if finetuned and teacher:
        raise CheckpointError(f"{path}: --teacher needs a pre-training checkpoint; this one is fine-tuned")
    arch = cfg_model.get("pretrained_model_args", {}) if finetuned else cfg
    arch_model = arch.get("model", {}) if isinstance(arch, dict) else {}
    hints = {
        "num_heads": arch_model.get("num_heads"),
        "norm_eps": arch_model.get("norm_eps"),
        "pooling": "mean" if cfg_model.get("prediction_mode") == "MEAN_POOLING" else "cls",
    }
    state = fairseq_to_ours(ckpt["model"], teacher=teacher)
    config = _infer_config(state, hints)
    _full_position_table(state, config)
    labels = None
    task_labels = (ckpt.get("task_state") or {}).get("labels")
    if isinstance(task_labels, dict):  # label key -> index string (reference §6.3)
        labels = sorted((Label(int(i), key, key) for key, i in task_labels.items()), key=lambda x: x.index)
    return LoadedCheckpoint(
        config=config,
        frontend=_fairseq_frontend(cfg_model, cfg_task),
        state_dict=state,
        labels=labels,
        name=path.stem + ("-teacher" if teacher else ""),
        source_sha256=_sha256(path),
        source_format="fairseq-finetuned" if finetuned else "fairseq",
    )


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})  # noqa: SIM118
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{path}: not a readable safetensors file (truncated or corrupt?): {err}") from None


def _load_hf(folder: Path, teacher: bool) -> LoadedCheckpoint:
    if teacher:
        raise CheckpointError("--teacher applies to fairseq pre-training checkpoints, not Hugging Face folders")
    weights, config_file = folder / "model.safetensors", folder / "config.json"
    for needed in (weights, config_file):
        if not needed.is_file():
            raise CheckpointError(f"{folder}: a Hugging Face EAT folder needs {needed.name}")
    hf_cfg = json.loads(config_file.read_text())
    if hf_cfg.get("model_type") != "eat":
        raise CheckpointError(f"{config_file}: model_type is {hf_cfg.get('model_type')!r}, not 'eat'")
    tensors, _ = _read_safetensors(weights)
    state = hf_to_ours(tensors)
    config = _infer_config(state, {"num_heads": hf_cfg.get("num_heads"), "norm_eps": hf_cfg.get("norm_eps")})
    _full_position_table(state, config)
    target = int((hf_cfg.get("img_size") or [1024])[0])
    return LoadedCheckpoint(
        config=config,
        frontend=FrontendConfig.preset("audioset", target),
        state_dict=state,
        labels=None,
        name=folder.name,
        source_sha256=_sha256(weights),
        source_format="huggingface",
    )


def _load_ours(path: Path, tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> LoadedCheckpoint:
    try:
        config = EATConfig.from_dict(json.loads(meta["eat_config"]))
        frontend = FrontendConfig(**json.loads(meta["frontend_config"]))
        raw_labels = json.loads(meta.get("labels") or "null")
    except (KeyError, TypeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path}: EAT metadata is damaged: {err}") from None
    labels = [Label(int(i), str(k), str(n)) for i, k, n in raw_labels] if raw_labels else None
    return LoadedCheckpoint(
        config=config,
        frontend=frontend,
        state_dict={k: v.float() for k, v in tensors.items()},
        labels=labels,
        name=meta.get("name") or path.stem,
        source_sha256=meta.get("source_sha256") or _sha256(path),
        source_format="eat",
    )


def _looks_like_safetensors(path: Path) -> bool:
    """Safetensors: an 8-byte little-endian header length, then a JSON header that fits the file."""
    with open(path, "rb") as f:
        head = f.read(9)
    if len(head) < 9:
        return False
    return head[8:9] == b"{" and int.from_bytes(head[:8], "little") < path.stat().st_size


def load_checkpoint(path: str | os.PathLike[str], teacher: bool = False) -> LoadedCheckpoint:
    """Read any supported checkpoint: ours (.safetensors), fairseq (.pt) or a Hugging Face folder."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.is_dir():
        return _load_hf(path, teacher)
    if not _looks_like_safetensors(path):  # a torch zip archive or a legacy raw pickle
        return _load_fairseq(path, teacher)
    tensors, meta = _read_safetensors(path)
    if "eat_config" in meta:
        if teacher:
            raise CheckpointError("--teacher applies to fairseq pre-training checkpoints only")
        return _load_ours(path, tensors, meta)
    if (path.parent / "config.json").is_file():
        return _load_hf(path.parent, teacher)
    raise CheckpointError(f"{path}: a safetensors file without EAT metadata and without a config.json beside it")


# ----------------------------------------------------------------------------- building and saving


def load_weights(module: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Strict load that names every missing or unexpected key, and every shape mismatch."""
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mismatched = [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    if missing or unexpected or mismatched:
        parts = [
            f"missing keys: {missing}" if missing else "",
            f"unexpected keys: {unexpected}" if unexpected else "",
            f"shape mismatches: {mismatched}" if mismatched else "",
        ]
        raise CheckpointError("; ".join(p for p in parts if p))
    module.load_state_dict(state, strict=True)


def build_model(loaded: LoadedCheckpoint) -> EATClassifier | Encoder:
    """The network a checkpoint holds, weights loaded, in eval mode: a classifier when it has a head,
    else the encoder. Pre-training decoder weights are left out (``model.pretraining`` loads them)."""
    state = {k: v for k, v in loaded.state_dict.items() if not k.startswith("decoder.")}
    if loaded.has_head:
        model: EATClassifier | Encoder = EATClassifier(loaded.config)
        load_weights(model, state)
    else:
        model = Encoder(loaded.config)
        load_weights(model, {k.removeprefix("encoder."): v for k, v in state.items()})
    return model.eval()


def model_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Our key layout for an ``Encoder`` (prefixed ``encoder.``) or a module that holds one."""
    state = model.state_dict()
    if isinstance(model, Encoder):
        state = {f"encoder.{k}": v for k, v in state.items()}
    bad = [k for k in state if not k.startswith(("encoder.", "fc_norm.", "head.", "decoder."))]
    if bad:
        raise CheckpointError(f"cannot save: keys outside encoder/fc_norm/head/decoder: {bad[:10]}")
    return {k: v.detach().float().cpu().contiguous() for k, v in state.items()}


def save_state(
    path: str | os.PathLike[str],
    state: dict[str, torch.Tensor],
    config: EATConfig,
    frontend: FrontendConfig,
    labels: list[Label] | None = None,
    name: str | None = None,
    source_sha256: str | None = None,
) -> Path:
    """Write our format atomically (temp file, then rename): a reader never sees half a file."""
    path = Path(path)
    if labels is not None and config.num_classes and len(labels) != config.num_classes:
        raise CheckpointError(f"{len(labels)} labels for a head of {config.num_classes} classes")
    metadata = {
        "format_version": FORMAT_VERSION,
        "eat_config": json.dumps(config.to_dict()),
        "frontend_config": json.dumps(vars(frontend)),
        "labels": json.dumps([[lb.index, lb.id, lb.display_name] for lb in labels] if labels else None),
        "name": name or path.stem,
        "source_sha256": source_sha256 or "",
    }
    with atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp), metadata=metadata)
    return path


def save_checkpoint(
    path: str | os.PathLike[str],
    model: nn.Module,
    frontend: FrontendConfig,
    labels: list[Label] | None = None,
    name: str | None = None,
    source_sha256: str | None = None,
) -> Path:
    """Save an ``Encoder``, ``EATClassifier`` or pre-training model (anything with ``.cfg``)."""
    return save_state(path, model_state_dict(model), model.cfg, frontend, labels, name, source_sha256)
