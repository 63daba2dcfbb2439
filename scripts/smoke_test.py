"""Smoke test of a running fraud predictor: health, metadata, one V1 and one V2 prediction.

    python scripts/smoke_test.py http://127.0.0.1:8080
    python scripts/smoke_test.py http://ingress.example \
        --host fraud-detector.fraud-detection.example.com --token "$TOKEN"

Standard library only, so it runs from any Python 3.11+ (a CI job, a debug pod).
Prints one line per check; on the first failure prints `FAIL: <what>` and exits 1.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import urllib.error
import urllib.request

FRAUDULENT = {
    "amount": 1890.0,
    "timestamp": "2026-11-26T03:14:00+00:00",
    "merchant_category": "electronics",
    "card_present": False,
    "distance_from_home_km": 950.0,
    "transactions_last_24h": 14,
    "customer_age": 23,
    "account_age_days": 5,
}
ORDINARY = {
    "amount": 42.5,
    "timestamp": "2026-11-26T14:02:00+01:00",
    "merchant_category": "grocery",
    "card_present": True,
    "distance_from_home_km": 2.5,
    "transactions_last_24h": 1,
    "customer_age": 41,
    "account_age_days": 2400,
}
V2_TYPES = {
    "amount": "FP64",
    "timestamp": "BYTES",
    "merchant_category": "BYTES",
    "card_present": "BOOL",
    "distance_from_home_km": "FP64",
    "transactions_last_24h": "INT64",
    "customer_age": "INT64",
    "account_age_days": "INT64",
}


class SmokeFailure(Exception):
    """One check failed; the message says which and why."""


class Client:
    def __init__(self, base_url: str, host: str | None, token: str | None, timeout: float):
        self.base_url = base_url.rstrip("/")
        self.headers = {"Content-Type": "application/json"}
        if host:
            self.headers["Host"] = host
        if token:
            self.headers["Authorization"] = f"Bearer {token}"
        self.timeout = timeout

    def call(self, method: str, path: str, body: dict | None = None) -> tuple[dict, dict]:
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(
            self.base_url + path, data=data, method=method, headers=self.headers
        )
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                text = response.read().decode()
                headers = {k.lower(): v for k, v in response.headers.items()}
        except urllib.error.HTTPError as error:
            detail = error.read().decode(errors="replace")[:200]
            raise SmokeFailure(f"{method} {path} answered {error.code}: {detail}") from None
        except (urllib.error.URLError, OSError) as error:
            raise SmokeFailure(f"{method} {path} failed: {error}") from None
        try:
            return json.loads(text), headers
        except ValueError:
            raise SmokeFailure(f"{method} {path} did not answer JSON: {text[:200]!r}") from None


def expect(condition: bool, message: str) -> None:
    if not condition:
        raise SmokeFailure(message)


def check_prediction(name: str, probability: object, decision: object) -> float:
    expect(
        isinstance(probability, float) and 0.0 <= probability <= 1.0,
        f"{name}: fraud_probability {probability!r} is not a number in [0, 1]",
    )
    expect(isinstance(decision, bool), f"{name}: is_fraud {decision!r} is not a boolean")
    return probability  # type: ignore[return-value]


def run(client: Client, model: str, report=print) -> None:
    """Every check in order; `report` hears each one that passed."""
    body, _ = client.call("GET", "/v2/health/live")
    expect(body.get("live") is True, f"/v2/health/live answered {body}")
    report("ok: live")
    body, _ = client.call("GET", "/v2/health/ready")
    expect(body.get("ready") is True, f"/v2/health/ready answered {body}")
    body, _ = client.call("GET", f"/v2/models/{model}/ready")
    expect(body.get("ready") is True, f"model {model} is not ready: {body}")
    report("ok: ready")

    metadata, _ = client.call("GET", f"/v2/models/{model}")
    inputs = {t.get("name"): t.get("datatype") for t in metadata.get("inputs", [])}
    expect(
        inputs == {**V2_TYPES, "transaction_id": "BYTES"},
        f"metadata inputs {inputs} differ from the transaction schema (and transaction_id)",
    )
    outputs = {t.get("name"): t.get("datatype") for t in metadata.get("outputs", [])}
    expect(
        outputs == {"fraud_probability": "FP64", "is_fraud": "BOOL", "transaction_id": "BYTES"},
        f"metadata outputs {outputs} are not fraud_probability FP64, is_fraud BOOL and "
        "transaction_id BYTES",
    )
    report(f"ok: metadata (versions {metadata.get('versions')})")

    v1, headers = client.call(
        "POST", f"/v1/models/{model}:predict", {"instances": [FRAUDULENT, ORDINARY]}
    )
    predictions = v1.get("predictions")
    expect(
        isinstance(predictions, list) and len(predictions) == 2,
        f"V1 answered {str(v1)[:200]}, not two predictions",
    )
    v1_probabilities = [
        check_prediction(f"V1 row {i}", p.get("fraud_probability"), p.get("is_fraud"))
        for i, p in enumerate(predictions)
    ]
    expect(
        v1_probabilities[0] > v1_probabilities[1],
        f"V1 scores the obvious fraud ({v1_probabilities[0]:.4f}) no higher than the ordinary "
        f"purchase ({v1_probabilities[1]:.4f})",
    )
    version = v1.get("model_version")
    expect(bool(version), "V1 answer has no model_version")
    expect(
        headers.get("x-model-version") == version,
        f"x-model-version header {headers.get('x-model-version')!r} != model_version {version!r}",
    )
    report(f"ok: V1 predict (version {version})")

    rows = [FRAUDULENT, ORDINARY]
    v2_request = {
        "id": "smoke-test",
        "inputs": [
            {"name": n, "datatype": t, "shape": [2], "data": [r[n] for r in rows]}
            for n, t in V2_TYPES.items()
        ],
    }
    v2, _ = client.call("POST", f"/v2/models/{model}/infer", v2_request)
    expect(v2.get("id") == "smoke-test", f"V2 answer id {v2.get('id')!r} is not the request's")
    tensors = {o.get("name"): o for o in v2.get("outputs", [])}
    expect(
        set(tensors) == {"fraud_probability", "is_fraud", "transaction_id"},
        f"V2 outputs {sorted(tensors)} are not fraud_probability, is_fraud and transaction_id",
    )
    probabilities = tensors["fraud_probability"].get("data") or []
    decisions = tensors["is_fraud"].get("data") or []
    expect(len(probabilities) == 2 and len(decisions) == 2, "V2 outputs do not hold two rows")
    for i in range(2):
        check_prediction(f"V2 row {i}", probabilities[i], decisions[i])
    expect(
        all(abs(a - b) < 1e-9 for a, b in zip(probabilities, v1_probabilities, strict=True)),
        f"V2 probabilities {probabilities} differ from V1's {v1_probabilities}",
    )
    report("ok: V2 infer")

    explanation = explain(client, model, version)
    (top,) = explanation["reasons"][:1]
    expect(
        abs(explanation["fraud_probability"] - v1_probabilities[0]) < 1e-9,
        "explain's probability differs from predict's",
    )
    report(f"ok: explain (top reason {top['field']}={top['value']!r})")


def explain(client: Client, model: str, version: str) -> dict:
    """Reason codes for the obvious fraud: additive, in the client's fields."""
    body, _ = client.call("POST", f"/v1/models/{model}:explain", {"instances": [FRAUDULENT]})
    (explanation,) = body.get("explanations") or [None]
    expect(isinstance(explanation, dict), f"explain answered {str(body)[:200]}")
    contributions = explanation.get("contributions") or {}
    expect(set(contributions) == set(V2_TYPES), f"contributions keyed by {sorted(contributions)}")
    expect(body.get("model_version") == version, "explain answered from another version")
    logit = explanation["base_value"] + sum(contributions.values())
    probability = explanation["fraud_probability"]
    expect(
        abs(logit - math.log(probability / (1 - probability))) < 1e-6,
        "base value + contributions is not the logit of the probability",
    )
    expect(bool(explanation.get("reasons")), "the obvious fraud has no reason codes")
    return explanation


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("url", help="base URL, e.g. http://127.0.0.1:8080")
    parser.add_argument("--model", default="fraud-detector", help="model name")
    parser.add_argument("--host", help="Host header (KServe ingress routing)")
    parser.add_argument("--token", help="bearer token")
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds per request")
    args = parser.parse_args(argv)
    client = Client(args.url, args.host, args.token, args.timeout)
    try:
        run(client, args.model)
    except SmokeFailure as failure:
        print(f"FAIL: {failure}", file=sys.stderr)
        return 1
    print(f"smoke test passed against {args.url}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
