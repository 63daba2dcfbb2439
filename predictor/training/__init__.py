"""Train the fraud model, log it to MLflow, register it and move the alias if it wins.

config    what a run depends on and what it produces;
fit       data, split, fit, threshold, evaluation and plots;
register  the MLflow run, the registered version, champion/challenger, the demo bootstrap;
cli       the command line.

Installed with the `train` extra; the server never imports it.
"""

from predictor.training.cli import main
from predictor.training.config import TrainingConfig, TrainingResult
from predictor.training.register import ensure_demo_model, mlflow_destination, train_and_register

__all__ = [
    "TrainingConfig",
    "TrainingResult",
    "ensure_demo_model",
    "main",
    "mlflow_destination",
    "train_and_register",
]
