"""Readiness is the only door, on gRPC too: no call loads a model inline, UNAVAILABLE comes
fast until the watcher has loaded one, and with `--workers N` the gRPC server (in the
parent process) follows hot reloads and reports readiness truthfully."""

from __future__ import annotations

import time

import grpc
import requests
from kserve.protocol.grpc import grpc_predict_v2_pb2 as pb
from kserve.protocol.grpc.grpc_predict_v2_pb2_grpc import GRPCInferenceServiceStub
from support import free_port, register_quick_model, wait_for
from test_hostile_input import GOOD, grpc_request

from predictor import registry


def grpc_version(stub: GRPCInferenceServiceStub, model: str) -> str:
    return stub.ModelInfer(grpc_request([GOOD], model=model), timeout=10).model_version


def test_grpc_answers_unavailable_at_once_while_the_registry_is_down(start_predictor):
    grpc_port = free_port()
    predictor = start_predictor(
        env={
            "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{free_port()}",  # nothing listens
            "MODEL_LOAD_TIMEOUT_SECONDS": "30",
        },
        args=["--enable_grpc", "true", "--grpc_port", str(grpc_port)],
        wait_ready=False,
    )
    wait_for(f"{predictor.url}/v2/health/live", timeout=60, process=predictor.process)
    with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
        stub = GRPCInferenceServiceStub(channel)
        grpc.channel_ready_future(channel).result(timeout=30)
        assert stub.ServerLive(pb.ServerLiveRequest(), timeout=5).live is True
        assert stub.ServerReady(pb.ServerReadyRequest(), timeout=5).ready is False
        ready = stub.ModelReady(pb.ModelReadyRequest(name="fraud-detector"), timeout=5)
        assert ready.ready is False
        for _ in range(5):
            started = time.monotonic()
            try:
                stub.ModelInfer(grpc_request([GOOD]), timeout=10)
                raise AssertionError("ModelInfer answered without a model")
            except grpc.RpcError as error:
                assert error.code() == grpc.StatusCode.UNAVAILABLE, error.details()
            assert time.monotonic() - started < 2  # not a load attempt (30 s timeout)
            health = requests.get(f"{predictor.url}/v2/health/live", timeout=5)
            assert health.status_code == 200
    assert "Traceback" not in predictor.log()


def test_grpc_with_two_workers_is_ready_and_follows_a_hot_reload(start_predictor, mlflow_server):
    name = "fraud-grpc-workers"
    first = register_quick_model(mlflow_server.url, name, seed=3)
    grpc_port = free_port()
    predictor = start_predictor(
        env={
            "MLFLOW_TRACKING_URI": mlflow_server.url,
            "MODEL_URI": f"models:/{name}@live",
            "MODEL_POLL_INTERVAL_SECONDS": "1",
        },
        args=["--workers", "2", "--enable_grpc", "true", "--grpc_port", str(grpc_port)],
    )
    with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
        stub = GRPCInferenceServiceStub(channel)
        deadline = time.monotonic() + 60
        while not stub.ServerReady(pb.ServerReadyRequest(), timeout=5).ready:
            assert time.monotonic() < deadline, "gRPC never became ready"
            time.sleep(0.2)
        assert stub.ModelReady(pb.ModelReadyRequest(name="fraud-detector"), timeout=5).ready
        assert grpc_version(stub, "fraud-detector") == first.version

        second = register_quick_model(mlflow_server.url, name, seed=4)
        registry.connect(mlflow_server.url)
        deadline = time.monotonic() + 60
        while grpc_version(stub, "fraud-detector") != second.version:
            assert time.monotonic() < deadline, "gRPC kept serving the old version"
            time.sleep(0.5)
    # Each REST worker follows the alias on its own poll: both within a few intervals.
    url = f"{predictor.url}/v1/models/fraud-detector:predict"
    deadline = time.monotonic() + 30
    versions: set[str] = set()
    while versions != {second.version}:
        assert time.monotonic() < deadline, f"REST workers still answer {versions}"
        versions = {
            requests.post(url, json={"instances": [GOOD]}, timeout=10).json()["model_version"]
            for _ in range(8)
        }
        time.sleep(0.5)
    assert "died" not in predictor.log()  # no worker killed by KServe's watchdog
