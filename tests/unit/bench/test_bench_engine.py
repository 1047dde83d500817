"""bench/engine.py without running a model: precision choices, interleaved timing, speed ratios."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[3]


@pytest.fixture(scope="module")
def engine():
    spec = importlib.util.spec_from_file_location("bench_engine", REPO_ROOT / "bench" / "engine.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_engine"] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


def test_precisions_default_to_all_four_on_cpu(engine, monkeypatch):
    assert engine.parse_args(["--providers", "cpu"]).precisions == ["fp32", "fp16", "int8", "bf16"]
    assert engine.parse_args(["--providers", "cpu", "--precisions", "int8,fp32"]).precisions == ["int8", "fp32"]
    monkeypatch.setattr(engine, "HAS_OPENVINO", False)
    assert engine.parse_args(["--providers", "cpu"]).precisions == ["fp32", "fp16", "int8"]


def test_bf16_needs_fp32_and_openvino(engine, monkeypatch, capsys):
    with pytest.raises(SystemExit):
        engine.parse_args(["--providers", "cpu", "--precisions", "bf16,int8"])
    assert "bf16 runs the fp32 file" in capsys.readouterr().err
    monkeypatch.setattr(engine, "HAS_OPENVINO", False)
    with pytest.raises(SystemExit):
        engine.parse_args(["--providers", "cpu", "--precisions", "fp32,bf16"])
    assert "bf16 needs OpenVINO" in capsys.readouterr().err


@pytest.mark.parametrize("bad", ["fp8", "fp32,fp32", ""])
def test_unknown_or_repeated_precisions_are_refused(engine, bad, capsys):
    with pytest.raises(SystemExit) as exited:
        engine.parse_args(["--providers", "cpu", "--precisions", bad])
    assert exited.value.code == 2 and "--precisions takes distinct values" in capsys.readouterr().err


def test_cpu_precisions_are_refused_on_cuda(engine, monkeypatch, capsys):
    both = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    monkeypatch.setattr(engine.ort, "get_available_providers", lambda: both)
    assert engine.parse_args(["--providers", "cuda"]).precisions == ["fp32", "fp16"]
    with pytest.raises(SystemExit):
        engine.parse_args(["--providers", "cuda,cpu", "--precisions", "fp32,int8"])
    assert "int8 is a CPU precision" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        engine.parse_args(["--providers", "cuda", "--precisions", "fp32,bf16"])
    assert "bf16 runs on the CPU" in capsys.readouterr().err


def test_interleaved_timing_alternates_the_calls(engine):
    order: list[str] = []
    calls = {name: (lambda name=name: order.append(name)) for name in ("fp32", "int8")}
    times = engine.time_interleaved(calls, warmup=1, repeats=3)
    assert order == ["fp32", "int8"] + ["fp32", "int8"] * 3
    assert {k: len(v) for k, v in times.items()} == {"fp32": 3, "int8": 3}
    assert len(engine.time_calls(lambda: None, warmup=0, repeats=2)) == 2


def test_speed_ratios_compare_each_precision_with_fp32_at_the_same_batch(engine):
    def row(precision: str, batch: int, clips_per_s: float, runtime: str = "onnxruntime"):
        return engine.Result("base", runtime, "cpu", precision, batch, 1.0, 1.0, clips_per_s, 10 * clips_per_s)

    results = [
        row("fp32", 1, 2.0),
        row("int8", 1, 5.0),
        row("fp32", 2, 2.5),
        row("int8", 2, 5.0),
        row("fp16", 2, 2.5),
        row("fp32", 1, 1.0, runtime="torch-eager"),
        row("bf16", 1, 8.0, runtime="openvino"),
    ]
    assert engine.speed_ratios(results) == {
        "base cpu int8/fp32": {"1": 2.5, "2": 2.0},
        "base cpu fp16/fp32": {"2": 1.0},
        "base cpu bf16/fp32": {"1": 4.0},
    }
