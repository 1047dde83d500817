"""The commands the images and manifests run, run here without a container.

No Docker engine or cluster exists in CI, so this takes the commands out of the deployment files and
runs them as processes: the Kubernetes pre-training Job's ``torchrun ... -m training.cli pretrain`` (one
node, one process, a tiny demo recipe; run twice to show ``--resume`` continues), the model made by that
run exported as the README's bring-your-own-model step does, and the serving image's ENTRYPOINT + CMD
with ``EAT_MODEL_PATH`` pointing at it: ready, the image's HEALTHCHECK passes, it answers, it exports the
metrics the dashboard reads, and it exits cleanly on SIGTERM.
"""

from __future__ import annotations

import importlib.util
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import wave
from pathlib import Path
from types import ModuleType

import httpx
import numpy as np
import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
STEP_TIMEOUT_S = 300.0


def _deploy_files() -> ModuleType:
    """The deploy tests' readers (Dockerfile, YAML), loaded from their file: tests/ is not a package."""
    path = REPO_ROOT / "tests/unit/deploy/deploy_files.py"
    spec = importlib.util.spec_from_file_location("eat_deploy_files", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


DF = _deploy_files()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _expand(arg: str, env: dict[str, str]) -> str:
    """Kubernetes' $(VAR) expansion of command/args from the container's environment."""
    return re.sub(r"\$\((\w+)\)", lambda m: env.get(m.group(1), m.group(0)), arg)


def _executable(name: str) -> str:
    path = BIN / name
    assert path.is_file(), f"{name} not found next to {sys.executable}: run `make install`"
    return str(path)


def _job_command(data_dir: Path, run_dir: Path, max_steps: int) -> tuple[list[str], dict[str, str]]:
    """The pre-training Job's command, shrunk to one node and one process on this machine."""
    (job,) = [d for d in DF.load_yaml_documents(REPO_ROOT / "deploy/k8s/train/job-pretrain.yaml") if d["kind"] == "Job"]
    (container,) = job["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}
    env["JOB_COMPLETION_INDEX"] = "0"  # set by the Job controller for pod 0
    env["OMP_NUM_THREADS"] = "1"
    argv = [_expand(a, env) for a in container["command"] + container["args"]]
    assert argv[0] == "torchrun"
    module_at = argv.index("-m")
    overrides = {
        "--nnodes": "1", "--nproc-per-node": "1", "--rdzv-endpoint": f"127.0.0.1:{_free_port()}",
        "--max-restarts": "0", "--recipe": "demo_pretrain", "--data": str(data_dir), "--out": str(run_dir),
    }
    seen = set()
    out = [_executable("torchrun")]
    for arg in argv[1:]:
        key, sep, _ = arg.partition("=")
        if sep and key in overrides:
            out.append(f"{key}={overrides[key]}")
            seen.add(key)
        else:
            out.append(arg)
    assert seen == set(overrides), f"the Job no longer passes {sorted(set(overrides) - seen)} as --key=value"
    assert out[module_at + 1: module_at + 3] == ["training.cli", "pretrain"] and "--resume" in out
    # A few tiny steps instead of EAT's 400k; --set is the training CLI's documented override.
    for item in (f"max_steps={max_steps}", "batch_size=2", "clone_batch=2", "warmup_steps=0", "save_every=1",
                 "log_every=1", "num_workers=0"):
        out += ["--set", item]
    return out, env


def _run(argv: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        argv, cwd=REPO_ROOT, env={**os.environ, **env}, capture_output=True, text=True,
        timeout=STEP_TIMEOUT_S, check=False,
    )
    assert result.returncode == 0, f"{argv}\n--- stdout\n{result.stdout[-3000:]}\n--- stderr\n{result.stderr[-3000:]}"
    return result


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("entrypoints")


@pytest.fixture(scope="module")
def data_dir(workdir: Path) -> Path:
    from training.data.synthetic import generate

    generate(workdir / "data", num_train=8, num_eval=2, clip_seconds=2.0, seed=0)
    return workdir / "data"


@pytest.fixture(scope="module")
def pretrain_run(workdir: Path, data_dir: Path) -> Path:
    run_dir = workdir / "run"
    argv, env = _job_command(data_dir, run_dir, max_steps=2)
    result = _run(argv, env)
    assert "pre-training done: step 2" in result.stdout
    return run_dir


def test_pretraining_job_command_trains_and_resumes(pretrain_run: Path, data_dir: Path) -> None:
    assert (pretrain_run / "checkpoint.pt").is_file()
    assert (pretrain_run / "model.safetensors").is_file()
    # The Job is re-run (pod restart, re-applied Job) with the same command: it continues, not restarts.
    argv, env = _job_command(data_dir, pretrain_run, max_steps=3)
    result = _run(argv, env)
    assert "resumed from" in result.stderr and "at step 2" in result.stderr
    assert "pre-training done: step 3" in result.stdout


@pytest.fixture(scope="module")
def model_path(pretrain_run: Path, workdir: Path) -> Path:
    """The bring-your-own-model step of the README's Deploy section: our checkpoint -> `eat export` -> model.onnx."""
    out = workdir / "models" / "tiny" / "model.onnx"
    out.parent.mkdir(parents=True)
    _run([_executable("eat"), "export", str(pretrain_run / "model.safetensors"), str(out), "--window-seconds", "2"], {})
    return out


def _wav_bytes(seconds: float) -> bytes:
    samples = (0.2 * np.sin(2 * np.pi * 440 * np.arange(int(16_000 * seconds)) / 16_000) * 32767).astype(np.int16)
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as f:
        f.setnchannels(1)
        f.setsampwidth(2)
        f.setframerate(16_000)
        f.writeframes(samples.tobytes())
    return buffer.getvalue()


def _wait_ready(proc: subprocess.Popen[str], url: str, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"server exited with {proc.returncode}:\n{proc.stdout.read() if proc.stdout else ''}")
        try:
            if httpx.get(f"{url}/health/ready", timeout=2.0).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.25)
    pytest.fail(f"{url}/health/ready did not turn 200 within {timeout_s} s")


def test_serving_image_command_serves_and_drains(model_path: Path) -> None:
    dockerfile = DF.parse_dockerfile(REPO_ROOT / "Dockerfile")
    # No GPU here: run the CPU image's command, which must be the GPU image's too.
    argv = dockerfile.command("serve-cpu")
    assert argv == dockerfile.command("serve")
    port = _free_port()
    local = {"eat": _executable("eat"), "0.0.0.0": "127.0.0.1", "8000": str(port)}  # loopback only in tests
    argv = [local.get(a, a) for a in argv]
    image_env = {k: v for k, v in dockerfile.env("serve-cpu").items() if k.startswith("EAT_")}
    assert image_env["EAT_PROVIDER"] == "cpu"
    env = {**os.environ, **image_env, "EAT_MODEL_PATH": str(model_path), "EAT_INTRA_OP_THREADS": "1",
           "EAT_DRAIN_TIMEOUT_S": "10"}
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(argv, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        _wait_ready(proc, url)
        # the image's HEALTHCHECK command, as Docker would run it inside the container
        health = dockerfile.effective("serve-cpu", "HEALTHCHECK")
        probe = json.loads(health.partition("CMD ")[2])
        assert probe[0] == "python" and ":8000/health/live" in probe[2]
        probe = [sys.executable, *(a.replace(":8000/", f":{port}/") for a in probe[1:])]
        assert subprocess.run(probe, env=env, timeout=30, check=False).returncode == 0

        model = httpx.get(f"{url}/v1/model", timeout=10).json()
        assert model["provider"] == "cpu" and model["window_samples"] == 32_000
        reply = httpx.post(f"{url}/embed", files={"file": ("tone.wav", _wav_bytes(3.0), "audio/wav")}, timeout=60)
        assert reply.status_code == 200, reply.text
        (result,) = reply.json()["results"]
        assert len(result["embedding"]) == model["embedding_dim"]

        # the dashboard's metrics, read from this real server
        metrics = httpx.get(f"{url}/metrics", timeout=10).text
        exported = set(re.findall(r"^(eat_[a-z0-9_]+)", metrics, flags=re.MULTILINE))
        wanted = set()
        for _, expr in DF.dashboard_queries(REPO_ROOT / "deploy/grafana/dashboards/eat.json"):
            wanted |= DF.metric_names(expr)
        assert wanted and wanted <= exported, f"not exported: {sorted(wanted - exported)}"
        assert re.search(r'^eat_model_info\{.*provider="cpu".*\} 1\.0$', metrics, flags=re.MULTILINE)
    finally:
        proc.send_signal(signal.SIGTERM)  # what Docker and the kubelet send
        try:
            returncode = proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise
    assert returncode == 0, proc.stdout.read() if proc.stdout else ""
