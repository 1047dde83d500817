"""A class-per-folder layout: ``root/<class_name>/*.wav|flac|ogg|mp3`` -> single-label items.

The simplest way to bring your own data: no manifests to write. Classes are the sub-folder names,
sorted, so the label order is stable across machines; files are sorted too. Sample counts are not
read (that would open every file), so EAT's 10 000-sample filter does not apply here.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from model.config import Label
from training.data.manifest import AudioItem, DataError, Manifest

logger = logging.getLogger(__name__)

AUDIO_SUFFIXES = frozenset({".wav", ".flac", ".ogg", ".mp3"})


def is_folder_layout(root: str | Path) -> bool:
    """True when ``root`` has at least one sub-folder holding an audio file directly."""
    root = Path(root)
    if not root.is_dir():
        return False
    return any(
        child.is_dir() and any(f.suffix.lower() in AUDIO_SUFFIXES for f in child.iterdir() if f.is_file())
        for child in root.iterdir()
        if not child.name.startswith(".")
    )


def load_folder(root: str | Path, *, labels: Sequence[Label] | None = None, name: str = "") -> Manifest:
    """Scan ``root`` and return one single-label item per audio file.

    Without ``labels`` the classes are the sorted sub-folder names (id = display name = folder name).
    With ``labels`` (e.g. a checkpoint's) each folder must match a label's id or display name, and the
    targets use those indices, so the data lines up with an existing model's outputs.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: not a directory")
    class_dirs = sorted(
        (d for d in root.iterdir() if d.is_dir() and not d.name.startswith(".")), key=lambda d: d.name
    )
    if not class_dirs:
        raise DataError(f"{root}: no class folders (expected root/<class_name>/<clip>.wav)")
    stray = [f.name for f in root.iterdir() if f.is_file() and f.suffix.lower() in AUDIO_SUFFIXES]
    if stray:
        logger.warning("%s: ignoring %d audio file(s) outside class folders, e.g. %s", root, len(stray), stray[0])

    if labels is None:
        label_list = [Label(index=i, id=d.name, display_name=d.name) for i, d in enumerate(class_dirs)]
        index_of = {label.id: label.index for label in label_list}
    else:
        label_list = list(labels)
        index_of = {label.display_name: label.index for label in label_list}
        index_of.update({label.id: label.index for label in label_list})  # ids win over names
        unknown = [d.name for d in class_dirs if d.name not in index_of]
        if unknown:
            raise DataError(f"{root}: class folder(s) {unknown} match no label id or display name")

    items = []
    for class_dir in class_dirs:
        files = sorted(
            f for f in class_dir.iterdir()
            if f.is_file() and f.suffix.lower() in AUDIO_SUFFIXES and not f.name.startswith(".")
        )
        if not files:
            logger.warning("%s: class folder has no audio files", class_dir)
        target = (index_of[class_dir.name],)
        items.extend(AudioItem(path=f, num_samples=-1, targets=target, key=f.stem) for f in files)
    if not items:
        raise DataError(f"{root}: no audio files ({', '.join(sorted(AUDIO_SUFFIXES))}) in any class folder")
    return Manifest(name=name or root.name, items=tuple(items), labels=tuple(label_list))
