"""bench/gpu_check.sh, the parts that run without a GPU: arguments, the plan, refusing cleanly when there is
no GPU or no CUDA PyTorch, and joining + installing the device pack up to the CUDA-provider check."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[3]
SCRIPT = REPO_ROOT / "bench" / "gpu_check.sh"


def _run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if k != "OUT"}
    return subprocess.run(
        ["bash", str(SCRIPT), *args], capture_output=True, text=True, env={**base, **(env or {})}, timeout=120
    )


def _fake_bin(tmp_path: Path, *, gpu: bool, cuda_torch: bool) -> dict[str, str]:
    """A PATH with a stand-in ``nvidia-smi`` and a Python that answers the CUDA-torch check as asked and
    passes every other call to the real interpreter."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    smi = bin_dir / "nvidia-smi"
    smi.write_text("#!/bin/sh\n" + ("echo 'NVIDIA Fake GPU, 1.0'\nexit 0\n" if gpu else "exit 9\n"))
    py = bin_dir / "fakepython"
    py.write_text(
        "#!/bin/bash\n"
        'if [[ "$*" == *torch.cuda.is_available* ]]; then exit ' + ("0" if cuda_torch else "1") + "; fi\n"
        f'exec {sys.executable} "$@"\n'
    )
    for f in (smi, py):
        f.chmod(0o755)
    return {"PATH": f"{bin_dir}:{os.environ['PATH']}"}


def _wheel(path: Path) -> Path:
    """A minimal pure-Python wheel, ``eatfake``, that pip installs without network."""
    info = "eatfake-1.0.dist-info"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("eatfake/__init__.py", "VALUE = 42\n" + "# padding\n" * 2000)
        zf.writestr(f"{info}/METADATA", "Metadata-Version: 2.1\nName: eatfake\nVersion: 1.0\n")
        zf.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        zf.writestr(f"{info}/RECORD", f"eatfake/__init__.py,,\n{info}/METADATA,,\n{info}/WHEEL,,\n{info}/RECORD,,\n")
    return path


def test_help_and_bad_arguments():
    shown = _run("--help")
    assert shown.returncode == 0 and "usage: bash bench/gpu_check.sh" in shown.stdout
    unknown = _run("--frobnicate", "--out", "/tmp/x")
    assert unknown.returncode == 2 and "unknown argument: --frobnicate" in unknown.stderr
    missing = _run("--dry-run")
    assert missing.returncode == 2 and "set OUT or pass --out" in missing.stderr
    dangling = _run("--out")
    assert dangling.returncode == 2 and "--out needs a value" in dangling.stderr
    budget = _run("--out", "/tmp/x", "--budget-s", "ten")
    assert budget.returncode == 2 and "--budget-s" in budget.stderr


def test_dry_run_lists_every_bench_within_the_budget(tmp_path):
    plan = _run("--dry-run", env={"OUT": str(tmp_path / "o")})
    assert plan.returncode == 0, plan.stderr
    lines = dict(re.findall(r"^(\w+) \(limit (\d+) s\)", plan.stdout, flags=re.M))
    assert list(lines) == ["engine_cuda", "load_cuda", "train_bf16_eager", "train_bf16_compile"]
    assert 30 + sum(int(v) for v in lines.values()) <= 600, "the whole check must fit in 10 minutes"
    out = tmp_path / "o"
    assert "--providers cuda --precisions fp32,fp16 --batch-sizes 1,2,4,8,16,32,64,128,256" in plan.stdout
    assert f"--keep-models {out}/models --out {out}/engine_cuda.json" in plan.stdout
    assert f"bench/load.py --model {out}/models/eat-base-fp16.onnx" in plan.stdout
    train = [line for line in plan.stdout.splitlines() if "train_throughput.py" in line]
    assert len(train) == 2 and all("--device cuda --dtype bf16 --which both" in line for line in train)
    assert ["--compile" in line for line in train] == [False, True]
    assert not out.exists(), "a dry run writes nothing"
    halved = _run("--dry-run", "--budget-s", "285", "--out", str(out))
    assert re.search(r"^engine_cuda \(limit 100 s\)", halved.stdout, flags=re.M)


def test_refuses_without_a_gpu(tmp_path):
    env = _fake_bin(tmp_path, gpu=False, cuda_torch=True)
    result = _run("--out", str(tmp_path / "o"), "--site", str(tmp_path / "site"), env=env)
    assert result.returncode == 3 and "no NVIDIA GPU here" in result.stderr
    assert not (tmp_path / "o").exists() and not (tmp_path / "site").exists()


def test_refuses_without_cuda_torch(tmp_path):
    env = _fake_bin(tmp_path, gpu=True, cuda_torch=False)
    result = _run("--out", str(tmp_path / "o"), "--python", "fakepython", "--site", str(tmp_path / "site"), env=env)
    assert result.returncode == 3 and "no CUDA PyTorch" in result.stderr
    assert not (tmp_path / "o").exists() and not (tmp_path / "site").exists()


def test_missing_or_broken_pack(tmp_path):
    env = _fake_bin(tmp_path, gpu=True, cuda_torch=True)
    common = ["--out", str(tmp_path / "o"), "--python", "fakepython", "--site", str(tmp_path / "site")]
    missing = _run(*common, "--pack", str(tmp_path / "nothing"), env=env)
    assert missing.returncode == 4 and "no device pack" in missing.stderr
    pack = tmp_path / "pack"
    (pack / "ort1").mkdir(parents=True)
    data = _wheel(tmp_path / "eatfake-1.0-py3-none-any.whl").read_bytes()
    (pack / "ort1" / "part-0").write_bytes(data[: len(data) // 2])  # the second part was never copied
    (pack / "ort1" / "ort-wheel-name").write_text("eatfake-1.0-py3-none-any.whl\n")
    broken = _run(*common, "--pack", str(pack), env=env)
    assert broken.returncode == 4 and "not a valid zip" in broken.stderr


@pytest.mark.parametrize("layout", ["device-pack", "flat"])
def test_joins_and_installs_the_pack_then_needs_the_cuda_provider(tmp_path, layout):
    """Parts spread over ort1/ and ort2/ (as device-pack.sh writes them) or flat in one folder (as its
    README copies them) are joined in order and installed; this onnxruntime has no CUDA provider, so
    the check stops there with exit code 4, before any bench."""
    env = _fake_bin(tmp_path, gpu=True, cuda_torch=True)
    data = _wheel(tmp_path / "eatfake-1.0-py3-none-any.whl").read_bytes()
    pack = tmp_path / "pack"
    halves = [data[: len(data) // 2], data[len(data) // 2 :]]
    if layout == "device-pack":
        for i, half in enumerate(halves):
            (pack / f"ort{i + 1}").mkdir(parents=True)
            (pack / f"ort{i + 1}" / f"part-{i}").write_bytes(half)
        (pack / "ort1" / "ort-wheel-name").write_text("eatfake-1.0-py3-none-any.whl\n")
        (pack / "deps").mkdir()
    else:
        pack.mkdir()
        for i, half in enumerate(halves):
            (pack / f"part-{i}").write_bytes(half)
        (pack / "ort-wheel-name").write_text("eatfake-1.0-py3-none-any.whl\n")
    site, out = tmp_path / "site", tmp_path / "o"
    result = _run("--out", str(out), "--python", "fakepython", "--site", str(site), "--pack", str(pack), env=env)
    assert result.returncode == 4 and "no CUDAExecutionProvider" in result.stderr, result.stderr
    assert (site / "eatfake" / "__init__.py").read_text().startswith("VALUE = 42")
    assert not (out / "engine_cuda.json").exists()
