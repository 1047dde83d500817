"""The KubeRay manifests of ``deploy/k8s/ray/``: the RayJob against a schema of KubeRay's ``ray.io/v1`` CRD
(written here from KubeRay's API types, for the fields we use, strictly: an unknown or mistyped field fails),
its pod templates against the Kubernetes API schemas (as ``PodTemplate`` objects), and its links: the
entrypoint is a valid ``eat predict`` command whose paths are mounted on every pod, the actors fit the
workers, and the cluster's Ray is the version ``pyproject.toml`` pins."""

from __future__ import annotations

import argparse
import re
import shlex
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import tomllib
import yaml
from deploy_files import REPO_ROOT, load_yaml_documents

from eat import predict_cli
from eat.bulk_ray import RayOptions

RAY = REPO_ROOT / "deploy/k8s/ray"
K8S_VERSION = kubernetes_validate.utils.latest_version()

_STRING_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
_POD_TEMPLATE = {"type": "object", "required": ["spec"]}  # its contents are checked by kubernetes-validate
_COUNT = {"type": "integer", "minimum": 0}
RAYJOB_SCHEMA: dict[str, Any] = {  # ray.io/v1 RayJob (KubeRay >= 1.1), the fields we use
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "ray.io/v1"},
        "kind": {"const": "RayJob"},
        "metadata": {"type": "object", "required": ["name", "namespace"],
                     "properties": {"name": {"type": "string", "pattern": "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"}}},
        "spec": {
            "type": "object",
            "additionalProperties": False,
            "required": ["entrypoint", "rayClusterSpec"],
            "properties": {
                "entrypoint": {"type": "string", "minLength": 1},
                "shutdownAfterJobFinishes": {"type": "boolean"},
                "ttlSecondsAfterFinished": _COUNT,
                "activeDeadlineSeconds": _COUNT,
                "backoffLimit": _COUNT,
                "submissionMode": {"enum": ["K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode"]},
                "runtimeEnvYAML": {"type": "string"},
                "suspend": {"type": "boolean"},
                "rayClusterSpec": {
                    "type": "object",
                    "additionalProperties": False,
                    "required": ["headGroupSpec"],
                    "properties": {
                        "rayVersion": {"type": "string", "pattern": r"^\d+\.\d+\.\d+$"},
                        "enableInTreeAutoscaling": {"type": "boolean"},
                        "headGroupSpec": {
                            "type": "object",
                            "additionalProperties": False,
                            "required": ["template"],
                            "properties": {"rayStartParams": _STRING_MAP, "template": _POD_TEMPLATE,
                                           "serviceType": {"enum": ["ClusterIP", "NodePort", "LoadBalancer"]}},
                        },
                        "workerGroupSpecs": {"type": "array", "items": {
                            "type": "object",
                            "additionalProperties": False,
                            "required": ["groupName", "template"],
                            "properties": {"groupName": {"type": "string"}, "replicas": _COUNT,
                                           "minReplicas": _COUNT, "maxReplicas": _COUNT, "numOfHosts": _COUNT,
                                           "rayStartParams": _STRING_MAP, "template": _POD_TEMPLATE},
                        }},
                    },
                },
            },
        },
    },
}


def _documents() -> list[dict[str, Any]]:
    return [doc for path in sorted(RAY.glob("*.yaml")) for doc in load_yaml_documents(path)]


def _rayjob() -> dict[str, Any]:
    (job,) = [d for d in _documents() if d["kind"] == "RayJob"]
    return job


def _templates(job: dict[str, Any]) -> dict[str, dict[str, Any]]:
    cluster = job["spec"]["rayClusterSpec"]
    groups = {"head": cluster["headGroupSpec"]["template"]}
    groups.update({g["groupName"]: g["template"] for g in cluster["workerGroupSpecs"]})
    return groups


def _entrypoint_args(job: dict[str, Any]) -> argparse.Namespace:
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[:4] == ["python", "-m", "training.cli", "predict"]
    parser = argparse.ArgumentParser(exit_on_error=False)
    predict_cli.add_arguments(parser)
    return parser.parse_args(argv[4:])  # an unknown or mistyped flag raises


def test_rayjob_matches_the_kuberay_schema() -> None:
    job = _rayjob()
    jsonschema.validate(job, RAYJOB_SCHEMA)
    bad = yaml.safe_load(yaml.safe_dump(job))
    bad["spec"]["rayClusterSpec"]["headGroupSpec"]["rayStartParams"]["num-cpus"] = 0  # KubeRay wants strings
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, RAYJOB_SCHEMA)
    bad = yaml.safe_load(yaml.safe_dump(job))
    bad["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["replica"] = 2  # misspelt
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, RAYJOB_SCHEMA)


def test_pod_templates_validate_strictly() -> None:
    for group, template in _templates(_rayjob()).items():
        wrapped = {"apiVersion": "v1", "kind": "PodTemplate",
                   "metadata": {"name": f"eat-bulk-{group}", "namespace": "eat"}, "template": template}
        try:
            kubernetes_validate.validate(wrapped, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as err:
            pytest.fail(f"{group}: {'.'.join(str(p) for p in err.path)}: {err.message}")
        assert template["spec"]["securityContext"]["runAsNonRoot"] is True


def test_entrypoint_is_an_eat_command_on_ray_with_mounted_paths() -> None:
    job = _rayjob()
    args = _entrypoint_args(job)
    assert args.engine == "ray" and args.address == "auto" and args.out.endswith(".parquet")
    claims = {d["metadata"]["name"]: d for d in _documents() if d["kind"] == "PersistentVolumeClaim"}
    for group, template in _templates(job).items():
        (container,) = template["spec"]["containers"]
        volumes = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in template["spec"]["volumes"]}
        mounts = {m["mountPath"]: m for m in container["volumeMounts"]}

        def claim_for(path: str, group: str = group, mounts: dict = mounts, volumes: dict = volumes) -> dict:
            mount = next((m for p, m in mounts.items() if path.startswith(p.rstrip("/") + "/")), None)
            assert mount is not None, f"{group}: {path} is not on a mounted volume"
            return claims[volumes[mount["name"]]]

        for path in [*args.files, args.model]:
            claim_for(path)
        # actors on every worker write shards, the driver on the head the manifest: one shared volume
        assert "ReadWriteMany" in claim_for(args.out + "/part-000000.parquet")["spec"]["accessModes"]
    images = {t["spec"]["containers"][0]["image"] for t in _templates(job).values()}
    assert len(images) == 1, f"head and workers must run the same code: {images}"


def _quantity(value: str | int) -> float:
    match = re.fullmatch(r"(\d+(?:\.\d+)?)(m?)", str(value))
    assert match, f"unexpected quantity {value!r}"
    return float(match[1]) / (1000 if match[2] else 1)


def test_actors_fit_the_workers_and_ray_matches_the_pin() -> None:
    job = _rayjob()
    args = _entrypoint_args(job)
    options = RayOptions(address=args.address, num_actors=args.num_actors, gpus_per_actor=args.gpus_per_actor,
                         cpus_per_actor=args.cpus_per_actor)
    cluster = job["spec"]["rayClusterSpec"]
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0", "keep tasks off the head"
    gpus = cpus = 0.0
    for group in cluster["workerGroupSpecs"]:
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        gpus += group["replicas"] * _quantity(limits.get("nvidia.com/gpu", 0))
        cpus += group["replicas"] * _quantity(limits["cpu"])
    assert options.num_actors * options.gpus_per_actor <= gpus
    assert options.num_actors * options.cpus_per_actor + options.decode_cpus <= cpus
    pyproject = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
    (ray_pin,) = [d for d in pyproject["project"]["optional-dependencies"]["bulk"] if d.startswith("ray")]
    assert ray_pin.endswith("==" + cluster["rayVersion"])
