"""What a training run depends on and what it produces."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from predictor.settings import DEFAULT_ALIAS, DEFAULT_MODEL_NAME

DEFAULT_EXPERIMENT = "fraud-detection"
Log = Callable[[str], None]


@dataclass
class TrainingConfig:
    """Everything a training run depends on; logged as the run's parameters."""

    rows: int = 50_000
    fraud_rate: float = 0.02
    seed: int = 42
    csv: Path | None = None
    #: Train on the decision ledger's labelled transactions (a database URI) instead.
    ledger: str | None = None
    ledger_since: str | None = None
    model_name: str = DEFAULT_MODEL_NAME
    alias: str = DEFAULT_ALIAS
    experiment: str = DEFAULT_EXPERIMENT
    force: bool = False
    max_iter: int = 200
    learning_rate: float = 0.15
    max_leaf_nodes: int = 31
    l2_regularization: float = 1.0
    validation_fraction: float = 0.2
    test_fraction: float = 0.2


@dataclass
class TrainingResult:
    run_id: str
    version: str
    threshold: float
    metrics: dict[str, float]
    promoted: bool
    reason: str
    champion_pr_auc: float | None = None
    champion_version: str | None = None
    artifacts: list[str] = field(default_factory=list)


@dataclass
class Splits:
    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


@contextmanager
def step(log: Log, what: str) -> Iterator[None]:
    """One line when a long step is done, with its duration."""
    started = time.perf_counter()
    yield
    log(f"{what}: done in {time.perf_counter() - started:.1f} s")
