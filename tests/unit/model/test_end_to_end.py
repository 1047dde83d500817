"""Waveform -> our front end -> official fine-tuned weights -> logits, against the official logits
(computed from torchaudio's float32 fbank; fixtures README §4 suggests 1e-3, we hold 1e-4)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from model.checkpoints import build_model, load_checkpoint
from model.frontend import LogMelFrontend


def test_waveform_to_logits_matches_official(fixtures_dir: Path) -> None:
    io = np.load(fixtures_dir / "eat-official" / "io.npz")
    cases = np.load(fixtures_dir / "fbank" / "cases.npz")
    loaded = load_checkpoint(fixtures_dir / "eat-official" / "finetune.pt")
    model, frontend = build_model(loaded), LogMelFrontend(loaded.frontend)
    names = [str(n) for n in io["all_case_names"]]
    waves = [torch.from_numpy(cases[f"wav_{n}"]) for n in names]
    batch = torch.nn.utils.rnn.pad_sequence(waves, batch_first=True)  # one batch, mixed valid lengths
    lengths = torch.tensor([len(w) for w in waves])
    with torch.no_grad():
        logits = model(frontend(batch, lengths)).numpy()
    diff = np.abs(logits - io["finetune_logits_all"]).max(axis=1)
    print("end-to-end logits max abs diff per case:", dict(zip(names, diff.round(7).tolist(), strict=True)))
    assert diff.max() <= 1e-4  # observed ≈ 4e-6: our float64 DFT is closer to EAT than its own float32
