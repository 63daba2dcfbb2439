"""Shared fixtures: one `mlflow server` per session, a champion model, predictor processes."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from processes import PostgresServer, start_postgres
from support import (
    TEST_ROWS,
    MlflowServer,
    Predictor,
    launch_predictor,
    start_mlflow_server,
    stop,
)

from predictor.training import TrainingConfig, TrainingResult, train_and_register


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    server = start_mlflow_server(tmp_path_factory.mktemp("mlflow-server"))
    yield server
    server.stop()


@pytest.fixture(scope="session")
def champion(mlflow_server: MlflowServer) -> TrainingResult:
    """The model registered as fraud-detector@champion on the shared MLflow server."""
    return train_and_register(
        TrainingConfig(rows=TEST_ROWS, seed=7, force=True), mlflow_server.url, log=lambda _: None
    )


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


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    """A real PostgreSQL server for the decision ledger (Debian's package)."""
    server = start_postgres()
    if server is None:
        pytest.skip("PostgreSQL is not installed (Debian package postgresql; .ci/run installs it)")
    yield server
    server.remove()
