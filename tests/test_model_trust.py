"""A version is checked before it serves, and what it answers is checked before a client
sees it: threshold tags, serialization format, skops types, output ranges."""

from __future__ import annotations

import asyncio
import logging
import os

import mlflow
import numpy as np
import pytest
from kserve.errors import InferenceError
from mlflow.models import infer_signature
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import FunctionTransformer
from support import ORDINARY as GOOD
from support import register_quick_model

from predictor import metrics, registry
from predictor.features import build_features, feature_frame
from predictor.lifecycle import ModelWatcher
from predictor.model import FraudModel
from predictor.schema import validate_rows
from predictor.settings import Settings


def ref(tag: str | None = "0.5", version: str = "3") -> registry.ModelRef:
    return registry.ModelRef(
        uri="models:/fraud@live",
        download_uri=f"models:/fraud/{version}",
        name="fraud",
        version=version,
        alias="live",
        run_id="abc",
        threshold_tag=tag,
    )


@pytest.mark.parametrize("tag", ["nan", "NaN", "inf", "-inf", "5", "-1", "1.0001", "abc", ""])
def test_threshold_tag_that_is_not_a_probability_refuses_the_version(tag):
    with pytest.raises(registry.ModelLoadError, match=r"must be a number within \[0, 1\]"):
        registry.decision_threshold(ref(tag))


@pytest.mark.parametrize(("tag", "value"), [("0", 0.0), ("0.37", 0.37), ("1", 1.0), (None, None)])
def test_threshold_tag_within_zero_and_one_is_used(tag, value):
    assert registry.decision_threshold(ref(tag)) == value


def failures() -> float:
    loads = metrics.MODEL_LOADS.labels(role="champion", kind="initial", outcome="failure")
    return loads._value.get()


def registry_errors() -> float:
    loads = metrics.MODEL_LOADS.labels(role="champion", kind="initial", outcome="registry_error")
    return loads._value.get()


def test_non_numeric_threshold_tag_is_a_failed_version_not_a_registry_error(mlflow_server, caplog):
    """The version is refused and counted as a failure; the registry itself answered."""
    name = "fraud-bad-threshold"
    result = register_quick_model(mlflow_server.url, name, seed=5)
    client = registry.connect(mlflow_server.url)
    client.set_model_version_tag(name, result.version, registry.THRESHOLD_TAG, "off")
    model = FraudModel(
        name,
        Settings(mlflow_tracking_uri=mlflow_server.url, model_uri=f"models:/{name}@live"),
    )
    # One look, by hand.
    watcher = ModelWatcher(model.champion, model.settings.model_uri, model.settings, False)
    before_failures, before_registry = failures(), registry_errors()
    with caplog.at_level(logging.ERROR, logger="predictor.lifecycle"):
        watcher.check_once()
    assert model.serving is None and not model.ready
    assert failures() == before_failures + 1
    assert registry_errors() == before_registry
    assert "decision_threshold tag 'off'; it must be a number within [0, 1]" in caplog.text


def save(model_dir, estimator, **kwargs):
    frame = feature_frame(build_features(validate_rows([GOOD] * 4)))
    mlflow.sklearn.save_model(
        estimator,
        str(model_dir),
        signature=infer_signature(frame),
        pip_requirements=["scikit-learn"],
        **kwargs,
    )
    return frame


def fitted_logistic_regression() -> LogisticRegression:
    rng = np.random.default_rng(0)
    features = rng.random((50, 10))
    return LogisticRegression().fit(features, (features[:, 0] > 0.5).astype(int))


def test_pickle_formats_are_refused_before_anything_is_unpickled(tmp_path):
    save(tmp_path / "m", fitted_logistic_regression(), serialization_format="cloudpickle")
    with pytest.raises(registry.ModelLoadError, match="only 'skops' is accepted"):
        registry.load_local(ref(), tmp_path / "m")


def test_skops_types_the_server_does_not_trust_are_refused(tmp_path):
    """The MLmodel file may list the type as trusted; the server's own list decides."""
    pipeline = make_pipeline(FunctionTransformer(os.getcwd), fitted_logistic_regression())
    save(
        tmp_path / "m",
        pipeline,
        serialization_format="skops",
        skops_trusted_types=["posix.getcwd"],
    )
    with pytest.raises(registry.ModelLoadError, match="types the server does not trust: posix"):
        registry.load_local(ref(), tmp_path / "m")


def corrupted_classifier() -> LogisticRegression:
    """A real estimator whose parameters went bad: every probability is NaN."""
    estimator = fitted_logistic_regression()
    estimator.coef_[:] = np.nan
    return estimator


def test_version_whose_example_scores_are_not_probabilities_is_refused(tmp_path):
    estimator = corrupted_classifier()
    frame = save(tmp_path / "m", fitted_logistic_regression(), serialization_format="skops")
    save(tmp_path / "bad", estimator, serialization_format="skops", input_example=frame)
    with pytest.raises(registry.ModelLoadError, match=r"all finite and within \[0, 1\]"):
        registry.load_local(ref(), tmp_path / "bad")


def test_live_scores_that_are_not_probabilities_are_refused_and_counted():
    model = FraudModel("fraud", Settings(decision_threshold=0.5))
    model.serve(
        registry.LoadedModel(ref=ref(), estimator=corrupted_classifier(), input_example=None)
    )
    batch = asyncio.run(model.preprocess({"instances": [GOOD, GOOD]}))
    counted = metrics.INVALID_OUTPUTS.labels(version="3")._value.get()
    rows = metrics.REQUEST_ROWS._sum.get()
    with pytest.raises(InferenceError, match="model version 3 returned scores that are not"):
        asyncio.run(model.predict(batch))
    assert metrics.INVALID_OUTPUTS.labels(version="3")._value.get() == counted + 1
    assert metrics.REQUEST_ROWS._sum.get() == rows  # nothing observed from the bad scores
