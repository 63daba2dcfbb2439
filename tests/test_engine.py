"""Compiled inference: the registered trees compiled by treelite agree with scikit-learn
before they serve, small batches take them, and anything else falls back to scikit-learn."""

from __future__ import annotations

import numpy as np
import pytest
import requests
from sklearn.ensemble import HistGradientBoostingClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from support import ORDINARY, SUSPICIOUS

from predictor import registry
from predictor.engine import (
    COMPILED_MAX_ROWS,
    SKLEARN,
    TREELITE,
    build_scorer,
    compile_trees,
    generated_features,
)
from predictor.features import build_features
from predictor.schema import validate_transactions


@pytest.fixture(scope="module")
def registered(mlflow_server, champion) -> registry.LoadedModel:
    """The champion as the server loads it (skops, trusted types, checks)."""
    ref = registry.resolve(registry.connect(mlflow_server.url), "models:/fraud-detector@champion")
    return registry.load(ref, mlflow_server.url)


def test_the_registered_model_is_compiled_and_agrees_with_scikit_learn(registered, champion):
    scorer, reason = build_scorer(
        registered.estimator, champion.threshold, registered.input_example
    )
    assert reason is None and scorer.engine == TREELITE
    rows = generated_features()
    for size in (1, 7, COMPILED_MAX_ROWS, COMPILED_MAX_ROWS + 1, 500):
        features = rows[:size]
        expected = registered.estimator.predict_proba(features)[:, 1]
        actual = scorer.fraud_probability(features)
        assert np.max(np.abs(actual - expected)) <= 1e-9, size
        assert np.array_equal(actual >= champion.threshold, expected >= champion.threshold)


def test_small_batches_take_the_compiled_trees_and_large_ones_scikit_learn(registered):
    scorer, _ = build_scorer(registered.estimator, 0.5, None)
    compiled = compile_trees(registered.estimator)
    small = generated_features()[:COMPILED_MAX_ROWS]
    large = generated_features()[: COMPILED_MAX_ROWS + 1]
    assert np.array_equal(scorer.fraud_probability(small), compiled(small))  # bit for bit
    assert np.array_equal(
        scorer.fraud_probability(large), registered.estimator.predict_proba(large)[:, 1]
    )


def test_a_model_treelite_cannot_compile_is_scored_by_scikit_learn():
    rng = np.random.default_rng(0)
    features = rng.random((200, 10))
    labels = (features[:, 0] > 0.5).astype(int)
    for estimator in (
        LogisticRegression().fit(features, labels),
        make_pipeline(StandardScaler(), HistGradientBoostingClassifier(max_iter=5)).fit(
            features, labels
        ),
    ):
        scorer, reason = build_scorer(estimator, 0.5, None)
        assert scorer.engine == SKLEARN and reason.startswith("cannot be compiled")
        assert np.array_equal(
            scorer.fraud_probability(features[:3]), estimator.predict_proba(features[:3])[:, 1]
        )


def test_compiled_trees_that_disagree_are_not_used(registered):
    """The agreement rule itself: with no difference allowed below zero, even identical
    probabilities fail it, and scikit-learn serves."""
    scorer, reason = build_scorer(registered.estimator, 0.5, None, tolerance=-1.0)
    assert scorer.engine == SKLEARN
    assert "differ from scikit-learn's" in reason and "2000 rows" in reason


def test_the_server_reports_its_engine_and_scores_like_scikit_learn(served, registered):
    metadata = requests.get(f"{served.url}/v2/models/fraud-detector", timeout=10).json()
    assert metadata["platform"] == "mlflow_sklearn/treelite"
    metrics = requests.get(f"{served.url}/metrics", timeout=10).text
    assert 'engine="treelite"' in metrics.split("fraud_model_info{", 1)[1].split("}", 1)[0]
    transactions = [ORDINARY, SUSPICIOUS]
    answer = requests.post(
        f"{served.url}/v1/models/fraud-detector:predict",
        json={"instances": transactions},
        timeout=10,
    ).json()
    expected = registered.estimator.predict_proba(
        build_features(validate_transactions(transactions))
    )[:, 1]
    served_probabilities = [p["fraud_probability"] for p in answer["predictions"]]
    assert np.max(np.abs(np.array(served_probabilities) - expected)) <= 1e-9
