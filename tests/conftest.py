"""Real parts for the tests: an `mlflow server` process, trained models, predictor processes.

Everything listens on 127.0.0.1 on free ports; every wait is bounded in time.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

from predictor.training import TrainingConfig, TrainingResult, train_and_register

ROOT = Path(__file__).resolve().parents[1]
MODEL_NAME = "fraud-detector"
# Small but learnable: fast to fit, enough fraud rows for stable metrics.
TEST_ROWS = 20_000


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(url: str, timeout: float, process: subprocess.Popen | None = None) -> None:
    """Poll `url` until it answers 200, the process dies, or `timeout` passes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"process exited with {process.returncode} before {url} was up")
        try:
            if requests.get(url, timeout=2).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"{url} not ready after {timeout} s")


def stop(process: subprocess.Popen, timeout: float = 20) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=timeout)


@dataclass
class MlflowServer:
    url: str
    process: subprocess.Popen
    workdir: Path


def start_mlflow_server(workdir: Path, port: int | None = None) -> MlflowServer:
    """`mlflow server` with a sqlite backend and proxied artifacts, in `workdir`."""
    port = port or free_port()
    workdir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    log = open(workdir / "mlflow-server.log", "ab")  # noqa: SIM115 - lives with the process
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--backend-store-uri",
            f"sqlite:///{workdir / 'mlflow.db'}",
            "--artifacts-destination",
            str(workdir / "artifacts"),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
        ],
        cwd=workdir,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(f"{url}/health", timeout=120, process=process)
    except Exception:
        stop(process)
        raise
    return MlflowServer(url=url, process=process, workdir=workdir)


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    server = start_mlflow_server(tmp_path_factory.mktemp("mlflow-server"))
    yield server
    stop(server.process)


@pytest.fixture(scope="session")
def champion(mlflow_server: MlflowServer) -> TrainingResult:
    """The model registered as fraud-detector@champion on the shared MLflow server."""
    return train_and_register(
        TrainingConfig(rows=TEST_ROWS, seed=7, force=True), mlflow_server.url, log=lambda _: None
    )


@dataclass
class Predictor:
    url: str
    process: subprocess.Popen
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        stop(self.process)


def launch_predictor(
    workdir: Path,
    env: dict[str, str] | None = None,
    args: list[str] | None = None,
    wait_ready: bool = True,
    timeout: float = 120,
) -> Predictor:
    """`python -m predictor` in `workdir` (so no .env from the repository leaks in)."""
    port = free_port()
    workdir.mkdir(parents=True, exist_ok=True)
    log_path = workdir / f"predictor-{port}.log"
    base_env = {
        key: value
        for key, value in os.environ.items()
        if key not in {"MLFLOW_TRACKING_URI", "MODEL_URI", "DECISION_THRESHOLD"}
    }
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "predictor",
            "--http_port",
            str(port),
            "--enable_grpc",
            "false",
            *(args or []),
        ],
        cwd=workdir,
        env={**base_env, "PYTHONPATH": str(ROOT), **(env or {})},
        stdout=open(log_path, "wb"),  # noqa: SIM115 - lives with the process
        stderr=subprocess.STDOUT,
    )
    predictor = Predictor(url=f"http://127.0.0.1:{port}", process=process, log_path=log_path)
    if wait_ready:
        try:
            wait_for(f"{predictor.url}/v2/health/ready", timeout=timeout, process=process)
        except Exception as error:
            stop(process)
            raise RuntimeError(f"{error}\n--- predictor log ---\n{predictor.log()}") from None
    return predictor


PredictorFactory = Callable[..., Predictor]


@pytest.fixture
def start_predictor(tmp_path: Path) -> Iterator[PredictorFactory]:
    """Start predictors for one test; every one is stopped afterwards."""
    started: list[Predictor] = []

    def start(**kwargs) -> Predictor:
        kwargs.setdefault("workdir", tmp_path)
        started.append(launch_predictor(**kwargs))
        return started[-1]

    yield start
    for predictor in started:
        stop(predictor.process)


@pytest.fixture(scope="session")
def served(
    mlflow_server: MlflowServer, champion: TrainingResult, tmp_path_factory
) -> Iterator[Predictor]:
    """One predictor serving fraud-detector@champion from the shared MLflow server."""
    predictor = launch_predictor(
        tmp_path_factory.mktemp("served"), env={"MLFLOW_TRACKING_URI": mlflow_server.url}
    )
    yield predictor
    stop(predictor.process)


@pytest.fixture(scope="session")
def example_transactions() -> list[dict]:
    """Realistic transactions from the generator, as a client would send them."""
    from predictor.data import generate_transactions, transaction_payloads

    return transaction_payloads(generate_transactions(rows=400, fraud_rate=0.2, seed=123))
