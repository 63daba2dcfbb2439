"""Compiled inference: the registered trees compiled by treelite, and scored by numba, agree
with scikit-learn before they serve; the numba kernels take every batch once they are built,
treelite small batches until then, and anything else falls back to scikit-learn."""

from __future__ import annotations

import functools
import threading
import time

import numpy as np
import pytest
import requests
from sklearn.ensemble import HistGradientBoostingClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from support import ORDINARY, SUSPICIOUS

import predictor.engine as engine
import predictor.serving as serving_module
from predictor import registry
from predictor.data import generate_transactions, to_columns
from predictor.engine import (
    COMPILED_MAX_ROWS,
    MASKS_MAX_ROWS,
    MASKS_MIN_ROWS,
    NUMBA,
    SKLEARN,
    TREELITE,
    build_scorer,
    compile_trees,
    native_trees,
    with_native_trees,
)
from predictor.features import build_features
from predictor.model import FraudModel
from predictor.schema import validate_rows
from predictor.serving import agreement_rows
from predictor.settings import Settings


@functools.cache
def generated_features() -> np.ndarray:
    """2,000 realistic transactions (10 % fraud patterns) as features."""
    frame = generate_transactions(rows=2_000, fraud_rate=0.1, seed=20261127)
    return build_features(to_columns(frame))


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
    scorer, _ = build_scorer(registered.estimator, 0.5, generated_features())
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
        scorer, reason = build_scorer(estimator, 0.5, generated_features())
        assert scorer.engine == SKLEARN and reason.startswith("cannot be compiled")
        assert np.array_equal(
            scorer.fraud_probability(features[:3]), estimator.predict_proba(features[:3])[:, 1]
        )


def test_compiled_trees_that_disagree_are_not_used(registered):
    """The agreement rule itself: with no difference allowed below zero, even identical
    probabilities fail it, and scikit-learn serves."""
    scorer, reason = build_scorer(registered.estimator, 0.5, generated_features(), tolerance=-1.0)
    assert scorer.engine == SKLEARN
    assert "differ from scikit-learn's" in reason and "2000 rows" in reason


def test_the_server_reports_its_engine_and_scores_like_scikit_learn(served, registered):
    """treelite from the start, numba once it is built (in the background)."""
    deadline = time.monotonic() + 60
    platform = None
    while platform != f"mlflow_sklearn/{NUMBA}" and time.monotonic() < deadline:
        metadata = requests.get(f"{served.url}/v2/models/fraud-detector", timeout=10).json()
        platform = metadata["platform"]
        assert platform in (f"mlflow_sklearn/{TREELITE}", f"mlflow_sklearn/{NUMBA}")
        time.sleep(0.2)
    assert platform == f"mlflow_sklearn/{NUMBA}"
    metrics = requests.get(f"{served.url}/metrics", timeout=10).text
    info = [line for line in metrics.splitlines() if line.startswith("fraud_model_info{")]
    assert any('engine="numba"' in line and line.endswith(" 1.0") for line in info), info
    assert any('engine="treelite"' in line and line.endswith(" 0.0") for line in info), info
    transactions = [ORDINARY, SUSPICIOUS]
    answer = requests.post(
        f"{served.url}/v1/models/fraud-detector:predict",
        json={"instances": transactions},
        timeout=10,
    ).json()
    expected = registered.estimator.predict_proba(build_features(validate_rows(transactions)))[:, 1]
    served_probabilities = [p["fraud_probability"] for p in answer["predictions"]]
    assert np.max(np.abs(np.array(served_probabilities) - expected)) <= 1e-9


def test_the_native_walk_agrees_with_scikit_learn_on_every_batch_size(registered, champion):
    scorer, reason = build_scorer(
        registered.estimator, champion.threshold, agreement_rows(registered)
    )
    native, reason = with_native_trees(scorer, champion.threshold, agreement_rows(registered))
    assert reason is None and native.engine == NUMBA
    rows = generated_features()
    sizes = (*range(1, 2 * MASKS_MIN_ROWS + 10), COMPILED_MAX_ROWS + 1, 100, 500, len(rows))
    for size in sizes:  # both kernels, and every remainder of the padded one
        expected = registered.estimator.predict_proba(rows[:size])[:, 1]
        actual = native.fraud_probability(rows[:size])
        assert np.max(np.abs(actual - expected)) <= 1e-9, size
        assert np.array_equal(actual >= champion.threshold, expected >= champion.threshold)


def test_the_native_walk_sends_missing_values_where_each_tree_learned_to():
    """The server never sends NaN (the schema refuses it), but the walk must read a tree as
    scikit-learn does: trained with gaps, both directions occur."""
    rng = np.random.default_rng(3)
    features = rng.random((2000, 4))
    labels = (features[:, 0] + rng.normal(0, 0.1, 2000) > 0.5).astype(int)
    features[rng.random(features.shape) < 0.2] = np.nan
    estimator = HistGradientBoostingClassifier(max_iter=30, random_state=0).fit(features, labels)
    directions = np.concatenate(
        [
            p[0].nodes["missing_go_to_left"][~p[0].nodes["is_leaf"].astype(bool)]
            for p in estimator._predictors
        ]
    )
    assert directions.min() == 0 and directions.max() == 1
    walk = native_trees(estimator)
    expected = estimator.predict_proba(features)[:, 1]
    assert np.max(np.abs(walk(features) - expected)) <= 1e-12
    one_by_one = np.concatenate([walk(features[i : i + 1]) for i in range(200)])
    assert np.max(np.abs(one_by_one - expected[:200])) <= 1e-12
    with pytest.raises(ValueError, match="expected 4 feature columns"):
        walk(features[:, :3])


@pytest.mark.parametrize(
    ("leaves", "features_used"),
    [(2, 10), (64, 10), (65, 10), (200, 10), (31, 1)],
    ids=["stumps", "64-leaf trees", "65 leaves: walked only", "200 leaves", "one feature"],
)
def test_every_tree_shape_is_scored_like_scikit_learn_by_the_kernel_meant_for_it(
    leaves, features_used, monkeypatch: pytest.MonkeyPatch
):
    """Batches from MASKS_MIN_ROWS rows are scored by leaf elimination (in slices of at most
    MASKS_MAX_ROWS) when every tree has at most 64 leaves; smaller batches and bigger trees
    are walked. Whichever kernel scores, the probabilities are scikit-learn's to the bit."""
    calls: list[tuple[str, int]] = []

    def recorded(name: str, build):
        def build_recording():
            kernel = build()

            def record(rows, *arrays):
                calls.append((name, len(rows)))
                return kernel(rows, *arrays)

            return record

        return build_recording

    monkeypatch.setattr(engine, "_tree_walk", recorded("walk", engine._tree_walk))
    monkeypatch.setattr(engine, "_leaf_elimination", recorded("masks", engine._leaf_elimination))
    rng = np.random.default_rng(leaves)
    features = rng.random((3000, 10))
    features[:, features_used:] = 0.5  # constant columns: never split on
    labels = (features[:, 0] + rng.normal(0, 0.2, 3000) > 0.5).astype(int)
    estimator = HistGradientBoostingClassifier(
        max_iter=15, max_leaf_nodes=leaves, min_samples_leaf=2, random_state=0
    ).fit(features, labels)
    most_leaves = max(int(p[0].nodes["is_leaf"].sum()) for p in estimator._predictors)
    assert most_leaves == leaves or (leaves == 65 and most_leaves > 64)
    native = native_trees(estimator)
    expected = estimator.predict_proba(features)[:, 1]
    for size in (1, MASKS_MIN_ROWS - 1, MASKS_MIN_ROWS, 9, 100, len(features)):
        calls.clear()
        actual = np.concatenate(
            [native(features[i : i + size]) for i in range(0, 400 if size < 100 else 3000, size)]
        )
        assert np.array_equal(actual, expected[: len(actual)]), size
        if size < MASKS_MIN_ROWS or most_leaves > 64:
            assert {name for name, _ in calls} == {"walk"}, size
        else:
            assert {name for name, _ in calls} == {"masks"}, size
            assert max(rows for _, rows in calls) == min(size, MASKS_MAX_ROWS), size


def test_models_the_native_walk_does_not_know_keep_their_engine():
    rng = np.random.default_rng(0)
    features = rng.random((300, 10))  # as many as the server's features
    labels = (features[:, 0] > 0.5).astype(int)
    categorical = features.copy()
    categorical[:, 2] = rng.integers(0, 4, 300)
    for estimator, why in (
        (LogisticRegression().fit(features, labels), "only binary HistGradientBoosting"),
        (
            HistGradientBoostingClassifier(max_iter=5).fit(features, rng.integers(0, 3, 300)),
            "only binary HistGradientBoosting",
        ),
        (
            HistGradientBoostingClassifier(max_iter=5, categorical_features=[2]).fit(
                categorical, (categorical[:, 2] == 1).astype(int)
            ),
            "categorical",
        ),
        (
            make_pipeline(StandardScaler(), HistGradientBoostingClassifier(max_iter=5)).fit(
                features, labels
            ),
            "transforms the features",
        ),
    ):
        scorer, _ = build_scorer(estimator, 0.5, generated_features())
        kept, reason = with_native_trees(scorer, 0.5, generated_features())
        assert kept is scorer and reason.startswith("cannot be compiled natively"), reason
        assert why in reason


def test_a_native_walk_that_disagrees_is_not_used(registered):
    scorer, _ = build_scorer(registered.estimator, 0.5, generated_features())
    kept, reason = with_native_trees(scorer, 0.5, generated_features(), tolerance=-1.0)
    assert kept is scorer and kept.engine == TREELITE
    assert "native trees differ from scikit-learn's" in reason


def test_a_late_native_build_never_brings_back_a_replaced_version(
    registered, monkeypatch: pytest.MonkeyPatch
):
    """Version 1's walk finishes after version 2 is served (whose own walk is refused, so
    nothing overwrites a wrongly restored version 1): version 2 keeps serving."""
    release = threading.Event()
    original = serving_module.with_native_trees

    def slow_for_one_refused_for_two(scorer, threshold, example, *args):
        if threshold == 0.32:
            return scorer, "refused for this test"
        assert release.wait(30)
        return original(scorer, threshold, example, *args)

    monkeypatch.setattr(serving_module, "with_native_trees", slow_for_one_refused_for_two)
    model = FraudModel("fraud", Settings())

    def loaded(version: str, threshold: str) -> registry.LoadedModel:
        ref = registry.ModelRef(
            "models:/x@live", f"models:/x/{version}", "x", version, "live", "run", threshold
        )
        return registry.LoadedModel(ref=ref, estimator=registered.estimator, input_example=None)

    try:
        model.serve(loaded("1", "0.31"))
        model.serve(loaded("2", "0.32"))
    finally:
        release.set()
    model.champion.wait_for_builds(60)  # both builds are done
    assert model.serving.version == "2" and model.serving.scorer.engine == TREELITE


def test_without_numba_the_version_stays_on_treelite(registered, monkeypatch: pytest.MonkeyPatch):
    """The serving install without the `native` extra: treelite and scikit-learn serve."""

    def no_numba():
        raise ModuleNotFoundError("No module named 'numba'")

    monkeypatch.setattr(engine, "_tree_walk", no_numba)
    scorer, _ = build_scorer(registered.estimator, 0.5, generated_features())
    kept, reason = with_native_trees(scorer, 0.5, generated_features())
    assert kept is scorer and kept.engine == TREELITE
    assert reason == "cannot be compiled natively: ModuleNotFoundError: No module named 'numba'"


def test_a_model_whose_categorical_columns_are_reordered_is_not_walked():
    rng = np.random.default_rng(1)
    features = rng.random((300, 10))
    features[:, 9] = rng.integers(0, 3, 300)
    labels = (features[:, 0] > 0.5).astype(int)  # learned from a numeric column only
    estimator = HistGradientBoostingClassifier(max_iter=5, categorical_features=[9])
    with pytest.raises(ValueError, match="reorders its categorical features"):
        native_trees(estimator.fit(features, labels))
