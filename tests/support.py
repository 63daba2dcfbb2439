"""Real parts for the tests: `mlflow server` and predictor processes on free loopback ports.

Every wait is bounded in time.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from processes import (
    MLFLOW_SERVER_ENV,
    free_port,
    mlflow_server_command,
    stop_group,
    wait_until_ready,
)

ROOT = Path(__file__).resolve().parents[1]
# Small but learnable: fast to fit, enough fraud rows for stable metrics.
TEST_ROWS = 20_000

#: A grocery purchase near home: every model scores it low.
ORDINARY = {
    "amount": 42.0,
    "timestamp": "2026-11-26T14:02:00+01:00",
    "merchant_category": "grocery",
    "card_present": True,
    "distance_from_home_km": 2.5,
    "transactions_last_24h": 1,
    "customer_age": 41,
    "account_age_days": 2400,
}
#: Night, card absent, far from home, a burst on a 12-day-old account: scored high.
SUSPICIOUS = {
    "amount": 912.5,
    "timestamp": "2026-11-26T03:14:00+00:00",
    "merchant_category": "electronics",
    "card_present": False,
    "distance_from_home_km": 420.0,
    "transactions_last_24h": 9,
    "customer_age": 23,
    "account_age_days": 12,
}


def as_row(transaction: dict) -> list:
    """The transaction as a V1 list row, in the schema's field order."""
    from predictor.schema import FIELD_ORDER

    return [transaction[field] for field in FIELD_ORDER]


def register_quick_model(tracking_uri: str, name: str, seed: int, alias: str = "live"):
    """A small model registered as `name@alias` (alias moved): for reload and trust tests."""
    from predictor.training import TrainingConfig, train_and_register

    config = TrainingConfig(rows=3_000, seed=seed, model_name=name, alias=alias, force=True)
    return train_and_register(config, tracking_uri, log=lambda _: None)


def wait_for(url: str, timeout: float, process: subprocess.Popen | None = None) -> None:
    """Poll `url` until it answers 200, the process dies, or `timeout` passes."""
    wait_until_ready(url, timeout, process, interval=0.2)


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

    def kill(self) -> None:
        """SIGKILL the server and its worker processes (they would keep the port open)."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=30)

    def stop(self) -> None:
        stop_group(self.process, timeout=20)


def start_mlflow_server(
    workdir: Path, port: int | None = None, extra_args: list[str] | None = None
) -> MlflowServer:
    """`mlflow server` with a sqlite backend and proxied artifacts, in `workdir`."""
    port = port or free_port()
    workdir.mkdir(parents=True, exist_ok=True)
    log = open(workdir / "mlflow-server.log", "ab")  # noqa: SIM115 - lives with the process
    process = subprocess.Popen(
        mlflow_server_command(workdir, port, extra_args),
        cwd=workdir,
        env={**os.environ, **MLFLOW_SERVER_ENV},
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # its own process group, so its workers die with it
    )
    server = MlflowServer(url=f"http://127.0.0.1:{port}", process=process, workdir=workdir)
    try:
        wait_for(f"{server.url}/health", timeout=120, process=process)
    except Exception:
        server.kill()
        raise
    return server


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
