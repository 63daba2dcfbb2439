"""`fraud-outcomes import FILE.csv`: the truth about transactions, into the ledger.

The file has a header row with `transaction_id,is_fraud` and optionally `labelled_at`
and `source`, in any order; `is_fraud` is 0/1 or true/false; `labelled_at` an ISO-8601 date
or date-time (UTC when it has no offset). A later import of the same transaction id
replaces its outcome. A file with any bad row imports nothing: exit 2, one line naming the
row and the problem.
"""

from __future__ import annotations

import argparse
import csv
import sys
from datetime import UTC, datetime
from pathlib import Path

from predictor.schema import MAX_TRANSACTION_ID_CHARS
from predictor.settings import ConfigurationError
from predictor.store import OUTCOME_COLUMNS, Store, StoreError, redacted

REQUIRED = ("transaction_id", "is_fraud")
TRUE, FALSE = {"1", "true"}, {"0", "false"}
MAX_SOURCE_CHARS = 256


class BadFile(ValueError):
    """The file cannot be imported; the message names the row and the problem."""


def parse_time(text: str) -> datetime:
    """An ISO-8601 date or date-time; UTC where no offset is given."""
    moment = datetime.fromisoformat(text)
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def read_outcomes(path: Path) -> list[tuple]:
    """Every row of the file as (transaction_id, is_fraud, labelled_at, source), or
    BadFile naming the first problem."""
    try:
        with path.open(newline="", encoding="utf-8-sig") as file:
            reader = csv.reader(file)
            header = next(reader, None)
            if header is None:
                raise BadFile(
                    "the file is empty; expected a header row with transaction_id,is_fraud"
                )
            header = [name.strip() for name in header]
            missing = [name for name in REQUIRED if name not in header]
            unknown = [name for name in header if name not in OUTCOME_COLUMNS]
            if missing or unknown or len(set(header)) != len(header):
                raise BadFile(
                    f"row 1 (header): columns must be transaction_id,is_fraud and optionally "
                    f"labelled_at,source, each once; got {','.join(header)}"
                )
            seen: dict[str, int] = {}
            rows = []
            for number, values in enumerate(reader, start=2):
                if not any(value.strip() for value in values):
                    continue  # a blank line
                rows.append(
                    _outcome(dict(zip(header, values, strict=False)), values, header, number, seen)
                )
            return rows
    except UnicodeDecodeError as error:
        raise BadFile(f"not UTF-8 text ({error.reason} at byte {error.start})") from None
    except csv.Error as error:
        raise BadFile(f"not CSV: {error}") from None


def _outcome(row: dict, values: list, header: list, number: int, seen: dict) -> tuple:
    where = f"row {number}"
    if len(values) != len(header):
        raise BadFile(f"{where}: {len(values)} values for {len(header)} columns")
    transaction_id = row["transaction_id"].strip()
    if not transaction_id or len(transaction_id) > MAX_TRANSACTION_ID_CHARS:
        raise BadFile(f"{where}: transaction_id must be 1-{MAX_TRANSACTION_ID_CHARS} characters")
    if not transaction_id.isprintable():
        raise BadFile(f"{where}: transaction_id must not contain control characters")
    if transaction_id in seen:
        raise BadFile(
            f"{where}: transaction_id {transaction_id!r} already given in row "
            f"{seen[transaction_id]}"
        )
    seen[transaction_id] = number
    flag = row["is_fraud"].strip().lower()
    if flag not in TRUE | FALSE:
        raise BadFile(f"{where}: is_fraud must be 0, 1, true or false, got {row['is_fraud']!r}")
    labelled_at = None
    if row.get("labelled_at", "").strip():
        try:
            labelled_at = parse_time(row["labelled_at"].strip())
        except ValueError:
            raise BadFile(
                f"{where}: labelled_at must be an ISO-8601 date or date-time, "
                f"got {row['labelled_at'][:40]!r}"
            ) from None
    source = row.get("source", "").strip() or None
    if source is not None and len(source) > MAX_SOURCE_CHARS:
        raise BadFile(f"{where}: source must be at most {MAX_SOURCE_CHARS} characters")
    return transaction_id, flag in TRUE, labelled_at, source


def import_file(path: Path, ledger_uri: str) -> int:
    """Validate the whole file, then write it in one transaction; the rows imported."""
    rows = read_outcomes(path)
    store = Store(ledger_uri)
    try:
        store.migrate()
        return store.replace_outcomes(rows)
    finally:
        store.close()


def default_ledger() -> str:
    """DECISION_LOG_URI, with the server's default (the embedded store's SQLite file)."""
    from predictor.settings import load_settings

    return load_settings().decision_log_location


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="fraud-outcomes",
        description="Import the truth about transactions (chargebacks, confirmed fraud) "
        "into the decision ledger.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    importing = commands.add_parser("import", help="import a CSV file of outcomes")
    importing.add_argument(
        "file", type=Path, help="CSV: transaction_id,is_fraud[,labelled_at,source]"
    )
    importing.add_argument(
        "--ledger", help="database URI (default: DECISION_LOG_URI, as the server reads it)"
    )
    args = parser.parse_args(argv)
    try:
        ledger = args.ledger or default_ledger()
        if ledger == "none":
            raise BadFile("no ledger: set DECISION_LOG_URI or pass --ledger")
        count = import_file(args.file, ledger)
    except (BadFile, OSError) as error:
        print(f"error: {args.file}: {error}", file=sys.stderr)
        return 2
    except (StoreError, ConfigurationError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"imported {count} outcomes from {args.file} into {redacted(ledger)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
