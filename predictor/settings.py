"""Configuration from the environment and `.env`; see `.env.example` for every variable."""

from __future__ import annotations

import ipaddress
import re
from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from predictor.schema import error_message
from predictor.store import backend_of

DEFAULT_MODEL_NAME = "fraud-detector"
DEFAULT_ALIAS = "champion"
#: The model URI grammar, in one place: an alias, a version or a run's artifact path.
ALIAS_URI = re.compile(r"^models:/(?P<name>[^/@]+)@(?P<alias>[^/@]+)$")
VERSION_URI = re.compile(r"^models:/(?P<name>[^/@]+)/(?P<version>\d+)$")
RUN_URI = re.compile(r"^runs:/(?P<run_id>[0-9a-zA-Z]+)/(?P<path>.+)$")
MODEL_URIS = (ALIAS_URI, VERSION_URI, RUN_URI)


class Settings(BaseSettings):
    """Server settings. Field names are the environment variable names (case-insensitive)."""

    model_config = SettingsConfigDict(env_file=".env", extra="ignore", case_sensitive=False)

    mlflow_tracking_uri: str | None = Field(
        default=None,
        description="MLflow tracking/registry server. Unset: the embedded local store.",
    )
    model_uri: str = Field(
        default=f"models:/{DEFAULT_MODEL_NAME}@{DEFAULT_ALIAS}",
        description="The model to serve: models:/<name>@<alias> (followed, hot-reloaded),"
        " models:/<name>/<version> or runs:/<run_id>/<path>.",
    )
    shadow_model_uri: str | None = Field(
        default=None,
        description="A second version scored beside the champion after each answer, e.g."
        " models:/fraud-detector@challenger. Unset: no shadow.",
    )
    drift_window_rows: int = Field(
        default=10_000,
        ge=0,
        description="Scored transactions kept for feature drift (PSI); 0 turns drift off.",
    )
    decision_threshold: float | None = Field(
        default=None,
        ge=0.0,
        le=1.0,
        allow_inf_nan=False,
        description="Overrides the version's decision_threshold tag (0..1). Unset: the tag.",
    )
    max_batch_rows: int = Field(
        default=10_000, ge=1, description="Most transactions accepted in one request."
    )
    max_explain_rows: int = Field(
        default=100, ge=1, description="Most transactions explained in one :explain request."
    )
    max_request_bytes: int = Field(
        default=8 * 1024 * 1024, ge=1024, description="Largest request body (bytes): 413 above."
    )
    local_store_dir: Path = Field(
        default=Path("mlflow-local"),
        description="The embedded MLflow store's directory (without MLFLOW_TRACKING_URI).",
    )
    model_load_timeout_seconds: float = Field(
        default=15.0, gt=0, description="Timeout of each MLflow call while loading."
    )
    model_poll_interval_seconds: float = Field(
        default=30.0, ge=0, description="How often an alias is looked up again; 0: never."
    )
    model_retry_max_seconds: float = Field(
        default=30.0, ge=1, description="Longest wait between retries of a failed load."
    )
    max_header_bytes: int = Field(
        default=64 * 1024, ge=1024, description="Largest request line + headers: 431 above."
    )
    auth_tokens_file: Path | None = Field(
        default=None,
        description="Bearer tokens (sha256:<hex> <scopes> <name> per line). Unset: every"
        " caller that reaches the server is trusted (a warning at start).",
    )
    bind_address: str = Field(
        default="127.0.0.1", description="Address the HTTP and gRPC servers listen on."
    )
    decision_log_uri: str | None = Field(
        default=None,
        description="Decision ledger: sqlite:///PATH, postgresql://... or none. Unset: SQLite"
        " beside the embedded store, none with a remote registry.",
    )
    decision_log_flush_seconds: float = Field(
        default=0.2, gt=0, le=60, description="How often the ledger writes what was recorded."
    )
    decision_log_max_pending: int = Field(
        default=100_000, ge=1, description="Decisions held in memory while the database is away."
    )
    decision_log_spool_path: Path | None = Field(
        default=None, description="File holding decisions beyond the memory bound (optional)."
    )
    log_format: Literal["text", "json"] = Field(
        default="text", description="Log lines as text or as one JSON object each."
    )
    access_log: bool = Field(default=False, description="One log line per request.")

    @field_validator(
        "mlflow_tracking_uri",
        "decision_threshold",
        "auth_tokens_file",
        "decision_log_uri",
        "decision_log_spool_path",
        "shadow_model_uri",
        mode="before",
    )
    @classmethod
    def _empty_is_unset(cls, value: object) -> object:
        return None if value == "" else value

    @field_validator("model_uri", "shadow_model_uri")
    @classmethod
    def _model_uri_shape(cls, value: str | None) -> str | None:
        if value is not None and not any(grammar.match(value) for grammar in MODEL_URIS):
            raise ValueError(
                "must look like models:/<name>@<alias>, models:/<name>/<version> "
                "or runs:/<run_id>/<path>"
            )
        return value

    @field_validator("bind_address")
    @classmethod
    def _bind_address_is_an_ip(cls, value: str) -> str:
        ipaddress.ip_address(value)  # ValueError names the problem
        return value

    @field_validator("decision_log_uri")
    @classmethod
    def _decision_log_uri_shape(cls, value: str | None) -> str | None:
        if value is not None and value != "none":
            backend_of(value)  # ValueError names the accepted forms
        return value

    @property
    def decision_log_location(self) -> str:
        """DECISION_LOG_URI, or its default: a SQLite file beside the embedded store, and
        `none` with a remote registry (decisions are kept where the model is)."""
        if self.decision_log_uri is not None:
            return self.decision_log_uri
        if self.uses_embedded_store:
            return f"sqlite:///{self.local_store_dir.resolve() / 'decisions.db'}"
        return "none"

    @property
    def uses_embedded_store(self) -> bool:
        return self.mlflow_tracking_uri is None

    @property
    def tracking_uri(self) -> str:
        """The MLflow URI actually used: the configured one or the embedded sqlite store."""
        if self.mlflow_tracking_uri:
            return self.mlflow_tracking_uri
        return embedded_tracking_uri(self.local_store_dir)


def embedded_tracking_uri(store_dir: Path) -> str:
    return f"sqlite:///{store_dir.resolve() / 'mlflow.db'}"


def embedded_artifact_location(store_dir: Path) -> str:
    return (store_dir.resolve() / "artifacts").as_uri()


class ConfigurationError(Exception):
    """A setting is invalid; the message is one line naming the variable."""


def load_settings() -> Settings:
    """Read settings, turning pydantic's report into one line that names the variable."""
    try:
        return Settings()
    except ValidationError as error:
        first = error.errors(include_url=False)[0]
        variable = str(first["loc"][0]).upper() if first["loc"] else "configuration"
        raise ConfigurationError(
            f"invalid configuration: {variable}={first.get('input')!r}: {error_message(first)}"
        ) from None
