"""Latency and throughput of the predictor over HTTP (predict, infer and explain), side by
side with `mlflow models serve`, a plain KServe predictor and the HTTP floor.

    uv run python scripts/benchmark.py                 # full run: starts everything itself
    uv run python scripts/benchmark.py --url http://127.0.0.1:8080   # an already running server

The full run starts a real `mlflow server` (sqlite, temporary directory), trains and
registers the demo model into it, measures spawn -> ready of the predictor and of
`mlflow models serve` in alternating rounds (`--startup-only` stops there), then starts
on the same registered version:
the predictor with 1 worker, `mlflow models serve` (1 worker), a plain KServe custom
predictor (scripts/peers.py: MLflow's loader, pandas), and the predictor with 2 workers;
and the HTTP floor (scripts/peers.py: a constant answer from a bare uvicorn app). Every
server gets the same transactions: the predictor as V1 and V2 requests, the peers as the
feature rows the model's signature asks for (built by the same features module, so they
skip validation and feature building: an advantage to the peers). It also reports each
scoring engine's in-process floor. The predictor is measured once its numba engine serves
(when the `native` extra is installed).
Every response is checked (status, one answer per row, probabilities in [0, 1]); the
predictor's probabilities are compared with the peer's for the same transactions.

The client runs one keep-alive connection per concurrent stream, in threads, with
pre-encoded bodies; it shares the machine's cores with the servers, as a sidecar would.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from processes import (
    MLFLOW_SERVER_ENV,
    free_port,
    mlflow_server_command,
    start_postgres,
    stop_group,
    wait_until_ready,
)

from predictor.codec import v2_request_body
from predictor.data import generate_transactions, transaction_payloads
from predictor.features import FEATURE_NAMES, build_features
from predictor.schema import validate_rows

MODEL = "fraud-detector"


@dataclass
class Target:
    """One server and how to ask it for `rows` transactions."""

    name: str
    base_url: str
    path: str
    protocol: str  # v1 | v2 | explain | mlflow | features


@dataclass
class Result:
    target: str
    rows: int
    concurrency: int
    latencies_ms: list[float]
    wall_seconds: float
    failures: int

    def percentile(self, q: float) -> float:
        ordered = sorted(self.latencies_ms)
        return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]

    @property
    def requests_per_second(self) -> float:
        return len(self.latencies_ms) / self.wall_seconds


def body_for(protocol: str, transactions: list[dict]) -> bytes:
    if protocol in ("v1", "explain"):
        return json.dumps({"instances": transactions}).encode()
    if protocol == "v2":
        return json.dumps(v2_request_body(transactions)).encode()
    features = build_features(validate_rows(transactions))
    if protocol == "features":  # the plain KServe predictor: feature rows as V1 instances
        return json.dumps({"instances": features.tolist()}).encode()
    return json.dumps(
        {"dataframe_split": {"columns": list(FEATURE_NAMES), "data": features.tolist()}}
    ).encode()


def probabilities_of(protocol: str, body: dict) -> list[float]:
    """The fraud probabilities in a response body, whatever the protocol."""
    if protocol == "v1":
        return [p["fraud_probability"] for p in body["predictions"]]
    if protocol == "explain":
        return [e["fraud_probability"] for e in body["explanations"]]
    if protocol == "features":
        return body["predictions"]
    if protocol == "v2":
        return {o["name"]: o["data"] for o in body["outputs"]}["fraud_probability"]
    return [row[1] for row in body["predictions"]]  # predict_proba: [p(legit), p(fraud)]


def check(protocol: str, status: int, payload: bytes, rows: int) -> bool:
    if status != 200:
        return False
    try:
        probabilities = probabilities_of(protocol, json.loads(payload))
    except (ValueError, KeyError, TypeError, IndexError):
        return False
    return len(probabilities) == rows and all(0.0 <= p <= 1.0 for p in probabilities)


def call(target: Target, body: bytes, timeout: float = 60) -> tuple[int, bytes]:
    parsed = urllib.parse.urlsplit(target.base_url)
    connection = http.client.HTTPConnection(parsed.hostname, parsed.port, timeout=timeout)
    try:
        connection.request(
            "POST", target.path, body=body, headers={"Content-Type": "application/json"}
        )
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def drive(
    target: Target,
    rows: int,
    concurrency: int,
    requests: int,
    payloads: list[dict],
    warmup: int = 100,
) -> Result:
    """`requests` requests over `concurrency` keep-alive connections; every answer checked."""
    bodies = [
        body_for(target.protocol, [payloads[(i * rows + j) % len(payloads)] for j in range(rows)])
        for i in range(32)
    ]
    parsed = urllib.parse.urlsplit(target.base_url)
    latencies: list[float] = []
    failures = [0]
    next_index = iter(range(requests))
    lock = threading.Lock()
    start_gate = threading.Barrier(concurrency + 1)

    def stream() -> None:
        connection = http.client.HTTPConnection(parsed.hostname, parsed.port, timeout=60)
        headers = {"Content-Type": "application/json"}
        for i in range(warmup // concurrency + 1):
            connection.request("POST", target.path, body=bodies[i % 32], headers=headers)
            connection.getresponse().read()
        start_gate.wait()
        local: list[float] = []
        bad = 0
        while True:
            with lock:
                i = next(next_index, None)
            if i is None:
                break
            started = time.perf_counter()
            try:
                connection.request("POST", target.path, body=bodies[i % 32], headers=headers)
                response = connection.getresponse()
                payload = response.read()
                ok = check(target.protocol, response.status, payload, rows)
            except (OSError, http.client.HTTPException):
                ok = False
                connection.close()
                connection = http.client.HTTPConnection(parsed.hostname, parsed.port, timeout=60)
            local.append((time.perf_counter() - started) * 1000)
            bad += not ok
        connection.close()
        with lock:
            latencies.extend(local)
            failures[0] += bad

    threads = [threading.Thread(target=stream) for _ in range(concurrency)]
    for thread in threads:
        thread.start()
    start_gate.wait()
    started = time.perf_counter()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    return Result(target.name, rows, concurrency, latencies, wall, failures[0])


def table(results: list[Result]) -> str:
    header = (
        f"{'server':<22} {'rows':>4} {'conc':>4} {'p50 ms':>7} {'p95 ms':>7} {'p99 ms':>7} "
        f"{'req/s':>7} {'rows/s':>8} {'failed':>6}"
    )
    lines = [header, "-" * len(header)]
    for r in results:
        lines.append(
            f"{r.target:<22} {r.rows:>4} {r.concurrency:>4} {r.percentile(50):>7.2f} "
            f"{r.percentile(95):>7.2f} {r.percentile(99):>7.2f} {r.requests_per_second:>7.0f} "
            f"{r.requests_per_second * r.rows:>8.0f} {r.failures:>6}"
        )
    return "\n".join(lines)


# ------------------------------------------------------------------ processes of a full run


def wait_ready(url: str, process: subprocess.Popen, timeout: float = 180) -> float:
    """Seconds until `url` answers 200 (polled every 20 ms)."""
    return wait_until_ready(url, timeout, process)


class Stack:
    """The processes of a full run; all stopped (with their children) on exit."""

    def __init__(self) -> None:
        self.workdir = Path(tempfile.mkdtemp(prefix="fraud-benchmark-"))
        self.processes: list[subprocess.Popen] = []

    def start(self, name: str, args: list[str], env: dict[str, str]) -> subprocess.Popen:
        log = open(self.workdir / f"{name}.log", "wb")  # noqa: SIM115 - lives with the process
        process = subprocess.Popen(
            args,
            cwd=self.workdir,
            env={**os.environ, **env},
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.processes.append(process)
        return process

    def stop(self, process: subprocess.Popen) -> None:
        stop_group(process)

    def close(self) -> None:
        for process in reversed(self.processes):
            self.stop(process)
        shutil.rmtree(self.workdir, ignore_errors=True)


def metric_sum(base_url: str, name: str) -> float:
    parsed = urllib.parse.urlsplit(base_url)
    connection = http.client.HTTPConnection(parsed.hostname, parsed.port, timeout=10)
    connection.request("GET", "/metrics")
    text = connection.getresponse().read().decode()
    return sum(float(m[3]) for m in re.finditer(rf"^({name})(\{{[^}}]*\}})? (\S+)$", text, re.M))


def start_predictor(
    stack: Stack, tracking_uri: str, workers: int, env: dict[str, str] | None = None
) -> tuple[Target, float]:
    port = free_port()
    process = stack.start(
        f"predictor-{workers}w-{port}",
        [
            sys.executable,
            "-m",
            "predictor",
            "--http_port",
            str(port),
            "--enable_grpc",
            "false",
            "--workers",
            str(workers),
        ],
        {"MLFLOW_TRACKING_URI": tracking_uri, **(env or {})},
    )
    base = f"http://127.0.0.1:{port}"
    ready = wait_ready(f"{base}/v2/health/ready", process)
    return Target(f"predictor {workers}w", base, f"/v1/models/{MODEL}:predict", "v1"), ready


def settled_engine(base_url: str, timeout: float = 30) -> str:
    """The engine that scores once the background build is done: numba when it comes
    within `timeout` (the `native` extra is installed), else what serves then."""
    deadline = time.monotonic() + timeout
    while True:
        connection = http.client.HTTPConnection(urllib.parse.urlsplit(base_url).netloc, timeout=10)
        connection.request("GET", f"/v2/models/{MODEL}")
        platform = json.loads(connection.getresponse().read()).get("platform", "")
        engine = platform.rsplit("/", 1)[-1]
        connection.close()
        if engine == "numba" or time.monotonic() > deadline:
            return engine
        time.sleep(0.2)


def start_mlflow_serve(stack: Stack, tracking_uri: str) -> tuple[Target, subprocess.Popen, float]:
    """`mlflow models serve` on the champion, one worker, ready to be driven."""
    port = free_port()
    process = stack.start(
        "mlflow-models-serve",
        [
            sys.executable,
            "-m",
            "mlflow",
            "models",
            "serve",
            "-m",
            f"models:/{MODEL}@champion",
            "--env-manager",
            "local",
            "-h",
            "127.0.0.1",
            "-p",
            str(port),
            "-w",
            "1",
        ],
        {"MLFLOW_TRACKING_URI": tracking_uri},
    )
    peer = Target("mlflow models serve", f"http://127.0.0.1:{port}", "/invocations", "mlflow")
    return peer, process, wait_ready(f"{peer.base_url}/ping", process)


def startup_rounds(stack: Stack, tracking_uri: str, rounds: int) -> list[str]:
    """Spawn -> ready of the predictor (1 worker) and of `mlflow models serve`, alternated
    `rounds` times so both see the same machine; each server is stopped before the next."""
    ours: list[float] = []
    theirs: list[float] = []
    for _ in range(rounds):
        _, ready = start_predictor(stack, tracking_uri, workers=1)
        ours.append(ready)
        stack.stop(stack.processes[-1])
        _, process, ready = start_mlflow_serve(stack, tracking_uri)
        theirs.append(ready)
        stack.stop(process)
    mine, peer = statistics.median(ours), statistics.median(theirs)
    return [
        f"start -> ready, median of {rounds} alternating rounds: predictor 1 worker "
        f"{mine:.2f} s ({', '.join(f'{t:.2f}' for t in ours)}), mlflow models serve "
        f"{peer:.2f} s ({', '.join(f'{t:.2f}' for t in theirs)}): ratio {mine / peer:.2f}"
    ]


def start_peer(
    stack: Stack,
    kind: str,
    args: list[str],
    path: str,
    protocol: str,
    name: str,
    env: dict[str, str] | None = None,
) -> tuple[Target, subprocess.Popen]:
    """One of scripts/peers.py's reference servers, ready to be driven."""
    port = free_port()
    script = Path(__file__).resolve().parent / "peers.py"
    command = [sys.executable, str(script), kind, str(port), *args]
    process = stack.start(kind, command, env or {})
    base = f"http://127.0.0.1:{port}"
    if kind == "floor":
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if call(Target(name, base, path, protocol), b"{}", timeout=2)[0] == 200:
                    break
            except OSError:
                time.sleep(0.1)
    else:
        wait_ready(f"{base}/v2/health/ready", process)
    return Target(name, base, path, protocol), process


def engine_floors(tracking_uri: str, payloads: list[dict]) -> list[str]:
    """In process, no HTTP: p50 of scoring 1 and 100 rows with each engine the server may
    use for the registered version (validation and features excluded), on the benchmark's
    transactions."""
    from predictor import registry
    from predictor.engine import build_scorer, with_native_trees
    from predictor.serving import agreement_rows

    ref = registry.resolve(registry.connect(tracking_uri), f"models:/{MODEL}@champion")
    loaded = registry.load(ref, tracking_uri)
    rows = agreement_rows(loaded)
    scorer, reason = build_scorer(loaded.estimator, 0.5, rows)
    native, native_reason = with_native_trees(scorer, 0.5, rows)
    engines = {"scikit-learn": lambda f: loaded.estimator.predict_proba(f)[:, 1]}
    if scorer.compiled is not None:
        engines["treelite (compiled)"] = scorer.compiled
    if native.native is not None:
        engines["numba (native)"] = native.native
    lines = [f"not used: {why}" for why in (reason, native_reason) if why is not None]
    for rows in (1, 100):
        # Different rows on every call, as in production: scoring the same rows over and
        # over lets the CPU's branch predictor learn their paths down the trees.
        batches = [
            build_features(validate_rows(payloads[start : start + rows]))
            for start in range(0, len(payloads) - rows + 1, rows)
        ]
        for name, score in engines.items():
            timings = []
            for call in range(300):
                features = batches[call % len(batches)]
                started = time.perf_counter()
                score(features)
                timings.append((time.perf_counter() - started) * 1e6)
            lines.append(f"in process, {name}, rows={rows}: p50 {np.median(timings):.0f} µs")
    return lines


def ledger_run(
    stack: Stack, tracking_uri: str, args: argparse.Namespace, payloads: list[dict]
) -> list[str]:
    """The decision ledger's cost: c=8 single-row throughput with the ledger off, on a real
    PostgreSQL and on SQLite (the embedded default, written inside the server process), in
    alternating rounds on live servers; then decisions written per second at saturation
    (100-row batches, c=8) on each backend."""
    postgres = start_postgres()
    if postgres is None:
        return ["ledger: PostgreSQL is not installed (Debian package postgresql): skipped"]
    try:
        variants = {
            "off": "none",
            "PostgreSQL": postgres.url,
            "SQLite": f"sqlite:///{stack.workdir / 'decisions.db'}",
        }
        targets = {
            name: start_predictor(stack, tracking_uri, 1, {"DECISION_LOG_URI": uri})[0]
            for name, uri in variants.items()
        }
        database_cpu: list[float] = []

        def measure_database(name: str, run: Callable[[], None]) -> None:
            before = postgres_cpu_seconds(postgres.data_dir)
            run()
            if name == "PostgreSQL" and before is not None:
                after = postgres_cpu_seconds(postgres.data_dir) or before
                database_cpu.append((after - before) / args.requests * 1e6)

        lines = alternating_rounds("ledger", targets, "off", args, payloads, measure_database)
        if database_cpu:
            lines.append(
                "PostgreSQL's own CPU per request (every process of the cluster, on the same "
                f"cores): {statistics.median(database_cpu):.0f} µs"
            )
        for name in ("PostgreSQL", "SQLite"):
            lines.append(
                saturation(targets[name], name, max(args.concurrency), args.requests, payloads)
            )
        return lines
    finally:
        postgres.remove()


def postgres_cpu_seconds(data_dir: Path) -> float | None:
    """CPU seconds (user + system) of a cluster's postmaster and every process it started
    (running, or ended and reaped), from Linux's /proc; None where that cannot be read."""
    try:
        postmaster = int((data_dir / "postmaster.pid").read_text().split()[0])
        tick = os.sysconf("SC_CLK_TCK")
        total = 0
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                # After the command name in parentheses: state, ppid, ..., utime, stime.
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue  # exited meanwhile
            if int(stat.parent.name) == postmaster:  # itself, and the backends that ended
                total += sum(int(value) for value in fields[11:15])
            elif int(fields[1]) == postmaster:
                total += int(fields[11]) + int(fields[12])
        return total / tick
    except (OSError, ValueError, IndexError):
        return None


def saturation(
    target: Target, backend: str, concurrency: int, requests: int, payloads: list[dict]
) -> str:
    """As many decisions as the server can score, then the time until all are written."""
    base_url = target.base_url
    before = metric_sum(base_url, "fraud_decisions_recorded_total")
    began = time.perf_counter()
    result = drive(target, 100, concurrency, max(200, requests // 4), payloads)
    scored_seconds = time.perf_counter() - began
    pending_peak = metric_sum(base_url, "fraud_decision_log_pending")
    while metric_sum(base_url, "fraud_decision_log_pending") > 0:
        if time.perf_counter() - began > 120:
            break
        time.sleep(0.05)
    written = metric_sum(base_url, "fraud_decisions_recorded_total") - before
    elapsed = time.perf_counter() - began
    return (
        f"ledger at saturation, {backend} (100-row batches, c={concurrency}): "
        f"{result.requests_per_second * 100:.0f} decisions/s scored, {written:.0f} written in "
        f"{elapsed:.2f} s = {written / elapsed:.0f} decisions/s (scoring took "
        f"{scored_seconds:.2f} s; pending at its end {pending_peak:.0f}); dropped "
        f"{metric_sum(base_url, 'fraud_decisions_dropped_total'):.0f}"
    )


def shadow_run(
    stack: Stack, tracking_uri: str, version: str, args: argparse.Namespace, payloads: list[dict]
) -> list[str]:
    """The cost of following up on answers: c=8 single-row throughput with neither drift
    nor a shadow, with drift tracking (the default), and with drift and a shadow version
    (the same version, so both score every row), in alternating rounds on live servers."""
    plain = {"DECISION_LOG_URI": "none", "DRIFT_WINDOW_ROWS": "0"}
    variants = {
        "plain": plain,
        "drift": {**plain, "DRIFT_WINDOW_ROWS": "10000"},
        "drift+shadow": {
            **plain,
            "DRIFT_WINDOW_ROWS": "10000",
            "SHADOW_MODEL_URI": f"models:/{MODEL}/{version}",
        },
    }
    targets = {
        name: start_predictor(stack, tracking_uri, 1, env)[0] for name, env in variants.items()
    }
    lines = alternating_rounds("follow-up", targets, "plain", args, payloads)
    shadowed = targets["drift+shadow"].base_url
    return [
        *lines,
        f"shadow: {metric_sum(shadowed, 'fraud_shadow_scored_total'):.0f} transactions scored, "
        f"{metric_sum(shadowed, 'fraud_shadow_not_scored_total'):.0f} not scored",
    ]


def alternating_rounds(
    label: str,
    targets: dict[str, Target],
    baseline: str,
    args: argparse.Namespace,
    payloads: list[dict],
    around: Callable[[str, Callable[[], None]], None] = lambda name, run: run(),
) -> list[str]:
    """c=8 single-row throughput of live servers that differ in one setting, driven in
    turn for `--ledger-rounds` rounds (so a slow spell of the machine hits them all), with
    each server's own CPU per request; `around(name, run)` wraps each measurement."""
    for target in targets.values():
        settled_engine(target.base_url)
    rates: dict[str, list[float]] = {name: [] for name in targets}
    cpu: dict[str, list[float]] = {name: [] for name in targets}
    concurrency = max(args.concurrency)
    for _ in range(args.ledger_rounds):
        for name, target in targets.items():

            def run(name: str = name, target: Target = target) -> None:
                before = metric_sum(target.base_url, "process_cpu_seconds_total")
                result = drive(target, 1, concurrency, args.requests, payloads)
                assert not result.failures, f"{label} {name}: {result.failures} failed"
                rates[name].append(result.requests_per_second)
                spent = metric_sum(target.base_url, "process_cpu_seconds_total") - before
                cpu[name].append(spent / args.requests * 1e6)

            around(name, run)
    medians = {name: statistics.median(values) for name, values in rates.items()}
    return [
        f"{label} rows=1 c={concurrency}: "
        + ", ".join(
            f"{name} {medians[name]:.0f} req/s ({medians[name] / medians[baseline]:.2f}x)"
            for name in targets
        )
        + f" (medians of {args.ledger_rounds} alternating rounds; "
        + "; ".join(f"{n}: {', '.join(f'{r:.0f}' for r in rates[n])}" for n in targets)
        + ")",
        "server CPU per request (the whole process, all threads): "
        + ", ".join(f"{name} {statistics.median(cpu[name]):.0f} µs" for name in targets),
    ]


def full_run(args: argparse.Namespace, payloads: list[dict]) -> int:
    from predictor.training import TrainingConfig, train_and_register

    stack = Stack()
    try:
        port = free_port()
        mlflow_server = stack.start(
            "mlflow-server", mlflow_server_command(stack.workdir, port), MLFLOW_SERVER_ENV
        )
        tracking_uri = f"http://127.0.0.1:{port}"
        wait_ready(f"{tracking_uri}/health", mlflow_server)
        print("training and registering the demo model ...", file=sys.stderr)
        trained = train_and_register(TrainingConfig(), tracking_uri, log=lambda _: None)
        print(f"model version {trained.version} registered", file=sys.stderr)

        startup = (
            startup_rounds(stack, tracking_uri, args.startup_rounds)
            if (args.startup_rounds)
            else []
        )
        for line in startup:
            print(line, file=sys.stderr)
        if args.startup_only:
            print("\n".join(startup))
            return 0
        if args.ledger_only:
            print("\n".join(ledger_run(stack, tracking_uri, args, payloads)))
            return 0
        if args.shadow_only:
            print("\n".join(shadow_run(stack, tracking_uri, trained.version, args, payloads)))
            return 0
        floors = engine_floors(tracking_uri, payloads)
        one, one_ready = start_predictor(stack, tracking_uri, workers=1)
        one_process = stack.processes[-1]
        engine = settled_engine(one.base_url)
        load_seconds = metric_sum(one.base_url, "fraud_model_load_duration_seconds_sum")
        peer, peer_process, _ = start_mlflow_serve(stack, tracking_uri)
        floor, floor_process = start_peer(stack, "floor", [], "/", "v1", "HTTP floor")
        kserve_peer, kserve_process = start_peer(
            stack,
            "kserve",
            [f"models:/{MODEL}/{trained.version}"],
            "/v1/models/peer:predict",
            "features",
            "plain KServe predictor",
            {"MLFLOW_TRACKING_URI": tracking_uri},
        )

        # Same answers first: speed may not change them.
        sample = payloads[:200]
        ours = probabilities_of("v1", json.loads(call(one, body_for("v1", sample))[1]))
        theirs = probabilities_of("mlflow", json.loads(call(peer, body_for("mlflow", sample))[1]))
        difference = float(np.max(np.abs(np.array(ours) - np.array(theirs))))

        v2 = Target("predictor 1w (V2)", one.base_url, f"/v2/models/{MODEL}/infer", "v2")
        one.name = "predictor 1w (V1)"
        explain = Target(
            "predictor 1w (explain)", one.base_url, f"/v1/models/{MODEL}:explain", "explain"
        )
        results = []
        # Reason codes: one transaction per call, as an analyst's tool asks. Measured first:
        # the predict runs that follow show the explainer costs predict nothing.
        for concurrency in args.concurrency:
            results.append(drive(explain, 1, concurrency, max(200, args.requests // 4), payloads))
            print(f"  {explain.name} rows=1 c={concurrency} done", file=sys.stderr)
        for rows in args.rows:
            for concurrency in args.concurrency:
                count = args.requests
                targets = [one, v2, peer, kserve_peer] + ([floor] if rows == 1 else [])
                for target in targets:
                    peer_count = count if target is not peer else max(100, count // 5)
                    results.append(drive(target, rows, concurrency, peer_count, payloads))
                    print(f"  {target.name} rows={rows} c={concurrency} done", file=sys.stderr)
        for process in (peer_process, floor_process, kserve_process):
            stack.stop(process)
        stack.stop(one_process)  # free the cores for the 2-worker predictor

        two, two_ready = start_predictor(stack, tracking_uri, workers=2)
        settled_engine(two.base_url)
        two.name = "predictor 2w (V1)"
        scaling = []
        for rows in args.rows:
            result = drive(two, rows, max(args.concurrency), args.requests, payloads)
            results.append(result)
            scaling.append(result)

        print(table(results))
        print()

        def find(name: str, rows: int, concurrency: int) -> Result:
            return next(
                r
                for r in results
                if r.target == name and r.rows == rows and r.concurrency == concurrency
            )

        high = max(args.concurrency)
        for rows in args.rows:
            for concurrency in args.concurrency:
                mine = find("predictor 1w (V1)", rows, concurrency)
                peer_result = find("mlflow models serve", rows, concurrency)
                latency_ratio = peer_result.percentile(50) / mine.percentile(50)
                throughput_ratio = mine.requests_per_second / peer_result.requests_per_second
                print(
                    f"rows={rows:<3} c={concurrency}: p50 {latency_ratio:5.1f}x lower, "
                    f"throughput {throughput_ratio:5.1f}x higher than mlflow models serve"
                )
        for concurrency in args.concurrency:
            mine = find("predictor 1w (V1)", 1, concurrency)
            plain = find("plain KServe predictor", 1, concurrency)
            bare = find("HTTP floor", 1, concurrency)
            ratio = mine.requests_per_second / plain.requests_per_second
            print(
                f"rows=1   c={concurrency}: {ratio:5.1f}x the plain KServe predictor's "
                f"throughput; p50 {mine.percentile(50):.2f} ms = "
                f"HTTP floor {bare.percentile(50):.2f} ms + "
                f"{mine.percentile(50) - bare.percentile(50):.2f} ms"
            )
        for result in scaling:
            base = find("predictor 1w (V1)", result.rows, high)
            print(
                f"2 workers vs 1, rows={result.rows} c={high}: "
                f"{result.requests_per_second / base.requests_per_second:.2f}x throughput"
            )
        for line in startup:
            print(line)
        print(f"engine serving the measured requests: {engine}")
        print(
            f"start -> ready while measuring: predictor 1 worker {one_ready:.2f} s, 2 workers "
            f"{two_ready:.2f} s (model load {load_seconds:.2f} s of the first)"
        )
        print(f"max |probability difference| vs mlflow models serve: {difference:.1e}")
        for line in floors:
            print(line)
        for concurrency in args.concurrency:
            explained = find("predictor 1w (explain)", 1, concurrency)
            predicted = find("predictor 1w (V1)", 1, concurrency)
            print(
                f"explain rows=1 c={concurrency}: p50 {explained.percentile(50):.2f} ms, "
                f"{explained.requests_per_second:.0f} req/s "
                f"(predict p50 {predicted.percentile(50):.2f} ms)"
            )
        return 1 if any(r.failures for r in results) or difference > 1e-9 else 0
    finally:
        stack.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", help="measure this running predictor only (no peer)")
    parser.add_argument("--rows", nargs="+", type=int, default=[1, 100], help="rows per request")
    parser.add_argument("--concurrency", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--requests", type=int, default=2000, help="requests per measurement")
    parser.add_argument("--startup-rounds", type=int, default=3, help="start-up measurements")
    parser.add_argument(
        "--startup-only", action="store_true", help="measure start-up only (full run only)"
    )
    parser.add_argument(
        "--ledger-only",
        action="store_true",
        help="measure the decision ledger's cost only: off, PostgreSQL, SQLite (full run only)",
    )
    parser.add_argument(
        "--shadow-only",
        action="store_true",
        help="measure drift tracking's and a shadow version's cost only (full run only)",
    )
    parser.add_argument(
        "--ledger-rounds",
        type=int,
        default=5,
        help="alternating rounds of the --ledger-only and --shadow-only comparisons",
    )
    args = parser.parse_args(argv)
    payloads = transaction_payloads(generate_transactions(rows=2_000, fraud_rate=0.05, seed=1))
    if not args.url:
        return full_run(args, payloads)
    results = []
    for protocol, path in (
        ("v1", f"/v1/models/{MODEL}:predict"),
        ("v2", f"/v2/models/{MODEL}/infer"),
        ("explain", f"/v1/models/{MODEL}:explain"),
    ):
        target = Target(f"predictor ({protocol.upper()})", args.url.rstrip("/"), path, protocol)
        for rows in args.rows:
            for concurrency in args.concurrency:
                results.append(drive(target, rows, concurrency, args.requests, payloads))
    print(table(results))
    return 1 if any(r.failures for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
