"""The operations scripts against real servers: smoke test and locust load test."""

from __future__ import annotations

import csv
import importlib.util
import json
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from predictor.codec import V2_INPUTS
from predictor.schema import validate_rows

ROOT = Path(__file__).resolve().parents[1]


def smoke(url: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "smoke_test.py"), url, *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


def load_smoke_module():
    spec = importlib.util.spec_from_file_location("smoke_test", ROOT / "scripts" / "smoke_test.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_smoke_test_speaks_the_servers_schema():
    """The script is standard-library only, so it keeps its own copy of the schema."""
    module = load_smoke_module()
    assert module.V2_TYPES == V2_INPUTS
    assert len(validate_rows([module.FRAUDULENT, module.ORDINARY])["amount"]) == 2


def test_smoke_test_passes_against_a_running_predictor(served):
    result = smoke(served.url)
    assert result.returncode == 0, result.stderr
    assert "ok: V1 predict" in result.stdout and "ok: V2 infer" in result.stdout


class WrongOutputs(BaseHTTPRequestHandler):
    """Looks healthy and has the right metadata, but answers probabilities out of range."""

    def _send(self, body: dict, status: int = 200) -> None:
        payload = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def do_GET(self) -> None:
        if self.path.endswith("/live"):
            self._send({"live": True})
        elif self.path.endswith("/ready"):
            self._send({"ready": True, "name": "fraud-detector"})
        else:
            self._send(
                {
                    "name": "fraud-detector",
                    "inputs": [
                        {"name": n, "datatype": t, "shape": [-1]}
                        for n, t in {**V2_INPUTS, "transaction_id": "BYTES"}.items()
                    ],
                    "outputs": [
                        {"name": "fraud_probability", "datatype": "FP64", "shape": [-1]},
                        {"name": "is_fraud", "datatype": "BOOL", "shape": [-1]},
                        {"name": "transaction_id", "datatype": "BYTES", "shape": [-1]},
                    ],
                }
            )

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers["Content-Length"]))
        self._send(
            {
                "predictions": [
                    {"fraud_probability": 1.7, "is_fraud": True},
                    {"fraud_probability": 0.1, "is_fraud": False},
                ],
                "model_version": "1",
            }
        )

    def log_message(self, *args) -> None:  # keep test output clean
        pass


@pytest.fixture
def wrong_server():
    server = ThreadingHTTPServer(("127.0.0.1", 0), WrongOutputs)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_smoke_test_fails_clearly_against_wrong_outputs(wrong_server):
    result = smoke(wrong_server)
    assert result.returncode == 1
    assert result.stderr.strip() == (
        "FAIL: V1 row 0: fraud_probability 1.7 is not a number in [0, 1]"
    )
    assert "ok: metadata" in result.stdout  # it got that far, and said so


def test_smoke_test_fails_clearly_when_nothing_listens():
    result = smoke("http://127.0.0.1:9", "--timeout", "2")
    assert result.returncode == 1
    assert result.stderr.startswith("FAIL: GET /v2/health/live failed")


def test_locust_run_against_the_predictor_has_no_failures(served, tmp_path):
    prefix = tmp_path / "locust"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "locust",
            "-f",
            str(ROOT / "scripts" / "locustfile.py"),
            "--headless",
            "--host",
            served.url,
            "--users",
            "4",
            "--spawn-rate",
            "4",
            "--run-time",
            "5s",
            "--only-summary",
            "--csv",
            str(prefix),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    with open(f"{prefix}_stats.csv") as stats:
        rows = {row["Name"]: row for row in csv.DictReader(stats)}
    assert int(rows["Aggregated"]["Failure Count"]) == 0
    assert int(rows["v1 predict"]["Request Count"]) > 0
    assert int(rows["v2 infer"]["Request Count"]) > 0
    assert "99%" in rows["Aggregated"] or "99%" in result.stderr + result.stdout
