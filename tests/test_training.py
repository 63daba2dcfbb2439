"""Training into a real (temporary, sqlite-backed) MLflow store, read back with MlflowClient."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from mlflow import MlflowClient
from sklearn.metrics import average_precision_score, roc_auc_score

from predictor import registry
from predictor.data import LABEL, generate_transactions, to_columns
from predictor.features import build_features
from predictor.settings import embedded_artifact_location, embedded_tracking_uri
from predictor.training import TrainingConfig, TrainingResult, train_and_register

ROOT = Path(__file__).resolve().parents[1]
NAME = "fraud-detector"


@dataclass
class Store:
    dir: Path
    uri: str
    client: MlflowClient
    first: TrainingResult


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Store:
    directory = tmp_path_factory.mktemp("training-store")
    uri = embedded_tracking_uri(directory)
    first = train_and_register(
        TrainingConfig(rows=20_000, seed=7),
        uri,
        embedded_artifact_location(directory),
        log=lambda _: None,
    )
    return Store(directory, uri, MlflowClient(tracking_uri=uri, registry_uri=uri), first)


def run_cli(args: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    return subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "train.py"), *args],
        cwd=cwd,
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_training_registers_version_alias_threshold_metrics_and_plots(store: Store):
    version = store.client.get_model_version_by_alias(NAME, "champion")
    assert str(version.version) == store.first.version
    threshold = float(version.tags[registry.THRESHOLD_TAG])
    assert 0.0 < threshold < 1.0
    assert threshold == pytest.approx(store.first.threshold, abs=1e-6)
    run = store.client.get_run(version.run_id)
    for metric in ("roc_auc", "pr_auc", "precision", "recall", "f1", "fraud_rate"):
        assert f"test_{metric}" in run.data.metrics
    assert run.data.params["seed"] == "7"
    plots = {a.path for a in store.client.list_artifacts(version.run_id, "plots")}
    assert plots == {
        "plots/roc_curve.png",
        "plots/precision_recall_curve.png",
        "plots/confusion_matrix.png",
    }
    local = store.client.download_artifacts(version.run_id, "plots/roc_curve.png", str(store.dir))
    assert Path(local).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_registered_model_has_feature_signature_and_loads_without_pickle(store: Store):
    ref = registry.resolve(store.client, f"models:/{NAME}@champion")
    loaded = registry.load(ref, store.uri)  # skops with the server's own trusted types
    assert loaded.input_example is not None and loaded.input_example.shape[1] == 10


def test_model_separates_fraud_on_held_out_generated_data(store: Store):
    ref = registry.resolve(store.client, f"models:/{NAME}@champion")
    estimator = registry.load(ref, store.uri).estimator
    held_out = generate_transactions(rows=30_000, fraud_rate=0.02, seed=2024)
    scores = estimator.predict_proba(build_features(to_columns(held_out)))[:, 1]
    roc_auc = roc_auc_score(held_out[LABEL], scores)
    pr_auc = average_precision_score(held_out[LABEL], scores)
    print(f"held-out ROC-AUC {roc_auc:.3f}, PR-AUC {pr_auc:.3f}, fraud rate 0.02")
    assert roc_auc >= 0.90
    assert pr_auc >= 10 * held_out[LABEL].mean()


def test_worse_challenger_does_not_move_alias_but_force_does(store: Store):
    weak = TrainingConfig(rows=20_000, seed=7, max_iter=1, learning_rate=0.01, max_leaf_nodes=2)
    challenger = train_and_register(weak, store.uri, log=lambda _: None)
    assert not challenger.promoted
    assert challenger.champion_pr_auc is not None
    assert challenger.metrics["pr_auc"] < challenger.champion_pr_auc
    holder = store.client.get_model_version_by_alias(NAME, "champion")
    assert str(holder.version) == store.first.version
    assert store.client.get_model_version(NAME, challenger.version)  # registered anyway

    forced = run_cli(
        ["--rows", "2000", "--max-iter", "1", "--max-leaf-nodes", "2", "--force"],
        cwd=store.dir,
        env={"MLFLOW_TRACKING_URI": store.uri},
    )
    assert forced.returncode == 0, forced.stderr
    assert "--force given" in forced.stdout
    holder = store.client.get_model_version_by_alias(NAME, "champion")
    assert int(holder.version) > int(challenger.version)


def test_training_against_a_server_says_each_step_once(mlflow_server, tmp_path: Path):
    """MLflow's own registration prints, wait notices and run links are left out; the
    trainer's last line links the run in MLflow's UI instead."""
    result = run_cli(
        ["--rows", "2000", "--model-name", "fraud-quiet"],
        cwd=tmp_path,
        env={"MLFLOW_TRACKING_URI": mlflow_server.url},
    )
    assert result.returncode == 0, result.stderr
    output = result.stdout + result.stderr
    for chatter in ("Successfully registered", "Created version", "Waiting up to", "View run"):
        assert chatter not in output, output
    assert f"fraud-quiet version 1 (run {mlflow_server.url}/#/experiments/" in output, output
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # nothing written beside


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("amount,timestamp\n1,2026-01-01T00:00:00+00:00\n", "missing column(s)"),
        (None, "column 'amount', row 2: 'lots' is not a number"),
        ("", "the file is empty"),
    ],
)
def test_bad_training_input_exits_nonzero_with_one_line_and_registers_nothing(
    tmp_path: Path, content: str | None, message: str
):
    csv = tmp_path / "data.csv"
    if content is None:
        frame = generate_transactions(rows=20, seed=1)
        frame["amount"] = frame["amount"].astype(object)
        frame.loc[1, "amount"] = "lots"
        frame.to_csv(csv, index=False)
    else:
        csv.write_text(content)
    result = run_cli(["--csv", str(csv)], cwd=tmp_path, env={"LOCAL_STORE_DIR": "store"})
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr
    assert not (tmp_path / "store" / "mlflow.db").exists()  # MLflow was never touched


def test_help_documents_every_option():
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "train.py"), "--help"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0
    for option in (
        "--rows",
        "--fraud-rate",
        "--seed",
        "--csv",
        "--model-name",
        "--alias",
        "--experiment",
        "--force",
        "--max-iter",
        "--learning-rate",
    ):
        assert option in result.stdout


def labelled_ledger(path: Path, rows: int = 4_000, seed: int = 11) -> str:
    """A SQLite decision ledger of generated transactions, each with its true outcome."""
    from datetime import UTC, datetime, timedelta

    import orjson

    from predictor.data import transaction_payloads
    from predictor.store import Store as Ledger

    frame = generate_transactions(rows=rows, fraud_rate=0.1, seed=seed)
    uri = f"sqlite:///{path}"
    ledger = Ledger(uri)
    ledger.migrate()
    start = datetime(2026, 11, 1, tzinfo=UTC)
    decisions = [
        (
            f"l-{n}",
            None,
            start + timedelta(minutes=n),
            NAME,
            "1",
            0.5,
            0.5,
            False,
            orjson.dumps(payload).decode(),
            "v1",
            None,
            None,
        )
        for n, payload in enumerate(transaction_payloads(frame))
    ]
    ledger.write_decisions(decisions)
    ledger.replace_outcomes(
        (f"l-{n}", bool(label), None, "test") for n, label in enumerate(frame[LABEL].tolist())
    )
    ledger.close()
    return uri


def test_training_from_the_ledger_registers_a_challenger_from_labelled_traffic(
    store: Store, tmp_path: Path
):
    uri = labelled_ledger(tmp_path / "decisions.db")
    result = run_cli(
        ["--from-ledger", uri, "--since", "2026-11-02", "--alias", "challenger", "--force"],
        cwd=tmp_path,
        env={"MLFLOW_TRACKING_URI": store.uri},
    )
    assert result.returncode == 0, result.stderr
    version = store.client.get_model_version_by_alias(NAME, "challenger")
    run = store.client.get_run(version.run_id)
    assert run.data.params["ledger"] == uri
    # 4,000 minutes from Nov 1: the rows scored from Nov 2 on (1,440 minutes in)
    assert "2560 transactions" in result.stdout, result.stdout
    assert store.client.get_model_version_by_alias(NAME, "champion").version != version.version


def test_training_from_an_empty_or_unreadable_ledger_exits_2(tmp_path: Path):
    from predictor.store import Store as Ledger

    empty = f"sqlite:///{tmp_path / 'empty.db'}"
    Ledger(empty).migrate()
    for uri, message in (
        (empty, "no labelled decisions"),
        ("postgresql://nobody:secret@127.0.0.1:9/none", "cannot connect"),
    ):
        result = run_cli(["--from-ledger", uri], cwd=tmp_path, env={"LOCAL_STORE_DIR": "store"})
        assert result.returncode == 2, result.stderr
        assert message in result.stderr and "secret" not in result.stderr
