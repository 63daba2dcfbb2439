"""The embedded default: with no MLFLOW_TRACKING_URI, a local MLflow store that holds the
demo model.

On the first start the store is empty. The training CLI then trains and registers the demo
model into it in a child process, so training, its libraries and its MLflow settings never
enter the server process. Later starts find the model and load it directly. The local
store needs the full `mlflow` package (its sqlite backend), which the `train` extra brings;
the serving image does not have it and serves from a registry server instead.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import subprocess
import sys

from predictor import registry
from predictor.settings import Settings

logger = logging.getLogger("predictor.bootstrap")
MLFLOW_URI_VARIABLES = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")


class BootstrapError(Exception):
    """The embedded store cannot be used or filled; the message says what to do."""


def demo_target(client, settings: Settings) -> tuple[str, str] | None:
    """The (model, alias) the demo model must be trained into, or None when there is
    nothing to train: MODEL_URI resolves, or the model exists and only its alias is missing
    (the server waits for `fraud-models promote`, as with a remote registry; never a demo in
    its place). The one embedded-store check, used by the server and by the trainer.

    Raises BootstrapError when the store cannot be read or MODEL_URI is not an alias."""
    from mlflow.exceptions import MlflowException

    try:
        registry.resolve(client, settings.model_uri)
        return None
    except MlflowException as error:
        if not registry.is_missing(error):
            raise BootstrapError(f"the embedded store cannot be read: {error}") from None
    target = registry.alias_of(settings.model_uri)
    if target is None:
        raise BootstrapError(
            f"{settings.model_uri} is not in the embedded store at {settings.local_store_dir}; "
            "only an alias URI (models:/<name>@<alias>) is bootstrapped with the demo model"
        )
    try:
        client.get_registered_model(target[0])
    except MlflowException as error:
        if registry.is_missing(error):
            return target
        raise BootstrapError(f"the embedded store cannot be read: {error}") from None
    return None


def ensure_embedded_model(settings: Settings) -> None:
    """Train the demo model into the embedded store if MODEL_URI finds nothing there."""
    if not settings.uses_embedded_store:
        return
    if importlib.util.find_spec("sqlalchemy") is None:  # mlflow-skinny: no local stores
        raise BootstrapError(
            "no MLFLOW_TRACKING_URI, and the embedded store needs the full mlflow package "
            "(its sqlite backend): set MLFLOW_TRACKING_URI to an MLflow server, or install "
            "fraud-predictor[train]"
        )
    target = demo_target(registry.connect(settings.tracking_uri), settings)
    if target is None:
        alias = registry.alias_of(settings.model_uri)
        if alias is not None and not _resolves(settings):
            logger.info(
                "embedded store %s: %s has no alias '%s' yet; the server waits for it",
                settings.local_store_dir,
                *alias,
            )
        return
    # The child says what it does (one line); the server's own MLflow client settings (no
    # pickle, bounded timeouts) are made after this returns; the URIs
    # mlflow.set_tracking_uri() exported above are the embedded store's, which the child
    # finds again by their absence.
    env = {k: v for k, v in os.environ.items() if k not in MLFLOW_URI_VARIABLES}
    result = subprocess.run(
        [sys.executable, "-m", "predictor.training", "--bootstrap-embedded"], env=env, check=False
    )
    if result.returncode != 0:
        raise BootstrapError(
            f"training the demo model into {settings.local_store_dir} failed "
            f"(exit {result.returncode}; its output is above)"
        )


def _resolves(settings: Settings) -> bool:
    from mlflow.exceptions import MlflowException

    try:
        registry.resolve(registry.connect(settings.tracking_uri), settings.model_uri)
    except MlflowException:
        return False
    return True
