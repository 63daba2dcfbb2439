"""The decision ledger's database: SQLite or PostgreSQL, one schema, versioned migrations.

Tables (a contract analysts query; same names and meaning on both backends):

* `decisions`: one row per scored transaction (see DECISION_COLUMNS);
* `outcomes`: the truth about a transaction, when it is known (`fraud-outcomes import`);
* `schema_migrations`: which migrations have been applied.

SQLite stores timestamps as ISO-8601 text in UTC (`2026-12-03T08:10:58.123456+00:00`, which
sorts in time order), booleans as 0/1 and JSON as text; PostgreSQL uses `timestamptz`,
`boolean` and `jsonb`.
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from predictor.text import one_line

#: `decisions` columns, in the order rows are written.
DECISION_COLUMNS = (
    "transaction_id",
    "request_id",
    "scored_at",
    "model_name",
    "model_version",
    "probability",
    "threshold",
    "is_fraud",
    "transaction",
    "protocol",
    "shadow_version",
    "shadow_probability",
)
OUTCOME_COLUMNS = ("transaction_id", "is_fraud", "labelled_at", "source")


@dataclass(frozen=True)
class Migration:
    version: int
    description: str
    sqlite: tuple[str, ...]
    postgresql: tuple[str, ...]


MIGRATIONS = (
    Migration(
        1,
        "decisions and outcomes",
        sqlite=(
            """CREATE TABLE decisions (
                transaction_id TEXT NOT NULL,
                request_id TEXT,
                scored_at TEXT NOT NULL,
                model_name TEXT NOT NULL,
                model_version TEXT NOT NULL,
                probability REAL NOT NULL,
                threshold REAL NOT NULL,
                is_fraud INTEGER NOT NULL CHECK (is_fraud IN (0, 1)),
                "transaction" TEXT NOT NULL,
                protocol TEXT NOT NULL
            )""",
            "CREATE INDEX decisions_by_transaction ON decisions (transaction_id, scored_at)",
            "CREATE INDEX decisions_by_time ON decisions (scored_at)",
            """CREATE TABLE outcomes (
                transaction_id TEXT PRIMARY KEY,
                is_fraud INTEGER NOT NULL CHECK (is_fraud IN (0, 1)),
                labelled_at TEXT,
                source TEXT
            )""",
        ),
        postgresql=(
            """CREATE TABLE decisions (
                transaction_id text NOT NULL,
                request_id text,
                scored_at timestamptz NOT NULL,
                model_name text NOT NULL,
                model_version text NOT NULL,
                probability double precision NOT NULL,
                threshold double precision NOT NULL,
                is_fraud boolean NOT NULL,
                transaction jsonb NOT NULL,
                protocol text NOT NULL
            )""",
            "CREATE INDEX decisions_by_transaction ON decisions (transaction_id, scored_at)",
            "CREATE INDEX decisions_by_time ON decisions (scored_at)",
            """CREATE TABLE outcomes (
                transaction_id text PRIMARY KEY,
                is_fraud boolean NOT NULL,
                labelled_at timestamptz,
                source text
            )""",
        ),
    ),
    Migration(
        2,
        "shadow scoring: the challenger's version and probability",
        sqlite=(
            "ALTER TABLE decisions ADD COLUMN shadow_version TEXT",
            "ALTER TABLE decisions ADD COLUMN shadow_probability REAL",
        ),
        postgresql=(
            "ALTER TABLE decisions ADD COLUMN shadow_version text",
            "ALTER TABLE decisions ADD COLUMN shadow_probability double precision",
        ),
    ),
    Migration(
        3,
        "PostgreSQL: a BRIN index for time ranges (decisions arrive in time order; a B-tree"
        " on scored_at costs every insert far more and is no faster for --since/--until)",
        sqlite=(),
        postgresql=(
            "DROP INDEX decisions_by_time",
            "CREATE INDEX decisions_by_time ON decisions USING brin (scored_at)",
        ),
    ),
)


class StoreError(Exception):
    """The database cannot be used (unreachable, refused, or not a ledger)."""


def backend_of(uri: str) -> str:
    if uri.startswith("sqlite:///"):
        return "sqlite"
    if uri.startswith(("postgresql://", "postgres://")):
        return "postgresql"
    raise ValueError("must be sqlite:///PATH, postgresql://... or none")


def utc_text(moment: datetime) -> str:
    """A timestamp as SQLite stores it: ISO-8601 in UTC, microseconds always written."""
    return moment.astimezone(UTC).isoformat(timespec="microseconds")


class Store:
    """One connection to the ledger's database (not shared between threads)."""

    def __init__(self, uri: str, connect_timeout: float = 5.0):
        self.uri = uri
        self.backend = backend_of(uri)
        try:
            if self.backend == "sqlite":
                path = Path(uri.removeprefix("sqlite:///"))
                path.parent.mkdir(parents=True, exist_ok=True)
                self.connection: Any = sqlite3.connect(path, timeout=connect_timeout)
                self.connection.execute("PRAGMA journal_mode=WAL")
                self.connection.execute("PRAGMA synchronous=NORMAL")
            else:
                import psycopg

                self.connection = psycopg.connect(
                    uri, connect_timeout=max(1, int(connect_timeout)), autocommit=False
                )
        except Exception as error:
            raise StoreError(f"cannot connect to {redacted(uri)}: {one_line(error)}") from None

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.connection.close()

    # ------------------------------------------------------------------ migrations

    def migrate(self) -> list[int]:
        """Apply the migrations not yet applied, each in its own transaction; the ones
        applied now. Safe to run from several processes at once on PostgreSQL (an
        advisory lock orders them)."""
        applied_now = []
        cursor = self.connection.cursor()
        try:
            if self.backend == "postgresql":
                cursor.execute("SELECT pg_advisory_xact_lock(7315020011)")
                cursor.execute("SELECT to_regclass('schema_migrations')")
                if cursor.fetchone()[0] is None:  # CREATE only when needed: a role that may
                    cursor.execute(  # only read and insert can run a migrated ledger
                        "CREATE TABLE schema_migrations ("
                        "version integer PRIMARY KEY, description text NOT NULL, "
                        "applied_at timestamptz NOT NULL DEFAULT now())"
                    )
            else:
                cursor.execute("BEGIN IMMEDIATE")
                cursor.execute(
                    "CREATE TABLE IF NOT EXISTS schema_migrations ("
                    "version INTEGER PRIMARY KEY, description TEXT NOT NULL, "
                    "applied_at TEXT NOT NULL)"
                )
            cursor.execute("SELECT version FROM schema_migrations")
            done = {row[0] for row in cursor.fetchall()}
            for migration in MIGRATIONS:
                if migration.version in done:
                    continue
                for statement in getattr(migration, self.backend):
                    cursor.execute(statement)
                cursor.execute(
                    self.sql(
                        "INSERT INTO schema_migrations (version, description, applied_at) "
                        "VALUES (?, ?, ?)"
                    ),
                    (migration.version, migration.description, self.now()),
                )
                applied_now.append(migration.version)
            self.connection.commit()
        except Exception as error:
            self.rollback()
            raise StoreError(f"migrating {redacted(self.uri)}: {one_line(error)}") from None
        return applied_now

    def schema_version(self) -> int:
        rows = self.query("SELECT max(version) FROM schema_migrations")
        return rows[0][0] or 0

    # ------------------------------------------------------------------- helpers

    def sql(self, statement: str) -> str:
        """`?` placeholders in the backend's style."""
        return statement if self.backend == "sqlite" else statement.replace("?", "%s")

    def now(self) -> Any:
        moment = datetime.now(UTC)
        return utc_text(moment) if self.backend == "sqlite" else moment

    def timestamp(self, moment: datetime) -> Any:
        return utc_text(moment) if self.backend == "sqlite" else moment

    def boolean(self, value: bool) -> Any:
        return int(value) if self.backend == "sqlite" else bool(value)

    def query(self, statement: str, parameters: Sequence[Any] = ()) -> list[tuple]:
        cursor = self.connection.cursor()
        cursor.execute(self.sql(statement), tuple(parameters))
        rows = cursor.fetchall()
        self.connection.commit()
        return rows

    def rollback(self) -> None:
        with contextlib.suppress(Exception):
            self.connection.rollback()

    # -------------------------------------------------------------------- writes

    def write_decisions(self, rows: Sequence[tuple]) -> None:
        """Append decision rows (DECISION_COLUMNS order, scored_at a datetime, transaction
        JSON text) in one transaction; StoreError leaves nothing written."""
        try:
            if self.backend == "sqlite":
                self.connection.executemany(
                    f"INSERT INTO decisions ({_quoted(DECISION_COLUMNS)}) "
                    f"VALUES ({', '.join('?' * len(DECISION_COLUMNS))})",
                    (_sqlite_decision(row) for row in rows),
                )
            else:
                cursor = self.connection.cursor()
                with cursor.copy(
                    f"COPY decisions ({', '.join(DECISION_COLUMNS)}) FROM STDIN"
                ) as copy:
                    for row in rows:
                        copy.write_row(row)
            self.connection.commit()
        except Exception as error:
            self.rollback()
            raise StoreError(f"writing decisions: {one_line(error)}") from None

    def replace_outcomes(self, rows: Iterable[tuple]) -> int:
        """Insert or replace outcomes (OUTCOME_COLUMNS order) in one transaction."""
        rows = [
            (tid, self.boolean(fraud), None if at is None else self.timestamp(at), source)
            for tid, fraud, at, source in rows
        ]
        upsert = (
            "INSERT INTO outcomes (transaction_id, is_fraud, labelled_at, source) "
            "VALUES (?, ?, ?, ?) ON CONFLICT (transaction_id) DO UPDATE SET "
            "is_fraud = excluded.is_fraud, labelled_at = excluded.labelled_at, "
            "source = excluded.source"
        )
        try:
            cursor = self.connection.cursor()
            cursor.executemany(self.sql(upsert), rows)
            self.connection.commit()
        except Exception as error:
            self.rollback()
            raise StoreError(f"writing outcomes: {one_line(error)}") from None
        return len(rows)


def _quoted(columns: Sequence[str]) -> str:
    return ", ".join(f'"{name}"' for name in columns)


def _sqlite_decision(row: tuple) -> tuple:
    values = list(row)
    values[2] = utc_text(values[2])
    values[7] = int(values[7])
    return tuple(values)


def redacted(uri: str) -> str:
    """A database URI without its password, for messages and logs."""
    scheme, separator, rest = uri.partition("://")
    if "@" not in rest:
        return uri
    credentials, _, host = rest.rpartition("@")
    user = credentials.split(":", 1)[0]
    return f"{scheme}{separator}{user}:***@{host}"
