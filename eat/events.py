"""Sound events with times: per-class ``onset_s``/``offset_s`` from the scores of overlapping windows.

EAT scores whole windows (10 s for the AudioSet exports), so *when* a sound happens must come from how
the windows overlap. With windows ``hop`` apart, every stretch of time between two window edges is
covered by a run of consecutive windows. A stretch counts as active for a class when **every** window
covering it scores above the class's threshold (the minimum over the covering windows). For a sound
from ``a`` to ``b`` and a model that fires on any window containing it, the windows covering a point
``t`` all contain the sound exactly when ``a < t < b`` — the minimum recovers the event to within one
hop, where the mean would widen it by half a window on each side. Where fewer windows cover a point
(within one window of the clip's start or end) the estimate can only be as fine as those windows.

Steps, per class: (1) a running median over the window sequence removes a lone window that fires or
misses; (2) the minimum over covering windows gives a score per stretch; (3) stretches at or above the
threshold become segments; (4) segments less than ``merge_gap_s`` apart are merged; (5) segments shorter
than ``min_duration_s`` are dropped. An event's ``peak_score`` is the highest (unsmoothed) score of the
windows that overlap it.

Thresholds: one global threshold, or per class from a JSON file ``{"default": 0.5, "classes":
{"Siren": 0.3, "/m/09x0r": 0.6}}`` whose class keys are label ids or display names.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

import numpy as np

from eat.contract import Label

DEFAULT_THRESHOLD = 0.5


@dataclass(frozen=True)
class Event:
    index: int
    id: str
    name: str
    onset_s: float
    offset_s: float
    peak_score: float


@dataclass(frozen=True)
class EventOptions:
    """How window scores become events. Defaults suit EAT's 10 s windows with a 1 s hop.

    - ``median_windows``: length (odd) of the running median over the window sequence. It is capped
      at the number of windows that cover one point (window / hop), so that the shortest sound, which
      lights up that many windows, survives; without overlap (hop = window) there is no smoothing.
    - ``merge_gap_s``: segments of one class separated by less than this become one event.
    - ``min_duration_s``: events shorter than this are dropped (0: keep all).
    """

    median_windows: int = 3
    merge_gap_s: float = 1.0
    min_duration_s: float = 0.0

    def __post_init__(self) -> None:
        if self.median_windows < 1 or self.median_windows % 2 == 0:
            raise ValueError(f"median_windows must be odd and at least 1, got {self.median_windows}")
        if self.merge_gap_s < 0 or self.min_duration_s < 0:
            raise ValueError("merge_gap_s and min_duration_s must not be negative")


@dataclass(frozen=True)
class Thresholds:
    """A global threshold and per-class overrides keyed by label id or display name."""

    default: float = DEFAULT_THRESHOLD
    classes: Mapping[str, float] = field(default_factory=lambda: MappingProxyType({}))

    def __post_init__(self) -> None:
        for key, value in {"default": self.default, **self.classes}.items():
            if not (isinstance(value, int | float) and not isinstance(value, bool) and 0.0 <= value <= 1.0):
                raise ValueError(f"threshold {key!r} must be a number in [0, 1], got {value!r}")

    def with_default(self, default: float | None) -> Thresholds:
        """The same per-class thresholds around another global one (None keeps this one's)."""
        return self if default is None else Thresholds(default, self.classes)

    def for_labels(self, labels: tuple[Label, ...]) -> np.ndarray:
        """The threshold of every class [C]; a key that names no label is an error, not ignored."""
        thresholds = np.full(len(labels), self.default, dtype=np.float32)
        by_key: dict[str, int] = {}
        for label in labels:
            by_key.setdefault(label.display_name, label.index)
            by_key[label.id] = label.index  # ids win over display names
        unknown = sorted(key for key in self.classes if key not in by_key)
        if unknown:
            raise ValueError(f"thresholds for classes the model does not have: {', '.join(unknown[:10])}")
        for key, value in self.classes.items():
            thresholds[by_key[key]] = value
        return thresholds


def read_thresholds(path: str | os.PathLike[str]) -> Thresholds:
    """Parse a thresholds file; raises ``ValueError`` naming the file for any malformed content."""
    try:
        raw = json.loads(open(path, encoding="utf-8").read())  # noqa: SIM115 - small file, read at start-up
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: cannot read thresholds: {err}") from None
    if not isinstance(raw, dict) or set(raw) - {"default", "classes"}:
        raise ValueError(f'{path}: expected {{"default": 0.5, "classes": {{"label id or name": 0.3}}}}')
    classes = raw.get("classes", {})
    if not isinstance(classes, dict):
        raise ValueError(f"{path}: 'classes' must map label ids or names to thresholds")
    try:
        return Thresholds(raw.get("default", DEFAULT_THRESHOLD), MappingProxyType(dict(classes)))
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from None


def median_filter(scores: np.ndarray, length: int) -> np.ndarray:
    """Running median of ``scores`` [W, C] along windows, edges repeated; ``length`` odd."""
    if length <= 1 or len(scores) < 2:
        return scores
    half = length // 2
    padded = np.pad(scores, ((half, half), (0, 0)), mode="edge")  # [W + 2h, C]
    views = np.lib.stride_tricks.sliding_window_view(padded, length, axis=0)  # [W, C, length]
    return np.median(views, axis=-1).astype(scores.dtype)


def _windows_per_point(starts: np.ndarray, ends: np.ndarray) -> int:
    """How many windows cover a point in the clip's interior (1 when windows do not overlap)."""
    if len(starts) < 2:
        return 1
    hop = float(np.min(np.diff(starts)))
    window = float(np.max(ends - starts))
    return max(1, math.floor(window / hop + 1e-9)) if hop > 0 else 1


def stretch_scores(scores: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Cut the clip at every window edge; each stretch's score is the min over the windows covering it.

    Returns ``edges`` [M + 1] seconds and ``stretch`` [M, C]. Window starts and ends are both
    non-decreasing, so the windows covering a stretch are one contiguous run ``[lo, hi)``.
    """
    edges = np.unique(np.concatenate([starts, ends]))  # [M + 1]
    stretch = np.empty((len(edges) - 1, scores.shape[1]), dtype=np.float32)
    for m in range(len(edges) - 1):
        mid = 0.5 * (edges[m] + edges[m + 1])
        lo = int(np.searchsorted(ends, mid, side="right"))  # first window ending after mid
        hi = int(np.searchsorted(starts, mid, side="right"))  # windows starting before mid
        assert hi > lo, "windows must cover the clip without gaps"
        stretch[m] = scores[lo:hi].min(axis=0)
    return edges, stretch


def _segments(active: np.ndarray, edges: np.ndarray, merge_gap_s: float) -> list[tuple[float, float]]:
    """Runs of True in ``active`` [M] as (onset, offset) seconds, merging gaps under ``merge_gap_s``."""
    segments: list[tuple[float, float]] = []
    m = 0
    while m < len(active):
        if not active[m]:
            m += 1
            continue
        end = m
        while end < len(active) and active[end]:
            end += 1
        onset, offset = float(edges[m]), float(edges[end])
        if segments and onset - segments[-1][1] < merge_gap_s:
            segments[-1] = (segments[-1][0], offset)
        else:
            segments.append((onset, offset))
        m = end
    return segments


def detect_events(
    window_scores: np.ndarray,
    window_start_s: np.ndarray,
    window_end_s: np.ndarray,
    labels: tuple[Label, ...],
    *,
    thresholds: np.ndarray | float = DEFAULT_THRESHOLD,
    options: EventOptions = EventOptions(),  # frozen, so one shared default is safe
) -> list[Event]:
    """Events of one clip from its windows' scores [W, C] and spans [W] (seconds), by onset then class.

    ``thresholds`` is one number or one per class [C] (``Thresholds.for_labels``).
    """
    starts = np.asarray(window_start_s, dtype=np.float64)
    ends = np.asarray(window_end_s, dtype=np.float64)
    if window_scores.ndim != 2 or len(window_scores) != len(starts) or len(starts) != len(ends):
        raise ValueError(f"scores {window_scores.shape} do not match {len(starts)} window spans")
    if len(starts) == 0:
        return []
    per_class = np.broadcast_to(np.asarray(thresholds, dtype=np.float32), (window_scores.shape[1],))
    length = min(options.median_windows, _windows_per_point(starts, ends))
    length -= 1 - length % 2  # keep it odd
    edges, stretch = stretch_scores(median_filter(window_scores, length), starts, ends)
    events = []
    for c in np.flatnonzero((stretch >= per_class).any(axis=0)):
        for onset, offset in _segments(stretch[:, c] >= per_class[c], edges, options.merge_gap_s):
            if offset - onset < options.min_duration_s:
                continue
            overlapping = (starts < offset) & (ends > onset)
            label = labels[c]
            events.append(
                Event(
                    index=label.index,
                    id=label.id,
                    name=label.display_name,
                    onset_s=round(onset, 4),
                    offset_s=round(offset, 4),
                    peak_score=round(float(window_scores[overlapping, c].max()), 6),
                )
            )
    return sorted(events, key=lambda e: (e.onset_s, e.index))
