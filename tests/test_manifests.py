"""Kubernetes manifests and Argo CD Applications, validated offline.

* every kustomize directory renders with `kubectl kustomize`;
* core objects pass `kubernetes-validate --strict` for Kubernetes K8S_VERSION;
* InferenceService, Application and AppProject pass the real CRD schemas, made strict;
* policy: non-root, read-only root FS, resources, probes, pinned images, known settings;
* closed by default: the token Secret mounted in every pod, NetworkPolicies admitting each
  port only from the pods that use it, the Ingress publishing only scoring doors over TLS,
  compose publishing on loopback only, the image binding every interface;
* the decision ledger: its URI read from a Secret by every deployable, PostgreSQL reachable
  through the NetworkPolicies, the compose stack's own PostgreSQL;
* each check catches a planted mistake in a deliberately broken copy.

CRD schemas come from $MANIFEST_SCHEMAS_DIR (default ../shared/schemas).
"""

from __future__ import annotations

import copy
import os
import re
import shlex
import shutil
import subprocess
import sys
from functools import cache
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlsplit

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
    if obj["kind"] == "CronJob":
        return obj["spec"]["jobTemplate"]["spec"]["template"]["spec"]
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
            if probe not in container and obj["kind"] != "CronJob":  # servers, not jobs
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
        # The placeholder, until scripts/set_image.py pins a pushed image by digest.
        assert image.get("digest") or (image["newName"], image["newTag"]) == (
            "REGISTRY/fraud-predictor",
            "SET-ME",
        )
    components = ("config", "monitoring", "publish-explain")  # their images come from these
    for directory in ("manifests/base", *(f"manifests/components/{c}" for c in components)):
        assert "images" not in yaml.safe_load((ROOT / directory / "kustomization.yaml").read_text())


def set_image(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "scripts/set_image.py"), *args],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_set_image_check_refuses_the_placeholder_and_accepts_a_pinned_image(tmp_path):
    copy_root = tmp_path / "repo"
    shutil.copytree(ROOT / "manifests", copy_root / "manifests")
    refused = set_image("--check", "--root", str(copy_root))
    assert refused.returncode == 1
    lines = refused.stderr.strip().splitlines()
    assert len(lines) == len(DEPLOYABLES)
    for deployable, line in zip(DEPLOYABLES, lines, strict=True):
        assert line.startswith(f"error: {deployable}: image is the placeholder"), line
    # A tag without a digest is refused too, naming the one deployable left unpinned.
    assert (
        set_image("ghcr.io/acme/fraud-predictor", "3f9c2e1", "--root", str(copy_root)).returncode
        == 0
    )
    digest = "sha256:" + "4b1f" * 16
    pinned = set_image(
        "ghcr.io/acme/fraud-predictor", "3f9c2e1", "--digest", digest, "--root", str(copy_root)
    )
    assert pinned.returncode == 0, pinned.stderr
    knative = copy_root / "manifests/overlays/knative/kustomization.yaml"
    knative.write_text(knative.read_text().replace(f"    digest: {digest}\n", ""))
    (line,) = set_image("--check", "--root", str(copy_root)).stderr.strip().splitlines()
    unpinned = "image ghcr.io/acme/fraud-predictor:3f9c2e1 has no digest"
    assert line.startswith(f"error: manifests/overlays/knative: {unpinned}"), line
    set_image(
        "ghcr.io/acme/fraud-predictor", "3f9c2e1", "--digest", digest, "--root", str(copy_root)
    )
    accepted = set_image("--check", "--root", str(copy_root))
    assert accepted.returncode == 0 and accepted.stderr == "", accepted.stderr
    rendered = subprocess.run(
        [kubectl(), "kustomize", str(copy_root / "manifests/fallback")],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    assert f"image: ghcr.io/acme/fraud-predictor:3f9c2e1@{digest}" in rendered
    assert set_image("--check", "ghcr.io/acme/x", "--root", str(copy_root)).returncode == 2


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


# Namespaces as a cluster labels them (kubernetes.io/metadata.name is set by the API server);
# the client label is the one clients' namespaces are given (docs/deployment.md, Security).
CLIENT_LABEL = "fraud-predictor.example.com/client"
NAMESPACES = {
    name: {"kubernetes.io/metadata.name": name}
    for name in (
        "fraud-detection",
        "sandbox",
        "monitoring",
        "ingress-nginx",
        "knative-serving",
        "istio-system",
        "kourier-system",
        "databases",
    )
}
NAMESPACES["payments"] = {"kubernetes.io/metadata.name": "payments", CLIENT_LABEL: "true"}
PROMETHEUS = ("monitoring", {"app.kubernetes.io/name": "prometheus"})


def selector_matches(selector: dict, labels: dict[str, str]) -> bool:
    """A Kubernetes label selector (matchLabels and matchExpressions); {} matches all."""
    if any(labels.get(key) != value for key, value in selector.get("matchLabels", {}).items()):
        return False
    for expression in selector.get("matchExpressions", []):
        key, operator = expression["key"], expression["operator"]
        values = expression.get("values", [])
        if not {
            "In": key in labels and labels[key] in values,
            "NotIn": key not in labels or labels[key] not in values,
            "Exists": key in labels,
            "DoesNotExist": key not in labels,
        }[operator]:
            return False
    return True


def admitted_from(policy: dict, namespace: str, pod_labels: dict[str, str]) -> set[int | str]:
    """The ports `policy` admits from a pod with `pod_labels` in `namespace` (its labels those
    of NAMESPACES); "all" when a rule names no ports. An ipBlock counts as admitting anyone."""
    return ports_of_rules(policy, "ingress", namespace, pod_labels)


def reachable_on(policy: dict, namespace: str, pod_labels: dict[str, str]) -> set[int | str]:
    """The ports the pods `policy` selects may reach on a pod with `pod_labels` in
    `namespace`; "all" when a rule names no ports, or when the policy leaves egress open."""
    if "Egress" not in policy["spec"].get("policyTypes", []):
        return {"all"}
    return ports_of_rules(policy, "egress", namespace, pod_labels)


def ports_of_rules(
    policy: dict, direction: str, namespace: str, pod_labels: dict[str, str]
) -> set[int | str]:
    namespace_labels = NAMESPACES[namespace]
    ports: set[int | str] = set()
    for rule in policy["spec"].get(direction, []):
        peers = rule.get("from" if direction == "ingress" else "to") or [
            {"ipBlock": {"cidr": "0.0.0.0/0"}}
        ]
        for peer in peers:
            if "ipBlock" in peer:
                admitted = True
            elif "namespaceSelector" in peer:
                admitted = selector_matches(peer["namespaceSelector"], namespace_labels)
            else:
                admitted = namespace == policy["metadata"].get("namespace")
            if admitted and selector_matches(peer.get("podSelector", {}), pod_labels):
                ports |= {p["port"] for p in rule["ports"]} if rule.get("ports") else {"all"}
    return ports


def workload(directory: str) -> dict:
    return next(o for o in render(directory) if o["kind"] in ("InferenceService", "Deployment"))


@pytest.mark.parametrize("directory", DEPLOYABLES)
@pytest.mark.parametrize("cluster_default", [True, False])
def test_prometheus_scrapes_the_fraud_metrics_through_an_admitted_port(directory, cluster_default):
    endpoint = scraped_endpoint(workload(directory), cluster_default)
    assert endpoint is not None, f"{directory}: pods are not annotated for scraping"
    serves, port, path = endpoint
    assert serves.startswith("predictor") and path == "/metrics", (directory, endpoint)
    policy = next(o for o in render(directory) if o["kind"] == "NetworkPolicy")
    assert port in admitted_from(policy, *PROMETHEUS), (directory, port)


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


# ------------------------------------------------------------------ closed by default

# The token file (hashes and scopes, re-read when it changes) comes from one Secret, created
# out of band, mounted as a directory: the kubelet swaps a mounted Secret's ..data link, which
# a subPath mount never follows (docs/deployment.md, Security).
TOKENS_SECRET = "fraud-predictor-tokens"
TOKENS_KEY = "tokens"
TOKENS_FILE = "/etc/fraud-predictor/tokens/tokens"
POD_GID = 10001  # the pods run as 10001:10001


def env_value(container: dict, config_maps: dict[str, dict], name: str) -> str | None:
    """What `name` is in the container: its env wins over its envFrom ConfigMaps."""
    for variable in container.get("env", []):
        if variable["name"] == name:
            return variable.get("value")
    for source in container.get("envFrom", []):
        ref = source.get("configMapRef", {}).get("name")
        if ref in config_maps and name in config_maps[ref].get("data", {}):
            return config_maps[ref]["data"][name]
    return None


def token_mount_problems(obj: dict, config_maps: dict[str, dict]) -> list[str]:
    """Why the workload's container would not read the token Secret's current file."""
    spec = pod_spec(obj)
    if spec is None:
        return []
    volumes = [
        v for v in spec.get("volumes", []) if v.get("secret", {}).get("secretName") == TOKENS_SECRET
    ]
    if len(volumes) != 1:
        return [f"{len(volumes)} volumes of Secret {TOKENS_SECRET}"]
    (volume,) = volumes
    secret = volume["secret"]
    problems = []
    if secret.get("optional") is True:
        problems.append("the token Secret is optional: a pod without it would start open")
    mode = secret.get("defaultMode", 0o644)
    fs_group = spec.get("securityContext", {}).get("fsGroup")
    if not (mode & 0o004 or (mode & 0o040 and fs_group == POD_GID)):
        problems.append(f"the token file (mode {mode:o}, fsGroup {fs_group}) is unreadable")
    for container in spec["containers"]:
        name = f"{obj['kind']}/{obj['metadata']['name']}/{container['name']}"
        path = env_value(container, config_maps, "AUTH_TOKENS_FILE")
        if path is None:
            problems.append(f"{name}: AUTH_TOKENS_FILE is not set")
            continue
        mounts = [m for m in container.get("volumeMounts", []) if m["name"] == volume["name"]]
        if len(mounts) != 1:
            problems.append(f"{name}: the token volume is mounted {len(mounts)} times")
            continue
        (mount,) = mounts
        if "subPath" in mount or "subPathExpr" in mount:
            problems.append(f"{name}: the token Secret is mounted with a subPath (never updated)")
        if mount.get("readOnly") is not True:
            problems.append(f"{name}: the token Secret is mounted writable")
        file = PurePosixPath(path)
        if file.parent != PurePosixPath(mount["mountPath"]):
            problems.append(f"{name}: AUTH_TOKENS_FILE={path} is not in {mount['mountPath']}")
        items = {item["path"]: item["key"] for item in secret.get("items", [])}
        key = items.get(file.name) if items else file.name
        if key != TOKENS_KEY:
            problems.append(f"{name}: AUTH_TOKENS_FILE={path} is not the Secret's key")
    return problems


def config_maps_of(objects: tuple[dict, ...]) -> dict[str, dict]:
    return {o["metadata"]["name"]: o for o in objects if o["kind"] == "ConfigMap"}


@pytest.mark.parametrize("directory", DEPLOYABLES)
def test_every_deployable_reads_its_tokens_from_the_mounted_secret(directory):
    objects = render(directory)
    config_maps = config_maps_of(objects)
    assert token_mount_problems(workload(directory), config_maps) == []
    (container,) = pod_spec(workload(directory))["containers"]
    assert env_value(container, config_maps, "AUTH_TOKENS_FILE") == TOKENS_FILE


def test_token_mount_check_catches_each_way_a_pod_would_miss_its_tokens():
    objects = render("manifests/fallback")
    config_maps = config_maps_of(objects)
    deployment = next(o for o in objects if o["kind"] == "Deployment")

    def broken(change) -> list[str]:
        copied = copy.deepcopy(deployment)
        spec = copied["spec"]["template"]["spec"]
        change(spec, spec["containers"][0])
        return token_mount_problems(copied, config_maps)

    def sub_path(spec, container):
        mount = next(m for m in container["volumeMounts"] if m["name"] == "tokens")
        mount["mountPath"] = TOKENS_FILE
        mount["subPath"] = TOKENS_KEY

    def optional(spec, container):
        next(v for v in spec["volumes"] if v["name"] == "tokens")["secret"]["optional"] = True

    def no_fs_group(spec, container):
        del spec["securityContext"]["fsGroup"]

    def elsewhere(spec, container):
        container["env"] = [{"name": "AUTH_TOKENS_FILE", "value": "/etc/tokens/tokens"}]

    def unset(spec, container):
        del container["env"]

    def no_volume(spec, container):
        spec["volumes"] = [v for v in spec["volumes"] if v["name"] != "tokens"]

    assert any("subPath" in p for p in broken(sub_path))
    assert any("optional" in p for p in broken(optional))
    assert any("unreadable" in p for p in broken(no_fs_group))  # mode 0440, root's group
    assert any("is not in" in p for p in broken(elsewhere))
    assert any("not set" in p for p in broken(unset))
    assert broken(no_volume) == ["0 volumes of Secret fraud-predictor-tokens"]


def rules_open_to_everyone(policy: dict) -> list[int]:
    """Indexes of ingress rules with no `from`, or a peer that matches any pod anywhere."""
    open_rules = []
    for index, rule in enumerate(policy["spec"].get("ingress", [])):
        peers = rule.get("from") or []
        anyone = any(
            peer.get("ipBlock", {}).get("cidr") in ("0.0.0.0/0", "::/0")
            or (
                peer.get("namespaceSelector") == {}
                and not peer.get("podSelector", {}).get("matchLabels")
                and not peer.get("podSelector", {}).get("matchExpressions")
            )
            for peer in peers
        )
        if not peers or anyone:
            open_rules.append(index)
    return open_rules


# Who sends what to the pods, per deployable; anyone else gets nothing. Knative: the
# activator and the gateways send traffic to queue-proxy, the autoscaler scrapes its 9090;
# clients go through the gateway. Standard: clients, KServe's Ingress (Istio's gateway).
# Fallback: clients, the ingress-nginx controller. Prometheus scrapes every mode.
CALLERS = {
    "client": ("payments", {"app": "checkout"}),
    "unlabelled namespace": ("sandbox", {"app": "checkout"}),
    "same namespace": ("fraud-detection", {"app": "checkout"}),
    "prometheus": PROMETHEUS,
    "grafana": ("monitoring", {"app.kubernetes.io/name": "grafana"}),
    "ingress-nginx": ("ingress-nginx", {"app.kubernetes.io/name": "ingress-nginx"}),
    "activator": ("knative-serving", {"app": "activator"}),
    "autoscaler": ("knative-serving", {"app": "autoscaler"}),
    "knative controller": ("knative-serving", {"app": "controller"}),
    "istio gateway": ("istio-system", {"istio": "ingressgateway"}),
    "kourier gateway": ("kourier-system", {"app": "3scale-kourier-gateway"}),
}
ADMITTED = {
    "manifests/overlays/knative": {
        "activator": {8012, 8022},
        "istio gateway": {8012, 8022},
        "kourier gateway": {8012, 8022},
        "autoscaler": {9090},
        "prometheus": {9091, 9088},
    },
    "manifests/overlays/standard": {
        "client": {8080},
        "istio gateway": {8080},
        "prometheus": {8080},
    },
    "manifests/fallback": {
        "client": {8080},
        "ingress-nginx": {8080},
        "prometheus": {8080},
    },
}


def admitted_by_caller(policy: dict) -> dict[str, set[int | str]]:
    found = {caller: admitted_from(policy, *where) for caller, where in CALLERS.items()}
    return {caller: ports for caller, ports in found.items() if ports}


@pytest.mark.parametrize("directory", KUSTOMIZE_DIRS)
def test_every_networkpolicy_rule_names_who_it_admits(directory):
    policies = [o for o in render(directory) if o["kind"] == "NetworkPolicy"]
    assert policies
    for policy in policies:
        assert rules_open_to_everyone(policy) == [], (directory, policy["spec"]["ingress"])


@pytest.mark.parametrize("directory", DEPLOYABLES)
def test_networkpolicies_admit_each_port_only_from_the_pods_that_use_it(directory):
    policy = next(o for o in render(directory) if o["kind"] == "NetworkPolicy")
    assert admitted_by_caller(policy) == ADMITTED[directory]


def test_networkpolicy_checks_catch_a_rule_without_from():
    policy = copy.deepcopy(
        next(o for o in render("manifests/fallback") if o["kind"] == "NetworkPolicy")
    )
    del policy["spec"]["ingress"][0]["from"]
    assert rules_open_to_everyone(policy) == [0]
    assert admitted_by_caller(policy)["unlabelled namespace"] == {8080}
    policy["spec"]["ingress"][0]["from"] = [{"namespaceSelector": {}}]
    assert rules_open_to_everyone(policy) == [0]
    policy["spec"]["ingress"][0]["from"] = [{"podSelector": {}}]  # its own namespace only
    assert rules_open_to_everyone(policy) == []
    assert admitted_by_caller(policy)["same namespace"] == {8080}


# ------------------------------------------------------------------ the decision ledger

# The ledger's URI (postgresql://user:password@host/db) comes from one Secret, created out of
# band (docs/decision-ledger.md), never a literal in git. Optional for the
# predictor (a cluster without a ledger still serves, and says it records nothing); required
# by the fraud-report CronJob of the monitoring component, which has nothing to do without it.
LEDGER_SECRET = "fraud-predictor-ledger"
LEDGER_KEY = "DECISION_LOG_URI"
POSTGRESQL = 5432
LEDGER_DATABASE = ("databases", {"app.kubernetes.io/name": "postgresql"})


def ledger_env_problems(obj: dict, config_maps: dict[str, dict], optional: bool) -> list[str]:
    """Why the workload's containers would not take DECISION_LOG_URI from the ledger Secret
    (and only from it), with the Secret `optional` or required."""
    problems = []
    for container in pod_spec(obj)["containers"]:
        name = f"{obj['kind']}/{obj['metadata']['name']}/{container['name']}"
        for source in container.get("envFrom", []):
            ref = source.get("configMapRef", {}).get("name")
            if LEDGER_KEY in config_maps.get(ref, {}).get("data", {}):
                problems.append(f"{name}: {LEDGER_KEY} is a literal in ConfigMap {ref}")
        entries = [e for e in container.get("env", []) if e["name"] == LEDGER_KEY]
        if len(entries) != 1:
            problems.append(f"{name}: {LEDGER_KEY} is set {len(entries)} times in env")
            continue
        (entry,) = entries
        reference = entry.get("valueFrom", {}).get("secretKeyRef")
        if "value" in entry or reference is None:
            problems.append(f"{name}: {LEDGER_KEY} is not read from a Secret")
            continue
        if (reference.get("name"), reference.get("key")) != (LEDGER_SECRET, LEDGER_KEY):
            problems.append(f"{name}: {LEDGER_KEY} comes from {reference}")
        if reference.get("optional", False) is not optional:
            wanted = "optional" if optional else "required"
            problems.append(f"{name}: the ledger Secret is not {wanted}")
    return problems


@pytest.mark.parametrize("directory", DEPLOYABLES)
def test_every_deployable_reads_the_ledger_uri_from_the_optional_secret(directory):
    objects = render(directory)
    assert ledger_env_problems(workload(directory), config_maps_of(objects), optional=True) == []
    for obj in objects:  # nothing else names a database
        assert "postgresql://" not in yaml.safe_dump(obj), obj["kind"]


def test_ledger_env_check_catches_a_literal_a_wrong_secret_and_a_required_one():
    objects = render("manifests/fallback")
    config_maps = config_maps_of(objects)
    deployment = next(o for o in objects if o["kind"] == "Deployment")

    def broken(change, optional: bool = True) -> list[str]:
        copied = copy.deepcopy(deployment)
        container = copied["spec"]["template"]["spec"]["containers"][0]
        entry = next(e for e in container["env"] if e["name"] == LEDGER_KEY)
        change(container, entry)
        return ledger_env_problems(copied, config_maps, optional)

    def literal(container, entry):
        entry.pop("valueFrom")
        entry["value"] = "postgresql://fraud:secret@ledger:5432/ledger"

    def other_secret(container, entry):
        entry["valueFrom"]["secretKeyRef"]["name"] = "fraud-predictor-mlflow"

    def required(container, entry):
        del entry["valueFrom"]["secretKeyRef"]["optional"]

    def unset(container, entry):
        container["env"].remove(entry)

    def twice(container, entry):
        container["env"].append(copy.deepcopy(entry))

    predictor = f"Deployment/{deployment['metadata']['name']}/predictor"
    assert broken(literal) == [f"{predictor}: {LEDGER_KEY} is not read from a Secret"]
    assert any("comes from" in p for p in broken(other_secret))
    assert any("is not optional" in p for p in broken(required))
    assert any("is not required" in p for p in broken(lambda c, e: None, optional=False))
    assert any("set 0 times" in p for p in broken(unset))
    assert any("set 2 times" in p for p in broken(twice))
    in_config = copy.deepcopy(config_maps)
    (name,) = in_config
    in_config[name]["data"][LEDGER_KEY] = "postgresql://fraud:secret@ledger:5432/ledger"
    assert any(
        "literal in ConfigMap" in p for p in ledger_env_problems(deployment, in_config, True)
    )


@pytest.mark.parametrize("directory", DEPLOYABLES)
def test_every_deployable_reaches_postgresql_wherever_it_runs(directory):
    """Egress as before (DNS, MLflow on 5000, HTTPS for artifact stores) plus the ledger's
    PostgreSQL, in any namespace or outside the cluster (a rule without `to`)."""
    policy = next(o for o in render(directory) if o["kind"] == "NetworkPolicy")
    for where in (LEDGER_DATABASE, ("fraud-detection", {"app": "postgresql"})):
        assert reachable_on(policy, *where) == {53, 443, 5000, POSTGRESQL}, (directory, where)
    assert any(
        "to" not in rule and POSTGRESQL in {p["port"] for p in rule["ports"]}
        for rule in policy["spec"]["egress"]
    ), directory


def test_egress_check_catches_postgresql_left_out_and_egress_left_open():
    policy = copy.deepcopy(
        next(o for o in render("manifests/fallback") if o["kind"] == "NetworkPolicy")
    )
    for rule in policy["spec"]["egress"]:
        rule["ports"] = [p for p in rule["ports"] if p["port"] != POSTGRESQL]
    assert POSTGRESQL not in reachable_on(policy, *LEDGER_DATABASE)
    policy["spec"]["egress"][1]["to"] = [
        {"namespaceSelector": {"matchLabels": NAMESPACES["monitoring"]}}
    ]
    assert reachable_on(policy, *LEDGER_DATABASE) == {53}
    policy["spec"]["policyTypes"] = ["Ingress"]
    assert reachable_on(policy, *LEDGER_DATABASE) == {"all"}


# What the fallback Ingress publishes: the scoring doors and nothing else.
PUBLISHED = [
    "/v1/models/fraud-detector:predict",
    "/v2/models/fraud-detector/infer",
    "/v2/models/fraud-detector/versions/7/infer",
]
EXPLAIN = "/v1/models/fraud-detector:explain"
EXPLAIN_PATHS = [EXPLAIN, "/V1/models/fraud-detector:EXPLAIN"]  # ingress-nginx's ~* ignores case
UNPUBLISHED = [
    "/v1/models/fraud-detector",
    "/v1/models/fraud-detector:predictor",
    "/v2/models/fraud-detector",
    "/v2/models/fraud-detector/ready",
    "/v2/models/fraud-detector/infer/more",
    "/v2/models/fraud-detector/versions/7/../../explain/infer",
    "/v2/health/ready",
    "/v2/repository/index",
    "/metrics",
    "/docs",
]


def ingress_paths_reaching(ingress: dict, path: str) -> list[str]:
    """The Ingress paths ingress-nginx routes `path` by. With use-regex, every path of the
    host is `location ~* "^<path>"` (case-insensitive, a prefix unless anchored by `$`)."""
    regex = ingress["metadata"].get("annotations", {}).get("nginx.ingress.kubernetes.io/use-regex")
    found = []
    for rule in ingress["spec"]["rules"]:
        for entry in rule["http"]["paths"]:
            pattern, kind = entry["path"], entry["pathType"]
            if regex == "true":
                reached = re.match(pattern, path, re.IGNORECASE) is not None
            elif kind == "Exact":
                reached = path == pattern
            elif kind == "Prefix":
                reached = path == pattern or path.startswith(pattern.rstrip("/") + "/")
            else:
                reached = path.startswith(pattern)
            if reached:
                found.append(pattern)
    return found


def tls_problems(ingress: dict) -> list[str]:
    annotations = ingress["metadata"].get("annotations", {})
    problems = [
        f"{name} is not true"
        for name in (
            "nginx.ingress.kubernetes.io/ssl-redirect",
            "nginx.ingress.kubernetes.io/force-ssl-redirect",
        )
        if annotations.get(name) != "true"
    ]
    covered = {
        host
        for entry in ingress["spec"].get("tls", [])
        if entry.get("secretName")
        for host in entry.get("hosts", [])
    }
    for rule in ingress["spec"]["rules"]:
        if rule.get("host") not in covered:
            problems.append(f"host {rule.get('host')} has no TLS certificate")
    return problems


def ingress_of(objects: tuple[dict, ...] | list[dict]) -> dict:
    return next(o for o in objects if o["kind"] == "Ingress")


def test_ingress_serves_only_https_with_a_certificate_for_every_host():
    ingress = ingress_of(render("manifests/fallback"))
    assert tls_problems(ingress) == []
    assert {entry["secretName"] for entry in ingress["spec"]["tls"]} == {"fraud-predictor-tls"}


def test_ingress_publishes_the_scoring_doors_and_not_explain():
    ingress = ingress_of(render("manifests/fallback"))
    service = next(o for o in render("manifests/fallback") if o["kind"] == "Service")
    for path in PUBLISHED:
        assert ingress_paths_reaching(ingress, path), path
    for path in [*EXPLAIN_PATHS, *UNPUBLISHED]:
        assert ingress_paths_reaching(ingress, path) == [], path
    for rule in ingress["spec"]["rules"]:
        for entry in rule["http"]["paths"]:
            assert entry["backend"]["service"]["name"] == service["metadata"]["name"]


def test_ingress_checks_catch_plain_http_and_a_prefix_reaching_explain():
    ingress = copy.deepcopy(ingress_of(render("manifests/fallback")))
    del ingress["spec"]["tls"]
    del ingress["metadata"]["annotations"]["nginx.ingress.kubernetes.io/force-ssl-redirect"]
    problems = tls_problems(ingress)
    assert "host fraud-predictor.example.com has no TLS certificate" in problems
    assert "nginx.ingress.kubernetes.io/force-ssl-redirect is not true" in problems
    paths = ingress["spec"]["rules"][0]["http"]["paths"]
    paths[0]["path"] = "/v1/models/fraud-detector:predict"  # no $: a prefix
    assert ingress_paths_reaching(ingress, "/v1/models/fraud-detector:predictor")
    del ingress["metadata"]["annotations"]["nginx.ingress.kubernetes.io/use-regex"]
    paths[0].update(path="/v1", pathType="Prefix")
    assert ingress_paths_reaching(ingress, EXPLAIN) == ["/v1"]


def render_with_component(tmp_path: Path, deployable: str, component: str) -> list[dict]:
    """The deployable as a user enables a component: one `components:` line added."""
    copied = tmp_path / "repo"
    shutil.copytree(ROOT / "manifests", copied / "manifests")
    kustomization = copied / deployable / "kustomization.yaml"
    relative = Path(*[".."] * (len(Path(deployable).parts) - 1), "components", component)
    text = kustomization.read_text()
    assert "components:\n" in text
    kustomization.write_text(text.replace("components:\n", f"components:\n  - {relative}\n"))
    result = subprocess.run(
        [kubectl(), "kustomize", str(copied / deployable)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def test_publish_explain_component_adds_explain_and_nothing_else(tmp_path):
    objects = render_with_component(tmp_path, "manifests/fallback", "publish-explain")
    for obj in objects:
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
    ingress = ingress_of(objects)
    assert tls_problems(ingress) == []
    for path in [*PUBLISHED, *EXPLAIN_PATHS]:
        assert ingress_paths_reaching(ingress, path), path
    for path in UNPUBLISHED:
        assert ingress_paths_reaching(ingress, path) == [], path
    service = next(o for o in objects if o["kind"] == "Service")
    backends = {
        e["backend"]["service"]["name"] for e in ingress["spec"]["rules"][0]["http"]["paths"]
    }
    assert backends == {service["metadata"]["name"]}
    unchanged = [o for o in objects if o["kind"] != "Ingress"]
    assert unchanged == [o for o in render("manifests/fallback") if o["kind"] != "Ingress"]


def published_beyond_loopback(compose: dict) -> list[str]:
    """Compose ports published on every host interface (short or long syntax)."""
    problems = []
    for name, service in compose["services"].items():
        for port in service.get("ports", []):
            if isinstance(port, dict):
                host_ip = port.get("host_ip")
            else:
                parts = str(port).rsplit(":", 2)
                host_ip = parts[0] if len(parts) == 3 else None
            if host_ip != "127.0.0.1":
                problems.append(f"{name}: {port}")
    return problems


def compose_file() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def test_compose_publishes_ports_on_loopback_only():
    compose = compose_file()
    assert published_beyond_loopback(compose) == []
    published = {p for s in compose["services"].values() for p in s.get("ports", [])}
    assert published == {"127.0.0.1:5000:5000", "127.0.0.1:8080:8080"}


def test_loopback_check_catches_ports_on_every_interface():
    compose = compose_file()
    compose["services"]["predictor"]["ports"] = ["8080:8080", "9000"]
    compose["services"]["mlflow"]["ports"] = [{"target": 5000, "published": 5000}]
    assert published_beyond_loopback(compose) == [
        "mlflow: {'target': 5000, 'published': 5000}",
        "predictor: 8080:8080",
        "predictor: 9000",
    ]


def ledger_wiring_problems(compose: dict) -> list[str]:
    """Why the compose stack's predictor would not record its decisions in the stack's own
    PostgreSQL (the official image, or a stand-in under its name), once it is healthy."""
    services = compose["services"]
    database = services.get("ledger-db")
    if database is None:
        return ["no ledger-db service"]
    problems = []
    image = database.get("image", "")
    repository, _, tag = image.rpartition(":")
    if repository not in ("postgres", "docker.io/library/postgres") or tag in ("", "latest"):
        problems.append(f"ledger-db runs {image!r}, not a pinned upstream postgres image")
    if "pg_isready" not in " ".join(database.get("healthcheck", {}).get("test", [])):
        problems.append("ledger-db has no pg_isready healthcheck")
    data = [v for v in database.get("volumes", []) if str(v).endswith(":/var/lib/postgresql/data")]
    if len(data) != 1 or data[0].split(":")[0] not in (compose.get("volumes") or {}):
        problems.append("ledger-db keeps its data outside a named volume")
    env = database.get("environment", {})
    user = env.get("POSTGRES_USER", "postgres")
    uri = urlsplit(services["predictor"].get("environment", {}).get(LEDGER_KEY, ""))
    found = (uri.scheme, uri.username, uri.password, uri.hostname, uri.port, uri.path)
    wanted = ("postgresql", user, env.get("POSTGRES_PASSWORD"), "ledger-db", POSTGRESQL,
              f"/{env.get('POSTGRES_DB', user)}")  # fmt: skip
    if not env.get("POSTGRES_PASSWORD") or found != wanted:
        problems.append(f"the predictor's {LEDGER_KEY} is not ledger-db's database and user")
    waits = services["predictor"].get("depends_on", {}).get("ledger-db", {})
    if waits.get("condition") != "service_healthy":
        problems.append("the predictor does not wait for ledger-db to be healthy")
    return problems


def test_compose_records_decisions_in_its_own_postgresql():
    compose = compose_file()
    assert ledger_wiring_problems(compose) == []
    assert "ports" not in compose["services"]["ledger-db"]  # reached by service name only


def test_ledger_wiring_check_catches_each_broken_link():
    def broken(change) -> list[str]:
        compose = copy.deepcopy(compose_file())
        change(compose["services"]["ledger-db"], compose["services"]["predictor"])
        return ledger_wiring_problems(compose)

    def latest(database, predictor):
        database["image"] = "postgres:latest"

    def no_healthcheck(database, predictor):
        del database["healthcheck"]

    def anonymous_volume(database, predictor):
        database["volumes"] = ["/var/lib/postgresql/data"]

    def wrong_host(database, predictor):
        uri = predictor["environment"][LEDGER_KEY]
        predictor["environment"][LEDGER_KEY] = uri.replace("@ledger-db:", "@localhost:")

    def other_password(database, predictor):
        database["environment"]["POSTGRES_PASSWORD"] = "changed"

    def no_wait(database, predictor):
        del predictor["depends_on"]["ledger-db"]

    assert any("not a pinned upstream postgres" in p for p in broken(latest))
    assert any("pg_isready" in p for p in broken(no_healthcheck))
    assert any("named volume" in p for p in broken(anonymous_volume))
    assert any("is not ledger-db's database" in p for p in broken(wrong_host))
    assert any("is not ledger-db's database" in p for p in broken(other_password))
    assert any("does not wait" in p for p in broken(no_wait))


def normalised(reference: str) -> str:
    """An image reference as podman and docker name it: postgres:15 is
    docker.io/library/postgres:15, acme/app:1 is docker.io/acme/app:1."""
    first = reference.split("/", 1)[0]
    if "/" not in reference:
        return f"docker.io/library/{reference}"
    if "." in first or ":" in first or first == "localhost":
        return reference
    return f"docker.io/{reference}"


def pulled_images() -> set[str]:
    """Images the Dockerfile and the compose file take from a registry (not built here)."""
    images = {
        service["image"]
        for service in compose_file()["services"].values()
        if "image" in service and "build" not in service
    }
    stages: set[str] = set()
    for line in (ROOT / "Dockerfile").read_text().splitlines():
        words = [w for w in line.split() if not w.startswith("--")]
        if words and words[0].upper() == "FROM":
            if words[1] not in stages:
                images.add(words[1])
            if len(words) > 3 and words[2].upper() == "AS":
                stages.add(words[3])
    return {normalised(image) for image in images}


def stand_ins() -> set[str]:
    """What containers/ builds under upstream names where images cannot be pulled: the
    entries of stand-ins.list, and the project's own stand-in Dockerfiles (by their label)."""
    listed = {
        line.split()[0]
        for line in (ROOT / "containers" / "stand-ins.list").read_text().splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    }
    for dockerfile in (ROOT / "containers").glob("*/Dockerfile"):
        listed |= set(re.findall(r"local-stand-in-for-(\S+)", dockerfile.read_text()))
    return {normalised(reference) for reference in listed}


def test_every_image_the_stack_pulls_has_a_stand_in():
    assert "docker.io/library/postgres:15-bookworm" in pulled_images()
    assert pulled_images() - stand_ins() == set()
    # The list says how the postgres stand-in is built: on the python one, listed first.
    listed = (ROOT / "containers" / "stand-ins.list").read_text()
    base = re.search(r"--build-arg BASE=(\S+) .*\n#\s+-t (\S+) containers/postgres", listed)
    assert base and normalised(base[1]) in stand_ins(), "no build command in stand-ins.list"
    assert normalised(base[2]) == "docker.io/library/postgres:15-bookworm"
    hadolint = shutil.which("hadolint")
    if hadolint is not None:
        result = subprocess.run(
            [hadolint, str(ROOT / "containers" / "postgres" / "Dockerfile")],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 0, result.stdout


def test_stand_in_check_catches_an_image_without_one():
    assert normalised("postgres:16") not in stand_ins()
    assert normalised("ghcr.io/mlflow/mlflow:v3.17.2") == "ghcr.io/mlflow/mlflow:v3.17.2"
    assert normalised("bitnami/postgresql:15") == "docker.io/bitnami/postgresql:15"


def image_env(dockerfile: str, target: str) -> dict[str, str]:
    """The ENV a Dockerfile stage ends with, its parent stages' included."""
    text = re.sub(r"\\\n", " ", dockerfile)
    stages: dict[str, dict[str, str]] = {}
    current: dict[str, str] = {}
    for line in text.splitlines():
        words = line.split()
        if not words or words[0].startswith("#"):
            continue
        if words[0] == "FROM":
            base, name = (words[-3], words[-1]) if words[-2].upper() == "AS" else (words[-1],) * 2
            current = dict(stages[base]) if base in stages else {}
            stages[name] = current
        elif words[0] == "ENV":
            pairs = shlex.split(line.split(None, 1)[1])
            if "=" not in pairs[0]:  # the legacy `ENV NAME value` form
                pairs = [f"{pairs[0]}={' '.join(pairs[1:])}"]
            current.update(pair.split("=", 1) for pair in pairs)
    return stages[target]


def test_image_listens_on_every_interface_of_its_container():
    env = image_env((ROOT / "Dockerfile").read_text(), "serving")
    assert env["BIND_ADDRESS"] == "0.0.0.0"
    assert env["HOME"] == "/tmp"  # the runtime stage's ENV, inherited


def test_image_env_check_catches_a_server_left_on_loopback():
    text = (ROOT / "Dockerfile").read_text()
    assert "BIND_ADDRESS" not in image_env(text, "trainer")
    broken = re.sub(r"^ENV BIND_ADDRESS=\S+\n", "", text, flags=re.M)
    assert broken != text and "BIND_ADDRESS" not in image_env(broken, "serving")
