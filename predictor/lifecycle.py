"""Loading and reloading in the background, so the registry's trouble is never the server's.

The HTTP server is up (live) from the start; the watcher loads the model with capped
exponential backoff, then, for alias URIs, polls the alias and swaps in new versions that
pass their checks. A version that fails is retried only after its own backoff, while the
previous version keeps serving.
"""

from __future__ import annotations

import gc
import logging
import threading
import time
from dataclasses import dataclass, field

from predictor import metrics, registry, runtime
from predictor.serving import CHAMPION, ServingSlot
from predictor.settings import Settings
from predictor.text import one_line

logger = logging.getLogger("predictor.lifecycle")

INITIAL_BACKOFF_SECONDS = 1.0


@dataclass
class Backoff:
    """1, 2, 4, ... seconds, capped."""

    cap: float
    failures: int = 0

    def next(self) -> float:
        self.failures += 1
        return min(self.cap, INITIAL_BACKOFF_SECONDS * 2 ** (self.failures - 1))

    def reset(self) -> None:
        self.failures = 0


@dataclass
class FailedVersion:
    backoff: Backoff
    retry_at: float = 0.0
    reason: str = ""


@dataclass
class ModelWatcher:
    """Owns the background thread that keeps `slot` serving what `model_uri` names
    (MODEL_URI for the champion, SHADOW_MODEL_URI for the shadow)."""

    slot: ServingSlot
    model_uri: str
    settings: Settings
    marks_ready: bool = True
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None
    _backoff: Backoff = field(init=False)
    _failed: dict[str, FailedVersion] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._backoff = Backoff(cap=self.settings.model_retry_max_seconds)

    def start(self) -> None:
        name = f"{self.slot.role}-watcher"
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _run(self) -> None:
        while not self._stop.is_set():
            delay = self.check_once()
            if delay is None:
                logger.info("model watcher finished: %s is pinned", self.model_uri)
                return
            self._stop.wait(delay)

    @property
    def _follows_alias(self) -> bool:
        return registry.alias_of(self.model_uri) is not None

    def _poll_delay(self) -> float | None:
        """After a success: when to look again, or None if there is nothing to follow."""
        interval = self.settings.model_poll_interval_seconds
        return interval if self._follows_alias and interval > 0 else None

    def check_once(self) -> float | None:
        """One look at the registry; returns seconds until the next look (None: done)."""
        serving = self.slot.serving
        kind = "reload" if serving is not None else "initial"
        tracking_uri = self.settings.tracking_uri
        try:
            ref = registry.resolve(registry.connect(tracking_uri), self.model_uri)
        except Exception as error:  # any registry trouble: log it once, try again later
            delay = self._backoff.next()
            if serving is not None:
                delay = self._poll_delay() or delay
            logger.warning(
                "registry lookup of %s at %s failed (attempt %d): %s; next try in %.0f s",
                self.model_uri,
                tracking_uri,
                self._backoff.failures,
                one_line(error, 500),
                delay,
            )
            metrics.MODEL_LOADS.labels(
                role=self.slot.role, kind=kind, outcome="registry_error"
            ).inc()
            return delay

        if serving is not None and serving.version == ref.version:
            self._backoff.reset()
            return self._poll_delay()
        failed = self._failed.get(ref.version)
        now = time.monotonic()
        if failed is not None and now < failed.retry_at:
            return min(failed.retry_at - now, self._poll_delay() or failed.retry_at - now)

        if serving is not None:
            logger.info(
                "reload started: %s now points to version %s (serving %s)",
                self.model_uri,
                ref.version,
                serving.version,
            )
        started = time.perf_counter()
        try:
            loaded = registry.load(ref, tracking_uri)
            self.slot.serve(loaded)
        except Exception as error:  # a bad version must never take the server down
            failed = self._failed.setdefault(
                ref.version, FailedVersion(Backoff(cap=self.settings.model_retry_max_seconds))
            )
            delay = failed.backoff.next()
            failed.retry_at = time.monotonic() + delay
            failed.reason = one_line(error, 500)
            metrics.MODEL_LOADS.labels(role=self.slot.role, kind=kind, outcome="failure").inc()
            still = f"version {serving.version} keeps serving" if serving else "nothing served yet"
            logger.error(
                "%s failed: version %s of %s: %s; %s; retrying this version in %.0f s",
                ("reload" if serving else "load") + _of_role(self.slot.role),
                ref.version,
                ref.name or ref.uri,
                failed.reason,
                still,
                delay,
            )
            return min(delay, self._poll_delay() or delay)
        duration = time.perf_counter() - started
        # Everything imported and loaded so far lives as long as the process (or the
        # version): keep it out of the cyclic GC's full collections, which otherwise scan
        # millions of objects and stall the event loop for ~0.25 s whenever a large request
        # allocates enough to trigger one.
        gc.freeze()
        metrics.MODEL_LOAD_SECONDS.observe(duration)
        metrics.MODEL_LOADS.labels(role=self.slot.role, kind=kind, outcome="success").inc()
        if self.marks_ready and self.slot.role == CHAMPION:
            runtime.mark_ready()
        self._failed.pop(ref.version, None)
        self._backoff.reset()
        if serving is not None:
            logger.info(
                "reload finished: version %s replaced %s in %.2f s",
                ref.version,
                serving.version,
                duration,
            )
        return self._poll_delay()


def _of_role(role: str) -> str:
    return "" if role == CHAMPION else f" ({role})"
