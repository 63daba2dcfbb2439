"""The server's own log lines: plain text for people, or one JSON object per line."""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime

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
