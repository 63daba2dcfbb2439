"""Starting and stopping the real processes the benchmark and the tests run: free loopback
ports, bounded readiness waits, `mlflow server`, a throwaway PostgreSQL cluster, and
stopping a process with its children.
Standard library only (the benchmark's client must not pay for more)."""

from __future__ import annotations

import contextlib
import http.client
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
from dataclasses import dataclass
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


# ------------------------------------------------------------------------- PostgreSQL


def postgres_bin_dir() -> Path | None:
    """Debian's PostgreSQL binaries (initdb, pg_ctl are not on PATH there)."""
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    if found:
        return found[-1].parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


@dataclass
class PostgresServer:
    """A throwaway PostgreSQL cluster on 127.0.0.1, run as a non-root user."""

    bin_dir: Path
    data_dir: Path
    port: int
    as_user: list[str]

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _pg_ctl(self, *args: str, timeout: float = 60) -> None:
        subprocess.run(
            [*self.as_user, str(self.bin_dir / "pg_ctl"), "-D", str(self.data_dir), *args],
            check=True,
            capture_output=True,
            timeout=timeout,
        )

    def start(self) -> None:
        options = (
            # fsync off: a stopped server keeps what it committed in the OS's cache, which
            # the outage tests need (synchronous_commit stays on).
            f"-p {self.port} -h 127.0.0.1 -k {self.data_dir} -c fsync=off -c full_page_writes=off"
        )
        self._pg_ctl("-l", str(self.data_dir / "server.log"), "-o", options, "-w", "start")

    def stop(self) -> None:
        self._pg_ctl("-m", "immediate", "-w", "stop")

    def remove(self) -> None:
        with contextlib.suppress(subprocess.CalledProcessError):  # already stopped
            self.stop()
        shutil.rmtree(self.data_dir, ignore_errors=True)


def start_postgres() -> PostgresServer | None:
    """A new cluster (trust authentication, loopback only), or None when PostgreSQL is not
    installed. As root, it runs as the `postgres` user the Debian package creates."""
    bin_dir = postgres_bin_dir()
    if bin_dir is None:
        return None
    data_dir = Path(tempfile.mkdtemp(prefix="fraud-ledger-pg-"))
    as_user: list[str] = []
    if os.geteuid() == 0:
        owner = pwd.getpwnam("postgres")
        os.chown(data_dir, owner.pw_uid, owner.pw_gid)
        as_user = ["runuser", "-u", "postgres", "--"]
    subprocess.run(
        [
            *as_user,
            str(bin_dir / "initdb"),
            "-D",
            str(data_dir),
            "-A",
            "trust",
            "-U",
            "postgres",
            "-E",
            "UTF8",
            "--no-sync",
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )
    server = PostgresServer(bin_dir, data_dir, free_port(), as_user)
    server.start()
    return server
