"""Log lines: JSON format for clusters, and KServe's per-request noise filtered."""

import json
import logging

import requests
from fastapi import FastAPI
from kserve.errors import InvalidInput
from kserve.protocol.rest.server import RESTServer
from timing_asgi import TimingMiddleware

from predictor import seam
from predictor.logs import (
    ClientErrorsInOneLine,
    DropTimings,
    JsonFormatter,
    configure_logging,
    quiet_kserve_logging,
)
from predictor.server import add_middlewares


def record(message: str, level: int = logging.INFO, exc_info=None) -> logging.LogRecord:
    return logging.LogRecord("predictor.model", level, __file__, 1, message, (), exc_info)


def test_json_format_is_one_object_per_line():
    line = JsonFormatter().format(record("model loaded: fraud-detector version 3"))
    entry = json.loads(line)
    assert "\n" not in line
    assert entry["message"] == "model loaded: fraud-detector version 3"
    assert entry["level"] == "INFO" and entry["logger"] == "predictor.model"
    assert entry["time"].endswith("+00:00")


def test_configure_logging_is_idempotent_and_honours_the_format():
    configure_logging("json")
    configure_logging("json")
    handlers = logging.getLogger("predictor").handlers
    assert len(handlers) == 1 and isinstance(handlers[0].formatter, JsonFormatter)
    configure_logging("text")
    assert not isinstance(logging.getLogger("predictor").handlers[0].formatter, JsonFormatter)


def test_client_errors_become_one_warning_line_without_traceback():
    error = InvalidInput("instances[0].amount: Input should be greater than 0")
    item = record("Exception:", logging.ERROR, (InvalidInput, error, None))
    assert ClientErrorsInOneLine().filter(item) is True
    assert item.levelno == logging.WARNING and item.exc_info is None
    assert item.getMessage() == "InvalidInput: instances[0].amount: Input should be greater than 0"


def test_server_errors_keep_their_traceback():
    error = RuntimeError("boom")
    item = record("Exception:", logging.ERROR, (RuntimeError, error, None))
    ClientErrorsInOneLine().filter(item)
    assert item.levelno == logging.ERROR and item.exc_info is not None


def test_per_request_timing_lines_are_dropped_but_warnings_kept():
    assert DropTimings().filter(record("kserve.io.v1.predict: 0.001")) is False
    assert DropTimings().filter(record("slow", logging.WARNING)) is True


def test_client_text_in_an_error_cannot_forge_or_flood_a_line():
    """A model name from the URL (%0A decodes to a newline) reaches ModelNotFound's text."""
    error = InvalidInput("model a\n2026-11-27 ERROR forged line\x1b[31m" + "x" * 10_000)
    item = record("Exception:", logging.ERROR, (InvalidInput, error, None))
    ClientErrorsInOneLine().filter(item)
    line = logging.Formatter("%(levelname)s %(message)s").format(item)
    assert "\n" not in line and "\x1b" not in line
    assert "a\\x0a2026-11-27 ERROR forged line\\x1b[31m" in line
    assert len(line) < 600


def test_every_line_of_a_serving_process_is_json_with_log_format_json(
    start_predictor, mlflow_server, champion
):
    """KServe's, uvicorn's (access log on), its latency lines (asked for), MLflow's and the
    server's own lines alike."""
    predictor = start_predictor(
        env={"MLFLOW_TRACKING_URI": mlflow_server.url, "LOG_FORMAT": "json", "ACCESS_LOG": "true"},
        args=["--enable_latency_logging", "true"],
    )
    url = f"{predictor.url}/v1/models/fraud-detector:predict"
    row = [42.0, "2026-11-26T14:02:00+01:00", "grocery", True, 2.5, 1, 41, 2400]
    assert requests.post(url, json={"instances": [row]}, timeout=10).status_code == 200
    assert requests.post(url, json={"instances": []}, timeout=10).status_code == 400
    assert requests.post(url.replace("fraud-detector", "nope"), json={}).status_code == 404
    predictor.stop()
    lines = [line for line in predictor.log().splitlines() if line.strip()]
    entries = [json.loads(line) for line in lines]  # raises on the first line that is not
    loggers = {entry["logger"] for entry in entries}
    assert {"predictor.model", "uvicorn.access", "kserve", "kserve.trace"} <= loggers, loggers
    assert any("model loaded" in entry["message"] for entry in entries)
    assert any("predict_ms" in entry["message"] for entry in entries)


def test_latency_lines_are_dropped_unless_asked_for():
    trace = logging.getLogger("kserve.trace")
    saved = trace.filters[:]
    try:
        quiet_kserve_logging(latency_log=True)
        assert trace.filter(record("requestId: x, predict_ms: 1.0"))
        quiet_kserve_logging(latency_log=False)
        quiet_kserve_logging(latency_log=False)
        assert not trace.filter(record("requestId: x, predict_ms: 1.0"))
        assert sum(isinstance(f, DropTimings) for f in trace.filters) == 1
    finally:
        trace.filters[:] = saved


def test_access_log_off_leaves_uvicorn_nothing_to_write_to():
    """uvicorn builds an access line only when its logger has handlers (asked per
    connection): off, it has none and the filter drops anything a worker's config adds."""
    access = logging.getLogger("uvicorn.access")
    saved = access.handlers[:], access.propagate, access.filters[:]
    try:
        access.addHandler(logging.NullHandler())
        quiet_kserve_logging(access_log=False)
        assert not access.hasHandlers()
        assert not access.filter(record("127.0.0.1 - POST /v1/models/x:predict 200"))
    finally:
        access.handlers[:], access.propagate, access.filters[:] = saved


def test_kserve_middlewares_are_added_except_its_per_request_timing():
    """timing_asgi's TimingMiddleware only feeds KServe's trace log (dropped here) and cost
    ~14 % of a single-row request's server time."""
    kserve_app, ours = FastAPI(), FastAPI()
    seam.add_kserve_middlewares(RESTServer(kserve_app, None, None, 0), kserve_app)
    add_middlewares(RESTServer(ours, None, None, 0), ours)
    kserve_kinds = seam.middleware_kinds(kserve_app)
    assert TimingMiddleware in kserve_kinds  # what this replaces still adds it
    assert seam.middleware_kinds(ours) == [
        kind for kind in kserve_kinds if kind is not TimingMiddleware
    ]
