"""Outcomes into the ledger (`fraud-outcomes import`) and live quality out of it
(`fraud-report`), on SQLite and a real PostgreSQL, checked against an independent count;
the Pushgateway push against Debian's `prometheus-pushgateway`."""

from __future__ import annotations

import random
import shutil
import subprocess
import sys
import time
from collections import defaultdict
from datetime import UTC, datetime, timedelta
from pathlib import Path

import orjson
import pytest
import requests
from processes import free_port
from support import ORDINARY
from test_ledger import fresh_database

from predictor.store import Store

START = datetime(2026, 11, 20, 9, 0, tzinfo=UTC)


def run(command: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", f"predictor.{command}", *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.fixture(params=["sqlite", "postgresql"])
def ledger(request, tmp_path) -> str:
    if request.param == "sqlite":
        uri = f"sqlite:///{tmp_path / 'decisions.db'}"
    else:
        uri = fresh_database(request.getfixturevalue("postgres"))
    store = Store(uri)
    store.migrate()
    store.close()
    return uri


def write_csv(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def outcomes(uri: str) -> dict[str, tuple]:
    store = Store(uri)
    try:
        rows = store.query("SELECT transaction_id, is_fraud, labelled_at, source FROM outcomes")
    finally:
        store.close()
    return {row[0]: (bool(row[1]), row[2], row[3]) for row in rows}


def test_outcomes_import_and_a_later_import_replaces(ledger, tmp_path):
    first = write_csv(
        tmp_path / "first.csv",
        "transaction_id,is_fraud,labelled_at,source\n"
        "t-1,1,2026-12-01,chargeback\nt-2,false,,\nt-3,TRUE,2026-12-02T10:00:00+01:00,review\n",
    )
    done = run("outcomes", "import", str(first), "--ledger", ledger)
    assert done.returncode == 0, done.stderr
    assert "imported 3 outcomes" in done.stdout
    later = write_csv(tmp_path / "later.csv", "is_fraud,transaction_id\n0,t-1\n")
    assert run("outcomes", "import", str(later), "--ledger", ledger).returncode == 0
    found = outcomes(ledger)
    assert {tid: fraud for tid, (fraud, _, _) in found.items()} == {
        "t-1": False,
        "t-2": False,
        "t-3": True,
    }
    assert found["t-1"][2] is None and found["t-3"][2] == "review"


BAD_FILES = {
    "empty": ("", "the file is empty"),
    "no is_fraud column": ("transaction_id\nt-1\n", "row 1 (header): columns must be"),
    "unknown column": ("transaction_id,is_fraud,amount\nt-1,1,3\n", "row 1 (header)"),
    "bad flag": ("transaction_id,is_fraud\nt-1,1\nt-2,yes\n", "row 3: is_fraud must be"),
    "missing value": ("transaction_id,is_fraud\nt-1\n", "row 2: 1 values for 2 columns"),
    "blank id": ("transaction_id,is_fraud\n ,1\n", "row 2: transaction_id must be"),
    "long id": ("transaction_id,is_fraud\n" + "x" * 129 + ",1\n", "row 2: transaction_id"),
    "repeated id": ("transaction_id,is_fraud\nt-1,1\nt-1,0\n", "row 3: transaction_id 't-1'"),
    "bad date": (
        "transaction_id,is_fraud,labelled_at\nt-1,1,yesterday\n",
        "row 2: labelled_at must be",
    ),
}


@pytest.mark.parametrize("case", BAD_FILES)
def test_a_bad_file_exits_2_naming_the_row_and_imports_nothing(ledger, tmp_path, case):
    good = write_csv(tmp_path / "good.csv", "transaction_id,is_fraud\nkeep,1\n")
    assert run("outcomes", "import", str(good), "--ledger", ledger).returncode == 0
    text, problem = BAD_FILES[case]
    bad = write_csv(tmp_path / "bad.csv", text)
    done = run("outcomes", "import", str(bad), "--ledger", ledger)
    assert done.returncode == 2, done
    assert problem in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert set(outcomes(ledger)) == {"keep"}


def test_a_file_that_is_not_text_is_refused(ledger, tmp_path):
    bad = tmp_path / "binary.csv"
    bad.write_bytes(b"transaction_id,is_fraud\n\xff\xfe,1\n")
    done = run("outcomes", "import", str(bad), "--ledger", ledger)
    assert done.returncode == 2 and "not UTF-8" in done.stderr


def generated_ledger(uri: str, seed: int = 5) -> tuple[list[tuple], dict[str, bool]]:
    """Decisions over four days and three versions, some transactions decided twice (the
    latest counts), and outcomes for about half of them."""
    rng = random.Random(seed)
    rows = []
    for n in range(1500):
        tid = f"g-{n}"
        for attempt in range(1 + (n % 7 == 0)):
            scored_at = START + timedelta(hours=rng.randrange(96), seconds=attempt * 30 + n)
            probability = rng.random()
            rows.append(
                (
                    tid,
                    None,
                    scored_at,
                    "fraud-detector",
                    rng.choice("123"),
                    probability,
                    0.5,
                    probability >= 0.5,
                    orjson.dumps(ORDINARY).decode(),
                    "v1",
                    None,
                    None,
                )
            )
    labels = {f"g-{n}": rng.random() < 0.3 for n in range(1500) if rng.random() < 0.5}
    store = Store(uri)
    try:
        store.write_decisions(rows)
        store.replace_outcomes((tid, fraud, None, "test") for tid, fraud in labels.items())
    finally:
        store.close()
    return rows, labels


def expected(rows: list[tuple], labels: dict[str, bool], since: datetime, until: datetime):
    """The report, computed independently in Python."""
    latest: dict[str, tuple] = {}
    for row in rows:
        if since <= row[2] < until and (row[0] not in latest or row[2] > latest[row[0]][2]):
            latest[row[0]] = row
    per: dict[tuple[str, str], defaultdict] = {}
    for tid, row in latest.items():
        for key in ((row[4], "all"), (row[4], row[2].strftime("%Y-%m-%d"))):
            counts = per.setdefault(key, defaultdict(int))
            counts["decisions"] += 1
            counts["flagged"] += row[7]
            if tid in labels:
                counts["labelled"] += 1
                counts["labelled_fraud"] += labels[tid]
                counts["true_positives"] += row[7] and labels[tid]
                counts["false_positives"] += row[7] and not labels[tid]
                counts["false_negatives"] += (not row[7]) and labels[tid]
    return per


@pytest.mark.parametrize(
    "window", [(), ("--since", "2026-11-21", "--until", "2026-11-22")], ids=["all", "two days"]
)
def test_the_report_counts_exactly_what_an_independent_count_finds(ledger, window):
    rows, labels = generated_ledger(ledger)
    done = run("report", "--ledger", ledger, "--format", "json", *window)
    assert done.returncode == 0, done.stderr
    report = orjson.loads(done.stdout)
    since = datetime(2026, 11, 21, tzinfo=UTC) if window else datetime(1970, 1, 1, tzinfo=UTC)
    until = datetime(2026, 11, 23, tzinfo=UTC) if window else datetime.now(UTC)
    truth = expected(rows, labels, since, until)
    assert [entry["model_version"] for entry in report] == sorted({version for version, _ in truth})
    for entry in report:
        for scope, got in [("all", entry)] + [(day["day"], day) for day in entry["by_day"]]:
            want = truth[(entry["model_version"], scope)]
            for name in (
                "decisions",
                "flagged",
                "labelled",
                "labelled_fraud",
                "true_positives",
                "false_positives",
                "false_negatives",
            ):
                assert got[name] == want[name], (entry["model_version"], scope, name)
            tp, fp, fn = want["true_positives"], want["false_positives"], want["false_negatives"]
            assert got["precision"] == pytest.approx(tp / (tp + fp), abs=1e-12)
            assert got["recall"] == pytest.approx(tp / (tp + fn), abs=1e-12)
            assert got["alert_rate"] == pytest.approx(
                want["flagged"] / want["decisions"], abs=1e-12
            )
    days = {day["day"] for entry in report for day in entry["by_day"]}
    assert days == (
        {"2026-11-21", "2026-11-22"} if window else {f"2026-11-{d}" for d in range(20, 25)}
    )


def test_undefined_rates_are_null(tmp_path):
    uri = f"sqlite:///{tmp_path / 'decisions.db'}"
    store = Store(uri)
    store.migrate()
    store.write_decisions(
        [("u-1", None, START, "fraud-detector", "4", 0.1, 0.5, False, "{}", "v2", None, None)]
    )
    store.close()
    (entry,) = orjson.loads(run("report", "--ledger", uri, "--format", "json").stdout)
    assert (entry["precision"], entry["recall"], entry["alert_rate"]) == (None, None, 0.0)


def test_the_html_report_is_one_self_contained_page_with_plots(tmp_path):
    uri = f"sqlite:///{tmp_path / 'decisions.db'}"
    Store(uri).migrate()
    generated_ledger(uri)
    page = tmp_path / "report.html"
    done = run("report", "--ledger", uri, "--format", "html", "--out", str(page))
    assert done.returncode == 0, done.stderr
    text = page.read_text()
    assert text.startswith("<!DOCTYPE html>") and text.count("<svg") == 2
    assert "<polyline" in text and "v1 precision" in text
    assert "src=" not in text and "href=" not in text and "<script" not in text


def test_the_report_pushes_its_figures_to_a_pushgateway(tmp_path):
    gateway = shutil.which("prometheus-pushgateway")
    if gateway is None:
        pytest.skip("prometheus-pushgateway is not installed (Debian package; .ci/run installs it)")
    uri = f"sqlite:///{tmp_path / 'decisions.db'}"
    Store(uri).migrate()
    generated_ledger(uri)
    port = free_port()
    process = subprocess.Popen(
        [gateway, f"--web.listen-address=127.0.0.1:{port}"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while True:
            try:
                requests.get(f"{url}/-/ready", timeout=2).raise_for_status()
                break
            except requests.RequestException:
                assert time.monotonic() < deadline
                time.sleep(0.2)
        done = run("report", "--ledger", uri, "--format", "json", "--pushgateway", url)
        assert done.returncode == 0, done.stderr
        report = {entry["model_version"]: entry for entry in orjson.loads(done.stdout)}
        metrics = requests.get(f"{url}/metrics", timeout=10).text
        for version, entry in report.items():
            line = next(
                line
                for line in metrics.splitlines()
                if line.startswith("fraud_live_precision{")
                and f'model_version="{version}"' in line
                and 'job="fraud-report"' in line
            )
            assert float(line.rsplit(" ", 1)[1]) == pytest.approx(entry["precision"], abs=1e-12)
        assert "fraud_report_last_success_timestamp_seconds{" in metrics
    finally:
        process.terminate()
        process.wait(timeout=10)


def test_without_a_ledger_the_tools_say_so(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")
    monkeypatch.chdir(tmp_path)
    done = run("report")
    assert done.returncode == 2 and "no ledger" in done.stderr
