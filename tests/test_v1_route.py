"""This server's V1 `:predict` and `:explain` routes answer as KServe's own V1 handlers do
(status, body, the headers a client reads) over a corpus of valid and invalid requests,
JSON and CloudEvents, so a KServe upgrade cannot drift from them unnoticed. Both run in
process on apps built the same way; only the route differs (tests/test_v2_route.py does
the same for V2).

Where they differ, on purpose, the tests say so: large bodies are decoded in the thread
pool (KServe's on the event loop), and `:explain` answers with the server's own headers
(KServe's copies every request header into its response)."""

from __future__ import annotations

import orjson
import pytest
from support import ORDINARY, SUSPICIOUS, as_row
from test_hostile_input import CE_HEADERS
from test_v2_route import answer, build_app, model  # noqa: F401 - the module's fixture

MODEL = "fraud-detector"
PREDICT = f"/v1/models/{MODEL}:predict"
EXPLAIN = f"/v1/models/{MODEL}:explain"
JSON = {"content-type": "application/json"}
HEADERS = ("content-type", "x-model-version", "ce-type", "ce-source", "ce-specversion")


def body(**top) -> bytes:
    return orjson.dumps(top)


CORPUS: dict[str, tuple[str, bytes, dict]] = {
    "objects": (PREDICT, body(instances=[ORDINARY, SUSPICIOUS]), JSON),
    "lists": (PREDICT, body(instances=[as_row(ORDINARY)]), JSON),
    "no content type": (PREDICT, body(instances=[ORDINARY]), {}),
    "text/plain": (PREDICT, body(instances=[ORDINARY]), {"content-type": "text/plain"}),
    "binary cloudevent": (PREDICT, body(instances=[ORDINARY]), {**CE_HEADERS, **JSON}),
    "structured cloudevent": (
        PREDICT,
        orjson.dumps(
            {
                "specversion": "1.0",
                "id": "txn-2",
                "source": "payments",
                "type": "org.example.fraud.score",
                "datacontenttype": "application/json",
                "data": {"instances": [ORDINARY]},
            }
        ),
        {"content-type": "application/cloudevents+json"},
    ),
    "not JSON": (PREDICT, b"{instances", JSON),
    "not an object": (PREDICT, b"[1, 2]", JSON),
    "no instances": (PREDICT, body(rows=[ORDINARY]), JSON),
    "a field rule": (PREDICT, body(instances=[{**ORDINARY, "amount": -5}]), JSON),
    "zero rows": (PREDICT, body(instances=[]), JSON),
    "unknown model": ("/v1/models/nope:predict", body(instances=[ORDINARY]), JSON),
    "explain objects": (EXPLAIN, body(instances=[ORDINARY, SUSPICIOUS]), JSON),
    "explain a field rule": (EXPLAIN, body(instances=[{**ORDINARY, "card_present": "yes"}]), JSON),
    "explain unknown model": ("/v1/models/nope:explain", body(instances=[ORDINARY]), JSON),
}


@pytest.fixture(scope="module")
def apps(model):  # noqa: F811 - the fixture imported above
    ours = build_app(model, ours=True)
    kservers = build_app(model, ours=True)
    kservers.router.routes = [
        route
        for route in kservers.router.routes
        if getattr(getattr(route, "endpoint", None), "__module__", "") != "predictor.server"
        or not route.path.startswith("/v1/models/{model_name}:")
    ]
    return ours, kservers


def test_the_routes_under_test_are_the_servers_own(apps):
    def own(app) -> set[str]:
        return {
            route.path
            for route in app.router.routes
            if getattr(getattr(route, "endpoint", None), "__module__", "") == "predictor.server"
        }

    ours, kservers = apps
    v1 = {"/v1/models/{model_name}:predict", "/v1/models/{model_name}:explain"}
    assert v1 <= own(ours) and not v1 & own(kservers)


@pytest.mark.parametrize("case", CORPUS)
def test_every_request_gets_kserves_answer(apps, case):
    path, content, headers = CORPUS[case]
    ours, kservers = apps
    status, mine, my_headers = answer(ours, path, content, headers)
    kserve_status, theirs, their_headers = answer(kservers, path, content, headers)
    assert status == kserve_status, (mine, theirs)
    if path.endswith(":explain") and status == 200:
        # KServe echoes the request's headers; the explanation itself is the same.
        assert without_made_ids(mine) == without_made_ids(theirs)
        assert my_headers["x-model-version"] == orjson.loads(mine)["model_version"]
        return
    assert (without_made_ids(mine), my_headers) == (without_made_ids(theirs), their_headers)


def without_made_ids(content: bytes) -> object:
    """The answer with server-made transaction ids (UUIDs, different every time) masked."""
    try:
        parsed = orjson.loads(content)
    except orjson.JSONDecodeError:
        return content
    data = parsed.get("data", parsed) if isinstance(parsed, dict) else parsed
    for prediction in data.get("predictions", []) if isinstance(data, dict) else []:
        if len(prediction.get("transaction_id", "")) == 36:
            prediction["transaction_id"] = "server-made"
    for key in ("id", "time"):  # a structured CloudEvent's own
        if isinstance(parsed, dict) and "specversion" in parsed:
            parsed.pop(key, None)
    return parsed
