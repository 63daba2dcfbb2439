"""What happens to an answered request after its answer: shadow scoring, the drift window,
then the decision ledger, in one background thread.

A request only appends (its decisions and feature matrix) to a queue; the thread takes
everything queued every few milliseconds and scores it with the shadow version in one
call, so the shadow costs the request path nothing but the append and the answer is the
champion's, byte for byte, whatever the shadow does. Each decision then carries the
shadow's probability into the ledger, and the features enter the drift window. The queue
is bounded: what does not fit skips the shadow and the window (counted) and goes straight
to the ledger, so nothing acknowledged is lost for the shadow's sake.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from dataclasses import dataclass

import numpy as np

from predictor import metrics
from predictor.drift import DriftWindow
from predictor.ledger import DecisionLog, Scored
from predictor.serving import Serving, ServingSlot, checked_probabilities
from predictor.text import one_line

logger = logging.getLogger("predictor.followup")

#: Rows waiting for the thread at most; beyond, requests skip the shadow and the window.
MAX_PENDING_ROWS = 100_000
#: How often the thread takes what requests queued (one shadow call, one ledger hand-over).
GATHER_SECONDS = 0.05
#: The drift gauges are recomputed at most this often while rows arrive.
DRIFT_REFRESH_SECONDS = 1.0
#: PSI over fewer rows is mostly sampling noise (~ bins / rows): nothing is exported before.
MIN_DRIFT_ROWS = 500
#: A failing shadow is logged at most this often (every failure is counted).
FAILURE_LOG_SECONDS = 60.0


@dataclass(slots=True)
class Answered:
    scored: Scored
    features: np.ndarray


class FollowUp:
    """The thread that shadow-scores, windows and records answered requests."""

    def __init__(
        self,
        champion: ServingSlot,
        shadow: ServingSlot | None,
        window: DriftWindow | None,
        ledger: DecisionLog | None,
    ):
        self.champion = champion
        self.shadow = shadow
        self.window = window
        self.ledger = ledger
        self._queue: collections.deque[Answered] = collections.deque()
        self._pending_rows = 0
        #: Guards the queue; requests never wait on it for longer than an append.
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._stopping = False
        self._last_failure_log = -FAILURE_LOG_SECONDS
        self._window_version: str | None = None
        self._drift_dirty = False
        self._drift_at = 0.0
        if shadow is not None:  # exported from the start, so rates see the first failure
            for reason in ("failed", "busy", "loading"):
                metrics.SHADOW_NOT_SCORED.labels(reason=reason)
        self._thread = threading.Thread(target=self._run, name="follow-up", daemon=True)
        self._thread.start()

    def submit(self, scored: Scored, features: np.ndarray) -> None:
        """Queue an answered request (never blocks, a few microseconds)."""
        rows = len(scored)
        with self._lock:
            if self._pending_rows + rows <= MAX_PENDING_ROWS and not self._stopping:
                self._queue.append(Answered(scored, features))
                self._pending_rows += rows
                if self.ledger is not None:  # answered, not yet in the database
                    metrics.DECISIONS_PENDING.inc(rows)
                return
        if self.shadow is not None:
            metrics.SHADOW_NOT_SCORED.labels(reason="busy").inc(rows)
        if self.ledger is not None:
            self.ledger.record(scored)

    def close(self, timeout: float = 10.0) -> None:
        """Follow up on everything queued, then stop (before the ledger closes)."""
        with self._lock:
            self._stopping = True  # from now on, requests go straight to the ledger
        self._stop.set()
        self._thread.join(timeout)

    def _run(self) -> None:
        """Every GATHER_SECONDS, take what was answered meanwhile. Polling, not a wake-up
        per request: a thread woken by the request path competes with it for the GIL
        hundreds of times a second, which costs the requests more than the work itself."""
        while True:
            stopping = self._stop.wait(GATHER_SECONDS)
            with self._lock:
                batch = list(self._queue)
                self._queue.clear()
                self._pending_rows = 0
            if batch:
                try:
                    self._enrich(batch)
                except Exception:  # never lose the decisions to a bug in the extras
                    logger.exception("following up on %d answered requests failed", len(batch))
                for answered in batch:
                    self._record(answered.scored)
            self._refresh_drift()
            if stopping:
                with self._lock:
                    if not self._queue:
                        return

    def _enrich(self, batch: list[Answered]) -> None:
        """The shadow's probabilities onto the decisions; the features into the window."""
        if self.shadow is not None:
            self._score_shadow(batch)
        if self.window is not None:
            self._add_to_window(batch)

    def _record(self, scored: Scored) -> None:
        """Hand a queued request's decisions to the ledger (which counts them pending from
        now on, so the gauge never dips below what is still unwritten)."""
        if self.ledger is not None:
            self.ledger.record(scored)
            metrics.DECISIONS_PENDING.dec(len(scored))

    def _score_shadow(self, batch: list[Answered]) -> None:
        shadow = self.shadow.serving if self.shadow is not None else None
        rows = sum(len(answered.scored) for answered in batch)
        if shadow is None:
            metrics.SHADOW_NOT_SCORED.labels(reason="loading").inc(rows)
            return
        features = np.concatenate([answered.features for answered in batch])
        try:
            probabilities = checked_probabilities(shadow, features)
        except Exception as error:
            metrics.SHADOW_NOT_SCORED.labels(reason="failed").inc(rows)
            self._log_failure(shadow, error)
            return
        champion = np.concatenate([answered.scored.decisions for answered in batch])
        disagreements = int(np.count_nonzero(champion != (probabilities >= shadow.threshold)))
        difference = np.abs(
            np.concatenate([answered.scored.probabilities for answered in batch]) - probabilities
        )
        start = 0
        for answered in batch:
            end = start + len(answered.scored)
            answered.scored.shadow_version = shadow.version
            answered.scored.shadow_probabilities = probabilities[start:end]
            start = end
        metrics.SHADOW_SCORED.inc(rows)
        if disagreements:
            metrics.SHADOW_DISAGREEMENTS.inc(disagreements)
        metrics.observe_many(metrics.SHADOW_DIFFERENCE, difference)

    def _log_failure(self, shadow: Serving, error: Exception) -> None:
        now = time.monotonic()
        if now - self._last_failure_log >= FAILURE_LOG_SECONDS:
            self._last_failure_log = now
            logger.error(
                "shadow version %s failed to score (answers are unaffected; every failure is "
                "counted in fraud_shadow_not_scored_total): %s",
                shadow.version,
                one_line(error, 500),
            )

    def _add_to_window(self, batch: list[Answered]) -> None:
        assert self.window is not None
        for answered in batch:
            version = answered.scored.model_version
            if version != self._window_version:
                self._window_version = version
                self.window.clear_scores()
                self._announce_drift(version)
            self.window.append(answered.features, answered.scored.probabilities)
        self._drift_dirty = True

    def _announce_drift(self, version: str) -> None:
        serving = self.champion.serving
        if serving is None or serving.version != version:
            return
        if serving.loaded.profile is None:
            logger.warning(
                "version %s: feature drift unavailable: %s", version, serving.loaded.profile_note
            )
            metrics.FEATURE_DRIFT.clear()
        else:
            logger.info("version %s: feature drift measured against its training profile", version)

    def _refresh_drift(self) -> None:
        if self.window is None or not self._drift_dirty:
            return
        now = time.monotonic()
        if now - self._drift_at < DRIFT_REFRESH_SECONDS:
            return
        serving = self.champion.serving
        if serving is None or serving.loaded.profile is None:
            return
        self._drift_at = now
        self._drift_dirty = False
        metrics.DRIFT_WINDOW.set(len(self.window))
        if len(self.window) < min(self.window.size, MIN_DRIFT_ROWS):
            return
        psi = self.window.psi(serving.loaded.profile)
        score = psi.pop("score", None)
        for feature, value in psi.items():
            metrics.FEATURE_DRIFT.labels(feature=feature).set(value)
        if score is not None:
            metrics.SCORE_DRIFT.set(score)
