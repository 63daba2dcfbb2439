"""The transaction a client sends: its field types hold every rule, and the Transaction
model puts them together.

A batch is validated column by column with the same field types, and training validates
its data the same way, so a row the server would reject can never be learned from. The
error messages name the row, the field and the broken rule.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from operator import itemgetter
from typing import Annotated, Any

from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    TypeAdapter,
    ValidationError,
)
from typing_extensions import TypedDict

from predictor.text import escaped

#: Merchant categories the model knows. Anything else is accepted and scored as "other".
KNOWN_MERCHANT_CATEGORIES: tuple[str, ...] = (
    "grocery",
    "restaurant",
    "gas_station",
    "pharmacy",
    "utilities",
    "entertainment",
    "travel",
    "online_retail",
    "electronics",
    "jewelry",
    "gambling",
    "money_transfer",
    "other",
)
OTHER_CATEGORY = "other"

# Realistic upper bounds: a value past them is a client bug, not a transaction, and bounded
# numbers can never overflow the float64 features.
MAX_AMOUNT = 1_000_000_000  # in the card's currency, whatever its unit
MAX_DISTANCE_KM = 20_040  # half the Earth's circumference
MAX_TRANSACTIONS_24H = 10_000
MAX_ACCOUNT_AGE_DAYS = 43_830  # 120 years
MAX_TIMESTAMP_CHARS = 40  # "2026-11-26T03:14:00.123456+05:30" is 32
MAX_CATEGORY_CHARS = 64

# Strict numbers: integers are fine for a float field, but "12.5" and true are refused.
Amount = Annotated[float, Field(strict=True, gt=0, le=MAX_AMOUNT, allow_inf_nan=False)]
Distance = Annotated[float, Field(strict=True, ge=0, le=MAX_DISTANCE_KM, allow_inf_nan=False)]


def _timestamp_is_text(value: Any) -> Any:
    """Refuse epoch numbers and other non-strings that pydantic would coerce."""
    if not isinstance(value, str):
        raise ValueError("must be an ISO-8601 date-time string with a UTC offset")
    if len(value) > MAX_TIMESTAMP_CHARS:
        raise ValueError(f"must be at most {MAX_TIMESTAMP_CHARS} characters")
    if "T" not in value and " " not in value:
        raise ValueError("must be a date-time with hours and a UTC offset, not a date")
    return value


def _printable_text(value: str) -> str:
    if not value.strip():
        raise ValueError("must not be blank")
    if not value.isprintable():
        raise ValueError("must not contain control characters")
    return value


Timestamp = Annotated[AwareDatetime, BeforeValidator(_timestamp_is_text)]
MerchantCategory = Annotated[
    str,
    Field(strict=True, min_length=1, max_length=MAX_CATEGORY_CHARS),
    AfterValidator(_printable_text),
]
TransactionCount = Annotated[StrictInt, Field(ge=0, le=MAX_TRANSACTIONS_24H)]
CustomerAge = Annotated[StrictInt, Field(ge=18, le=120)]
AccountAge = Annotated[StrictInt, Field(ge=0, le=MAX_ACCOUNT_AGE_DAYS)]


#: A client's id for a transaction (not a feature): printable text, at most this long.
MAX_TRANSACTION_ID_CHARS = 128
TransactionId = Annotated[
    str,
    Field(strict=True, min_length=1, max_length=MAX_TRANSACTION_ID_CHARS),
    AfterValidator(_printable_text),
]


class Transaction(BaseModel):
    """A card transaction as a client sends it; unknown fields are refused, not ignored.

    The field types carry every rule, so a batch validated column by column (see
    validate_columns) obeys exactly the rules of this model.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    amount: Amount = Field(description="Amount charged, in the card's currency; > 0.")
    timestamp: Timestamp = Field(
        description="ISO-8601 date-time with UTC offset; the local hour is the offset's."
    )
    merchant_category: MerchantCategory = Field(
        description="Merchant category; unknown categories are scored as 'other'."
    )
    card_present: StrictBool = Field(description="True when the card was physically present.")
    distance_from_home_km: Distance = Field(
        description="Distance between the point of sale and the cardholder's home, km."
    )
    transactions_last_24h: TransactionCount = Field(
        description="Transactions on this card in the preceding 24 hours."
    )
    customer_age: CustomerAge = Field(description="Cardholder age in years, 18-120.")
    account_age_days: AccountAge = Field(description="Days since the account was opened.")


#: The documented field order for V1 rows sent as lists.
FIELD_ORDER: tuple[str, ...] = tuple(Transaction.model_fields)

#: A validated batch: each field's values, in row order.
Columns = dict[str, list[Any]]

_ROWS = TypeAdapter(list[Transaction])
#: The model's fields with every rule they carry (type, constraints, validators), one list
#: per field: a batch is validated column by column, which costs a third of validating it
#: row by row (no model instance per row). Rules must live in the fields (test_schema.py).
_COLUMNS = TypeAdapter(
    TypedDict(  # type: ignore[misc]
        "TransactionColumns",
        {
            name: list[field.rebuild_annotation()]
            for name, field in Transaction.model_fields.items()
        },
    )
)
_FIELD_INDEX = {name: index for index, name in enumerate(FIELD_ORDER)}
_TRANSACTION_IDS = TypeAdapter(list[TransactionId | None])
_fields_of = itemgetter(*FIELD_ORDER)


class InvalidTransactions(ValueError):
    """A batch failed validation; the message names the row, the field and the rule."""


Locate = Callable[[tuple[int | str, ...]], str]


def shown(value: Any, limit: int = 40) -> str:
    """Client text in an error message or log line: cut at `limit` characters, quoted when
    it is text, and escaped onto one line (predictor.text.escaped), so a hostile body can
    neither flood nor forge either."""
    text = value if isinstance(value, str) else repr(value)
    if len(text) > limit:
        text = text[:limit] + "..."
    return escaped(repr(text) if isinstance(value, str) else text, limit=8 * limit)


def one_line(error: BaseException, limit: int = 200) -> str:
    """An exception raised by decoding client input, for an error message: its type, and its
    text on one line, shown() (escaped, cut at `limit`)."""
    return f"{type(error).__name__}: {shown(' '.join(str(error).split()), limit)}"


def shown_list(values: Sequence[Any], limit: int = 5) -> str:
    """At most `limit` values, each shown(), and how many more there were."""
    parts = [shown(value) for value in values[:limit]]
    if len(values) > limit:
        parts.append(f"... {len(values) - limit} more")
    return "[" + ", ".join(parts) + "]"


def instance_location(loc: tuple[int | str, ...]) -> str:
    """``instances[3].amount`` for pydantic's ``(3, "amount")``; odd keys are shown()."""
    where = "instances"
    for key in loc:
        if isinstance(key, int):
            where += f"[{key}]"
        else:
            plain = key.isidentifier() and len(key) <= 40
            where += f".{key}" if plain else f".{shown(key)}"
    return where


def error_message(item: Mapping[str, Any]) -> str:
    """pydantic's message for one error, without its "Value error, " prefix."""
    return str(item.get("msg", "")).removeprefix("Value error, ")


def describe_errors(
    items: Sequence[Mapping[str, Any]], locate: Locate = instance_location, max_errors: int = 5
) -> str:
    """pydantic (or FastAPI) errors as one line like ``instances[3].amount: must be > 0``:
    the first `max_errors`, and how many more there were."""
    parts = []
    for item in items[:max_errors]:
        if item.get("type") == "json_invalid":
            parts.append(f"request body is not valid JSON ({item.get('msg')})")
        else:
            parts.append(f"{locate(tuple(item.get('loc', ())))}: {error_message(item)}")
    if len(items) > max_errors:
        parts.append(f"... and {len(items) - max_errors} more")
    return "; ".join(parts)


def validate_rows(rows: Sequence[Any], locate: Locate = instance_location) -> Columns:
    """Validate a batch of mappings (V1 instances, records) with every problem named.

    Rows with exactly the transaction's fields are validated as columns; a batch with a
    row that misses a field, has an unknown one or is not a mapping is refused by the
    Transaction model, which names what is wrong with every row.
    """
    try:
        values = [_fields_of(row) for row in rows]
        uniform = all(len(row) == len(FIELD_ORDER) for row in rows)
    except (KeyError, TypeError):
        uniform = False
    if not uniform:
        return _validate_row_by_row(rows, locate)
    columns = zip(*values, strict=True) if values else ([] for _ in FIELD_ORDER)
    return validate_columns(dict(zip(FIELD_ORDER, columns, strict=True)), locate)


def validate_columns(
    columns: Mapping[str, Sequence[Any]], locate: Locate = instance_location
) -> Columns:
    """Validate a batch given as one equally long sequence per field (V2 tensors, frames).

    Errors are named and ordered as row-by-row validation would: by row, then by field.
    """
    try:
        return _COLUMNS.validate_python({name: columns[name] for name in FIELD_ORDER})
    except ValidationError as error:
        items = [
            {**item, "loc": _row_first(tuple(item["loc"]))}
            for item in error.errors(include_url=False)
        ]
        items.sort(key=lambda item: (item["loc"][0], _FIELD_INDEX[item["loc"][1]]))
        raise InvalidTransactions(describe_errors(items, locate)) from None


def validate_transaction_ids(
    ids: Sequence[Any], locate: Locate = instance_location, field: str = "transaction_id"
) -> list[str | None]:
    """Each row's transaction id (None: the server makes one), or InvalidTransactions
    naming the row as for any field."""
    try:
        return _TRANSACTION_IDS.validate_python(ids)
    except ValidationError as error:
        items = [
            {**item, "loc": (item["loc"][0], field)} for item in error.errors(include_url=False)
        ]
        raise InvalidTransactions(describe_errors(items, locate)) from None


def _row_first(loc: tuple[int | str, ...]) -> tuple[int | str, ...]:
    """pydantic's ``("amount", 3)`` for a column -> ``(3, "amount")``, as for a row."""
    field, *rest = loc
    return (*rest, field) if rest else (-1, field)


def _validate_row_by_row(rows: Sequence[Any], locate: Locate) -> Columns:
    """The Transaction model's verdict on rows that are not plain mappings of the fields:
    for a client's rows, a refusal naming what is wrong with each of them."""
    try:
        transactions = _ROWS.validate_python(rows)
    except ValidationError as error:
        raise InvalidTransactions(
            describe_errors(error.errors(include_url=False), locate)
        ) from None
    return {name: [getattr(txn, name) for txn in transactions] for name in FIELD_ORDER}
