"""Log lines: JSON format for clusters, and KServe's per-request noise filtered."""

import json
import logging

from kserve.errors import InvalidInput

from predictor.logs import ClientErrorsInOneLine, DropTimings, JsonFormatter, configure_logging


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
