"""The decision ledger against real databases (PostgreSQL from Debian's package, SQLite)
and a running predictor: every door records every scored transaction as answered; a
graceful stop, an outage of the database and `kill -9` lose what the README says and no
more; what cannot be held is counted."""

from __future__ import annotations

import itertools
import time
import uuid
from datetime import UTC, datetime, timedelta

import grpc
import orjson
import psycopg
import pytest
import requests
from kserve.protocol.grpc.grpc_predict_v2_pb2_grpc import GRPCInferenceServiceStub
from kserve.protocol.infer_type import InferResponse
from processes import free_port
from support import ORDINARY, SUSPICIOUS, as_row, launch_predictor, stop
from test_hostile_input import CE_HEADERS, binary_request, grpc_request

from predictor import codec
from predictor.store import DECISION_COLUMNS

MODEL = "fraud-detector"
_databases = itertools.count()


def fresh_database(postgres) -> str:
    """A new, empty database on the shared PostgreSQL server."""
    name = f"ledger_{next(_databases)}_{uuid.uuid4().hex[:6]}"
    with psycopg.connect(postgres.url, autocommit=True) as connection:
        connection.execute(f"CREATE DATABASE {name}")
    return postgres.url.rsplit("/", 1)[0] + f"/{name}"


def decisions(url: str) -> list[dict]:
    """Every decision row, in the order written."""
    with psycopg.connect(url) as connection:
        cursor = connection.execute(
            f"SELECT {', '.join(DECISION_COLUMNS)} FROM decisions ORDER BY ctid"
        )
        return [dict(zip(DECISION_COLUMNS, row, strict=True)) for row in cursor.fetchall()]


def metric(url: str, name: str) -> float:
    for line in requests.get(f"{url}/metrics", timeout=10).text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def wait_until_recorded(url: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while metric(url, "fraud_decision_log_pending") > 0:
        assert time.monotonic() < deadline, "decisions still pending"
        time.sleep(0.1)


def v1(rows: list[dict], url: str, **headers) -> dict:
    response = requests.post(
        f"{url}/v1/models/{MODEL}:predict", json={"instances": rows}, headers=headers, timeout=30
    )
    assert response.status_code == 200, response.text
    return response.json()


@pytest.fixture(scope="module")
def recorded(mlflow_server, champion, postgres, tmp_path_factory):
    """A predictor recording into its own PostgreSQL database, gRPC on."""
    database = fresh_database(postgres)
    grpc_port = free_port()
    predictor = launch_predictor(
        tmp_path_factory.mktemp("ledger"),
        env={"MLFLOW_TRACKING_URI": mlflow_server.url, "DECISION_LOG_URI": database},
        args=["--enable_grpc", "true", "--grpc_port", str(grpc_port)],
    )
    yield predictor, database, f"127.0.0.1:{grpc_port}"
    stop(predictor.process)


def test_every_door_records_each_transaction_as_it_was_answered(recorded):
    predictor, database, grpc_target = recorded
    url = predictor.url
    answers: list[tuple[str, str, float, bool, str, str | None]] = []  # id, door, p, d, v, rid

    body = v1(
        [{**ORDINARY, "transaction_id": "v1-a"}, as_row(SUSPICIOUS)], url, **{"x-request-id": "r-1"}
    )
    for prediction in body["predictions"]:
        answers.append(
            (
                prediction["transaction_id"],
                "v1",
                prediction["fraud_probability"],
                prediction["is_fraud"],
                body["model_version"],
                "r-1",
            )
        )

    request = codec.v2_request_body([ORDINARY, SUSPICIOUS], request_id="v2-request")
    request["inputs"].append(
        {"name": "transaction_id", "datatype": "BYTES", "shape": [2], "data": ["v2-a", "v2-b"]}
    )
    v2 = requests.post(f"{url}/v2/models/{MODEL}/infer", json=request, timeout=30).json()
    outputs = {o["name"]: o["data"] for o in v2["outputs"]}
    for tid, p, d in zip(
        outputs["transaction_id"], outputs["fraud_probability"], outputs["is_fraud"], strict=True
    ):
        answers.append((tid, "v2", p, d, v2["model_version"], "v2-request"))

    content, headers = binary_request([SUSPICIOUS])
    binary = requests.post(
        f"{url}/v2/models/{MODEL}/infer", data=content, headers=headers, timeout=30
    )
    outputs = {o["name"]: o["data"] for o in binary.json()["outputs"]}
    answers.append(
        (
            outputs["transaction_id"][0],
            "v2",
            outputs["fraud_probability"][0],
            outputs["is_fraud"][0],
            v2["model_version"],
            None,
        )
    )

    cloud = requests.post(
        f"{url}/v1/models/{MODEL}:predict",
        data=orjson.dumps({"instances": [{**ORDINARY, "transaction_id": "ce-a"}]}),
        headers={**CE_HEADERS, "content-type": "application/json"},
        timeout=30,
    )
    assert cloud.status_code == 200

    with grpc.insecure_channel(grpc_target) as channel:
        reply = GRPCInferenceServiceStub(channel).ModelInfer(
            grpc_request([ORDINARY], raw=True), timeout=30
        )
    answered = InferResponse.from_grpc(reply)
    grpc_id = answered.get_output_by_name("transaction_id").as_numpy()[0]
    grpc_id = grpc_id.decode() if isinstance(grpc_id, bytes) else grpc_id
    grpc_probability = float(answered.get_output_by_name("fraud_probability").as_numpy()[0])
    answers.append((grpc_id, "grpc", grpc_probability, False, v2["model_version"], "hostile"))

    wait_until_recorded(url)
    rows = decisions(database)
    by_id = {row["transaction_id"]: row for row in rows}
    for tid, door, probability, is_fraud, version, request_id in answers:
        row = by_id[tid]
        assert (row["protocol"], row["probability"], row["is_fraud"], row["model_version"]) == (
            door,
            probability,
            is_fraud,
            version,
        )
        assert row["request_id"] == request_id and row["model_name"] == MODEL
        assert row["shadow_version"] is None and row["shadow_probability"] is None
        assert row["scored_at"].tzinfo is not None
        assert abs(row["scored_at"] - datetime.now(UTC)) < timedelta(minutes=2)
    assert by_id["v1-a"]["transaction"] == ORDINARY  # the client's fields, without the id
    assert by_id["ce-a"]["protocol"] == "v1"
    assert sorted(row["protocol"] for row in rows).count("grpc") == 1
    assert len(rows) == 2 + 2 + 1 + 1 + 1
    assert len({row["transaction_id"] for row in rows}) == len(rows)  # server-made ids differ
    assert metric(url, "fraud_decisions_recorded_total") == len(rows)
