"""The predictor as a real process, fed by a real `mlflow server`, spoken to over HTTP."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
import warnings

import grpc
import mlflow
import numpy as np
import orjson
import pytest
import requests
from kserve import (
    InferenceGRPCClient,
    InferenceRESTClient,
    InferInput,
    InferRequest,
    RESTConfig,
)
from kserve.protocol.grpc.grpc_predict_v2_pb2_grpc import GRPCInferenceServiceStub
from sklearn.ensemble import HistGradientBoostingClassifier
from support import ORDINARY as GOOD
from support import SUSPICIOUS, free_port
from test_hostile_input import binary_request, grpc_request

from predictor import registry
from predictor.codec import V2_INPUTS, v2_request_body
from predictor.features import FEATURE_NAMES, build_features, feature_frame
from predictor.model import FraudModel
from predictor.offload import INLINE_MAX_BODY_BYTES, INLINE_MAX_ROWS
from predictor.schema import FIELD_ORDER, validate_rows
from predictor.settings import Settings

MODEL = "fraud-detector"


def v1_url(predictor, model: str = MODEL) -> str:
    return f"{predictor.url}/v1/models/{model}:predict"


def v2_url(predictor, model: str = MODEL) -> str:
    return f"{predictor.url}/v2/models/{model}/infer"


def v2_body(transactions: list[dict], request_id: str | None = None) -> dict:
    return v2_request_body(transactions, request_id)


def registered_models_own_probabilities(mlflow_url: str, transactions: list[dict]) -> np.ndarray:
    """The registered model through MLflow's own loader (pyfunc predict_fn=predict_proba)."""
    registry.connect(mlflow_url)
    model = mlflow.pyfunc.load_model(f"models:/{MODEL}@champion")
    frame = feature_frame(build_features(validate_rows(transactions)))
    with warnings.catch_warnings():
        # Fitted on the bare feature matrix; MLflow hands it the signature's named frame.
        warnings.filterwarnings("ignore", message="X has feature names")
        return np.asarray(model.predict(frame))[:, 1]


def test_load_pins_the_alias_to_a_version_in_memory(mlflow_server, champion, example_transactions):
    model = FraudModel(MODEL, Settings(mlflow_tracking_uri=mlflow_server.url))
    assert model.load() is True and model.ready
    assert model.serving.version == champion.version
    assert model.serving.threshold == pytest.approx(champion.threshold, abs=1e-6)
    assert model.serving.loaded.ref.alias == "champion"
    batch = model._decode({"instances": example_transactions[:3]})
    assert batch.features.shape == (3, len(FEATURE_NAMES))


def test_v1_objects_get_probability_decision_and_version(served, champion, example_transactions):
    response = requests.post(v1_url(served), json={"instances": example_transactions[:3]})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model_version"] == champion.version
    assert response.headers["x-model-version"] == champion.version
    assert len(body["predictions"]) == 3
    for prediction in body["predictions"]:
        assert set(prediction) == {"fraud_probability", "is_fraud", "transaction_id"}
        assert 0.0 <= prediction["fraud_probability"] <= 1.0
        assert isinstance(prediction["is_fraud"], bool)


def test_v1_lists_in_field_order_answer_like_objects(served, example_transactions):
    objects = example_transactions[:20]
    rows = [[txn[name] for name in FIELD_ORDER] for txn in objects]
    by_object = requests.post(v1_url(served), json={"instances": objects}).json()
    by_list = requests.post(v1_url(served), json={"instances": rows}).json()
    # Within an ulp, not bit for bit: the numba engine takes over from treelite (which agree
    # to 1e-9 by rule, ~4e-16 here) in the first second of serving.
    assert [p["is_fraud"] for p in by_list["predictions"]] == [
        p["is_fraud"] for p in by_object["predictions"]
    ]
    assert [p["fraud_probability"] for p in by_list["predictions"]] == pytest.approx(
        [p["fraud_probability"] for p in by_object["predictions"]], abs=1e-12
    )


def test_v2_infer_returns_typed_outputs_version_and_echoes_id(
    served, champion, example_transactions
):
    transactions = example_transactions[:5]
    response = requests.post(v2_url(served), json=v2_body(transactions, "req-42"))
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["id"] == "req-42"
    assert body["model_name"] == MODEL
    assert body["model_version"] == champion.version
    outputs = {output["name"]: output for output in body["outputs"]}
    assert outputs["fraud_probability"]["datatype"] == "FP64"
    assert outputs["fraud_probability"]["shape"] == [5]
    assert outputs["is_fraud"]["datatype"] == "BOOL"
    assert outputs["is_fraud"]["shape"] == [5]
    v1 = requests.post(v1_url(served), json={"instances": transactions}).json()
    assert outputs["fraud_probability"]["data"] == pytest.approx(
        [p["fraud_probability"] for p in v1["predictions"]], abs=1e-12
    )


def test_v2_metadata_lists_exactly_the_inputs_and_outputs(served, champion):
    body = requests.get(f"{served.url}/v2/models/{MODEL}").json()
    assert body["name"] == MODEL
    assert body["versions"] == [champion.version]
    assert body["inputs"] == [
        {"name": name, "datatype": dtype, "shape": [-1]} for name, dtype in V2_INPUTS.items()
    ] + [{"name": "transaction_id", "datatype": "BYTES", "shape": [-1]}]
    assert body["outputs"] == [
        {"name": "fraud_probability", "datatype": "FP64", "shape": [-1]},
        {"name": "is_fraud", "datatype": "BOOL", "shape": [-1]},
        {"name": "transaction_id", "datatype": "BYTES", "shape": [-1]},
    ]


def test_health_endpoints_report_live_and_ready(served):
    assert requests.get(f"{served.url}/v2/health/live").json() == {"live": True}
    assert requests.get(f"{served.url}/v2/health/ready").json() == {"ready": True}
    ready = requests.get(f"{served.url}/v2/models/{MODEL}/ready")
    assert ready.json() == {"name": MODEL, "ready": True}
    assert requests.get(f"{served.url}/v1/models/{MODEL}").json() == {"name": MODEL, "ready": True}
    assert requests.get(f"{served.url}/v2/models/other/ready").status_code == 404


def test_decision_uses_the_versions_threshold_tag(served, champion, example_transactions):
    body = requests.post(v1_url(served), json={"instances": example_transactions}).json()
    decisions = [p["is_fraud"] for p in body["predictions"]]
    expected = [p["fraud_probability"] >= champion.threshold for p in body["predictions"]]
    assert decisions == expected
    assert any(decisions) and not all(decisions)


def test_decision_threshold_setting_overrides_the_tag(
    start_predictor, mlflow_server, champion, example_transactions
):
    override = 0.05
    assert abs(override - champion.threshold) > 0.05
    predictor = start_predictor(
        env={"MLFLOW_TRACKING_URI": mlflow_server.url, "DECISION_THRESHOLD": str(override)}
    )
    body = requests.post(v1_url(predictor), json={"instances": example_transactions}).json()
    assert [p["is_fraud"] for p in body["predictions"]] == [
        p["fraud_probability"] >= override for p in body["predictions"]
    ]
    assert "threshold 0.0500 from DECISION_THRESHOLD" in predictor.log()


def test_served_probabilities_equal_the_registered_models_own(
    served, mlflow_server, example_transactions
):
    body = requests.post(v1_url(served), json={"instances": example_transactions}).json()
    served_p = np.array([p["fraud_probability"] for p in body["predictions"]])
    own = registered_models_own_probabilities(mlflow_server.url, example_transactions)
    np.testing.assert_allclose(served_p, own, rtol=0, atol=1e-9)
    v2 = requests.post(v2_url(served), json=v2_body(example_transactions)).json()
    served_v2 = {o["name"]: o["data"] for o in v2["outputs"]}["fraud_probability"]
    np.testing.assert_allclose(served_v2, own, rtol=0, atol=1e-9)


@pytest.mark.parametrize("binary", [False, True], ids=["json-tensors", "binary-tensors"])
def test_kserve_rest_client_speaks_v1_and_v2(served, champion, example_transactions, binary):
    transactions = example_transactions[:4]

    async def call():
        v1 = InferenceRESTClient(RESTConfig(protocol="v1", retries=0, timeout=30))
        v2 = InferenceRESTClient(RESTConfig(protocol="v2", retries=0, timeout=30))
        try:
            headers: dict[str, str] = {}
            v1_result = await v1.infer(
                served.url, {"instances": transactions}, model_name=MODEL, response_headers=headers
            )
            inputs = []
            for name, dtype in V2_INPUTS.items():
                tensor = InferInput(name, [len(transactions)], dtype)
                tensor.set_data_from_numpy(
                    np.array(
                        [t[name] for t in transactions], dtype=object if dtype == "BYTES" else None
                    ),
                    binary_data=binary,
                )
                inputs.append(tensor)
            request = InferRequest(model_name=MODEL, infer_inputs=inputs, request_id="kserve-1")
            v2_headers: dict[str, str] = {}
            v2_result = await v2.infer(
                served.url, request, model_name=MODEL, response_headers=v2_headers
            )
            ready = await v2.is_model_ready(served.url, MODEL)
            return v1_result, headers, v2_result, v2_headers, ready
        finally:
            await v1.close()
            await v2.close()

    v1_result, headers, v2_result, v2_headers, ready = asyncio.run(call())
    assert ready is True
    assert headers["x-model-version"] == champion.version
    assert v2_headers["x-model-version"] == champion.version  # its parser drops model_version
    assert v2_result.id == "kserve-1"
    probabilities = {o.name: o for o in v2_result.outputs}["fraud_probability"].as_numpy()
    np.testing.assert_allclose(
        probabilities, [p["fraud_probability"] for p in v1_result["predictions"]], atol=0
    )


def test_v2_over_grpc_answers_like_v1(start_predictor, mlflow_server, example_transactions):
    grpc_port = free_port()
    predictor = start_predictor(
        env={"MLFLOW_TRACKING_URI": mlflow_server.url},
        args=["--enable_grpc", "true", "--grpc_port", str(grpc_port)],
    )
    transactions = example_transactions[:6]

    async def call(binary: bool):
        client = InferenceGRPCClient(f"127.0.0.1:{grpc_port}", timeout=30)
        try:
            inputs = []
            for name, dtype in V2_INPUTS.items():
                tensor = InferInput(name, [len(transactions)], dtype)
                values = [t[name] for t in transactions]
                array = np.array(values, dtype=object if dtype == "BYTES" else None)
                tensor.set_data_from_numpy(array, binary_data=binary)
                inputs.append(tensor)
            request = InferRequest(model_name=MODEL, infer_inputs=inputs, request_id="grpc-1")
            return await client.infer(request)
        finally:
            await client.close()

    v1 = requests.post(v1_url(predictor), json={"instances": transactions}).json()
    expected = [p["fraud_probability"] for p in v1["predictions"]]
    for binary in (True, False):
        result = asyncio.run(call(binary))
        assert result.id == "grpc-1"
        outputs = {o.name: o.as_numpy() for o in result.outputs}
        np.testing.assert_allclose(outputs["fraud_probability"], expected, rtol=0, atol=1e-12)


def test_large_requests_are_decoded_and_scored_off_the_event_loop(monkeypatch):
    """Up to INLINE_MAX_ROWS rows and INLINE_MAX_BODY_BYTES bytes are validated and scored on
    the event loop (cheaper than a thread hop); anything larger in the thread pool, so a big
    batch never holds up health checks (test_hostile_input.py polls them over HTTP)."""
    import predictor.model as model_module

    threads: list[str] = []
    features_of, probabilities_of = model_module.build_features, model_module.checked_probabilities

    def recording(function):
        def record(*args):
            threads.append(threading.current_thread().name)
            return function(*args)

        return record

    monkeypatch.setattr(model_module, "build_features", recording(features_of))
    monkeypatch.setattr(model_module, "checked_probabilities", recording(probabilities_of))
    rng = np.random.default_rng(0)
    features = rng.random((300, len(FEATURE_NAMES)))
    estimator = HistGradientBoostingClassifier(max_iter=5).fit(features, features[:, 0] > 0.5)
    model = FraudModel("fraud", Settings(decision_threshold=0.5))
    ref = registry.ModelRef("models:/x@live", "models:/x/2", "x", "2", "live", "run", "0.5")
    model.serve(registry.LoadedModel(ref=ref, estimator=estimator, input_example=None))

    def where(rows: int, headers: dict[str, str] | None = None) -> list[str]:
        threads.clear()

        async def handle() -> None:
            batch = await model.preprocess({"instances": [GOOD] * rows}, headers)
            await model.predict(batch)

        loop_thread = threading.current_thread().name
        asyncio.run(handle())
        return ["loop" if name == loop_thread else "pool" for name in threads]

    # [features built, probabilities computed]
    assert where(1) == ["loop", "loop"]
    assert where(INLINE_MAX_ROWS) == ["loop", "loop"]
    assert where(INLINE_MAX_ROWS + 1) == ["pool", "pool"]
    big_body = {"content-length": str(INLINE_MAX_BODY_BYTES + 1)}
    assert where(1, big_body) == ["pool", "loop"]  # decoded in the pool, one row scored inline


def test_bad_start_up_setting_stops_with_one_line_naming_the_variable(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "predictor", "--http_port", "1", "--enable_grpc", "false"],
        cwd=tmp_path,
        env={"PATH": "/usr/bin:/bin", "DECISION_THRESHOLD": "1.5", "HOME": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "DECISION_THRESHOLD" in lines[0] and "less than or equal to 1" in lines[0]


def test_embedded_default_bootstraps_demo_model_from_empty_directory(
    start_predictor, tmp_path, example_transactions
):
    workdir = tmp_path / "fresh"
    predictor = start_predictor(workdir=workdir, timeout=240)
    response = requests.post(v1_url(predictor), json={"instances": example_transactions[:2]})
    assert response.status_code == 200, response.text
    assert response.json()["model_version"] == "1"
    assert (workdir / "mlflow-local" / "mlflow.db").exists()
    log = predictor.log()
    assert "training and registering the demo model" in log
    # One line per event: what MLflow and KServe announce on top of the server's own lines.
    for chatter in (
        "Creating initial MLflow database tables",
        "Successfully registered model",
        "Created version",
        "OpenAI endpoints not registered",
        "Setting max asyncio worker threads",
    ):
        assert chatter not in log, log
    predictor.stop()

    again = start_predictor(workdir=workdir)  # the store now has the model: no training
    response = requests.post(v1_url(again), json={"instances": example_transactions[:2]})
    assert response.status_code == 200, response.text
    assert response.json()["model_version"] == "1"
    assert "training and registering" not in again.log()
    assert sorted(p.name for p in workdir.iterdir() if not p.name.endswith(".log")) == [
        "mlflow-local"
    ]  # nothing written beside the documented store


# ---------------------------------------------------------------- bad input, V1 and V2


def with_(**changes) -> dict:
    return {**GOOD, **changes}


def without(field: str) -> dict:
    return {k: v for k, v in GOOD.items() if k != field}


def v2_with(name: str, **changes) -> dict:
    body = v2_body([GOOD, GOOD])
    for tensor in body["inputs"]:
        if tensor["name"] == name:
            tensor.update(changes)
    return body


def v2_without(name: str) -> dict:
    body = v2_body([GOOD])
    body["inputs"] = [t for t in body["inputs"] if t["name"] != name]
    return body


def v2_extra() -> dict:
    body = v2_body([GOOD])
    body["inputs"].append({"name": "mcc", "datatype": "INT64", "shape": [1], "data": [5411]})
    return body


def v2_duplicate() -> dict:
    body = v2_body([GOOD])
    body["inputs"].append(dict(body["inputs"][0]))
    return body


V1 = "v1"
V2 = "v2"
# (protocol, body, expected status, text the error must contain); bytes go out as
# application/json, str as a form (curl -d's default), anything else as JSON.
BAD_INPUTS = {
    "v1 missing field": (V1, {"instances": [without("amount")]}, 400, "instances[0].amount: Field"),
    "v1 unknown field": (V1, {"instances": [with_(mcc=5411)]}, 400, "instances[0].mcc: Extra"),
    "v1 wrong json type": (V1, {"instances": [with_(amount=[1])]}, 400, "amount: Input should be"),
    "v1 string number": (V1, {"instances": [with_(amount="42.0")]}, 400, "amount: Input should"),
    "v1 bool as number": (V1, {"instances": [with_(customer_age=True)]}, 400, "customer_age"),
    "v1 negative amount": (V1, {"instances": [with_(amount=-3)]}, 400, "greater than 0"),
    "v1 bad timestamp": (V1, {"instances": [with_(timestamp="26/11/2026")]}, 400, "timestamp"),
    "v1 timestamp no offset": (
        V1,
        {"instances": [with_(timestamp="2026-11-26T14:02:00")]},
        400,
        "timestamp: Input should have timezone info",
    ),
    "v1 timestamp no hour": (V1, {"instances": [with_(timestamp="2026-11-26")]}, 400, "not a date"),
    "v1 age out of range": (V1, {"instances": [with_(customer_age=7)]}, 400, "customer_age"),
    "v1 null field": (V1, {"instances": [with_(card_present=None)]}, 400, "card_present"),
    "v1 second row bad": (
        V1,
        {"instances": [GOOD, with_(distance_from_home_km=-1)]},
        400,
        "instances[1].distance_from_home_km",
    ),
    "v1 empty batch": (V1, {"instances": []}, 400, "at least one transaction"),
    "v1 too many rows": (V1, {"instances": [GOOD] * 10_001}, 400, "MAX_BATCH_ROWS"),
    "v1 null body": (V1, b"null", 400, "must be a JSON object"),
    "v1 instances null": (V1, {"instances": None}, 400, "instances: must be a list"),
    "v1 no instances": (V1, {"rows": [GOOD]}, 400, "unknown top-level key"),
    "v1 list row too short": (V1, {"instances": [[42.0, "x"]]}, 400, "needs 8 values"),
    "v1 row is a number": (V1, {"instances": [5]}, 400, "instances[0]: must be an object"),
    "v1 non-json body": (V1, b"amount=42", 400, "Unrecognized request format"),
    "v1 form-encoded body": (V1, "amount=42", 400, "request body is not valid JSON"),
    "v1 unknown model": (V1, {"instances": [GOOD]}, 404, "does not exist"),
    "v1 body over limit": (V1, b"[" + b" " * (9 * 1024 * 1024) + b"]", 413, "MAX_REQUEST_BYTES"),
    "v2 missing tensor": (V2, v2_without("customer_age"), 400, "missing tensor(s)"),
    "v2 unknown tensor": (V2, v2_extra(), 400, "unknown tensor(s) ['mcc']"),
    "v2 duplicate tensor": (V2, v2_duplicate(), 400, "duplicate tensor(s) ['amount']"),
    "v2 unequal lengths": (
        V2,
        v2_with("amount", shape=[1], data=[42.0]),
        400,
        "same length",
    ),
    "v2 wrong datatype": (
        V2,
        v2_with("amount", datatype="INT64"),
        400,
        "must be FP64, got 'INT64'",
    ),
    "v2 wrong shape": (V2, v2_with("amount", shape=[2, 1]), 400, "shape must be [n]"),
    "v2 shape data mismatch": (V2, v2_with("amount", data=[42.0]), 400, "but 1 data elements"),
    "v2 bad value": (
        V2,
        v2_with("customer_age", data=[41, 7]),
        400,
        "input 'customer_age'[1]: Input should be greater than or equal to 18",
    ),
    "v2 null in tensor": (V2, v2_with("amount", data=[42.0, None]), 400, "input 'amount'[1]"),
    "v2 nested data": (V2, v2_with("amount", data=[42.0, [43.0]]), 400, "data must be flat"),
    "v2 int as bool": (V2, v2_with("card_present", data=[1, 0]), 400, "card_present"),
    "v2 empty tensors": (
        V2,
        {"inputs": [{**t, "shape": [0], "data": []} for t in v2_body([GOOD])["inputs"]]},
        400,
        "at least one transaction",
    ),
    "v2 inputs not a list": (V2, {"inputs": 5}, 400, "inputs"),
    "v2 too many rows": (
        V2,
        {"inputs": [{**t, "shape": [10_001]} for t in v2_body([GOOD])["inputs"]]},
        400,
        "10001 rows exceed the limit of 10000 (MAX_BATCH_ROWS)",
    ),
    "v2 tensor without datatype": (
        V2,
        {"inputs": [{"name": "amount", "shape": [1], "data": [1.0]}]},
        400,
        "datatype",
    ),
    "v2 non-json body": (V2, b"{not json", 400, "not valid JSON"),
    "v2 unknown model": (V2, v2_body([GOOD]), 404, "does not exist"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_gets_4xx_naming_the_problem(served, case):
    protocol, body, status, message = BAD_INPUTS[case]
    model = "no-such-model" if "unknown model" in case else MODEL
    url = v1_url(served, model) if protocol == V1 else v2_url(served, model)
    if isinstance(body, bytes):
        headers = {"content-type": "application/json"}
        response = requests.post(url, data=body, headers=headers, timeout=30)
    elif isinstance(body, str):
        headers = {"content-type": "application/x-www-form-urlencoded"}
        response = requests.post(url, data=body, headers=headers, timeout=30)
    else:
        response = requests.post(url, json=body, timeout=30)
    assert response.status_code == status, response.text
    assert message in response.json()["error"], response.text
    # ... and the server keeps serving.
    ok = requests.post(v1_url(served), json={"instances": [GOOD]}, timeout=30)
    assert ok.status_code == 200


def test_the_server_process_imports_no_training_code():
    """Serving and training are separate installs: the serving modules (and the entry point)
    must never import training, plots or the full mlflow server packages."""
    probe = (
        "import sys, predictor.__main__, predictor.server, predictor.lifecycle;"
        "bad = [m for m in ('predictor.training', 'matplotlib', 'sqlalchemy', 'flask', 'shap')"
        " if m in sys.modules]; print(bad)"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_the_predictor_protocol_flag_leaves_every_door_answering(
    start_predictor, mlflow_server, champion
):
    """KServe's Model.validate assumed a dict or InferRequest and answered 500 with
    `--predictor_protocol v2`; the batch is validated in preprocess instead."""
    predictor = start_predictor(
        env={"MLFLOW_TRACKING_URI": mlflow_server.url}, args=["--predictor_protocol", "v2"]
    )
    assert requests.post(v1_url(predictor), json={"instances": [GOOD]}, timeout=30).ok
    body = v2_request_body([GOOD])
    assert requests.post(v2_url(predictor), json=body, timeout=30).ok


# ------------------------------------------------------ Open Inference Protocol conformance


def names(outputs) -> list[str]:
    return [output["name"] if isinstance(output, dict) else output.name for output in outputs]


def with_outputs(*requested: dict) -> dict:
    return {**v2_body([GOOD, SUSPICIOUS], "outputs"), "outputs": list(requested)}


def binary_answer(response: requests.Response) -> tuple[dict, bytes]:
    length = int(response.headers["inference-header-content-length"])
    return orjson.loads(response.content[:length]), response.content[length:]


def test_requested_outputs_come_alone_and_in_order_on_every_door(
    start_predictor, mlflow_server, champion
):
    grpc_port = free_port()
    predictor = start_predictor(
        env={"MLFLOW_TRACKING_URI": mlflow_server.url},
        args=["--enable_grpc", "true", "--grpc_port", str(grpc_port)],
    )
    every = requests.post(v2_url(predictor), json=v2_body([GOOD, SUSPICIOUS]), timeout=30).json()
    assert names(every["outputs"]) == ["fraud_probability", "is_fraud", "transaction_id"]
    scores = every["outputs"][0]["data"]

    # REST JSON: only the outputs asked for, in the order asked.
    body = with_outputs({"name": "is_fraud"}, {"name": "fraud_probability"})
    answer = requests.post(v2_url(predictor), json=body, timeout=30).json()
    assert names(answer["outputs"]) == ["is_fraud", "fraud_probability"]
    assert answer["outputs"][1]["data"] == pytest.approx(scores, abs=1e-12)

    # Binary extension: each output's binary_data is honoured ...
    content, headers = binary_request(
        [GOOD, SUSPICIOUS],
        edit=lambda header, raw: header.update(
            outputs=[
                {"name": "transaction_id", "parameters": {"binary_data": False}},
                {"name": "fraud_probability", "parameters": {"binary_data": True}},
            ]
        ),
    )
    head, raw = binary_answer(requests.post(v2_url(predictor), data=content, headers=headers))
    assert names(head["outputs"]) == ["transaction_id", "fraud_probability"]
    assert len(head["outputs"][0]["data"]) == 2 and "data" not in head["outputs"][1]
    assert head["outputs"][1]["parameters"] == {"binary_data_size": 16}
    np.testing.assert_allclose(np.frombuffer(raw, "<f8"), scores, atol=1e-12)
    # ... and where an output does not say, the request's binary_data_output does.
    body = {
        **with_outputs({"name": "fraud_probability"}, {"name": "is_fraud"}),
        "parameters": {"binary_data_output": True},
    }
    body["outputs"][1]["parameters"] = {"binary_data": False}
    head, raw = binary_answer(requests.post(v2_url(predictor), json=body, timeout=30))
    assert "data" not in head["outputs"][0] and head["outputs"][1]["data"] == [False, True]
    assert len(raw) == 16

    # gRPC: the same selection and order.
    with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
        stub = GRPCInferenceServiceStub(channel)
        request = grpc_request([GOOD, SUSPICIOUS])
        request.outputs.add(name="transaction_id")
        request.outputs.add(name="is_fraud")
        response = stub.ModelInfer(request, timeout=30)
        assert names(response.outputs) == ["transaction_id", "is_fraud"]
        assert list(response.outputs[1].contents.bool_contents) == [False, True]

        request = grpc_request([GOOD])
        request.outputs.add(name="fraud_score\nforged")
        with pytest.raises(grpc.RpcError) as refused:
            stub.ModelInfer(request, timeout=30)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "unknown output(s) ['fraud_score\\nforged']" in refused.value.details()

    # An unknown output name is the client's mistake, named.
    body = with_outputs({"name": "fraud_probability"}, {"name": "fraud_score"})
    response = requests.post(v2_url(predictor), json=body, timeout=30)
    assert response.status_code == 400
    assert "outputs: unknown output(s) ['fraud_score']" in response.json()["error"]
    content, headers = binary_request(
        edit=lambda header, raw: header.update(outputs=[{"name": "score"}])
    )
    response = requests.post(v2_url(predictor), data=content, headers=headers, timeout=30)
    assert response.status_code == 400 and "'score'" in response.json()["error"]


def test_versioned_metadata_and_readiness_answer_for_the_served_version_only(served, champion):
    base = f"{served.url}/v2/models/{MODEL}/versions"
    metadata = requests.get(f"{base}/{champion.version}", timeout=10)
    assert metadata.status_code == 200
    assert metadata.json() == requests.get(f"{served.url}/v2/models/{MODEL}", timeout=10).json()
    ready = requests.get(f"{base}/{champion.version}/ready", timeout=10)
    assert (ready.status_code, ready.json()) == (200, {"name": MODEL, "ready": True})
    for path in (f"{base}/999", f"{base}/999/ready"):
        response = requests.get(path, timeout=10)
        assert response.status_code == 404
        assert f"{MODEL} version '999'" in response.json()["error"]


@pytest.mark.parametrize(
    "path", ["/v2/nope", "/v2/models/fraud-detector/nope", "/v2/models/fraud-detector/infer/x"]
)
def test_unknown_v2_routes_answer_in_the_oip_error_shape(served, path):
    response = requests.get(served.url + path, timeout=10)
    assert response.status_code == 404
    assert set(response.json()) == {"error"}


@pytest.mark.parametrize("verb", ["predict", "explain"])
@pytest.mark.parametrize("method", ["GET", "PUT", "DELETE"])
def test_a_v1_verb_takes_post_only_and_is_not_mistaken_for_a_model_name(served, verb, method):
    url = f"{served.url}/v1/models/{MODEL}:{verb}"
    response = requests.request(method, url, timeout=10)
    assert response.status_code == 405 and response.headers["allow"] == "POST"
    assert response.json() == {"error": f"{method} is not allowed on :{verb}: use POST"}
