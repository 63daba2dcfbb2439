"""The server's own log lines: plain text for people, or one JSON object per line."""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime

from predictor import seam
from predictor.text import escaped

LOGGER_NAME = "predictor"


class JsonFormatter(logging.Formatter):
    """`{"time", "level", "logger", "message"}` plus the exception text when there is one."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


class DropTimings(logging.Filter):
    """KServe's per-request timing lines (two per request); the same figures are in the
    Prometheus latency histograms, and writing them costs more than scoring one row."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING


class ClientErrorsInOneLine(logging.Filter):
    """KServe logs every 4xx/503 with a full traceback at ERROR; make it one WARNING line."""

    EXPECTED = ("InvalidInput", "ModelNotFound", "ModelNotReady", "ServerNotReady")

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if error is not None and type(error).__name__ in self.EXPECTED:
            record.msg, record.args = "%s: %s", (type(error).__name__, escaped(str(error)))
            record.exc_info = record.exc_text = None
            record.levelno, record.levelname = logging.WARNING, "WARNING"
        return True


class DropSaysNothing(logging.Filter):
    """KServe's start-up lines about features this server does not use (OpenAI and time
    series endpoints) and its thread-pool size: nothing a user acts on."""

    PREFIXES = (
        "OpenAI endpoints not registered",
        "Time series endpoints not registered",
        "Setting max asyncio worker threads",
    )

    def filter(self, record: logging.LogRecord) -> bool:
        return not (
            record.levelno < logging.WARNING
            and isinstance(record.msg, str)
            and record.msg.startswith(self.PREFIXES)
        )


class DropAll(logging.Filter):
    """uvicorn's access log: a line per request costs more than scoring a transaction, and
    request counts, statuses and latencies are in the metrics. ACCESS_LOG=true keeps it."""

    def filter(self, record: logging.LogRecord) -> bool:
        return False


def quiet_kserve_logging(access_log: bool = False, latency_log: bool = False) -> None:
    """Logger-level filters: they survive KServe reconfiguring logging in each worker.

    `access_log`: uvicorn's access log (ACCESS_LOG); `latency_log`: KServe's per-request
    latency lines (`--enable_latency_logging`)."""
    access = logging.getLogger("uvicorn.access")
    access.filters = [f for f in access.filters if not isinstance(f, DropAll)]
    if not access_log:
        access.addFilter(DropAll())
        # And with no handler to write to, uvicorn does not even build the line (it asks
        # `hasHandlers()` per connection); a worker's logging config may add them back,
        # which the filter covers.
        access.handlers.clear()
        access.propagate = False
    trace = seam.kserve_trace_logger()
    trace.filters = [f for f in trace.filters if not isinstance(f, DropTimings)]
    if not latency_log:
        trace.addFilter(DropTimings())
    kserve = logging.getLogger("kserve")
    if not any(isinstance(f, ClientErrorsInOneLine) for f in kserve.filters):
        kserve.addFilter(ClientErrorsInOneLine())
    if not any(isinstance(f, DropSaysNothing) for f in kserve.filters):
        kserve.addFilter(DropSaysNothing())


def json_log_config() -> dict:
    """KServe's logging configuration (its loggers, uvicorn's, levels, streams) with every
    formatter writing JSON, and the root logger too, so with LOG_FORMAT=json every line of
    the process parses, library lines and warnings included. KServe applies it in each
    worker process (`--log_config_file` accepts a dict)."""
    return seam.kserve_log_config(JsonFormatter)


def configure_logging(log_format: str = "text") -> None:
    """One handler on the `predictor` logger (idempotent: each process calls it once)."""
    logger = logging.getLogger(LOGGER_NAME)
    handler = logging.StreamHandler()
    if log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(
            logging.Formatter("%(asctime)s %(process)d %(levelname)s %(name)s: %(message)s")
        )
    logger.handlers = [handler]
    logger.setLevel(logging.INFO)
    logger.propagate = False
