"""deploy/k8s: every manifest validates against the Kubernetes schemas (kubernetes-validate,
strict: no unknown fields), kustomize builds them, and they fit each other and the server (the
settings they set exist, probes hit the server's health routes, selectors select)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from service.config import Settings

K8S = Path(__file__).resolve().parents[1] / "deploy" / "k8s"
VERSION = "1.30.0"  # the oldest Kubernetes these manifests are meant for
NOT_RESOURCES = {"kustomization.yaml"}


def documents(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def manifests() -> dict[str, list[dict]]:
    return {p.name: documents(p) for p in sorted(K8S.glob("*.yaml")) if p.name not in NOT_RESOURCES}


def all_docs() -> list[dict]:
    return [d for docs in manifests().values() for d in docs]


@pytest.mark.parametrize("name", sorted(manifests()))
def test_each_manifest_validates_against_the_kubernetes_schemas(name):
    for doc in manifests()[name]:
        kubernetes_validate.validate(doc, VERSION, strict=True)


def test_a_field_kubernetes_does_not_know_is_caught():
    bad = {**documents(K8S / "api-hpa.yaml")[0]}
    bad["spec"] = {**bad["spec"], "minReplica": 2}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, VERSION, strict=True)


def test_kustomization_lists_every_manifest_but_the_example_secret():
    kust = documents(K8S / "kustomization.yaml")[0]
    assert set(kust["resources"]) == set(manifests()) - {"secret.example.yaml"}


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="no kubectl (kustomize) on this machine")
def test_kustomize_builds_documents_that_validate():
    out = subprocess.run(["kubectl", "kustomize", str(K8S)], capture_output=True, text=True, check=True)
    docs = [d for d in yaml.safe_load_all(out.stdout) if d]
    kinds = sorted(d["kind"] for d in docs)
    assert kinds.count("Deployment") == 3 and "HorizontalPodAutoscaler" in kinds
    for doc in docs:
        kubernetes_validate.validate(doc, VERSION, strict=True)
        if doc["kind"] != "Namespace":
            assert doc["metadata"]["namespace"] == "policy-server"
    images = {
        c["image"]
        for d in docs
        if d["kind"] == "Deployment"
        for c in d["spec"]["template"]["spec"]["containers"]
    }
    assert "registry.example.com/policy-server:latest" in images


def _deployments() -> dict[str, dict]:
    return {d["metadata"]["name"]: d for d in all_docs() if d["kind"] == "Deployment"}


def test_the_settings_they_set_are_the_servers_and_the_references_resolve():
    fields = {f"POLICY_SERVER_{f.upper()}" for f in Settings.model_fields}
    aws = {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION"}
    by_kind: dict[str, set[str]] = {}
    for d in all_docs():
        by_kind.setdefault(d["kind"], set()).add(d["metadata"]["name"])
    config = next(d for d in all_docs() if d["kind"] == "ConfigMap")
    secret = next(d for d in all_docs() if d["kind"] == "Secret")
    assert set(config["data"]) <= fields, set(config["data"]) - fields
    assert set(secret["stringData"]) <= fields | aws, set(secret["stringData"]) - fields - aws
    assert config["data"]["POLICY_SERVER_MODEL_DIR"].startswith("s3://")
    assert {"POLICY_SERVER_SESSION_STORE", "POLICY_SERVER_QUEUE_URL"} <= set(config["data"])
    for dep in _deployments().values():
        pod = dep["spec"]["template"]
        assert dep["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
        for c in pod["spec"]["containers"]:
            for src in c.get("envFrom", []):
                if "configMapRef" in src:
                    assert src["configMapRef"]["name"] in by_kind["ConfigMap"]
                if "secretRef" in src:
                    assert src["secretRef"]["name"] in by_kind["Secret"]
            for e in c.get("env", []):
                assert e["name"] in fields
        for v in pod["spec"].get("volumes", []):
            if "persistentVolumeClaim" in v:
                assert v["persistentVolumeClaim"]["claimName"] in by_kind["PersistentVolumeClaim"]
    hpa = next(d for d in all_docs() if d["kind"] == "HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"]["name"] in _deployments()


def test_services_select_their_pods_and_probes_hit_the_health_routes(client):
    deployments = _deployments()
    for svc in (d for d in all_docs() if d["kind"] == "Service"):
        selected = [
            dep
            for dep in deployments.values()
            if svc["spec"]["selector"].items() <= dep["spec"]["template"]["metadata"]["labels"].items()
        ]
        assert len(selected) == 1, svc["metadata"]["name"]
        ports = {p["name"] for c in selected[0]["spec"]["template"]["spec"]["containers"] for p in c["ports"]}
        assert {p["targetPort"] for p in svc["spec"]["ports"]} <= ports
    api = deployments["policy-server-api"]["spec"]["template"]["spec"]["containers"][0]
    assert api["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert api["livenessProbe"]["httpGet"]["path"] == "/healthz"
    for probe in ("readinessProbe", "livenessProbe"):
        assert client.get(api[probe]["httpGet"]["path"]).status_code == 200
    worker = deployments["policy-server-worker"]["spec"]["template"]["spec"]["containers"][0]
    assert worker["args"][:2] == ["policy-server", "worker"]
    assert "nvidia.com/gpu" in (K8S / "worker.yaml").read_text()  # where to ask for a GPU


def test_the_kserve_inference_service_runs_a_valid_container_on_the_v2_routes(client):
    (isvc,) = documents(K8S / "kserve" / "inferenceservice.yaml")
    assert isvc["apiVersion"] == "serving.kserve.io/v1beta1" and isvc["kind"] == "InferenceService"
    containers = isvc["spec"]["predictor"]["containers"]
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"}, "spec": {"containers": containers}}
    kubernetes_validate.validate(pod, VERSION, strict=True)  # what KServe runs is a plain container
    (c,) = containers
    assert c["name"] == "kserve-container" and len(c["ports"]) == 1
    port = c["ports"][0]["containerPort"]
    assert c["args"][-2:] == ["--port", str(port)]
    for probe in ("readinessProbe", "livenessProbe"):
        path = c[probe]["httpGet"]["path"]
        assert client.get(path).status_code == 200, path
