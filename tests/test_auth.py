"""The token contract on every door, against a running predictor: REST (V1, V2 JSON, the
binary extension, the versioned route, CloudEvents, :explain, metadata) and gRPC, each
with no token, a wrong token, a token without the scope and the right one; the open probe
paths; rotation; and the model lifecycle, which no client can touch."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
import orjson
import pytest
import requests
from kserve.protocol.grpc import grpc_predict_v2_pb2 as pb
from kserve.protocol.grpc.grpc_predict_v2_pb2_grpc import GRPCInferenceServiceStub
from processes import free_port
from support import ORDINARY, Predictor, launch_predictor, stop
from test_hostile_input import CE_HEADERS, binary_request, grpc_request

from predictor import auth, codec

MODEL = "fraud-detector"
#: name -> scopes; each gets a fresh token per test session.
HOLDERS = {"payments": "predict", "analyst": "explain", "ops": "admin", "both": "predict,explain"}
WRONG = "not-a-token-anyone-was-given"


@dataclass
class Guarded:
    predictor: Predictor
    grpc_target: str
    tokens: dict[str, str]
    tokens_file: Path

    @property
    def url(self) -> str:
        return self.predictor.url


def write_tokens(path: Path, holders: dict[str, str]) -> dict[str, str]:
    """A token file granting `holders`; returns name -> token. Written as Kubernetes
    updates a mounted Secret: a new file swapped in by rename."""
    tokens = {name: auth.new_token() for name in holders}
    lines = ["# test tokens"] + [
        auth.token_line(tokens[name], scopes.split(","), name) for name, scopes in holders.items()
    ]
    fresh = path.with_suffix(".new")
    fresh.write_text("\n".join(lines) + "\n")
    os.replace(fresh, path)
    return tokens


@pytest.fixture(scope="module")
def guarded(mlflow_server, champion, tmp_path_factory) -> Guarded:
    workdir = tmp_path_factory.mktemp("guarded")
    tokens_file = workdir / "tokens"
    tokens = write_tokens(tokens_file, HOLDERS)
    grpc_port = free_port()
    predictor = launch_predictor(
        workdir,
        env={"MLFLOW_TRACKING_URI": mlflow_server.url, "AUTH_TOKENS_FILE": str(tokens_file)},
        args=["--enable_grpc", "true", "--grpc_port", str(grpc_port)],
    )
    yield Guarded(predictor, f"127.0.0.1:{grpc_port}", tokens, tokens_file)
    stop(predictor.process)


def bearer(token: str | None) -> dict[str, str]:
    return {} if token is None else {"authorization": f"Bearer {token}"}


V1_BODY = orjson.dumps({"instances": [ORDINARY]})
V2_BODY = orjson.dumps(codec.v2_request_body([ORDINARY], request_id="auth"))
JSON = {"content-type": "application/json"}


def rest_doors(served_version: str) -> dict[str, tuple[str, str, bytes, dict, str]]:
    """door -> (method, path, body, headers, scope it needs)."""
    binary, binary_headers = binary_request([ORDINARY])
    return {
        "v1 predict": ("POST", f"/v1/models/{MODEL}:predict", V1_BODY, JSON, "predict"),
        "v2 infer": ("POST", f"/v2/models/{MODEL}/infer", V2_BODY, JSON, "predict"),
        "v2 binary": ("POST", f"/v2/models/{MODEL}/infer", binary, binary_headers, "predict"),
        "v2 versioned": (
            "POST",
            f"/v2/models/{MODEL}/versions/{served_version}/infer",
            V2_BODY,
            JSON,
            "predict",
        ),
        "cloudevent": (
            "POST",
            f"/v1/models/{MODEL}:predict",
            V1_BODY,
            {**CE_HEADERS, "content-type": "application/json"},
            "predict",
        ),
        "v1 explain": ("POST", f"/v1/models/{MODEL}:explain", V1_BODY, JSON, "explain"),
        "v2 metadata": ("GET", f"/v2/models/{MODEL}", b"", {}, "any"),
        "server metadata": ("GET", "/v2", b"", {}, "any"),
        "model list": ("GET", "/v1/models", b"", {}, "any"),
    }


DOORS = list(rest_doors("1"))


def holder_without(scope: str) -> str:
    return "analyst" if scope in ("predict", "any") else "payments"


def holder_with(scope: str) -> str:
    return {"predict": "payments", "explain": "analyst", "any": "ops"}[scope]


def call(guarded: Guarded, door: str, token: str | None) -> requests.Response:
    version = requests.get(f"{guarded.url}/v2/models/{MODEL}/ready", timeout=10)
    assert version.status_code == 200
    method, path, body, headers, _ = rest_doors(served_version(guarded))[door]
    return requests.request(
        method, guarded.url + path, data=body, headers={**headers, **bearer(token)}, timeout=30
    )


def served_version(guarded: Guarded) -> str:
    metadata = requests.get(
        f"{guarded.url}/v2/models/{MODEL}",
        headers=bearer(guarded.tokens["ops"]),
        timeout=10,
    )
    return metadata.json()["versions"][0]


@pytest.mark.parametrize("door", DOORS)
def test_a_request_without_a_token_gets_401_with_a_bearer_challenge(guarded, door):
    response = call(guarded, door, None)
    assert response.status_code == 401, response.text
    assert response.headers["www-authenticate"].startswith("Bearer")
    assert "missing bearer token" in response.json()["error"]


@pytest.mark.parametrize("door", DOORS)
def test_an_unknown_token_gets_401(guarded, door):
    response = call(guarded, door, WRONG)
    assert response.status_code == 401, response.text
    assert 'error="invalid_token"' in response.headers["www-authenticate"]


@pytest.mark.parametrize("door", [d for d in DOORS if rest_doors("1")[d][4] != "any"])
def test_a_token_without_the_scope_gets_403(guarded, door):
    scope = rest_doors("1")[door][4]
    response = call(guarded, door, guarded.tokens[holder_without(scope)])
    assert response.status_code == 403, response.text
    assert f'scope="{scope}"' in response.headers["www-authenticate"]
    assert "lacks the" in response.json()["error"]


@pytest.mark.parametrize("door", DOORS)
def test_the_right_scope_is_answered(guarded, door):
    scope = rest_doors("1")[door][4]
    response = call(guarded, door, guarded.tokens[holder_with(scope)])
    assert response.status_code == 200, response.text


def test_a_token_with_several_scopes_opens_each_door(guarded):
    for door in ("v1 predict", "v1 explain", "v2 metadata"):
        assert call(guarded, door, guarded.tokens["both"]).status_code == 200


@pytest.mark.parametrize(
    "path",
    ["/v2/health/live", "/v2/health/ready", f"/v2/models/{MODEL}/ready", f"/v1/models/{MODEL}"],
)
def test_probe_paths_and_metrics_stay_open(guarded, path):
    assert requests.get(guarded.url + path, timeout=10).status_code == 200
    metrics = requests.get(f"{guarded.url}/metrics", timeout=10)
    assert metrics.status_code == 200 and "fraud_auth_denied_total" in metrics.text


def test_malformed_authorization_headers_get_401(guarded):
    for value in ("Basic dXNlcjpwYXNz", "Bearer", "Bearer two words", "bearer\tx"):
        response = requests.post(
            f"{guarded.url}/v1/models/{MODEL}:predict",
            data=V1_BODY,
            headers={**JSON, "authorization": value},
            timeout=10,
        )
        assert response.status_code == 401, (value, response.text)


def denied_counts(url: str) -> dict[str, float]:
    counts = {}
    for line in requests.get(f"{url}/metrics", timeout=10).text.splitlines():
        if line.startswith("fraud_auth_denied_total{"):
            reason = line.split('reason="', 1)[1].split('"', 1)[0]
            counts[reason] = float(line.rsplit(" ", 1)[1])
    return counts


def test_denials_are_counted_by_reason_and_logged_by_token_name_never_the_token(guarded):
    before = denied_counts(guarded.url)
    call(guarded, "v1 predict", None)
    call(guarded, "v1 predict", WRONG)
    call(guarded, "v1 explain", guarded.tokens["payments"])
    after = denied_counts(guarded.url)
    for reason in ("missing", "invalid", "scope"):
        assert after[reason] == before.get(reason, 0) + 1, (reason, before, after)
    log = guarded.predictor.log()
    assert "token 'payments' lacks the 'explain' scope" in log
    for token in guarded.tokens.values():
        assert token not in log
    assert WRONG not in log


# ------------------------------------------------------------------------------- gRPC


@pytest.fixture(scope="module")
def stub(guarded) -> GRPCInferenceServiceStub:
    channel = grpc.insecure_channel(guarded.grpc_target)
    yield GRPCInferenceServiceStub(channel)
    channel.close()


def grpc_metadata(token: str | None) -> tuple:
    return () if token is None else (("authorization", f"Bearer {token}"),)


GRPC_DOORS = {
    "ModelInfer": (lambda s, m: s.ModelInfer(grpc_request(), metadata=m, timeout=30), "predict"),
    "ModelInfer raw": (
        lambda s, m: s.ModelInfer(grpc_request(raw=True), metadata=m, timeout=30),
        "predict",
    ),
    "ModelMetadata": (
        lambda s, m: s.ModelMetadata(pb.ModelMetadataRequest(name=MODEL), metadata=m, timeout=30),
        "any",
    ),
    "ServerMetadata": (
        lambda s, m: s.ServerMetadata(pb.ServerMetadataRequest(), metadata=m, timeout=30),
        "any",
    ),
}


def grpc_status(function) -> grpc.StatusCode:
    try:
        function()
    except grpc.RpcError as error:
        return error.code()
    return grpc.StatusCode.OK


@pytest.mark.parametrize("door", GRPC_DOORS)
def test_grpc_doors_follow_the_token_contract(guarded, stub, door):
    send, scope = GRPC_DOORS[door]
    tokens = guarded.tokens
    assert grpc_status(lambda: send(stub, grpc_metadata(None))) == grpc.StatusCode.UNAUTHENTICATED
    assert grpc_status(lambda: send(stub, grpc_metadata(WRONG))) == grpc.StatusCode.UNAUTHENTICATED
    if scope != "any":
        wrong_scope = grpc_metadata(tokens[holder_without(scope)])
        assert grpc_status(lambda: send(stub, wrong_scope)) == grpc.StatusCode.PERMISSION_DENIED
    right = grpc_metadata(tokens[holder_with(scope)])
    assert grpc_status(lambda: send(stub, right)) == grpc.StatusCode.OK


def test_grpc_health_stays_open(stub):
    assert stub.ServerLive(pb.ServerLiveRequest(), timeout=10).live
    assert stub.ServerReady(pb.ServerReadyRequest(), timeout=10).ready
    assert stub.ModelReady(pb.ModelReadyRequest(name=MODEL), timeout=10).ready


#: tritonclient's round trip, in its own process: its protos and KServe's share a package
#: name, so both cannot be imported into one process.
TRITON_CLIENT = """
import json, sys
import numpy as np
import tritonclient.grpc as triton

target, token, row = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
kinds = {"FP64": np.float64, "INT64": np.int64, "BOOL": np.bool_}
inputs = []
for name, datatype in json.loads(sys.argv[4]).items():
    values = [row[name]] * 3
    if datatype == "BYTES":
        array = np.array([v.encode() for v in values], dtype=object)
    else:
        array = np.array(values, dtype=kinds[datatype])
    tensor = triton.InferInput(name, [3], datatype)
    tensor.set_data_from_numpy(array)
    inputs.append(tensor)
client = triton.InferenceServerClient(target)
result = client.infer("fraud-detector", inputs, headers={"authorization": "Bearer " + token})
probabilities, decisions = result.as_numpy("fraud_probability"), result.as_numpy("is_fraud")
answer = {"p": probabilities.tolist(), "d": decisions.tolist(), "dtype": str(decisions.dtype)}
print(json.dumps(answer))
"""


def test_tritonclient_reads_raw_outputs_with_as_numpy(guarded):
    """Triton answers raw inputs with raw outputs; tritonclient reads only those."""
    answer = subprocess.run(
        [
            sys.executable,
            "-c",
            TRITON_CLIENT,
            guarded.grpc_target,
            guarded.tokens["payments"],
            orjson.dumps(ORDINARY).decode(),
            orjson.dumps(codec.V2_INPUTS).decode(),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert answer.returncode == 0, answer.stderr[-2000:]
    result = orjson.loads(answer.stdout)
    v1 = call(guarded, "v1 predict", guarded.tokens["payments"]).json()["predictions"][0]
    assert result["p"] == [v1["fraud_probability"]] * 3
    assert result["d"] == [v1["is_fraud"]] * 3 and result["dtype"] == "bool"


def test_grpc_names_a_version_other_than_the_served_one_not_found(guarded, stub):
    metadata = grpc_metadata(guarded.tokens["payments"])
    request = grpc_request()
    request.model_version = "7"
    assert grpc_status(lambda: stub.ModelInfer(request, metadata=metadata, timeout=30)) == (
        grpc.StatusCode.NOT_FOUND
    )
    request.model_version = served_version(guarded)
    assert stub.ModelInfer(request, metadata=metadata, timeout=30).model_version == (
        request.model_version
    )


# -------------------------------------------------------------------- model lifecycle


def test_no_client_can_unload_or_load_the_model(guarded, stub):
    """What tritonclient's unload_model/load_model send, on REST and gRPC, with every
    token: refused, and the model keeps serving."""
    for token in (None, *guarded.tokens.values()):
        for verb in ("unload", "load"):
            response = requests.post(
                f"{guarded.url}/v2/repository/models/{MODEL}/{verb}",
                headers=bearer(token),
                timeout=10,
            )
            assert response.status_code in (401, 404), response.text
        metadata = grpc_metadata(token)
        for send in (
            lambda m: stub.RepositoryModelUnload(
                pb.RepositoryModelUnloadRequest(model_name=MODEL), metadata=m, timeout=10
            ),
            lambda m: stub.RepositoryModelLoad(
                pb.RepositoryModelLoadRequest(model_name=MODEL), metadata=m, timeout=10
            ),
        ):
            code = grpc_status(lambda send=send, metadata=metadata: send(metadata))
            assert code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.UNIMPLEMENTED)
    assert requests.get(f"{guarded.url}/v2/health/ready", timeout=10).status_code == 200
    assert call(guarded, "v1 predict", guarded.tokens["payments"]).status_code == 200
    server = requests.get(f"{guarded.url}/v2", headers=bearer(guarded.tokens["ops"]), timeout=10)
    assert "model_repository_extension" not in server.json()["extensions"]


# ------------------------------------------------------------------------- rotation


def predictor_with_tokens(mlflow_server, workdir: Path):
    """A predictor of its own, with a token file granting `payments` the predict scope."""
    tokens_file = workdir / "tokens"
    tokens = write_tokens(tokens_file, {"payments": "predict"})
    predictor = launch_predictor(
        workdir,
        env={"MLFLOW_TRACKING_URI": mlflow_server.url, "AUTH_TOKENS_FILE": str(tokens_file)},
    )
    return predictor, tokens_file, tokens


def test_a_rotated_token_file_takes_effect_within_10_s_and_a_broken_one_keeps_the_last(
    mlflow_server, champion, tmp_path
):
    predictor, tokens_file, first = predictor_with_tokens(mlflow_server, tmp_path)
    url = f"{predictor.url}/v1/models/{MODEL}:predict"

    def status(token: str) -> int:
        return requests.post(
            url, data=V1_BODY, headers={**JSON, **bearer(token)}, timeout=10
        ).status_code

    def within_10_s(token: str, expected: int) -> None:
        deadline = time.monotonic() + 10
        while status(token) != expected:
            assert time.monotonic() < deadline, f"still not {expected} after 10 s"
            time.sleep(0.25)

    try:
        assert status(first["payments"]) == 200
        second = write_tokens(tokens_file, {"payments": "predict"})
        within_10_s(second["payments"], 200)
        assert status(first["payments"]) == 401
        broken = tokens_file.with_suffix(".new")
        broken.write_text("sha256:nothex predict payments\n")
        os.replace(broken, tokens_file)
        deadline = time.monotonic() + 10
        while "keeping the previous 1 token(s)" not in predictor.log():
            assert time.monotonic() < deadline, predictor.log()[-2000:]
            time.sleep(0.25)
        assert status(second["payments"]) == 200
        assert "line 1: expected" in predictor.log()
    finally:
        stop(predictor.process)


def test_a_token_file_that_cannot_be_used_stops_the_start_with_one_line(tmp_path):
    tokens_file = tmp_path / "tokens"
    tokens_file.write_text("sha256:" + "0" * 64 + " predict,root payments\n")
    predictor = launch_predictor(
        tmp_path, env={"AUTH_TOKENS_FILE": str(tokens_file)}, wait_ready=False
    )
    assert predictor.process.wait(timeout=60) == 2
    assert "AUTH_TOKENS_FILE" in predictor.log() and "unknown scope(s) ['root']" in predictor.log()


def listening_addresses(port: int) -> set[str]:
    """Local addresses with a listening TCP socket on `port` (from /proc/net/tcp)."""
    found = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, state = line.split()[1], line.split()[3]
        address, hex_port = local.split(":")
        if state == "0A" and int(hex_port, 16) == port:
            found.add(".".join(str(int(address[i : i + 2], 16)) for i in (6, 4, 2, 0)))
    return found


def test_without_a_token_file_the_server_warns_and_binds_loopback_unless_told(
    mlflow_server, champion, tmp_path
):
    env = {"MLFLOW_TRACKING_URI": mlflow_server.url}
    predictor = launch_predictor(tmp_path / "default", env=env)
    try:
        assert "AUTH_TOKENS_FILE is not set: every caller" in predictor.log()
        assert listening_addresses(int(predictor.url.rsplit(":", 1)[1])) == {"127.0.0.1"}
    finally:
        stop(predictor.process)
    predictor = launch_predictor(tmp_path / "all", env={**env, "BIND_ADDRESS": "0.0.0.0"})
    try:
        assert listening_addresses(int(predictor.url.rsplit(":", 1)[1])) == {"0.0.0.0"}
    finally:
        stop(predictor.process)


def test_token_lines_parse_into_scopes_and_names():
    token = auth.new_token()
    tokens = auth.parse_tokens(
        f"# a comment\n\n{auth.token_line(token, ['predict', 'explain'], 'svc')}\n"
    )
    assert [(t.name, sorted(t.scopes)) for t in tokens] == [("svc", ["explain", "predict"])]
    store_entry = tokens[0]
    assert store_entry.digest.hex() == auth.token_digest(token)


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("sha256:abc predict x", "line 1: expected"),
        ("md5:" + "0" * 64 + " predict x", "line 1: expected"),
        ("sha256:" + "0" * 64 + " predict", "line 1: expected"),
        ("sha256:" + "0" * 64 + " root x", "unknown scope(s) ['root']"),
        ("sha256:" + "0" * 64 + " predict, x", "unknown scope(s) ['']"),
        ("\n".join(["sha256:" + "1" * 64 + " predict a"] * 2), "line 2: the same token hash"),
    ],
)
def test_bad_token_lines_are_refused_naming_the_line(text, problem):
    with pytest.raises(
        auth.TokenFileError,
        match=re.escape(problem),
    ):
        auth.parse_tokens(text)


@pytest.mark.parametrize(
    ("method", "path", "access"),
    [
        ("GET", "/v2/health/live", auth.Access.OPEN),
        ("GET", "/v2/health/ready", auth.Access.OPEN),
        ("GET", "/metrics", auth.Access.OPEN),
        ("GET", f"/v2/models/{MODEL}/ready", auth.Access.OPEN),
        ("GET", f"/v1/models/{MODEL}", auth.Access.OPEN),
        ("POST", f"/v1/models/{MODEL}", auth.Access.AUTHENTICATED),
        ("GET", f"/v1/models/{MODEL}:predict", auth.Access.PREDICT),
        ("POST", f"/v1/models/{MODEL}:predict", auth.Access.PREDICT),
        ("POST", f"/v1/models/{MODEL}:explain", auth.Access.EXPLAIN),
        ("POST", f"/v2/models/{MODEL}/infer", auth.Access.PREDICT),
        ("POST", f"/v2/models/{MODEL}/versions/3/infer", auth.Access.PREDICT),
        ("GET", f"/v2/models/{MODEL}/versions/3/ready", auth.Access.AUTHENTICATED),
        ("GET", f"/v2/models/{MODEL}/infer/ready", auth.Access.AUTHENTICATED),
        ("GET", f"/v2/models/{MODEL}", auth.Access.AUTHENTICATED),
        ("GET", "/v2", auth.Access.AUTHENTICATED),
        ("POST", f"/v2/repository/models/{MODEL}/unload", auth.Access.AUTHENTICATED),
        ("GET", "/openapi.json", auth.Access.AUTHENTICATED),
        ("GET", "/", auth.Access.AUTHENTICATED),
    ],
)
def test_each_path_needs_what_the_contract_says(method, path, access):
    assert auth.http_access(method, path) is access


def test_grpc_methods_need_what_the_contract_says():
    service = "/inference.GRPCInferenceService/"
    assert auth.grpc_access(service + "ServerLive") is auth.Access.OPEN
    assert auth.grpc_access(service + "ModelReady") is auth.Access.OPEN
    assert auth.grpc_access(service + "ModelInfer") is auth.Access.PREDICT
    assert auth.grpc_access(service + "ModelMetadata") is auth.Access.AUTHENTICATED
    assert auth.grpc_access(service + "RepositoryModelUnload") is auth.Access.AUTHENTICATED


def test_make_token_prints_a_token_and_the_line_that_grants_it(capsys):
    from predictor.__main__ import main

    assert main(["token", "--name", "payments", "--scopes", "predict,explain"]) == 0
    token, line = capsys.readouterr().out.splitlines()
    (entry,) = auth.parse_tokens(line)
    assert (entry.name, entry.scopes) == ("payments", frozenset({"predict", "explain"}))
    assert entry.digest.hex() == auth.token_digest(token) and token not in line


def test_a_control_character_in_the_path_cannot_reach_another_scope(guarded):
    """`:predict%0A` would route to :predict (a route's `$` matches before a final
    newline) while not ending in `:predict`: refused before any scope is decided."""
    for path, token in (
        (f"/v1/models/{MODEL}:predict%0A", guarded.tokens["analyst"]),
        (f"/v1/models/{MODEL}:explain%0A", guarded.tokens["payments"]),
        (f"/v1/models/{MODEL}:explain%0D", guarded.tokens["ops"]),
        (f"/v2/models/{MODEL}/infer%0A", guarded.tokens["analyst"]),
    ):
        response = requests.post(
            guarded.url + path, data=V1_BODY, headers={**JSON, **bearer(token)}, timeout=10
        )
        assert response.status_code == 400, (path, response.status_code, response.text[:200])


def test_two_authorization_headers_are_refused_on_every_door(guarded, stub):
    import http.client

    host, port = guarded.url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=10)
    connection.putrequest("POST", f"/v1/models/{MODEL}:predict")
    connection.putheader("content-type", "application/json")
    connection.putheader("content-length", str(len(V1_BODY)))
    connection.putheader("authorization", f"Bearer {guarded.tokens['payments']}")
    connection.putheader("authorization", f"Bearer {guarded.tokens['analyst']}")
    connection.endheaders(V1_BODY)
    response = connection.getresponse()
    assert response.status == 401 and b"more than one" in response.read()
    both = (
        ("authorization", f"Bearer {guarded.tokens['payments']}"),
        ("authorization", f"Bearer {guarded.tokens['analyst']}"),
    )
    code = grpc_status(lambda: stub.ModelInfer(grpc_request(), metadata=both, timeout=10))
    assert code == grpc.StatusCode.UNAUTHENTICATED


def test_anonymous_grpc_messages_are_refused_before_they_are_parsed(guarded):
    """Thirty 12 MiB ModelInfer calls without a token: refused, and memory does not grow
    by what parsing them would take."""
    pid = guarded.predictor.process.pid

    def rss_mib() -> float:
        status = Path(f"/proc/{pid}/status").read_text()
        return int(next(x for x in status.splitlines() if x.startswith("VmRSS:")).split()[1]) / 1024

    big = grpc_request([{**ORDINARY, "merchant_category": "x" * (12 * 1024 * 1024)}])
    with grpc.insecure_channel(
        guarded.grpc_target, options=[("grpc.max_send_message_length", -1)]
    ) as channel:
        stub = GRPCInferenceServiceStub(channel)
        for _ in range(3):  # gRPC's own buffers for a message this size, once
            grpc_status(lambda: stub.ModelInfer(big, timeout=30))
        before = rss_mib()
        for _ in range(30):
            assert grpc_status(lambda: stub.ModelInfer(big, timeout=30)) == (
                grpc.StatusCode.UNAUTHENTICATED
            )
    assert rss_mib() - before < 128, (before, rss_mib())


def test_emptying_the_token_file_revokes_every_token_even_after_it_was_missing(
    mlflow_server, champion, tmp_path
):
    predictor, tokens_file, tokens = predictor_with_tokens(mlflow_server, tmp_path)
    url = f"{predictor.url}/v1/models/{MODEL}:predict"
    headers = {**JSON, **bearer(tokens["payments"])}
    try:
        assert requests.post(url, data=V1_BODY, headers=headers, timeout=10).status_code == 200
        tokens_file.unlink()
        deadline = time.monotonic() + 10
        while "cannot read" not in predictor.log():
            assert time.monotonic() < deadline
            time.sleep(0.2)
        tokens_file.write_text("")
        deadline = time.monotonic() + 10
        while requests.post(url, data=V1_BODY, headers=headers, timeout=10).status_code != 401:
            assert time.monotonic() < deadline, "the emptied file was never read"
            time.sleep(0.25)
        assert "holds no token" in predictor.log()
    finally:
        stop(predictor.process)


def test_token_file_details_a_bom_duplicate_names_and_names_escaped_in_the_log(caplog):
    token = auth.new_token()
    (entry,) = auth.parse_tokens("\ufeff" + auth.token_line(token, ["predict"], "svc"))
    assert entry.name == "svc"
    other = auth.new_token()
    twice = "\n".join(
        [auth.token_line(token, ["predict"], "svc"), auth.token_line(other, ["explain"], "svc")]
    )
    with pytest.raises(auth.TokenFileError, match="line 2: the name 'svc' is already given"):
        auth.parse_tokens(twice)


def test_a_token_store_logs_names_escaped(tmp_path, caplog):
    path = tmp_path / "tokens"
    path.write_text(auth.token_line(auth.new_token(), ["predict"], "evil\u202e\x1b[31m"))
    with caplog.at_level("INFO", logger="predictor.auth"):
        auth.TokenStore(path)
    assert "\u202e" not in caplog.text and "\x1b" not in caplog.text and "\\u202e" in caplog.text
