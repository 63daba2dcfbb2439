"""This server's V2 infer route answers as KServe's own V2 handler does (status, body, the
headers that matter) over a corpus of valid and invalid requests, so a KServe upgrade
cannot drift from it unnoticed. Both run in process on apps built the same way, with the
same model, data plane, middleware and error handlers; only the route differs.

Where they differ, on purpose, the tests say so: KServe's handler writes `null` for absent
optional fields (same meaning in the V2 spec); a body that is not a V2 request gets the
same 400 naming the field without KServe's pydantic union noise; malformed binary data,
which KServe's decoder accepts (trailing bytes), fails on with a 500 (bytes not UTF-8) or
refuses without saying where, gets a 400 naming the part."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import orjson
import pytest
from fastapi import FastAPI
from fastapi.responses import ORJSONResponse
from kserve.model_repository import ModelRepository
from kserve.protocol.model_repository_extension import ModelRepositoryExtension
from kserve.protocol.rest.server import RESTServer
from support import ORDINARY, SUSPICIOUS
from test_hostile_input import BINARY, binary_request

from predictor import codec, registry, seam
from predictor.engine import NUMBA
from predictor.model import FraudModel
from predictor.server import FraudDataPlane, add_middlewares, install_http_edges
from predictor.settings import Settings

MODEL = "fraud-detector"
INFER = f"/v2/models/{MODEL}/infer"
JSON = {"content-type": "application/json"}
#: Response headers a client reads.
HEADERS = ("content-type", "x-model-version", "inference-header-content-length")


def body(rows: list[dict] = (ORDINARY,), **top: Any) -> dict[str, Any]:
    return {**codec.v2_request_body(list(rows)), **top}


def edited(change) -> bytes:
    request = body([ORDINARY, SUSPICIOUS], id="edited")
    change(request)
    return orjson.dumps(request)


VALID: dict[str, tuple[str, bytes]] = {
    "one row with an id": (INFER, orjson.dumps(body(id="txn-1"))),
    "two rows, no id": (INFER, orjson.dumps(body([ORDINARY, SUSPICIOUS]))),
    "parameters and requested outputs": (
        INFER,
        orjson.dumps(
            body(id="p", parameters={"tag": "x"}, outputs=[{"name": "fraud_probability"}])
        ),
    ),
}
NOT_A_V2_REQUEST: dict[str, tuple[str, bytes]] = {
    "not JSON": (INFER, b"{inputs: nope"),
    "a JSON list": (INFER, b"[1, 2]"),
    "no inputs": (INFER, b'{"id": "x"}'),
    "inputs not a list": (INFER, b'{"inputs": {"name": "amount"}}'),
    "id not a string": (INFER, orjson.dumps(body(id=5))),
}
REFUSED: dict[str, tuple[str, bytes]] = {
    "unknown model": ("/v2/models/nope/infer", orjson.dumps(body(id="n"))),
    "unknown datatype": (INFER, edited(lambda r: r["inputs"][0].update(datatype="FP99"))),
    "wrong datatype": (INFER, edited(lambda r: r["inputs"][0].update(datatype="INT64"))),
    "unknown tensor": (INFER, edited(lambda r: r["inputs"][0].update(name="amount_usd"))),
    "missing tensor": (INFER, edited(lambda r: r["inputs"].pop())),
    "duplicate tensor": (INFER, edited(lambda r: r["inputs"].append(r["inputs"][0]))),
    "shape against data": (INFER, edited(lambda r: r["inputs"][0].update(shape=[3]))),
    "tensors of unequal length": (
        INFER,
        edited(lambda r: r["inputs"][1].update(shape=[1], data=r["inputs"][1]["data"][:1])),
    ),
    "a field rule": (INFER, edited(lambda r: r["inputs"][0]["data"].__setitem__(1, -5.0))),
    "zero rows": (INFER, orjson.dumps(body([]))),
}


@pytest.fixture(scope="module")
def model(mlflow_server, champion) -> FraudModel:
    ref = registry.resolve(registry.connect(mlflow_server.url), f"models:/{MODEL}@champion")
    served = FraudModel(MODEL, Settings())
    served.serve(registry.load(ref, mlflow_server.url))
    # Both apps must score with one engine: numba takes over from treelite once built.
    served.champion.wait_for_builds(60)
    assert served.serving.scorer.engine == NUMBA
    return served


def build_app(model: FraudModel, ours: bool) -> FastAPI:
    """An app as `python -m predictor` builds it; with `ours=False`, KServe's V2 infer
    handler answers instead of this server's."""
    app = FastAPI(default_response_class=ORJSONResponse)  # as kserve.model_server.app
    repository = ModelRepository()
    repository.update(model)
    dataplane = FraudDataPlane(repository, model.settings, workers=1)
    install_http_edges(app, dataplane)
    if not ours:
        app.router.routes = [
            route
            for route in app.router.routes
            if getattr(getattr(route, "endpoint", None), "__name__", "")
            not in ("infer", "versioned_infer")
        ]
    rest_server = RESTServer(app, dataplane, ModelRepositoryExtension(repository), 0)
    seam.replace_kserve_middlewares(rest_server, add_middlewares)
    seam.kserve_app_parts(rest_server, app)
    return app


def answer(app: FastAPI, path: str, content: bytes, headers: dict[str, str]) -> tuple:
    async def post() -> httpx.Response:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return await client.post(path, content=content, headers=headers)

    response = asyncio.run(post())
    kept = {name: response.headers.get(name) for name in HEADERS}
    return response.status_code, response.content, kept


def comparable(content: bytes, request: bytes, json_length: str | None = None) -> Any:
    """The response: its JSON (part) without `null` fields and without the id made up (a
    uuid4) when the request has none; the binary part as it is."""
    length = int(json_length) if json_length else len(content)
    parsed = without_nulls(orjson.loads(content[:length]))
    if b'"id"' not in request:
        parsed.pop("id", None)
    if b'"transaction_id"' not in request:  # server-made UUIDs differ between two answers
        for output in parsed.get("outputs", []):
            if output["name"] == "transaction_id":
                output["data"] = [len(value) for value in output.get("data", [])]
    return parsed, content[length:]


def without_nulls(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: without_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [without_nulls(v) for v in value]
    return value


@pytest.fixture(scope="module")
def apps(model) -> tuple[FastAPI, FastAPI]:
    return build_app(model, ours=True), build_app(model, ours=False)


def own_endpoints(app: FastAPI) -> dict[str, str]:
    """Path -> endpoint name of the routes added before KServe's (which come included)."""
    return {r.path: r.endpoint.__name__ for r in app.router.routes if hasattr(r, "endpoint")}


def test_the_route_under_test_is_the_servers_own(apps):
    ours, kservers = apps
    assert own_endpoints(ours)["/v2/models/{model_name}/infer"] == "infer"
    assert "/v2/models/{model_name}/infer" not in own_endpoints(kservers)


def both(apps, path: str, content: bytes, headers: dict[str, str]) -> tuple[tuple, tuple]:
    ours, kservers = apps
    return answer(ours, path, content, headers), answer(kservers, path, content, headers)


@pytest.mark.parametrize("case", VALID)
def test_valid_json_requests_get_kserves_answer(apps, case):
    path, content = VALID[case]
    (status, ours, our_headers), (kserve_status, theirs, their_headers) = both(
        apps, path, content, JSON
    )
    assert status == kserve_status == 200
    assert comparable(ours, content) == comparable(theirs, content)
    assert our_headers == their_headers


def test_valid_binary_requests_get_kserves_answer(apps):
    content, headers = binary_request([ORDINARY, SUSPICIOUS])
    (status, ours, our_headers), (kserve_status, theirs, their_headers) = both(
        apps, INFER, content, headers
    )
    assert status == kserve_status == 200
    length = "inference-header-content-length"
    assert comparable(ours, content, our_headers[length]) == comparable(
        theirs, content, their_headers[length]
    )
    assert our_headers["content-type"] == their_headers["content-type"]


@pytest.mark.parametrize("case", REFUSED)
def test_refused_requests_get_kserves_answer_word_for_word(apps, case):
    path, content = REFUSED[case]
    (status, ours, our_headers), (kserve_status, theirs, their_headers) = both(
        apps, path, content, JSON
    )
    assert status == kserve_status and status in (400, 404)
    assert ours == theirs and our_headers == their_headers


@pytest.mark.parametrize("case", NOT_A_V2_REQUEST)
def test_bodies_that_are_not_v2_requests_get_kserves_status_and_a_plainer_message(apps, case):
    path, content = NOT_A_V2_REQUEST[case]
    (status, ours, _), (kserve_status, theirs, _) = both(apps, path, content, JSON)
    assert status == kserve_status == 400
    mine, kserves = orjson.loads(ours)["error"], orjson.loads(theirs)["error"]
    assert mine and "bytes: Input should be" not in mine, (mine, kserves)


@pytest.mark.parametrize("case", BINARY)
def test_malformed_binary_requests_get_a_400(apps, case):
    """(tests/test_hostile_input.py checks each message against a running server.)"""
    content, headers, status, _ = BINARY[case]
    (ours, our_body, _), (theirs, _, _) = both(apps, INFER, content, headers)
    assert ours == status == 400, our_body
    assert theirs in (200, 400, 500)  # what KServe's decoder makes of it (see the top)


def test_the_versioned_route_answers_for_the_served_version_only(apps, model):
    ours, _ = apps
    content = orjson.dumps(body(id="v"))
    plain = answer(ours, INFER, content, JSON)
    served = f"/v2/models/{MODEL}/versions/{model.serving.version}/infer"
    status, served_body, headers = answer(ours, served, content, JSON)
    assert (status, headers) == plain[::2] and comparable(served_body, content) == comparable(
        plain[1], content
    )
    status, other, _ = answer(ours, f"/v2/models/{MODEL}/versions/999/infer", content, JSON)
    assert status == 404 and "fraud-detector version '999'" in orjson.loads(other)["error"]
