"""``eat convert SRC OUT [--teacher] [--labels labels.csv]``: official checkpoint -> our format.

SRC is a fairseq ``.pt`` (pre-training or fine-tuned) or a Hugging Face EAT folder; OUT is one
``.safetensors`` file. Labels come from ``--labels`` (EAT's ``index,id,display_name`` CSV), else from
the ids a fine-tuned fairseq checkpoint carries.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from model.checkpoints import CheckpointError, build_model, load_checkpoint, save_state

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("src", type=Path, help="fairseq .pt file or Hugging Face EAT folder")
    parser.add_argument("out", type=Path, help="output .safetensors file")
    parser.add_argument("--teacher", action="store_true", help="take the EMA teacher of a pre-training file")
    parser.add_argument("--labels", type=Path, help="labels CSV: index,id,display_name (no header)")
    parser.add_argument("--name", help="model name stored in the file (default: the source's name)")


def run(args: argparse.Namespace) -> int:
    from training.data.manifest import read_labels_csv

    loaded = load_checkpoint(args.src, teacher=args.teacher)
    labels = read_labels_csv(args.labels) if args.labels else loaded.labels
    if labels is not None and loaded.has_head and len(labels) != loaded.config.num_classes:
        raise CheckpointError(
            f"{args.labels}: {len(labels)} labels, but the checkpoint's head has {loaded.config.num_classes} classes"
        )
    if labels is not None and not loaded.has_head:
        log.warning("the checkpoint has no classifier head; labels are stored but unused")
    build_model(loaded)  # a strict load: refuse to write a file that would not load back
    if args.out.suffix != ".safetensors":
        raise ValueError(f"{args.out}: the output must be a .safetensors file")
    save_state(args.out, loaded.state_dict, loaded.config, loaded.frontend, labels,
               args.name or loaded.name, loaded.source_sha256)
    c = loaded.config
    print(
        f"wrote {args.out}: {loaded.source_format} -> EAT d={c.embed_dim} depth={c.depth} heads={c.num_heads} "
        f"classes={c.num_classes} decoder={'yes' if any(k.startswith('decoder.') for k in loaded.state_dict) else 'no'}"
        f" labels={len(labels) if labels else 0} target_frames={loaded.frontend.target_frames}"
    )
    return 0
