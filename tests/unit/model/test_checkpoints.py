"""Official checkpoints load without fairseq and compute what the original computes (fixtures
made with the official implementation; max abs diff ≤ 1e-4 in fp32), our format round-trips, and
bad files fail with a clear error."""

from __future__ import annotations

import argparse
import json
import os
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from model.checkpoints import CheckpointError, build_model, load_checkpoint, save_checkpoint, save_state
from model.classifier import EATClassifier
from model.config import FrontendConfig, Label, tiny
from model.encoder import Encoder
from training.cli import main as eat_main

PARITY_ATOL = 1e-4


@pytest.fixture(scope="module")
def official(fixtures_dir: Path) -> Path:
    return fixtures_dir / "eat-official"


@pytest.fixture(scope="module")
def io(official: Path) -> dict[str, np.ndarray]:
    return dict(np.load(official / "io.npz"))


def _run(model: torch.nn.Module, fbank: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(fbank)).numpy()


def _max_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max())


@pytest.mark.parametrize(("teacher", "key"), [(False, "student_features"), (True, "teacher_features")])
def test_fairseq_pretraining_parity(official: Path, io: dict, teacher: bool, key: str) -> None:
    loaded = load_checkpoint(official / "pretrain.pt", teacher=teacher)
    model = build_model(loaded)
    assert isinstance(model, Encoder)
    diff = _max_diff(_run(model, io["fbank"]), io[key])
    print(f"parity {key}: max abs diff {diff:.2e}")
    assert diff <= PARITY_ATOL


@pytest.mark.parametrize("source", ["finetune.pt", "hf"])
def test_finetuned_parity_fairseq_and_hf(official: Path, io: dict, source: str) -> None:
    model = build_model(load_checkpoint(official / source))
    assert isinstance(model, EATClassifier)
    logits_diff = _max_diff(_run(model, io["fbank"]), io["finetune_logits"])
    feats_diff = _max_diff(_run(model.encoder, io["fbank"]), io["finetune_features"])
    print(f"parity {source}: logits {logits_diff:.2e}, features {feats_diff:.2e}")
    assert logits_diff <= PARITY_ATOL and feats_diff <= PARITY_ATOL


def test_pretraining_checkpoint_carries_the_decoder_and_frontend(official: Path) -> None:
    loaded = load_checkpoint(official / "pretrain.pt")
    cfg = loaded.config
    assert (cfg.embed_dim, cfg.depth, cfg.num_heads, cfg.num_classes) == (64, 2, 2, 0)
    assert (cfg.decoder_dim, cfg.decoder_layers, cfg.decoder_kernel, cfg.decoder_groups) == (64, 2, 3, 16)
    assert sorted(k for k in loaded.state_dict if k.startswith("decoder.")) == [
        "decoder.blocks.0.conv.bias", "decoder.blocks.0.conv.weight",
        "decoder.blocks.1.conv.bias", "decoder.blocks.1.conv.weight",
        "decoder.proj.bias", "decoder.proj.weight",
    ]  # fmt: skip
    assert loaded.frontend == FrontendConfig()
    assert all(v.dtype == torch.float32 for v in loaded.state_dict.values())


def test_finetuned_checkpoint_labels_and_sha(official: Path) -> None:
    loaded = load_checkpoint(official / "finetune.pt")
    assert [lb.id for lb in loaded.labels] == [f"/m/fix0{i}" for i in range(10)]
    meta = json.loads((official / "meta.json").read_text())
    assert loaded.source_sha256 in json.dumps(meta)


def test_fp32_student_and_old_position_table(official: Path, io: dict, tmp_path: Path) -> None:
    ckpt = torch.load(official / "pretrain.pt", map_location="cpu", weights_only=True)
    reference = _run(build_model(load_checkpoint(official / "pretrain.pt")), io["fbank"])
    key = "modality_encoders.IMAGE.fixed_positional_encoder.positions"
    ckpt["model"] = {k: (v.float() if isinstance(v, torch.Tensor) else v) for k, v in ckpt["model"].items()}
    ckpt["model"][key] = ckpt["model"][key][:, :512].clone()  # a pre-April-2024 file
    path = tmp_path / "old_fp32.pt"
    torch.save(ckpt, path)
    model = build_model(load_checkpoint(path))
    assert _max_diff(_run(model, io["fbank"]), reference) == 0.0
    # Inputs longer than the stored table get exact sin-cos rows past row 512.
    with torch.no_grad():
        assert model(torch.zeros(1, 1, 2048, 128)).shape == (1, 1 + 1024, 64)


def test_our_format_round_trip(official: Path, io: dict, tmp_path: Path) -> None:
    loaded = load_checkpoint(official / "finetune.pt")
    labels = [Label(i, f"/m/x{i}", f"Class, {i}") for i in range(10)]
    out = save_state(tmp_path / "ft.safetensors", loaded.state_dict, loaded.config, loaded.frontend, labels,
                     "fixture", loaded.source_sha256)
    back = load_checkpoint(out)
    assert back.source_format == "eat" and back.labels == labels and back.name == "fixture"
    assert back.config == loaded.config and back.frontend == loaded.frontend
    assert back.source_sha256 == loaded.source_sha256
    assert _max_diff(_run(build_model(back), io["fbank"]), io["finetune_logits"]) <= PARITY_ATOL

    encoder = Encoder(tiny())
    encoder.init_weights()
    path = save_checkpoint(tmp_path / "enc.safetensors", encoder, FrontendConfig.preset("esc50", 512))
    again = build_model(load_checkpoint(path))
    x = torch.randn(1, 1, 64, 128)
    with torch.no_grad():
        torch.testing.assert_close(again(x), encoder.eval()(x), rtol=0, atol=0)


def test_teacher_of_a_finetuned_file_is_refused(official: Path) -> None:
    with pytest.raises(CheckpointError, match="pre-training checkpoint"):
        load_checkpoint(official / "finetune.pt", teacher=True)


def test_other_fairseq_versions_namespace_numpy_omegaconf(official: Path, io: dict, tmp_path: Path) -> None:
    """Pre-hydra fairseq stores argparse.Namespace; others numpy scalars or omegaconf objects."""
    ckpt = torch.load(official / "finetune.pt", map_location="cpu", weights_only=True)
    ckpt["args"] = argparse.Namespace(arch="data2vec_multi", lr=[5e-5])
    ckpt["extra_state"] = {"best": np.float64(0.4), "table": np.arange(3)}
    pkg, sub = types.ModuleType("omegaconf"), types.ModuleType("omegaconf.dictconfig")

    class DictConfig:
        def __init__(self) -> None:
            self._content = {"model": {"pretrained_model_args": {"model": {"num_heads": 2}}}}

    DictConfig.__module__ = "omegaconf.dictconfig"
    DictConfig.__qualname__ = "DictConfig"
    sub.DictConfig = DictConfig
    sys.modules.update({"omegaconf": pkg, "omegaconf.dictconfig": sub})
    try:
        ckpt["cfg"] = DictConfig()
        path = tmp_path / "other.pt"
        torch.save(ckpt, path)
    finally:
        del sys.modules["omegaconf"], sys.modules["omegaconf.dictconfig"]
    model = build_model(load_checkpoint(path))
    assert _max_diff(_run(model, io["fbank"]), io["finetune_logits"]) <= PARITY_ATOL


class _Exploit:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # what a booby-trapped download would contain
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_refused_without_running_it(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"model": {}, "payload": _Exploit(marker)}, path)
    with pytest.raises(CheckpointError, match="system.*refusing"):
        load_checkpoint(path)
    assert not marker.exists()


def test_truncated_files(official: Path, tmp_path: Path) -> None:
    data = (official / "finetune.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_checkpoint(tmp_path / "cut.pt")
    ours = save_checkpoint(tmp_path / "m.safetensors", Encoder(tiny(depth=1)), FrontendConfig())
    blob = ours.read_bytes()
    ours.write_bytes(blob[: len(blob) - 1000])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_checkpoint(ours)


def test_foreign_files(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    for i in range(64):  # noise of every kind: some looks like a pickle, some like safetensors
        noise = rng.integers(0, 256, 4096, dtype=np.uint8).tobytes()
        if i % 4 == 0:
            noise = b"\x80\x02" + noise
        (tmp_path / "noise.bin").write_bytes(noise)
        with pytest.raises(CheckpointError):
            load_checkpoint(tmp_path / "noise.bin")
    torch.save({"model": {"conv1.weight": torch.zeros(3), "fc.bias": torch.zeros(2)}}, tmp_path / "resnet.pt")
    with pytest.raises(CheckpointError, match="conv1.weight"):
        load_checkpoint(tmp_path / "resnet.pt")
    torch.save([1, 2, 3], tmp_path / "list.pt")
    with pytest.raises(CheckpointError, match="not a fairseq checkpoint"):
        load_checkpoint(tmp_path / "list.pt")
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "absent.pt")


def test_missing_and_mismatched_keys_are_named(official: Path, tmp_path: Path) -> None:
    ckpt = torch.load(official / "finetune.pt", map_location="cpu", weights_only=True)
    del ckpt["model"]["model.blocks.1.mlp.fc2.bias"]
    ckpt["model"]["head.bias"] = torch.zeros(11, dtype=torch.float16)
    torch.save(ckpt, tmp_path / "broken.pt")
    with pytest.raises(CheckpointError) as err:
        build_model(load_checkpoint(tmp_path / "broken.pt"))
    assert "encoder.blocks.1.mlp.fc2.bias" in str(err.value) and "head.bias" in str(err.value)


def test_convert_cli(official: Path, io: dict, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "student.safetensors"
    assert eat_main(["convert", str(official / "pretrain.pt"), str(out)]) == 0
    back = load_checkpoint(out)
    assert any(k.startswith("decoder.") for k in back.state_dict)
    assert _max_diff(_run(build_model(back), io["fbank"]), io["student_features"]) <= PARITY_ATOL

    assert eat_main(["convert", str(official / "pretrain.pt"), str(tmp_path / "t.safetensors"), "--teacher"]) == 0
    teacher = build_model(load_checkpoint(tmp_path / "t.safetensors"))
    assert _max_diff(_run(teacher, io["fbank"]), io["teacher_features"]) <= PARITY_ATOL

    labels = tmp_path / "labels.csv"
    labels.write_text("".join(f'{i},/m/l{i},"Name, {i}"\n' for i in range(10)))
    out = tmp_path / "ft.safetensors"
    assert eat_main(["convert", str(official / "hf"), str(out), "--labels", str(labels)]) == 0
    assert load_checkpoint(out).labels[3] == Label(3, "/m/l3", "Name, 3")

    labels.write_text("0,/m/a,A\n1,/m/b,B\n")
    assert eat_main(["convert", str(official / "finetune.pt"), str(out), "--labels", str(labels)]) == 2
    assert "2 labels" in capsys.readouterr().err
    assert eat_main(["convert", str(tmp_path / "nope.pt"), str(out)]) == 2
    assert "not found" in capsys.readouterr().err


def test_safetensors_whose_header_length_starts_with_0x80(tmp_path: Path) -> None:
    """A header length of 0x..80 once made our own files look like pickles."""
    encoder = Encoder(tiny(depth=1))
    for name_len in range(256):  # vary the header length until its low byte is 0x80
        path = save_checkpoint(tmp_path / "m.safetensors", encoder, FrontendConfig(), name="x" * name_len)
        if path.read_bytes()[0] == 0x80:
            break
    else:
        pytest.fail("no header length with low byte 0x80 found")
    assert load_checkpoint(path).name == "x" * name_len
