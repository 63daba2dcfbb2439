"""The decision ledger: every scored transaction, recorded without making scoring wait.

A request only appends its decisions to an in-memory queue (a few microseconds); a writer
thread turns them into rows and writes them in batches every DECISION_LOG_FLUSH_SECONDS
(PostgreSQL: COPY; SQLite: one multi-row insert). While the database is unreachable the
queue holds up to DECISION_LOG_MAX_PENDING rows, then, with DECISION_LOG_SPOOL_PATH, the
oldest move to a spool file on disk; everything is written, in order, when the database
returns. What can be held nowhere is counted in `fraud_decisions_dropped_total`, never
silently lost. On a graceful stop the writer drains the queue (and the spool) before the
process exits; `kill -9` loses at most the decisions of the last flush interval.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from predictor import metrics
from predictor.codec import Decoded
from predictor.store import Store, StoreError, redacted

logger = logging.getLogger("predictor.ledger")

#: Rows written per database transaction at most.
MAX_BATCH_ROWS = 5_000
#: Longest wait between two attempts while the database is unreachable.
MAX_RETRY_SECONDS = 5.0


@dataclass(slots=True)
class Scored:
    """One request's decisions as the request enqueued them (rows are made by the writer,
    so a request pays for little more than this object: a few microseconds)."""

    decoded: Decoded
    transaction_ids: list[str]
    probabilities: np.ndarray
    decisions: np.ndarray
    #: When it was scored, seconds since the epoch (turned into a datetime by the writer).
    scored_at: float
    model_name: str
    model_version: str
    threshold: float
    request_id: str | None
    protocol: str
    shadow_version: str | None = None
    shadow_probabilities: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.transaction_ids)

    def rows(self) -> list[tuple]:
        """The `decisions` rows, in DECISION_COLUMNS order (transaction as JSON text)."""
        sent = self.decoded.rows()
        scored_at = datetime.fromtimestamp(self.scored_at, UTC)
        shadow = (
            self.shadow_probabilities.tolist()
            if self.shadow_probabilities is not None
            else [None] * len(sent)
        )
        return [
            (
                transaction_id,
                self.request_id,
                scored_at,
                self.model_name,
                self.model_version,
                probability,
                self.threshold,
                is_fraud,
                orjson.dumps(transaction).decode(),
                self.protocol,
                self.shadow_version if shadow_probability is not None else None,
                shadow_probability,
            )
            for transaction_id, probability, is_fraud, transaction, shadow_probability in zip(
                self.transaction_ids,
                self.probabilities.tolist(),
                self.decisions.tolist(),
                sent,
                shadow,
                strict=True,
            )
        ]


class Spool:
    """Rows waiting on disk, oldest first (JSON lines), and how far they were written.

    The read offset is kept beside the file after every batch written, so a crash while
    draining writes at most one batch twice."""

    def __init__(self, path: Path):
        self.path = path
        self.offset_path = path.with_name(path.name + ".offset")
        self.rows = 0

    def append(self, rows: list[tuple]) -> None:
        lines = b"".join(orjson.dumps(_portable(row)) + b"\n" for row in rows)
        with self.path.open("ab") as spool:
            spool.write(lines)
            spool.flush()
        self.rows += len(rows)

    def read(self, limit: int) -> tuple[list[tuple], int]:
        """Up to `limit` rows from the read offset, and the offset after them."""
        offset = self._offset()
        rows = []
        with self.path.open("rb") as spool:
            spool.seek(offset)
            for line in spool:
                if not line.endswith(b"\n"):
                    break  # a line cut by a crash while appending: never acknowledged
                rows.append(_restored(orjson.loads(line)))
                offset += len(line)
                if len(rows) >= limit:
                    break
        return rows, offset

    def advance(self, offset: int, count: int) -> None:
        self.rows = max(0, self.rows - count)
        if self.path.stat().st_size <= offset:
            self.path.unlink(missing_ok=True)
            self.offset_path.unlink(missing_ok=True)
            self.rows = 0
        else:
            self.offset_path.write_text(str(offset))

    def pending(self) -> bool:
        return self.path.exists() and self.path.stat().st_size > self._offset()

    def count_existing(self) -> int:
        """Rows left by a previous process (written on the next flush)."""
        if not self.pending():
            return 0
        with self.path.open("rb") as spool:
            spool.seek(self._offset())
            self.rows = sum(1 for line in spool if line.endswith(b"\n"))
        return self.rows

    def _offset(self) -> int:
        try:
            return int(self.offset_path.read_text())
        except (OSError, ValueError):
            return 0


def _portable(row: tuple) -> list:
    values = list(row)
    values[2] = values[2].isoformat()
    return values


def _restored(values: list) -> tuple:
    values[2] = datetime.fromisoformat(values[2])
    return tuple(values)


class DecisionLog:
    """Queue decisions from any thread; one writer thread writes them to the store."""

    def __init__(
        self,
        uri: str,
        flush_seconds: float = 0.2,
        max_pending: int = 100_000,
        spool_path: Path | None = None,
    ):
        self.uri = uri
        self.flush_seconds = flush_seconds
        self.max_pending = max_pending
        self.spool = Spool(spool_path) if spool_path is not None else None
        self._queue: collections.deque[Scored] = collections.deque()
        self._queued_rows = 0
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._stopped = threading.Event()
        self._store: Store | None = None
        self._failing_since: float | None = None
        self._thread = threading.Thread(target=self._run, name="decision-log", daemon=True)
        if self.spool is not None and self.spool.count_existing():
            logger.info(
                "decision spool %s holds %d decisions from before: writing them first",
                self.spool.path,
                self.spool.rows,
            )
        self._thread.start()

    # ------------------------------------------------------------------ requests

    def record(self, scored: Scored) -> bool:
        """Queue one request's decisions (never blocks); False when they had to be dropped
        because the queue is full (counted)."""
        rows = len(scored)
        # With a spool, the writer moves what is over `max_pending` to disk: room for that.
        limit = 2 * self.max_pending if self.spool is not None else self.max_pending
        with self._lock:
            if self._stopped.is_set() or self._queued_rows + rows > limit:
                metrics.DECISIONS_DROPPED.inc(rows)
                return False
            self._queue.append(scored)
            self._queued_rows += rows
        metrics.DECISIONS_PENDING.inc(rows)
        if self._queued_rows >= MAX_BATCH_ROWS or (
            self.spool is not None and self._queued_rows > self.max_pending
        ):
            self._wake.set()  # a batch to write, or (in an outage) rows to move to disk
        return True

    @property
    def pending(self) -> int:
        """Decisions not yet in the database: queued and spooled."""
        return self._queued_rows + (self.spool.rows if self.spool else 0)

    # -------------------------------------------------------------------- writer

    def close(self, timeout: float = 10.0) -> None:
        """Write everything queued, then stop (idempotent). What cannot be written within
        `timeout` is spooled when a spool is configured, else counted as dropped."""
        if self._stopped.is_set():
            return
        self._stopping.set()
        self._wake.set()
        self._thread.join(timeout)
        if self._thread.is_alive():  # stuck in a database call: what it holds is lost
            with self._lock:
                self._stopped.set()
                rows = self._queued_rows
            metrics.DECISIONS_DROPPED.inc(rows)
            logger.error(
                "%d decisions could not be recorded within %.0f s of the stop", rows, timeout
            )
            return
        with self._lock:
            self._stopped.set()
            left = list(self._queue)
            self._queue.clear()
            self._queued_rows = 0
        rows = sum(len(scored) for scored in left)
        if rows:
            metrics.DECISIONS_PENDING.dec(rows)
            if self.spool is not None and self._spool(left):
                logger.warning("%d decisions spooled to %s at stop", rows, self.spool.path)
            else:
                metrics.DECISIONS_DROPPED.inc(rows)
                logger.error("%d decisions could not be recorded before the stop", rows)
        if self._store is not None:
            self._store.close()

    def _run(self) -> None:
        delay = self.flush_seconds
        retry_at = 0.0
        while True:
            stopping = self._stopping.is_set()
            if not stopping:
                self._wake.wait(max(0.0, retry_at - time.monotonic()) or delay)
                self._wake.clear()
                if self._failing_since is not None and time.monotonic() < retry_at:
                    self._move_to_spool()  # woken in an outage: make room, retry later
                    continue
            try:
                self._flush()
                delay = self.flush_seconds
                if self._failing_since is not None:
                    logger.warning(
                        "decision ledger %s reachable again after %.1f s; the decisions "
                        "that waited are written",
                        redacted(self.uri),
                        time.monotonic() - self._failing_since,
                    )
                    self._failing_since = None
            except StoreError as error:
                if self._failing_since is None:
                    self._failing_since = time.monotonic()
                    logger.error(
                        "decision ledger: %s; decisions wait (%d pending) and are written "
                        "when it returns",
                        error,
                        self.pending,
                    )
                if self._store is not None:
                    self._store.close()
                    self._store = None
                self._move_to_spool()
                delay = min(MAX_RETRY_SECONDS, max(self.flush_seconds, delay * 2))
                retry_at = time.monotonic() + delay
                if stopping:
                    return  # close() spools or counts what is left
                continue
            except Exception:  # a bug: keep the thread (and the queue) alive
                logger.exception("decision ledger: writing failed")
                delay = MAX_RETRY_SECONDS
                if stopping:
                    return
                continue
            if stopping and not self._queue and not (self.spool and self.spool.pending()):
                return

    def _connected(self) -> Store:
        if self._store is None:
            store = Store(self.uri)
            try:
                store.migrate()
            except StoreError:
                store.close()
                raise
            self._store = store
        return self._store

    def _flush(self) -> None:
        """Write the spool (older), then the queue, batch by batch; StoreError stops at
        the first batch that fails, leaving it (and all after it) in place."""
        if not self._queue and not (self.spool and self.spool.pending()):
            return
        store = self._connected()
        while self.spool is not None and self.spool.pending():
            rows, offset = self.spool.read(MAX_BATCH_ROWS)
            store.write_decisions(rows)
            self.spool.advance(offset, len(rows))
            metrics.DECISIONS_RECORDED.inc(len(rows))
            metrics.DECISIONS_PENDING.dec(len(rows))
        while self._queue:
            batch = self._take_batch()
            rows = [row for scored in batch for row in scored.rows()]
            store.write_decisions(rows)
            with self._lock:
                for _ in batch:
                    self._queue.popleft()
                self._queued_rows -= len(rows)
            metrics.DECISIONS_RECORDED.inc(len(rows))
            metrics.DECISIONS_PENDING.dec(len(rows))

    def _take_batch(self) -> list[Scored]:
        """The oldest queued requests, up to MAX_BATCH_ROWS rows (at least one request);
        they stay queued until written."""
        batch, rows = [], 0
        with self._lock:  # requests append while this reads
            for scored in self._queue:
                if batch and rows + len(scored) > MAX_BATCH_ROWS:
                    break
                batch.append(scored)
                rows += len(scored)
        return batch

    def _move_to_spool(self) -> None:
        """While the database is away: keep at most `max_pending` rows in memory, moving
        the oldest to the spool (if there is one)."""
        if self.spool is None:
            return
        moving: list[Scored] = []
        with self._lock:
            rows = self._queued_rows
            for scored in self._queue:
                if rows <= self.max_pending:
                    break
                moving.append(scored)
                rows -= len(scored)
        if moving and self._spool(moving):
            with self._lock:
                for _ in moving:
                    self._queue.popleft()
                self._queued_rows -= sum(len(scored) for scored in moving)

    def _spool(self, batch: list[Scored]) -> bool:
        assert self.spool is not None
        try:
            self.spool.append([row for scored in batch for row in scored.rows()])
        except OSError as error:
            logger.error("decision spool %s: %s", self.spool.path, error)
            return False
        return True


def open_decision_log(settings: Any) -> DecisionLog | None:
    """The ledger DECISION_LOG_URI names, or None (`none`, with a WARNING)."""
    uri = settings.decision_log_location
    if uri == "none":
        logger.warning(
            "decisions are not recorded (DECISION_LOG_URI=none%s)",
            "" if settings.decision_log_uri else ": the default with a remote registry",
        )
        return None
    logger.info("recording decisions in %s", redacted(uri))
    return DecisionLog(
        uri,
        flush_seconds=settings.decision_log_flush_seconds,
        max_pending=settings.decision_log_max_pending,
        spool_path=settings.decision_log_spool_path,
    )


def now() -> float:
    """A decision's time, as Scored keeps it."""
    return time.time()
