"""The transaction rules: every bad field is refused with its name and the broken rule."""

import math

import numpy as np
import pytest
from pydantic import TypeAdapter, ValidationError

from predictor.data import generate_transactions, transaction_payloads
from predictor.features import (
    FEATURE_NAMES,
    NIGHT_HOURS,
    build_features,
    category_code,
    feature_frame,
)
from predictor.schema import (
    FIELD_ORDER,
    InvalidTransactions,
    Transaction,
    describe_errors,
    validate_rows,
)

GOOD = {
    "amount": 12.5,
    "timestamp": "2026-11-26T03:14:00+00:00",
    "merchant_category": "grocery",
    "card_present": True,
    "distance_from_home_km": 3,
    "transactions_last_24h": 2,
    "customer_age": 40,
    "account_age_days": 400,
}


BAD_FIELDS = [
    ("amount", -5.0, "greater than 0"),
    ("amount", 0, "greater than 0"),
    ("amount", "12.5", "valid number"),
    ("amount", True, "valid number"),
    ("amount", None, "valid number"),
    ("timestamp", "2026-11-26", "not a date"),
    ("timestamp", "2026-11-26T03:14:00", "timezone"),
    ("timestamp", "yesterday", "not a date"),
    ("timestamp", 1764126840, "ISO-8601"),
    ("merchant_category", 7, "valid string"),
    ("merchant_category", "", "at least 1"),
    ("card_present", 1, "valid boolean"),
    ("card_present", "yes", "valid boolean"),
    ("distance_from_home_km", -0.1, "greater than or equal to 0"),
    ("transactions_last_24h", -1, "greater than or equal to 0"),
    ("transactions_last_24h", 2.5, "valid integer"),
    ("customer_age", 7, "greater than or equal to 18"),
    ("customer_age", 121, "less than or equal to 120"),
    ("customer_age", True, "valid integer"),
    ("account_age_days", "400", "valid integer"),
    ("amount", 10**400, "valid number"),
    ("amount", 1e10, "less than or equal to 1000000000"),
    ("distance_from_home_km", 40_000, "less than or equal to 20040"),
    ("transactions_last_24h", 2**63, "less than or equal to 10000"),
    ("account_age_days", 10**300, "less than or equal to 43830"),
    ("timestamp", "2026-11-26T03:14:00." + "1" * 5000 + "+00:00", "at most 40 characters"),
    ("merchant_category", "   ", "must not be blank"),
    ("merchant_category", "grocery\nERROR forged log line", "control characters"),
    ("merchant_category", "gro\x00cery", "control characters"),
]
#: Unusual values the rules accept.
ODD_BUT_GOOD_FIELDS = [
    ("amount", 1),
    ("amount", 1_000_000_000),
    ("timestamp", "2026-11-26 03:14:00+05:30"),
    ("timestamp", "2026-11-26T03:14:00.123456Z"),
    ("timestamp", "2026-11-26T23:59:59-11:45"),
    ("merchant_category", "  Jewelry "),
    ("merchant_category", "café du coin"),
    ("distance_from_home_km", 0),
    ("transactions_last_24h", 10_000),
    ("customer_age", 120),
]


@pytest.mark.parametrize(("field", "value", "message"), BAD_FIELDS)
def test_bad_field_is_rejected_naming_field_and_rule(field, value, message):
    with pytest.raises(InvalidTransactions) as error:
        validate_rows([GOOD, {**GOOD, field: value}])
    assert f"instances[1].{field}" in str(error.value)
    assert message in str(error.value)


def test_missing_and_unknown_fields_are_named():
    missing = {k: v for k, v in GOOD.items() if k != "customer_age"}
    with pytest.raises(InvalidTransactions, match=r"instances\[0\].customer_age: Field required"):
        validate_rows([missing])
    with pytest.raises(InvalidTransactions, match=r"instances\[0\].mcc: Extra inputs"):
        validate_rows([{**GOOD, "mcc": 5411}])


def test_good_transaction_is_accepted_with_integers_for_numbers():
    columns = validate_rows([GOOD])
    assert columns["distance_from_home_km"] == [3.0]
    assert isinstance(columns["distance_from_home_km"][0], float)
    assert list(FIELD_ORDER) == list(GOOD)


def test_features_use_local_wall_clock_and_map_unknown_category_to_other():
    rows = validate_rows(
        [
            {**GOOD, "timestamp": "2026-11-26T03:14:00+09:00", "merchant_category": "Jewelry"},
            {**GOOD, "timestamp": "2026-11-26T23:59:00-05:00", "merchant_category": "tattoo"},
        ]
    )
    frame = feature_frame(build_features(rows))
    assert list(frame.columns) == list(FEATURE_NAMES)
    assert frame["hour_of_day"].tolist() == [3.0, 23.0]
    assert frame["is_night"].tolist() == [1.0, 0.0]
    assert frame["day_of_week"].tolist() == [3.0, 3.0]  # both Thursday, local time
    assert frame["merchant_category_code"].tolist() == [
        category_code("jewelry"),
        category_code("other"),
    ]
    assert (frame.dtypes == "float64").all()


ROW_BY_ROW = TypeAdapter(list[Transaction])


def test_every_rule_lives_in_the_field_types():
    """Batches are validated with the fields' own types: a model-level or decorator
    validator would be skipped there, so the model must have none."""
    decorators = Transaction.__pydantic_decorators__
    assert not decorators.validators and not decorators.field_validators
    assert not decorators.root_validators and not decorators.model_validators


def test_rows_that_are_not_plain_mappings_are_validated_by_the_model():
    (txn,) = ROW_BY_ROW.validate_python([GOOD])
    columns = validate_rows([txn])
    assert columns == validate_rows([GOOD])
    with pytest.raises(InvalidTransactions, match=r"instances\[1\]: Input should be a valid"):
        validate_rows([GOOD, "not a row"])


def validated_row_by_row(rows: list[dict]) -> list[Transaction] | str:
    """The Transaction model's verdict on each row: the models, or the error message."""
    try:
        return ROW_BY_ROW.validate_python(rows)
    except ValidationError as error:
        return describe_errors(error.errors(include_url=False))


@pytest.mark.parametrize(
    ("field", "value"),
    [(field, value) for field, value, _ in BAD_FIELDS] + ODD_BUT_GOOD_FIELDS,
)
def test_a_batch_validated_by_columns_obeys_exactly_the_transaction_models_rules(field, value):
    """Batches are validated column by column; the verdict, the values and the message
    (every error, ordered by row then field) must be the model's own."""
    rows = [GOOD, {**GOOD, field: value}, {**GOOD, field: value, "customer_age": 7}]
    rows += [{**GOOD, "amount": -1.0, "card_present": "no"}] * 4
    for batch in (rows[:2], rows):
        expected = validated_row_by_row(batch)
        try:
            columns = validate_rows(batch)
        except InvalidTransactions as error:
            assert str(error) == expected
        else:
            assert isinstance(expected, list), expected
            for name in FIELD_ORDER:
                values = [getattr(txn, name) for txn in expected]
                assert columns[name] == values
                assert [type(v) for v in columns[name]] == [type(v) for v in values]


def reference_features(txn: Transaction) -> list[float]:
    """One row's features computed independently, as the server computed them row by row
    (models registered before stay scored on exactly the features they learned from)."""
    local_time = txn.timestamp
    return [
        math.log1p(txn.amount),
        local_time.hour,
        local_time.weekday(),
        local_time.hour in NIGHT_HOURS,
        txn.card_present,
        txn.distance_from_home_km,
        txn.transactions_last_24h,
        txn.customer_age,
        txn.account_age_days,
        category_code(txn.merchant_category),
    ]


def test_features_of_a_batch_equal_each_rows_own_features_to_the_bit():
    rows = transaction_payloads(generate_transactions(rows=3_000, fraud_rate=0.2, seed=7))
    rows += [{**GOOD, field: value} for field, value in ODD_BUT_GOOD_FIELDS]
    expected = np.array(
        [reference_features(txn) for txn in ROW_BY_ROW.validate_python(rows)], dtype=np.float64
    )
    assert np.array_equal(build_features(validate_rows(rows)), expected)
    assert np.array_equal(build_features(validate_rows(rows[:1])), expected[:1])
    assert build_features(validate_rows([])).shape == (0, len(FEATURE_NAMES))
