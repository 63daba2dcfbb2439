"""Reason codes: why a transaction scored what it did, in the transaction's own fields.

Contributions are exact SHAP values of the tree ensemble (shap's TreeExplainer), in
log-odds: base value + the sum of a row's contributions = the model's raw score for it,
and sigmoid(raw score) = its fraud probability. Features derived from one client field are
summed into that field (`timestamp` gets hour, weekday and night; `amount` gets its
log), so an analyst reads them in the terms the client sent.

shap (and numba under it) is imported when the first explainer is built, in a background
thread after the version is served (~0.4 s), never on the predict path.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from predictor.engine import tree_model
from predictor.features import FEATURE_NAMES
from predictor.schema import FIELD_ORDER

logger = logging.getLogger("predictor.explain")

#: The client field each model feature is derived from.
FIELD_OF_FEATURE: dict[str, str] = {
    "log_amount": "amount",
    "hour_of_day": "timestamp",
    "day_of_week": "timestamp",
    "is_night": "timestamp",
    "card_present": "card_present",
    "distance_from_home_km": "distance_from_home_km",
    "transactions_last_24h": "transactions_last_24h",
    "customer_age": "customer_age",
    "account_age_days": "account_age_days",
    "merchant_category_code": "merchant_category",
}
assert tuple(FIELD_OF_FEATURE) == FEATURE_NAMES and set(FIELD_OF_FEATURE.values()) == set(
    FIELD_ORDER
)
#: How many of the fields pushing hardest toward fraud are named as reason codes.
TOP_REASONS = 3

# features x fields: summing a row of per-feature contributions into per-field ones.
_TO_FIELDS = np.array(
    [[1.0 if FIELD_OF_FEATURE[f] == field else 0.0 for field in FIELD_ORDER] for f in FEATURE_NAMES]
)


class ExplainerUnavailable(Exception):
    """The served version cannot be explained; the message says why."""


class Explainer:
    """Exact per-field log-odds contributions for one version's estimator."""

    def __init__(self, estimator: Any):
        try:
            model = tree_model(estimator)
        except ValueError as error:
            raise ExplainerUnavailable(str(error)) from None
        try:
            import shap  # seconds to import; see the module docstring

            self._tree = shap.TreeExplainer(model)
            base = np.asarray(self._tree.expected_value, dtype=np.float64).reshape(-1)
        except Exception as error:  # an estimator shap cannot walk: predictions go on
            raise ExplainerUnavailable(f"{type(error).__name__}: {error}") from None
        if base.size != 1:
            raise ExplainerUnavailable(f"expected one output, the explainer has {base.size}")
        self.base_value = float(base[0])

    def contributions(self, features: np.ndarray) -> np.ndarray:
        """(rows x fields) contributions in log-odds, in FIELD_ORDER."""
        values = np.asarray(self._tree.shap_values(features), dtype=np.float64)
        if values.shape != features.shape:
            raise ExplainerUnavailable(f"the explainer returned shape {values.shape}")
        return values @ _TO_FIELDS


def explain_rows(
    explainer: Explainer,
    features: np.ndarray,
    rows: Sequence[Mapping[str, Any]],
    probabilities: np.ndarray,
    decisions: np.ndarray,
    version: str,
) -> list[dict[str, Any]]:
    """One explanation per transaction: score, decision, base value, contributions keyed by
    client field (largest push toward fraud first) and the top reasons with their values."""
    by_field = explainer.contributions(features)
    explanations = []
    for row, contributions, probability, decision in zip(
        rows, by_field.tolist(), probabilities.tolist(), decisions.tolist(), strict=True
    ):
        ranked = sorted(
            zip(FIELD_ORDER, contributions, strict=True), key=lambda item: item[1], reverse=True
        )
        explanations.append(
            {
                "fraud_probability": probability,
                "is_fraud": decision,
                "model_version": version,
                "base_value": explainer.base_value,
                "contributions": dict(ranked),
                "reasons": [
                    {"field": field, "value": row[field], "contribution": value}
                    for field, value in ranked[:TOP_REASONS]
                    if value > 0
                ],
            }
        )
    return explanations
