"""Scoring engines: the scikit-learn estimator as loaded, its trees compiled by treelite,
and its trees scored by numba-compiled code.

scikit-learn pays ~300 µs per call whatever the batch (input checks, then one call and
one thread-pool region per tree). treelite's GTIL answers one transaction in ~20 µs but
takes ~3.5 µs per row, so it scores batches of up to COMPILED_MAX_ROWS rows and
scikit-learn the rest. With the `native` extra (numba), a binary HistGradientBoosting
version is also scored by machine code over its own node arrays, which then scores every
batch: a few rows are walked down each tree (~1.5 µs for one), and batches are scored by
leaf elimination, which tests every split against every row without a branch that
depends on the data (~0.2 µs per row). It is compiled in the background after the
version serves (numba's import and compilation take ~1 s).

An engine serves a version only if it agrees with scikit-learn on the agreement rows the
caller passes (the server: the version's input example and 2,000 rows drawn from its
training profile), every probability within 1e-9 and every decision at its threshold the
same. Otherwise the next engine serves, and the log says
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
#: Batches from this many rows are scored by leaf elimination, smaller ones by the walk.
#: Measured on the demo model with rows that vary between calls, as in production (the
#: same rows over and over let the branch predictor learn the walk's paths): the walk
#: takes 1.5 µs for 1 row, 4.3 for 4, 12 for 8 and 130 for 100; elimination 4.5 µs up
#: to 8 rows and 20 for 100.
MASKS_MIN_ROWS = 4
#: Leaf elimination scores a large batch in slices of this many rows (as fast as whole:
#: 1.8-2.0 ms for 10,000 rows), so its memory stays ~4 KiB per tree however big the batch.
MASKS_MAX_ROWS = 512
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
    #: numba-compiled trees (a walk for a few rows, leaf elimination for more): every batch.
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
    rows: np.ndarray,
    tolerance: float = AGREEMENT,
) -> tuple[Scorer, str | None]:
    """The scorer for a version, and why it is not compiled (None when it is)."""
    try:
        compiled = compile_trees(estimator)
    except Exception as error:  # not a tree ensemble treelite knows: scikit-learn serves
        return Scorer(estimator), f"cannot be compiled: {type(error).__name__}: {error}"
    # Checked the way it serves: in batches the compiled path takes.
    disagreement = _disagreement(
        compiled, estimator, threshold, rows, tolerance, (COMPILED_MAX_ROWS,)
    )
    if disagreement:
        return Scorer(estimator), f"compiled trees {disagreement}"
    return Scorer(estimator, compiled), None


def with_native_trees(
    scorer: Scorer,
    threshold: float,
    rows: np.ndarray,
    tolerance: float = AGREEMENT,
) -> tuple[Scorer, str | None]:
    """`scorer` with the numba-compiled trees added, and why not (None when it is added)."""
    try:
        native = native_trees(scorer.estimator)
    except Exception as error:  # no numba, or trees this walk does not know
        return scorer, f"cannot be compiled natively: {type(error).__name__}: {error}"
    disagreement = _disagreement(
        native, scorer.estimator, threshold, rows, tolerance, (1, MASKS_MIN_ROWS)
    )
    if disagreement:
        return scorer, f"native trees {disagreement}"
    return Scorer(scorer.estimator, scorer.compiled, native), None


def _disagreement(
    candidate: Callable[[np.ndarray], np.ndarray],
    estimator: Any,
    threshold: float,
    rows: np.ndarray,
    tolerance: float,
    batch_sizes: tuple[int, ...] = (),
) -> str | None:
    """How `candidate` differs from scikit-learn on `rows`, scored whole and in each of
    `batch_sizes` (None: within `tolerance` everywhere, every decision the same)."""
    expected = estimator.predict_proba(rows)[:, 1]
    for step in (len(rows), *batch_sizes):
        try:
            parts = [candidate(rows[i : i + step]) for i in range(0, len(rows), step)]
            actual = np.concatenate(parts)
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
    """A binary HistGradientBoostingClassifier's own trees, scored by numba-compiled code:
    the node arrays scikit-learn's predictor reads, the same comparisons (missing values
    go where the tree learned to send them), the leaf values summed in scikit-learn's
    order from its baseline, then the logistic function. Batches of MASKS_MIN_ROWS rows
    and more are scored by leaf elimination when every tree has at most 64 leaves."""
    from sklearn.ensemble import HistGradientBoostingClassifier

    model = tree_model(estimator)
    if not isinstance(model, HistGradientBoostingClassifier) or model.n_trees_per_iteration_ != 1:
        raise ValueError("only binary HistGradientBoostingClassifier trees are walked")
    if getattr(model, "_preprocessor", None) is not None:
        raise ValueError("the model reorders its categorical features before its trees")
    trees = [predictors[0].nodes for predictors in model._predictors]
    if any(tree["is_categorical"].any() for tree in trees):
        raise ValueError("the trees have categorical splits")
    nodes = _breadth_first(trees)
    masks = _leaf_masks(trees)
    baseline = float(np.ravel(model._baseline_prediction)[0])
    width = model.n_features_in_
    walk = _tree_walk()
    eliminate = _leaf_elimination() if masks is not None else None

    def fraud_probability(features: np.ndarray) -> np.ndarray:
        if features.ndim != 2 or features.shape[1] != width:
            raise ValueError(f"expected {width} feature columns, got shape {features.shape}")
        rows = np.require(features, np.float64, ["C_CONTIGUOUS", "WRITEABLE"])
        if eliminate is None or len(rows) < MASKS_MIN_ROWS:
            return walk(rows, *nodes, baseline)
        # In slices: the candidates take 8 bytes per tree and row.
        slices = range(0, len(rows), MASKS_MAX_ROWS)
        scores = [eliminate(rows[i : i + MASKS_MAX_ROWS], *masks, baseline) for i in slices]
        return scores[0] if len(scores) == 1 else np.concatenate(scores)

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


def _leaf_masks(trees: list[np.ndarray]) -> tuple[np.ndarray, ...] | None:
    """The trees as leaf masks for _leaf_elimination (None when a tree has more than 64
    leaves: one 64-bit word holds a tree's leaves).

    Each tree's leaves are numbered left to right. For every split it returns: the feature,
    the threshold, the mask that keeps every leaf but those of its left subtree, its tree,
    and whether missing values go right; then each tree's leaf values by number. Splits
    are ordered by (missing values go right, feature) so the kernel's branches repeat.
    """
    if any(int(tree["is_leaf"].sum()) > 64 for tree in trees):
        return None
    splits: list[tuple[bool, int, float, int, int]] = []
    values = np.zeros((len(trees), 64), dtype=np.float64)
    for index, tree in enumerate(trees):
        _number_leaves(tree, 0, 0, index, values, splits)
    splits.sort(key=lambda split: split[:2])
    nan_right, feature, threshold, keep, tree = zip(*splits, strict=True) if splits else [()] * 5
    return (
        np.asarray(feature, dtype=np.int64),
        np.asarray(threshold, dtype=np.float64),
        np.asarray(keep, dtype=np.uint64),
        np.asarray(tree, dtype=np.int64),
        np.asarray(nan_right, dtype=np.bool_),
        values,
    )


def _number_leaves(
    tree: np.ndarray,
    node: int,
    first: int,
    index: int,
    values: np.ndarray,
    splits: list[tuple[bool, int, float, int, int]],
) -> int:
    """Number the leaves under `node` from `first`, left to right, recording their values
    and the splits above them; returns the next free number."""
    if tree["is_leaf"][node]:
        values[index, first] = tree["value"][node]
        return first + 1
    middle = _number_leaves(tree, int(tree["left"][node]), first, index, values, splits)
    end = _number_leaves(tree, int(tree["right"][node]), middle, index, values, splits)
    left_leaves = ((1 << (middle - first)) - 1) << first
    splits.append(
        (
            not tree["missing_go_to_left"][node],
            int(tree["feature_idx"][node]),
            float(tree["num_threshold"][node]),
            ~left_leaves & _ALL_LEAVES,
            index,
        )
    )
    return end


_ALL_LEAVES = (1 << 64) - 1
_LANES = 8
#: Multiplying a 64-bit word's lowest set bit by this de Bruijn constant puts a distinct
#: 6-bit pattern in the top bits: _LOWEST_BIT maps it back to the bit's position.
_DE_BRUIJN = 0x03F79D71B4CB0A89
_LOWEST_BIT = np.zeros(64, dtype=np.int64)
for _bit in range(64):
    _LOWEST_BIT[(((1 << _bit) * _DE_BRUIJN) & _ALL_LEAVES) >> 58] = _bit


@cache
def _leaf_elimination() -> Callable[..., np.ndarray]:
    """Batches scored by leaf elimination (QuickScorer: Lucchese et al., SIGIR 2015), with
    no branch that depends on the data (compiled here once per process: ~0.3 s).

    Every split of every tree is tested against every row of the batch, column by column;
    a split that sends the row right removes its left subtree's leaves from the row's
    candidates in that tree. The leftmost leaf that remains is the one the walk reaches:
    for any leaf left of it, the split where their paths part sent the row right. About
    5x faster than walking for 100 rows; leaf values are summed in tree order, as
    scikit-learn sums them.
    """
    import numba

    @numba.njit(
        "float64[::1](float64[:, ::1], int64[::1], float64[::1], uint64[::1], int64[::1], "
        "boolean[::1], float64[:, ::1], float64)",
        nogil=True,
    )
    def eliminate(rows, feature, threshold, keep, tree, nan_right, values, base):
        count = rows.shape[0]
        # Padded to whole SIMD vectors: a loop's scalar remainder costs more than the rest.
        padded = -(-count // _LANES) * _LANES
        columns = np.zeros((rows.shape[1], padded))
        for i in range(count):  # loops: numba takes 2 s more to compile `columns[:, :count] =`
            for j in range(rows.shape[1]):
                columns[j, i] = rows[i, j]
        every = np.uint64(_ALL_LEAVES)
        candidates = np.full((values.shape[0], padded), every)
        for split in range(feature.shape[0]):
            column = columns[feature[split]]
            bound = threshold[split]
            mask = keep[split]
            alive = candidates[tree[split]]
            if nan_right[split]:  # NaN <= bound is false: NaN goes right
                for i in range(padded):
                    alive[i] &= every if column[i] <= bound else mask
            else:  # NaN > bound is false: NaN goes left
                for i in range(padded):
                    alive[i] &= mask if column[i] > bound else every
        scores = np.empty(count)
        lowest_bit = _LOWEST_BIT
        de_bruijn = np.uint64(_DE_BRUIJN)
        for i in range(count):
            raw = base
            for t in range(values.shape[0]):
                word = candidates[t, i]
                lowest = word & (~word + np.uint64(1))
                raw += values[t, lowest_bit[(lowest * de_bruijn) >> np.uint64(58)]]
            scores[i] = 1.0 / (1.0 + np.exp(-raw))
        return scores

    return eliminate
