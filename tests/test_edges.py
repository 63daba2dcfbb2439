"""What any client can send before the model sees a row, against a running predictor:
header floods, uploads abandoned part-way, long or hostile names echoed in errors, unknown
routes, request headers fishing for an echo, and sustained maximum-size bodies while the
kubelet probes liveness."""

from __future__ import annotations

import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import orjson
import pytest
import requests
from kserve.protocol.grpc.grpc_predict_v2_pb2_grpc import GRPCInferenceServiceStub
from processes import free_port
from support import ORDINARY, launch_predictor, stop
from test_hostile_input import CE_HEADERS, binary_request, error_counts, grpc_request

from predictor import codec
from predictor.text import MAX_ERROR_BYTES

MODEL = "fraud-detector"
MAX_ROWS = 10_000


class Server:
    def __init__(self, predictor, grpc_target: str):
        self.predictor = predictor
        self.grpc_target = grpc_target
        self.url = predictor.url
        self.port = int(predictor.url.rsplit(":", 1)[1])

    def rss_mib(self) -> float:
        status = Path(f"/proc/{self.predictor.process.pid}/status").read_text()
        line = next(line for line in status.splitlines() if line.startswith("VmRSS:"))
        return int(line.split()[1]) / 1024


@pytest.fixture(scope="module")
def server(mlflow_server, champion, tmp_path_factory) -> Server:
    grpc_port = free_port()
    predictor = launch_predictor(
        tmp_path_factory.mktemp("edges"),
        env={"MLFLOW_TRACKING_URI": mlflow_server.url, "MAX_BATCH_ROWS": str(MAX_ROWS)},
        args=["--enable_grpc", "true", "--grpc_port", str(grpc_port)],
    )
    yield Server(predictor, f"127.0.0.1:{grpc_port}")
    stop(predictor.process)


def raw_exchange(port: int, chunks, timeout: float = 30) -> bytes:
    """Send `chunks` (bytes, or a generator of them) on a fresh connection; what came back.
    A reset while sending is the server closing on us: read what it said before."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as connection:
        try:
            for chunk in [chunks] if isinstance(chunks, bytes) else chunks:
                connection.sendall(chunk)
        except (BrokenPipeError, ConnectionResetError):
            pass
        received = b""
        try:
            while chunk := connection.recv(65536):
                received += chunk
        except (ConnectionResetError, TimeoutError):
            pass
        return received


def status_of(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1]) if answer.startswith(b"HTTP/1.1 ") else 0


def head(path: str = "/v2/health/live", extra: bytes = b"") -> bytes:
    return b"GET " + path.encode() + b" HTTP/1.1\r\nHost: x\r\n" + extra


# ---------------------------------------------------------------------- header limits


def header_lines(count: int):
    """A request head of `count` short header lines, sent in pieces of 10,000."""
    yield head()
    for _ in range(count // 10_000):
        yield b"X-A: b\r\n" * 10_000
    yield b"\r\n"


@pytest.mark.parametrize(
    "flood",
    [
        pytest.param(
            lambda: [head(extra=b"X-Big: " + b"a" * 8 * 1024 * 1024 + b"\r\n\r\n")],
            id="one 8 MiB header",
        ),
        pytest.param(
            lambda: header_lines(800_000),
            id="800,000 header lines",
        ),
        pytest.param(
            lambda: [b"GET /" + b"a" * 200_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n"],
            id="200 KB request line",
        ),
    ],
)
def test_a_request_head_over_64_kib_gets_431_and_is_counted(server, flood):
    before = error_counts(server).get(("http", "431"), 0)
    answer = raw_exchange(server.port, flood())
    assert status_of(answer) == 431, answer[:300]
    assert b"MAX_HEADER_BYTES" in answer
    assert error_counts(server)[("http", "431")] == before + 1
    assert requests.get(f"{server.url}/v2/health/live", timeout=10).status_code == 200


def test_a_head_just_under_the_limit_is_served(server):
    answer = raw_exchange(
        server.port, head(extra=b"X-Big: " + b"a" * 60_000 + b"\r\nConnection: close\r\n\r\n")
    )
    assert status_of(answer) == 200, answer[:300]


def test_header_floods_four_at_a_time_leave_memory_bounded(server):
    baseline = server.rss_mib()
    floods = [
        [head(extra=b"X-Big: " + b"a" * 8 * 1024 * 1024 + b"\r\n\r\n")],
        header_lines(800_000),
        [head(extra=b"X-Big: " + b"a" * 8 * 1024 * 1024 + b"\r\n\r\n")],
        header_lines(800_000),
    ]
    answers: list[bytes] = []
    threads = [
        threading.Thread(target=lambda f=f: answers.append(raw_exchange(server.port, f)))
        for f in floods
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert [status_of(a) for a in answers] == [431] * 4
    assert server.rss_mib() - baseline < 64, (baseline, server.rss_mib())


# ------------------------------------------------------------------- client disconnects


def test_an_upload_abandoned_part_way_is_not_a_server_error(server):
    body = orjson.dumps({"instances": [ORDINARY] * 2000})
    before = error_counts(server)
    for _ in range(3):
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as connection:
            connection.sendall(
                f"POST /v1/models/{MODEL}:predict HTTP/1.1\r\nHost: x\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode()
                + body[: len(body) // 2]
            )
            time.sleep(0.2)
    # and the same with a chunked upload, which the body limit reads first
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as connection:
        connection.sendall(
            f"POST /v2/models/{MODEL}/infer HTTP/1.1\r\nHost: x\r\n"
            "Transfer-Encoding: chunked\r\n\r\n1000\r\n".encode()
            + b"x" * 100
        )
        time.sleep(0.2)
    time.sleep(0.5)
    after = error_counts(server)
    grown = {key: after[key] - before.get(key, 0) for key in after if after[key] != before.get(key)}
    assert not any(status.startswith("5") for _, status in grown), grown
    log = server.predictor.log()
    assert "ClientDisconnect" not in log and " ERROR " not in log, log[-3000:]
    assert requests.get(f"{server.url}/v2/health/live", timeout=10).status_code == 200


# ---------------------------------------------------------------- nothing echoed back


CANARY = "canary-7f3c9e"


def doors() -> dict[str, tuple[str, bytes, dict]]:
    binary, binary_headers = binary_request([ORDINARY])
    return {
        "v1 predict": (f"/v1/models/{MODEL}:predict", orjson.dumps({"instances": [ORDINARY]}), {}),
        "v1 explain": (f"/v1/models/{MODEL}:explain", orjson.dumps({"instances": [ORDINARY]}), {}),
        "v2 infer": (
            f"/v2/models/{MODEL}/infer",
            orjson.dumps(codec.v2_request_body([ORDINARY])),
            {},
        ),
        "v2 binary": (f"/v2/models/{MODEL}/infer", binary, binary_headers),
        "cloudevent": (
            f"/v1/models/{MODEL}:predict",
            orjson.dumps({"instances": [ORDINARY]}),
            CE_HEADERS,
        ),
        "bad request": (f"/v1/models/{MODEL}:predict", b'{"instances": 3}', {}),
        "unknown model": ("/v1/models/nope:explain", orjson.dumps({"instances": [ORDINARY]}), {}),
    }


#: Headers a response may carry: the server's own.
OWN_HEADERS = {
    "date",
    "server",
    "content-type",
    "content-length",
    "x-model-version",
    "inference-header-content-length",
    "connection",
    *(f"ce-{name}" for name in ("specversion", "id", "source", "type", "time")),
}


@pytest.mark.parametrize("door", list(doors()))
def test_no_request_header_is_echoed_in_a_response(server, door):
    path, body, headers = doors()[door]
    sent = {
        "content-type": "application/json",
        **headers,
        "authorization": f"Bearer {CANARY}",
        "x-forwarded-for": CANARY,
        "x-request-id": CANARY,
        "user-agent": CANARY,
        "x-canary": CANARY,
    }
    response = requests.post(server.url + path, data=body, headers=sent, timeout=30)
    assert set(response.headers) <= OWN_HEADERS | {h.title() for h in OWN_HEADERS}, dict(
        response.headers
    )
    lowered = {name.lower() for name in response.headers}
    assert lowered <= OWN_HEADERS, lowered - OWN_HEADERS
    assert CANARY not in str(response.headers)
    assert len(response.raw.headers.getlist("content-type")) == 1


def test_explanations_say_which_version_answered_in_the_header(server):
    response = requests.post(
        f"{server.url}/v1/models/{MODEL}:explain", json={"instances": [ORDINARY]}, timeout=30
    )
    assert response.status_code == 200
    assert response.headers["x-model-version"] == response.json()["model_version"]


# -------------------------------------------------------------- bounded, escaped errors


HOSTILE_NAMES = {
    "60,000 characters": "m" * 60_000,
    "right-to-left overrides": "\u202e" * 3_000,
    "controls": "a\x1b[31mb\x00c" * 200,
}


def assert_safe_error(text: str) -> None:
    assert len(text.encode()) <= MAX_ERROR_BYTES, len(text.encode())
    assert "\u202e" not in text and "\x1b" not in text and "\x00" not in text


@pytest.mark.parametrize("name", list(HOSTILE_NAMES))
@pytest.mark.parametrize(
    ("method", "template"),
    [
        ("POST", "/v1/models/{}:predict"),
        ("POST", "/v1/models/{}:explain"),
        ("GET", "/v1/models/{}"),
        ("POST", "/v2/models/{}/infer"),
        ("GET", "/v2/models/{}"),
        ("GET", "/v2/models/{}/ready"),
        ("POST", "/v2/models/fraud-detector/versions/{}/infer"),
    ],
)
def test_error_bodies_are_short_and_escaped_whatever_the_url_holds(server, name, method, template):
    path = template.format(requests.utils.quote(HOSTILE_NAMES[name], safe=""))
    response = requests.request(
        method, server.url + path, json={"instances": [ORDINARY]}, timeout=30
    )
    assert 400 <= response.status_code < 500, response.text[:300]
    assert len(response.content) <= MAX_ERROR_BYTES
    assert_safe_error(response.json()["error"])


@pytest.mark.parametrize("name", list(HOSTILE_NAMES))
def test_grpc_error_details_are_short_and_escaped(server, name):
    with grpc.insecure_channel(server.grpc_target) as channel:
        stub = GRPCInferenceServiceStub(channel)
        with pytest.raises(grpc.RpcError) as error:
            stub.ModelInfer(grpc_request(model=HOSTILE_NAMES[name]), timeout=30)
    assert error.value.code() == grpc.StatusCode.NOT_FOUND
    assert_safe_error(error.value.details())


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [
        ("GET", "/v2/nope", 404),
        ("GET", "/nothing/here", 404),
        ("GET", f"/v1/models/{MODEL}:predict", 405),
    ],
)
def test_unknown_routes_answer_in_the_oip_error_shape(server, method, path, status):
    response = requests.request(method, server.url + path, timeout=10)
    assert response.status_code in (status, 404), response.text
    assert set(response.json()) == {"error"}


# ----------------------------------------------------- health under sustained maximum load

#: Clients that post one body each, back to back, for a while: in their own process, as
#: real clients are (in the test's process they would share its GIL with the probe).
ATTACKERS = """
import json, sys, threading, time
import requests

url, seconds, bodies = sys.argv[1], float(sys.argv[2]), json.loads(sys.argv[3])
statuses, done = [], threading.Event()

def attack(path, body_file, headers):
    body, session = open(body_file, "rb").read(), requests.Session()
    while not done.is_set():
        answer = session.post(url + path, data=body, headers=headers, timeout=120)
        statuses.append(answer.status_code)

threads = [threading.Thread(target=attack, args=body) for body in bodies]
for thread in threads:
    thread.start()
time.sleep(seconds)
done.set()
for thread in threads:
    thread.join(timeout=120)
print(json.dumps(statuses))
"""


def test_health_p99_waits_behind_one_large_parse_at_most_through_sustained_maximum_size_bodies(
    server, tmp_path
):
    """Twenty seconds of five clients sending maximum-size bodies back to back (10,000-row
    V1, V2 and binary batches, and 8 MiB of V1 JSON that only parsing can refuse: KServe
    parses V1 on the event loop) while the kubelet's probe polls liveness.

    A probe may wait behind the longest C call the server makes holding the GIL (parsing
    8 MiB of JSON), not behind several: p99 under 100 ms, or under twice that parse as
    this machine times it now where that is longer (97 ms on a busy 2-core machine). With
    V1 parsed on the event loop, probes queue behind several parses (p99 140-190 ms where
    this bound is 100 ms) and the test fails."""
    rows = [ORDINARY] * MAX_ROWS
    v1 = {"instances": rows}
    # Valid JSON up to MAX_REQUEST_BYTES (8 MiB) that only a parse can refuse (400).
    padded = orjson.dumps({**v1, "padding": list(range(1_000_000))})[: 8 * 1024 * 1024]
    padded = padded[: padded.rindex(b",")] + b"]}"
    one_parse = statistics.median(timed(lambda: orjson.loads(padded)) for _ in range(5))
    bound = max(0.1, 2 * one_parse)
    binary, binary_headers = binary_request(rows)
    json_headers = {"content-type": "application/json"}
    bodies = []
    for index, (path, body, headers) in enumerate(
        [
            (f"/v1/models/{MODEL}:predict", orjson.dumps(v1), json_headers),
            (f"/v1/models/{MODEL}:predict", padded, json_headers),
            (f"/v1/models/{MODEL}:predict", padded, json_headers),
            (f"/v2/models/{MODEL}/infer", orjson.dumps(codec.v2_request_body(rows)), json_headers),
            (f"/v2/models/{MODEL}/infer", binary, binary_headers),
        ]
    ):
        (tmp_path / f"body-{index}").write_bytes(body)
        bodies.append((path, str(tmp_path / f"body-{index}"), headers))
    attackers = subprocess.Popen(
        [sys.executable, "-c", ATTACKERS, server.url, "20", orjson.dumps(bodies).decode()],
        stdout=subprocess.PIPE,
    )
    latencies: list[float] = []
    session = requests.Session()
    time.sleep(1)
    deadline = time.monotonic() + 18
    while time.monotonic() < deadline:
        began = time.perf_counter()
        assert session.get(f"{server.url}/v2/health/live", timeout=5).status_code == 200
        latencies.append(time.perf_counter() - began)
        time.sleep(0.02)
    statuses = orjson.loads(attackers.communicate(timeout=180)[0])
    assert set(statuses) == {200, 400} and len(statuses) >= 40, (len(statuses), set(statuses))
    latencies.sort()
    p99 = latencies[int(0.99 * len(latencies))]
    assert len(latencies) > 200, len(latencies)
    slowest = [round(s * 1000) for s in latencies[-5:]]
    assert p99 < bound, (
        f"health p99 {p99 * 1000:.0f} ms over {bound * 1000:.0f} ms (one 8 MiB parse here: "
        f"{one_parse * 1000:.0f} ms); slowest {slowest} ms"
    )


def timed(work) -> float:
    began = time.perf_counter()
    work()
    return time.perf_counter() - began


def test_a_request_uvicorn_cannot_parse_gets_a_counted_json_400(server):
    before = error_counts(server).get(("http", "400"), 0)
    answer = raw_exchange(server.port, b"GET / HTTP/1.1\r\nHo\x00st: x\r\n\r\n")
    assert status_of(answer) == 400 and b'{"error":' in answer
    assert error_counts(server)[("http", "400")] == before + 1


def test_a_trailing_slash_is_not_found_not_redirected_to_the_host_header(server):
    response = requests.get(
        f"{server.url}/v2/models/{MODEL}/",
        headers={"Host": "evil.example"},
        allow_redirects=False,
        timeout=10,
    )
    assert response.status_code == 404 and "location" not in response.headers


def test_versioned_metadata_and_readiness_answer_for_the_served_version_only(server):
    metadata = requests.get(f"{server.url}/v2/models/{MODEL}", timeout=10).json()
    served = metadata["versions"][0]
    base = f"{server.url}/v2/models/{MODEL}/versions"
    assert requests.get(f"{base}/{served}", timeout=10).json() == metadata
    assert requests.get(f"{base}/{served}/ready", timeout=10).json() == {
        "name": MODEL,
        "ready": True,
    }
    for path in (f"{base}/999", f"{base}/999/ready"):
        response = requests.get(path, timeout=10)
        assert response.status_code == 404 and "'999'" in response.json()["error"]
    assert "Traceback" not in server.predictor.log()
