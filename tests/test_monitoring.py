"""Monitoring, proven with the real tools: `promtool check rules` and `promtool test rules`
for every alert (firing and quiet), a real Prometheus scraping a real predictor, the
fraud-report CronJob's command pushing live quality from a PostgreSQL ledger to a real
Pushgateway that a real Prometheus scrapes, and the monitoring component rendered with each
deployable and checked against the CRD schemas, the workload policy and checkov.

promtool and prometheus come from Debian's `prometheus` package, the Pushgateway from
`prometheus-pushgateway` (`.ci/run` installs them).
"""

from __future__ import annotations

import copy
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import jsonschema
import kubernetes_validate
import psycopg
import pytest
import requests
import yaml
from support import ORDINARY, SUSPICIOUS, as_row, free_port, launch_predictor, stop
from test_manifests import (
    K8S_VERSION,
    LEDGER_DATABASE,
    POSTGRESQL,
    SCHEMAS_DIR,
    admitted_by_caller,
    admitted_ports,
    checkov,
    kubectl,
    ledger_env_problems,
    pod_spec,
    policy_violations,
    reachable_on,
    selector_matches,
    strict,
)

from predictor.store import Store

ROOT = Path(__file__).resolve().parents[1]
COMPONENT = ROOT / "manifests" / "components" / "monitoring"
RULE = yaml.safe_load((COMPONENT / "prometheusrule.yaml").read_text())
DASHBOARD = json.loads((COMPONENT / "dashboard.json").read_text())
JOB = {"job": "fraud-predictor"}
# What fraud-report pushes keeps its own job when Prometheus scrapes the Pushgateway with
# honor_labels: true (and no instance: it pushes with the job as its only grouping key).
REPORT = {"job": "fraud-report"}
PUSHED_BY_THE_REPORT = re.compile(r"^fraud_(live|report)_")
GOOD = as_row(ORDINARY)
SUSPICIOUS_ROW = as_row(SUSPICIOUS)


def tool(name: str) -> str:
    binary = shutil.which(name)
    if binary is None:
        pytest.skip(f"{name} is not installed (Debian package prometheus; .ci/run installs it)")
    return binary


def write_rules(directory: Path) -> Path:
    """The PrometheusRule's groups as the rule file Prometheus and promtool read."""
    path = directory / "rules.yaml"
    path.write_text(yaml.safe_dump({"groups": RULE["spec"]["groups"]}, sort_keys=False))
    return path


def alerts() -> dict[str, dict]:
    return {r["alert"]: r for g in RULE["spec"]["groups"] for r in g["rules"] if "alert" in r}


def test_rules_pass_promtool_check(tmp_path):
    result = subprocess.run(
        [tool("promtool"), "check", "rules", str(write_rules(tmp_path))],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 20 rules found" in result.stdout


# --------------------------------------------------------------- promtool unit tests


def series(name: str, values: str, **labels: str) -> dict:
    rendered = ",".join(
        f'{k}="{v}"' for k, v in {**JOB, "instance": "10.0.0.1:8080", **labels}.items()
    )
    return {"series": f"{name}{{{rendered}}}", "values": values}


def pushed(name: str, values: str, **labels: str) -> dict:
    """A series fraud-report pushed, as Prometheus keeps it from the Pushgateway."""
    rendered = ",".join(f'{k}="{v}"' for k, v in {**REPORT, **labels}.items())
    return {"series": f"{name}{{{rendered}}}", "values": values}


def last_push(minutes: int, until: int | None = None) -> str:
    """fraud_report_last_success_timestamp_seconds sampled every minute for `minutes`: a push
    every 15 minutes (from minute 0 to minute `until`) sets it to the push's time."""
    last = minutes if until is None else until
    return " ".join(str(min(minute, last) // 15 * 900) for minute in range(minutes))


def counter_pair(name: str, first: str, second: str, label: str, a: str, b: str) -> list[dict]:
    return [series(name, first, **{label: a}), series(name, second, **{label: b})]


INFO = {"model": "fraud-detector", "alias": "champion", "run_id": "r", "role": "champion"}

# alert -> list of (case, interval, input series, eval time, expected alert labels or [])
CASES: dict[str, list[tuple]] = {
    "FraudPredictorDown": [
        ("all targets down", "1m", [series("up", "0x20")], "10m", [{}]),
        ("no target at all", "1m", [series("fraud_model_info", "1x20", version="1", **INFO)],
         "10m", [{}]),
        ("a target up", "1m", [series("up", "0x3 1x20")], "10m", []),
    ],
    "FraudPredictorNoModelLoaded": [
        ("up without a model", "1m", [series("up", "1x20")], "15m",
         [{**JOB, "instance": "10.0.0.1:8080"}]),
        ("up and serving", "1m",
         [series("up", "1x20"), series("fraud_model_info", "1x20", version="1", **INFO)],
         "15m", []),
    ],
    "FraudPredictorHighErrorRatio": [
        ("5 % server errors", "1m", [
            series("fraud_request_duration_seconds_count", "0+100x20", protocol="http"),
            series("fraud_request_errors_total", "0+5x20", protocol="http", status="500"),
        ], "15m", [{}]),
        ("grpc INTERNAL counts too", "1m", [
            series("fraud_request_duration_seconds_count", "0+100x20", protocol="grpc"),
            series("fraud_request_errors_total", "0+3x20", protocol="grpc", status="INTERNAL"),
        ], "15m", [{}]),
        ("client errors do not", "1m", [
            series("fraud_request_duration_seconds_count", "0+100x20", protocol="http"),
            series("fraud_request_errors_total", "0+50x20", protocol="http", status="400"),
            series("fraud_request_errors_total", "0+0.5x20", protocol="http", status="503"),
        ], "15m", []),
    ],
    "FraudPredictorSlowRequests": [
        ("p99 near 0.5 s", "1m", [
            series("fraud_request_duration_seconds_bucket", "0+0x30", protocol="http", le="0.25"),
            series("fraud_request_duration_seconds_bucket", "0+10x30", protocol="http", le="0.5"),
            series("fraud_request_duration_seconds_bucket", "0+10x30", protocol="http", le="+Inf"),
        ], "20m", [{}]),
        ("p99 under 0.1 s", "1m", [
            series("fraud_request_duration_seconds_bucket", "0+10x30", protocol="http", le="0.1"),
            series("fraud_request_duration_seconds_bucket", "0+10x30", protocol="http", le="0.25"),
            series("fraud_request_duration_seconds_bucket", "0+10x30", protocol="http", le="+Inf"),
        ], "20m", []),
    ],
    "FraudPredictorModelLoadFailing": [
        ("a reload failed", "1m", [series(
            "fraud_model_load_attempts_total", "0 0 0 1 1 1 1 1", kind="reload", outcome="failure",
            role="champion",
        )], "5m", [{"role": "champion"}]),
        ("reloads succeed", "1m", [series(
            "fraud_model_load_attempts_total", "0 0 0 1 1 1 1 1", kind="reload", outcome="success",
            role="champion",
        )], "5m", []),
    ],
    "FraudPredictorRegistryUnreachable": [
        ("a lookup fails every minute", "1m", [series(
            "fraud_model_load_attempts_total", "0+1x30", kind="reload", outcome="registry_error",
            role="champion",
        )], "20m", [{}]),
        ("a shadow alias not yet set", "1m", [series(
            "fraud_model_load_attempts_total", "0+1x30", kind="initial", outcome="registry_error",
            role="shadow",
        )], "20m", []),
        ("one failed lookup", "1m", [series(
            "fraud_model_load_attempts_total", "0 0 0 1x30", kind="reload",
            outcome="registry_error", role="champion",
        )], "20m", []),
    ],
    "FraudPredictorModelVersionChanged": [
        ("version 2 replaced version 1", "1m", [
            series("fraud_model_info", "1x30 0x40", version="1", **INFO),
            series("fraud_model_info", "_x30 1x40", version="2", **INFO),
        ], "40m", [{"model": "fraud-detector", "version": "2"}]),
        ("version 2 served for an hour", "1m", [
            series("fraud_model_info", "1x30 0x40", version="1", **INFO),
            series("fraud_model_info", "_x30 1x40", version="2", **INFO),
        ], "70m", []),
    ],
    "FraudFeatureDrift": [
        ("amount drifted for 40 minutes", "1m", [
            series("fraud_feature_drift_psi", "0.3x50", feature="amount"),
            series("fraud_feature_drift_psi", "0.02x50", feature="customer_age"),
        ], "45m", [{"feature": "amount"}]),
        ("a 20-minute spike", "1m", [
            series("fraud_feature_drift_psi", "0.02x10 0.4x20 0.02x20", feature="amount"),
        ], "45m", []),
    ],
    "FraudScoreDrift": [
        ("scores drifted", "1m", [series("fraud_score_drift_psi", "0.5x50")], "45m", [{}]),
        ("scores steady", "1m", [series("fraud_score_drift_psi", "0.05x50")], "45m", []),
    ],
    "FraudShadowFailing": [
        ("the shadow raises", "1m", [
            series("fraud_shadow_not_scored_total", "0+10x40", reason="failed"),
        ], "35m", [{}]),
        ("only while it loads", "1m", [
            series("fraud_shadow_not_scored_total", "0+10x40", reason="loading"),
            series("fraud_shadow_not_scored_total", "0x40", reason="failed"),
        ], "35m", []),
    ],
    "FraudFlagRateOutOfBand": [
        ("2 % for a day, then half", "10m", [
            series("fraud_predictions_total", "0+980x170", outcome="legit"),
            series("fraud_predictions_total", "0+20x150 3000+980x20", outcome="fraud"),
        ], "27h", [{}]),
        ("2 % all along", "10m", [
            series("fraud_predictions_total", "0+980x170", outcome="legit"),
            series("fraud_predictions_total", "0+20x170", outcome="fraud"),
        ], "27h", []),
    ],
    "FraudScoreDistributionShift": [
        ("95 % low scores for a week, then 60 %", "30m", [
            series("fraud_probability_bucket", "0+950x340 323000+600x20", le="0.1"),
            series("fraud_probability_count", "0+1000x360"),
        ], "178h", [{}]),
        ("95 % all along", "30m", [
            series("fraud_probability_bucket", "0+950x360", le="0.1"),
            series("fraud_probability_count", "0+1000x360"),
        ], "178h", []),
    ],
    "FraudPredictorNoTraffic": [
        ("traffic stopped", "1m", [
            series("up", "1x45"),
            series("fraud_request_duration_seconds_count", "0+10x10 100x35", protocol="http"),
        ], "42m", [{}]),
        ("traffic flows", "1m", [
            series("up", "1x45"),
            series("fraud_request_duration_seconds_count", "0+10x45", protocol="http"),
        ], "42m", []),
    ],
    "FraudDecisionsDropped": [
        ("100 dropped in an outage", "1m", [
            series("fraud_decisions_dropped_total", "0x5 0+20x5 100x20"),
        ], "12m", [{}]),
        ("all recorded", "1m", [
            series("fraud_decisions_dropped_total", "0x30"),
            series("fraud_decisions_recorded_total", "0+600x30"),
        ], "20m", []),
        ("dropped an hour ago", "1m", [
            series("fraud_decisions_dropped_total", "0x5 0+20x5 100x80"),
        ], "70m", []),
    ],
    "FraudDecisionLogBacklog": [
        ("database away: 1000 more a minute", "1m", [
            series("fraud_decision_log_pending", "0+1000x40"),
        ], "25m", [{**JOB, "instance": "10.0.0.1:8080"}]),
        ("stuck at 20000", "1m", [
            series("fraud_decision_log_pending", "20000x40"),
        ], "25m", [{**JOB, "instance": "10.0.0.1:8080"}]),
        ("growing slowly from 2000", "1m", [
            series("fraud_decision_log_pending", "2000+100x40"),
        ], "25m", [{**JOB, "instance": "10.0.0.1:8080"}]),
        ("a burst, written out", "1m", [
            series("fraud_decision_log_pending", "0+5000x4 0x40"),
        ], "25m", []),
        ("a steady small queue", "1m", [
            series("fraud_decision_log_pending", "150 90 210 120x40"),
        ], "25m", []),
    ],
    "FraudLivePrecisionLow": [
        ("version 3 at 30 %, version 4 at 90 %", "1m", [
            pushed("fraud_live_precision", "0.3x90", model_version="3"),
            pushed("fraud_live_labelled", "80x90", model_version="3"),
            pushed("fraud_live_precision", "0.9x90", model_version="4"),
            pushed("fraud_live_labelled", "500x90", model_version="4"),
        ], "70m", [{**REPORT, "model_version": "3"}]),
        ("30 % of only 20 labelled", "1m", [
            pushed("fraud_live_precision", "0.3x90", model_version="3"),
            pushed("fraud_live_labelled", "20x90", model_version="3"),
        ], "70m", []),
        ("30 % for 40 minutes", "1m", [
            pushed("fraud_live_precision", "0.8x30 0.3x60", model_version="3"),
            pushed("fraud_live_labelled", "80x90", model_version="3"),
        ], "70m", []),
    ],
    "FraudLiveRecallLow": [
        ("version 3 finds 20 % of the frauds", "1m", [
            pushed("fraud_live_recall", "0.2x90", model_version="3"),
            pushed("fraud_live_labelled", "200x90", model_version="3"),
        ], "70m", [{**REPORT, "model_version": "3"}]),
        ("20 % of only 30 labelled", "1m", [
            pushed("fraud_live_recall", "0.2x90", model_version="3"),
            pushed("fraud_live_labelled", "30x90", model_version="3"),
        ], "70m", []),
        ("no known fraud: recall undefined", "1m", [
            pushed("fraud_live_precision", "0.9x90", model_version="3"),
            pushed("fraud_live_labelled", "200x90", model_version="3"),
        ], "70m", []),
    ],
    "FraudReportStale": [
        ("pushes stopped after an hour", "1m", [
            pushed("fraud_report_last_success_timestamp_seconds", last_push(240, until=60)),
        ], "3h30m", [REPORT]),
        ("a push every 15 minutes", "1m", [
            pushed("fraud_report_last_success_timestamp_seconds", last_push(240)),
        ], "3h30m", []),
        ("never pushed", "1m", [series("up", "1x90")], "70m", [REPORT]),
        ("pushed, but scraped without honor_labels", "1m", [{
            "series": 'fraud_report_last_success_timestamp_seconds{job="pushgateway",'
                      'exported_job="fraud-report",instance="10.0.0.9:9091"}',
            "values": last_push(90),
        }], "70m", [REPORT]),
        ("the Pushgateway restarted, pushed again 15 minutes later", "1m", [
            pushed("fraud_report_last_success_timestamp_seconds", "0x14 900x14 _x14 2700x30"),
        ], "70m", []),
    ],
}  # fmt: skip


def expected_alert(rule: dict, labels: dict[str, str]) -> dict:
    """promtool compares labels and annotations exactly: render the rule's own templates."""

    def render(text: str) -> str:
        return re.sub(r"\{\{ \$labels\.(\w+) \}\}", lambda m: labels[m[1]], text)

    return {
        "exp_labels": {**labels, **rule["labels"]},
        "exp_annotations": {k: render(v) for k, v in rule["annotations"].items()},
    }


def promtool_tests(cases: dict[str, list[tuple]]) -> dict:
    rules = alerts()
    tests = []
    for name, entries in cases.items():
        for case, interval, input_series, eval_time, expected in entries:
            tests.append(
                {
                    "name": f"{name}: {case}",
                    "interval": interval,
                    "input_series": input_series,
                    "alert_rule_test": [
                        {
                            "eval_time": eval_time,
                            "alertname": name,
                            "exp_alerts": [expected_alert(rules[name], e) for e in expected],
                        }
                    ],
                }
            )
    return {"rule_files": ["rules.yaml"], "evaluation_interval": "1m", "tests": tests}


def run_promtool_tests(directory: Path, cases: dict) -> subprocess.CompletedProcess:
    write_rules(directory)
    test_file = directory / "rules.test.yaml"
    test_file.write_text(yaml.safe_dump(promtool_tests(cases), sort_keys=False))
    return subprocess.run(
        [tool("promtool"), "test", "rules", str(test_file)],
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_every_alert_has_firing_and_quiet_cases():
    assert set(CASES) == set(alerts())
    for name, entries in CASES.items():
        assert any(e[4] for e in entries) and any(not e[4] for e in entries), name


def test_every_alert_fires_and_stays_quiet_under_promtool(tmp_path):
    result = run_promtool_tests(tmp_path, CASES)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_promtool_tests_catch_a_wrong_expectation(tmp_path):
    planted = {"FraudPredictorDown": [("claims quiet", "1m", [series("up", "0x20")], "10m", [])]}
    result = run_promtool_tests(tmp_path, planted)
    assert result.returncode != 0 and "FraudPredictorDown" in result.stdout + result.stderr


# ---------------------------------------------------- a real Prometheus, a real predictor


def referenced_metrics() -> set[str]:
    """Series names the rules and the dashboard query (histogram suffixes included): the
    predictor's, and those fraud-report pushes (PUSHED_BY_THE_REPORT)."""
    exprs = [r["expr"] for g in RULE["spec"]["groups"] for r in g["rules"]]
    exprs += [t["expr"] for p in DASHBOARD["panels"] for t in p["targets"]]
    names = set()
    for expr in exprs:
        names |= set(re.findall(r"([a-zA-Z_:][a-zA-Z0-9_:]*)\{", expr))
        names |= set(re.findall(r"\b(fraud:[a-z0-9_:]+)\b", expr))
    return names - {"by", "without", "on"}


def test_the_rules_and_dashboard_reference_the_metrics_they_mean():
    names = referenced_metrics()
    for expected in (
        "up",
        "fraud_model_info",
        "fraud_request_duration_seconds_count",
        "fraud_request_errors_total",
        "fraud_probability_bucket",
        "request_predict_seconds_bucket",
        "fraud:flag_ratio:rate1h",
        "fraud_decisions_recorded_total",
        "fraud_decisions_dropped_total",
        "fraud_decision_log_pending",
        "fraud_live_decisions",
        "fraud_live_labelled",
        "fraud_live_precision",
        "fraud_live_recall",
        "fraud_live_alert_rate",
        "fraud_report_last_success_timestamp_seconds",
        "fraud_feature_drift_psi",
        "fraud_score_drift_psi",
        "fraud_shadow_scored_total",
        "fraud_shadow_disagreements_total",
        "fraud_shadow_not_scored_total",
        "fraud_shadow_probability_difference_bucket",
    ):
        assert expected in names


def wait_ready(url: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if requests.get(f"{url}/-/ready", timeout=2).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.2)


def start_prometheus(directory: Path, scrape_configs: list[dict]) -> tuple[str, subprocess.Popen]:
    """A real Prometheus with the rules, scraping and evaluating every second."""
    port = free_port()
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(write_rules(directory))],
        "scrape_configs": scrape_configs,
    }
    (directory / "prometheus.yml").write_text(yaml.safe_dump(config))
    log = open(directory / "prometheus.log", "wb")  # noqa: SIM115 - lives with the process
    process = subprocess.Popen(
        [
            tool("prometheus"),
            f"--config.file={directory / 'prometheus.yml'}",
            f"--storage.tsdb.path={directory / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    wait_ready(url)
    return url, process


@pytest.fixture
def prometheus(tmp_path, mlflow_server, champion):
    """A predictor on loopback and a real Prometheus scraping it every second."""
    predictor = launch_predictor(
        tmp_path / "predictor",
        env={
            "MLFLOW_TRACKING_URI": mlflow_server.url,
            # The champion in shadow too, and a window the test's traffic fills: every
            # series the rules and the dashboard read is exported.
            "SHADOW_MODEL_URI": "models:/fraud-detector@champion",
            "DRIFT_WINDOW_ROWS": "100",
        },
    )
    try:
        target = predictor.url.removeprefix("http://")
        url, process = start_prometheus(
            tmp_path, [{"job_name": "fraud-predictor", "static_configs": [{"targets": [target]}]}]
        )
        try:
            yield url, predictor
        finally:
            stop(process)
    finally:
        stop(predictor.process)


def query(url: str, expr: str) -> dict[str, float]:
    """Instant query: {label set as text: value}."""
    data = requests.get(f"{url}/api/v1/query", params={"query": expr}, timeout=10).json()
    assert data["status"] == "success", data
    return {
        json.dumps(r["metric"], sort_keys=True): float(r["value"][1])
        for r in data["data"]["result"]
    }


def scalar(url: str, expr: str) -> float | None:
    values = list(query(url, expr).values())
    return values[0] if len(values) == 1 else None


def test_prometheus_scrapes_what_the_traffic_implies(prometheus):
    url, predictor = prometheus
    endpoint = f"{predictor.url}/v1/models/fraud-detector:predict"
    fraud = 0
    for phase in range(2):  # scraped in between, so rates see the counters grow
        for _ in range(20):
            body = requests.post(
                endpoint, json={"instances": [GOOD] * 4 + [SUSPICIOUS_ROW]}, timeout=10
            )
            assert body.status_code == 200
            fraud += sum(p["is_fraud"] for p in body.json()["predictions"])
        deadline = time.monotonic() + 30
        total = 'sum(fraud_predictions_total{job="fraud-predictor"})'
        while phase == 0 and scalar(url, total) != 100 and time.monotonic() < deadline:
            time.sleep(0.3)
    for _ in range(7):
        assert requests.post(endpoint, json={"instances": []}, timeout=10).status_code == 400
    expected = {
        'sum(fraud_predictions_total{job="fraud-predictor"})': 200,
        'sum(fraud_predictions_total{job="fraud-predictor",outcome="fraud"})': fraud,
        'sum(fraud_request_rows_count{job="fraud-predictor"})': 40,
        'sum(fraud_request_rows_sum{job="fraud-predictor"})': 200,
        'sum(fraud_probability_count{job="fraud-predictor"})': 200,
        'sum(fraud_request_errors_total{job="fraud-predictor",status="400"})': 7,
        'sum(fraud_request_duration_seconds_count{job="fraud-predictor",protocol="http"})': 47,
        'sum(request_predict_seconds_count{job="fraud-predictor"})': 40,  # KServe's own
        'max(fraud_model_info{job="fraud-predictor",role="champion"})': 1,
        'max(fraud_model_info{job="fraud-predictor",role="shadow"})': 1,
        'sum(up{job="fraud-predictor"})': 1,
    }
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        seen = {expr: scalar(url, expr) for expr in expected}
        ratio = scalar(url, "fraud:flag_ratio:rate1h")
        if seen == expected and ratio is not None and not math.isnan(ratio):
            break
        time.sleep(0.5)
    assert seen == expected
    assert scalar(url, "fraud:flag_ratio:rate1h") == pytest.approx(fraud / 200, abs=0.05)

    names = set(requests.get(f"{url}/api/v1/label/__name__/values", timeout=10).json()["data"])
    exported = {n for n in referenced_metrics() if not PUSHED_BY_THE_REPORT.match(n)}
    assert exported - names == set(), "referenced but never exported"

    groups = requests.get(f"{url}/api/v1/rules", timeout=10).json()["data"]["groups"]
    rules = [rule for group in groups for rule in group["rules"]]
    assert len(rules) == 20
    assert [r["name"] for r in rules if r["health"] != "ok"] == []
    firing = {r["name"] for r in rules if r.get("state") == "firing"}
    assert "FraudPredictorDown" not in firing and "FraudPredictorHighErrorRatio" not in firing


# ---------------------------------- fraud-report, a real Pushgateway, a real Prometheus

# Where the CronJob pushes (replaced by a local Pushgateway here).
PUSHGATEWAY_URL = "http://pushgateway.monitoring.svc:9091"


@pytest.fixture
def pushgateway(tmp_path) -> str:
    """A real Pushgateway on loopback, keeping nothing on disk."""
    port = free_port()
    log = open(tmp_path / "pushgateway.log", "wb")  # noqa: SIM115 - lives with the process
    process = subprocess.Popen(
        [
            tool("prometheus-pushgateway"),
            f"--web.listen-address=127.0.0.1:{port}",
            "--persistence.file=",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, timeout=30)
        yield url
    finally:
        stop(process)


def fill_ledger(uri: str) -> None:
    """Version 1: 100 transactions an hour ago, all labelled; 60 flagged, 18 of them fraud,
    2 frauds missed (precision 0.3, recall 0.9). Version 2: 20, all labelled, 10 flagged,
    no fraud (precision 0, recall undefined)."""
    scored_at = datetime.now(UTC) - timedelta(hours=1)
    decisions, outcomes = [], []
    for version, count, flagged, caught, missed in (("1", 100, 60, 18, 2), ("2", 20, 10, 0, 0)):
        for n in range(count):
            transaction_id = f"v{version}-{n}"
            probability = 0.9 if n < flagged else 0.1
            decisions.append(
                (transaction_id, None, scored_at, "fraud-detector", version, probability, 0.5,
                 n < flagged, "{}", "v1", None, None)
            )  # fmt: skip
            fraud = n < caught or flagged <= n < flagged + missed
            outcomes.append((transaction_id, fraud, None, "test"))
    store = Store(uri)
    try:
        store.migrate()
        store.write_decisions(decisions)
        store.replace_outcomes(outcomes)
    finally:
        store.close()


def by_version(url: str, expr: str) -> dict[str, float]:
    return {json.loads(k)["model_version"]: v for k, v in query(url, expr).items()}


def test_fraud_report_pushes_what_the_ledger_alerts_read(tmp_path, postgres, pushgateway):
    """The CronJob's command, run as the CronJob runs it (the ledger's URI in
    DECISION_LOG_URI), reads a PostgreSQL ledger and pushes to a real Pushgateway; a real
    Prometheus scraping it with honor_labels: true finds every pushed metric the rules and
    the dashboard name under job="fraud-report", and holds the precision alert pending for
    the one version below its floor with enough labels."""
    database = f"report_{free_port()}"
    with psycopg.connect(postgres.url, autocommit=True) as connection:
        connection.execute(f'CREATE DATABASE "{database}"')
    ledger = f"{postgres.url.rsplit('/', 1)[0]}/{database}"
    fill_ledger(ledger)
    objects = render_with_monitoring(tmp_path / "render", "manifests/fallback")
    (container,) = pod_spec(next(o for o in objects if o["kind"] == "CronJob"))["containers"]
    command = [*container["command"], *container["args"]]
    assert PUSHGATEWAY_URL in command
    command[command.index(PUSHGATEWAY_URL)] = pushgateway
    executable = Path(sys.executable).parent / command[0]  # the console script, as installed
    (tmp_path / "run").mkdir()
    reported = subprocess.run(
        [str(executable), *command[1:]],
        env={**os.environ, "DECISION_LOG_URI": ledger},
        cwd=tmp_path / "run",
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert reported.returncode == 0, reported.stderr
    assert "pushed 2 version(s)" in reported.stderr

    target = pushgateway.removeprefix("http://")
    url, process = start_prometheus(
        tmp_path,
        [{"job_name": "pushgateway", "honor_labels": True,
          "static_configs": [{"targets": [target]}]}],
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        pending: list[dict] = []
        while time.monotonic() < deadline:
            groups = requests.get(f"{url}/api/v1/rules", timeout=10).json()["data"]["groups"]
            rules = {r["name"]: r for g in groups for r in g["rules"] if r["type"] == "alerting"}
            pending = rules["FraudLivePrecisionLow"]["alerts"]
            if pending:
                break
            time.sleep(0.5)
        assert [(a["state"], a["labels"]["model_version"]) for a in pending] == [("pending", "1")]
        assert (
            pending[0]["labels"]["job"] == "fraud-report" and "instance" not in pending[0]["labels"]
        )
        assert rules["FraudLiveRecallLow"]["alerts"] == []
        assert rules["FraudReportStale"]["alerts"] == []
        assert [r["name"] for r in rules.values() if r["health"] != "ok"] == []

        names = set(query(url, 'group by (__name__) ({job="fraud-report"})'))
        names = {json.loads(n)["__name__"] for n in names}
        wanted = {n for n in referenced_metrics() if PUSHED_BY_THE_REPORT.match(n)}
        assert wanted - names == set(), "referenced but never pushed"
        assert by_version(url, 'fraud_live_precision{job="fraud-report"}') == {"1": 0.3, "2": 0.0}
        assert by_version(url, 'fraud_live_recall{job="fraud-report"}') == {"1": 0.9}
        assert by_version(url, 'fraud_live_labelled{job="fraud-report"}') == {"1": 100, "2": 20}
        assert by_version(url, 'fraud_live_decisions{job="fraud-report"}') == {"1": 100, "2": 20}
        assert by_version(url, 'fraud_live_alert_rate{job="fraud-report"}') == {"1": 0.6, "2": 0.5}
        age = scalar(
            url, 'time() - fraud_report_last_success_timestamp_seconds{job="fraud-report"}'
        )
        assert age is not None and -5 < age < 60
    finally:
        stop(process)


# ------------------------------------------------------------ the component, rendered


def render_with_monitoring(tmp_path: Path, deployable: str) -> list[dict]:
    """The deployable as a user enables monitoring: one `components:` line added."""
    copy = tmp_path / "repo"
    shutil.copytree(ROOT / "manifests", copy / "manifests")
    kustomization = copy / deployable / "kustomization.yaml"
    relative = Path(*[".."] * (len(Path(deployable).parts) - 1), "components/monitoring")
    text = kustomization.read_text()
    if "components:\n" in text:
        text = text.replace("components:\n", f"components:\n  - {relative}\n")
    else:
        text += f"components:\n  - {relative}\n"
    kustomization.write_text(text)
    result = subprocess.run(
        [kubectl(), "kustomize", str(copy / deployable)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def crd_errors(obj: dict, crd_file: str) -> list[str]:
    path = SCHEMAS_DIR / crd_file
    if not path.exists():
        pytest.skip(f"CRD schema {path} is absent; set MANIFEST_SCHEMAS_DIR")
    crd = yaml.safe_load(path.read_text())
    version = next(v for v in crd["spec"]["versions"] if v.get("storage"))
    schema = strict(version["schema"]["openAPIV3Schema"])
    schema.setdefault("properties", {})["metadata"] = {"type": "object"}
    validator = jsonschema.Draft7Validator(schema)
    return [
        f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(obj)
    ]


# The port each mode's pods expose the metrics on: Standard and the fallback from their own
# container spec; in Knative mode KServe's pod webhook adds `aggr-metric` (9088) to
# queue-proxy when metric aggregation is on (kserve v0.20.0
# pkg/webhook/admission/pod/metrics_aggregate_injector.go).
MODE_PORTS = {
    "manifests/overlays/standard": None,
    "manifests/overlays/knative": {"aggr-metric": 9088},
    "manifests/fallback": None,
}


@pytest.mark.parametrize("deployable", list(MODE_PORTS))
def test_monitoring_component_scrapes_each_deployable_through_an_admitted_port(
    tmp_path, deployable
):
    objects = render_with_monitoring(tmp_path, deployable)
    for obj in objects:  # the core objects, the dashboard ConfigMap among them
        if obj["kind"] not in ("PodMonitor", "PrometheusRule", "InferenceService"):
            kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
    by_kind = {o["kind"]: o for o in objects if o["kind"] in ("PodMonitor", "PrometheusRule")}
    assert crd_errors(by_kind["PodMonitor"], "monitoring.coreos.com_podmonitors.yaml") == []
    assert crd_errors(by_kind["PrometheusRule"], "monitoring.coreos.com_prometheusrules.yaml") == []
    monitor = by_kind["PodMonitor"]["spec"]
    workload = next(o for o in objects if o["kind"] in ("InferenceService", "Deployment"))
    spec = pod_spec(workload)
    pod_labels = (
        spec.get("labels", {})
        if workload["kind"] == "InferenceService"
        else workload["spec"]["template"]["metadata"]["labels"]
    )
    assert monitor["selector"]["matchLabels"].items() <= pod_labels.items()
    assert pod_labels[monitor["jobLabel"]] == JOB["job"]  # the job the rules select
    ports = MODE_PORTS[deployable] or {
        p["name"]: p["containerPort"] for p in spec["containers"][0]["ports"]
    }
    scraped = [e["port"] for e in monitor["podMetricsEndpoints"] if e["port"] in ports]
    assert len(scraped) == 1, (deployable, ports)
    assert ports[scraped[0]] in admitted_ports((predictor_policy(objects),))
    project = yaml.safe_load((ROOT / "argocd" / "project.yaml").read_text())
    allowed = {(k["group"], k["kind"]) for k in project["spec"]["namespaceResourceWhitelist"]}
    for obj in objects:  # Argo CD syncs only the kinds the AppProject admits
        assert (obj["apiVersion"].rpartition("/")[0], obj["kind"]) in allowed, obj["kind"]
    dashboard = next(o for o in objects if o["metadata"]["name"].startswith("fraud-predictor-dash"))
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(dashboard["data"]["fraud-predictor.json"])["uid"] == "fraud-predictor"


def predictor_policy(objects: list[dict]) -> dict:
    (policy,) = [
        o
        for o in objects
        if o["kind"] == "NetworkPolicy" and o["metadata"]["name"].startswith("fraud-predictor")
    ]
    return policy


# ------------------------------------------------------------- the fraud-report CronJob

PUSHGATEWAY = ("monitoring", {"app.kubernetes.io/name": "prometheus-pushgateway"})
REPORT_COMMAND = ["fraud-report", "--days", "30", "--pushgateway", PUSHGATEWAY_URL]
SCHEDULE_MINUTES = 15


def report_pod_labels(cronjob: dict) -> dict[str, str]:
    return cronjob["spec"]["jobTemplate"]["spec"]["template"]["metadata"]["labels"]


def report_problems(objects: list[dict]) -> list[str]:
    """Why the component's fraud-report CronJob would not run as the predictor's pods run,
    from the deployable's image, with the ledger Secret, one run at a time within its slot."""
    (cronjob,) = [o for o in objects if o["kind"] == "CronJob"]
    workload = next(o for o in objects if o["kind"] in ("InferenceService", "Deployment"))
    (predictor,) = pod_spec(workload)["containers"]
    spec = pod_spec(cronjob)
    (container,) = spec["containers"]
    problems = policy_violations(cronjob)
    command = [*container.get("command", []), *container.get("args", [])]
    if command != REPORT_COMMAND:
        problems.append(f"runs {command}")
    if container["image"] != predictor["image"]:
        problems.append(f"image {container['image']} is not the predictor's {predictor['image']}")
    if container.get("securityContext") != predictor.get("securityContext"):
        problems.append("its security context is not the predictor's")
    problems += ledger_env_problems(cronjob, {}, optional=False)
    volumes = {v["name"]: v for v in spec.get("volumes", [])}
    tmp = [m for m in container.get("volumeMounts", []) if m["mountPath"] == "/tmp"]
    if len(tmp) != 1 or "emptyDir" not in volumes.get(tmp[0]["name"], {}):
        problems.append("/tmp is not an emptyDir")
    if spec.get("automountServiceAccountToken") is not False:
        problems.append("the service account token is mounted")
    schedule, job = cronjob["spec"], cronjob["spec"]["jobTemplate"]["spec"]
    if schedule["schedule"] != f"*/{SCHEDULE_MINUTES} * * * *":
        problems.append(f"schedule {schedule['schedule']}")
    if schedule.get("concurrencyPolicy") != "Forbid":
        problems.append("runs may overlap")
    for limit in ("successfulJobsHistoryLimit", "failedJobsHistoryLimit"):
        if not 1 <= schedule.get(limit, -1) <= 5:
            problems.append(f"{limit} is {schedule.get(limit)}")
    if not 0 < job.get("activeDeadlineSeconds", 0) <= SCHEDULE_MINUTES * 60:
        problems.append(f"activeDeadlineSeconds {job.get('activeDeadlineSeconds')} outlasts a slot")
    return problems


@pytest.mark.parametrize("deployable", list(MODE_PORTS))
def test_report_cronjob_runs_like_the_predictor_from_the_deployables_image(tmp_path, deployable):
    objects = render_with_monitoring(tmp_path, deployable)
    assert report_problems(objects) == []
    (cronjob,) = [o for o in objects if o["kind"] == "CronJob"]
    image = pod_spec(cronjob)["containers"][0]["image"]
    kustomization = yaml.safe_load((ROOT / deployable / "kustomization.yaml").read_text())
    (entry,) = kustomization["images"]
    pinned = f"@{entry['digest']}" if "digest" in entry else ""
    assert image == f"{entry['newName']}:{entry['newTag']}{pinned}"  # the deployable's entry
    accounts = {o["metadata"]["name"]: o for o in objects if o["kind"] == "ServiceAccount"}
    account = accounts[pod_spec(cronjob)["serviceAccountName"]]
    assert account["automountServiceAccountToken"] is False
    monitor = next(o for o in objects if o["kind"] == "PodMonitor")["spec"]
    assert not selector_matches(monitor["selector"], report_pod_labels(cronjob))  # not scraped


def test_report_check_catches_each_way_the_cronjob_would_go_wrong(tmp_path):
    objects = render_with_monitoring(tmp_path, "manifests/fallback")

    def broken(change) -> list[str]:
        copied = copy.deepcopy(objects)
        cronjob = next(o for o in copied if o["kind"] == "CronJob")
        change(cronjob, pod_spec(cronjob), pod_spec(cronjob)["containers"][0])
        return report_problems(copied)

    def literal(cronjob, spec, container):
        container["env"] = [{"name": "DECISION_LOG_URI", "value": "postgresql://u:p@db/ledger"}]

    def optional(cronjob, spec, container):
        container["env"][0]["valueFrom"]["secretKeyRef"]["optional"] = True

    def own_image(cronjob, spec, container):
        container["image"] = "ghcr.io/fraud-predictor/fraud-predictor:0.0.9"

    def writable(cronjob, spec, container):
        container["securityContext"]["readOnlyRootFilesystem"] = False

    def as_root(cronjob, spec, container):
        container["securityContext"]["runAsUser"] = 0

    def overlapping(cronjob, spec, container):
        cronjob["spec"]["concurrencyPolicy"] = "Allow"
        cronjob["spec"]["jobTemplate"]["spec"]["activeDeadlineSeconds"] = 3600

    def elsewhere(cronjob, spec, container):
        container["args"][-1] = "http://127.0.0.1:9091"

    def no_tmp(cronjob, spec, container):
        container["volumeMounts"] = []

    assert any("is not read from a Secret" in p for p in broken(literal))
    assert any("is not required" in p for p in broken(optional))
    assert any("is not the predictor's" in p for p in broken(own_image))
    assert any("readOnlyRootFilesystem" in p for p in broken(writable))
    assert "its security context is not the predictor's" in broken(as_root)
    assert {"runs may overlap", "activeDeadlineSeconds 3600 outlasts a slot"} <= set(
        broken(overlapping)
    )
    assert any(p.startswith("runs [") for p in broken(elsewhere))
    assert "/tmp is not an emptyDir" in broken(no_tmp)


def report_policy(objects: list[dict]) -> dict:
    (cronjob,) = [o for o in objects if o["kind"] == "CronJob"]
    labels = report_pod_labels(cronjob)
    (policy,) = [
        o
        for o in objects
        if o["kind"] == "NetworkPolicy" and selector_matches(o["spec"]["podSelector"], labels)
    ]
    return policy


@pytest.mark.parametrize("deployable", list(MODE_PORTS))
def test_report_pods_reach_only_dns_postgresql_and_the_pushgateway(tmp_path, deployable):
    objects = render_with_monitoring(tmp_path, deployable)
    policy = report_policy(objects)
    assert policy is not predictor_policy(objects)  # the predictor's rules are not its own
    assert admitted_by_caller(policy) == {}  # nothing comes in
    assert reachable_on(policy, *LEDGER_DATABASE) == {53, POSTGRESQL}
    assert reachable_on(policy, *PUSHGATEWAY) == {53, POSTGRESQL, 9091}
    predictor_pod = ("fraud-detection", {"app": "fraud-predictor"})
    assert reachable_on(policy, *predictor_pod) == {53, POSTGRESQL}
    # And the predictor's pods reach the ledger too.
    assert POSTGRESQL in reachable_on(predictor_policy(objects), *LEDGER_DATABASE)


def test_report_policy_check_catches_open_egress(tmp_path):
    policy = copy.deepcopy(report_policy(render_with_monitoring(tmp_path, "manifests/fallback")))
    del policy["spec"]["egress"][2]["to"]
    assert reachable_on(policy, *LEDGER_DATABASE) == {53, POSTGRESQL, 9091}
    policy["spec"]["egress"].append({})
    assert "all" in reachable_on(policy, *LEDGER_DATABASE)


def test_checkov_finds_nothing_in_the_report_cronjob_and_its_policy(tmp_path):
    objects = render_with_monitoring(tmp_path, "manifests/fallback")
    report = [o for o in objects if "fraud-report" in o["metadata"]["name"]]
    assert sorted(o["kind"] for o in report) == ["CronJob", "NetworkPolicy", "ServiceAccount"]
    path = tmp_path / "report.yaml"
    path.write_text(yaml.safe_dump_all(report))
    result = checkov("-f", str(path), "--framework", "kubernetes")
    assert result.returncode == 0, result.stdout
