"""Kubernetes manifests: every built-in kind validated (strict: unknown fields fail) against the API schemas
that kubernetes-validate ships, the CRD and kustomize files against schemas written here, and the links
between objects (selectors, ports, metric names, drain timing, rendezvous) checked one by one."""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from deploy_files import REPO_ROOT, load_yaml_documents, parse_dockerfile

K8S = REPO_ROOT / "deploy/k8s"
# The oldest Kubernetes still widely run and the newest the validator knows.
K8S_VERSIONS = ("1.29.0", kubernetes_validate.utils.latest_version())
CRD_KINDS = {"ServiceMonitor", "Kustomization", "RayJob"}  # RayJob: test_k8s_ray.py

_OBJECT_META = {"type": "object", "required": ["name"], "properties": {"name": {"type": "string"}}}
SERVICE_MONITOR_SCHEMA: dict[str, Any] = {  # monitoring.coreos.com/v1, the fields we use, strictly
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "ServiceMonitor"},
        "metadata": _OBJECT_META,
        "spec": {
            "type": "object",
            "additionalProperties": False,
            "required": ["selector", "endpoints"],
            "properties": {
                "selector": {"type": "object", "required": ["matchLabels"],
                             "properties": {"matchLabels": {"type": "object"}}},
                "namespaceSelector": {"type": "object", "additionalProperties": False,
                                      "properties": {"matchNames": {"type": "array", "items": {"type": "string"}},
                                                     "any": {"type": "boolean"}}},
                "endpoints": {"type": "array", "minItems": 1, "items": {
                    "type": "object", "additionalProperties": False, "required": ["port"],
                    "properties": {
                        "port": {"type": "string"},
                        "path": {"type": "string", "pattern": "^/"},
                        "interval": {"type": "string", "pattern": r"^\d+(ms|s|m|h)$"},
                        "scrapeTimeout": {"type": "string", "pattern": r"^\d+(ms|s|m|h)$"},
                        "honorLabels": {"type": "boolean"},
                    },
                }},
            },
        },
    },
}
KUSTOMIZATION_SCHEMA: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "required": ["apiVersion", "kind", "resources"],
    "properties": {
        "apiVersion": {"const": "kustomize.config.k8s.io/v1beta1"},
        "kind": {"const": "Kustomization"},
        "resources": {"type": "array", "items": {"type": "string"}, "minItems": 1},
        "labels": {"type": "array", "items": {"type": "object", "required": ["pairs"]}},
        "images": {"type": "array", "items": {"type": "object", "required": ["name"]}},
    },
}


def _all_documents() -> list[tuple[Path, dict[str, Any]]]:
    return [(path, doc) for path in sorted(K8S.rglob("*.yaml")) for doc in load_yaml_documents(path)]


def _one(kind: str, name: str | None = None) -> dict[str, Any]:
    found = [d for _, d in _all_documents() if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def test_manifests_exist() -> None:
    kinds = {d["kind"] for _, d in _all_documents()}
    assert {"Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget", "ServiceMonitor",
            "ConfigMap", "Job", "PersistentVolumeClaim"} <= kinds


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_builtin_kinds_validate_strictly(version: str) -> None:
    checked = 0
    for path, doc in _all_documents():
        if doc["kind"] in CRD_KINDS:
            continue
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as err:
            where = ".".join(str(p) for p in err.path)
            pytest.fail(f"{path.relative_to(REPO_ROOT)} {doc['kind']}/{doc['metadata']['name']}: {where}: "
                        f"{err.message}")
        checked += 1
    assert checked >= 10


def test_the_validator_rejects_unknown_and_mistyped_fields() -> None:
    deployment = _one("Deployment")
    bad = yaml.safe_load(yaml.safe_dump(deployment))
    bad["spec"]["template"]["spec"]["containers"][0]["readinessprobe"] = {}  # wrong case
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, K8S_VERSIONS[-1], strict=True)
    bad = yaml.safe_load(yaml.safe_dump(deployment))
    bad["spec"]["replicas"] = "two"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, K8S_VERSIONS[-1], strict=True)


def test_service_monitor_and_kustomizations_match_their_schemas() -> None:
    jsonschema.validate(_one("ServiceMonitor"), SERVICE_MONITOR_SCHEMA)
    for path in K8S.rglob("kustomization.yaml"):
        (doc,) = load_yaml_documents(path)
        jsonschema.validate(doc, KUSTOMIZATION_SCHEMA)
        listed = set(doc["resources"])
        present = {p.name for p in path.parent.glob("*.yaml")} - {"kustomization.yaml"}
        assert listed == present, f"{path.relative_to(REPO_ROOT)} lists {sorted(listed)}, folder has {sorted(present)}"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({**_one("ServiceMonitor"), "spec": {"endpoints": [{"port": "http"}]}},
                            SERVICE_MONITOR_SCHEMA)


def _container(workload: dict[str, Any]) -> dict[str, Any]:
    (container,) = workload["spec"]["template"]["spec"]["containers"]
    return container


def test_deployment_gpu_probes_and_command() -> None:
    deployment = _one("Deployment")
    container = _container(deployment)
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert container["resources"]["requests"]["nvidia.com/gpu"] == 1
    assert container["readinessProbe"]["httpGet"]["path"] == "/health/ready"
    assert container["livenessProbe"]["httpGet"]["path"] == "/health/live"
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        port = container[probe]["httpGet"]["port"]
        assert ports.get(port, port) == 8000
    # The container runs the image's own entrypoint with the same arguments as the image's CMD.
    dockerfile = parse_dockerfile(REPO_ROOT / "Dockerfile")
    assert "command" not in container
    assert container["args"] == dockerfile.exec_form("serve", "CMD")
    security = deployment["spec"]["template"]["spec"]["securityContext"]
    assert security["runAsNonRoot"] is True
    assert str(security["runAsUser"]) == dockerfile.effective("serve", "USER").split(":")[0]


def test_termination_grace_covers_prestop_and_drain() -> None:
    pod = _one("Deployment")["spec"]["template"]["spec"]
    container = _container(_one("Deployment"))
    config = _one("ConfigMap", "eat-config")["data"]
    assert {"configMapRef": {"name": "eat-config"}} in container["envFrom"]
    prestop = container["lifecycle"]["preStop"]["exec"]["command"]
    assert prestop[0] == "sleep"
    prestop_s = float(prestop[1])
    drain_s = float(config["EAT_DRAIN_TIMEOUT_S"])
    margin_s = pod["terminationGracePeriodSeconds"] - prestop_s - drain_s
    assert prestop_s >= 5, "endpoints must be removed before SIGTERM"
    assert 5 <= margin_s <= 30


def test_service_pdb_and_monitor_select_the_pods() -> None:
    pod_labels = _one("Deployment")["spec"]["template"]["metadata"]["labels"]
    service = _one("Service", "eat")
    assert service["spec"]["selector"].items() <= pod_labels.items()
    pdb = _one("PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert pdb["spec"]["minAvailable"] >= 1
    monitor = _one("ServiceMonitor")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    port_names = {p["name"] for p in service["spec"]["ports"]}
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] in port_names and endpoint["path"] == "/metrics"
    # the service's own `endpoint` label would otherwise be renamed to exported_endpoint
    assert endpoint["honorLabels"] is True
    assert service["metadata"]["namespace"] in monitor["spec"]["namespaceSelector"]["matchNames"]


def test_hpa_metric_is_served_by_the_adapter_rule() -> None:
    hpa = _one("HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"
    deployment = _one("Deployment")
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                             "name": deployment["metadata"]["name"]}
    assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods"
    name = metric["pods"]["metric"]["name"]
    adapter = _one("ConfigMap", "prometheus-adapter")
    rules = yaml.safe_load(adapter["data"]["config.yaml"])["rules"]
    rule = next(r for r in rules if r["name"]["as"] == name)
    assert re.match(rf"^{name}\{{", rule["seriesQuery"]) and re.fullmatch(rule["name"]["matches"], name)
    assert rule["resources"]["overrides"]["pod"] == {"resource": "pod"}
    assert rule["resources"]["overrides"]["namespace"] == {"resource": "namespace"}
    for placeholder in ("<<.Series>>", "<<.LabelMatchers>>", "<<.GroupBy>>"):
        assert placeholder in rule["metricsQuery"]
    # the target is a share of a batch: below EAT_MAX_BATCH, or the pods would be saturated before scaling
    max_batch = int(_one("ConfigMap", "eat-config")["data"]["EAT_MAX_BATCH"])
    assert 0 < float(metric["pods"]["target"]["averageValue"]) <= max_batch


def _torchrun_args(job: dict[str, Any]) -> dict[str, str]:
    container = _container(job)
    argv = container["command"] + container["args"]
    assert argv[0] == "torchrun"
    module_at = argv.index("-m")
    options = {}
    for arg in argv[1:module_at]:
        key, _, value = arg.partition("=")
        options[key] = value
    return options


def test_pretraining_job_rendezvous() -> None:
    job = _one("Job", "eat-pretrain")
    spec = job["spec"]
    assert spec["completionMode"] == "Indexed"
    options = _torchrun_args(job)
    assert int(options["--nnodes"]) == spec["completions"] == spec["parallelism"]
    assert options["--node-rank"] == "$(JOB_COMPLETION_INDEX)"
    assert options["--rdzv-backend"] == "c10d"
    headless = _one("Service", "eat-pretrain")
    assert headless["spec"]["clusterIP"] == "None"
    assert headless["spec"]["selector"] == {"batch.kubernetes.io/job-name": job["metadata"]["name"]}
    pod = spec["template"]["spec"]
    assert pod["subdomain"] == headless["metadata"]["name"]
    host, port = options["--rdzv-endpoint"].split(":")
    # Indexed Job pods are named <job>-<index>; index 0 hosts the rendezvous
    assert host == f"{job['metadata']['name']}-0.{headless['metadata']['name']}"
    assert int(port) in {p["port"] for p in headless["spec"]["ports"]}
    gpus = _container(job)["resources"]["limits"]["nvidia.com/gpu"]
    assert int(options["--nproc-per-node"]) == gpus


def test_pretraining_job_resumes_from_a_shared_volume() -> None:
    job = _one("Job", "eat-pretrain")
    container = _container(job)
    argv = container["args"]
    command = argv[argv.index("-m") + 1:]
    assert command[:2] == ["training.cli", "pretrain"]
    assert "--resume" in command
    out = next(a.split("=", 1)[1] for a in command if a.startswith("--out="))
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    mount = next(path for path in mounts if out.startswith(path + "/"))
    volume = next(v for v in job["spec"]["template"]["spec"]["volumes"] if v["name"] == mounts[mount])
    claim = _one("PersistentVolumeClaim", volume["persistentVolumeClaim"]["claimName"])
    assert "ReadWriteMany" in claim["spec"]["accessModes"], "every node reads the checkpoint on resume"
    assert shlex.join(command)  # plain strings only


def test_everything_is_namespaced() -> None:
    for path, doc in _all_documents():
        if doc["kind"] in {"Namespace", "Kustomization"}:
            continue
        assert doc["metadata"].get("namespace"), f"{path.relative_to(REPO_ROOT)}: {doc['kind']} without namespace"


def test_pretraining_job_recipe_is_mounted_and_valid(tmp_path: Path) -> None:
    from training.config import PretrainConfig, load_config

    job = _one("Job", "eat-pretrain")
    container = _container(job)
    recipe = Path(next(a.split("=", 1)[1] for a in container["args"] if a.startswith("--recipe=")))
    mount = next(m for m in container["volumeMounts"] if m["mountPath"] == str(recipe.parent))
    volume = next(v for v in job["spec"]["template"]["spec"]["volumes"] if v["name"] == mount["name"])
    config_map = _one("ConfigMap", volume["configMap"]["name"])
    (tmp_path / recipe.name).write_text(config_map["data"][recipe.name])
    cfg = load_config(PretrainConfig, str(tmp_path / recipe.name))  # unknown or mistyped keys raise
    assert cfg.model_preset == "base"
