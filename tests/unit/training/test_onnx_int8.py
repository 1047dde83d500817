"""int8 export: what is quantised and what stays float32, the check clips, the built-in verification,
the official fixture, and the service's engine (``eat.engine.OnnxEngine``) serving the file unchanged."""

from __future__ import annotations

import contextlib
import io
import json
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import soundfile as sf
import torch

from eat.engine import OnnxEngine
from model.checkpoints import save_checkpoint
from model.classifier import EATClassifier
from model.config import FrontendConfig, Label, tiny
from model.encoder import Encoder
from model.frontend import LogMelFrontend
from model.pipeline import ClassifierHeads, WaveformModel
from training import cli, export, onnx_int8
from training.export import (
    INT8_RELATIVE_TOLERANCE,
    ExportError,
    VerificationError,
    export_onnx,
)

WINDOW_S = 2.0
WINDOW_SAMPLES = 32_000
NUM_CLASSES = 10
DEPTH = 2
LABELS = [Label(i, f"/m/int8{i:02d}", f"Sound {i}") for i in range(NUM_CLASSES)]


@pytest.fixture(scope="module")
def classifier() -> EATClassifier:
    torch.manual_seed(3)
    model = EATClassifier(tiny(embed_dim=64, depth=DEPTH, num_heads=2, num_classes=NUM_CLASSES, decoder_dim=64))
    model.init_weights()
    with torch.no_grad():  # logits spread like a trained head's, so the top-5 is well defined
        model.head.weight.normal_(std=0.5)
        model.fc_norm.bias.normal_(std=0.2)
    return model.eval()


@pytest.fixture(scope="module")
def frontend() -> FrontendConfig:
    return FrontendConfig.preset("esc50", target_frames=208)


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory) -> Path:
    """Three clips as a user would pass them: 16 kHz mono, 22.05 kHz stereo (resampled), and one longer
    than the window in a subfolder (cut); plus a file that is not audio, which is skipped."""
    root = tmp_path_factory.mktemp("clips")
    rng = np.random.default_rng(5)
    t = np.arange(WINDOW_SAMPLES) / 16_000
    sf.write(root / "a_tone.wav", 0.4 * np.sin(2 * np.pi * 660 * t) + 0.01 * rng.standard_normal(len(t)), 16_000)
    stereo = 0.1 * rng.standard_normal((11_025, 2))
    sf.write(root / "b_stereo.flac", stereo, 22_050)
    (root / "sub").mkdir()
    sf.write(root / "sub" / "c_long.wav", 0.2 * rng.standard_normal(3 * WINDOW_SAMPLES), 16_000)
    (root / "notes.txt").write_text("not audio")
    return root


@pytest.fixture(scope="module")
def int8_cli_export(classifier, frontend, clip_dir, tmp_path_factory) -> tuple[Path, str]:
    """``eat export --int8 --check-clips DIR`` on our checkpoint format: the file and what it printed."""
    tmp = tmp_path_factory.mktemp("int8")
    ckpt = save_checkpoint(tmp / "tiny.safetensors", classifier, frontend, labels=LABELS, name="int8-tiny")
    out = tmp / "model.onnx"
    printed = io.StringIO()
    argv = ["export", str(ckpt), str(out), "--window-seconds", str(WINDOW_S), "--int8", "--check-clips", str(clip_dir)]
    with contextlib.redirect_stdout(printed):
        assert cli.main(argv) == 0
    return out, printed.getvalue()


@pytest.fixture(scope="module")
def int8_report(classifier, frontend, tmp_path_factory) -> export.ExportReport:
    """The Python entry point with the default check clips (synthetic scenes)."""
    out = tmp_path_factory.mktemp("int8-api") / "model.onnx"
    return export_onnx(classifier, out, int8=True, window_seconds=WINDOW_S, frontend=frontend, labels=LABELS)


def _reference(model: EATClassifier, frontend: FrontendConfig, waveform: np.ndarray, num_samples: np.ndarray):
    twin = WaveformModel(LogMelFrontend(frontend), ClassifierHeads(model)).eval()
    return export.torch_outputs(twin, waveform, num_samples)


def _ops(model: onnx.ModelProto, prefix: str) -> Counter:
    return Counter(node.op_type for node in model.graph.node if node.name.startswith(prefix))


def test_only_the_encoders_weight_matmuls_are_quantised(int8_cli_export, tmp_path, classifier, frontend):
    path, _ = int8_cli_export
    int8 = onnx.load(str(path))
    fp32_report = export_onnx(classifier, tmp_path / "fp32.onnx", window_seconds=WINDOW_S, frontend=frontend)
    fp32 = onnx.load(str(fp32_report.path))
    # QKV, projection, fc1, fc2 of every block
    assert onnx_int8.count_int8_matmuls(int8) == 4 * DEPTH
    assert _ops(int8, "encoder/")["MatMulInteger"] == 4 * DEPTH
    # the front end is the fp32 file's, node for node (its DFT MatMuls stay float64)
    assert _ops(int8, "frontend/") == _ops(fp32, "frontend/")
    # the fp16 path's fusions, in float32: attention (Q·Kᵀ, softmax, attention·V), skip-LayerNorm, bias-GELU
    ops = _ops(int8, "encoder/")
    assert (ops["MultiHeadAttention"], ops["SkipLayerNormalization"], ops["BiasGelu"]) == (DEPTH, 2 * DEPTH, DEPTH)
    assert ops["Softmax"] == ops["Erf"] == 0 < _ops(fp32, "encoder/")["Softmax"]
    assert ops["Conv"] == _ops(fp32, "encoder/")["Conv"] == 1  # the patch embedding
    # the classifier head stays a float MatMul, the only one left in the encoder
    producers = {out: node for node in int8.graph.node for out in node.output}
    head = producers["logits"]
    while head.op_type == "Add":
        head = next(producers[name] for name in head.input if name in producers)
    dtypes = {init.name: init.data_type for init in int8.graph.initializer}
    assert head.op_type == "MatMul" and dtypes[head.input[1]] == onnx.TensorProto.FLOAT
    assert ops["MatMul"] == 1
    int8_weights = [n for n, dtype in dtypes.items() if dtype == onnx.TensorProto.INT8 and "zero_point" not in n]
    assert len(int8_weights) == 4 * DEPTH
    # inputs and outputs keep the contract's types
    assert [v.type.tensor_type.elem_type for v in int8.graph.output] == [onnx.TensorProto.FLOAT] * 3


def test_cli_writes_int8_metadata_and_reports_agreement(int8_cli_export, frontend):
    path, printed = int8_cli_export
    meta = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
    assert meta["eat.precision"] == "int8"
    assert json.loads(meta["eat.fusions"]) == {
        "BiasGelu": DEPTH,
        "MultiHeadAttention": DEPTH,
        "SkipLayerNormalization": 2 * DEPTH,
    }
    assert meta["eat.model_name"] == "int8-tiny"
    assert meta["eat.window_samples"] == str(WINDOW_SAMPLES) and meta["eat.target_frames"] == "208"
    assert float(meta["eat.norm_mean"]) == frontend.norm_mean
    assert len(json.loads(meta["eat.labels"])) == NUM_CLASSES
    assert "int8)" in printed and "verified against PyTorch" in printed
    assert "int8 top-5 classes agree with PyTorch" in printed
    assert "int8 top-5 class sets equal PyTorch's on 100% of the check clips" in printed


def test_report_within_the_documented_tolerance(int8_report):
    assert int8_report.precision == "int8"
    assert int8_report.top5_agree is True
    assert int8_report.top5_agreement == 1.0
    for name, diff in int8_report.max_abs_diff.items():
        assert 0 < diff <= int8_report.tolerance[name], name  # int8 is never bit-exact
        assert int8_report.tolerance[name] >= INT8_RELATIVE_TOLERANCE


@pytest.mark.parametrize("lengths", [[WINDOW_SAMPLES], [WINDOW_SAMPLES, 9_000, 4_000]], ids=["B1", "B3"])
def test_new_clips_match_pytorch_within_tolerance(int8_report, classifier, frontend, lengths):
    rng = np.random.default_rng(11)
    waveform = np.zeros((len(lengths), WINDOW_SAMPLES), dtype=np.float32)
    for row, n in enumerate(lengths):
        t = np.arange(n) / 16_000
        waveform[row, :n] = 0.3 * np.sin(2 * np.pi * (300 + 500 * row) * t) + 0.05 * rng.standard_normal(n)
    num_samples = np.asarray(lengths, dtype=np.int64)
    session = ort.InferenceSession(str(int8_report.path), providers=["CPUExecutionProvider"])
    got = session.run(None, {"waveform": waveform, "num_samples": num_samples})
    want = _reference(classifier, frontend, waveform, num_samples)
    for name, g, w in zip(int8_report.outputs, got, want, strict=True):
        assert g.dtype == np.float32 and g.shape == w.shape
        assert np.abs(g - w).max() <= INT8_RELATIVE_TOLERANCE * max(1.0, np.abs(w).max()), name
    assert onnx_int8.top_k_agreement(got[2], want[2], 5) == 1.0


def test_service_engine_serves_the_int8_file(int8_cli_export, classifier, frontend):
    path, _ = int8_cli_export
    engine = OnnxEngine(path, provider="cpu", intra_op_threads=1)
    try:
        assert engine.info.precision == "int8"
        assert engine.info.num_classes == NUM_CLASSES and engine.info.window_samples == WINDOW_SAMPLES
        _, waveform, num_samples = onnx_int8.check_clips(WINDOW_SAMPLES, max_clips=4, seed=9)
        got = engine.run(waveform, num_samples, ("embedding", "logits"))
    finally:
        engine.close()
    want = _reference(classifier, frontend, waveform, num_samples)
    for name, w in (("embedding", want[0]), ("logits", want[2])):
        assert np.abs(got[name] - w).max() <= INT8_RELATIVE_TOLERANCE * max(1.0, np.abs(w).max()), name


def test_official_fixture_keeps_the_official_top5(fixtures_dir, tmp_path):
    """The official fine-tuned weights as int8: the raw fixture waveforms must give the official logits
    within the int8 tolerance and the same top-5 classes on every case."""
    official = fixtures_dir / "eat-official"
    io_npz = np.load(official / "io.npz")
    cases = np.load(fixtures_dir / "fbank" / "cases.npz")
    report = export_onnx(official / "hf", tmp_path / "official-int8.onnx", window_seconds=164_080 / 16_000, int8=True)
    assert report.top5_agree is True and report.top5_agreement >= 0.95
    names = [str(n) for n in io_npz["all_case_names"]]
    waveform = np.zeros((len(names), report.window_samples), dtype=np.float32)
    num_samples = np.zeros(len(names), dtype=np.int64)
    for row, name in enumerate(names):
        audio = cases[f"wav_{name}"][: report.window_samples]
        waveform[row, : len(audio)] = audio
        num_samples[row] = len(audio)
    session = ort.InferenceSession(str(report.path), providers=["CPUExecutionProvider"])
    logits = session.run(["logits"], {"waveform": waveform, "num_samples": num_samples})[0]
    want = io_npz["finetune_logits_all"]
    assert np.abs(logits - want).max() <= INT8_RELATIVE_TOLERANCE * max(1.0, np.abs(want).max())
    assert onnx_int8.top_k_agreement(logits, want, 5) == 1.0


def test_refuses_an_int8_file_that_drifts(classifier, frontend, tmp_path, monkeypatch):
    real = export.torch_outputs

    def drifted(*args, **kwargs):
        outputs = real(*args, **kwargs)
        outputs[-1] = outputs[-1] * 1.2  # 20 % off: four times the int8 tolerance
        return outputs

    monkeypatch.setattr(export, "torch_outputs", drifted)
    out = tmp_path / "model.onnx"
    with pytest.raises(VerificationError, match=r"logits: max abs diff .* > "):
        export_onnx(classifier, out, int8=True, window_seconds=1.0, target_frames=112, frontend=frontend)
    assert sorted(p.name for p in tmp_path.iterdir()) == [], "nothing may be written"


def test_bad_int8_settings_fail_before_exporting(classifier, tmp_path):
    with pytest.raises(ExportError, match="one of fp16 and int8"):
        export_onnx(classifier, tmp_path / "a.onnx", fp16=True, int8=True, window_seconds=1.0)
    with pytest.raises(ExportError, match="check clips are for int8"):
        export_onnx(classifier, tmp_path / "b.onnx", check_clips=tmp_path, window_seconds=1.0)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ExportError, match="no .wav/.flac/.ogg files"):
        export_onnx(classifier, tmp_path / "c.onnx", int8=True, check_clips=tmp_path / "empty", window_seconds=1.0)
    with pytest.raises(ExportError, match="folder not found"):
        export_onnx(classifier, tmp_path / "d.onnx", int8=True, check_clips=tmp_path / "nope", window_seconds=1.0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"]


def test_cli_refuses_fp16_with_int8(tmp_path, capsys):
    with pytest.raises(SystemExit) as exited:
        cli.main(["export", str(tmp_path / "x.pt"), str(tmp_path / "m.onnx"), "--fp16", "--int8"])
    assert exited.value.code == 2
    assert "not allowed with argument" in capsys.readouterr().err


def test_check_clips_from_a_folder(clip_dir):
    names, waveform, num_samples = onnx_int8.check_clips(WINDOW_SAMPLES, clip_dir)
    assert names == ["a_tone.wav", "b_stereo.flac", "sub/c_long.wav"]
    assert waveform.shape == (3, WINDOW_SAMPLES) and waveform.dtype == np.float32
    # 0.5 s at 22.05 kHz resampled to 16 kHz; the long clip is cut to the window
    assert num_samples.tolist() == [WINDOW_SAMPLES, 8_000, WINDOW_SAMPLES]
    assert not waveform[1, 8_000:].any(), "past num_samples the row is zero padding"
    assert onnx_int8.check_clips(WINDOW_SAMPLES, clip_dir, max_clips=2)[0] == names[:2]


def test_default_check_clips_are_reproducible_scenes():
    names, waveform, num_samples = onnx_int8.check_clips(16_000)
    assert len(names) == onnx_int8.MAX_CHECK_CLIPS and (num_samples == 16_000).all()
    assert np.abs(waveform).max(axis=1).min() > 0.01, "every scene holds sound"
    again = onnx_int8.check_clips(16_000)[1]
    np.testing.assert_array_equal(waveform, again)
    assert not np.array_equal(waveform, onnx_int8.check_clips(16_000, seed=1)[1])


def test_top_k_agreement_counts_rows_with_the_same_class_set():
    want = np.array([[5.0, 4, 3, 2, 1, 0, -1], [0, 1, 2, 3, 4, 5, 6], [9, 8, 7, 6, 5, 4, 3]])
    got = want.copy()
    got[0, [0, 1]] = got[0, [1, 0]]  # order inside the top-5 changes: still agrees
    got[1, [2, 1]] = [-3, 7]  # class 1 enters, class 2 leaves the top-5
    assert onnx_int8.top_k_agreement(got, want, 5) == pytest.approx(2 / 3)
    assert onnx_int8.top_k_agreement(want, want, 5) == 1.0
    assert onnx_int8.top_k_agreement(got[:, :3], want[:, :3], 5) == 1.0  # k capped at the class count


def test_headless_encoder_exports_in_int8(tmp_path):
    torch.manual_seed(4)
    encoder = Encoder(tiny(embed_dim=64, depth=DEPTH, num_heads=2, num_classes=0, decoder_dim=64)).eval()
    encoder.init_weights()
    report = export_onnx(encoder, tmp_path / "enc.onnx", int8=True, window_seconds=1.0, target_frames=112)
    assert report.outputs == ("embedding", "tokens") and report.precision == "int8"
    assert report.top5_agree is None and report.top5_agreement is None
    assert all(0 < d <= report.tolerance[name] for name, d in report.max_abs_diff.items())
    assert onnx_int8.count_int8_matmuls(onnx.load(str(report.path))) == 4 * DEPTH


def test_quantizable_matmuls_skip_activation_products_and_the_head():
    from onnx import TensorProto, helper, numpy_helper

    def weight(name: str, dtype=np.float32):
        return numpy_helper.from_array(np.ones((4, 4), dtype=dtype), name)

    nodes = [
        helper.make_node("MatMul", ["x", "w_block"], ["h"], name="block"),
        helper.make_node("MatMul", ["h", "x"], ["scores"], name="scores"),  # both operands are activations
        helper.make_node("MatMul", ["scores", "w_dft"], ["spec"], name="dft"),  # a float64 weight
        helper.make_node("MatMul", ["h", "w_head"], ["pre"], name="head"),
        helper.make_node("Add", ["pre", "b_head"], ["logits"], name="bias"),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 4])],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, [4, 4]) for n in ("logits", "spec")],
        initializer=[weight("w_block"), weight("w_head"), weight("w_dft", np.float64), weight("b_head")],
    )
    assert onnx_int8.quantizable_matmuls(helper.make_model(graph)) == ["block"]
