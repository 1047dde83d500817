"""ONNX export: the contract (inputs, outputs, metadata), dynamic batch, parity with PyTorch in fp32
and fp16, headless models, the official fixture end to end, and refusing a file that disagrees."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from model.checkpoints import save_checkpoint
from model.classifier import EATClassifier
from model.config import FrontendConfig, Label, tiny
from model.encoder import Encoder
from model.frontend import LogMelFrontend
from model.pipeline import ClassifierHeads, EmbeddingHeads, WaveformModel, WindowError, window_frames
from training import cli, export
from training.export import FP16_RELATIVE_TOLERANCE, ExportError, VerificationError, export_onnx

WINDOW_S = 2.0
WINDOW_SAMPLES = 32_000  # 2 s at 16 kHz -> 198 frames -> 208 target frames
NUM_CLASSES = 10
LABELS = [Label(i, f"/m/test{i:02d}", f"Sound {i}") for i in range(NUM_CLASSES)]


def _tiny_cfg(num_classes: int = NUM_CLASSES):
    return tiny(embed_dim=64, depth=2, num_heads=2, num_classes=num_classes, decoder_dim=64)


@pytest.fixture(scope="module")
def classifier() -> EATClassifier:
    torch.manual_seed(0)
    model = EATClassifier(_tiny_cfg()).eval()
    model.init_weights()
    with torch.no_grad():  # a non-trivial head, so logits are not all near zero
        model.head.weight.normal_(std=0.5)
        model.fc_norm.bias.normal_(std=0.2)
    return model


@pytest.fixture(scope="module")
def esc_frontend() -> FrontendConfig:
    # non-default normalisation must reach the metadata; 208 trained frames cover the 2 s window
    return FrontendConfig.preset("esc50", target_frames=208)


@pytest.fixture(scope="module")
def fp32_export(classifier, esc_frontend, tmp_path_factory) -> export.ExportReport:
    out = tmp_path_factory.mktemp("fp32") / "model.onnx"
    return export_onnx(
        classifier, out, window_seconds=WINDOW_S, frontend=esc_frontend, labels=LABELS, name="tiny-test",
        source_sha256="ab" * 32,
    )  # fmt: skip


@pytest.fixture(scope="module")
def fp16_cli_export(classifier, esc_frontend, tmp_path_factory) -> tuple[Path, str]:
    """``eat export --fp16`` on our own checkpoint format: the written file and what the command printed."""
    tmp = tmp_path_factory.mktemp("fp16")
    ckpt = save_checkpoint(tmp / "tiny.safetensors", classifier, esc_frontend, labels=LABELS, name="cli-tiny")
    out = tmp / "out" / "model.onnx"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert cli.main(["export", str(ckpt), str(out), "--window-seconds", str(WINDOW_S), "--fp16"]) == 0
    return out, printed.getvalue()


def _reference(model: torch.nn.Module, frontend: FrontendConfig, waveform: np.ndarray, num_samples: np.ndarray):
    heads = ClassifierHeads(model) if isinstance(model, EATClassifier) else EmbeddingHeads(model)
    twin = WaveformModel(LogMelFrontend(frontend), heads).eval()
    return export.torch_outputs(twin, waveform, num_samples)


def _clips(batch: int, lengths: list[int], seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    waveform = np.zeros((batch, WINDOW_SAMPLES), dtype=np.float32)
    for row, n in enumerate(lengths):
        t = np.arange(n) / 16_000
        waveform[row, :n] = 0.3 * np.sin(2 * np.pi * (200 + 300 * row) * t) + 0.05 * rng.standard_normal(n)
    return waveform, np.asarray(lengths, dtype=np.int64)


def _metadata(path: Path) -> dict[str, str]:
    return {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}


def test_window_frames_follows_eat_padding():
    table = 12_288
    assert window_frames(10.0, 1024, table) == (160_000, 1024)  # 998 frames padded to EAT's 1024
    assert window_frames(2.0, 1024, table) == (32_000, 1024)  # a short window: EAT pads it to 1024 too
    assert window_frames(5.0, 512, table) == (80_000, 512)  # ESC-50: 498 frames -> 512
    assert window_frames(12.0, 1024, table) == (192_000, 1200)  # longer than trained: 1198 -> 1200
    assert window_frames(WINDOW_S, 1024, table, target_frames=208) == (WINDOW_SAMPLES, 208)
    with pytest.raises(WindowError, match="at least 208"):
        window_frames(WINDOW_S, 1024, table, target_frames=192)
    with pytest.raises(WindowError, match="multiple of 16"):
        window_frames(WINDOW_S, 1024, table, target_frames=210)
    with pytest.raises(WindowError, match="no 25 ms frame"):
        window_frames(0.01, 1024, table)
    with pytest.raises(WindowError, match="position table"):
        window_frames(200.0, 1024, table)
    with pytest.raises(WindowError, match="positive"):
        window_frames(-1.0, 1024, table)


def test_metadata_follows_the_contract(fp32_export, esc_frontend):
    meta = _metadata(fp32_export.path)
    assert meta["eat.format_version"] == "1"
    assert meta["eat.model_name"] == "tiny-test"
    assert json.loads(meta["eat.labels"]) == [[lb.index, lb.id, lb.display_name] for lb in LABELS]
    assert meta["eat.sample_rate"] == "16000"
    assert meta["eat.window_samples"] == str(WINDOW_SAMPLES)
    assert meta["eat.target_frames"] == "208"
    assert float(meta["eat.norm_mean"]) == esc_frontend.norm_mean
    assert float(meta["eat.norm_std"]) == esc_frontend.norm_std
    assert meta["eat.embedding_dim"] == "64"
    assert meta["eat.num_classes"] == str(NUM_CLASSES)
    assert meta["eat.precision"] == "fp32"
    assert meta["eat.source_sha256"] == "ab" * 32
    assert meta["eat.time_patches"] == "13"
    assert meta["eat.freq_patches"] == "8"
    assert json.loads(meta["eat.fusions"]) == {}
    assert fp32_export.metadata == meta


def test_graph_inputs_outputs_and_single_file(fp32_export):
    model = onnx.load(str(fp32_export.path))
    assert not any(init.data_location == onnx.TensorProto.EXTERNAL for init in model.graph.initializer), (
        "weights must be inside the one file"
    )
    assert min(op.version for op in model.opset_import if op.domain in ("", "ai.onnx")) >= 18

    def shape(value):
        return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]

    inputs = {v.name: v for v in model.graph.input}
    outputs = {v.name: v for v in model.graph.output}
    assert list(inputs) == ["waveform", "num_samples"]
    assert list(outputs) == ["embedding", "tokens", "logits"]
    assert inputs["waveform"].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert inputs["num_samples"].type.tensor_type.elem_type == onnx.TensorProto.INT64
    batch = shape(inputs["waveform"])[0]
    assert isinstance(batch, str), "the batch axis must be symbolic"
    assert shape(inputs["waveform"]) == [batch, WINDOW_SAMPLES]
    assert shape(outputs["tokens"]) == [batch, 13 * 8, 64]
    assert shape(outputs["logits"]) == [batch, NUM_CLASSES]


@pytest.mark.parametrize("lengths", [[WINDOW_SAMPLES], [WINDOW_SAMPLES, 7_000, 300]], ids=["B1", "B3"])
def test_dynamic_batch_and_valid_lengths_match_pytorch(fp32_export, classifier, esc_frontend, lengths):
    waveform, num_samples = _clips(len(lengths), lengths)
    session = ort.InferenceSession(str(fp32_export.path), providers=["CPUExecutionProvider"])
    got = session.run(None, {"waveform": waveform, "num_samples": num_samples})
    want = _reference(classifier, esc_frontend, waveform, num_samples)
    for name, g, w in zip(fp32_export.outputs, got, want, strict=True):
        assert g.shape == w.shape and g.dtype == np.float32
        assert np.abs(g - w).max() <= 1e-4, name
    # a short clip's features ignore what lies past num_samples
    if len(lengths) > 1:
        noisy = waveform.copy()
        noisy[1, lengths[1] :] = 0.5
        again = session.run(["logits"], {"waveform": noisy, "num_samples": num_samples})[0]
        np.testing.assert_allclose(again[1], got[2][1], atol=1e-5)


def test_fp32_report_meets_tolerance(fp32_export):
    assert fp32_export.precision == "fp32"
    assert set(fp32_export.max_abs_diff) == {"embedding", "tokens", "logits"}
    assert all(diff <= 1e-4 for diff in fp32_export.max_abs_diff.values())
    assert fp32_export.top5_agree is None
    assert fp32_export.size_bytes == fp32_export.path.stat().st_size


def test_fp16_export_is_fused_within_tolerance_with_same_top5(fp16_cli_export, classifier, esc_frontend):
    path, printed = fp16_cli_export
    meta = _metadata(path)
    assert meta["eat.precision"] == "fp16"
    fusions = json.loads(meta["eat.fusions"])
    assert fusions.get("MultiHeadAttention") == classifier.cfg.depth
    assert fusions.get("SkipLayerNormalization") == 2 * classifier.cfg.depth
    assert fusions.get("BiasGelu") == classifier.cfg.depth
    assert f"attention {classifier.cfg.depth}" in printed and "top-5 classes agree" in printed

    model = onnx.load(str(path))
    assert all(
        v.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
        for v in [*model.graph.input, *model.graph.output]
        if v.name != "num_samples"
    )
    assert any(init.data_type == onnx.TensorProto.FLOAT16 for init in model.graph.initializer)

    waveform, num_samples = _clips(3, [WINDOW_SAMPLES, 12_000, 5_000], seed=7)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {"waveform": waveform, "num_samples": num_samples})
    want = _reference(classifier, esc_frontend, waveform, num_samples)
    for name, g, w in zip(["embedding", "tokens", "logits"], got, want, strict=True):
        assert g.dtype == np.float32
        assert np.abs(g - w).max() <= FP16_RELATIVE_TOLERANCE * max(1.0, np.abs(w).max()), name
    for g, w in zip(got[2], want[2], strict=True):
        assert set(np.argsort(-g)[:5]) == set(np.argsort(-w)[:5])


def test_headless_encoder_has_no_logits(tmp_path):
    torch.manual_seed(1)
    encoder = Encoder(_tiny_cfg(num_classes=0)).eval()
    encoder.init_weights()
    encoder.train()
    report = export_onnx(encoder, tmp_path / "enc.onnx", window_seconds=1.0, target_frames=112, name="enc")
    assert encoder.training, "export must not change the caller's model"
    assert report.outputs == ("embedding", "tokens")
    session = ort.InferenceSession(str(report.path), providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()] == ["embedding", "tokens"]
    meta = _metadata(report.path)
    assert meta["eat.num_classes"] == "0"
    assert json.loads(meta["eat.labels"]) == []
    assert meta["eat.window_samples"] == "16000" and meta["eat.target_frames"] == "112"  # 98 frames -> 112


def test_refuses_a_file_that_disagrees(classifier, tmp_path, monkeypatch):
    out = tmp_path / "model.onnx"
    out.write_bytes(b"previous model")
    real = export.torch_outputs

    def drifted(*args, **kwargs):
        outputs = real(*args, **kwargs)
        outputs[-1] = outputs[-1] + 1e-3  # logits off by 10x the fp32 tolerance
        return outputs

    monkeypatch.setattr(export, "torch_outputs", drifted)
    with pytest.raises(VerificationError, match=r"logits: max abs diff .* > 0\.0001"):
        export_onnx(classifier, out, window_seconds=1.0, target_frames=112)
    assert out.read_bytes() == b"previous model", "a failed export must not touch the existing file"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"], "no temp file may be left behind"


def test_rejects_labels_that_do_not_fit_the_head(classifier, tmp_path):
    with pytest.raises(ExportError, match="labels must cover"):
        export_onnx(classifier, tmp_path / "x.onnx", window_seconds=1.0, target_frames=112, labels=LABELS[:3])
    assert not (tmp_path / "x.onnx").exists()


@pytest.mark.parametrize("source", ["finetune.pt", "hf"])
def test_official_fixture_reproduces_official_logits(fixtures_dir, tmp_path, source):
    """Official fairseq / HF files straight to ONNX; onnxruntime from the raw waveforms must give the
    official logits. A 164 080-sample window (exactly 1024 frames) lets clip12 crop as EAT does."""
    official = fixtures_dir / "eat-official"
    io = np.load(official / "io.npz")
    cases = np.load(fixtures_dir / "fbank" / "cases.npz")
    report = export_onnx(official / source, tmp_path / "official.onnx", window_seconds=164_080 / 16_000)
    assert report.target_frames == 1024 and report.window_samples == 164_080
    names = [str(n) for n in io["all_case_names"]]
    waveform = np.zeros((len(names), report.window_samples), dtype=np.float32)
    num_samples = np.zeros(len(names), dtype=np.int64)
    for row, name in enumerate(names):
        audio = cases[f"wav_{name}"][: report.window_samples]
        waveform[row, : len(audio)] = audio
        num_samples[row] = len(audio)
    session = ort.InferenceSession(str(report.path), providers=["CPUExecutionProvider"])
    logits, embedding = session.run(["logits", "embedding"], {"waveform": waveform, "num_samples": num_samples})
    # README §4 allows 1e-3 end to end (torchaudio's fbank vs ours); this front end gets within 1e-4.
    assert np.abs(logits - io["finetune_logits_all"]).max() <= 1e-4
    assert np.abs(embedding - io["finetune_cls_all"]).max() <= 1e-4
    assert report.max_abs_diff["logits"] <= 1e-4
    meta = _metadata(report.path)
    assert meta["eat.num_classes"] == "10" and len(json.loads(meta["eat.labels"])) == 10
    assert len(meta["eat.source_sha256"]) == 64


def test_cli_exports_our_checkpoint(fp16_cli_export):
    path, printed = fp16_cli_export
    assert "verified against PyTorch" in printed
    meta = _metadata(path)
    assert meta["eat.model_name"] == "cli-tiny"
    assert meta["eat.target_frames"] == "208" and meta["eat.window_samples"] == str(WINDOW_SAMPLES)
    assert meta["eat.norm_mean"] == repr(FrontendConfig.preset("esc50").norm_mean)
    assert json.loads(meta["eat.labels"])[3] == [3, "/m/test03", "Sound 3"]


def test_cli_reports_bad_input_as_one_line(tmp_path, capsys):
    assert cli.main(["export", str(tmp_path / "missing.pt"), str(tmp_path / "m.onnx")]) == 2
    assert "eat export: error: checkpoint not found" in capsys.readouterr().err
    assert not (tmp_path / "m.onnx").exists()
