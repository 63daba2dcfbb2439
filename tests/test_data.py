"""The synthetic generator and the CSV loader."""

import pandas as pd
import pytest

from predictor.data import (
    CSV_COLUMNS,
    InvalidDataset,
    generate_transactions,
    read_transactions_csv,
    to_columns,
)


def test_generator_is_deterministic_per_seed():
    first = generate_transactions(rows=2_000, seed=11)
    again = generate_transactions(rows=2_000, seed=11)
    other = generate_transactions(rows=2_000, seed=12)
    pd.testing.assert_frame_equal(first, again)
    assert not first.equals(other)
    assert list(first.columns) == list(CSV_COLUMNS)


@pytest.mark.parametrize("fraud_rate", [0.01, 0.02, 0.1])
def test_generator_hits_requested_fraud_rate(fraud_rate):
    frame = generate_transactions(rows=50_000, fraud_rate=fraud_rate, seed=3)
    assert frame["is_fraud"].mean() == pytest.approx(fraud_rate, rel=0.1)


def test_generated_rows_pass_the_servers_rules():
    frame = generate_transactions(rows=5_000, seed=5)
    assert all(len(values) == 5_000 for values in to_columns(frame).values())


def test_fraud_shows_the_documented_patterns_more_often():
    frame = generate_transactions(rows=50_000, fraud_rate=0.05, seed=9)
    hour = pd.to_datetime(frame["timestamp"].str[11:13], format="%H").dt.hour
    fraud, legit = frame[frame.is_fraud == 1], frame[frame.is_fraud == 0]
    assert (hour[fraud.index] < 6).mean() > 2 * (hour[legit.index] < 6).mean()
    assert (~fraud.card_present).mean() > (~legit.card_present).mean()
    assert fraud.amount.median() > 1.5 * legit.amount.median()
    assert fraud.transactions_last_24h.mean() > 1.5 * legit.transactions_last_24h.mean()
    assert (fraud.account_age_days < 30).mean() > 5 * (legit.account_age_days < 30).mean()


def test_csv_round_trip(tmp_path):
    frame = generate_transactions(rows=300, seed=1)
    path = tmp_path / "t.csv"
    frame.to_csv(path, index=False)
    loaded = read_transactions_csv(path)
    assert len(loaded) == 300
    assert loaded["card_present"].dtype == bool


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda f: f.drop(columns=["customer_age"]), "missing column(s) customer_age"),
        (lambda f: f.assign(amount=["abc", *list(f.amount[1:])]), "'amount', row 1"),
        (lambda f: f.assign(card_present=["maybe"] * len(f)), "not a boolean"),
        (lambda f: f.assign(customer_age=[7] * len(f)), "row 1, column 'customer_age'"),
        (lambda f: f.assign(is_fraud=[2] * len(f)), "only 0 and 1"),
        (lambda f: f.iloc[0:0], "no rows"),
    ],
)
def test_bad_csv_is_refused_naming_the_problem(tmp_path, mutate, message):
    path = tmp_path / "bad.csv"
    mutate(generate_transactions(rows=50, seed=1)).to_csv(path, index=False)
    with pytest.raises(InvalidDataset) as error:
        read_transactions_csv(path)
    assert message in str(error.value)


def test_empty_file_is_refused(tmp_path):
    path = tmp_path / "empty.csv"
    path.write_text("")
    with pytest.raises(InvalidDataset, match="empty"):
        read_transactions_csv(path)
