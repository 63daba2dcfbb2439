"""`fraud-predictor` (`python -m predictor`) as a real process: `--help` tells the whole
configuration, and every KServe flag it inherits either works or stops the start with
exit 2 and one line saying why."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from support import ROOT

from predictor.__main__ import NOT_HONOURED, TRANSFORMER_ONLY
from predictor.settings import Settings


def run(tmp_path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`python -m predictor ARGS` in an empty directory (no .env from the repository)."""
    return subprocess.run(
        [sys.executable, "-m", "predictor", *args],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})},
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.fixture(scope="module")
def help_text(tmp_path_factory) -> str:
    result = run(tmp_path_factory.mktemp("help"), "--help")
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_help_shows_every_environment_setting_with_its_default(help_text):
    epilog = help_text.split("environment (or .env in the working directory):", 1)[1]
    for name, field in Settings.model_fields.items():
        default = field.get_default(call_default_factory=True)
        shown = "unset" if default is None else str(default)
        assert f"  {name.upper()} (default: {shown})" in epilog, name
        if field.description:
            assert " ".join(field.description.split()) in " ".join(epilog.split()), name


def test_help_hides_transformer_flags_and_marks_refused_ones(help_text):
    for name in TRANSFORMER_ONLY:
        assert f"--{name} " not in help_text, name
    flat = " ".join(help_text.split())
    for name in NOT_HONOURED:
        assert f"--{name} {name.upper()} Refused by this server:" in flat, name
    assert "'auto' (the default) runs asyncio's loop in a single process" in flat
    assert "use uvloop if available" not in flat  # KServe's words, true of workers only


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        (["--grpc_max_receive_message_length", "100"], {}, "set MAX_REQUEST_BYTES"),
        (["--grpc_max_send_message_length", "100"], {}, "--grpc_max_send_message_length"),
        (["--access_log_format", "%(h)s"], {}, "ACCESS_LOG=true"),
        (["--configure_logging", "false"], {}, "LOG_FORMAT and ACCESS_LOG"),
        (["--predictor_host", "elsewhere"], {}, "--predictor_host is not honoured"),
        (["--protocol", "v2"], {}, "--protocol is not honoured"),
        (["--predictor_use_ssl", "true"], {}, "not a transformer"),
        (["--predictor_request_timeout_seconds", "5"], {}, "not a transformer"),
        (["--predictor_request_retries", "2"], {}, "not a transformer"),
        (["--enable_predictor_health_check"], {}, "not a transformer"),
        (["--log_config_file", "logs.yaml"], {"LOG_FORMAT": "json"}, "use one"),
    ],
    ids=lambda value: value[0] if isinstance(value, list) else None,
)
def test_flags_the_server_would_ignore_stop_the_start_in_one_line(tmp_path, args, env, message):
    result = run(tmp_path, *args, env=env)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr
    assert lines[0].startswith("error: ")


def test_every_refused_flag_is_tried_above():
    tried = {
        "grpc_max_receive_message_length",
        "grpc_max_send_message_length",
        "access_log_format",
        "configure_logging",
        "predictor_host",
        "protocol",
        "predictor_use_ssl",
        "predictor_request_timeout_seconds",
        "predictor_request_retries",
        "enable_predictor_health_check",
    }
    assert tried == {*NOT_HONOURED, *TRANSFORMER_ONLY}
