"""Prometheus metrics, correct across `--workers N`.

With `--workers N`, `python -m predictor` points PROMETHEUS_MULTIPROC_DIR at a fresh
directory before prometheus-client is imported, so every worker writes its samples there and
one scrape of `/metrics` (any worker) reports the sum over all workers, KServe's own latency
histograms included. A single worker keeps its metrics in memory.
"""

from __future__ import annotations

import os

import numpy as np
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)

from predictor import seam
from predictor.runtime import METRICS_ENV

MODEL_INFO = Gauge(
    "fraud_model_info",
    "1 for the model version being served (by any worker), 0 for versions served before;"
    " role: champion (answers) or shadow (scored beside it, never answers); engine: numba"
    " (compiled trees, every batch), treelite (compiled trees for small batches) or sklearn.",
    ["model", "version", "alias", "run_id", "engine", "role"],
    multiprocess_mode="max",
)
MODEL_LOADS = Counter(
    "fraud_model_load_attempts",
    "Model load attempts of the champion or the shadow, initial or reload: success, failure"
    " (the version failed to load or its checks) or registry_error (the registry could not"
    " be asked, or the alias does not exist).",
    ["role", "kind", "outcome"],
)
MODEL_LOAD_SECONDS = Histogram(
    "fraud_model_load_duration_seconds",
    "Time to resolve, download, load and check a model version.",
    buckets=(0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
)
PREDICTIONS = Counter(
    "fraud_predictions",
    "Transactions scored, by decision (fraud or legit).",
    ["outcome"],
)
FRAUD_PROBABILITY = Histogram(
    "fraud_probability",
    "Distribution of scored fraud probabilities (watch it for drift).",
    buckets=(0.001, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 0.9, 0.99),
)
REQUEST_ROWS = Histogram(
    "fraud_request_rows",
    "Transactions per prediction request.",
    buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000),
)
REQUEST_ERRORS = Counter(
    "fraud_request_errors",
    "Responses with an error: HTTP status >= 400 (protocol http) or a gRPC status code other"
    " than OK (protocol grpc).",
    ["protocol", "status"],
)
REQUEST_SECONDS = Histogram(
    "fraud_request_duration_seconds",
    "Inference requests (V1 predict, V2 infer, gRPC ModelInfer) from arrival to the last byte"
    " of the answer, whatever the status; its count is the request count.",
    ["protocol"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
AUTH_DENIED = Counter(
    "fraud_auth_denied",
    "Requests refused by the token check (also in fraud_request_errors): missing (no"
    " token), invalid (unknown or malformed token) or scope (valid token without the scope).",
    ["reason"],
)
DECISIONS_RECORDED = Counter(
    "fraud_decisions_recorded",
    "Decisions (one per scored transaction) written to the decision ledger.",
)
DECISIONS_DROPPED = Counter(
    "fraud_decisions_dropped",
    "Decisions that could not be recorded: the ledger's queue (and spool) were full, or"
    " the process stopped before the database took them.",
)
DECISIONS_PENDING = Gauge(
    "fraud_decision_log_pending",
    "Decisions answered but not yet in the ledger's database (queued in memory or spooled).",
    multiprocess_mode="livesum",
)
EXPLAINED = Counter(
    "fraud_explained_transactions",
    "Transactions explained (reason codes) by :explain; latency and request counts are in"
    " KServe's request_explain_seconds.",
)
INVALID_OUTPUTS = Counter(
    "fraud_invalid_model_outputs",
    "Requests refused because the served version returned scores that are not probabilities.",
    ["version"],
)
SHADOW_SCORED = Counter(
    "fraud_shadow_scored",
    "Transactions the shadow version (SHADOW_MODEL_URI) scored after the champion answered.",
)
SHADOW_DISAGREEMENTS = Counter(
    "fraud_shadow_disagreements",
    "Shadow-scored transactions whose decision differs between champion and shadow, each"
    " at its own version's threshold.",
)
SHADOW_NOT_SCORED = Counter(
    "fraud_shadow_not_scored",
    "Transactions the shadow did not score: failed (the shadow version raised or returned"
    " no probabilities), busy (its queue was full) or loading (no shadow version yet).",
    ["reason"],
)
SHADOW_DIFFERENCE = Histogram(
    "fraud_shadow_probability_difference",
    "|champion probability - shadow probability| per shadow-scored transaction.",
    buckets=(0.001, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 1.0),
)
FEATURE_DRIFT = Gauge(
    "fraud_feature_drift_psi",
    "Population stability index of each feature over the last DRIFT_WINDOW_ROWS scored"
    " transactions against the served version's training profile (> 0.25: drifted).",
    ["feature"],
    multiprocess_mode="max",
)
SCORE_DRIFT = Gauge(
    "fraud_score_drift_psi",
    "Population stability index of the served version's fraud probabilities over the"
    " window against its held-out training scores.",
    multiprocess_mode="max",
)
DRIFT_WINDOW = Gauge(
    "fraud_drift_window_rows",
    "Transactions in the drift window the PSI gauges are computed over (per worker).",
    multiprocess_mode="max",
)


def exposition() -> tuple[bytes, str]:
    """The scrape body: summed over workers in multiprocess mode."""
    if os.environ.get(METRICS_ENV):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return generate_latest(registry), CONTENT_TYPE_LATEST
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST


def observe_many(histogram: Histogram, values: np.ndarray) -> None:
    """`histogram.observe(v)` for every value, in one numpy pass (see predictor.seam)."""
    seam.observe_histogram_many(histogram, values)


def observe_scores(probabilities: np.ndarray, decisions: np.ndarray) -> None:
    """Count one request's transactions and their scores."""
    REQUEST_ROWS.observe(len(probabilities))
    fraud = int(decisions.sum())
    if fraud:
        PREDICTIONS.labels(outcome="fraud").inc(fraud)
    if fraud < len(decisions):
        PREDICTIONS.labels(outcome="legit").inc(len(decisions) - fraud)
    observe_many(FRAUD_PROBABILITY, probabilities)
