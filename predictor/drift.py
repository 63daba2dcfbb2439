"""Feature drift: how far live traffic has moved from what a version was trained on.

Training stores a reference profile with each version (`feature_profile.json`: per feature,
bin edges and the training split's proportion per bin; the same for the fraud score). The
server keeps the last DRIFT_WINDOW_ROWS scored rows and, about once a second while rows
arrive, exports the population stability index (PSI) of each feature and of the score
against the served version's profile:

    PSI = sum over bins of (live - reference) * ln(live / reference)

Below 0.1 is noise, 0.1-0.25 a shift worth a look, above 0.25 a population the model was
not trained on. Bins are the training deciles with the tails split finer (1st, 5th, 95th,
99th percentiles), or one bin per value for features with few distinct values (hour,
weekday, flags, merchant category), so a shift shows wherever it is.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

import numpy as np

from predictor.features import FEATURE_NAMES

PROFILE_ARTIFACT = "feature_profile.json"
PROFILE_FORMAT = 1
#: Features with at most this many distinct training values get one bin per value.
MAX_DISCRETE_VALUES = 32
#: Bin edges of a continuous feature: its deciles, plus the 1st, 5th, 95th and 99th
#: percentiles, so values beyond what training saw land in bins that expected 1 % and a
#: shift there shows even when it is a small part of the window.
QUANTILES = np.array([0.01, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99])
#: Stands in for an empty bin's proportion, so one empty bin does not make PSI infinite.
EMPTY_BIN = 1e-4
#: Exported names: the transaction field a feature comes from, where it is one field.
DRIFT_LABELS = {"log_amount": "amount", "merchant_category_code": "merchant_category"}
SCORE = "score"


@dataclass(frozen=True)
class Reference:
    """One variable's bins: value v falls in bin `searchsorted(edges, v, side="right")`."""

    edges: np.ndarray
    proportions: np.ndarray

    def sample(self, rows: int, rng: np.random.Generator) -> np.ndarray:
        """Values drawn like the training data: a bin by its proportion, then uniformly
        within it (the open outer bins reach as far beyond the edges as the edges span)."""
        if not len(self.edges):
            return np.zeros(rows)
        reach = max(float(self.edges[-1] - self.edges[0]), 1.0)
        bounds = np.concatenate([[self.edges[0] - reach], self.edges, [self.edges[-1] + reach]])
        weights = self.proportions / self.proportions.sum()
        bins = rng.choice(len(weights), size=rows, p=weights)
        return rng.uniform(bounds[bins], bounds[bins + 1])

    def psi(self, values: np.ndarray) -> float:
        live = np.bincount(
            np.searchsorted(self.edges, values, side="right"), minlength=len(self.proportions)
        ) / max(len(values), 1)
        return population_stability_index(self.proportions, live)


@dataclass(frozen=True)
class Profile:
    """A version's reference: every feature (in FEATURE_NAMES order) and the score."""

    features: tuple[Reference, ...]
    score: Reference

    def to_json(self) -> dict[str, Any]:
        return {
            "format": PROFILE_FORMAT,
            "features": {
                name: _reference_json(reference)
                for name, reference in zip(FEATURE_NAMES, self.features, strict=True)
            },
            "score": _reference_json(self.score),
        }

    def sample(self, rows: int, seed: int = 0) -> np.ndarray:
        """A feature matrix drawn from the profile, feature by feature (for the engines'
        agreement check: every bin of every feature is visited)."""
        rng = np.random.default_rng(seed)
        return np.column_stack([reference.sample(rows, rng) for reference in self.features])

    @classmethod
    def from_json(cls, document: Any) -> Profile:
        """Parse a stored profile; ValueError names what is wrong with it."""
        if not isinstance(document, dict) or document.get("format") != PROFILE_FORMAT:
            raise ValueError(f"not a format {PROFILE_FORMAT} feature profile")
        features = document.get("features")
        if not isinstance(features, dict) or sorted(features) != sorted(FEATURE_NAMES):
            raise ValueError(f"the profile's features are not {', '.join(FEATURE_NAMES)}")
        return cls(
            tuple(_reference(name, features[name]) for name in FEATURE_NAMES),
            _reference(SCORE, document.get("score")),
        )


def population_stability_index(reference: np.ndarray, live: np.ndarray) -> float:
    expected = np.maximum(reference, EMPTY_BIN)
    actual = np.maximum(live, EMPTY_BIN)
    return float(np.sum((actual - expected) * np.log(actual / expected)))


def reference_of(values: np.ndarray) -> Reference:
    """Bins for one variable from its training values: one per value when there are few,
    else the deciles and tail percentiles of QUANTILES (ties merged)."""
    distinct = np.unique(values[np.isfinite(values)])
    if len(distinct) <= MAX_DISCRETE_VALUES:
        edges = (distinct[:-1] + distinct[1:]) / 2
    else:
        edges = np.unique(np.quantile(values, QUANTILES))
    counts = np.bincount(np.searchsorted(edges, values, side="right"), minlength=len(edges) + 1)
    return Reference(edges, counts / max(len(values), 1))


def build_profile(features: np.ndarray, scores: np.ndarray) -> Profile:
    """The profile of a training split: its feature matrix and the version's scores on it."""
    return Profile(
        tuple(reference_of(features[:, index]) for index in range(features.shape[1])),
        reference_of(scores),
    )


def _reference_json(reference: Reference) -> dict[str, list[float]]:
    return {"edges": reference.edges.tolist(), "proportions": reference.proportions.tolist()}


def _reference(name: str, document: Any) -> Reference:
    try:
        edges = np.asarray(document["edges"], dtype=np.float64)
        proportions = np.asarray(document["proportions"], dtype=np.float64)
    except (KeyError, TypeError, ValueError):
        raise ValueError(f"{name}: needs numeric 'edges' and 'proportions'") from None
    if (
        edges.ndim != 1
        or proportions.shape != (len(edges) + 1,)
        or not np.all(np.isfinite(edges))
        or np.any(np.diff(edges) <= 0)
        or not np.all((proportions >= 0) & (proportions <= 1))
    ):
        raise ValueError(
            f"{name}: edges must be finite and increasing, with one proportion in [0, 1] "
            "per bin (one more than edges)"
        )
    return Reference(edges, proportions)


class DriftWindow:
    """The last `size` scored rows (features and champion score), kept for PSI.

    Appended to by one thread (after the answer, never on the request path); read by the
    same thread when it refreshes the gauges."""

    def __init__(self, size: int):
        self.size = size
        self._features = np.empty((size, len(FEATURE_NAMES)), dtype=np.float64)
        self._scores = np.empty(size, dtype=np.float64)
        self._next = 0
        self._filled = 0
        #: How many of the newest rows were scored by the version served now.
        self._scored = 0
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return self._filled

    def clear_scores(self) -> None:
        """A new version scores differently: its score drift counts only its own rows."""
        with self._lock:
            self._scored = 0

    def append(self, features: np.ndarray, scores: np.ndarray) -> None:
        rows = len(features)
        if rows >= self.size:  # only the newest `size` rows matter
            features, scores, rows = features[-self.size :], scores[-self.size :], self.size
        with self._lock:
            first = min(rows, self.size - self._next)
            self._features[self._next : self._next + first] = features[:first]
            self._scores[self._next : self._next + first] = scores[:first]
            rest = rows - first
            if rest:
                self._features[:rest] = features[first:]
                self._scores[:rest] = scores[first:]
            self._next = (self._next + rows) % self.size
            self._filled = min(self.size, self._filled + rows)
            self._scored = min(self.size, self._scored + rows)

    def psi(self, profile: Profile) -> dict[str, float]:
        """PSI per feature (by exported name) and of the score, over the window's rows."""
        with self._lock:
            features = self._features[: self._filled].copy()
            newest = (self._next - 1 - np.arange(self._scored)) % self.size
            scores = self._scores[newest]
        result = {
            DRIFT_LABELS.get(name, name): reference.psi(features[:, index])
            for index, (name, reference) in enumerate(
                zip(FEATURE_NAMES, profile.features, strict=True)
            )
        }
        if len(scores):
            result[SCORE] = profile.score.psi(scores)
        return result
