"""Scoring engines: the scikit-learn estimator as loaded, and its trees compiled by treelite.

For a single transaction, treelite's GTIL answers in ~30 µs where scikit-learn takes
~300 µs (its per-call input checks and thread pool dominate small batches). From a
hundred or two rows on, scikit-learn's vectorised predictor is the faster one. So a
compiled version scores batches of up to COMPILED_MAX_ROWS rows and scikit-learn scores
the rest.

A version is compiled only if the compiled trees agree with scikit-learn: on its input
example and on 2,000 generated transactions, every probability within 1e-9 and every
decision at its threshold the same. Otherwise scikit-learn serves alone, and the log says
why. The registry artifact stays what it is (skops-loaded scikit-learn): compiling reads
the loaded trees, nothing else is loaded.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from typing import Any

import numpy as np

SKLEARN = "sklearn"
TREELITE = "treelite"
#: Batches up to this many rows go to the compiled trees (measured crossover: ~150 rows).
COMPILED_MAX_ROWS = 64
#: Largest difference from scikit-learn's probability that a compiled version may show.
AGREEMENT = 1e-9


def tree_model(estimator: Any) -> Any:
    """The tree ensemble itself: a Pipeline is unwrapped when no step before its last one
    changes the features (then the last step sees the features as they are)."""
    steps = getattr(estimator, "steps", None)
    if steps is None:
        return estimator
    transforms = [name for name, step in steps[:-1] if step not in (None, "passthrough")]
    if transforms:
        raise ValueError(
            f"the pipeline transforms the features before its model ({', '.join(transforms)})"
        )
    return steps[-1][1]


@dataclass(frozen=True)
class Scorer:
    """Fraud probabilities for a feature matrix, from the engine that is fastest for it."""

    estimator: Any
    compiled: Callable[[np.ndarray], np.ndarray] | None = None

    @property
    def engine(self) -> str:
        return TREELITE if self.compiled is not None else SKLEARN

    def fraud_probability(self, features: np.ndarray) -> np.ndarray:
        if self.compiled is not None and len(features) <= COMPILED_MAX_ROWS:
            return self.compiled(features)
        return self.estimator.predict_proba(features)[:, 1]


def compile_trees(estimator: Any) -> Callable[[np.ndarray], np.ndarray]:
    """treelite's GTIL over the estimator's trees: features -> probability of fraud."""
    import treelite.gtil
    import treelite.sklearn

    model = treelite.sklearn.import_model(tree_model(estimator))

    def fraud_probability(features: np.ndarray) -> np.ndarray:
        scores = treelite.gtil.predict(model, features, nthread=1)
        return np.asarray(scores, dtype=np.float64).reshape(len(features), -1)[:, -1]

    return fraud_probability


def build_scorer(
    estimator: Any,
    threshold: float,
    example: np.ndarray | None,
    tolerance: float = AGREEMENT,
) -> tuple[Scorer, str | None]:
    """The scorer for a version, and why it is not compiled (None when it is)."""
    try:
        compiled = compile_trees(estimator)
    except Exception as error:  # not a tree ensemble treelite knows: scikit-learn serves
        return Scorer(estimator), f"cannot be compiled: {type(error).__name__}: {error}"
    rows = generated_features() if example is None else np.vstack([example, generated_features()])
    expected = estimator.predict_proba(rows)[:, 1]
    try:
        # Checked the way it serves: batches the compiled path takes.
        actual = np.concatenate(
            [
                compiled(rows[i : i + COMPILED_MAX_ROWS])
                for i in range(0, len(rows), COMPILED_MAX_ROWS)
            ]
        )
    except Exception as error:
        return Scorer(estimator), f"compiled trees failed: {type(error).__name__}: {error}"
    worst = float(np.max(np.abs(actual - expected))) if len(rows) else 0.0
    decisions_differ = int(np.sum((actual >= threshold) != (expected >= threshold)))
    if not worst <= tolerance or decisions_differ:
        return Scorer(estimator), (
            f"compiled probabilities differ from scikit-learn's by up to {worst:.1e} "
            f"(allowed {tolerance:.0e}) and {decisions_differ} decisions on {len(rows)} rows"
        )
    return Scorer(estimator, compiled), None


@cache
def generated_features() -> np.ndarray:
    """2,000 realistic transactions (10 % fraud patterns) as features: the paths the trees
    take in production, for the agreement check. Built once per process."""
    from predictor.data import generate_transactions, to_transactions
    from predictor.features import build_features

    frame = generate_transactions(rows=2_000, fraud_rate=0.1, seed=20261127)
    return build_features(to_transactions(frame))
