"""Champion and challenger on live traffic: the shadow version scores every request after
the answer without changing a byte of it, its probabilities reach the ledger, a failing
shadow is isolated, either alias reloads; feature drift (PSI) rises on a planted shift
and only there."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import sqlite3
import time
from pathlib import Path

import numpy as np
import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families
from sklearn.ensemble import HistGradientBoostingClassifier
from support import launch_predictor, stop
from test_promotion import models, train

from predictor import metrics, registry
from predictor.data import generate_transactions, to_columns, transaction_payloads
from predictor.drift import DRIFT_LABELS, PROFILE_ARTIFACT, DriftWindow, Profile, build_profile
from predictor.features import FEATURE_NAMES, build_features
from predictor.followup import FollowUp
from predictor.ledger import DecisionLog
from predictor.model import FraudModel
from predictor.serving import SHADOW, ServingSlot
from predictor.settings import Settings, embedded_tracking_uri
from predictor.store import DECISION_COLUMNS

MODEL = "fraud-detector"
DRIFT_FEATURES = [DRIFT_LABELS.get(name, name) for name in FEATURE_NAMES]


def features_of(frame) -> np.ndarray:
    return build_features(to_columns(frame))


def amount_scaled(frame, factor: float):
    shifted = frame.copy()
    shifted["amount"] = shifted["amount"] * factor
    return shifted


@pytest.fixture(scope="module")
def reference() -> Profile:
    training = features_of(generate_transactions(rows=20_000, seed=1))
    scores = np.random.default_rng(1).beta(0.5, 8, len(training))
    return build_profile(training, scores)


def test_a_profile_survives_its_json_form_and_refuses_a_broken_one(reference):
    document = json.loads(json.dumps(reference.to_json()))
    again = Profile.from_json(document)
    for before, after in zip(reference.features, again.features, strict=True):
        assert np.array_equal(before.edges, after.edges)
        assert np.array_equal(before.proportions, after.proportions)
    document["features"]["customer_age"]["edges"] = [3.0, 2.0]
    with pytest.raises(ValueError, match="customer_age: edges must be finite and increasing"):
        Profile.from_json(document)
    with pytest.raises(ValueError, match="not a format 1 feature profile"):
        Profile.from_json({"features": {}})


def test_psi_rises_on_a_planted_shift_of_one_feature_and_stays_low_elsewhere(reference):
    window = DriftWindow(4_000)
    live = generate_transactions(rows=4_000, seed=2)
    window.append(features_of(live), np.random.default_rng(2).beta(0.5, 8, 4_000))
    calm = window.psi(reference)
    assert max(calm.values()) < 0.1, calm

    window.append(features_of(amount_scaled(live[:2_000], 10.0)), np.zeros(2_000))
    drifted = window.psi(reference)
    assert drifted["amount"] > 0.25, drifted
    assert all(drifted[name] < 0.1 for name in DRIFT_FEATURES if name != "amount"), drifted


def test_a_shift_beyond_the_training_range_shows_as_a_fifth_of_the_window(reference):
    """The tail bins expect 1 %: 500 shifted rows among 2,500 already cross the threshold."""
    window = DriftWindow(2_500)
    window.append(features_of(generate_transactions(rows=2_000, seed=4)), np.zeros(2_000))
    shifted = amount_scaled(generate_transactions(rows=500, seed=5), 10.0)
    window.append(features_of(shifted), np.zeros(500))
    assert window.psi(reference)["amount"] > 0.25


def test_agreement_rows_drawn_from_a_profile_visit_every_bin_of_every_feature(reference):
    rows = reference.sample(2_000)
    assert rows.shape == (2_000, len(FEATURE_NAMES))
    for index, feature in enumerate(reference.features):
        visited = np.bincount(
            np.searchsorted(feature.edges, rows[:, index], side="right"),
            minlength=len(feature.proportions),
        )
        assert np.all(visited[feature.proportions >= 0.002] > 0), FEATURE_NAMES[index]


def test_the_window_keeps_the_newest_rows_and_scores_of_the_served_version_only():
    window = DriftWindow(5)
    window.append(np.full((3, len(FEATURE_NAMES)), 1.0), np.full(3, 0.1))
    window.append(np.full((4, len(FEATURE_NAMES)), 2.0), np.full(4, 0.2))
    assert len(window) == 5
    profile = build_profile(np.array([[1.0] * 10, [2.0] * 10]), np.array([0.1, 0.2]))
    # Newest 5 rows: 1 of value 1, 4 of value 2; the reference is half and half.
    assert window.psi(profile)["amount"] == pytest.approx(
        (0.2 - 0.5) * np.log(0.2 / 0.5) + (0.8 - 0.5) * np.log(0.8 / 0.5)
    )
    window.clear_scores()
    assert "score" not in window.psi(profile)
    window.append(np.full((1, len(FEATURE_NAMES)), 1.0), np.full(1, 0.1))
    assert window.psi(profile)["score"] == pytest.approx(
        (1.0 - 0.5) * np.log(1.0 / 0.5) + (1e-4 - 0.5) * np.log(1e-4 / 0.5)
    )


class Raising:
    engine = "broken"

    def fraud_probability(self, features):
        raise RuntimeError("the shadow's trees are broken")


def loaded(version: str, estimator) -> registry.LoadedModel:
    ref = registry.ModelRef(
        f"models:/x/{version}", f"models:/x/{version}", "x", version, None, "run", "0.5"
    )
    return registry.LoadedModel(ref=ref, estimator=estimator, input_example=None)


def test_a_failing_shadow_changes_no_answer_and_loses_no_decision(tmp_path):
    """The shadow raises on every batch: answers equal a champion-only model's, every
    decision is recorded (without a shadow probability) and the failures are counted."""
    rng = np.random.default_rng(0)
    features = rng.random((400, len(FEATURE_NAMES)))
    estimator = HistGradientBoostingClassifier(max_iter=5).fit(features, features[:, 0] > 0.6)
    database = tmp_path / "ledger.db"
    settings = Settings(decision_log_uri=f"sqlite:///{database}")
    alone, shadowed = FraudModel(MODEL, settings), FraudModel(MODEL, settings)
    for model in (alone, shadowed):
        model.serve(loaded("1", estimator))
    shadow = ServingSlot(SHADOW, None, explains=False)
    shadow.serve(loaded("2", estimator))
    shadow.wait_for_builds(60)
    shadow._serving = dataclasses.replace(shadow.serving, scorer=Raising())
    ledger = DecisionLog(settings.decision_log_location, 0.05, 10_000, None)
    followup = FollowUp(shadowed.champion, shadow, DriftWindow(100), ledger)
    shadowed._followup = followup
    failed = metrics.SHADOW_NOT_SCORED.labels(reason="failed")
    before = failed._value.get()
    rows = transaction_payloads(generate_transactions(rows=30, seed=3))
    requests_ = [{"instances": rows[i : i + 3]} for i in range(0, 30, 3)]

    async def answers(model: FraudModel) -> list:
        return [await model.predict(await model.preprocess(r)) for r in requests_]

    expected, actual = asyncio.run(answers(alone)), asyncio.run(answers(shadowed))
    for want, got in zip(expected, actual, strict=True):
        assert [p["fraud_probability"] for p in got["predictions"]] == [
            p["fraud_probability"] for p in want["predictions"]
        ]
    followup.close()
    ledger.close()
    with sqlite3.connect(database) as connection:
        shadow_columns = connection.execute(
            "SELECT shadow_version, shadow_probability FROM decisions"
        ).fetchall()
    assert len(shadow_columns) == 30 and set(shadow_columns) == {(None, None)}
    assert failed._value.get() == before + 30


# --- the whole loop, through real processes -------------------------------------------


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """A fresh embedded store: version 1 @champion, version 2 @challenger (the documented
    `--alias challenger` path), each trained with its feature profile."""
    cwd = tmp_path_factory.mktemp("shadow-store")
    env = {"LOCAL_STORE_DIR": str(cwd / "store")}
    assert train(cwd, env, "--seed", "11").returncode == 0
    second = train(cwd, env, "--seed", "12", "--alias", "challenger")
    assert second.returncode == 0, second.stderr
    return cwd, env


def predict(url: str, rows: list[dict]) -> requests.Response:
    response = requests.post(
        f"{url}/v1/models/{MODEL}:predict", json={"instances": rows}, timeout=30
    )
    assert response.status_code == 200, response.text
    return response


def samples(url: str) -> list:
    text = requests.get(f"{url}/metrics", timeout=10).text
    return [sample for family in text_string_to_metric_families(text) for sample in family.samples]


def value(url: str, name: str, **labels: str) -> float | None:
    """The sample `name` whose labels include `labels` (None: not exported)."""
    for sample in samples(url):
        if sample.name == name and labels.items() <= sample.labels.items():
            return sample.value
    return None


def wait_for(url: str, name: str, check, timeout: float = 60, **labels: str) -> float:
    deadline = time.monotonic() + timeout
    while True:
        found = value(url, name, **labels)
        if found is not None and check(found):
            return found
        assert time.monotonic() < deadline, f"{name}{labels}: {found}"
        time.sleep(0.2)


def serves(url: str, role: str, version: str, engine: str = "numba") -> None:
    """Wait until `role` serves `version` on `engine`."""
    wait_for(url, "fraud_model_info", lambda v: v == 1, role=role, version=version, engine=engine)


def psi(url: str) -> dict[str, float]:
    return {
        sample.labels["feature"]: sample.value
        for sample in samples(url)
        if sample.name == "fraud_feature_drift_psi"
    }


def test_shadow_scoring_and_drift_on_live_traffic(store, tmp_path):
    cwd, env = store
    database = tmp_path / "decisions.db"
    common = {**env, "DECISION_LOG_FLUSH_SECONDS": "0.05"}
    shadowed = launch_predictor(
        cwd,
        env={
            **common,
            "SHADOW_MODEL_URI": f"models:/{MODEL}@challenger",
            "DECISION_LOG_URI": f"sqlite:///{database}",
            "DRIFT_WINDOW_ROWS": "2000",
            "MODEL_POLL_INTERVAL_SECONDS": "1",
        },
    )
    alone = launch_predictor(cwd, env={**common, "DECISION_LOG_URI": "none"})
    try:
        # Both answer with the champion's compiled trees (engines agree within 1e-9, and
        # the comparison is byte for byte).
        serves(shadowed.url, "shadow", "2")
        serves(shadowed.url, "champion", "1")
        serves(alone.url, "champion", "1")
        frame = generate_transactions(rows=2_000, seed=13)
        rows = transaction_payloads(frame)
        for n, row in enumerate(rows):
            row["transaction_id"] = f"t-{n}"
        for start in range(0, 2_000, 50):
            batch = rows[start : start + 50]
            assert predict(shadowed.url, batch).content == predict(alone.url, batch).content

        # Every decision carries the challenger's probability for that very row.
        _, challenger_ref = refs(cwd)
        tracking = embedded_tracking_uri(cwd / "store")
        challenger = registry.load(challenger_ref, tracking)
        expected = challenger.estimator.predict_proba(features_of(frame))[:, 1]
        recorded = wait_for_rows(database, 2_000)
        assert {row["shadow_version"] for row in recorded} == {"2"}
        by_id = {row["transaction_id"]: row for row in recorded}
        shadow_p = np.array([by_id[f"t-{n}"]["shadow_probability"] for n in range(2_000)])
        assert np.allclose(shadow_p, expected, rtol=0, atol=1e-9)
        champion_flag = np.array([by_id[f"t-{n}"]["is_fraud"] for n in range(2_000)], bool)
        challenger_threshold = float(challenger_ref.threshold_tag)
        disagreements = int(np.sum(champion_flag != (shadow_p >= challenger_threshold)))
        wait_for(shadowed.url, "fraud_shadow_scored_total", lambda v: v == 2_000)
        assert value(shadowed.url, "fraud_shadow_disagreements_total") == disagreements

        # Drift: calm on the same population, amount alone after a shifted batch.
        wait_for(shadowed.url, "fraud_drift_window_rows", lambda v: v == 2_000)
        calm = psi(shadowed.url)
        assert sorted(calm) == sorted(DRIFT_FEATURES) and max(calm.values()) < 0.1, calm
        shifted = transaction_payloads(
            amount_scaled(generate_transactions(rows=1_000, seed=14), 10)
        )
        for start in range(0, 1_000, 100):
            predict(shadowed.url, shifted[start : start + 100])
        wait_for(shadowed.url, "fraud_feature_drift_psi", lambda v: v > 0.25, feature="amount")
        drifted = psi(shadowed.url)
        assert all(drifted[name] < 0.1 for name in DRIFT_FEATURES if name != "amount"), drifted

        # Either alias reloads: the challenger moves to version 1, the champion to 2.
        assert models(cwd, env, "promote", "1", "--alias", "challenger").returncode == 0
        assert models(cwd, env, "promote", "2").returncode == 0
        deadline = time.monotonic() + 60
        while predict(shadowed.url, rows[:1]).headers["x-model-version"] != "2":
            assert time.monotonic() < deadline, shadowed.log()
            time.sleep(0.2)
        serves(shadowed.url, "shadow", "1")
        predict(shadowed.url, [{**rows[0], "transaction_id": "after-reload"}])
        after = wait_for_row(database, "after-reload")
        assert (after["model_version"], after["shadow_version"]) == ("2", "1")
    finally:
        stop(shadowed.process)
        stop(alone.process)
    assert shadowed.process.returncode == 0, shadowed.log()


def refs(cwd: Path) -> tuple[registry.ModelRef, registry.ModelRef]:
    client = registry.connect(embedded_tracking_uri(cwd / "store"))
    return (
        registry.resolve(client, f"models:/{MODEL}/1"),
        registry.resolve(client, f"models:/{MODEL}/2"),
    )


def wait_for_rows(database: Path, count: int, timeout: float = 30) -> list[dict]:
    deadline = time.monotonic() + timeout
    while True:
        if database.exists():
            with sqlite3.connect(database) as connection:
                rows = connection.execute(
                    "SELECT " + ", ".join(f'"{c}"' for c in DECISION_COLUMNS) + " FROM decisions"
                ).fetchall()
            if len(rows) >= count:
                return [dict(zip(DECISION_COLUMNS, row, strict=True)) for row in rows]
        assert time.monotonic() < deadline, f"{count} decisions not recorded"
        time.sleep(0.2)


def wait_for_row(database: Path, transaction_id: str, timeout: float = 30) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        rows = [
            row for row in wait_for_rows(database, 1) if row["transaction_id"] == transaction_id
        ]
        if rows:
            return rows[-1]
        assert time.monotonic() < deadline, f"{transaction_id} not recorded"
        time.sleep(0.2)


def test_training_stores_a_profile_the_server_reads(store):
    cwd, _ = store
    client = registry.connect(embedded_tracking_uri(cwd / "store"))
    ref = registry.resolve(client, f"models:/{MODEL}@champion")
    assert PROFILE_ARTIFACT in {a.path for a in client.list_artifacts(ref.run_id)}
    loaded_model = registry.load(ref, embedded_tracking_uri(cwd / "store"))
    assert loaded_model.profile is not None and not loaded_model.profile_note
