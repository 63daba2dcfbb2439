"""Transactions -> the model's feature matrix. Training and serving both call this.

The estimator receives a plain float64 matrix (no pandas on the request path); the
frame form exists for the MLflow signature and for humans, with the same columns.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pandas as pd

from predictor.schema import KNOWN_MERCHANT_CATEGORIES, OTHER_CATEGORY, Transaction

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


def feature_row(txn: Transaction) -> tuple[float | int | bool, ...]:
    """One transaction's features, in FEATURE_NAMES order (ints and bools become float64
    in the matrix: exact for every value the schema admits)."""
    local_time = txn.timestamp  # wall-clock time at the point of sale, per its offset
    hour = local_time.hour
    return (
        math.log1p(txn.amount),
        hour,
        local_time.weekday(),
        hour in NIGHT_HOURS,
        txn.card_present,
        txn.distance_from_home_km,
        txn.transactions_last_24h,
        txn.customer_age,
        txn.account_age_days,
        category_code(txn.merchant_category),
    )


def build_features(transactions: Sequence[Transaction]) -> np.ndarray:
    """Feature matrix (n rows x len(FEATURE_NAMES)) for validated transactions."""
    matrix = np.array([feature_row(txn) for txn in transactions], dtype=np.float64)
    return matrix.reshape(len(transactions), len(FEATURE_NAMES))


def feature_frame(matrix: np.ndarray) -> pd.DataFrame:
    """The matrix as the named frame that the model's MLflow signature describes."""
    return pd.DataFrame(matrix, columns=list(FEATURE_NAMES), dtype=np.float64)
