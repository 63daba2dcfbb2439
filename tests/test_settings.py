"""Settings: every variable documented, bad values refused with the variable's name."""

import re
from pathlib import Path

import pytest

from predictor.settings import ConfigurationError, Settings, load_settings

ROOT = Path(__file__).resolve().parents[1]


def test_every_setting_is_documented_in_env_example():
    documented = set(re.findall(r"^([A-Z_]+)=", (ROOT / ".env.example").read_text(), re.M))
    assert documented == {name.upper() for name in Settings.model_fields}


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        ("DECISION_THRESHOLD", "1.5", "less than or equal to 1"),
        ("DECISION_THRESHOLD", "high", "valid number"),
        ("MAX_BATCH_ROWS", "0", "greater than or equal to 1"),
        ("MODEL_URI", "fraud-detector", "must look like models:/"),
        ("MODEL_LOAD_TIMEOUT_SECONDS", "-1", "greater than 0"),
    ],
)
def test_bad_value_names_the_variable(monkeypatch, tmp_path, variable, value, message):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(variable, value)
    with pytest.raises(ConfigurationError) as error:
        load_settings()
    assert variable in str(error.value) and message in str(error.value)
    assert "\n" not in str(error.value)


def test_empty_values_mean_unset(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # mlflow.set_tracking_uri sets it
    (tmp_path / ".env").write_text("MLFLOW_TRACKING_URI=\nDECISION_THRESHOLD=\n")
    settings = load_settings()
    assert settings.uses_embedded_store
    assert settings.decision_threshold is None
    assert settings.tracking_uri.startswith("sqlite:///")


@pytest.mark.parametrize(
    "uri", ["models:/fraud-detector@champion", "models:/fraud-detector/3", "runs:/abc123/model"]
)
def test_model_uri_forms_are_accepted(monkeypatch, tmp_path, uri):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MODEL_URI", uri)
    assert load_settings().model_uri == uri
