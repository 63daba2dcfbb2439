"""Registry trouble, hot reload, graceful shutdown and metrics, with real processes."""

from __future__ import annotations

import concurrent.futures
import re
import signal
import threading
import time

import mlflow
import numpy as np
import pandas as pd
import pytest
import requests
from mlflow.models import infer_signature
from sklearn.ensemble import HistGradientBoostingClassifier
from support import free_port, start_mlflow_server, wait_for

from predictor import registry
from predictor.training import TrainingConfig, train_and_register

MODEL = "fraud-detector"
ROW = [42.0, "2026-11-26T14:02:00+01:00", "grocery", True, 2.5, 1, 41, 2400]
QUICK = {"MODEL_RETRY_MAX_SECONDS": "2", "MODEL_POLL_INTERVAL_SECONDS": "1"}


def predict(url: str, rows: list | None = None, timeout: float = 30) -> requests.Response:
    return requests.post(
        f"{url}/v1/models/{MODEL}:predict", json={"instances": rows or [ROW]}, timeout=timeout
    )


def metric(url: str, name: str, **labels: str) -> float:
    """Sum of a metric's samples matching `labels` in one scrape."""
    total = 0.0
    for line in requests.get(f"{url}/metrics", timeout=10).text.splitlines():
        match = re.match(r"^(\w+)(\{(.*)\})? (\S+)$", line)
        if not match or match[1] != name:
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', match[3] or ""))
        if all(found.get(k) == v for k, v in labels.items()):
            total += float(match[4])
    return total


def quick_config(name: str, seed: int = 1) -> TrainingConfig:
    return TrainingConfig(rows=3_000, seed=seed, model_name=name, alias="live", force=True)


def test_starts_live_without_registry_and_becomes_ready_when_model_appears(
    start_predictor, tmp_path
):
    port = free_port()
    registry_url = f"http://127.0.0.1:{port}"
    predictor = start_predictor(
        env={"MLFLOW_TRACKING_URI": registry_url, **QUICK}, wait_ready=False
    )
    wait_for(f"{predictor.url}/v2/health/live", timeout=120, process=predictor.process)
    assert requests.get(f"{predictor.url}/v2/health/ready").status_code == 503
    assert requests.get(f"{predictor.url}/v2/models/{MODEL}/ready").status_code == 503
    response = predict(predictor.url)
    assert response.status_code == 503
    assert "not ready" in response.json()["error"]

    server = start_mlflow_server(tmp_path / "late-mlflow", port=port)
    try:
        train_and_register(TrainingConfig(rows=3_000, seed=1), registry_url, log=lambda _: None)
        registered = time.monotonic()
        # backoff is capped at 2 s: ready within cap + load time (bounded generously)
        wait_for(f"{predictor.url}/v2/health/ready", timeout=60, process=predictor.process)
        print(f"ready {time.monotonic() - registered:.1f} s after registration")
        assert predict(predictor.url).status_code == 200
    finally:
        server.kill()
    log = predictor.log()
    assert "registry lookup of models:/fraud-detector@champion" in log
    assert "failed (attempt 1)" in log
    assert metric(predictor.url, "fraud_model_load_attempts_total", outcome="registry_error") >= 1


def test_keeps_serving_when_the_registry_dies(start_predictor, tmp_path):
    server = start_mlflow_server(tmp_path / "doomed-mlflow")
    try:
        train_and_register(quick_config("fraud-outage"), server.url, log=lambda _: None)
        predictor = start_predictor(
            env={
                "MLFLOW_TRACKING_URI": server.url,
                "MODEL_URI": "models:/fraud-outage@live",
                **QUICK,
            }
        )
    finally:
        server.kill()
    # Predict until at least 600 answers and a failed registry poll have both happened.
    statuses = []
    noticed = "registry lookup of models:/fraud-outage@live"
    with requests.Session() as session:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and len(statuses) < 20_000:
            url = f"{predictor.url}/v1/models/{MODEL}:predict"
            statuses.append(session.post(url, json={"instances": [ROW]}, timeout=30).status_code)
            if len(statuses) >= 600 and len(statuses) % 50 == 0 and noticed in predictor.log():
                break
    assert len(statuses) >= 600
    assert set(statuses) == {200}
    assert noticed in predictor.log()  # the registry was down while these were answered
    assert requests.get(f"{predictor.url}/v2/health/ready").status_code == 200


def test_alias_move_under_load_swaps_versions_without_failures(start_predictor, mlflow_server):
    first = train_and_register(quick_config("fraud-reload"), mlflow_server.url, log=print)
    predictor = start_predictor(
        env={
            "MLFLOW_TRACKING_URI": mlflow_server.url,
            "MODEL_URI": "models:/fraud-reload@live",
            **QUICK,
        }
    )
    stop = threading.Event()
    seen: list[list[tuple[str, str, int]]] = [[] for _ in range(4)]

    def client(log: list[tuple[str, str, int]]) -> None:
        with requests.Session() as session:
            for _ in range(20_000):  # bounded; normally stopped by the event long before
                if stop.is_set():
                    return
                try:
                    response = session.post(
                        f"{predictor.url}/v1/models/{MODEL}:predict",
                        json={"instances": [ROW] * 5},
                        timeout=30,
                    )
                    body = response.json() if response.status_code == 200 else {}
                    log.append(
                        (
                            body.get("model_version", ""),
                            response.headers.get("x-model-version", ""),
                            response.status_code,
                        )
                    )
                except requests.RequestException:
                    log.append(("", "", 0))

    with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:
        futures = [pool.submit(client, log) for log in seen]
        time.sleep(1.0)
        second = train_and_register(
            quick_config("fraud-reload", seed=2), mlflow_server.url, log=lambda _: None
        )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if all(log and log[-1][0] == second.version for log in seen):
                break
            time.sleep(0.1)
        time.sleep(0.5)  # a little more traffic on the new version
        stop.set()
        for future in futures:
            future.result(timeout=60)

    every = [entry for log in seen for entry in log]
    assert len(every) > 100
    assert [e for e in every if e[2] != 200] == []  # no failed request
    assert all(body == header for body, header, _ in every)  # no response mixes versions
    for log in seen:
        versions = [body for body, _, _ in log]
        switch = versions.index(second.version)  # each client saw the new version...
        assert set(versions[:switch]) == {first.version}  # ...after only the old one
        assert set(versions[switch:]) == {second.version}  # ...and never went back
    log = predictor.log()
    assert (
        f"reload started: models:/fraud-reload@live now points to version {second.version}" in log
    )
    assert f"reload finished: version {second.version} replaced {first.version}" in log


def register_mismatched_model(tracking_uri: str, name: str) -> str:
    """A real sklearn model whose signature is not the server's feature frame."""
    rng = np.random.default_rng(0)
    frame = pd.DataFrame(rng.random((200, 3)), columns=["amount", "hour", "risk"])
    labels = (frame["risk"] > 0.5).astype(int)
    model = HistGradientBoostingClassifier(max_iter=5).fit(frame.to_numpy(), labels)
    client = registry.connect(tracking_uri)
    with mlflow.start_run():
        info = mlflow.sklearn.log_model(
            model,
            name="model",
            signature=infer_signature(frame, labels.astype(float)),
            serialization_format="skops",
            skops_trusted_types=registry.TRUSTED_TYPES,
            pip_requirements=["scikit-learn"],
        )
    version = mlflow.register_model(info.model_uri, name).version
    client.set_model_version_tag(name, str(version), registry.THRESHOLD_TAG, "0.5")
    client.set_registered_model_alias(name, "live", str(version))
    return str(version)


def test_broken_version_is_refused_and_old_version_keeps_serving(start_predictor, mlflow_server):
    good = train_and_register(quick_config("fraud-broken"), mlflow_server.url, log=lambda _: None)
    predictor = start_predictor(
        env={
            "MLFLOW_TRACKING_URI": mlflow_server.url,
            "MODEL_URI": "models:/fraud-broken@live",
            **QUICK,
        }
    )
    bad = register_mismatched_model(mlflow_server.url, "fraud-broken")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if metric(predictor.url, "fraud_model_load_attempts_total", outcome="failure") >= 1:
            break
        time.sleep(0.2)
    response = predict(predictor.url)
    assert response.status_code == 200
    assert response.json()["model_version"] == good.version
    assert metric(predictor.url, "fraud_model_load_attempts_total", outcome="failure") >= 1
    assert metric(predictor.url, "fraud_model_info", version=good.version) == 1
    log = predictor.log()
    assert f"reload failed: version {bad} of fraud-broken" in log
    assert "model signature does not match the server's features: missing log_amount" in log
    assert f"version {good.version} keeps serving" in log


def test_sigterm_lets_accepted_slow_requests_finish(start_predictor, mlflow_server, champion):
    # Requests large enough (~0.3 s each) that six cannot all finish before the signal.
    predictor = start_predictor(
        env={
            "MLFLOW_TRACKING_URI": mlflow_server.url,
            "MAX_BATCH_ROWS": "40000",
            "MAX_REQUEST_BYTES": str(32 * 1024 * 1024),
        }
    )
    big = [ROW] * 40_000

    def timed_predict() -> tuple[requests.Response, float]:
        response = predict(predictor.url, big, 120)
        return response, time.monotonic()

    with concurrent.futures.ThreadPoolExecutor(max_workers=6) as pool:
        futures = [pool.submit(timed_predict) for _ in range(6)]
        time.sleep(0.5)  # all six are sent; the server works through them one by one
        signalled = time.monotonic()
        predictor.process.send_signal(signal.SIGTERM)
        results = [future.result(timeout=120) for future in futures]
    assert [r.status_code for r, _ in results] == [200] * 6
    assert all(len(r.json()["predictions"]) == 40_000 for r, _ in results)
    finished_after_signal = sum(done > signalled for _, done in results)
    print(f"{finished_after_signal} of 6 requests finished after SIGTERM")
    assert finished_after_signal >= 1, "every request finished before SIGTERM: nothing drained"
    assert predictor.process.wait(timeout=60) == 0
    with pytest.raises(requests.ConnectionError):
        predict(predictor.url)


def test_metrics_sum_over_workers(start_predictor, mlflow_server, champion):
    predictor = start_predictor(
        env={"MLFLOW_TRACKING_URI": mlflow_server.url, "ACCESS_LOG": "true"},
        args=["--workers", "2"],
    )
    scrape_url = f"{predictor.url}/metrics"
    before = metric(predictor.url, "fraud_predictions_total")
    requests_sent = 120
    for _ in range(requests_sent):  # a new connection each time: the kernel spreads them
        assert predict(predictor.url, [ROW] * 2).status_code == 200
    scrapes = [metric(predictor.url, "fraud_predictions_total") for _ in range(6)]
    assert scrapes == [before + 2 * requests_sent] * 6, scrapes
    assert metric(predictor.url, "fraud_request_rows_count") == requests_sent
    # Each worker moves its version from treelite to numba once built (max over workers).
    deadline = time.monotonic() + 60
    engines = {}
    while engines != {"treelite": 0.0, "numba": 1.0} and time.monotonic() < deadline:
        engines = {
            engine: metric(
                predictor.url, "fraud_model_info", version=champion.version, engine=engine
            )
            for engine in ("treelite", "numba")
        }
        time.sleep(0.2)
    assert engines == {"treelite": 0.0, "numba": 1.0}
    scraped = requests.get(scrape_url, timeout=10).text
    assert "request_predict_seconds" in scraped  # KServe's
    assert "fraud_request_rows_created" not in scraped  # multiprocess mode has no _created
    pids = set(re.findall(r" (\d+) - \"POST /v1/models", predictor.log()))
    assert len(pids) == 2, f"requests reached workers {pids}"
