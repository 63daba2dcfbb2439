"""Starting and stopping the real processes the benchmark and the tests run: free loopback
ports, bounded readiness waits, `mlflow server`, and stopping a process with its children.
Standard library only (the benchmark's client must not pay for more)."""

from __future__ import annotations

import http.client
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
from pathlib import Path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until_ready(
    url: str, timeout: float, process: subprocess.Popen | None = None, interval: float = 0.02
) -> float:
    """Seconds until `url` answers 200; fails early if `process` exits, late after `timeout`."""
    started = time.perf_counter()
    parsed = urllib.parse.urlsplit(url)
    path = parsed.path + (f"?{parsed.query}" if parsed.query else "")
    while time.perf_counter() - started < timeout:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"process exited with {process.returncode} before {url} was up")
        try:
            connection = http.client.HTTPConnection(parsed.hostname, parsed.port, timeout=2)
            try:
                connection.request("GET", path)
                if connection.getresponse().status == 200:
                    return time.perf_counter() - started
            finally:
                connection.close()
        except OSError:
            pass
        time.sleep(interval)
    raise TimeoutError(f"{url} not ready after {timeout} s")


def stop_group(process: subprocess.Popen, timeout: float = 30) -> None:
    """SIGTERM a process started with `start_new_session=True` and its children (mlflow's
    server workers keep the port open otherwise); SIGKILL what is left after `timeout`."""
    if process.poll() is not None:
        return
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout)


def mlflow_server_command(
    workdir: Path, port: int, extra_args: list[str] | None = None
) -> list[str]:
    """`mlflow server` with a sqlite backend and proxied artifacts in `workdir`, on loopback."""
    return [
        sys.executable,
        "-m",
        "mlflow",
        "server",
        "--backend-store-uri",
        f"sqlite:///{workdir / 'mlflow.db'}",
        "--artifacts-destination",
        str(workdir / "artifacts"),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
        *(extra_args or []),
    ]


#: MLflow's server runs jobs in the background unless told not to; neither needs them.
MLFLOW_SERVER_ENV = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
