"""Logging a run to MLflow, registering the version and moving the alias if it wins.

Champion/challenger: the new version is always registered; the alias moves to it only if
its PR-AUC on this run's test split is higher than the current alias holder's PR-AUC on
the same rows, or with `--force`. The embedded store's demo model is bootstrapped here.
"""

from __future__ import annotations

import io
import logging
import os
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager, redirect_stderr
from dataclasses import asdict
from importlib.metadata import version as package_version

from predictor import registry
from predictor.bootstrap import demo_target
from predictor.data import LABEL
from predictor.drift import PROFILE_ARTIFACT, build_profile
from predictor.features import feature_frame
from predictor.settings import Settings, embedded_artifact_location
from predictor.store import redacted
from predictor.training.config import Log, Splits, TrainingConfig, TrainingResult, step
from predictor.training.fit import (
    choose_threshold,
    close_figure,
    evaluate,
    fit,
    load_dataset,
    plots,
    split,
)


def pip_requirements() -> list[str]:
    """Explicit requirements: what loading the model needs (and no slow inference of them)."""
    return [
        f"{name}=={package_version(name)}" for name in ("scikit-learn", "skops", "numpy", "scipy")
    ]


def _experiment_id(client, name: str, artifact_location: str | None) -> str:
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    return client.create_experiment(name, artifact_location=artifact_location)


def _champion_pr_auc(client, config: TrainingConfig, tracking_uri: str, splits: Splits, log: Log):
    """(version, PR-AUC on our test rows) of the current alias holder, or (None, None)."""
    from mlflow.exceptions import MlflowException
    from sklearn.metrics import average_precision_score

    uri = f"models:/{config.model_name}@{config.alias}"
    try:
        ref = registry.resolve(client, uri)
    except MlflowException as error:
        if registry.is_missing(error):
            return None, None
        raise
    try:
        champion = registry.load(ref, tracking_uri)
    except registry.ModelLoadError as error:
        log(f"current {config.alias} (version {ref.version}) cannot be loaded: {error}")
        return ref.version, None
    scores = champion.estimator.predict_proba(splits.x_test)[:, 1]
    return ref.version, float(average_precision_score(splits.y_test, scores))


def train_and_register(
    config: TrainingConfig,
    tracking_uri: str,
    artifact_location: str | None = None,
    log: Log = print,
) -> TrainingResult:
    """Run the whole training flow; bad data raises InvalidDataset before MLflow is touched."""
    with step(log, "loading data"):
        frame = load_dataset(config)
        splits = split(frame, config)
    log(
        f"{len(frame)} transactions, fraud rate {frame[LABEL].mean():.2%}; "
        f"train/validation/test = {len(splits.y_train)}/{len(splits.y_val)}/{len(splits.y_test)}"
    )
    with step(log, "fitting the classifier"):
        model = fit(splits, config)
    threshold = choose_threshold(splits.y_val, model.predict_proba(splits.x_val)[:, 1])
    test_scores = model.predict_proba(splits.x_test)[:, 1]
    metrics = evaluate(splits.y_test, test_scores, threshold)
    log("test: " + ", ".join(f"{k}={v:.4f}" for k, v in metrics.items()))

    import mlflow
    from mlflow.models import infer_signature

    client = registry.connect(tracking_uri)
    experiment_id = _experiment_id(client, config.experiment, artifact_location)
    with step(log, "scoring the current champion on the same test rows"):
        champion_version, champion_pr_auc = _champion_pr_auc(
            client, config, tracking_uri, splits, log
        )

    example = feature_frame(splits.x_test[:5])
    signature = infer_signature(example, model.predict_proba(example.to_numpy()))
    params = {k: v for k, v in asdict(config).items() if v is not None}
    if config.ledger is not None:  # the data's source, never its credentials
        params["ledger"] = redacted(config.ledger)
    with (
        step(log, "logging the run and registering the model"),
        # MLflow prints two links when a run on a server ends; the line below names the run.
        _environment(MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT="true"),
        mlflow.start_run(experiment_id=experiment_id) as run,
    ):
        mlflow.log_params({**params, registry.THRESHOLD_TAG: threshold})
        mlflow.log_metrics({f"test_{k}": v for k, v in metrics.items()})
        # What live drift is measured against: the training split's features, and scores
        # on held-out rows (the training rows' own scores are more confident than live ones).
        profile = build_profile(splits.x_train, test_scores)
        mlflow.log_dict(profile.to_json(), PROFILE_ARTIFACT)
        figures = plots(splits.y_test, test_scores, threshold)
        for filename, figure in figures.items():
            mlflow.log_figure(figure, f"plots/{filename}")
            close_figure(figure)
        with _quiet_model_logging():
            info = mlflow.sklearn.log_model(
                model,
                name="model",
                signature=signature,
                input_example=example,
                pip_requirements=pip_requirements(),
                serialization_format="skops",
                skops_trusted_types=registry.TRUSTED_TYPES,
                pyfunc_predict_fn="predict_proba",
            )
        with _quiet_registration():
            registered = mlflow.register_model(info.model_uri, config.model_name)
        version = str(registered.version)
        client.set_model_version_tag(
            config.model_name, version, registry.THRESHOLD_TAG, f"{threshold:.6f}"
        )
        client.set_model_version_tag(config.model_name, version, "test_pr_auc", metrics["pr_auc"])

    promoted, reason = _decide(config, metrics["pr_auc"], champion_version, champion_pr_auc)
    if promoted:
        client.set_registered_model_alias(config.model_name, config.alias, version)
    log(
        f"registered {config.model_name} version {version} "
        f"({_run_link(tracking_uri, experiment_id, run.info.run_id)}); "
        f"alias '{config.alias}' {'moved to it' if promoted else 'unchanged'}: {reason}"
    )
    return TrainingResult(
        run_id=run.info.run_id,
        version=version,
        threshold=threshold,
        metrics=metrics,
        promoted=promoted,
        reason=reason,
        champion_pr_auc=champion_pr_auc,
        champion_version=champion_version,
        artifacts=[f"plots/{name}" for name in figures] + [PROFILE_ARTIFACT],
    )


def _decide(
    config: TrainingConfig,
    pr_auc: float,
    champion_version: str | None,
    champion_pr_auc: float | None,
) -> tuple[bool, str]:
    if config.force:
        return True, "--force given"
    if champion_version is None:
        return True, f"no version held '{config.alias}' yet"
    if champion_pr_auc is None:
        return True, f"version {champion_version} could not be scored, so it cannot be served"
    if pr_auc > champion_pr_auc:
        return True, (
            f"PR-AUC {pr_auc:.4f} beats version {champion_version}'s {champion_pr_auc:.4f} "
            "on the same test rows"
        )
    return False, (
        f"PR-AUC {pr_auc:.4f} does not beat version {champion_version}'s "
        f"{champion_pr_auc:.4f} on the same test rows (use --force to promote anyway)"
    )


def mlflow_destination(settings: Settings) -> tuple[str, str | None]:
    """(tracking URI, artifact location for new experiments); the embedded store keeps its
    artifacts beside its sqlite file, a remote server decides for itself."""
    if not settings.uses_embedded_store:
        return settings.tracking_uri, None
    settings.local_store_dir.mkdir(parents=True, exist_ok=True)
    return settings.tracking_uri, embedded_artifact_location(settings.local_store_dir)


def ensure_demo_model(settings: Settings, log: Log = print) -> None:
    """Embedded store only: train and register the demo model if MODEL_URI finds nothing
    (see predictor.bootstrap.demo_target). Never for a remote registry: a server must not
    publish models there."""
    if not settings.uses_embedded_store:
        raise ValueError("the demo model is only bootstrapped into the embedded store")
    tracking_uri, artifact_location = mlflow_destination(settings)
    target = demo_target(registry.connect(tracking_uri), settings)
    if target is None:
        return
    name, alias = target
    log(
        f"embedded store {settings.local_store_dir} has no {settings.model_uri}: "
        "training and registering the demo model"
    )
    # MLflow checks a freshly logged model by reloading it through pyfunc, which the server
    # process forbids; this model is the one being written right here, so allow it meanwhile.
    with _environment(MLFLOW_ALLOW_PICKLE_DESERIALIZATION="true"):
        train_and_register(
            TrainingConfig(model_name=name, alias=alias, force=True),
            tracking_uri,
            artifact_location,
            log=log,
        )


@contextmanager
def _quiet_model_logging() -> Iterator[None]:
    """Logging a model without MLflow's and scikit-learn's noise: the pip-version warning
    (pip_requirements are given explicitly), the uv-project note, and the feature-names
    warning from MLflow checking the input example (a named frame) against the model, which
    is fitted on the plain matrix the server scores."""
    quieted = [
        logging.getLogger(name) for name in ("mlflow.utils.environment", "mlflow.utils.uv_utils")
    ]
    levels = [logger.level for logger in quieted]
    for logger in quieted:
        logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "X has feature names", UserWarning)
            yield
    finally:
        for logger, level in zip(quieted, levels, strict=True):
            logger.setLevel(level)


def _run_link(tracking_uri: str, experiment_id: str, run_id: str) -> str:
    """The run in MLflow's UI where a server shows it, else its id."""
    if tracking_uri.startswith(("http://", "https://")):
        return f"run {tracking_uri.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"
    return f"run {run_id}"


#: What mlflow.register_model prints to stderr that the trainer's own line says again.
REGISTRATION_CHATTER = ("Successfully registered model ", "Registered model ", "Created version ")


@contextmanager
def _quiet_registration() -> Iterator[None]:
    """mlflow.register_model without its progress prints (the trainer says which version
    it registered in its own line); anything else it writes still reaches stderr."""
    captured = io.StringIO()
    waiting = logging.getLogger("mlflow.store.model_registry.abstract_store")
    level = waiting.level
    waiting.setLevel(logging.WARNING)  # "Waiting up to 300 seconds for model version ..."
    try:
        with redirect_stderr(captured):
            yield
    finally:
        waiting.setLevel(level)
        for line in captured.getvalue().splitlines(keepends=True):
            if not line.startswith(REGISTRATION_CHATTER):
                sys.stderr.write(line)


@contextmanager
def _environment(**variables: str) -> Iterator[None]:
    saved = {name: os.environ.get(name) for name in variables}
    os.environ.update(variables)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
