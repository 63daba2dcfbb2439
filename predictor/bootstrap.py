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
    from mlflow.exceptions import MlflowException

    try:
        registry.resolve(registry.connect(settings.tracking_uri), settings.model_uri)
        return
    except MlflowException as error:
        if not registry.is_missing(error):
            raise BootstrapError(f"the embedded store cannot be read: {error}") from None
    if registry.alias_of(settings.model_uri) is None:
        raise BootstrapError(
            f"{settings.model_uri} is not in the embedded store at {settings.local_store_dir}; "
            "only an alias URI (models:/<name>@<alias>) is bootstrapped with the demo model"
        )
    logger.info("embedded store %s has no %s", settings.local_store_dir, settings.model_uri)
    # The server's own MLflow client settings (no pickle, bounded timeouts) are made after
    # this returns; the URIs mlflow.set_tracking_uri() exported above are the embedded
    # store's, which the child finds again by their absence.
    env = {k: v for k, v in os.environ.items() if k not in MLFLOW_URI_VARIABLES}
    result = subprocess.run(
        [sys.executable, "-m", "predictor.training", "--bootstrap-embedded"], env=env, check=False
    )
    if result.returncode != 0:
        raise BootstrapError(
            f"training the demo model into {settings.local_store_dir} failed "
            f"(exit {result.returncode}; its output is above)"
        )
