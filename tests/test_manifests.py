"""Kubernetes manifests and Argo CD Applications, validated offline.

* every kustomize directory renders with `kubectl kustomize`;
* core objects pass `kubernetes-validate --strict` for Kubernetes K8S_VERSION;
* InferenceService, Application and AppProject pass the real CRD schemas, made strict;
* policy: non-root, read-only root FS, resources, probes, pinned images, known settings;
* each check catches a planted mistake in a deliberately broken copy.

CRD schemas come from $MANIFEST_SCHEMAS_DIR (default ../shared/schemas).
"""

from __future__ import annotations

import copy
import os
import re
import shutil
import subprocess
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from predictor.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
K8S_VERSION = "1.30"
SCHEMAS_DIR = Path(os.environ.get("MANIFEST_SCHEMAS_DIR", ROOT.parent / "shared" / "schemas"))
DEPLOYABLES = ["manifests/overlays/knative", "manifests/overlays/standard", "manifests/fallback"]
KUSTOMIZE_DIRS = ["manifests/base", *DEPLOYABLES]
ARGOCD_FILES = sorted((ROOT / "argocd").glob("*.yaml"))
CRD_FILES = {
    "InferenceService": "serving.kserve.io_inferenceservices.yaml",
    "Application": "argoproj.io_applications.yaml",
    "AppProject": "argoproj.io_appprojects.yaml",
}
CUSTOM_KINDS = set(CRD_FILES)
MLFLOW_VARIABLES = {"MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN"}


# ------------------------------------------------------------------------------ helpers


def kubectl() -> str:
    binary = shutil.which("kubectl")
    if binary is None:
        pytest.skip("kubectl is not installed: its built-in kustomize renders the manifests")
    return binary


@cache
def render(directory: str) -> tuple[dict, ...]:
    result = subprocess.run(
        [kubectl(), "kustomize", str(ROOT / directory)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, f"{directory} does not render: {result.stderr}"
    return tuple(doc for doc in yaml.safe_load_all(result.stdout) if doc)


def all_rendered() -> list[tuple[str, dict]]:
    return [(d, obj) for d in DEPLOYABLES for obj in render(d)]


def strict(schema: Any) -> Any:
    """The CRD schema with unknown fields rejected wherever the CRD does not allow them."""
    if isinstance(schema, dict):
        schema = {key: strict(value) for key, value in schema.items()}
        if schema.get("x-kubernetes-int-or-string"):
            schema.pop("type", None)
            schema["type"] = ["integer", "string"]
        if (
            schema.get("type") == "object"
            and "properties" in schema
            and not schema.get("x-kubernetes-preserve-unknown-fields")
            and "additionalProperties" not in schema
        ):
            schema["additionalProperties"] = False
        if schema.get("nullable") and isinstance(schema.get("type"), str):
            schema["type"] = [schema["type"], "null"]
        return schema
    if isinstance(schema, list):
        return [strict(item) for item in schema]
    return schema


@cache
def crd_schema(kind: str) -> dict:
    path = SCHEMAS_DIR / CRD_FILES[kind]
    if not path.exists():
        pytest.skip(
            f"CRD schema {path} is absent; set MANIFEST_SCHEMAS_DIR to a directory holding "
            f"{', '.join(CRD_FILES.values())}"
        )
    crd = yaml.safe_load(path.read_text())
    version = next(v for v in crd["spec"]["versions"] if v.get("storage"))
    schema = strict(version["schema"]["openAPIV3Schema"])
    # metadata is validated by the API server, not by the CRD schema.
    schema.setdefault("properties", {})["metadata"] = {"type": "object"}
    return schema


def crd_errors(obj: dict) -> list[str]:
    validator = jsonschema.Draft7Validator(crd_schema(obj["kind"]))
    return [
        f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(obj)
    ]


def pod_spec(obj: dict) -> dict | None:
    if obj["kind"] == "InferenceService":
        return obj["spec"]["predictor"]
    if obj["kind"] == "Deployment":
        return obj["spec"]["template"]["spec"]
    return None


def policy_violations(obj: dict) -> list[str]:
    """What this project requires of every workload."""
    spec = pod_spec(obj)
    if spec is None:
        return []
    problems = []
    pod_security = spec.get("securityContext", {})
    for container in spec.get("containers", []):
        name = f"{obj['kind']}/{obj['metadata']['name']}/{container['name']}"
        security = {**pod_security, **container.get("securityContext", {})}
        if security.get("runAsNonRoot") is not True:
            problems.append(f"{name}: runAsNonRoot is not true")
        if container.get("securityContext", {}).get("readOnlyRootFilesystem") is not True:
            problems.append(f"{name}: readOnlyRootFilesystem is not true")
        if container.get("securityContext", {}).get("allowPrivilegeEscalation") is not False:
            problems.append(f"{name}: allowPrivilegeEscalation is not false")
        if "ALL" not in container.get("securityContext", {}).get("capabilities", {}).get(
            "drop", []
        ):
            problems.append(f"{name}: capabilities do not drop ALL")
        if security.get("seccompProfile", {}).get("type") != "RuntimeDefault":
            problems.append(f"{name}: seccompProfile is not RuntimeDefault")
        resources = container.get("resources", {})
        for kind in ("requests", "limits"):
            for resource in ("cpu", "memory"):
                if resource not in resources.get(kind, {}):
                    problems.append(f"{name}: no {kind}.{resource}")
        for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
            if probe not in container:
                problems.append(f"{name}: no {probe}")
        image = container.get("image", "")
        tag = image.rsplit(":", 1)[1] if ":" in image.rsplit("/", 1)[-1] else ""
        if not tag or tag == "latest":
            problems.append(f"{name}: image {image!r} is not pinned to a tag")
    return problems


# -------------------------------------------------------------------------------- tests


@pytest.mark.parametrize("directory", KUSTOMIZE_DIRS)
def test_kustomize_directory_renders(directory):
    kinds = {obj["kind"] for obj in render(directory)}
    assert "ConfigMap" in kinds


def test_each_deployable_has_the_objects_it_promises():
    for overlay in DEPLOYABLES[:2]:
        kinds = sorted(obj["kind"] for obj in render(overlay))
        assert kinds == ["ConfigMap", "InferenceService", "NetworkPolicy", "ServiceAccount"]
    assert sorted(obj["kind"] for obj in render("manifests/fallback")) == sorted(
        [
            "ConfigMap",
            "Deployment",
            "HorizontalPodAutoscaler",
            "Ingress",
            "NetworkPolicy",
            "PodDisruptionBudget",
            "Service",
            "ServiceAccount",
        ]
    )


def test_core_objects_pass_strict_kubernetes_schemas():
    for _, obj in all_rendered():
        if obj["kind"] in CUSTOM_KINDS:
            continue
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


def test_strict_kubernetes_validation_catches_a_misspelled_field():
    deployment = next(o for o in render("manifests/fallback") if o["kind"] == "Deployment")
    broken = copy.deepcopy(deployment)
    broken["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSION, strict=True)


def test_custom_resources_pass_the_real_crd_schemas_strictly():
    objects = [obj for _, obj in all_rendered() if obj["kind"] in CUSTOM_KINDS]
    objects += [yaml.safe_load(path.read_text()) for path in ARGOCD_FILES]
    assert {obj["kind"] for obj in objects} == CUSTOM_KINDS
    for obj in objects:
        assert crd_errors(obj) == [], f"{obj['kind']}/{obj['metadata']['name']}"


def test_crd_validation_catches_a_misspelled_inferenceservice_field():
    isvc = next(o for o in render(DEPLOYABLES[0]) if o["kind"] == "InferenceService")
    broken = copy.deepcopy(isvc)
    broken["spec"]["predictor"]["minReplica"] = broken["spec"]["predictor"].pop("minReplicas")
    assert any("minReplica" in error for error in crd_errors(broken))


def test_crd_validation_catches_a_missing_required_application_field():
    application = yaml.safe_load((ROOT / "argocd" / "application-kserve.yaml").read_text())
    broken = copy.deepcopy(application)
    del broken["spec"]["destination"]
    assert any("destination" in error for error in crd_errors(broken))


def test_workloads_meet_the_security_resource_probe_and_image_policy():
    for directory, obj in all_rendered():
        assert policy_violations(obj) == [], directory


def test_policy_catches_a_deployment_without_resources():
    deployment = next(o for o in render("manifests/fallback") if o["kind"] == "Deployment")
    broken = copy.deepcopy(deployment)
    del broken["spec"]["template"]["spec"]["containers"][0]["resources"]
    broken["spec"]["template"]["spec"]["containers"][0]["image"] = "fraud-predictor:latest"
    problems = policy_violations(broken)
    assert any("no requests.cpu" in p for p in problems)
    assert any("not pinned" in p for p in problems)


def test_images_are_set_in_one_place_per_deployable_and_pinned():
    for directory in DEPLOYABLES:
        kustomization = yaml.safe_load((ROOT / directory / "kustomization.yaml").read_text())
        (image,) = kustomization["images"]
        assert image["name"] == "fraud-predictor"
        assert image["newTag"] and image["newTag"] != "latest"
    for directory in ("manifests/base", "manifests/components/config"):
        assert "images" not in yaml.safe_load((ROOT / directory / "kustomization.yaml").read_text())


def test_inferenceservice_modes_and_autoscaling():
    knative = next(o for o in render(DEPLOYABLES[0]) if o["kind"] == "InferenceService")
    standard = next(o for o in render(DEPLOYABLES[1]) if o["kind"] == "InferenceService")
    assert knative["metadata"]["annotations"]["serving.kserve.io/deploymentMode"] == "Knative"
    assert knative["spec"]["predictor"]["scaleMetric"] == "concurrency"
    annotations = standard["metadata"]["annotations"]
    assert annotations["serving.kserve.io/deploymentMode"] == "Standard"
    assert annotations["serving.kserve.io/autoscalerClass"] == "hpa"
    assert standard["spec"]["predictor"]["scaleMetric"] == "cpu"
    for isvc in (knative, standard):
        predictor = isvc["spec"]["predictor"]
        assert predictor["containers"][0]["name"] == "kserve-container"
        assert 1 <= predictor["minReplicas"] <= predictor["maxReplicas"]
        probes = predictor["containers"][0]
        assert probes["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
        assert probes["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"


def test_config_references_resolve_and_name_only_known_settings():
    known = {name.upper() for name in Settings.model_fields}
    for directory in DEPLOYABLES:
        objects = render(directory)
        config_maps = {o["metadata"]["name"]: o for o in objects if o["kind"] == "ConfigMap"}
        for obj in objects:
            spec = pod_spec(obj)
            if spec is None:
                continue
            for container in spec["containers"]:
                refs = [
                    e["configMapRef"]["name"] for e in container["envFrom"] if "configMapRef" in e
                ]
                assert refs and all(ref in config_maps for ref in refs), (directory, refs)
                names = {e["name"] for e in container.get("env", [])}
                for ref in refs:
                    names |= set(config_maps[ref]["data"])
                assert names <= known | MLFLOW_VARIABLES, names - known
                secrets = [e["secretRef"] for e in container["envFrom"] if "secretRef" in e]
                assert all(secret.get("optional") is True for secret in secrets)


def test_no_secret_values_are_committed():
    for path in (ROOT / "manifests").rglob("*"):
        if path.is_file():
            text = path.read_text()
            assert "kind: Secret" not in text, path
            assert not re.search(r"(PASSWORD|TOKEN|SECRET_ACCESS_KEY)=\S", text), path


def test_every_application_path_exists_and_renders():
    project = yaml.safe_load((ROOT / "argocd" / "project.yaml").read_text())
    for path in ARGOCD_FILES:
        application = yaml.safe_load(path.read_text())
        if application["kind"] != "Application":
            continue
        spec = application["spec"]
        assert spec["project"] == project["metadata"]["name"]
        assert spec["source"]["repoURL"] in project["spec"]["sourceRepos"]
        assert (ROOT / spec["source"]["path"] / "kustomization.yaml").exists()
        assert render(spec["source"]["path"])
        automated = spec["syncPolicy"]["automated"]
        assert automated["prune"] is True and automated["selfHeal"] is True
        assert "CreateNamespace=true" in spec["syncPolicy"]["syncOptions"]
        assert spec["syncPolicy"]["retry"]["backoff"]["factor"] >= 2
        allowed = {(k["group"], k["kind"]) for k in project["spec"]["namespaceResourceWhitelist"]}
        for obj in render(spec["source"]["path"]):
            group = obj["apiVersion"].rpartition("/")[0]
            assert (group, obj["kind"]) in allowed, obj["kind"]


def test_inferenceservice_application_ignores_webhook_defaults():
    application = yaml.safe_load((ROOT / "argocd" / "application-kserve.yaml").read_text())
    (entry,) = application["spec"]["ignoreDifferences"]
    assert (entry["group"], entry["kind"]) == ("serving.kserve.io", "InferenceService")
    assert entry["jqPathExpressions"]


def checkov(*args: str) -> subprocess.CompletedProcess:
    binary = shutil.which("checkov")
    if binary is None:
        pytest.skip("checkov is not installed (it comes with the dev dependencies)")
    return subprocess.run(
        [binary, "--skip-download", "--quiet", "--compact", *args],
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_checkov_finds_nothing_in_rendered_manifests_and_dockerfile(tmp_path):
    files = []
    for directory in DEPLOYABLES:
        path = tmp_path / (directory.replace("/", "_") + ".yaml")
        path.write_text(yaml.safe_dump_all(render(directory)))
        files += ["-f", str(path)]
    manifests = checkov(*files, "--framework", "kubernetes")
    assert manifests.returncode == 0, manifests.stdout
    dockerfile = checkov("-f", str(ROOT / "Dockerfile"), "--framework", "dockerfile")
    assert dockerfile.returncode == 0, dockerfile.stdout


def test_checkov_catches_a_privileged_container(tmp_path):
    deployment = copy.deepcopy(
        next(o for o in render("manifests/fallback") if o["kind"] == "Deployment")
    )
    deployment["spec"]["template"]["spec"]["containers"][0]["securityContext"]["privileged"] = True
    path = tmp_path / "broken.yaml"
    path.write_text(yaml.safe_dump(deployment))
    result = checkov("-f", str(path), "--framework", "kubernetes")
    assert result.returncode != 0 and "CKV_K8S_16" in result.stdout
