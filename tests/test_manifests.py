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


# ------------------------------------------------------- what the cluster's controllers do

# KServe's pod webhook (kserve v0.20.0, pkg/webhook/admission/pod/metrics_aggregate_injector.go)
# fills a missing enable-prometheus-scraping / enable-metric-aggregation annotation from the
# cluster's inferenceservice-config, and when scraping is "true" overwrites prometheus.io/port
# with 9088 (aggregation "true": KServe's queue-proxy extension serves queue-proxy's and the
# container's metrics there, the container's taken from prometheus.kserve.io/port) or 9091
# (queue-proxy's own metrics only). Standard mode has no queue-proxy: nothing listens there.
SCRAPING = "serving.kserve.io/enable-prometheus-scraping"
AGGREGATION = "serving.kserve.io/enable-metric-aggregation"


def scraped_endpoint(obj: dict, cluster_default: bool) -> tuple[str, int, str] | None:
    """(what answers, port, path) that annotation-based Prometheus scrapes on the pods."""
    if obj["kind"] == "Deployment":
        annotations = dict(obj["spec"]["template"]["metadata"].get("annotations", {}))
        mode = "Deployment"
    else:
        annotations = dict(obj["metadata"].get("annotations", {}))
        mode = annotations["serving.kserve.io/deploymentMode"]
        default = "true" if cluster_default else "false"
        annotations.setdefault(SCRAPING, default)
        annotations.setdefault(AGGREGATION, default)
        if annotations[SCRAPING] == "true":
            aggregated = annotations[AGGREGATION] == "true"
            annotations["prometheus.io/port"] = "9088" if aggregated else "9091"
            annotations["prometheus.io/path"] = "/metrics"
    if annotations.get("prometheus.io/scrape") != "true":
        return None
    port = int(annotations["prometheus.io/port"])
    path = annotations.get("prometheus.io/path", "/metrics")
    spec = pod_spec(obj)
    container_ports = {p["containerPort"] for p in spec["containers"][0].get("ports", [])}
    if mode == "Knative" and port == 9088:
        inner = int(annotations.get("prometheus.kserve.io/port", "8080"))
        inner_path = annotations.get("prometheus.kserve.io/path", "/metrics")
        serves = inner in container_ports and inner_path == "/metrics"
        return ("predictor+queue-proxy" if serves else "queue-proxy", port, path)
    if mode == "Knative" and port == 9091:
        return ("queue-proxy", port, path)
    return ("predictor" if port in container_ports else "nothing", port, path)


def admitted_ports(objects: tuple[dict, ...]) -> set[int]:
    policy = next(o for o in objects if o["kind"] == "NetworkPolicy")
    return {p["port"] for rule in policy["spec"].get("ingress", []) for p in rule["ports"]}


def workload(directory: str) -> dict:
    return next(o for o in render(directory) if o["kind"] in ("InferenceService", "Deployment"))


@pytest.mark.parametrize("directory", DEPLOYABLES)
@pytest.mark.parametrize("cluster_default", [True, False])
def test_prometheus_scrapes_the_fraud_metrics_through_an_admitted_port(directory, cluster_default):
    endpoint = scraped_endpoint(workload(directory), cluster_default)
    assert endpoint is not None, f"{directory}: pods are not annotated for scraping"
    serves, port, path = endpoint
    assert serves.startswith("predictor") and path == "/metrics", (directory, endpoint)
    assert port in admitted_ports(render(directory)), (directory, port)


def test_scrape_check_catches_the_webhook_rewriting_the_port_in_standard_mode():
    isvc = copy.deepcopy(workload("manifests/overlays/standard"))
    isvc["metadata"]["annotations"][SCRAPING] = "true"
    assert scraped_endpoint(isvc, cluster_default=False)[:2] == ("nothing", 9091)
    del isvc["metadata"]["annotations"][SCRAPING]  # left to a cluster default of "true"
    assert scraped_endpoint(isvc, cluster_default=True)[0] == "nothing"
    knative = copy.deepcopy(workload("manifests/overlays/knative"))
    knative["metadata"]["annotations"][AGGREGATION] = "false"
    assert scraped_endpoint(knative, cluster_default=True)[0] == "queue-proxy"


def owned_objects(directory: str) -> set[tuple[str, str, str]]:
    return {
        (
            o["apiVersion"].rpartition("/")[0] + "/" + o["kind"],
            o["metadata"].get("namespace", ""),
            o["metadata"]["name"].rsplit("-", 1)[0]
            if o["kind"] == "ConfigMap"
            else o["metadata"]["name"],
        )
        for o in render(directory)
    }


def test_no_two_applications_own_the_same_object():
    """Two Applications owning one object overwrite each other under selfHeal, and deleting
    one deletes the other's. Knative and Standard are alternative paths of one Application,
    so each is checked against the fallback."""
    paths = {
        yaml.safe_load(p.read_text())["spec"]["source"]["path"]
        for p in ARGOCD_FILES
        if yaml.safe_load(p.read_text())["kind"] == "Application"
    }
    assert paths == {"manifests/overlays/knative", "manifests/fallback"}
    for kserve in ("manifests/overlays/knative", "manifests/overlays/standard"):
        shared = owned_objects(kserve) & owned_objects("manifests/fallback")
        assert not shared, (kserve, shared)


def test_name_clash_check_catches_two_deployables_with_one_service_account():
    fallback = owned_objects("manifests/fallback")
    clashing = {("/ServiceAccount", "fraud-detection", "fraud-predictor")} | fallback
    assert clashing & owned_objects("manifests/overlays/knative")


def ignore_differences_without_reason(text: str) -> list[str]:
    """ignoreDifferences entries with no `# live diff: ...` comment right above them."""
    lines = text.splitlines()
    problems = []
    inside = False
    for index, line in enumerate(lines):
        if line.strip().startswith("ignoreDifferences:"):
            inside = True
            continue
        if inside and line.startswith("  ") and line.lstrip().startswith("- "):
            above = lines[index - 1].strip().lower()
            if not above.startswith("# live diff:"):
                problems.append(line.strip())
        elif inside and line.strip() and not line.startswith("    "):
            inside = False
    return problems


def test_ignore_differences_only_with_a_live_diff_reason_beside_them():
    for path in ARGOCD_FILES:
        text = path.read_text()
        assert ignore_differences_without_reason(text) == [], path.name
        application = yaml.safe_load(text)
        options = application.get("spec", {}).get("syncPolicy", {}).get("syncOptions", [])
        if "RespectIgnoreDifferences=true" in options:
            assert application["spec"].get("ignoreDifferences"), path.name


def test_ignore_differences_check_catches_an_unexplained_entry():
    text = (
        "spec:\n  ignoreDifferences:\n    - group: apps\n      kind: Deployment\n"
        "    # live diff: the HPA sets it\n    - group: apps\n      kind: StatefulSet\n"
    )
    assert ignore_differences_without_reason(text) == ["- group: apps"]


def test_deployments_scaled_by_an_hpa_set_no_replicas():
    for directory in DEPLOYABLES:
        objects = render(directory)
        for hpa in (o for o in objects if o["kind"] == "HorizontalPodAutoscaler"):
            target = hpa["spec"]["scaleTargetRef"]
            deployment = next(
                o
                for o in objects
                if (o["kind"], o["metadata"]["name"]) == (target["kind"], target["name"])
            )
            assert "replicas" not in deployment["spec"], directory


def byte_size(quantity: str) -> int:
    """nginx sizes: 8m, 512k, 1g or plain bytes."""
    units = {"k": 1024, "m": 1024**2, "g": 1024**3}
    unit = quantity[-1].lower()
    return int(quantity[:-1]) * units[unit] if unit in units else int(quantity)


def test_ingress_admits_the_bodies_the_predictor_admits():
    objects = render("manifests/fallback")
    config = next(o for o in objects if o["kind"] == "ConfigMap")["data"]
    ingress = next(o for o in objects if o["kind"] == "Ingress")
    limit = ingress["metadata"]["annotations"]["nginx.ingress.kubernetes.io/proxy-body-size"]
    assert byte_size(limit) >= int(config["MAX_REQUEST_BYTES"])


def test_pods_leave_the_endpoints_before_they_stop():
    """Standard mode and the fallback sleep in preStop within the grace period; Knative
    forbids both fields (knative/serving pkg/apis/serving/fieldmask.go) and its queue-proxy
    drains on its own."""
    for directory in ("manifests/overlays/standard", "manifests/fallback"):
        spec = pod_spec(workload(directory))
        command = spec["containers"][0]["lifecycle"]["preStop"]["exec"]["command"]
        assert command[0] == "sleep"
        assert 0 < int(command[1]) < spec["terminationGracePeriodSeconds"] - 10, directory
    knative = pod_spec(workload("manifests/overlays/knative"))
    assert "terminationGracePeriodSeconds" not in knative
    assert all("lifecycle" not in c for c in knative["containers"])


def test_generated_config_is_kept_for_old_pods_and_ignored_when_extraneous():
    for directory in DEPLOYABLES:
        config = next(o for o in render(directory) if o["kind"] == "ConfigMap")
        annotations = config["metadata"]["annotations"]
        assert annotations["argocd.argoproj.io/sync-options"] == "Prune=false"
        assert annotations["argocd.argoproj.io/compare-options"] == "IgnoreExtraneous"


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
