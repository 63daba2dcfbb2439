"""The image and the compose stack, built and run as users run them (podman, no Docker).

Deselected from `uv run pytest` (marker `containers`); `scripts/container_tests.sh` sets
up podman and the base-image stand-ins, then runs `uv run pytest -m containers`. Fixed
host ports 5000 and 8080, as the compose file publishes them.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
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
    if shutil.which("podman") is None:
        pytest.fail("podman is not installed: run scripts/container_tests.sh, which sets it up")
    sizes = {}
    for image, target in ((SERVING_IMAGE, "serving"), (TRAINER_IMAGE, "trainer")):
        started = time.monotonic()
        run("podman", "build", "--target", target, "-t", image, ".", timeout=1200)
        size = int(run("podman", "image", "inspect", "--format", "{{.Size}}", image).stdout)
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
        run("podman", "rm", "-f", "-t", "5", name, check=False, timeout=60)


def wait_ready(url: str, name: str, timeout: float) -> float:
    started = time.monotonic()
    try:
        wait_for(f"{url}/v2/health/ready", timeout=timeout)
    except TimeoutError:
        logs = run("podman", "logs", "--tail", "40", name, check=False).stdout
        raise AssertionError(f"{name} not ready after {timeout} s:\n{logs}") from None
    return time.monotonic() - started


MLFLOW_IMAGE = "ghcr.io/mlflow/mlflow:v3.17.2"


@pytest.fixture
def network(container) -> Iterator[str]:
    """A podman network of its own, where containers reach each other by name."""
    name = f"fraud-e2e-{free_port()}"
    run("podman", "network", "create", name)
    yield name
    for member in list(container):  # containers first, then the network
        run("podman", "rm", "-f", "-t", "5", member, check=False, timeout=60)
    container.clear()
    run("podman", "network", "rm", "-f", name, check=False)


def test_image_serves_read_only_from_a_registry_reached_by_name(images, container, network):
    """A real MLflow server on a network of its own, a trainer container registering the
    model, and the serving image, read-only as its own user, loading it from
    http://registry:5000 (not loopback: MLflow's host check must admit the name)."""
    registry_name = f"registry-{network}"
    container.append(registry_name)
    run(
        "podman", "run", "-d", "--name", registry_name, "--network", network,
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
    while run("podman", "exec", registry_name, "python", "-c", probe, check=False).returncode:
        assert time.monotonic() < deadline, "MLflow never answered"
        time.sleep(1)
    trained = run(
        "podman", "run", "--rm", "--network", network, "--read-only", "--tmpfs", "/tmp",
        "-e", "MLFLOW_TRACKING_URI=http://registry:5000", TRAINER_IMAGE,
        "--rows", "5000", "--seed", "3", "--force", timeout=600,
    )  # fmt: skip
    assert "registered fraud-detector version 1" in trained.stdout + trained.stderr

    port = free_port()
    name = f"fraud-predictor-{port}"
    container.append(name)
    run(
        "podman", "run", "-d", "--name", name, "--network", network, "--read-only",
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
    assert run("podman", "exec", name, "id", "-un").stdout.strip() == "predictor"
    assert run("podman", "exec", name, "sleep", "0", check=False).returncode == 0  # preStop
    health = run("podman", "healthcheck", "run", name, check=False)
    assert health.returncode == 0, health.stdout + health.stderr
    touch = run("podman", "exec", name, "touch", "/opt/venv/x", check=False)
    assert touch.returncode != 0  # the root filesystem really is read-only


def test_serving_image_carries_no_training_libraries(images):
    """No training, plots or MLflow server packages; without a registry it says what to do."""
    probe = (
        "import importlib.util as u; print([m for m in ('matplotlib', 'sqlalchemy', 'flask',"
        " 'alembic', 'pyarrow', 'docker', 'graphene', 'gunicorn') if u.find_spec(m)])"
    )
    found = run("podman", "run", "--rm", "--entrypoint", "python", SERVING_IMAGE, "-c", probe)
    assert found.stdout.strip() == "[]"
    embedded = run(
        "podman", "run", "--rm", "--read-only", "--tmpfs", "/tmp", SERVING_IMAGE, check=False
    )
    assert embedded.returncode == 2, embedded.stdout + embedded.stderr
    assert "set MLFLOW_TRACKING_URI" in embedded.stderr
    sizes = {image: size / 2**20 for image, size in images.items()}
    report(f"image sizes (MiB): {sizes}")


def compose(*args: str, timeout: float = 300, check: bool = True):
    return run("podman-compose", *args, timeout=timeout, check=check)


@pytest.fixture(scope="module")
def compose_stack(images) -> Iterator[None]:
    """`compose-up.sh` on the compose file as committed: mlflow healthy -> trainer exits 0
    -> predictor started; taken down with its volumes afterwards."""
    compose_up = os.environ.get("COMPOSE_UP", str(ROOT.parent / "shared/containers/compose-up.sh"))
    if not Path(compose_up).exists():
        pytest.fail(f"{compose_up} not found (set COMPOSE_UP to the shared compose-up.sh)")
    compose("down", "-v", "-t", "5", check=False)
    started = time.monotonic()
    try:
        run("bash", compose_up, timeout=900)
        wait_ready(COMPOSE_PREDICTOR, "fraud-predictor_predictor_1", timeout=180)
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
    health = run("podman", "healthcheck", "run", "fraud-predictor_predictor_1", check=False)
    assert health.returncode == 0, health.stdout + health.stderr

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
