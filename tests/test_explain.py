"""Reason codes over `POST /v1/models/<name>:explain`: exact, additive, in the client's
fields, from the version that scored the row, and as strict about input as predict."""

from __future__ import annotations

import asyncio
import math
import threading
import time

import mlflow
import numpy as np
import pytest
import requests
from sklearn.ensemble import HistGradientBoostingClassifier
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from support import SUSPICIOUS, register_quick_model
from test_serving import BAD_INPUTS, V1

from predictor import registry
from predictor.explain import TOP_REASONS
from predictor.features import build_features
from predictor.model import FraudModel
from predictor.schema import FIELD_ORDER, validate_rows
from predictor.settings import Settings

MODEL = "fraud-detector"
#: The generator's fraud patterns (predictor/data.py) and the client fields they live in.
RISKY_FIELDS = {
    "timestamp",
    "card_present",
    "amount",
    "distance_from_home_km",
    "transactions_last_24h",
    "merchant_category",
    "account_age_days",
}


def explain(url: str, instances: list, model: str = MODEL) -> requests.Response:
    return requests.post(
        f"{url}/v1/models/{model}:explain", json={"instances": instances}, timeout=60
    )


def explained(url: str, instances: list) -> dict:
    response = explain(url, instances)
    assert response.status_code == 200, response.text
    return response.json()


def test_contributions_add_up_to_the_registered_models_own_raw_score(
    served, mlflow_server, champion, example_transactions
):
    rows = example_transactions[:40]
    body = explained(served.url, rows)
    registry.connect(mlflow_server.url)
    independent = mlflow.sklearn.load_model(f"models:/{MODEL}/{champion.version}")
    raw = independent.decision_function(build_features(validate_rows(rows)))
    predicted = requests.post(
        f"{served.url}/v1/models/{MODEL}:predict", json={"instances": rows}, timeout=30
    ).json()["predictions"]
    assert body["model_version"] == champion.version
    for explanation, score, prediction in zip(body["explanations"], raw, predicted, strict=True):
        contributions = explanation["contributions"]
        assert list(contributions) == sorted(contributions, key=contributions.get, reverse=True)
        assert set(contributions) == set(FIELD_ORDER)
        total = explanation["base_value"] + sum(contributions.values())
        assert total == pytest.approx(score, abs=1e-9)
        probability = explanation["fraud_probability"]
        assert probability == pytest.approx(prediction["fraud_probability"], abs=1e-12)
        assert explanation["is_fraud"] == prediction["is_fraud"]
        assert total == pytest.approx(math.log(probability / (1 - probability)), abs=1e-6)


def test_the_suspicious_transaction_is_explained_by_a_risky_field(served):
    (explanation,) = explained(served.url, [SUSPICIOUS])["explanations"]
    assert explanation["is_fraud"] is True
    reasons = explanation["reasons"]
    assert 1 <= len(reasons) <= TOP_REASONS
    assert reasons[0]["field"] in RISKY_FIELDS
    assert all(reason["value"] == SUSPICIOUS[reason["field"]] for reason in reasons)
    assert [r["contribution"] for r in reasons] == sorted(
        (r["contribution"] for r in reasons), reverse=True
    )
    assert all(r["contribution"] > 0 for r in reasons)


def test_values_are_quoted_as_sent_for_list_rows_and_objects(served):
    as_list = [SUSPICIOUS[field] for field in FIELD_ORDER]
    first, second = explained(served.url, [SUSPICIOUS, as_list])["explanations"]
    assert first == second
    assert {r["field"]: r["value"] for r in first["reasons"]}.items() <= SUSPICIOUS.items()


@pytest.mark.parametrize("case", [c for c, v in BAD_INPUTS.items() if v[0] == V1])
def test_bad_input_gets_the_same_answer_over_explain_as_over_predict(served, case):
    _, body, status, _ = BAD_INPUTS[case]
    model = "no-such-model" if "unknown model" in case else MODEL
    answers = []
    for verb in ("predict", "explain"):
        url = f"{served.url}/v1/models/{model}:{verb}"
        if isinstance(body, bytes):
            response = requests.post(
                url, data=body, headers={"content-type": "application/json"}, timeout=30
            )
        elif isinstance(body, str):
            response = requests.post(
                url,
                data=body,
                headers={"content-type": "application/x-www-form-urlencoded"},
                timeout=30,
            )
        else:
            response = requests.post(url, json=body, timeout=30)
        answers.append((response.status_code, response.json()))
    assert answers[0] == answers[1]
    assert answers[0][0] == status


def test_explain_has_its_own_lower_row_limit_and_counts_what_it_explains(served):
    refused = explain(served.url, [SUSPICIOUS] * 101)
    assert refused.status_code == 400
    assert "101 rows exceed the explain limit of 100 (MAX_EXPLAIN_ROWS)" in refused.text

    def explained_count() -> float:
        text = requests.get(f"{served.url}/metrics", timeout=10).text
        for line in text.splitlines():
            if line.startswith("fraud_explained_transactions_total "):
                return float(line.split()[1])
        return 0.0

    before = explained_count()
    explained(served.url, [SUSPICIOUS] * 3)
    assert explained_count() == before + 3
    assert "request_explain_seconds_count" in requests.get(f"{served.url}/metrics").text


def test_a_hot_reload_changes_the_explanations_version_with_it(start_predictor, mlflow_server):
    name = "fraud-explain-reload"
    first = register_quick_model(mlflow_server.url, name, seed=8)
    predictor = start_predictor(
        env={
            "MLFLOW_TRACKING_URI": mlflow_server.url,
            "MODEL_URI": f"models:/{name}@live",
            "MODEL_POLL_INTERVAL_SECONDS": "1",
        }
    )
    before = explained(predictor.url, [SUSPICIOUS])
    assert before["model_version"] == first.version
    second = register_quick_model(mlflow_server.url, name, seed=9)
    deadline = time.monotonic() + 60
    after = before
    while after["model_version"] != second.version and time.monotonic() < deadline:
        time.sleep(0.3)
        after = explained(predictor.url, [SUSPICIOUS])
    assert after["model_version"] == second.version
    assert after["explanations"][0]["model_version"] == second.version
    assert after["explanations"][0]["base_value"] != before["explanations"][0]["base_value"]
    assert f"explainer for version {second.version} ready" in predictor.log()


def test_a_version_the_explainer_cannot_walk_still_predicts_and_explain_says_why():
    rng = np.random.default_rng(0)
    features = rng.random((300, 10))
    labels = (features[:, 0] > 0.7).astype(int)
    estimator = make_pipeline(StandardScaler(), HistGradientBoostingClassifier(max_iter=5))
    estimator.fit(features, labels)
    ref = registry.ModelRef("models:/x@live", "models:/x/4", "x", "4", "live", "run", "0.5")
    model = FraudModel("fraud", Settings())
    model.serve(registry.LoadedModel(ref=ref, estimator=estimator, input_example=None))
    batch = asyncio.run(model.preprocess({"instances": [SUSPICIOUS]}))
    scored = asyncio.run(model.predict(batch))
    assert scored["model_version"] == "4"
    with pytest.raises(NotImplementedError, match="version 4 cannot be explained: the pipeline"):
        asyncio.run(model.explain(batch))


def test_serving_does_not_wait_for_the_explainer_and_explain_waits_for_its_own_version(
    monkeypatch: pytest.MonkeyPatch,
):
    """The explainer is built after the swap (the first build imports shap, ~0.4 s):
    predictions answer at once, an explanation waits for its version's explainer."""
    import predictor.serving as model_module

    building = threading.Event()
    release = threading.Event()

    class SlowExplainer(model_module.Explainer):
        def __init__(self, estimator):
            building.set()
            assert release.wait(30)
            super().__init__(estimator)

    monkeypatch.setattr(model_module, "Explainer", SlowExplainer)
    rng = np.random.default_rng(0)
    features = rng.random((300, 10))
    estimator = HistGradientBoostingClassifier(max_iter=5).fit(features, features[:, 0] > 0.7)
    ref = registry.ModelRef("models:/x@live", "models:/x/5", "x", "5", "live", "run", "0.5")
    model = FraudModel("fraud", Settings())
    model.serve(registry.LoadedModel(ref=ref, estimator=estimator, input_example=None))
    assert model.ready and building.wait(30)
    batch = asyncio.run(model.preprocess({"instances": [SUSPICIOUS]}))

    async def predict_then_explain() -> tuple[dict, dict]:
        scored = await model.predict(batch)
        explaining = asyncio.ensure_future(model.explain(batch))
        await asyncio.sleep(0.2)
        assert not explaining.done()  # waiting for version 5's explainer, off the loop
        release.set()
        return scored, await asyncio.wait_for(explaining, 30)

    try:
        scored, explained = asyncio.run(predict_then_explain())
    finally:
        release.set()  # never leave the shared explainer thread blocked
    assert scored["model_version"] == explained["model_version"] == "5"
    assert explained["explanations"][0]["fraud_probability"] == pytest.approx(
        scored["predictions"][0]["fraud_probability"], abs=1e-12
    )
