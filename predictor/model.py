"""The KServe model: one fraud estimator from the MLflow registry, served over V1 and V2."""

from __future__ import annotations

import asyncio
import atexit
import gc
import logging
import sys
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
from kserve import Model
from kserve.errors import InferenceError, InvalidInput
from kserve.protocol.infer_type import InferRequest, InferResponse

from predictor import codec, metrics, registry
from predictor.engine import Scorer, build_scorer, with_native_trees
from predictor.explain import Explainer, ExplainerUnavailable, explain_rows
from predictor.features import build_features
from predictor.ledger import DecisionLog, Scored, open_decision_log
from predictor.ledger import now as ledger_now
from predictor.lifecycle import ModelWatcher
from predictor.offload import INLINE_MAX_ROWS, is_small, run_sized
from predictor.settings import Settings

logger = logging.getLogger("predictor.model")

MODEL_VERSION_HEADER = "x-model-version"

#: Explainers and native engines are built here, after their version is served: the first
#: of each imports shap or numba and compiles (~0.4 and ~1 s), which readiness and
#: predictions must not wait for.
_explainer_builds = ThreadPoolExecutor(max_workers=1, thread_name_prefix="explainer-build")
_native_builds = ThreadPoolExecutor(max_workers=1, thread_name_prefix="native-build")
#: Held for every change of the served version, so a late engine upgrade cannot bring back
#: a version that was replaced meanwhile.
_swaps = threading.Lock()


@dataclass(frozen=True)
class Serving:
    """The estimator, the threshold it is judged by and its explainer, swapped in together."""

    loaded: registry.LoadedModel
    threshold: float
    scorer: Scorer
    #: This version's explainer, being built in the background; fails with
    #: ExplainerUnavailable for a version that cannot be explained.
    explainer: Future[Explainer]

    @property
    def version(self) -> str:
        return self.loaded.ref.version


@dataclass(frozen=True)
class Batch:
    """A validated request: its feature matrix, for V2 the request to answer, the decoded
    transactions (reason codes and the ledger quote them as sent), and for the ledger the
    request's id and door."""

    features: np.ndarray
    v2_request: InferRequest | None
    decoded: codec.Decoded
    request_id: str | None = None
    protocol: str = "v1"


class FraudModel(Model):
    """Scores card transactions with the registry's model; `load()` pins one version."""

    def __init__(self, name: str, settings: Settings):
        super().__init__(name, return_response_headers=True)
        self.settings = settings
        self._serving: Serving | None = None
        self._watcher: ModelWatcher | None = None
        #: Where decisions are recorded (per process, opened by start_watching).
        self._ledger: DecisionLog | None = None

    def __getstate__(self) -> dict[str, Any]:
        """KServe pickles the model into each `--workers` process: ship config, not state.

        Every worker loads and watches its own copy (see `start_watching`).
        """
        state = self.__dict__.copy()
        state.update(_serving=None, _watcher=None, _ledger=None, ready=False)
        return state

    @property
    def serving(self) -> Serving | None:
        return self._serving

    def start_watching(self, marks_ready: bool = True) -> None:
        """Load (and keep following MODEL_URI) in the background; see predictor.lifecycle.

        `marks_ready`: record this process as a ready worker once loaded (false for the
        parent of `--workers N`, which serves gRPC only)."""
        if self._watcher is None:
            self._ledger = open_decision_log(self.settings)
            if self._ledger is not None:
                atexit.register(self._ledger.close)
            self._watcher = ModelWatcher(self, self.settings, marks_ready=marks_ready)
            self._watcher.start()

    def close_ledger(self) -> None:
        """Write every recorded decision before the process exits (idempotent): after the
        server has answered its last request."""
        if self._ledger is not None:
            self._ledger.close()

    def stop(self) -> None:
        if self._watcher is not None:
            self._watcher.stop(timeout=0)
        super().stop()

    def load(self) -> bool:
        """Resolve MODEL_URI to a version, load it into memory and serve it: one attempt.

        `python -m predictor` loads through `start_watching` instead (retries, hot reload);
        this is for embedding the model in another ModelServer, as KServe's samples do.
        """
        tracking_uri = self.settings.tracking_uri
        ref = registry.resolve(registry.connect(tracking_uri), self.settings.model_uri)
        self.serve(registry.load(ref, tracking_uri))
        return self.ready

    def serve(self, loaded: registry.LoadedModel) -> None:
        """Make `loaded` the model that answers; one assignment, so requests never mix."""
        threshold = self.settings.decision_threshold
        source = "DECISION_THRESHOLD"
        if threshold is None:
            threshold = registry.decision_threshold(loaded.ref)
            source = f"tag {registry.THRESHOLD_TAG}"
        if threshold is None:
            raise registry.ModelLoadError(
                f"{loaded.ref.download_uri} has no {registry.THRESHOLD_TAG} tag; "
                "set DECISION_THRESHOLD or tag the version"
            )
        scorer, not_compiled = build_scorer(loaded.estimator, threshold, loaded.input_example)
        if not_compiled:
            logger.warning(
                "version %s is scored by scikit-learn alone: %s", loaded.ref.version, not_compiled
            )
        # Bound to this version before the swap, so an explanation always describes the
        # version that scored the row; built after it, so serving never waits for shap.
        explainer = _explainer_builds.submit(_build_explainer, loaded)
        serving = Serving(loaded, threshold, scorer, explainer)
        with _swaps:
            previous, self._serving = self._serving, serving
            self.ready = True
            _record_engine(previous, serving)
        _native_builds.submit(self._compile_natively, serving)
        ref = loaded.ref
        logger.info(
            "model loaded: %s version %s (uri %s, run %s), threshold %.4f from %s, engine %s",
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
            serving.scorer, serving.threshold, serving.loaded.input_example
        )
        if first:
            gc.freeze()  # numba's modules live as long as the process (see predictor.lifecycle)
        if reason:
            engine = serving.scorer.engine
            logger.info("version %s stays on %s: %s", serving.version, engine, reason)
            return
        with _swaps:
            if self._serving is not serving:
                return  # replaced meanwhile; its successor gets its own build
            upgraded = replace(serving, scorer=scorer)
            self._serving = upgraded
            _record_engine(serving, upgraded)
        logger.info(
            "version %s now scored by %s (built in %.2f s)",
            serving.version,
            scorer.engine,
            time.perf_counter() - started,
        )

    async def preprocess(
        self, payload: dict | InferRequest, headers: dict[str, str] | None = None
    ) -> Batch:
        """Validate the whole batch and build its features (large batches off the loop)."""
        small = is_small(rows=_declared_rows(payload), body_bytes=_body_bytes(headers))
        return await run_sized(small, self._decode, payload, headers)

    def _decode(self, payload: Any, headers: dict[str, str] | None = None) -> Batch:
        max_rows = self.settings.max_batch_rows
        request_id = (headers or {}).get("x-request-id")
        if isinstance(payload, InferRequest):
            decoded = codec.decode_v2(payload, max_rows)
            protocol = "grpc" if payload.from_grpc else "v2"
            return Batch(
                build_features(decoded.columns),
                payload,
                decoded,
                payload.id or request_id,
                protocol,
            )
        decoded = codec.decode_v1(payload, max_rows)
        return Batch(build_features(decoded.columns), None, decoded, request_id, "v1")

    async def predict(
        self,
        payload: Batch,
        headers: dict[str, str] | None = None,
        response_headers: dict[str, str] | None = None,
    ) -> dict | InferResponse:
        """Score with one version (large batches in the thread pool, their answer built
        there too), and say which version answered."""
        serving = self._serving  # read once: the whole request is answered by this version
        if serving is None:
            raise InferenceError("no model is loaded")
        if response_headers is not None:
            response_headers[MODEL_VERSION_HEADER] = serving.version
        small = len(payload.features) <= INLINE_MAX_ROWS
        return await run_sized(small, self._answer, serving, payload)

    def _answer(self, serving: Serving, payload: Batch) -> dict | InferResponse:
        probabilities = _checked_probabilities(serving, payload.features)
        decisions = probabilities >= serving.threshold
        metrics.observe_scores(probabilities, decisions)
        ids = payload.decoded.answered_ids()
        if self._ledger is not None:
            self._ledger.record(
                Scored(
                    payload.decoded,
                    ids,
                    probabilities,
                    decisions,
                    ledger_now(),
                    self.name,
                    serving.version,
                    serving.threshold,
                    payload.request_id,
                    payload.protocol,
                )
            )
        if payload.v2_request is not None:
            return codec.encode_v2(
                payload.v2_request, self.name, probabilities, decisions, serving.version, ids
            )
        return codec.encode_v1(probabilities, decisions, serving.version, ids)

    def validate(self, payload: Any) -> Any:
        """Nothing to add: `preprocess` validated the whole batch (KServe's own check
        assumes a dict or InferRequest and fails on a Batch with `--predictor_protocol v2`)."""
        return payload

    async def postprocess(
        self,
        result: dict | InferResponse,
        headers: dict[str, str] | None = None,
        response_headers: dict[str, str] | None = None,
    ) -> dict | InferResponse:
        """Explanations say which version answered in the header too, as predictions do."""
        if response_headers is not None and isinstance(result, dict) and "explanations" in result:
            response_headers[MODEL_VERSION_HEADER] = result["model_version"]
        return result

    async def explain(self, payload: Batch, headers: dict[str, str] | None = None) -> dict:
        """Reason codes for every transaction, from the version that scores it (thread pool:
        exact tree SHAP costs about a millisecond per row)."""
        serving = self._serving  # read once: scores and explanations from one version
        if serving is None:
            raise InferenceError("no model is loaded")
        rows = len(payload.features)
        if rows > self.settings.max_explain_rows:
            raise InvalidInput(
                f"instances: {rows} rows exceed the explain limit of "
                f"{self.settings.max_explain_rows} (MAX_EXPLAIN_ROWS)"
            )
        loop = asyncio.get_running_loop()
        explanations = await loop.run_in_executor(None, _explain, serving, payload)
        metrics.EXPLAINED.inc(rows)
        return {"explanations": explanations, "model_version": serving.version}

    def get_input_types(self) -> list[dict]:
        """The transaction's fields, then the optional `transaction_id`."""
        return codec.tensor_metadata(codec.V2_ACCEPTED_INPUTS)

    def get_output_types(self) -> list[dict]:
        return codec.tensor_metadata(codec.V2_OUTPUTS)


def _declared_rows(payload: Any) -> int:
    """Rows a request says it carries, before validation (unknown: assume many)."""
    if isinstance(payload, InferRequest):
        shape = payload.inputs[0].shape if payload.inputs else None
        return shape[0] if shape and isinstance(shape[0], int) else INLINE_MAX_ROWS + 1
    if isinstance(payload, dict) and isinstance(payload.get("instances"), list):
        return len(payload["instances"])
    return INLINE_MAX_ROWS + 1


def _body_bytes(headers: dict[str, str] | None) -> int:
    """The request body's declared size (0 when unknown, e.g. gRPC: rows decide there)."""
    declared = (headers or {}).get("content-length", "0")
    return int(declared) if declared.isdigit() else 0


def _record_engine(previous: Serving | None, current: Serving) -> None:
    """fraud_model_info: 1 for what serves now, 0 for what served before."""
    if previous is not None:
        _model_info(previous.loaded.ref, previous.scorer.engine).set(0)
    _model_info(current.loaded.ref, current.scorer.engine).set(1)


def _model_info(ref: registry.ModelRef, engine: str):
    return metrics.MODEL_INFO.labels(
        model=ref.name or "",
        version=ref.version,
        alias=ref.alias or "",
        run_id=ref.run_id or "",
        engine=engine,
    )


def _checked_probabilities(serving: Serving, features: np.ndarray) -> np.ndarray:
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


def _explain(serving: Serving, batch: Batch) -> list[dict[str, Any]]:
    try:
        explainer = serving.explainer.result()  # waits only in a process's first ~0.5 s
    except ExplainerUnavailable as error:
        raise NotImplementedError(
            f"model version {serving.version} cannot be explained: {error}"
        ) from None
    probabilities = _checked_probabilities(serving, batch.features)
    decisions = probabilities >= serving.threshold
    rows = batch.decoded.rows()
    try:
        return explain_rows(
            explainer, batch.features, rows, probabilities, decisions, serving.version
        )
    except ExplainerUnavailable as error:
        raise InferenceError(f"model version {serving.version}: {error}") from None


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
