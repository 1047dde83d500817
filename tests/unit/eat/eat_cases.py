"""Where the official cases lie in the ``case_dir`` fixture."""

from __future__ import annotations

from pathlib import Path


def case_path(case_dir: Path, name: str) -> Path:
    return case_dir / "sub" / f"{name}.wav" if name == "clip12" else case_dir / f"{name}.wav"
