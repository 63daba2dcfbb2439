"""The decision ledger against real databases (PostgreSQL from Debian's package, SQLite)
and a running predictor: every door records every scored transaction as answered; a
graceful stop, an outage of the database and `kill -9` lose what the README says and no
more; what cannot be held is counted."""

from __future__ import annotations

import itertools
import signal
import threading
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

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
from predictor.ledger import DecisionLog, Scored
from predictor.store import DECISION_COLUMNS, Store

MODEL = "fraud-detector"
_databases = itertools.count()


def fresh_database(postgres) -> str:
    """A new, empty database on the shared PostgreSQL server."""
    name = f"ledger_{next(_databases)}_{uuid.uuid4().hex[:6]}"
    with psycopg.connect(postgres.url, autocommit=True) as connection:
        connection.execute(f"CREATE DATABASE {name}")
    return postgres.url.rsplit("/", 1)[0] + f"/{name}"


def decisions(url: str) -> list[dict]:
    """Every decision row, in the order written: by writing transaction, then by place in
    it (ctid alone is not: a page pruned after an aborted COPY takes later rows)."""
    with psycopg.connect(url) as connection:
        cursor = connection.execute(
            f"SELECT {', '.join(DECISION_COLUMNS)} FROM decisions ORDER BY xmin::text::bigint, ctid"
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


class Load:
    """A client sending one-row V1 requests back to back with its own transaction ids;
    it remembers which were answered (200) and when."""

    def __init__(self, url: str, clients: int = 4):
        self.url = url
        self.answered: list[tuple[str, float]] = []
        self.failed: list[int] = []
        self.done = threading.Event()
        self.threads = [threading.Thread(target=self._send, args=(n,)) for n in range(clients)]

    def __enter__(self) -> Load:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *_) -> None:
        self.stop()

    def stop(self) -> None:
        self.done.set()
        for thread in self.threads:
            thread.join(timeout=30)

    def _send(self, client: int) -> None:
        session = requests.Session()
        for n in itertools.count():
            if self.done.is_set():
                return
            tid = f"load-{client}-{n}"
            try:
                response = session.post(
                    f"{self.url}/v1/models/{MODEL}:predict",
                    json={"instances": [{**ORDINARY, "transaction_id": tid}]},
                    timeout=10,
                )
            except requests.RequestException:
                return  # the server went away
            if response.status_code == 200:
                self.answered.append((tid, time.monotonic()))
            else:
                self.failed.append(response.status_code)

    @property
    def ids(self) -> set[str]:
        return {tid for tid, _ in self.answered}


def ledger_predictor(tmp_path: Path, mlflow_server, database: str, **env: str):
    return launch_predictor(
        tmp_path,
        env={"MLFLOW_TRACKING_URI": mlflow_server.url, "DECISION_LOG_URI": database, **env},
    )


def recorded_ids(database: str) -> list[str]:
    return [row["transaction_id"] for row in decisions(database)]


def test_a_graceful_stop_under_load_records_every_answered_decision(
    mlflow_server, champion, postgres, tmp_path
):
    database = fresh_database(postgres)
    predictor = ledger_predictor(tmp_path, mlflow_server, database)
    with Load(predictor.url) as load:
        time.sleep(3)
        predictor.process.send_signal(signal.SIGTERM)
        assert predictor.process.wait(timeout=60) == 0, predictor.log()[-3000:]
    assert len(load.answered) > 100
    recorded = recorded_ids(database)
    assert load.ids <= set(recorded), f"{len(load.ids - set(recorded))} answered, not recorded"
    assert len(recorded) == len(set(recorded))


def test_a_database_outage_fails_no_prediction_and_loses_no_decision(
    mlflow_server, champion, postgres, tmp_path
):
    database = fresh_database(postgres)
    predictor = ledger_predictor(tmp_path, mlflow_server, database)
    try:
        with Load(predictor.url) as load:
            time.sleep(1)
            postgres.stop()
            try:
                time.sleep(6)
                during = len(load.answered)
                assert metric(predictor.url, "fraud_decision_log_pending") > 0
            finally:
                postgres.start()
            time.sleep(1)
        assert not load.failed, load.failed[:5]
        assert during > 100
        wait_until_recorded(predictor.url, timeout=60)
        recorded = recorded_ids(database)
        assert load.ids == set(recorded) and len(recorded) == len(load.ids)
        assert metric(predictor.url, "fraud_decisions_dropped_total") == 0
        # written in the order they were answered, per client
        for client in range(4):
            mine = [int(t.rsplit("-", 1)[1]) for t in recorded if t.startswith(f"load-{client}-")]
            assert mine == sorted(mine)
        assert "reachable again" in predictor.log()
    finally:
        stop(predictor.process)


def test_what_memory_cannot_hold_during_an_outage_is_counted_as_dropped(
    mlflow_server, champion, postgres, tmp_path
):
    database = fresh_database(postgres)
    predictor = ledger_predictor(tmp_path, mlflow_server, database, DECISION_LOG_MAX_PENDING="50")
    try:
        postgres.stop()
        try:
            answered = [
                v1([{**ORDINARY, "transaction_id": f"d-{n}"}], predictor.url)["predictions"][0]
                for n in range(120)
            ]
        finally:
            postgres.start()
        wait_until_recorded(predictor.url, timeout=60)
        recorded = recorded_ids(database)
        dropped = metric(predictor.url, "fraud_decisions_dropped_total")
        assert len(answered) == 120
        assert len(recorded) == 50 and dropped == 70
        assert recorded == [f"d-{n}" for n in range(50)]  # the oldest are kept
    finally:
        stop(predictor.process)


def test_a_spool_file_holds_what_memory_cannot_and_is_written_in_order(
    mlflow_server, champion, postgres, tmp_path
):
    database = fresh_database(postgres)
    spool = tmp_path / "spool" / "decisions.jsonl"
    spool.parent.mkdir()
    predictor = ledger_predictor(
        tmp_path,
        mlflow_server,
        database,
        DECISION_LOG_MAX_PENDING="20",
        DECISION_LOG_SPOOL_PATH=str(spool),
    )
    try:
        postgres.stop()
        try:
            for n in range(150):
                v1([{**ORDINARY, "transaction_id": f"s-{n}"}], predictor.url)
                if n % 10 == 0:
                    time.sleep(0.05)  # let the writer move the oldest to disk
            deadline = time.monotonic() + 20
            while not spool.exists():
                assert time.monotonic() < deadline, "nothing was spooled"
                time.sleep(0.1)
        finally:
            postgres.start()
        wait_until_recorded(predictor.url, timeout=60)
        assert recorded_ids(database) == [f"s-{n}" for n in range(150)]
        assert metric(predictor.url, "fraud_decisions_dropped_total") == 0
        assert not spool.exists()
    finally:
        stop(predictor.process)


def test_kill_9_loses_at_most_the_last_flush_interval(mlflow_server, champion, postgres, tmp_path):
    database = fresh_database(postgres)
    flush = 0.2
    predictor = ledger_predictor(
        tmp_path, mlflow_server, database, DECISION_LOG_FLUSH_SECONDS=str(flush)
    )
    with Load(predictor.url) as load:
        time.sleep(3)
        killed_at = time.monotonic()
        predictor.process.kill()
        predictor.process.wait(timeout=30)
    recorded = set(recorded_ids(database))
    lost = [(tid, killed_at - at) for tid, at in load.answered if tid not in recorded]
    # answered more than one flush interval (and a write) before the kill: recorded
    assert all(age < flush + 0.3 for _, age in lost), sorted(lost, key=lambda x: -x[1])[:5]
    assert len(recorded) > 100


def test_the_embedded_default_records_in_sqlite_and_a_remote_registry_records_nothing(
    mlflow_server, champion, tmp_path
):
    predictor = launch_predictor(
        tmp_path / "remote", env={"MLFLOW_TRACKING_URI": mlflow_server.url}
    )
    try:
        assert "decisions are not recorded (DECISION_LOG_URI=none: the default" in predictor.log()
        v1([ORDINARY], predictor.url)
    finally:
        stop(predictor.process)


def scored(rows: int, start: int = 0) -> Scored:
    columns = {name: [ORDINARY[name]] * rows for name in ORDINARY}
    decoded = codec.Decoded(columns, columns)
    import numpy as np

    return Scored(
        decoded,
        [f"u-{start + n}" for n in range(rows)],
        np.full(rows, 0.25),
        np.zeros(rows, dtype=bool),
        time.time(),
        MODEL,
        "3",
        0.5,
        None,
        "v2",
    )


def test_sqlite_ledger_writes_in_order_and_migrates_once(tmp_path):
    uri = f"sqlite:///{tmp_path / 'decisions.db'}"
    log = DecisionLog(uri, flush_seconds=0.05)
    for start in range(0, 300, 30):
        assert log.record(scored(30, start))
    log.close()
    store = Store(uri)
    rows = store.query(
        'SELECT transaction_id, is_fraud, "transaction" FROM decisions ORDER BY rowid'
    )
    assert [r[0] for r in rows] == [f"u-{n}" for n in range(300)]
    assert rows[0][1] == 0 and orjson.loads(rows[0][2]) == ORDINARY
    assert store.migrate() == [] and store.schema_version() == 3


def test_a_spool_left_by_a_stopped_process_is_written_by_the_next(tmp_path):
    spool = tmp_path / "spool.jsonl"
    unreachable = "postgresql://nobody@127.0.0.1:9/none"
    log = DecisionLog(unreachable, flush_seconds=0.05, max_pending=10, spool_path=spool)
    for start in range(0, 40, 10):
        assert log.record(scored(10, start))
        deadline = time.monotonic() + 10
        while log._queued_rows > 10:  # the writer moves the oldest to disk
            assert time.monotonic() < deadline
            time.sleep(0.01)
    log.close(timeout=3)
    assert spool.exists()
    uri = f"sqlite:///{tmp_path / 'decisions.db'}"
    log = DecisionLog(uri, flush_seconds=0.05, spool_path=spool)
    log.record(scored(5, 40))
    log.close()
    rows = Store(uri).query("SELECT transaction_id FROM decisions ORDER BY rowid")
    assert [r[0] for r in rows] == [f"u-{n}" for n in range(45)]
    assert not spool.exists()


def test_a_role_that_may_only_read_and_insert_records_on_a_migrated_ledger(postgres):
    """docs/decision-ledger.md: the owner migrates, the predictor's role needs
    no CREATE once every migration is recorded."""
    database = fresh_database(postgres)
    Store(database).migrate()
    role = f"writer_{uuid.uuid4().hex[:6]}"
    with psycopg.connect(database, autocommit=True) as connection:
        connection.execute(f"CREATE ROLE {role} LOGIN")
        connection.execute(f"REVOKE CREATE ON SCHEMA public FROM PUBLIC, {role}")
        connection.execute(f"GRANT USAGE ON SCHEMA public TO {role}")
        connection.execute(f"GRANT SELECT ON schema_migrations TO {role}")
        connection.execute(f"GRANT SELECT, INSERT ON decisions TO {role}")
    restricted = database.replace("postgresql://postgres@", f"postgresql://{role}@")
    log = DecisionLog(restricted, flush_seconds=0.05)
    assert log.record(scored(3))
    log.close()
    assert [row["transaction_id"] for row in decisions(database)] == ["u-0", "u-1", "u-2"]


def test_postgresql_indexes_time_ranges_with_brin_on_a_ledger_from_any_version(postgres):
    """Migration 3 replaces the B-tree on scored_at (costly on every insert) with BRIN,
    also on a ledger created before it."""
    database = fresh_database(postgres)
    store = Store(database)
    store.migrate()
    with psycopg.connect(database, autocommit=True) as connection:
        connection.execute("DELETE FROM schema_migrations WHERE version = 3")
        connection.execute("DROP INDEX decisions_by_time")
        connection.execute("CREATE INDEX decisions_by_time ON decisions (scored_at)")
    assert Store(database).migrate() == [3]
    with psycopg.connect(database) as connection:
        (method,) = connection.execute(
            "SELECT am.amname FROM pg_class c JOIN pg_am am ON am.oid = c.relam "
            "WHERE c.relname = 'decisions_by_time'"
        ).fetchone()
    assert method == "brin"


@pytest.mark.parametrize("count", [1, 7, 8, 500])
def test_server_made_ids_are_distinct_version_4_uuids(count):
    ids = codec.new_ids(count)
    parsed = [uuid.UUID(text) for text in ids]
    assert [str(u) for u in parsed] == ids and len(set(ids)) == count
    assert all(u.version == 4 and u.variant == uuid.RFC_4122 for u in parsed)
