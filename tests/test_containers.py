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
from support import free_port, wait_for

pytestmark = pytest.mark.containers

ROOT = Path(__file__).resolve().parents[1]
SERVING_IMAGE = "fraud-predictor:local"
TRAINER_IMAGE = "fraud-predictor-trainer:local"
SUSPICIOUS = [912.5, "2026-11-26T03:14:00+00:00", "electronics", False, 420.0, 9, 23, 12]
ORDINARY = [42.0, "2026-11-26T14:02:00+01:00", "grocery", True, 2.5, 1, 41, 2400]
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
    names = [
        ("amount", "FP64"),
        ("timestamp", "BYTES"),
        ("merchant_category", "BYTES"),
        ("card_present", "BOOL"),
        ("distance_from_home_km", "FP64"),
        ("transactions_last_24h", "INT64"),
        ("customer_age", "INT64"),
        ("account_age_days", "INT64"),
    ]
    body = {
        "inputs": [
            {"name": name, "datatype": dtype, "shape": [1], "data": [value]}
            for (name, dtype), value in zip(names, row, strict=True)
        ]
    }
    response = requests.post(f"{url}/v2/models/fraud-detector/infer", json=body, timeout=30)
    assert response.status_code == 200, response.text
    return response.json()


def assert_scores_like_a_fraud_model(url: str) -> str:
    """V1 and V2 agree, and the suspicious transaction scores far above the ordinary one."""
    v1 = predict_v1(url, [SUSPICIOUS, ORDINARY])
    suspicious, ordinary = (p["fraud_probability"] for p in v1["predictions"])
    assert suspicious > 0.5 > ordinary, v1
    v2 = predict_v2(url, SUSPICIOUS)
    outputs = {output["name"]: output["data"] for output in v2["outputs"]}
    assert outputs["fraud_probability"] == [suspicious]
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


def test_image_serves_the_demo_model_read_only_as_its_own_user(images, container):
    """The README's `docker run --read-only --tmpfs /tmp`: the embedded default trains the
    demo model into /tmp, then serves V1 and V2; the preStop command of the manifests
    exists in the image."""
    port = free_port()
    name = f"fraud-predictor-readonly-{port}"
    container.append(name)
    run(
        "podman", "run", "-d", "--name", name, "--read-only", "--tmpfs", "/tmp",
        "-p", f"127.0.0.1:{port}:8080", SERVING_IMAGE, "--enable_grpc=false",
    )  # fmt: skip
    ready = wait_ready(f"http://127.0.0.1:{port}", name, timeout=240)
    report(f"{SERVING_IMAGE}: start -> ready {ready:.1f} s (read-only, embedded default)")
    assert assert_scores_like_a_fraud_model(f"http://127.0.0.1:{port}") == "1"
    identity = run("podman", "exec", name, "id", "-un").stdout.strip()
    assert identity == "predictor"
    assert run("podman", "exec", name, "sleep", "0", check=False).returncode == 0
    health = run("podman", "healthcheck", "run", name, check=False)
    assert health.returncode == 0, health.stdout + health.stderr
    # The root filesystem really is read-only for the server's user.
    touch = run("podman", "exec", name, "touch", "/opt/venv/x", check=False)
    assert touch.returncode != 0


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
        served = predict_v1(COMPOSE_PREDICTOR, [ORDINARY])["model_version"]
    assert served == "2"
    assert assert_scores_like_a_fraud_model(COMPOSE_PREDICTOR) == "2"
    metadata = requests.get(f"{COMPOSE_PREDICTOR}/v2/models/fraud-detector", timeout=10).json()
    assert json.dumps(metadata["versions"]) == '["2"]'
