"""Open a split from a data directory, whichever layout it uses (EAT manifests or class folders).

One entry point for ``eat finetune`` / ``eat evaluate`` so the commands accept both layouts:
``DIR/<split>.tsv`` (+ ``.lbl``, label CSV), ``DIR/<split>/<class>/*.wav``, or ``DIR/<class>/*.wav``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from model.config import Label
from training.data.folder import is_folder_layout, load_folder
from training.data.manifest import EAT_MIN_SAMPLES, DataError, Manifest, as_label_list, load_manifest

logger = logging.getLogger(__name__)


def load_split(
    data_dir: str | Path,
    split: str,
    *,
    labels: Sequence[Label] | str | Path | None = None,
    weights: str | Path | None = None,
    min_samples: int = EAT_MIN_SAMPLES,
    require_labels: bool = True,
) -> Manifest:
    """The ``split`` of ``data_dir``; see ``load_manifest`` and ``load_folder`` for the options."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise DataError(f"{data_dir}: data directory not found")
    if (data_dir / f"{split}.tsv").is_file():
        return load_manifest(
            data_dir, split, labels=labels, weights=weights, min_samples=min_samples,
            require_labels=require_labels,
        )
    label_list = as_label_list(labels) if labels is not None else None
    if weights is not None:
        raise DataError(f"{data_dir}: sampling weights need an EAT manifest ({split}.tsv), not a folder layout")
    if is_folder_layout(data_dir / split):
        return load_folder(data_dir / split, labels=label_list, name=split)
    if is_folder_layout(data_dir):
        logger.info("%s: no %r split; using the whole class-folder layout", data_dir, split)
        return load_folder(data_dir, labels=label_list, name=split)
    raise DataError(
        f"{data_dir}: found neither {split}.tsv (EAT manifest) nor class folders "
        f"({split}/<class>/*.wav or <class>/*.wav)"
    )
