"""MLflow registry access: resolve a model URI to a concrete version and load it safely.

Loading does not go through `mlflow.pyfunc.load_model`: mlflow takes the skops
trusted-type list from the model's own MLmodel file, so whoever can write to the registry
could whitelist any type. Here the server's own list (`TRUSTED_TYPES`) decides, and a
model that needs anything else is refused before any of its code can run.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from mlflow.models import Model
from mlflow.protos.databricks_pb2 import (
    INVALID_PARAMETER_VALUE,
    RESOURCE_DOES_NOT_EXIST,
    ErrorCode,
)

from predictor.drift import PROFILE_ARTIFACT, Profile
from predictor.features import FEATURE_NAMES
from predictor.schema import shown
from predictor.settings import ALIAS_URI, RUN_URI, VERSION_URI

logger = logging.getLogger("predictor.registry")

THRESHOLD_TAG = "decision_threshold"
#: Types the server accepts in a skops file beyond skops' own defaults (sklearn estimators,
#: numpy arrays). HistGradientBoosting keeps its fitted trees and a bound input checker.
TRUSTED_TYPES: list[str] = [
    "functools.partial",
    "sklearn.ensemble._hist_gradient_boosting.predictor.TreePredictor",
    "sklearn.utils.validation.check_array",
]


class ModelLoadError(Exception):
    """The model cannot be served; the message says why (missing, unsafe, mismatched)."""


@dataclass(frozen=True)
class ModelRef:
    """Where a served model came from: always a concrete version, never just an alias."""

    uri: str
    download_uri: str
    name: str | None
    version: str
    alias: str | None
    run_id: str | None
    #: The decision_threshold tag (run parameter for runs:/ URIs) as the registry holds it;
    #: checked by `decision_threshold()` when the version is served.
    threshold_tag: str | None


@dataclass(frozen=True)
class LoadedModel:
    """An estimator in memory and everything needed to answer and to explain answers."""

    ref: ModelRef
    estimator: Any
    input_example: np.ndarray | None
    #: The training profile drift is measured against (None: the version has none, or an
    #: unreadable one; `profile_note` says which).
    profile: Profile | None = None
    profile_note: str = ""


def configure_client(timeout_seconds: float) -> None:
    """Bound MLflow's HTTP calls and forbid pickle in this process.

    MLflow's defaults (120 s timeout, 7 retries with backoff) stall for minutes on an
    unreachable registry; the server retries on its own schedule instead. Models are
    loaded with skops and the server's trusted types, so no MLflow code path here ever
    needs to unpickle (MLFLOW_ALLOW_PICKLE_DESERIALIZATION can still be set explicitly).
    """
    os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] = str(max(1, round(timeout_seconds)))
    os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "0"
    # A progress bar per download is noise in a server's log (and not a log line at all).
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    os.environ.setdefault("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", "false")


def connect(tracking_uri: str) -> MlflowClient:
    """A client for `tracking_uri`, also made mlflow's default.

    Some of mlflow's helpers (artifact download of `models:/` URIs) ignore the URIs they
    are given and use the process default, which is `./mlflow.db` when nothing is set.
    """
    # MLflow announces creating a new local store's tables in two INFO lines; the
    # commands say what they do themselves, once.
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)
    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_registry_uri(tracking_uri)
    return MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)


def is_missing(error: MlflowException) -> bool:
    """Whether the registry said "no such model, version or alias". MLflow answers an
    alias that the model does not have with INVALID_PARAMETER_VALUE, not
    RESOURCE_DOES_NOT_EXIST (the embedded store and the server alike)."""
    if error.error_code == ErrorCode.Name(RESOURCE_DOES_NOT_EXIST):
        return True
    message = str(error).lower()
    return (
        error.error_code == ErrorCode.Name(INVALID_PARAMETER_VALUE)
        and "alias" in message
        and "not found" in message
    )


def alias_of(model_uri: str) -> tuple[str, str] | None:
    """(name, alias) for a `models:/<name>@<alias>` URI, else None."""
    match = ALIAS_URI.match(model_uri)
    return (match["name"], match["alias"]) if match else None


def resolve(client: MlflowClient, model_uri: str) -> ModelRef:
    """Pin a model URI to one registered version (or run) with its decision threshold."""
    if match := ALIAS_URI.match(model_uri):
        version = client.get_model_version_by_alias(match["name"], match["alias"])
        return _version_ref(model_uri, version, alias=match["alias"])
    if match := VERSION_URI.match(model_uri):
        version = client.get_model_version(match["name"], match["version"])
        return _version_ref(model_uri, version, alias=None)
    if match := RUN_URI.match(model_uri):
        run = client.get_run(match["run_id"])
        threshold = run.data.params.get(THRESHOLD_TAG)
        return ModelRef(
            uri=model_uri,
            download_uri=model_uri,
            name=None,
            version=f"run-{match['run_id'][:12]}",
            alias=None,
            run_id=match["run_id"],
            threshold_tag=threshold,
        )
    raise ModelLoadError(f"unsupported model URI {model_uri!r}")


def _version_ref(model_uri: str, version: Any, alias: str | None) -> ModelRef:
    threshold = version.tags.get(THRESHOLD_TAG)
    return ModelRef(
        uri=model_uri,
        download_uri=f"models:/{version.name}/{version.version}",
        name=version.name,
        version=str(version.version),
        alias=alias,
        run_id=version.run_id,
        threshold_tag=threshold,
    )


def decision_threshold(ref: ModelRef) -> float | None:
    """The version's threshold tag as a probability; a tag that is not one refuses the
    version (nan or inf would silently turn detection off, 5 or -1 flag nothing or all)."""
    if ref.threshold_tag is None:
        return None
    try:
        value = float(ref.threshold_tag)
    except ValueError:
        value = math.nan
    if not 0.0 <= value <= 1.0:  # also false for nan
        raise ModelLoadError(
            f"{ref.download_uri} has {THRESHOLD_TAG} tag {shown(ref.threshold_tag)}; "
            "it must be a number within [0, 1]"
        )
    return value


def load(ref: ModelRef, tracking_uri: str) -> LoadedModel:
    """Download the version's artifacts to a temporary directory, load, check, discard files."""
    with tempfile.TemporaryDirectory(prefix="fraud-model-") as tmp:
        local = mlflow.artifacts.download_artifacts(
            artifact_uri=ref.download_uri,
            dst_path=tmp,
            tracking_uri=tracking_uri,
            registry_uri=tracking_uri,
        )
        loaded = load_local(ref, Path(local))
        profile, note = load_profile(ref, tracking_uri, Path(tmp) / "profile")
        return replace(loaded, profile=profile, profile_note=note)


def load_profile(ref: ModelRef, tracking_uri: str, tmp: Path) -> tuple[Profile | None, str]:
    """The version's training profile (its run's `feature_profile.json`), or None and why.

    A registry that cannot be asked raises (the load is retried); a version without a
    profile, or with one that cannot be read, serves without drift."""
    if ref.run_id is None:
        return None, "the version has no run, so no training profile"
    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    names = {entry.path for entry in client.list_artifacts(ref.run_id)}
    if PROFILE_ARTIFACT not in names:
        return None, f"its run {ref.run_id} has no {PROFILE_ARTIFACT} (trained before profiles)"
    tmp.mkdir(parents=True, exist_ok=True)
    path = mlflow.artifacts.download_artifacts(
        run_id=ref.run_id,
        artifact_path=PROFILE_ARTIFACT,
        dst_path=str(tmp),
        tracking_uri=tracking_uri,
    )
    try:
        return Profile.from_json(json.loads(Path(path).read_text(encoding="utf-8"))), ""
    except (OSError, ValueError) as error:
        return None, f"its {PROFILE_ARTIFACT} cannot be used: {error}"


def load_local(ref: ModelRef, model_dir: Path) -> LoadedModel:
    """Load an MLflow sklearn model directory with the server's trusted types, then check it."""
    try:
        mlmodel = Model.load(str(model_dir))
    except (OSError, MlflowException) as error:
        raise ModelLoadError(f"{ref.download_uri} has no readable MLmodel file: {error}") from None
    flavor = mlmodel.flavors.get("sklearn")
    if flavor is None:
        raise ModelLoadError(f"{ref.download_uri} is not a scikit-learn model")
    if flavor.get("serialization_format") != "skops":
        raise ModelLoadError(
            f"{ref.download_uri} is serialized as {flavor.get('serialization_format')!r}; "
            "only 'skops' is accepted (pickle formats can run code when loaded)"
        )
    model_file = model_dir / flavor["pickled_model"]
    # Imported here, in the loading thread: skops.io enumerates scikit-learn's estimators
    # on import (~0.7 s), which would delay every worker process's start-up.
    import skops.io

    untrusted = [t for t in skops.io.get_untrusted_types(file=model_file) if t not in TRUSTED_TYPES]
    if untrusted:
        raise ModelLoadError(
            f"{ref.download_uri} contains types the server does not trust: {', '.join(untrusted)}"
        )
    estimator = skops.io.load(model_file, trusted=TRUSTED_TYPES)
    check_signature(mlmodel)
    example = _input_example(mlmodel, model_dir)
    if example is not None:
        try:
            probabilities = estimator.predict_proba(example)
        except Exception as error:  # the model's own code failed on its own example
            raise ModelLoadError(
                f"{ref.download_uri} failed to predict its input example: {error}"
            ) from None
        if probabilities.shape != (len(example), 2) or not are_probabilities(probabilities):
            raise ModelLoadError(
                f"{ref.download_uri} returned {probabilities.shape} probabilities for "
                f"{len(example)} example rows; expected ({len(example)}, 2), all finite "
                "and within [0, 1]"
            )
    return LoadedModel(ref=ref, estimator=estimator, input_example=example)


def are_probabilities(values: np.ndarray) -> bool:
    """Every value finite and within [0, 1] (NaN fails both comparisons)."""
    return bool(((values >= 0.0) & (values <= 1.0)).all())


def check_signature(mlmodel: Model) -> None:
    """The model's input signature must be exactly the feature frame this server builds."""
    if mlmodel.signature is None:
        raise ModelLoadError("the model has no signature; log it with the feature frame schema")
    expected = [(name, "double") for name in FEATURE_NAMES]
    actual = [
        (spec.name, getattr(spec.type, "name", str(spec.type)))
        for spec in mlmodel.signature.inputs.inputs
    ]
    if actual != expected:
        missing = [f"{n}:{t}" for n, t in expected if (n, t) not in actual]
        unexpected = [f"{n}:{t}" for n, t in actual if (n, t) not in expected]
        detail = []
        if missing:
            detail.append(f"missing {', '.join(missing)}")
        if unexpected:
            detail.append(f"unexpected {', '.join(unexpected)}")
        if not detail:
            detail.append("same columns in a different order")
        raise ModelLoadError(
            "model signature does not match the server's features: " + "; ".join(detail)
        )


def _input_example(mlmodel: Model, model_dir: Path) -> np.ndarray | None:
    """The version's logged input example as the feature matrix, if it logged one."""
    if mlmodel.saved_input_example_info is None:
        return None
    example = mlmodel.load_input_example(str(model_dir))
    try:
        if hasattr(example, "columns"):
            return example[list(FEATURE_NAMES)].to_numpy(dtype=np.float64)
        return np.asarray(example, dtype=np.float64)
    except (KeyError, ValueError, TypeError) as error:
        raise ModelLoadError(f"the input example does not fit the features: {error}") from None
