"""The serving slot: which version answers now, swapped in whole, upgraded in the background.

One slot per role: the champion (answers requests, explains them) and, with
SHADOW_MODEL_URI, the shadow (scored after the answer, never seen by the client). A
slot's version is swapped by one assignment under its lock, so a request reads one
version and keeps it; explainers and native engines are built afterwards in the slot's
own pools, so readiness and predictions never wait for shap's import or numba's compile.
"""

from __future__ import annotations

import functools
import gc
import logging
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace

import numpy as np
from kserve.errors import InferenceError

from predictor import metrics, registry
from predictor.engine import Scorer, build_scorer, with_native_trees
from predictor.explain import Explainer, ExplainerUnavailable

logger = logging.getLogger("predictor.model")

CHAMPION = "champion"
SHADOW = "shadow"


@dataclass(frozen=True)
class Serving:
    """The estimator, the threshold it is judged by and its explainer, swapped in together."""

    loaded: registry.LoadedModel
    threshold: float
    scorer: Scorer
    #: This version's explainer, being built in the background; fails with
    #: ExplainerUnavailable for a version that cannot be explained (None: not wanted).
    explainer: Future[Explainer] | None
    #: What its engines were checked on against scikit-learn (see agreement_rows).
    agreement_rows: np.ndarray

    @property
    def version(self) -> str:
        return self.loaded.ref.version


class ServingSlot:
    """Holds the version a role serves; `serve()` is what the model watcher calls."""

    def __init__(
        self,
        role: str,
        threshold_override: float | None,
        explains: bool,
        on_serve: Callable[[Serving], None] | None = None,
    ):
        self.role = role
        #: Told of every version swapped in (the champion's model turns ready).
        self.on_serve = on_serve
        self.threshold_override = threshold_override
        self.explains = explains
        self._serving: Serving | None = None
        #: Held for every change of the version, so a late engine upgrade cannot bring
        #: back a version that was replaced meanwhile.
        self._swaps = threading.Lock()
        self._explainer_builds = ThreadPoolExecutor(1, thread_name_prefix=f"{role}-explainer")
        self._native_builds = ThreadPoolExecutor(1, thread_name_prefix=f"{role}-native")

    @property
    def serving(self) -> Serving | None:
        return self._serving

    def wait_for_builds(self, timeout: float) -> None:
        """Block until the explainer and native builds queued so far are done."""
        self._explainer_builds.submit(lambda: None).result(timeout)
        self._native_builds.submit(lambda: None).result(timeout)

    def serve(self, loaded: registry.LoadedModel) -> None:
        """Make `loaded` this slot's version: one assignment, so requests never mix."""
        threshold = self.threshold_override
        source = "DECISION_THRESHOLD"
        if threshold is None:
            threshold = registry.decision_threshold(loaded.ref)
            source = f"tag {registry.THRESHOLD_TAG}"
        if threshold is None:
            raise registry.ModelLoadError(
                f"{loaded.ref.download_uri} has no {registry.THRESHOLD_TAG} tag; "
                "set DECISION_THRESHOLD or tag the version"
            )
        rows = agreement_rows(loaded)
        scorer, not_compiled = build_scorer(loaded.estimator, threshold, rows)
        if not_compiled:
            logger.warning(
                "%s version %s is scored by scikit-learn alone: %s",
                self.role,
                loaded.ref.version,
                not_compiled,
            )
        # Bound to this version before the swap, so an explanation always describes the
        # version that scored the row; built after it, so serving never waits for shap.
        explainer = (
            self._explainer_builds.submit(_build_explainer, loaded) if self.explains else None
        )
        serving = Serving(loaded, threshold, scorer, explainer, rows)
        with self._swaps:
            previous, self._serving = self._serving, serving
            self._record_engine(previous, serving)
            if self.on_serve is not None:
                self.on_serve(serving)
        self._native_builds.submit(self._compile_natively, serving)
        ref = loaded.ref
        logger.info(
            "%s loaded: %s version %s (uri %s, run %s), threshold %.4f from %s, engine %s",
            "model" if self.role == CHAMPION else "shadow model",
            ref.name or "run",
            ref.version,
            ref.uri,
            ref.run_id,
            threshold,
            source,
            scorer.engine,
        )

    def _compile_natively(self, serving: Serving) -> None:
        """Add the numba-compiled trees to `serving`'s scorer if it agrees with scikit-learn (in
        the background: whatever fails here leaves the version on its engine, logged)."""
        try:
            self._try_native(serving)
        except Exception:
            logger.exception("version %s: building the native engine failed", serving.version)

    def _try_native(self, serving: Serving) -> None:
        started = time.perf_counter()
        first = "numba" not in sys.modules
        scorer, reason = with_native_trees(
            serving.scorer, serving.threshold, serving.agreement_rows
        )
        if first:
            gc.freeze()  # numba's modules live as long as the process (see predictor.lifecycle)
        if reason:
            engine = serving.scorer.engine
            logger.info("version %s stays on %s: %s", serving.version, engine, reason)
            return
        with self._swaps:
            if self._serving is not serving:
                return  # replaced meanwhile; its successor gets its own build
            upgraded = replace(serving, scorer=scorer)
            self._serving = upgraded
            self._record_engine(serving, upgraded)
        logger.info(
            "%s version %s now scored by %s (built in %.2f s)",
            self.role,
            serving.version,
            scorer.engine,
            time.perf_counter() - started,
        )

    def _record_engine(self, previous: Serving | None, current: Serving) -> None:
        """fraud_model_info: 1 for what serves now, 0 for what served before."""
        if previous is not None:
            self._model_info(previous).set(0)
        self._model_info(current).set(1)

    def _model_info(self, serving: Serving):
        ref = serving.loaded.ref
        return metrics.MODEL_INFO.labels(
            model=ref.name or "",
            version=ref.version,
            alias=ref.alias or "",
            run_id=ref.run_id or "",
            engine=serving.scorer.engine,
            role=self.role,
        )


#: Rows drawn from a version's profile for the engines' agreement check.
AGREEMENT_ROWS = 2_000


def agreement_rows(loaded: registry.LoadedModel) -> np.ndarray:
    """The rows a compiled engine must score as scikit-learn does: the version's input
    example and rows drawn from its training profile, or, for a version trained before
    profiles, generated transactions."""
    if loaded.profile is not None:
        drawn = loaded.profile.sample(AGREEMENT_ROWS)
    else:
        drawn = _generated_rows()
    if loaded.input_example is None:
        return drawn
    return np.vstack([loaded.input_example, drawn])


@functools.cache
def _generated_rows() -> np.ndarray:
    from predictor.data import generate_transactions, to_columns
    from predictor.features import build_features

    frame = generate_transactions(rows=AGREEMENT_ROWS, fraud_rate=0.1, seed=20261127)
    return build_features(to_columns(frame))


def checked_probabilities(serving: Serving, features: np.ndarray) -> np.ndarray:
    """The version's fraud probabilities, refused (and counted) unless they are ones."""
    try:
        probabilities = serving.scorer.fraud_probability(features)
    except Exception as error:
        raise InferenceError(f"model version {serving.version} failed: {error}") from error
    if not registry.are_probabilities(probabilities):
        metrics.INVALID_OUTPUTS.labels(version=serving.version).inc()
        raise InferenceError(
            f"model version {serving.version} returned scores that are not probabilities "
            "(not finite or outside [0, 1]); nothing was scored"
        )
    return probabilities


def _build_explainer(loaded: registry.LoadedModel) -> Explainer:
    started = time.perf_counter()
    first = "shap" not in sys.modules
    try:
        explainer = Explainer(loaded.estimator)
    except ExplainerUnavailable as error:
        logger.warning(
            "version %s serves predictions but cannot be explained: %s", loaded.ref.version, error
        )
        raise
    if first:
        gc.freeze()  # shap's modules live as long as the process (see predictor.lifecycle)
    logger.info(
        "explainer for version %s ready in %.2f s",
        loaded.ref.version,
        time.perf_counter() - started,
    )
    return explainer
