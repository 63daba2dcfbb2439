"""Scoring engines: the scikit-learn estimator as loaded, its trees compiled by treelite,
and its trees walked by numba-compiled code.

scikit-learn pays ~300 µs per call whatever the batch (input checks, then one call and
one thread-pool region per tree). treelite's GTIL answers one transaction in ~20 µs but
takes ~3.5 µs per row, so it scores batches of up to COMPILED_MAX_ROWS rows and
scikit-learn the rest. With the `native` extra (numba), a binary HistGradientBoosting
version is also walked by a machine-code loop over its own node arrays (a few µs per
call, well under 1 µs per row), which then scores every batch; it is compiled in the
background after the version serves (numba's import and compilation take ~0.6 s).

An engine serves a version only if it agrees with scikit-learn: on the version's input
example and on 2,000 generated transactions, every probability within 1e-9 and every
decision at its threshold the same. Otherwise the next engine serves, and the log says
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
NUMBA = "numba"
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
    #: treelite's GTIL: batches of up to COMPILED_MAX_ROWS rows.
    compiled: Callable[[np.ndarray], np.ndarray] | None = None
    #: numba-compiled tree walk: every batch.
    native: Callable[[np.ndarray], np.ndarray] | None = None

    @property
    def engine(self) -> str:
        if self.native is not None:
            return NUMBA
        return TREELITE if self.compiled is not None else SKLEARN

    def fraud_probability(self, features: np.ndarray) -> np.ndarray:
        if self.native is not None:
            return self.native(features)
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
    # Checked the way it serves: in batches the compiled path takes.
    disagreement = _disagreement(compiled, estimator, threshold, example, tolerance, batch=True)
    if disagreement:
        return Scorer(estimator), f"compiled trees {disagreement}"
    return Scorer(estimator, compiled), None


def with_native_trees(
    scorer: Scorer,
    threshold: float,
    example: np.ndarray | None,
    tolerance: float = AGREEMENT,
) -> tuple[Scorer, str | None]:
    """`scorer` with the numba tree walk added, and why not (None when it is added)."""
    try:
        native = native_trees(scorer.estimator)
    except Exception as error:  # no numba, or trees this walk does not know
        return scorer, f"cannot be compiled natively: {type(error).__name__}: {error}"
    disagreement = _disagreement(native, scorer.estimator, threshold, example, tolerance)
    if disagreement:
        return scorer, f"native trees {disagreement}"
    return Scorer(scorer.estimator, scorer.compiled, native), None


def _disagreement(
    candidate: Callable[[np.ndarray], np.ndarray],
    estimator: Any,
    threshold: float,
    example: np.ndarray | None,
    tolerance: float,
    batch: bool = False,
) -> str | None:
    """How `candidate` differs from scikit-learn on the example and the generated rows
    (None: within `tolerance` everywhere, every decision the same)."""
    rows = generated_features() if example is None else np.vstack([example, generated_features()])
    expected = estimator.predict_proba(rows)[:, 1]
    try:
        step = COMPILED_MAX_ROWS if batch else len(rows)
        actual = np.concatenate([candidate(rows[i : i + step]) for i in range(0, len(rows), step)])
    except Exception as error:
        return f"failed: {type(error).__name__}: {error}"
    worst = float(np.max(np.abs(actual - expected))) if len(rows) else 0.0
    decisions_differ = int(np.sum((actual >= threshold) != (expected >= threshold)))
    if not worst <= tolerance or decisions_differ:
        return (
            f"differ from scikit-learn's by up to {worst:.1e} (allowed {tolerance:.0e}) "
            f"and {decisions_differ} decisions on {len(rows)} rows"
        )
    return None


def native_trees(estimator: Any) -> Callable[[np.ndarray], np.ndarray]:
    """A binary HistGradientBoostingClassifier's own trees, walked by numba-compiled code:
    the node arrays scikit-learn's predictor reads, the same comparisons (missing values
    go where the tree learned to send them), the leaf values summed in scikit-learn's
    order from its baseline, then the logistic function."""
    from sklearn.ensemble import HistGradientBoostingClassifier

    model = tree_model(estimator)
    if not isinstance(model, HistGradientBoostingClassifier) or model.n_trees_per_iteration_ != 1:
        raise ValueError("only binary HistGradientBoostingClassifier trees are walked")
    if getattr(model, "_preprocessor", None) is not None:
        raise ValueError("the model reorders its categorical features before its trees")
    trees = [predictors[0].nodes for predictors in model._predictors]
    if any(tree["is_categorical"].any() for tree in trees):
        raise ValueError("the trees have categorical splits")
    arrays = _breadth_first(trees)
    baseline = float(np.ravel(model._baseline_prediction)[0])
    width = model.n_features_in_
    walk = _tree_walk()

    def fraud_probability(features: np.ndarray) -> np.ndarray:
        if features.ndim != 2 or features.shape[1] != width:
            raise ValueError(f"expected {width} feature columns, got shape {features.shape}")
        return walk(np.ascontiguousarray(features, dtype=np.float64), *arrays, baseline)

    return fraud_probability


def _breadth_first(trees: list[np.ndarray]) -> tuple[np.ndarray, ...]:
    """All trees' nodes in one set of arrays, each tree breadth first, so that a node's two
    children are neighbours: the walk steps to ``child + goes_right`` without a branch.

    Returns each tree's root, then per node: the feature it splits on (-1 for a leaf), its
    threshold (a leaf's value), its left child, and whether missing values go left.
    """
    roots: list[int] = []
    order = []
    start = 0
    for tree in trees:
        queue = [0]
        for node in queue:  # grows while it is read: breadth first
            if not tree["is_leaf"][node]:
                queue += [int(tree["left"][node]), int(tree["right"][node])]
        position = np.full(len(tree), -1, dtype=np.int64)
        position[queue] = np.arange(start, start + len(queue))
        nodes = tree[queue]
        leaf = nodes["is_leaf"].astype(bool)
        roots.append(start)
        order.append(
            (
                np.where(leaf, -1, nodes["feature_idx"]),
                np.where(leaf, nodes["value"], nodes["num_threshold"]),
                np.where(leaf, -1, position[nodes["left"]]),
                nodes["missing_go_to_left"].astype(bool),
            )
        )
        start += len(queue)
    feature, threshold, left, missing_left = (
        np.concatenate(parts) for parts in zip(*order, strict=True)
    )
    return (
        np.asarray(roots, dtype=np.int64),
        np.ascontiguousarray(feature, dtype=np.int64),
        np.ascontiguousarray(threshold, dtype=np.float64),
        np.ascontiguousarray(left, dtype=np.int64),
        np.ascontiguousarray(missing_left, dtype=np.bool_),
    )


@cache
def _tree_walk() -> Callable[..., np.ndarray]:
    """The compiled walk (numba compiles it here, once per process: ~0.4 s).

    Tree by tree, every row: one tree's nodes stay in cache for the whole batch. Each row's
    leaf values are still added in tree order, as scikit-learn adds them.
    """
    import numba

    @numba.njit(
        "float64[::1](float64[:, ::1], int64[::1], int64[::1], float64[::1], int64[::1], "
        "boolean[::1], float64)",
        nogil=True,
    )
    def walk(rows, roots, feature, threshold, left, missing_left, base):
        raw = np.full(rows.shape[0], base)
        for root in roots:
            for i in range(rows.shape[0]):
                node = root
                split = feature[node]
                while split >= 0:
                    x = rows[i, split]
                    # NaN fails every comparison: it goes where the tree learned to send it.
                    right = x > threshold[node] or (np.isnan(x) and not missing_left[node])
                    node = left[node] + right
                    split = feature[node]
                raw[i] += threshold[node]
        scores = np.empty_like(raw)
        for i in range(raw.shape[0]):
            scores[i] = 1.0 / (1.0 + np.exp(-raw[i]))
        return scores

    return walk


@cache
def generated_features() -> np.ndarray:
    """2,000 realistic transactions (10 % fraud patterns) as features: the paths the trees
    take in production, for the agreement check. Built once per process."""
    from predictor.data import generate_transactions, to_columns
    from predictor.features import build_features

    frame = generate_transactions(rows=2_000, fraud_rate=0.1, seed=20261127)
    return build_features(to_columns(frame))
