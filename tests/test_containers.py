"""The image and the compose stack, built and run as users run them.

Deselected from `uv run pytest` (marker `containers`); `scripts/container_tests.sh` runs
`uv run pytest -m containers`. The engine is $CONTAINER_ENGINE, else Docker when its daemon
answers, else podman; with none the tests skip. Compose is `docker compose` or
podman-compose, or the script $COMPOSE_UP brings the stack up. Fixed host ports 5000 and
8080, as the compose file publishes them.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from functools import cache
from pathlib import Path

import pytest
import requests
from mlflow import MlflowClient
from support import ORDINARY, SUSPICIOUS, as_row, free_port, wait_for

from predictor.codec import v2_request_body
from predictor.schema import FIELD_ORDER

pytestmark = pytest.mark.containers

ROOT = Path(__file__).resolve().parents[1]
SERVING_IMAGE = "fraud-predictor:local"
TRAINER_IMAGE = "fraud-predictor-trainer:local"
SUSPICIOUS_ROW = as_row(SUSPICIOUS)
ORDINARY_ROW = as_row(ORDINARY)
COMPOSE_MLFLOW = "http://127.0.0.1:5000"
COMPOSE_PREDICTOR = "http://127.0.0.1:8080"
COMPOSE_PROJECT = "fraud-predictor"  # the compose file's `name:`


@cache
def engine() -> str | None:
    """docker or podman: the one named by CONTAINER_ENGINE, else the first that works."""
    chosen = os.environ.get("CONTAINER_ENGINE")
    if chosen:
        return chosen if shutil.which(chosen) else None
    if shutil.which("docker"):
        answers = subprocess.run(["docker", "info"], capture_output=True, timeout=60)
        if answers.returncode == 0:
            return "docker"
    return "podman" if shutil.which("podman") else None


def container_engine() -> str:
    found = engine()
    if found is None:
        pytest.skip(
            "no container engine: neither docker with a running daemon nor podman "
            "(or CONTAINER_ENGINE names one that is not installed)"
        )
    return found


def compose_command() -> list[str]:
    if engine() == "docker":
        plugin = subprocess.run(["docker", "compose", "version"], capture_output=True, timeout=60)
        if plugin.returncode != 0:
            pytest.skip("docker has no compose plugin (`docker compose`)")
        return ["docker", "compose"]
    if shutil.which("podman-compose") is None:
        pytest.skip("podman-compose is not installed (the compose tests need it with podman)")
    return ["podman-compose"]


def remove(name: str) -> None:
    stop = ["-t", "5"] if engine() == "podman" else []
    run(container_engine(), "rm", "-f", *stop, name, check=False, timeout=60)


def healthcheck(name: str, timeout: float = 90) -> None:
    """The image's HEALTHCHECK passes: podman runs it on demand; Docker runs it on its own
    schedule, so wait for the container to be reported healthy."""
    if engine() == "podman":
        health = run("podman", "healthcheck", "run", name, check=False)
        assert health.returncode == 0, health.stdout + health.stderr
        return
    deadline = time.monotonic() + timeout
    status = ""
    while time.monotonic() < deadline:
        status = run("docker", "inspect", "-f", "{{.State.Health.Status}}", name).stdout.strip()
        if status == "healthy":
            return
        time.sleep(2)
    raise AssertionError(f"{name}: health {status!r} after {timeout} s")


def compose_container(service: str) -> str:
    """The name of a compose service's container (naming differs between compose tools)."""
    names = run(
        container_engine(), "ps", "-a",
        "--filter", f"label=com.docker.compose.project={COMPOSE_PROJECT}",
        "--filter", f"label=com.docker.compose.service={service}",
        "--format", "{{.Names}}",
    ).stdout.split()  # fmt: skip
    assert names, f"no container for compose service {service}"
    return names[0]


def run(*command: str, timeout: float = 600, check: bool = True, **kwargs):
    env = {**os.environ, "BUILDAH_FORMAT": "docker"}  # keep HEALTHCHECK in built images
    result = subprocess.run(
        command, capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env, **kwargs
    )
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(command)} exited {result.returncode}:\n{result.stderr}")
    return result


def report(line: str) -> None:
    """Figures worth reading in the CI log (pytest -s is not needed: stderr is shown on -rA)."""
    print(f"[containers] {line}", file=sys.stderr)


@pytest.fixture(scope="module")
def images() -> dict[str, int]:
    """Both targets built from the Dockerfile; their sizes in bytes."""
    tool = container_engine()
    sizes = {}
    for image, target in ((SERVING_IMAGE, "serving"), (TRAINER_IMAGE, "trainer")):
        started = time.monotonic()
        run(tool, "build", "--target", target, "-t", image, ".", timeout=1200)
        size = int(run(tool, "image", "inspect", "--format", "{{.Size}}", image).stdout)
        sizes[image] = size
        report(f"{image}: built in {time.monotonic() - started:.0f} s, {size / 2**20:.0f} MiB")
    return sizes


def predict_v1(url: str, rows: list[list]) -> dict:
    response = requests.post(
        f"{url}/v1/models/fraud-detector:predict", json={"instances": rows}, timeout=30
    )
    assert response.status_code == 200, response.text
    return response.json()


def predict_v2(url: str, row: list) -> dict:
    body = v2_request_body([dict(zip(FIELD_ORDER, row, strict=True))])
    response = requests.post(f"{url}/v2/models/fraud-detector/infer", json=body, timeout=30)
    assert response.status_code == 200, response.text
    return response.json()


def assert_scores_like_a_fraud_model(url: str) -> str:
    """V1 and V2 agree, and the suspicious transaction scores far above the ordinary one."""
    v1 = predict_v1(url, [SUSPICIOUS_ROW, ORDINARY_ROW])
    suspicious, ordinary = (p["fraud_probability"] for p in v1["predictions"])
    assert suspicious > 0.5 > ordinary, v1
    v2 = predict_v2(url, SUSPICIOUS_ROW)
    outputs = {output["name"]: output["data"] for output in v2["outputs"]}
    # Within an ulp: numba takes over from treelite (1e-9 by rule) once built.
    assert outputs["fraud_probability"] == pytest.approx([suspicious], abs=1e-12)
    assert outputs["is_fraud"] == [v1["predictions"][0]["is_fraud"]]
    assert v2["model_version"] == v1["model_version"]
    return v1["model_version"]


@pytest.fixture
def container() -> Iterator[list[str]]:
    """Names of containers started by a test; all removed afterwards."""
    names: list[str] = []
    yield names
    for name in names:
        remove(name)


def wait_ready(url: str, name: str, timeout: float) -> float:
    started = time.monotonic()
    try:
        wait_for(f"{url}/v2/health/ready", timeout=timeout)
    except TimeoutError:
        logs = run(container_engine(), "logs", "--tail", "40", name, check=False).stdout
        raise AssertionError(f"{name} not ready after {timeout} s:\n{logs}") from None
    return time.monotonic() - started


MLFLOW_IMAGE = "ghcr.io/mlflow/mlflow:v3.17.2"


@pytest.fixture
def network(container) -> Iterator[str]:
    """A network of its own, where containers reach each other by name."""
    name = f"fraud-e2e-{free_port()}"
    run(container_engine(), "network", "create", name)
    yield name
    for member in list(container):  # containers first, then the network
        remove(member)
    container.clear()
    run(container_engine(), "network", "rm", name, check=False)


def test_image_serves_read_only_from_a_registry_reached_by_name(images, container, network):
    """A real MLflow server on a network of its own, a trainer container registering the
    model, and the serving image, read-only as its own user, loading it from
    http://registry:5000 (not loopback: MLflow's host check must admit the name)."""
    registry_name = f"registry-{network}"
    container.append(registry_name)
    run(
        container_engine(), "run", "-d", "--name", registry_name, "--network", network,
        "--network-alias", "registry", MLFLOW_IMAGE,
        "mlflow", "server", "--host=0.0.0.0", "--port=5000", "--workers=1",
        "--backend-store-uri=sqlite:////tmp/mlflow.db", "--artifacts-destination=/tmp/artifacts",
        "--allowed-hosts=registry:*",
    )  # fmt: skip
    probe = (
        "import urllib.request as u; u.urlopen(u.Request('http://127.0.0.1:5000/api/2.0/mlflow/"
        "experiments/search?max_results=1', headers={'Host': 'registry:5000'}), timeout=2)"
    )
    deadline = time.monotonic() + 120
    while run(
        container_engine(), "exec", registry_name, "python", "-c", probe, check=False
    ).returncode:
        assert time.monotonic() < deadline, "MLflow never answered"
        time.sleep(1)
    trained = run(
        container_engine(), "run", "--rm", "--network", network, "--read-only", "--tmpfs", "/tmp",
        "-e", "MLFLOW_TRACKING_URI=http://registry:5000", TRAINER_IMAGE,
        "--rows", "5000", "--seed", "3", "--force", timeout=600,
    )  # fmt: skip
    assert "registered fraud-detector version 1" in trained.stdout + trained.stderr

    port = free_port()
    name = f"fraud-predictor-{port}"
    container.append(name)
    run(
        container_engine(), "run", "-d", "--name", name, "--network", network, "--read-only",
        "--tmpfs", "/tmp", "-p", f"127.0.0.1:{port}:8080",
        "-e", "MLFLOW_TRACKING_URI=http://registry:5000", SERVING_IMAGE, "--enable_grpc=false",
    )  # fmt: skip
    ready = wait_ready(f"http://127.0.0.1:{port}", name, timeout=240)
    report(f"{SERVING_IMAGE}: start -> ready {ready:.1f} s (read-only, registry by name)")
    assert assert_scores_like_a_fraud_model(f"http://127.0.0.1:{port}") == "1"
    explained = requests.post(
        f"http://127.0.0.1:{port}/v1/models/fraud-detector:explain",
        json={"instances": [SUSPICIOUS_ROW]},
        timeout=30,
    )
    assert explained.status_code == 200, explained.text
    assert run(container_engine(), "exec", name, "id", "-un").stdout.strip() == "predictor"
    assert (
        run(container_engine(), "exec", name, "sleep", "0", check=False).returncode == 0
    )  # preStop
    healthcheck(name)
    touch = run(container_engine(), "exec", name, "touch", "/opt/venv/x", check=False)
    assert touch.returncode != 0  # the root filesystem really is read-only


def test_serving_image_carries_no_training_libraries(images):
    """No training, plots or MLflow server packages; without a registry it says what to do."""
    probe = (
        "import importlib.util as u; print([m for m in ('matplotlib', 'sqlalchemy', 'flask',"
        " 'alembic', 'pyarrow', 'docker', 'graphene', 'gunicorn') if u.find_spec(m)])"
    )
    found = run(
        container_engine(), "run", "--rm", "--entrypoint", "python", SERVING_IMAGE, "-c", probe
    )
    assert found.stdout.strip() == "[]"
    embedded = run(
        container_engine(),
        "run",
        "--rm",
        "--read-only",
        "--tmpfs",
        "/tmp",
        SERVING_IMAGE,
        check=False,
    )
    assert embedded.returncode == 2, embedded.stdout + embedded.stderr
    assert "set MLFLOW_TRACKING_URI" in embedded.stderr
    sizes = {image: size / 2**20 for image, size in images.items()}
    report(f"image sizes (MiB): {sizes}")


def compose(*args: str, timeout: float = 300, check: bool = True):
    return run(*compose_command(), *args, timeout=timeout, check=check)


@pytest.fixture(scope="module")
def compose_stack(images) -> Iterator[None]:
    """The compose file as committed: mlflow healthy -> trainer exits 0 -> predictor
    started, by `compose up -d` or by the script $COMPOSE_UP (for compose tools that ignore
    depends_on conditions); taken down with its volumes afterwards."""
    compose_up = os.environ.get("COMPOSE_UP")
    if compose_up and not Path(compose_up).exists():
        pytest.fail(f"COMPOSE_UP={compose_up} not found")
    compose("down", "-v", "-t", "5", check=False)
    started = time.monotonic()
    try:
        if compose_up:
            run("bash", compose_up, timeout=900)
        else:
            compose("up", "-d", timeout=900)
        wait_ready(COMPOSE_PREDICTOR, compose_container("predictor"), timeout=180)
        report(f"compose stack: up -> predictor ready {time.monotonic() - started:.0f} s")
        yield
    finally:
        logs = compose("logs", "--tail", "20", check=False).stdout
        compose("down", "-v", "-t", "5", check=False)
        report(f"compose logs (tail):\n{logs}")


def test_compose_trains_registers_and_serves_then_follows_a_retrain_from_the_host(
    compose_stack, tmp_path
):
    assert assert_scores_like_a_fraud_model(COMPOSE_PREDICTOR) == "1"
    client = MlflowClient(tracking_uri=COMPOSE_MLFLOW, registry_uri=COMPOSE_MLFLOW)
    champion = client.get_model_version_by_alias("fraud-detector", "champion")
    # The trainer ran as the image's named user, so MLflow could tag the run with it.
    assert client.get_run(champion.run_id).data.tags.get("mlflow.user") == "predictor"
    healthcheck(compose_container("predictor"))

    retrain = subprocess.run(
        [sys.executable, "scripts/train.py", "--rows", "5000", "--seed", "11", "--force"],
        cwd=ROOT,
        env={**os.environ, "MLFLOW_TRACKING_URI": COMPOSE_MLFLOW},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert retrain.returncode == 0, retrain.stderr[-2000:]
    assert client.get_model_version_by_alias("fraud-detector", "champion").version == "2"
    deadline = time.monotonic() + 60  # MODEL_POLL_INTERVAL_SECONDS is 10 in the compose file
    served = "1"
    while served != "2" and time.monotonic() < deadline:
        time.sleep(2)
        served = predict_v1(COMPOSE_PREDICTOR, [ORDINARY_ROW])["model_version"]
    assert served == "2"
    assert assert_scores_like_a_fraud_model(COMPOSE_PREDICTOR) == "2"
    metadata = requests.get(f"{COMPOSE_PREDICTOR}/v2/models/fraud-detector", timeout=10).json()
    assert json.dumps(metadata["versions"]) == '["2"]'
