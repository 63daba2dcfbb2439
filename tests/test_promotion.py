"""`fraud-models` and the challenger path, on a fresh embedded store and on a real MLflow
server: training a challenger, listing, promoting, rolling back, and the promotion gate on
live evidence from the decision ledger."""

from __future__ import annotations

import os
import random
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import orjson
import pytest
import requests
from support import ORDINARY, launch_predictor, stop, wait_for

from predictor import registry
from predictor.settings import embedded_tracking_uri
from predictor.store import Store

ROOT = Path(__file__).resolve().parents[1]


def command(args: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI",)}
    return subprocess.run(
        args, cwd=cwd, env={**clean, **env}, capture_output=True, text=True, timeout=300
    )


def train(cwd: Path, env: dict[str, str], *extra: str) -> subprocess.CompletedProcess:
    return command(
        [sys.executable, str(ROOT / "scripts" / "train.py"), "--rows", "4000", *extra], cwd, env
    )


def models(cwd: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return command([sys.executable, "-m", "predictor.promotion", *args], cwd, env)


@pytest.fixture(scope="module")
def embedded(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """A fresh embedded store with version 1 @champion and version 2 @challenger, made by
    the documented commands (the second is the `--alias challenger` path)."""
    cwd = tmp_path_factory.mktemp("embedded-models")
    env = {"LOCAL_STORE_DIR": str(cwd / "store")}
    first = train(cwd, env, "--seed", "1")
    assert first.returncode == 0, first.stderr
    second = train(cwd, env, "--seed", "2", "--alias", "challenger")
    assert second.returncode == 0, second.stderr
    assert "alias 'challenger' moved to it" in second.stdout
    return cwd, env


def aliases(cwd: Path, name: str = "fraud-detector") -> dict[str, str]:
    client = registry.connect(embedded_tracking_uri(cwd / "store"))
    return {
        alias: str(version) for alias, version in client.get_registered_model(name).aliases.items()
    }


def test_list_shows_versions_aliases_thresholds_and_metrics(embedded):
    cwd, env = embedded
    listed = models(cwd, env, "list")
    assert listed.returncode == 0, listed.stderr
    lines = listed.stdout.splitlines()
    assert "@champion serves version 1" in lines and "@challenger serves version 2" in lines
    row = next(line for line in lines if line.split()[:2] == ["1", "champion"])
    assert len(row.split()) >= 7  # threshold and the four test metrics


def test_promote_and_rollback_move_the_alias_and_record_why(embedded):
    cwd, env = embedded
    done = models(cwd, env, "promote", "2", "--reason", "better on review")
    assert done.returncode == 0, done.stderr
    assert aliases(cwd)["champion"] == "2"
    client = registry.connect(embedded_tracking_uri(cwd / "store"))
    tags = client.get_model_version("fraud-detector", "2").tags
    assert tags["promotion_reason"] == "better on review" and tags["promoted_from"] == "1"
    assert tags["promoted_by"] and tags["promoted_at"]
    back = models(cwd, env, "rollback")
    assert back.returncode == 0 and "version 2 -> 1" in back.stdout, back.stderr
    assert aliases(cwd)["champion"] == "1"


def test_commands_refuse_in_one_line(embedded):
    cwd, env = embedded
    for args, message in (
        (["promote", "99"], ""),
        (["rollback", "--alias", "nothing"], "no previous version"),
        (["--model-name", "nope", "list"], ""),
    ):
        done = models(cwd, env, *args)
        assert done.returncode == 1, (args, done.stdout)
        assert len(done.stderr.strip().splitlines()) == 1 and message in done.stderr


def test_a_server_on_an_alias_the_model_lacks_waits_for_it(embedded, tmp_path):
    cwd, env = embedded
    predictor = launch_predictor(
        cwd,
        env={**env, "MODEL_URI": "models:/fraud-detector@shadowed", "MODEL_RETRY_MAX_SECONDS": "1"},
        wait_ready=False,
    )
    try:
        wait_for(f"{predictor.url}/v2/health/live", timeout=120, process=predictor.process)
        assert requests.get(f"{predictor.url}/v2/health/ready", timeout=10).status_code == 503
        assert "has no alias 'shadowed' yet" in predictor.log()
        assert models(cwd, env, "promote", "2", "--alias", "shadowed").returncode == 0
        wait_for(f"{predictor.url}/v2/health/ready", timeout=60, process=predictor.process)
        response = requests.post(
            f"{predictor.url}/v1/models/fraud-detector:predict",
            json={"instances": [ORDINARY]},
            timeout=10,
        )
        assert response.json()["model_version"] == "2"
    finally:
        stop(predictor.process)
    assert predictor.process.returncode == 0


def test_the_challenger_path_works_on_an_mlflow_server(mlflow_server, tmp_path):
    env = {"MLFLOW_TRACKING_URI": mlflow_server.url}
    name = "fraud-promotion"
    assert train(tmp_path, env, "--model-name", name, "--seed", "3").returncode == 0
    challenger = train(tmp_path, env, "--model-name", name, "--seed", "4", "--alias", "challenger")
    assert challenger.returncode == 0, challenger.stderr
    listed = models(tmp_path, env, "--model-name", name, "list")
    assert "@challenger serves version 2" in listed.stdout, listed.stderr
    assert models(tmp_path, env, "--model-name", name, "promote", "2").returncode == 0
    assert models(tmp_path, env, "--model-name", name, "rollback").returncode == 0
    client = registry.connect(mlflow_server.url)
    assert str(client.get_registered_model(name).aliases["champion"]) == "1"


def shadow_ledger(path: Path, champion_quality: float, challenger_quality: float, rows: int):
    """Decisions by version 1 with version 2 in shadow, and every outcome: each version
    flags the fraud it catches with its own `quality` (the share it gets right)."""
    rng = random.Random(9)
    uri = f"sqlite:///{path}"
    store = Store(uri)
    store.migrate()
    start = datetime.now(UTC) - timedelta(days=1)
    decisions, outcomes = [], []
    for n in range(rows):
        fraud = rng.random() < 0.2
        champion_right = rng.random() < champion_quality
        challenger_right = rng.random() < challenger_quality
        champion_flag = fraud if champion_right else not fraud
        challenger_flag = fraud if challenger_right else not fraud
        decisions.append(
            (
                f"s-{n}",
                None,
                start + timedelta(seconds=n),
                "fraud-detector",
                "1",
                0.9 if champion_flag else 0.1,
                0.5,
                champion_flag,
                orjson.dumps(ORDINARY).decode(),
                "v1",
                "2",
                0.99 if challenger_flag else 0.0,
            )
        )
        outcomes.append((f"s-{n}", fraud, None, "test"))
    store.write_decisions(decisions)
    store.replace_outcomes(outcomes)
    store.close()
    return uri


@pytest.mark.parametrize(
    ("champion", "challenger", "rows", "outcome"),
    [
        (0.95, 0.80, 600, "refused: worse"),
        (0.80, 0.95, 600, "promoted"),
        (0.80, 0.95, 40, "refused: too little"),
    ],
)
def test_the_promotion_gate_follows_live_evidence(
    embedded, tmp_path, champion, challenger, rows, outcome
):
    cwd, env = embedded
    assert models(cwd, env, "promote", "1").returncode == 0  # version 1 is the champion
    assert models(cwd, env, "promote", "2", "--alias", "challenger").returncode == 0
    ledger = shadow_ledger(tmp_path / "ledger.db", champion, challenger, rows)
    compared = models(cwd, env, "compare", "--ledger", ledger)
    assert compared.returncode == 0 and f"on {rows} live transactions" in compared.stdout
    done = models(cwd, env, "promote", "--challenger", "--ledger", ledger)
    if outcome == "promoted":
        assert done.returncode == 0, done.stderr
        assert aliases(cwd)["champion"] == "2"
        client = registry.connect(embedded_tracking_uri(cwd / "store"))
        assert (
            "live evidence"
            in client.get_model_version("fraud-detector", "2").tags["promotion_reason"]
        )
        return
    assert done.returncode == 1 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert ("worse than champion" if "worse" in outcome else "too little") in done.stderr
    assert aliases(cwd)["champion"] == "1"
    forced = models(cwd, env, "promote", "--challenger", "--ledger", ledger, "--force")
    assert forced.returncode == 0 and aliases(cwd)["champion"] == "2"
