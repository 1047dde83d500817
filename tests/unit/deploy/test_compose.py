"""docker-compose.yml and its CPU override, validated against the Compose specification's JSON schema
(vendored by check-jsonschema, read from the installed package: nothing is downloaded)."""

from __future__ import annotations

import json
import re
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from deploy_files import (
    REPO_ROOT,
    Reset,
    load_compose,
    merge_compose,
    parse_dockerfile,
    strip_resets,
)

COMPOSE = REPO_ROOT / "docker-compose.yml"
COMPOSE_CPU = REPO_ROOT / "docker-compose.cpu.yml"


@pytest.fixture(scope="module")
def compose_schema() -> dict[str, Any]:
    ref = resources.files("check_jsonschema") / "builtin_schemas" / "vendor" / "compose-spec.json"
    return json.loads(ref.read_text())


@pytest.fixture(scope="module")
def base() -> dict[str, Any]:
    return load_compose(COMPOSE)


@pytest.fixture(scope="module")
def cpu(base: dict[str, Any]) -> dict[str, Any]:
    return merge_compose(base, load_compose(COMPOSE_CPU))


def _errors(schema: dict[str, Any], document: Any) -> list[str]:
    validator = jsonschema.validators.validator_for(schema)(schema)
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(document)]


def test_compose_files_match_the_compose_spec(compose_schema: dict[str, Any], base: dict, cpu: dict) -> None:
    assert _errors(compose_schema, base) == []
    assert _errors(compose_schema, strip_resets(load_compose(COMPOSE_CPU))) == []
    assert _errors(compose_schema, cpu) == []


def test_the_schema_rejects_a_broken_file(compose_schema: dict[str, Any], base: dict) -> None:
    broken = merge_compose(base, {"services": {"eat": {"stop_grace_period": {"s": 45}, "portz": ["8000"]}}})
    errors = _errors(compose_schema, broken)
    assert any("portz" in e for e in errors)
    assert any("stop_grace_period" in e for e in errors)


def test_gpu_service(base: dict) -> None:
    eat = base["services"]["eat"]
    assert eat["build"]["target"] == "serve"
    (device,) = eat["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"] and device["count"] == 1
    assert eat["environment"]["EAT_PROVIDER"] == "cuda"
    assert "8000" in eat["ports"][0].split(":")[-1]


def test_cpu_override_drops_the_gpu(cpu: dict) -> None:
    eat = cpu["services"]["eat"]
    assert eat["build"]["target"] == "serve-cpu"
    assert "devices" not in eat.get("deploy", {}).get("resources", {}).get("reservations", {})
    assert eat["environment"]["EAT_PROVIDER"] == "cpu"
    assert isinstance(load_compose(COMPOSE_CPU)["services"]["eat"]["deploy"]["resources"]["reservations"]
                      ["devices"], Reset)
    # everything else (model, volumes, monitoring) is unchanged
    assert set(cpu["services"]) == {"eat", "prometheus", "grafana"}


def test_build_targets_exist_in_the_dockerfile(base: dict, cpu: dict) -> None:
    stages = {s.name for s in parse_dockerfile(REPO_ROOT / "Dockerfile").stages}
    for doc in (base, cpu):
        assert doc["services"]["eat"]["build"]["target"] in stages


def _default(value: str) -> str:
    """``${VAR:-default}`` -> default (what runs when the variable is unset)."""
    match = re.fullmatch(r"\$\{\w+:-([^}]*)\}", value)
    return match.group(1) if match else value


def test_models_volume_and_model_path(base: dict) -> None:
    eat = base["services"]["eat"]
    mounts = [v for v in eat["volumes"] if isinstance(v, dict) and v["target"] == "/models"]
    assert mounts and mounts[0]["read_only"] is True
    model_path = _default(eat["environment"]["EAT_MODEL_PATH"])
    serve_env = parse_dockerfile(REPO_ROOT / "Dockerfile").env("serve")
    assert model_path == serve_env["EAT_MODEL_PATH"], "default: the model baked into the image"


def _seconds(duration: str) -> float:
    units = {"s": 1, "m": 60, "h": 3600}
    return sum(float(n) * units[u] for n, u in re.findall(r"(\d+(?:\.\d+)?)([smh])", duration))


def test_stop_grace_period_covers_the_drain(base: dict) -> None:
    eat = base["services"]["eat"]
    drain_s = float(eat["environment"]["EAT_DRAIN_TIMEOUT_S"])
    assert _seconds(eat["stop_grace_period"]) >= drain_s + 5


def test_monitoring_services_mount_existing_files(base: dict) -> None:
    for name in ("prometheus", "grafana"):
        service = base["services"][name]
        image, _, tag = service["image"].rpartition(":")
        assert image and re.fullmatch(r"v?\d+\.\d+\.\d+", tag), f"{name}: pin the image, got {service['image']}"
        for volume in service["volumes"]:
            source = volume.split(":")[0]
            if source.startswith("./"):
                assert (REPO_ROOT / source).exists(), f"{name} mounts missing {source}"
    prometheus_cfg = next(v for v in base["services"]["prometheus"]["volumes"] if "prometheus.yml" in v)
    target = prometheus_cfg.split(":")[1]
    assert f"--config.file={target}" in base["services"]["prometheus"]["command"]


def test_prometheus_scrapes_the_compose_service(base: dict) -> None:
    from deploy_files import load_yaml_documents

    (config,) = load_yaml_documents(REPO_ROOT / "deploy/prometheus/prometheus.yml")
    job = next(j for j in config["scrape_configs"] if j["job_name"] == "eat")
    targets = [t for sc in job["static_configs"] for t in sc["targets"]]
    host, port = targets[0].split(":")
    assert host in base["services"], "scrape target must be the compose service name"
    assert port == "8000"
    assert job.get("metrics_path", "/metrics") == "/metrics"


def test_paths_in_compose_are_relative_to_the_repo() -> None:
    # compose resolves ./ paths against the file's folder: keep the file at the root
    assert COMPOSE.parent == REPO_ROOT and Path(COMPOSE_CPU).parent == REPO_ROOT
