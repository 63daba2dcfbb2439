"""The transaction rules: every bad field is refused with its name and the broken rule."""

import pytest

from predictor.features import FEATURE_NAMES, build_features, category_code, feature_frame
from predictor.schema import FIELD_ORDER, InvalidTransactions, validate_transactions

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


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
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
    ],
)
def test_bad_field_is_rejected_naming_field_and_rule(field, value, message):
    with pytest.raises(InvalidTransactions) as error:
        validate_transactions([GOOD, {**GOOD, field: value}])
    assert f"instances[1].{field}" in str(error.value)
    assert message in str(error.value)


def test_missing_and_unknown_fields_are_named():
    missing = {k: v for k, v in GOOD.items() if k != "customer_age"}
    with pytest.raises(InvalidTransactions, match=r"instances\[0\].customer_age: Field required"):
        validate_transactions([missing])
    with pytest.raises(InvalidTransactions, match=r"instances\[0\].mcc: Extra inputs"):
        validate_transactions([{**GOOD, "mcc": 5411}])


def test_good_transaction_is_accepted_with_integers_for_numbers():
    (txn,) = validate_transactions([GOOD])
    assert txn.distance_from_home_km == 3.0
    assert list(FIELD_ORDER) == list(GOOD)


def test_features_use_local_wall_clock_and_map_unknown_category_to_other():
    rows = validate_transactions(
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
