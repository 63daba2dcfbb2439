"""Transactions -> the model's feature matrix. Training and serving both call this.

The estimator receives a plain float64 matrix (no pandas on the request path); the
frame form exists for the MLflow signature and for humans, with the same columns.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd

from predictor.schema import KNOWN_MERCHANT_CATEGORIES, OTHER_CATEGORY, Columns

#: Feature columns, in matrix order. Every column is float64 ("double" in the signature).
FEATURE_NAMES: tuple[str, ...] = (
    "log_amount",
    "hour_of_day",
    "day_of_week",
    "is_night",
    "card_present",
    "distance_from_home_km",
    "transactions_last_24h",
    "customer_age",
    "account_age_days",
    "merchant_category_code",
)
#: Local hours (the timestamp's own offset) counted as night.
NIGHT_HOURS = range(0, 6)

_CATEGORY_CODES = {name: float(code) for code, name in enumerate(KNOWN_MERCHANT_CATEGORIES)}
_OTHER_CODE = _CATEGORY_CODES[OTHER_CATEGORY]


def category_code(merchant_category: str) -> float:
    """Ordinal code of a category; unknown categories share the code of 'other'."""
    return _CATEGORY_CODES.get(merchant_category.strip().lower(), _OTHER_CODE)


def build_features(columns: Columns) -> np.ndarray:
    """Feature matrix (rows x FEATURE_NAMES) of a validated batch (see validate_columns);
    ints and bools become float64: exact for every value the schema admits."""
    local_times = columns["timestamp"]  # wall-clock time at the point of sale, per its offset
    hours = [local_time.hour for local_time in local_times]
    known = _CATEGORY_CODES
    features: dict[str, list[Any]] = {
        "log_amount": [math.log1p(amount) for amount in columns["amount"]],
        "hour_of_day": hours,
        "day_of_week": [local_time.weekday() for local_time in local_times],
        "is_night": [hour in NIGHT_HOURS for hour in hours],
        "card_present": columns["card_present"],
        "distance_from_home_km": columns["distance_from_home_km"],
        "transactions_last_24h": columns["transactions_last_24h"],
        "customer_age": columns["customer_age"],
        "account_age_days": columns["account_age_days"],
        "merchant_category_code": [
            known[name] if name in known else category_code(name)
            for name in columns["merchant_category"]
        ],
    }
    matrix = np.empty((len(hours), len(FEATURE_NAMES)), dtype=np.float64)
    for index, name in enumerate(FEATURE_NAMES):
        matrix[:, index] = features[name]
    return matrix


def feature_frame(matrix: np.ndarray) -> pd.DataFrame:
    """The matrix as the named frame that the model's MLflow signature describes."""
    return pd.DataFrame(matrix, columns=list(FEATURE_NAMES), dtype=np.float64)
