"""Class-folder layouts, and ``load_split`` choosing between them and EAT manifests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from model.config import Label
from training.data.folder import load_folder
from training.data.manifest import DataError
from training.data.splits import load_split


def _touch_wav(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, np.zeros(160, dtype=np.float32), 16000)


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    root = tmp_path / "data"
    for rel in ["yes/2.wav", "yes/1.flac", "no/b.ogg", "no/a.wav", "maybe/x.mp3"]:
        path = root / rel
        if path.suffix == ".mp3":  # only the suffix matters for scanning
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(b"")
        else:
            _touch_wav(path)
    (root / "no" / "notes.txt").write_text("not audio")
    (root / ".hidden").mkdir()
    _touch_wav(root / ".hidden" / "z.wav")
    _touch_wav(root / "stray.wav")
    return root


def test_classes_sorted_and_single_labels(folder: Path) -> None:
    m = load_folder(folder)
    assert [lb.id for lb in m.labels] == ["maybe", "no", "yes"]
    assert [lb.index for lb in m.labels] == [0, 1, 2]
    assert [(it.path.relative_to(folder).as_posix(), it.targets) for it in m.items] == [
        ("maybe/x.mp3", (0,)), ("no/a.wav", (1,)), ("no/b.ogg", (1,)), ("yes/1.flac", (2,)), ("yes/2.wav", (2,)),
    ]
    assert m.is_single_label and m.items[1].key == "a"


def test_given_labels_map_by_id_or_display_name(folder: Path) -> None:
    labels = [Label(0, "/m/yes", "yes"), Label(1, "no", "No!"), Label(2, "maybe", "Maybe")]
    m = load_folder(folder, labels=labels)
    assert m.labels == tuple(labels)
    assert [it.targets[0] for it in m.items] == [2, 1, 1, 0, 0]
    with pytest.raises(DataError, match=r"\['yes'\]"):
        load_folder(folder, labels=labels[1:])


def test_bad_roots(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="not a directory"):
        load_folder(tmp_path / "nope")
    with pytest.raises(DataError, match="no class folders"):
        load_folder(tmp_path)
    (tmp_path / "empty_class").mkdir()
    with pytest.raises(DataError, match="no audio files"):
        load_folder(tmp_path)


def test_load_split_finds_each_layout(tmp_path: Path) -> None:
    _touch_wav(tmp_path / "nested" / "eval" / "cat" / "1.wav")
    _touch_wav(tmp_path / "nested" / "train" / "dog" / "1.wav")
    assert [lb.id for lb in load_split(tmp_path / "nested", "eval").labels] == ["cat"]
    _touch_wav(tmp_path / "flat" / "cat" / "1.wav")
    assert load_split(tmp_path / "flat", "eval").name == "eval"
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"neither eval\.tsv"):
        load_split(tmp_path / "empty", "eval")
    with pytest.raises(DataError, match="not found"):
        load_split(tmp_path / "missing", "eval")
    with pytest.raises(DataError, match="weights need an EAT manifest"):
        load_split(tmp_path / "flat", "eval", weights=tmp_path / "w.csv")
