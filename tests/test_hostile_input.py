"""Every door, tried as a hostile client would: the V2 binary extension, gRPC, CloudEvents
and extreme JSON. Each mistake is a 4xx (or INVALID_ARGUMENT) naming the problem, the next
valid request on the same door still succeeds, and every error is counted.

The V1/V2 JSON table of test_serving.py covers the ordinary mistakes.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from dataclasses import dataclass

import grpc
import orjson
import pytest
import requests
from kserve.protocol.grpc import grpc_predict_v2_pb2 as pb
from kserve.protocol.grpc.grpc_predict_v2_pb2_grpc import GRPCInferenceServiceStub
from support import ORDINARY as GOOD
from support import Predictor, free_port, launch_predictor, stop

from predictor.codec import V2_INPUTS

MODEL = "fraud-detector"
MAX_ROWS = 1_000


@dataclass
class Server:
    predictor: Predictor
    grpc_target: str

    @property
    def url(self) -> str:
        return self.predictor.url


@pytest.fixture(scope="module")
def server(mlflow_server, champion, tmp_path_factory) -> Server:
    grpc_port = free_port()
    predictor = launch_predictor(
        tmp_path_factory.mktemp("hostile"),
        env={"MLFLOW_TRACKING_URI": mlflow_server.url, "MAX_BATCH_ROWS": str(MAX_ROWS)},
        args=["--enable_grpc", "true", "--grpc_port", str(grpc_port)],
    )
    yield Server(predictor, f"127.0.0.1:{grpc_port}")
    stop(predictor.process)


# ------------------------------------------------------------------- request builders


def encode_element(datatype: str, value) -> bytes:
    if datatype == "BYTES":
        data = value.encode() if isinstance(value, str) else value
        return struct.pack("<I", len(data)) + data
    return struct.pack({"FP64": "<d", "INT64": "<q", "BOOL": "<?"}[datatype], value)


def binary_request(rows: list[dict] | None = None, **tweak) -> tuple[bytes, dict]:
    """A V2 binary-extension request; `tweak` edits the JSON header or the raw parts."""
    rows = rows or [GOOD]
    inputs, raw = [], []
    for name, datatype in V2_INPUTS.items():
        part = b"".join(encode_element(datatype, row[name]) for row in rows)
        raw.append(part)
        inputs.append(
            {
                "name": name,
                "datatype": datatype,
                "shape": [len(rows)],
                "parameters": {"binary_data_size": len(part)},
            }
        )
    header = {"inputs": inputs}
    if "edit" in tweak:
        tweak["edit"](header, raw)
    json_part = tweak.get("json_part", orjson.dumps(header))
    body = json_part + b"".join(raw) + tweak.get("trailer", b"")
    length = tweak.get("length", str(len(json_part)))
    return body, {
        "inference-header-content-length": length,
        "content-type": "application/octet-stream",
    }


def edit_input(tensor: str, **changes) -> Callable:
    def edit(header: dict, raw: list[bytes]) -> None:
        index = list(V2_INPUTS).index(tensor)
        header["inputs"][index].update(changes)

    return edit


def edit_raw(name: str, data: bytes, declare: bool = True) -> Callable:
    def edit(header: dict, raw: list[bytes]) -> None:
        index = list(V2_INPUTS).index(name)
        raw[index] = data
        if declare:
            header["inputs"][index]["parameters"]["binary_data_size"] = len(data)

    return edit


def grpc_request(rows: list[dict] | None = None, model: str = MODEL, raw: bool = False, **tweak):
    rows = rows or [GOOD]
    request = pb.ModelInferRequest(model_name=model, id="hostile")
    for name, datatype in V2_INPUTS.items():
        tensor = request.inputs.add(name=name, datatype=datatype, shape=[len(rows)])
        values = [row[name] for row in rows]
        if raw:
            request.raw_input_contents.append(
                b"".join(encode_element(datatype, value) for value in values)
            )
        elif datatype == "FP64":
            tensor.contents.fp64_contents.extend(values)
        elif datatype == "INT64":
            tensor.contents.int64_contents.extend(values)
        elif datatype == "BOOL":
            tensor.contents.bool_contents.extend(values)
        else:
            tensor.contents.bytes_contents.extend(v.encode() for v in values)
    if "edit" in tweak:
        tweak["edit"](request)
    return request


def grpc_edit(tensor_name: str, **changes) -> Callable:
    def edit(request) -> None:
        tensor = next(t for t in request.inputs if t.name == tensor_name)
        for key, value in changes.items():
            if key == "shape":
                del tensor.shape[:]
                tensor.shape.extend(value)
            else:
                setattr(tensor, key, value)

    return edit


def grpc_raw(name: str, data: bytes) -> Callable:
    def edit(request) -> None:
        index = list(V2_INPUTS).index(name)
        request.raw_input_contents[index] = data

    return edit


LONG_TIMESTAMP = "2026-11-26T14:02:00." + "1" * 5000 + "+00:00"
CE_TIME = "2026-11-26T14:02:00Z"
CE_HEADERS = {
    "ce-specversion": "1.0",
    "ce-id": "txn-1",
    "ce-source": "payments",
    "ce-type": "org.example.fraud.score",
}


# ----------------------------------------------------------------------- the tables

# name -> (body, headers, status, text the error must contain)
BINARY = {
    "length not a number": (*binary_request(length="abc"), 400, "must be an integer"),
    "length past the body": (*binary_request(length="99999999"), 400, "is not within"),
    "length zero": (*binary_request(length="0"), 400, "is not within"),
    "json part not json": (
        *binary_request(json_part=b"{not json", length="9"), 400, "not valid JSON"),
    "json part an array": (*binary_request(json_part=b"[1, 2]", length="6"), 400, "an object"),
    "no inputs": (*binary_request(json_part=b'{"id": "x"}', length="11"), 400, "non-empty list"),
    "inputs not a list": (
        *binary_request(json_part=b'{"inputs": 5}', length="13"), 400, "non-empty list"),
    "ten inputs": (
        *binary_request(edit=lambda h, r: h["inputs"].extend([dict(h["inputs"][0])] * 2)),
        400,
        "10 tensors; expected the 8",
    ),
    "size is a string": (
        *binary_request(edit=edit_input("amount", parameters={"binary_data_size": "8"})),
        400,
        "must be a byte count",
    ),
    "fp64 size not a multiple of 8": (
        *binary_request(edit=edit_raw("amount", b"\x00" * 7)), 400, "needs 8 bytes"),
    "shape does not match data": (
        *binary_request(edit=edit_input("amount", shape=[3])), 400, "needs 24 bytes"),
    "truncated bytes length prefix": (
        *binary_request(edit=edit_raw("timestamp", b"\x05\x00")),
        400,
        "no complete length prefix",
    ),
    "bytes element past its size": (
        *binary_request(edit=edit_raw("timestamp", b"\xff\x00\x00\x00abc")),
        400,
        "runs past its binary data",
    ),
    "trailing garbage": (*binary_request(trailer=b"\x00" * 5), 400, "the body carries"),
    "size past the body": (
        *binary_request(edit=edit_input("customer_age", parameters={"binary_data_size": 10**9})),
        400,
        "runs past the end of the body",
    ),
    "wrong datatype": (
        *binary_request(edit=edit_input("amount", datatype="FP32")), 400, "got 'FP32'"),
    "datatype with a newline": (
        *binary_request(edit=edit_input("amount", datatype="FP64\nERROR forged")),
        400,
        "got 'FP64\\nERROR forged'",
    ),
    "unknown tensor": (
        *binary_request(edit=edit_input("amount", name="x" * 5000)), 400, "unknown tensor"),
    "too many rows": (
        *binary_request(edit=edit_input("amount", shape=[MAX_ROWS + 1])), 400, "MAX_BATCH_ROWS"),
    "bad value": (
        *binary_request([{**GOOD, "customer_age": 7}]), 400, "input 'customer_age'[0]"),
    "bytes not utf-8": (
        *binary_request(edit=edit_raw("merchant_category", b"\x02\x00\x00\x00\xff\xfe")),
        400,
        "UTF-8",
    ),
}  # fmt: skip

# name -> (request, status code, text the details must contain)
GRPC = {
    "unknown model": (grpc_request(model="nope"), grpc.StatusCode.NOT_FOUND, "nope"),
    "shape of two dimensions": (
        grpc_request(edit=grpc_edit("amount", shape=[1, 1])),
        grpc.StatusCode.INVALID_ARGUMENT,
        "shape must be [n]",
    ),
    "too many rows": (
        grpc_request(edit=grpc_edit("amount", shape=[MAX_ROWS + 1])),
        grpc.StatusCode.INVALID_ARGUMENT,
        "MAX_BATCH_ROWS",
    ),
    "truncated bytes raw contents": (
        grpc_request(raw=True, edit=grpc_raw("timestamp", b"\x10\x00\x00\x00ab")),
        grpc.StatusCode.INVALID_ARGUMENT,
        "",
    ),
    "fp64 raw contents of 7 bytes": (
        grpc_request(raw=True, edit=grpc_raw("amount", b"\x00" * 7)),
        grpc.StatusCode.INVALID_ARGUMENT,
        "needs 8 bytes",
    ),
    "raw contents count mismatch": (
        grpc_request(raw=True, edit=lambda r: r.raw_input_contents.pop()),
        grpc.StatusCode.INVALID_ARGUMENT,
        "raw input contents",
    ),
    "unknown tensor": (
        grpc_request(edit=grpc_edit("amount", name="mcc\nforged")),
        grpc.StatusCode.INVALID_ARGUMENT,
        "unknown tensor",
    ),
    "duplicate tensor": (
        grpc_request(edit=grpc_edit("amount", name="customer_age")),
        grpc.StatusCode.INVALID_ARGUMENT,
        "duplicate",
    ),
    "wrong datatype": (
        grpc_request(edit=grpc_edit("customer_age", datatype="FP64")),
        grpc.StatusCode.INVALID_ARGUMENT,
        "datatype must be INT64",
    ),
    "integer past its bound": (
        grpc_request([{**GOOD, "transactions_last_24h": 2**62}]),
        grpc.StatusCode.INVALID_ARGUMENT,
        "less than or equal to 10000",
    ),
    "control characters": (
        grpc_request([{**GOOD, "merchant_category": "gro\x00cery"}]),
        grpc.StatusCode.INVALID_ARGUMENT,
        "control characters",
    ),
    "no inputs": (
        pb.ModelInferRequest(model_name=MODEL),
        grpc.StatusCode.INVALID_ARGUMENT,
        "missing tensor",
    ),
    "ten inputs": (
        grpc_request(edit=lambda r: r.inputs.extend([r.inputs[0], r.inputs[0]])),
        grpc.StatusCode.INVALID_ARGUMENT,
        "expected the 8",
    ),
}

# name -> (body, headers, status, text); posted to the V1 predict endpoint
CLOUDEVENTS = {
    "binary mode, empty body": (b"", {**CE_HEADERS, "content-type": "application/json"}, 400, ""),
    "binary mode, not json": (
        b"{oops", {**CE_HEADERS, "content-type": "application/json"}, 400, ""),
    "binary mode, bad transaction": (
        orjson.dumps({"instances": [{**GOOD, "amount": -1}]}),
        {**CE_HEADERS, "content-type": "application/json"},
        400,
        "instances[0].amount",
    ),
    "binary mode, no instances": (
        b'{"rows": []}', {**CE_HEADERS, "content-type": "application/json"}, 400, "instances"),
    "structured, not json": (
        b"{oops", {"content-type": "application/cloudevents+json"}, 400, ""),
    "structured, no data": (
        orjson.dumps({**{k[3:]: v for k, v in CE_HEADERS.items()}, "time": CE_TIME}),
        {"content-type": "application/cloudevents+json"},
        400,
        "",
    ),
    "structured, bad transaction": (
        orjson.dumps({
            **{k[3:]: v for k, v in CE_HEADERS.items()},
            "time": CE_TIME,
            "datacontenttype": "application/json",
            "data": {"instances": [{**GOOD, "customer_age": 3}]},
        }),
        {"content-type": "application/cloudevents+json"},
        400,
        "customer_age",
    ),
    "unknown specversion": (
        orjson.dumps({"instances": [GOOD]}),
        {**CE_HEADERS, "ce-specversion": "9.9", "content-type": "application/json"},
        400,
        "",
    ),
}  # fmt: skip

# Extreme JSON: name -> (path suffix, body, status, text)
EXTREME_JSON = {
    "v1 row with 200,000 unknown keys": (
        "v1",
        orjson.dumps({"instances": [{**GOOD, **{f"k{i}": 0 for i in range(200_000)}}]}),
        400,
        "Extra inputs are not permitted",
    ),
    "v1 unknown top-level key of 1 MB with newlines": (
        "v1",
        orjson.dumps({"instances": [GOOD], "a\nb" * 300_000: 1}),
        400,
        "unknown top-level key",
    ),
    "v1 amount of 400 digits": (
        "v1",
        orjson.dumps({"instances": [GOOD]}).replace(b"42.0", b"1" + b"0" * 400),
        400,
        "number is infinity",
    ),
    "v2 int64 of 300 digits": (
        "v2",
        b'{"inputs": [{"name": "transactions_last_24h", "datatype": "INT64", "shape": [1], '
        + b'"data": [1' + b"0" * 300 + b"]}]}",
        400,
        "",
    ),
    "v2 20,000 unknown tensors": (
        "v2",
        orjson.dumps({"inputs": [
            {"name": f"t{i}", "datatype": "FP64", "shape": [1], "data": [1.0]}
            for i in range(20_000)
        ]}),
        400,
        "more",
    ),
    "v2 timestamp with a 5,000-digit fraction": (
        "v2",
        orjson.dumps({"inputs": [
            {"name": n, "datatype": d, "shape": [1],
             "data": [LONG_TIMESTAMP if n == "timestamp" else GOOD[n]]}
            for n, d in V2_INPUTS.items()
        ]}),
        400,
        "at most 40 characters",
    ),
}  # fmt: skip


# ---------------------------------------------------------------------------- checks


def v1_ok(server: Server) -> None:
    response = requests.post(
        f"{server.url}/v1/models/{MODEL}:predict", json={"instances": [GOOD]}, timeout=30
    )
    assert response.status_code == 200, response.text


def assert_short_and_escaped(text: str) -> None:
    assert len(text) < 2_000, f"error of {len(text)} characters"
    assert "\n" not in text and "\x00" not in text


@pytest.mark.parametrize("case", list(BINARY))
def test_binary_extension_mistakes_get_400_naming_the_part(server, case):
    body, headers, status, message = BINARY[case]
    url = f"{server.url}/v2/models/{MODEL}/infer"
    response = requests.post(url, data=body, headers=headers, timeout=30)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert message in error, error
    assert_short_and_escaped(error)
    body, headers = binary_request([GOOD, {**GOOD, "amount": 912.5}])
    ok = requests.post(url, data=body, headers=headers, timeout=30)
    assert ok.status_code == 200, ok.text
    assert ok.json()["outputs"][0]["shape"] == [2]


@pytest.fixture(scope="module")
def stub(server) -> GRPCInferenceServiceStub:
    channel = grpc.insecure_channel(server.grpc_target)
    yield GRPCInferenceServiceStub(channel)
    channel.close()


@pytest.mark.parametrize("case", list(GRPC))
def test_grpc_mistakes_get_their_status_code_and_a_reason(stub, case):
    request, code, message = GRPC[case]
    with pytest.raises(grpc.RpcError) as error:
        stub.ModelInfer(request, timeout=30)
    assert error.value.code() == code, error.value.details()
    assert message in error.value.details()
    assert_short_and_escaped(error.value.details())
    for valid in (grpc_request([GOOD, GOOD]), grpc_request([GOOD], raw=True)):
        response = stub.ModelInfer(valid, timeout=30)
        assert [o.name for o in response.outputs] == [
            "fraud_probability",
            "is_fraud",
            "transaction_id",
        ]


@pytest.mark.parametrize("case", list(CLOUDEVENTS))
def test_cloudevent_mistakes_get_400(server, case):
    body, headers, status, message = CLOUDEVENTS[case]
    url = f"{server.url}/v1/models/{MODEL}:predict"
    response = requests.post(url, data=body, headers=headers, timeout=30)
    assert response.status_code == status, response.text
    assert message in response.text
    assert_short_and_escaped(response.text)
    ok = requests.post(
        url,
        data=orjson.dumps({"instances": [GOOD]}),
        headers={**CE_HEADERS, "content-type": "application/json"},
        timeout=30,
    )
    assert ok.status_code == 200, ok.text
    assert ok.headers.get("ce-type"), ok.headers  # answered as a CloudEvent
    assert json.loads(ok.content)["predictions"][0]["is_fraud"] is False


@pytest.mark.parametrize("case", list(EXTREME_JSON))
def test_extreme_json_gets_a_short_400(server, case):
    door, body, status, message = EXTREME_JSON[case]
    url = (
        f"{server.url}/v1/models/{MODEL}:predict"
        if door == "v1"
        else f"{server.url}/v2/models/{MODEL}/infer"
    )
    response = requests.post(
        url, data=body, headers={"content-type": "application/json"}, timeout=60
    )
    assert response.status_code == status, response.text[:500]
    error = response.json()["error"]
    assert message in error
    assert_short_and_escaped(error)
    v1_ok(server)


def error_counts(server: Server) -> dict[tuple[str, str], float]:
    """fraud_request_errors_total by (protocol, status), from /metrics."""
    counts = {}
    for line in requests.get(f"{server.url}/metrics", timeout=10).text.splitlines():
        if line.startswith("fraud_request_errors_total{"):
            labels, value = line.rsplit(" ", 1)
            parsed = dict(
                part.split("=", 1) for part in labels[labels.index("{") + 1 : -1].split(",")
            )
            key = (parsed["protocol"].strip('"'), parsed["status"].strip('"'))
            counts[key] = float(value)
    return counts


def test_grpc_requests_over_max_request_bytes_are_refused_and_counted(server, stub):
    before = error_counts(server).get(("grpc", "RESOURCE_EXHAUSTED"), 0)
    oversized = grpc_request([{**GOOD, "merchant_category": "x" * (9 * 1024 * 1024)}])
    with pytest.raises(grpc.RpcError) as error:
        stub.ModelInfer(oversized, timeout=30)
    assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "MAX_REQUEST_BYTES" in error.value.details()
    assert error_counts(server)[("grpc", "RESOURCE_EXHAUSTED")] == before + 1
    assert stub.ModelInfer(grpc_request([GOOD]), timeout=30).outputs


def test_every_error_is_counted_by_protocol_and_status(server, stub):
    before = error_counts(server)
    body, headers, *_ = BINARY["length not a number"]
    for _ in range(3):
        requests.post(f"{server.url}/v2/models/{MODEL}/infer", data=body, headers=headers)
    requests.post(f"{server.url}/v1/models/nope:predict", json={"instances": [GOOD]})
    for case in ("unknown model", "too many rows", "too many rows"):
        with pytest.raises(grpc.RpcError):
            stub.ModelInfer(GRPC[case][0], timeout=30)
    after = error_counts(server)

    def grew(key):
        return after.get(key, 0) - before.get(key, 0)

    assert grew(("http", "400")) == 3
    assert '"POST /v2/models' not in server.predictor.log()  # no access log by default
    text = requests.get(f"{server.url}/metrics", timeout=10).text
    assert 'fraud_request_duration_seconds_count{protocol="grpc"}' in text
    assert 'fraud_request_duration_seconds_count{protocol="http"}' in text
    assert "fraud_request_rows_created" in text  # one worker: metrics in memory
    assert grew(("http", "404")) == 1
    assert grew(("grpc", "NOT_FOUND")) == 1
    assert grew(("grpc", "INVALID_ARGUMENT")) == 2


def test_the_versioned_v2_route_applies_the_same_checks(server):
    metadata = requests.get(f"{server.url}/v2/models/{MODEL}", timeout=10).json()
    url = f"{server.url}/v2/models/{MODEL}/versions/{metadata['versions'][0]}/infer"
    body, headers, status, message = BINARY["truncated bytes length prefix"]
    response = requests.post(url, data=body, headers=headers, timeout=30)
    assert (response.status_code, message in response.json()["error"]) == (status, True)
    body, headers = binary_request([GOOD])
    assert requests.post(url, data=body, headers=headers, timeout=30).status_code == 200
