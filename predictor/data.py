"""Synthetic card transactions with plausible fraud patterns, and loading a user's CSV.

Fraud patterns (each fraudulent row shows a random subset of them, so some fraud looks
ordinary and the problem stays learnable but not trivial):

* night hours (00:00-05:59 local time);
* card not present;
* a high amount for the customer (several times their typical spend);
* far from home;
* a burst of transactions in the last 24 hours;
* a risky merchant category (electronics, jewelry, gambling, money transfer, online retail);
* a young account (days, not years).

Legitimate rows show each of these sometimes too (travel, online shopping, late meals),
and every numeric column carries noise.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import orjson
import pandas as pd

from predictor.schema import (
    FIELD_ORDER,
    MAX_DISTANCE_KM,
    Columns,
    InvalidTransactions,
    validate_columns,
)

LABEL = "is_fraud"
CSV_COLUMNS: tuple[str, ...] = (*FIELD_ORDER, LABEL)

LEGIT_CATEGORIES = {
    "grocery": 0.22,
    "restaurant": 0.17,
    "gas_station": 0.12,
    "pharmacy": 0.06,
    "utilities": 0.06,
    "entertainment": 0.07,
    "travel": 0.04,
    "online_retail": 0.14,
    "electronics": 0.04,
    "jewelry": 0.01,
    "gambling": 0.01,
    "money_transfer": 0.02,
    "other": 0.04,
}
RISKY_CATEGORIES = {
    "electronics": 0.3,
    "jewelry": 0.15,
    "gambling": 0.15,
    "money_transfer": 0.2,
    "online_retail": 0.2,
}
# Typical spend scale per category (median amount of a legitimate purchase).
CATEGORY_SPEND = {
    "grocery": 45.0,
    "restaurant": 35.0,
    "gas_station": 50.0,
    "pharmacy": 25.0,
    "utilities": 90.0,
    "entertainment": 40.0,
    "travel": 300.0,
    "online_retail": 60.0,
    "electronics": 250.0,
    "jewelry": 400.0,
    "gambling": 100.0,
    "money_transfer": 200.0,
    "other": 50.0,
}
UTC_OFFSETS_HOURS = (-8.0, -5.0, 0.0, 1.0, 5.5, 9.0)
START = datetime(2026, 1, 1, tzinfo=UTC)

# Probability that a fraudulent row shows each pattern.
FRAUD_PATTERN_RATE = 0.45


class InvalidDataset(ValueError):
    """A dataset cannot be used; the message says which column or row and why."""


def generate_transactions(
    rows: int = 50_000, fraud_rate: float = 0.02, seed: int = 42
) -> pd.DataFrame:
    """A frame of CSV_COLUMNS; the same (rows, fraud_rate, seed) always gives the same frame."""
    if rows < 1:
        raise ValueError("rows must be at least 1")
    if not 0.0 < fraud_rate < 1.0:
        raise ValueError("fraud_rate must be between 0 and 1 (exclusive)")
    rng = np.random.default_rng(seed)
    is_fraud = rng.random(rows) < fraud_rate

    def shows(pattern_rate: float) -> np.ndarray:
        """Rows where a fraud shows a pattern (never for legitimate rows)."""
        return is_fraud & (rng.random(rows) < pattern_rate)

    # Categories: legitimate mix, risky mix for fraud that shows the pattern.
    legit_names = list(LEGIT_CATEGORIES)
    legit_p = np.array(list(LEGIT_CATEGORIES.values()))
    categories = rng.choice(legit_names, size=rows, p=legit_p / legit_p.sum())
    risky = shows(FRAUD_PATTERN_RATE)
    risky_names = list(RISKY_CATEGORIES)
    risky_p = np.array(list(RISKY_CATEGORIES.values()))
    categories[risky] = rng.choice(risky_names, size=int(risky.sum()), p=risky_p / risky_p.sum())

    # Local hour: daytime-heavy for everyone; night for fraud showing the pattern.
    hour = np.clip(rng.normal(14.0, 4.0, rows), 0, 23.99)
    late = rng.random(rows) < 0.06  # legitimate late-night purchases
    hour[late] = rng.uniform(0, 6, int(late.sum()))
    night = shows(FRAUD_PATTERN_RATE)
    hour[night] = rng.uniform(0, 6, int(night.sum()))

    # Amount: customer's typical spend x category scale, high multiple for fraud.
    spend = np.array([CATEGORY_SPEND[c] for c in categories])
    amount = spend * rng.lognormal(0.0, 0.6, rows)
    high = shows(FRAUD_PATTERN_RATE)
    amount[high] *= rng.uniform(3.0, 12.0, int(high.sum()))
    amount = np.round(np.maximum(amount, 0.5), 2)

    card_present = rng.random(rows) < 0.7
    card_present[shows(FRAUD_PATTERN_RATE + 0.2)] = False
    card_present[np.isin(categories, ["online_retail", "money_transfer"])] = False

    distance = rng.exponential(8.0, rows)
    travelling = rng.random(rows) < 0.04
    distance[travelling] = rng.lognormal(5.0, 1.0, int(travelling.sum()))
    far = shows(FRAUD_PATTERN_RATE)
    distance[far] = rng.lognormal(5.5, 1.0, int(far.sum()))
    distance = np.round(np.minimum(distance, MAX_DISTANCE_KM), 1)

    txn_24h = rng.poisson(2.5, rows)
    burst = shows(FRAUD_PATTERN_RATE)
    txn_24h[burst] = rng.poisson(11.0, int(burst.sum()))

    customer_age = np.clip(np.round(rng.normal(45.0, 15.0, rows)), 18, 95).astype(int)

    account_age = np.round(rng.exponential(1500.0, rows) + rng.uniform(0, 60, rows)).astype(int)
    young = shows(FRAUD_PATTERN_RATE - 0.15)
    account_age[young] = rng.integers(0, 30, int(young.sum()))

    day = rng.integers(0, 365, rows)
    offsets = rng.choice(UTC_OFFSETS_HOURS, size=rows)
    minutes = (hour * 60).astype(int)
    timestamps = [
        (START + timedelta(days=int(d), minutes=int(m)))
        .replace(tzinfo=timezone(timedelta(hours=float(o))))
        .isoformat()
        for d, m, o in zip(day, minutes, offsets, strict=True)
    ]

    return pd.DataFrame(
        {
            "amount": amount,
            "timestamp": timestamps,
            "merchant_category": categories,
            "card_present": card_present,
            "distance_from_home_km": distance,
            "transactions_last_24h": txn_24h.astype(int),
            "customer_age": customer_age,
            "account_age_days": account_age,
            LABEL: is_fraud.astype(int),
        },
        columns=list(CSV_COLUMNS),
    )


def _parse_bool(column: pd.Series, name: str) -> pd.Series:
    mapping = {"true": True, "false": False, "1": True, "0": False}
    text = column.astype(str).str.strip().str.lower()
    unknown = ~text.isin(mapping)
    if unknown.any():
        row = int(np.flatnonzero(unknown.to_numpy())[0])
        raise InvalidDataset(
            f"column {name!r}, row {row + 1}: {column.iloc[row]!r} is not a boolean "
            "(true/false/1/0)"
        )
    return text.map(mapping).astype(bool)


def _parse_number(column: pd.Series, name: str, integer: bool) -> pd.Series:
    numbers = pd.to_numeric(column, errors="coerce")
    bad = numbers.isna() | ~np.isfinite(numbers.astype(float))
    if integer:
        bad |= numbers.fillna(0) % 1 != 0
    if bad.any():
        row = int(np.flatnonzero(bad.to_numpy())[0])
        kind = "an integer" if integer else "a number"
        raise InvalidDataset(f"column {name!r}, row {row + 1}: {column.iloc[row]!r} is not {kind}")
    return numbers.astype(int) if integer else numbers.astype(float)


def read_transactions_csv(path: str | Path) -> pd.DataFrame:
    """Load and validate a CSV of CSV_COLUMNS with the same rules the server enforces."""
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    except FileNotFoundError:
        raise InvalidDataset(f"{path}: no such file") from None
    except pd.errors.EmptyDataError:
        raise InvalidDataset(f"{path}: the file is empty") from None
    except (pd.errors.ParserError, UnicodeDecodeError) as error:
        raise InvalidDataset(f"{path}: not a readable CSV ({error})") from None
    missing = [c for c in CSV_COLUMNS if c not in frame.columns]
    if missing:
        raise InvalidDataset(f"{path}: missing column(s) {', '.join(missing)}")
    if frame.empty:
        raise InvalidDataset(f"{path}: the file has a header but no rows")
    frame = frame[list(CSV_COLUMNS)].copy()
    for name in ("amount", "distance_from_home_km"):
        frame[name] = _parse_number(frame[name], name, integer=False)
    for name in ("transactions_last_24h", "customer_age", "account_age_days", LABEL):
        frame[name] = _parse_number(frame[name], name, integer=True)
    frame["card_present"] = _parse_bool(frame["card_present"], "card_present")
    if not frame[LABEL].isin([0, 1]).all():
        raise InvalidDataset(f"column {LABEL!r} must hold only 0 and 1")
    to_columns(frame)  # the server's rules; raises naming the first bad rows
    return frame


_LABELLED = """
WITH ranked AS (
    SELECT transaction_id, "transaction", scored_at,
           ROW_NUMBER() OVER (PARTITION BY transaction_id ORDER BY scored_at DESC) AS newest
    FROM decisions WHERE scored_at >= ?
)
SELECT r."transaction", o.is_fraud
FROM ranked r JOIN outcomes o ON o.transaction_id = r.transaction_id
WHERE r.newest = 1
ORDER BY r.scored_at, r.transaction_id
"""


def read_ledger_transactions(uri: str, since: datetime | None = None) -> pd.DataFrame:
    """Labelled production traffic: each transaction of the decision ledger as its client
    sent it (latest decision), with its imported outcome; validated with the server's rules."""
    from predictor.store import Store, StoreError

    try:
        store = Store(uri)
    except StoreError as error:
        raise InvalidDataset(str(error)) from None
    try:
        moment = since or datetime(1970, 1, 1, tzinfo=UTC)
        rows = store.query(_LABELLED, (store.timestamp(moment),))
    except Exception as error:
        raise InvalidDataset(f"reading the ledger: {' '.join(str(error).split())}") from None
    finally:
        store.close()
    if not rows:
        raise InvalidDataset("the ledger has no labelled decisions (import outcomes first)")
    records = []
    for transaction, is_fraud in rows:
        fields = orjson.loads(transaction) if isinstance(transaction, str | bytes) else transaction
        records.append({**{name: fields.get(name) for name in FIELD_ORDER}, LABEL: int(is_fraud)})
    frame = pd.DataFrame.from_records(records, columns=list(CSV_COLUMNS))
    to_columns(frame)  # the server's rules; raises naming the first bad row
    return frame


def _csv_location(loc: tuple[int | str, ...]) -> str:
    """``row 4, column 'amount'`` (1-based data rows, as a spreadsheet shows them)."""
    row, *rest = loc
    where = f"row {row + 1}" if isinstance(row, int) else str(row)
    return where + "".join(f", column {key!r}" for key in rest)


def to_columns(frame: pd.DataFrame) -> Columns:
    """Validate a frame's transactions (training and serving share these rules).

    `tolist()` gives Python values, as JSON would: bool, int, float and str.
    """
    try:
        return validate_columns(
            {name: frame[name].tolist() for name in FIELD_ORDER}, locate=_csv_location
        )
    except InvalidTransactions as error:
        raise InvalidDataset(str(error)) from None


def transaction_payloads(frame: pd.DataFrame) -> list[dict]:
    """Rows as the JSON objects a client sends (for examples, smoke, load and benchmarks)."""
    to_columns(frame)
    return frame[list(FIELD_ORDER)].to_dict(orient="records")
