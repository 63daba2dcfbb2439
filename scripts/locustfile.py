"""Load test with locust: V1, V2 and explain users sending realistic generated transactions.

    uv run locust -f scripts/locustfile.py --headless --host http://127.0.0.1:8080 \\
        --users 8 --spawn-rate 8 --run-time 30s --only-summary

Each user sends batches of 1-20 transactions drawn from a seeded synthetic stream and
checks every answer (status, one prediction per row, probabilities in [0, 1]; for explain,
contributions that add up to the probability's logit); a wrong
answer counts as a failure. Locust prints p50/p95/p99 and the failure count at the end,
and exits non-zero if any request failed.
"""

from __future__ import annotations

import math
import random

from locust import FastHttpUser, between, task

from predictor.codec import v2_request_body
from predictor.data import generate_transactions, transaction_payloads

MODEL = "fraud-detector"
TRANSACTIONS = transaction_payloads(generate_transactions(rows=5_000, fraud_rate=0.02, seed=7))


def batch(rng: random.Random) -> list[dict]:
    size = rng.choice((1, 1, 1, 2, 5, 10, 20))
    start = rng.randrange(len(TRANSACTIONS) - size)
    return TRANSACTIONS[start : start + size]


def sane(probabilities: list, decisions: list, rows: int) -> bool:
    return (
        len(probabilities) == rows
        and len(decisions) == rows
        and all(isinstance(p, float) and 0.0 <= p <= 1.0 for p in probabilities)
        and all(isinstance(d, bool) for d in decisions)
    )


def post_checked(user: FastHttpUser, path: str, body: dict, name: str, check) -> None:
    """POST `body`; a non-200 answer, or one `check(answer)` finds wrong (it returns why),
    counts as a failure."""
    with user.client.post(path, json=body, name=name, catch_response=True) as response:
        if response.status_code != 200:
            response.failure(f"status {response.status_code}: {response.text[:200]}")
            return
        problem = check(response.json())
        if problem:
            response.failure(f"{problem}: {response.text[:200]}")


class V1User(FastHttpUser):
    """Scores batches with the KServe V1 protocol."""

    wait_time = between(0.0, 0.01)

    def on_start(self) -> None:
        self.rng = random.Random(id(self))

    @task
    def predict(self) -> None:
        rows = batch(self.rng)

        def check(answer: dict) -> str | None:
            predictions = answer.get("predictions", [])
            probabilities = [p.get("fraud_probability") for p in predictions]
            decisions = [p.get("is_fraud") for p in predictions]
            return None if sane(probabilities, decisions, len(rows)) else "wrong answer"

        post_checked(self, f"/v1/models/{MODEL}:predict", {"instances": rows}, "v1 predict", check)


class V2User(FastHttpUser):
    """Scores batches with the V2 (Open Inference) protocol."""

    wait_time = between(0.0, 0.01)

    def on_start(self) -> None:
        self.rng = random.Random(id(self) + 1)

    @task
    def infer(self) -> None:
        rows = batch(self.rng)

        def check(answer: dict) -> str | None:
            outputs = {o["name"]: o["data"] for o in answer.get("outputs", [])}
            probabilities = outputs.get("fraud_probability", [])
            ok = sane(probabilities, outputs.get("is_fraud", []), len(rows))
            return None if ok else "wrong answer"

        post_checked(self, f"/v2/models/{MODEL}/infer", v2_request_body(rows), "v2 infer", check)


class ExplainUser(FastHttpUser):
    """Asks for reason codes, as an analyst's tool does: fewer, single-transaction calls."""

    wait_time = between(0.0, 0.05)

    def on_start(self) -> None:
        self.rng = random.Random(id(self) + 2)

    @task
    def explain(self) -> None:
        def check(answer: dict) -> str | None:
            (explanation,) = answer.get("explanations", [None])
            probability = explanation["fraud_probability"]
            logit = explanation["base_value"] + sum(explanation["contributions"].values())
            if not 0.0 < probability < 1.0:
                return "probability out of range"
            if abs(logit - math.log(probability / (1 - probability))) > 1e-6:
                return "contributions do not add up"
            return None

        rows = batch(self.rng)[:1]
        post_checked(self, f"/v1/models/{MODEL}:explain", {"instances": rows}, "v1 explain", check)
