"""The KServe model: one fraud estimator from the MLflow registry, served over V1 and V2."""

from __future__ import annotations

import asyncio
import atexit
import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
from kserve import Model
from kserve.errors import InferenceError, InvalidInput
from kserve.protocol.infer_type import InferRequest, InferResponse

from predictor import codec, metrics, registry
from predictor.drift import DriftWindow
from predictor.explain import ExplainerUnavailable, explain_rows
from predictor.features import build_features
from predictor.followup import FollowUp
from predictor.ledger import DecisionLog, Scored, open_decision_log
from predictor.ledger import now as ledger_now
from predictor.lifecycle import ModelWatcher
from predictor.offload import INLINE_MAX_ROWS, is_small, run_sized
from predictor.serving import CHAMPION, SHADOW, Serving, ServingSlot, checked_probabilities
from predictor.settings import Settings

logger = logging.getLogger("predictor.model")

MODEL_VERSION_HEADER = "x-model-version"


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
        #: Per process (see __getstate__): the champion's slot, made by the first load.
        self._champion: ServingSlot | None = None
        self._watchers: list[ModelWatcher] = []
        #: Where decisions are recorded (per process, opened by start_watching).
        self._ledger: DecisionLog | None = None
        #: Shadow scoring, the drift window and the ledger, after the answer.
        self._followup: FollowUp | None = None

    def __getstate__(self) -> dict[str, Any]:
        """KServe pickles the model into each `--workers` process: ship config, not state.

        Every worker loads and watches its own copy (see `start_watching`).
        """
        state = self.__dict__.copy()
        state.update(_champion=None, _watchers=[], _ledger=None, _followup=None, ready=False)
        return state

    @property
    def champion(self) -> ServingSlot:
        if self._champion is None:
            self._champion = ServingSlot(
                CHAMPION, self.settings.decision_threshold, explains=True, on_serve=self._on_serve
            )
        return self._champion

    @property
    def serving(self) -> Serving | None:
        return self._champion.serving if self._champion is not None else None

    def _on_serve(self, serving: Serving) -> None:
        self.ready = True

    def start_watching(self, marks_ready: bool = True) -> None:
        """Load (and keep following MODEL_URI, and SHADOW_MODEL_URI if set) in the
        background; see predictor.lifecycle.

        `marks_ready`: record this process as a ready worker once loaded (false for the
        parent of `--workers N`, which serves gRPC only)."""
        if self._watchers:
            return
        settings = self.settings
        self._ledger = open_decision_log(settings)
        shadow = None
        if settings.shadow_model_uri is not None:
            shadow = ServingSlot(SHADOW, None, explains=False)
            self._watchers.append(ModelWatcher(shadow, settings.shadow_model_uri, settings, False))
        window = DriftWindow(settings.drift_window_rows) if settings.drift_window_rows else None
        if shadow is not None or window is not None:
            self._followup = FollowUp(self.champion, shadow, window, self._ledger)
        if self._ledger is not None or self._followup is not None:
            atexit.register(self.close_ledger)
        self._watchers.insert(
            0, ModelWatcher(self.champion, settings.model_uri, settings, marks_ready)
        )
        for watcher in self._watchers:
            watcher.start()

    def close_ledger(self) -> None:
        """Write every recorded decision before the process exits (idempotent): after the
        server has answered its last request."""
        if self._followup is not None:
            self._followup.close()
        if self._ledger is not None:
            self._ledger.close()

    def stop(self) -> None:
        for watcher in self._watchers:
            watcher.stop(timeout=0)
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
        """Make `loaded` the model that answers (see ServingSlot.serve)."""
        self.champion.serve(loaded)

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
        serving = self.serving  # read once: the whole request is answered by this version
        if serving is None:
            raise InferenceError("no model is loaded")
        if response_headers is not None:
            response_headers[MODEL_VERSION_HEADER] = serving.version
        small = is_small(rows=len(payload.features))
        return await run_sized(small, self._answer, serving, payload)

    def _answer(self, serving: Serving, payload: Batch) -> dict | InferResponse:
        probabilities = checked_probabilities(serving, payload.features)
        decisions = probabilities >= serving.threshold
        metrics.observe_scores(probabilities, decisions)
        ids = payload.decoded.answered_ids()
        if self._followup is not None or self._ledger is not None:
            scored = Scored(
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
            if self._followup is not None:
                self._followup.submit(scored, payload.features)
            else:
                self._ledger.record(scored)
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
        serving = self.serving  # read once: scores and explanations from one version
        if serving is None:
            raise InferenceError("no model is loaded")
        rows = len(payload.features)
        if rows > self.settings.max_explain_rows:
            limit = self.settings.max_explain_rows
            over = codec.rows_exceed(rows, limit, "MAX_EXPLAIN_ROWS", "the explain limit")
            raise InvalidInput(f"instances: {over}")
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


def _explain(serving: Serving, batch: Batch) -> list[dict[str, Any]]:
    try:
        if serving.explainer is None:
            raise ExplainerUnavailable("this slot does not explain")
        explainer = serving.explainer.result()  # waits only in a process's first ~0.5 s
    except ExplainerUnavailable as error:
        raise NotImplementedError(
            f"model version {serving.version} cannot be explained: {error}"
        ) from None
    probabilities = checked_probabilities(serving, batch.features)
    decisions = probabilities >= serving.threshold
    rows = batch.decoded.rows()
    try:
        return explain_rows(
            explainer, batch.features, rows, probabilities, decisions, serving.version
        )
    except ExplainerUnavailable as error:
        raise InferenceError(f"model version {serving.version}: {error}") from None
