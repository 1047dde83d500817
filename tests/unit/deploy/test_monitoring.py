"""Prometheus config, alert rules and the Grafana provisioning and dashboard.

The dashboard and the alerts must query metrics the service really exports: the names and labels come
from the ``/metrics`` of a running app (``create_app`` with a fake engine, after real requests), not from
a list kept here. promtool, when installed (Debian's ``prometheus`` package), also checks the config and
parses every query; without it the Python checks below still run.
"""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import wave
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from deploy_files import (
    REPO_ROOT,
    TARGET_LABELS,
    dashboard_queries,
    grafana_to_promql,
    label_names,
    load_compose,
    load_yaml_documents,
    metric_names,
    promql_problems,
)
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from eat.contract import Label, ModelInfo, window_samples_for
from service.app import create_app
from service.settings import Settings

PROMETHEUS = REPO_ROOT / "deploy/prometheus"
GRAFANA = REPO_ROOT / "deploy/grafana"
DASHBOARD = GRAFANA / "dashboards/eat.json"
WINDOW_SAMPLES = window_samples_for(64)  # 64 frames: a 0.4 s window keeps the fake engine's arrays small


class FakeEngine:
    """The engine interface (info, run, close) with fixed outputs: enough to drive real requests."""

    def __init__(self) -> None:
        self.info = ModelInfo(
            model_name="fake-eat", labels=tuple(Label(i, f"/m/fake{i}", f"Fake {i}") for i in range(3)),
            sample_rate=16_000, window_samples=WINDOW_SAMPLES, target_frames=64, embedding_dim=8, num_classes=3,
            time_patches=4, freq_patches=8, precision="fp32", provider="cpu",
        )

    def run(self, waveform: np.ndarray, num_samples: np.ndarray, outputs: tuple[str, ...]) -> dict[str, np.ndarray]:
        batch = waveform.shape[0]
        shapes = {"embedding": (batch, 8), "tokens": (batch, 32, 8), "logits": (batch, 3)}
        return {name: np.zeros(shapes[name], np.float32) for name in outputs}

    def close(self) -> None:
        pass


def _wav(seconds: float) -> bytes:
    samples = (0.1 * np.sin(np.arange(int(16_000 * seconds)) * 0.2) * 32767).astype(np.int16)
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as f:
        f.setnchannels(1)
        f.setsampwidth(2)
        f.setframerate(16_000)
        f.writeframes(samples.tobytes())
    return buffer.getvalue()


@pytest.fixture(scope="module")
def exported() -> dict[str, dict[str, Any]]:
    """{family name: {"type": ..., "labels": {...}}} from the running app's /metrics, after a request of
    every kind (a prediction, an embedding, a rejected upload)."""
    settings = Settings(model_path=Path("unused.onnx"), max_batch=4, batch_buckets=[1, 2, 4], queue_size=16)
    with TestClient(create_app(settings, engine=FakeEngine())) as client:
        assert client.get("/health/ready").status_code == 200
        assert client.post("/predict", files={"file": ("a.wav", _wav(1.0), "audio/wav")}).status_code == 200
        assert client.post("/embed", files={"file": ("b.wav", _wav(0.5), "audio/wav")}).status_code == 200
        assert client.post("/predict", files={"file": ("c.wav", b"not audio", "audio/wav")}).status_code >= 400
        text = client.get("/metrics").text
    families = {}
    for family in text_string_to_metric_families(text):
        labels = set()
        for sample in family.samples:
            labels |= set(sample.labels)
        families[family.name] = {"type": family.type, "labels": labels - {"le"}}
    # prometheus_client's *_created timestamps parse as families of their own; they are not queried
    return {n: f for n, f in families.items() if not (n.endswith("_created") and n[: -len("_created")] in families)}


def _rule_exprs() -> list[tuple[str, str]]:
    exprs = []
    for path in sorted((PROMETHEUS / "rules").glob("*.yml")):
        for doc in load_yaml_documents(path):
            for group in doc["groups"]:
                exprs += [(rule["alert"], rule["expr"]) for rule in group["rules"]]
    return exprs


def _all_queries() -> list[tuple[str, str]]:
    return [(f"panel {t!r}", grafana_to_promql(e)) for t, e in dashboard_queries(DASHBOARD)] + [
        (f"alert {a}", e) for a, e in _rule_exprs()
    ]


def _family_of(name: str, exported: dict[str, dict[str, Any]]) -> tuple[str, str]:
    """Map a series name to its family: histograms export NAME_bucket/_sum/_count, counters NAME_total."""
    for suffix, kinds in (("_bucket", {"histogram"}), ("_sum", {"histogram"}), ("_count", {"histogram"})):
        if name.endswith(suffix) and name[: -len(suffix)] in exported:
            family = name[: -len(suffix)]
            assert exported[family]["type"] in kinds, f"{name}: {family} is a {exported[family]['type']}"
            return family, suffix
    if name.endswith("_total") and name[: -len("_total")] in exported:
        return name[: -len("_total")], "_total"
    assert name in exported, f"{name} is not exported by the service (exported: {sorted(exported)})"
    return name, ""


def test_the_service_exports_the_documented_metrics(exported: dict[str, dict[str, Any]]) -> None:
    expected = {
        "eat_requests": "counter", "eat_request_duration_seconds": "histogram",
        "eat_queue_wait_seconds": "histogram", "eat_decode_duration_seconds": "histogram",
        "eat_inference_duration_seconds": "histogram", "eat_batch_size": "histogram",
        "eat_queue_depth": "gauge", "eat_inflight_requests": "gauge", "eat_audio_seconds": "counter",
        "eat_rejections": "counter", "eat_model_info": "gauge",
    }
    assert {name: exported.get(name, {}).get("type") for name in expected} == expected


def test_queries_read_only_exported_metrics_and_labels(exported: dict[str, dict[str, Any]]) -> None:
    used = set()
    for where, expr in _all_queries():
        labels_available = set(TARGET_LABELS)
        for name in metric_names(expr):
            family, suffix = _family_of(name, exported)
            used.add(family)
            labels_available |= exported[family]["labels"]
            if suffix == "_bucket":
                labels_available.add("le")
            if exported[family]["type"] == "counter" or suffix in ("_bucket", "_sum", "_count"):
                assert f"{name}{{" in expr.replace(" ", "") or f"{name}[" in expr, f"{where}: {name} is cumulative"
                assert "rate(" in expr or "increase(" in expr, f"{where}: use rate() on the counter {name}"
        unknown = label_names(expr) - labels_available
        assert not unknown, f"{where}: labels {sorted(unknown)} do not exist on {sorted(metric_names(expr))}"
    # everything the service exports is on the dashboard or in an alert
    assert used == {n for n in exported if n.startswith("eat_")}


def test_queries_are_well_formed_promql() -> None:
    for where, expr in _all_queries():
        assert promql_problems(expr) == [], f"{where}: {expr}"
    assert promql_problems("histogram_quantile(0.9, sum by (endpoint) (rate(x_bucket[5m])))")
    assert promql_problems("sum(rate(eat_requests_total))")
    assert promql_problems("sum(rate(eat_requests_total[5m])")


def test_dashboard_covers_what_operators_ask_for() -> None:
    exprs = " ".join(e for _, e in dashboard_queries(DASHBOARD))
    for needle in (
        "rate(eat_requests_total",  # throughput
        "histogram_quantile(0.99, sum by (le, endpoint) (rate(eat_request_duration_seconds_bucket",
        "eat_queue_wait_seconds_bucket", "eat_inference_duration_seconds_bucket", "eat_decode_duration_seconds_bucket",
        "eat_batch_size_bucket", "eat_batch_size_sum", "eat_queue_depth", "eat_inflight_requests",
        "sum by (reason) (rate(eat_rejections_total", "eat_model_info", "eat_audio_seconds_total",
    ):
        assert needle in exprs, needle
    info = [e for _, e in dashboard_queries(DASHBOARD) if "eat_model_info" in e]
    assert all("provider" in e for e in info), "the panel must show the execution provider"


def test_dashboard_is_well_formed() -> None:
    dash = json.loads(DASHBOARD.read_text())
    assert dash["uid"] and dash["title"] and isinstance(dash["schemaVersion"], int)
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dash["panels"]:
        pos = panel["gridPos"]
        assert pos["x"] >= 0 and pos["x"] + pos["w"] <= 24 and pos["h"] > 0
        if panel["type"] == "row":
            continue
        assert panel["targets"], panel["title"]
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        ref_ids = [t["refId"] for t in panel["targets"]]
        assert len(ref_ids) == len(set(ref_ids))
        for target in panel["targets"]:
            for var in {v for v in ("$instance", "${instance}") if v in target["expr"]}:
                assert var.strip("${}") in variables
    # panels do not overlap
    cells = set()
    for panel in dash["panels"]:
        pos = panel["gridPos"]
        for x in range(pos["x"], pos["x"] + pos["w"]):
            for y in range(pos["y"], pos["y"] + pos["h"]):
                assert (x, y) not in cells, f"{panel['title']} overlaps another panel"
                cells.add((x, y))


def test_grafana_provisioning_matches_compose() -> None:
    compose = load_compose(REPO_ROOT / "docker-compose.yml")
    grafana = compose["services"]["grafana"]
    mounts = dict(v.split(":")[:2] for v in grafana["volumes"] if v.startswith("./"))
    (datasources,) = load_yaml_documents(GRAFANA / "provisioning/datasources/prometheus.yml")
    (source,) = datasources["datasources"]
    assert source["type"] == "prometheus"
    host_port = source["url"].removeprefix("http://")
    host, port = host_port.split(":")
    assert host in compose["services"] and compose["services"][host]["ports"][0].endswith(f":{port}")
    (providers,) = load_yaml_documents(GRAFANA / "provisioning/dashboards/eat.yml")
    (provider,) = providers["providers"]
    assert mounts["./deploy/grafana/dashboards"] == provider["options"]["path"]
    assert mounts["./deploy/grafana/provisioning"] == "/etc/grafana/provisioning"
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == f"{provider['options']['path']}/{DASHBOARD.name}"


def test_prometheus_config_structure() -> None:
    (config,) = load_yaml_documents(PROMETHEUS / "prometheus.yml")
    assert set(config) <= {"global", "rule_files", "scrape_configs", "alerting"}
    jobs = [j["job_name"] for j in config["scrape_configs"]]
    assert len(jobs) == len(set(jobs)) and "eat" in jobs
    for job in config["scrape_configs"]:
        assert job["static_configs"] and all(":" in t for sc in job["static_configs"] for t in sc["targets"])
    compose = load_compose(REPO_ROOT / "docker-compose.yml")
    volumes = compose["services"]["prometheus"]["volumes"]
    rules_mount = next(v for v in volumes if v.startswith("./deploy/prometheus/rules"))
    in_container = rules_mount.split(":")[1]
    (pattern,) = config["rule_files"]
    assert pattern == f"{in_container}/*.yml"
    assert list((PROMETHEUS / "rules").glob("*.yml"))
    for name, _ in _rule_exprs():
        assert name.startswith("EAT")
    for doc in load_yaml_documents(PROMETHEUS / "rules/eat.yml"):
        for group in doc["groups"]:
            for rule in group["rules"]:
                assert rule["labels"]["severity"] in {"critical", "warning", "info"}
                assert rule["annotations"]["summary"]


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool not installed (apt-get install prometheus)")
def test_promtool_accepts_config_rules_and_every_query(tmp_path: Path) -> None:
    config = yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text())
    config["rule_files"] = [str(PROMETHEUS / "rules" / "*.yml")]  # the repo's files instead of the mount
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    queries = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"dashboard:query{i}", "expr": expr} for i, (_, expr) in enumerate(_all_queries())
    ]}]}
    (tmp_path / "queries.yml").write_text(yaml.safe_dump(queries))
    for argv in (["check", "config", str(tmp_path / "prometheus.yml")],
                 ["check", "rules", str(tmp_path / "queries.yml")]):
        result = subprocess.run(["promtool", *argv], capture_output=True, text=True, timeout=60, check=False)
        assert result.returncode == 0, result.stdout + result.stderr
