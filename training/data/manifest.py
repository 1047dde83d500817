"""EAT's data manifests: ``<split>.tsv``, ``<split>.lbl``, the label CSV and the sampling weights.

The formats are EAT's (reference §7), so a data directory prepared for the original code works here
unchanged. Everything is checked when the split is opened, not halfway through an epoch: every error
names the file and the line, and every audio file is checked to exist up front.

Deviations, on purpose:
- a *relative* root on the tsv's first line is resolved against the tsv's own directory (EAT resolves it
  against the working directory), so a generated data directory can be moved;
- HDF5 shards (``<shard>.h5/<key>`` paths, EAT's ``h5_format``) are read for any split, not only
  ``train`` (``training.data.hdf5``; ``eat data pack`` writes them).
"""

from __future__ import annotations

import csv
import io
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from eat import inputs
from model.config import Label

logger = logging.getLogger(__name__)

# Reference §1.3 / §9.19: fairseq's `min_sample_size`, counted at the file's native rate.
EAT_MIN_SAMPLES = 10_000
# Names EAT (and we) give the label CSV inside a data directory, in the order they are looked for.
LABEL_FILE_NAMES = ("labels.csv", "label_descriptors.csv")
MAX_MISSING_SHOWN = 5


class DataError(ValueError):
    """A data file is missing, malformed or inconsistent with another one; the message names it."""


@dataclass(frozen=True)
class AudioItem:
    """One clip: where it is, how long the manifest says it is, and its label indices."""

    path: Path
    num_samples: int  # at the file's native rate; -1 when unknown (folder layouts)
    targets: tuple[int, ...]  # indices into the split's labels; empty for unlabelled (pre-training) data
    key: str  # the .lbl first column, or the file stem


@dataclass(frozen=True)
class Manifest:
    """A split ready for a ``Dataset``: items, the label set (index order = model output order), weights."""

    name: str
    items: tuple[AudioItem, ...]
    labels: tuple[Label, ...]
    weights: tuple[float, ...] | None = None  # aligned with ``items`` (AS-2M balanced sampling, §4.6)

    def __len__(self) -> int:
        return len(self.items)

    @property
    def num_classes(self) -> int:
        return len(self.labels)

    @property
    def is_single_label(self) -> bool:
        """True when every clip has exactly one label (ESC-50/SPC-2 style: accuracy, not mAP)."""
        return bool(self.items) and all(len(item.targets) == 1 for item in self.items)


def _lines(path: Path) -> list[str]:
    """The file's lines without trailing blank lines (a final newline is normal; blanks inside are not)."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not UTF-8 text ({err})") from None
    lines = text.splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    return lines


# ----------------------------------------------------------------------------------------------- tsv


def read_tsv(path: str | Path) -> tuple[Path, list[tuple[str, int]]]:
    """Parse ``<split>.tsv``: the root directory and ``(relative_path, num_samples)`` per data line.

    One reader serves training and the offline tools (``eat.inputs.read_tsv``); its errors become
    ``DataError`` here, with the same message (file and line).
    """
    try:
        return inputs.read_tsv(path)
    except ValueError as err:
        raise DataError(str(err)) from None


def write_tsv(path: str | Path, root: str | Path, entries: Sequence[tuple[str, int]]) -> None:
    lines = [str(root)] + [f"{rel}\t{int(n)}" for rel, n in entries]
    Path(path).write_text("\n".join(lines) + "\n", encoding="utf-8")


# ----------------------------------------------------------------------------------------------- lbl


def read_lbl(path: str | Path) -> list[tuple[str, list[str]]]:
    """Parse ``<split>.lbl``: ``(key, [label_key, ...])`` per line (tab or any whitespace, as EAT)."""
    path = Path(path)
    rows: list[tuple[str, list[str]]] = []
    for line_no, line in enumerate(_lines(path), start=1):
        fields = line.split()
        if len(fields) != 2:
            raise DataError(
                f"{path}:{line_no}: expected 'key<TAB>label1,label2,...' (two columns, no spaces in the "
                f"label list), got {line!r}"
            )
        keys = fields[1].split(",")
        if any(not k for k in keys):
            raise DataError(f"{path}:{line_no}: empty label key in {fields[1]!r}")
        rows.append((fields[0], keys))
    return rows


def write_lbl(path: str | Path, rows: Sequence[tuple[str, Sequence[str]]]) -> None:
    Path(path).write_text("".join(f"{key}\t{','.join(labels)}\n" for key, labels in rows), encoding="utf-8")


def _keys_for(rel_path: str) -> set[str]:
    """First-column spellings that identify a tsv entry (EAT's eval.py compares ``key + '.wav'``)."""
    rel = rel_path.replace("\\", "/")
    no_ext = rel.rsplit(".", 1)[0] if "." in Path(rel).name else rel
    return {rel, no_ext, Path(no_ext).name, no_ext.replace("/", "_")}


# ----------------------------------------------------------------------------------------- label csv


def read_labels_csv(path: str | Path) -> list[Label]:
    """Parse ``index,id,display_name`` rows (no header; names quoted when they hold commas, §5.2).

    Indices must be exactly 0..C-1 (in any line order); they define the model's output order.
    """
    path = Path(path)
    text = "\n".join(_lines(path))
    labels: dict[int, Label] = {}
    ids: dict[str, int] = {}
    for line_no, fields in enumerate(csv.reader(io.StringIO(text)), start=1):
        if len(fields) not in (2, 3):
            raise DataError(f"{path}:{line_no}: expected 'index,id,display_name', got {fields!r}")
        try:
            index = int(fields[0])
        except ValueError:
            raise DataError(f"{path}:{line_no}: index {fields[0]!r} is not an integer") from None
        label_id = fields[1].strip()
        if not label_id:
            raise DataError(f"{path}:{line_no}: empty label id")
        if index in labels:
            raise DataError(f"{path}:{line_no}: index {index} appears twice")
        if label_id in ids:
            raise DataError(f"{path}:{line_no}: id {label_id!r} appears twice (first as index {ids[label_id]})")
        name = fields[2].strip() if len(fields) == 3 and fields[2].strip() else label_id
        labels[index] = Label(index=index, id=label_id, display_name=name)
        ids[label_id] = index
    if not labels:
        raise DataError(f"{path}: no labels")
    if sorted(labels) != list(range(len(labels))):
        raise DataError(f"{path}: indices must be 0..{len(labels) - 1} without gaps")
    return [labels[i] for i in range(len(labels))]


def write_labels_csv(path: str | Path, labels: Sequence[Label]) -> None:
    """Write EAT's layout: bare index and id, the display name always double-quoted (as AudioSet's)."""
    def quoted(name: str) -> str:
        return '"' + name.replace('"', '""') + '"'

    text = "".join(f"{label.index},{label.id},{quoted(label.display_name or label.id)}\n" for label in labels)
    Path(path).write_text(text, encoding="utf-8")


def as_label_list(labels: Sequence[Label] | str | Path) -> list[Label]:
    """Labels from a CSV path, or checked Label objects (indices 0..C-1 in order, ids unique)."""
    if isinstance(labels, (str, Path)):
        return read_labels_csv(labels)
    label_list = list(labels)
    if [lb.index for lb in label_list] != list(range(len(label_list))):
        raise DataError("labels must be listed in index order 0..C-1")
    if len({lb.id for lb in label_list}) != len(label_list):
        raise DataError("label ids must be unique")
    return label_list


def find_labels_csv(data_dir: str | Path) -> Path:
    data_dir = Path(data_dir)
    for name in LABEL_FILE_NAMES:
        if (data_dir / name).is_file():
            return data_dir / name
    raise DataError(f"{data_dir}: no label file ({' or '.join(LABEL_FILE_NAMES)}); pass one explicitly")


# ------------------------------------------------------------------------------------------- weights


def read_weights(path: str | Path) -> list[float]:
    """One non-negative float per line (``weight_train_all.csv``, §7.4)."""
    path = Path(path)
    weights = []
    for line_no, line in enumerate(_lines(path), start=1):
        try:
            value = float(line.strip())
        except ValueError:
            raise DataError(f"{path}:{line_no}: {line.strip()!r} is not a number") from None
        if not math.isfinite(value) or value < 0:
            raise DataError(f"{path}:{line_no}: weight {value} must be finite and >= 0")
        weights.append(value)
    return weights


def write_weights(path: str | Path, weights: Sequence[float]) -> None:
    Path(path).write_text("".join(f"{w:.6g}\n" for w in weights), encoding="utf-8")


# ------------------------------------------------------------------------------------------- a split


def load_manifest(
    data_dir: str | Path,
    split: str,
    *,
    labels: Sequence[Label] | str | Path | None = None,
    weights: str | Path | None = None,
    min_samples: int = EAT_MIN_SAMPLES,
    require_labels: bool = True,
    check_keys: bool = True,
    check_files: bool = True,
) -> Manifest:
    """Open ``data_dir/<split>.tsv`` (+ ``.lbl``), drop clips shorter than ``min_samples`` like EAT.

    ``labels``: Label objects (e.g. a checkpoint's), a CSV path, or None to use the data directory's CSV.
    ``weights``: one per *kept* clip (EAT's convention, §9.19) or one per tsv line (filtered along).
    ``require_labels=False`` accepts a split without ``.lbl`` (pre-training); its items have no targets.
    ``check_keys`` compares each ``.lbl`` first column with the tsv file name (EAT's eval.py does).
    """
    data_dir = Path(data_dir)
    tsv_path, lbl_path = data_dir / f"{split}.tsv", data_dir / f"{split}.lbl"
    if not tsv_path.is_file():
        raise DataError(f"{tsv_path}: manifest not found (expected EAT's <split>.tsv in {data_dir})")
    root, entries = read_tsv(tsv_path)

    label_list: list[Label] = []
    label_rows: list[tuple[str, list[str]]] | None = None
    if lbl_path.is_file():
        label_rows = read_lbl(lbl_path)
        if len(label_rows) != len(entries):
            raise DataError(
                f"{lbl_path}: {len(label_rows)} lines but {tsv_path} lists {len(entries)} clips; "
                "the .lbl must have one line per tsv data line, in the same order"
            )
        if labels is None:
            labels = find_labels_csv(data_dir)
        label_list = as_label_list(labels)
    elif require_labels:
        raise DataError(f"{lbl_path}: label file not found (needed for a labelled split)")
    elif labels is not None:
        label_list = as_label_list(labels)

    index_of = {label.id: label.index for label in label_list}
    targets: list[tuple[int, ...]] = []
    keys: list[str] = []
    for line_no, (rel_path, _) in enumerate(entries, start=1):
        if label_rows is None:
            targets.append(())
            keys.append(Path(rel_path).stem)
            continue
        key, label_keys = label_rows[line_no - 1]
        if check_keys and key not in _keys_for(rel_path):
            raise DataError(
                f"{lbl_path}:{line_no}: key {key!r} does not match {rel_path!r} on line {line_no + 1} of "
                f"{tsv_path}; the files are misaligned (pass check_keys=False if the keys are arbitrary)"
            )
        unknown = [k for k in label_keys if k not in index_of]
        if unknown:
            source = labels if isinstance(labels, (str, Path)) else "the given labels"
            raise DataError(f"{lbl_path}:{line_no}: label key(s) {unknown} not in {source}")
        targets.append(tuple(sorted({index_of[k] for k in label_keys})))
        keys.append(key)

    weight_list = read_weights(weights) if weights is not None else None
    keep = [n >= min_samples for _, n in entries]
    num_kept = sum(keep)
    if weight_list is not None:
        if len(weight_list) == len(entries):
            weight_list = [w for w, k in zip(weight_list, keep, strict=True) if k]
        elif len(weight_list) != num_kept:
            raise DataError(
                f"{weights}: {len(weight_list)} weights, but {tsv_path} has {len(entries)} clips of which "
                f"{num_kept} are kept (>= {min_samples} samples); need one weight per kept clip"
            )
    if num_kept < len(entries):
        logger.info("%s: dropped %d of %d clips shorter than %d samples (EAT's min_sample_size)",
                    tsv_path, len(entries) - num_kept, len(entries), min_samples)

    items = tuple(
        AudioItem(path=root / rel_path, num_samples=n, targets=t, key=k)
        for (rel_path, n), t, k, kept in zip(entries, targets, keys, keep, strict=True)
        if kept
    )
    if check_files:
        _check_exist(tsv_path, [(line_no, root / rel) for line_no, (rel, n) in enumerate(entries, start=2)
                                if n >= min_samples])
    if not items:
        raise DataError(f"{tsv_path}: no clips left (listed {len(entries)}, min_samples={min_samples})")
    return Manifest(
        name=split,
        items=items,
        labels=tuple(label_list),
        weights=tuple(weight_list) if weight_list is not None else None,
    )


def _check_exist(tsv_path: Path, paths: list[tuple[int, Path]]) -> None:
    from training.data import hdf5  # here, not at the top: hdf5 imports DataError from this module

    in_shards = [(line_no, p) for line_no, p in paths if hdf5.locate(p) is not None]
    missing = [(line_no, p) for line_no, p in paths if hdf5.locate(p) is None and not p.is_file()]
    missing = sorted(missing + hdf5.missing_clips(in_shards))
    if missing:
        shown = "; ".join(f"line {line_no}: {p}" for line_no, p in missing[:MAX_MISSING_SHOWN])
        more = f" (and {len(missing) - MAX_MISSING_SHOWN} more)" if len(missing) > MAX_MISSING_SHOWN else ""
        raise DataError(f"{tsv_path}: {len(missing)} audio file(s) not found: {shown}{more}")
