"""EAT manifests: parsing, the 10 000-sample filter, and an error naming file and line for each mistake."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from model.config import Label
from training.data.manifest import (
    DataError,
    load_manifest,
    read_labels_csv,
    read_lbl,
    read_tsv,
    read_weights,
    write_labels_csv,
)

LABELS_CSV = '0,/m/a,"Speech"\n1,/m/b,"Male speech, man speaking"\n2,/m/c,"Dog"\n'
# (file, tsv sample count, label keys): clip b is under EAT's 10 000-sample minimum.
CLIPS = [("a.wav", 16000, "/m/a"), ("b.wav", 5000, "/m/b"), ("sub/c.wav", 20000, "/m/b,/m/c"),
         ("d.wav", 12000, "/m/c")]


def _write(data_dir: Path, clips=CLIPS, *, root: str | None = None) -> Path:
    audio = data_dir / "audio"
    for rel, _, _ in clips:
        (audio / rel).parent.mkdir(parents=True, exist_ok=True)
        sf.write(audio / rel, np.zeros(160, dtype=np.float32), 16000)
    tsv = [root or str(audio)] + [f"{rel}\t{n}" for rel, n, _ in clips]
    (data_dir / "train.tsv").write_text("\n".join(tsv) + "\n")
    (data_dir / "train.lbl").write_text("".join(f"{Path(rel).stem}\t{keys}\n" for rel, _, keys in clips))
    (data_dir / "labels.csv").write_text(LABELS_CSV)
    return data_dir


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return _write(tmp_path)


def _error(data_dir: Path, **kwargs) -> str:
    with pytest.raises(DataError) as info:
        load_manifest(data_dir, "train", **kwargs)
    return str(info.value)


def test_parses_items_labels_and_drops_short_clips(data_dir: Path) -> None:
    m = load_manifest(data_dir, "train")
    assert [it.key for it in m.items] == ["a", "c", "d"]  # b (5000 samples) dropped like EAT
    assert [it.targets for it in m.items] == [(0,), (1, 2), (2,)]
    assert m.items[1].path == data_dir / "audio" / "sub" / "c.wav"
    assert [it.num_samples for it in m.items] == [16000, 20000, 12000]
    assert m.labels[1] == Label(1, "/m/b", "Male speech, man speaking")
    assert m.num_classes == 3 and not m.is_single_label and m.weights is None
    assert len(load_manifest(data_dir, "train", min_samples=0)) == 4


def test_relative_root_resolves_against_the_tsv_directory(tmp_path: Path) -> None:
    _write(tmp_path, root="audio")
    assert load_manifest(tmp_path, "train").items[0].path == tmp_path / "audio" / "a.wav"


def test_weights_stay_aligned_after_filtering(data_dir: Path) -> None:
    # EAT's convention: one weight per *kept* clip ...
    (data_dir / "w_kept.csv").write_text("1.5\n2.5\n3.5\n")
    assert load_manifest(data_dir, "train", weights=data_dir / "w_kept.csv").weights == (1.5, 2.5, 3.5)
    # ... or one per tsv line, filtered along with the clips (b's 9.0 must go).
    (data_dir / "w_all.csv").write_text("1.0\n9.0\n3.0\n4.0\n")
    assert load_manifest(data_dir, "train", weights=data_dir / "w_all.csv").weights == (1.0, 3.0, 4.0)
    (data_dir / "w_bad.csv").write_text("1.0\n2.0\n")
    assert "2 weights" in _error(data_dir, weights=data_dir / "w_bad.csv")


def test_missing_audio_is_reported_up_front_with_line_numbers(data_dir: Path) -> None:
    (data_dir / "audio" / "d.wav").unlink()
    message = _error(data_dir)
    assert "train.tsv" in message and "line 5" in message and "d.wav" in message
    (data_dir / "audio" / "b.wav").unlink()  # b is filtered out, so its absence is not an error
    (data_dir / "audio" / "d.wav").write_bytes(b"")
    assert len(load_manifest(data_dir, "train")) == 3


def test_unknown_label_key(data_dir: Path) -> None:
    (data_dir / "train.lbl").write_text("a\t/m/a\nb\t/m/b\nc\t/m/b,/m/zzz\nd\t/m/c\n")
    message = _error(data_dir)
    assert "train.lbl:3" in message and "/m/zzz" in message


def test_lbl_line_count_mismatch(data_dir: Path) -> None:
    (data_dir / "train.lbl").write_text("a\t/m/a\nb\t/m/b\nc\t/m/c\n")
    message = _error(data_dir)
    assert "train.lbl" in message and "3 lines" in message and "4 clips" in message


def test_lbl_first_column_mismatch(data_dir: Path) -> None:
    (data_dir / "train.lbl").write_text("a\t/m/a\nc\t/m/b\nb\t/m/b,/m/c\nd\t/m/c\n")
    message = _error(data_dir)
    assert "train.lbl:2" in message and "misaligned" in message
    assert len(load_manifest(data_dir, "train", check_keys=False)) == 3


@pytest.mark.parametrize(
    ("tsv_line", "expected"),
    [("a.wav 16000", "expected 'relative_path<TAB>num_samples'"), ("a.wav\tmany", "not an integer"),
     ("a.wav\t-3", "negative")],
)
def test_malformed_tsv_lines(data_dir: Path, tsv_line: str, expected: str) -> None:
    lines = (data_dir / "train.tsv").read_text().splitlines()
    lines[3] = tsv_line
    (data_dir / "train.tsv").write_text("\n".join(lines) + "\n")
    message = _error(data_dir)
    assert "train.tsv:4" in message and expected in message


def test_blank_line_inside_tsv_is_an_error_but_trailing_ones_are_fine(data_dir: Path) -> None:
    text = (data_dir / "train.tsv").read_text()
    (data_dir / "train.tsv").write_text(text + "\n\n")
    assert len(read_tsv(data_dir / "train.tsv")[1]) == 4
    lines = text.splitlines()
    (data_dir / "train.tsv").write_text("\n".join([*lines[:2], "", *lines[2:]]) + "\n")
    assert "train.tsv:3" in _error(data_dir)


def test_malformed_lbl_line(tmp_path: Path) -> None:
    (tmp_path / "x.lbl").write_text("a\t/m/a\nb /m/b, /m/c\n")
    with pytest.raises(DataError, match=r"x\.lbl:2"):
        read_lbl(tmp_path / "x.lbl")
    (tmp_path / "y.lbl").write_text("a\t/m/a,,/m/b\n")
    with pytest.raises(DataError, match=r"y\.lbl:1: empty label key"):
        read_lbl(tmp_path / "y.lbl")


def test_missing_files(tmp_path: Path, data_dir: Path) -> None:
    with pytest.raises(DataError, match="eval.tsv"):
        load_manifest(data_dir, "eval")
    (data_dir / "labels.csv").unlink()
    assert "no label file" in _error(data_dir)
    (data_dir / "train.lbl").unlink()
    assert "train.lbl" in _error(data_dir)
    unlabelled = load_manifest(data_dir, "train", require_labels=False)
    assert len(unlabelled) == 3 and unlabelled.items[0].targets == () and unlabelled.num_classes == 0


def test_labels_can_come_from_objects_or_another_csv(data_dir: Path) -> None:
    labels = [Label(0, "/m/c", "Dog"), Label(1, "/m/b", "Man"), Label(2, "/m/a", "Speech")]
    m = load_manifest(data_dir, "train", labels=labels)
    assert [it.targets for it in m.items] == [(2,), (0, 1), (0,)]
    write_labels_csv(data_dir / "other.csv", labels)
    assert load_manifest(data_dir, "train", labels=data_dir / "other.csv").labels == tuple(labels)
    assert "index order" in _error(data_dir, labels=labels[::-1])
    assert "unique" in _error(data_dir, labels=[*labels[:2], Label(2, "/m/b")])


def test_labels_csv_quoting_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "labels.csv"
    path.write_text('1,/m/b,"Male speech, man speaking"\n0,/m/a,Speech\n2,/m/c,"Say ""hi"""\n')
    labels = read_labels_csv(path)
    assert labels == [Label(0, "/m/a", "Speech"), Label(1, "/m/b", "Male speech, man speaking"),
                      Label(2, "/m/c", 'Say "hi"')]
    write_labels_csv(tmp_path / "out.csv", labels)
    assert (tmp_path / "out.csv").read_text().splitlines()[1] == '1,/m/b,"Male speech, man speaking"'
    assert read_labels_csv(tmp_path / "out.csv") == labels


@pytest.mark.parametrize(
    ("text", "expected"),
    [("0,/m/a,A\nx,/m/b,B\n", "labels.csv:2: index 'x'"), ("0,/m/a,A\n0,/m/b,B\n", "labels.csv:2: index 0"),
     ("0,/m/a,A\n1,/m/a,B\n", "labels.csv:2: id '/m/a'"), ("0,/m/a,A\n2,/m/b,B\n", "without gaps"),
     ("0,/m/a,A,extra\n", "labels.csv:1: expected"), ("", "no labels")],
)
def test_malformed_labels_csv(tmp_path: Path, text: str, expected: str) -> None:
    (tmp_path / "labels.csv").write_text(text)
    with pytest.raises(DataError) as info:
        read_labels_csv(tmp_path / "labels.csv")
    assert expected in str(info.value)


@pytest.mark.parametrize(("text", "expected"), [("1.0\nabc\n", "w.csv:2"), ("1.0\n-2\n", "w.csv:2"),
                                                ("nan\n", "w.csv:1")])
def test_malformed_weights(tmp_path: Path, text: str, expected: str) -> None:
    (tmp_path / "w.csv").write_text(text)
    with pytest.raises(DataError, match=expected):
        read_weights(tmp_path / "w.csv")


def test_everything_filtered_is_an_error(data_dir: Path) -> None:
    assert "no clips left" in _error(data_dir, min_samples=10**9)
