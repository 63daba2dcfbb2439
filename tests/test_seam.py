"""The private names predictor/seam.py hooks still exist and still behave as it assumes:
an upgrade of uvicorn, httptools or KServe that changes them fails here, by name."""

from __future__ import annotations

import argparse
import asyncio
import logging
import multiprocessing
import signal
import threading
import time
import types

import numpy as np
import pytest
import uvicorn
from fastapi import FastAPI
from kserve import ModelServer
from kserve.model_repository import ModelRepository
from kserve.protocol.grpc import grpc_predict_v2_pb2 as pb
from kserve.protocol.infer_type import InferInput, InferRequest
from kserve.protocol.rest.multiprocess.server import RESTServerMultiProcess, RESTServerProcess
from kserve.protocol.rest.server import RESTServer
from prometheus_client import CollectorRegistry, Histogram
from starlette.applications import Starlette
from starlette.routing import Router
from uvicorn.server import ServerState

from predictor import seam
from predictor.server import FraudDataPlane
from predictor.settings import Settings


def qualified(owner) -> str:
    if isinstance(owner, types.ModuleType):
        return owner.__name__
    return f"{owner.__module__}.{owner.__qualname__}"


@pytest.mark.parametrize(("owner", "name"), seam.HOOKED, ids=lambda v: getattr(v, "__name__", v))
def test_every_hooked_name_still_exists(owner, name):
    assert hasattr(owner, name), f"{qualified(owner)}.{name} is gone: see predictor/seam.py"


def dataplane() -> FraudDataPlane:
    return FraudDataPlane(ModelRepository(), Settings(), workers=1)


#: How test_every_hooked_instance_attribute_still_exists builds each INSTANCE_HOOKED class.
BUILD = {
    ModelServer: lambda: ModelServer(enable_grpc=False),
    RESTServerMultiProcess: lambda: RESTServerMultiProcess(
        "kserve.model_server:app", dataplane(), None, 0, workers=2
    ),
    InferInput: lambda: InferInput("amount", [1], "FP64", [1.0]),
    Starlette: Starlette,
    Router: Router,
    Histogram: lambda: Histogram("seam_test", "a histogram", registry=None),
    argparse.ArgumentParser: argparse.ArgumentParser,
}


@pytest.mark.parametrize(
    ("owner", "names"), seam.INSTANCE_HOOKED, ids=lambda v: getattr(v, "__name__", "")
)
def test_every_hooked_instance_attribute_still_exists(owner, names):
    assert owner in BUILD, f"no way to build {qualified(owner)} here: add it to BUILD"
    instance = BUILD[owner]()
    for name in names:
        assert hasattr(instance, name), (
            f"{qualified(owner)} instances have no {name} any more: see predictor/seam.py"
        )


@pytest.mark.parametrize("pin", seam.PINNED, ids=lambda pin: pin.qualified)
def test_forked_and_relied_on_upstream_functions_are_unchanged(pin):
    function = getattr(pin.owner, pin.name, None)
    assert function is not None, f"{pin.qualified} is gone: {pin.where}"
    shape = seam.call_shape(function)
    assert shape == pin.shape, (
        f"{pin.qualified} now takes {shape}, was {pin.shape}: {pin.where}; see predictor/seam.py"
    )
    digest = seam.source_digest(function)
    assert digest == pin.digest, (
        f"{pin.qualified} changed (source digest {digest}, was {pin.digest}): re-read it, "
        f"{pin.where}, then update PINNED in predictor/seam.py"
    )


def test_the_rest_servers_kserve_builds_with_workers_are_found():
    multiprocess = BUILD[RESTServerMultiProcess]()
    server = seam.HookedModelServer(enable_grpc=False)
    assert server.rest_servers() == []
    server._rest_multiprocess_server = multiprocess  # as start() does with --workers
    (template,) = server.rest_servers()
    assert isinstance(template, RESTServer) and template.config.workers == 2


def test_a_worker_slower_than_kserves_5_s_ping_is_kept_not_replaced():
    """KServe's watchdog pings each worker; one still importing its libraries answers late.
    With the seam's timeout a 6 s answer keeps it (KServe's own 5 s would kill it)."""
    seam.tolerate_slow_worker_starts()
    seam.tolerate_slow_worker_starts()  # idempotent: one wrapper, not two
    assert RESTServerProcess.is_alive.tolerant
    worker = RESTServerProcess.__new__(RESTServerProcess)  # its pipe, without its target
    worker._parent_conn, worker._child_conn = multiprocessing.Pipe()
    worker._process = multiprocessing.get_context("spawn").Process(target=time.sleep, args=(30,))
    worker._process.start()
    try:

        def answer_late():
            time.sleep(6)
            worker.pong()

        threading.Thread(target=answer_late, daemon=True).start()
        started = time.monotonic()
        assert worker.is_alive()  # what keep_subprocess_alive() calls, with no timeout
        assert time.monotonic() - started >= 5.5
    finally:
        worker._process.kill()
        worker._process.join(10)


def test_prepare_servers_runs_before_serving_and_stop_stops_what_is_served_alongside():
    events = []

    class Alongside:
        async def start(self, max_workers):
            events.append(("start", max_workers))

        async def stop(self, sig=None):
            events.append(("stop", sig))

    class Server(seam.HookedModelServer):
        def prepare_servers(self):
            events.append(("prepare",))
            self.serve_alongside(Alongside(), 3)

    server = Server(enable_grpc=False)

    async def run():
        await server._serve()  # what start() awaits once its servers are built
        server.stop(signal.SIGTERM)
        for _ in range(20):
            await asyncio.sleep(0)

    asyncio.run(run())
    assert events == [("prepare",), ("start", 3), ("stop", signal.SIGTERM)]


def test_a_replaced_middleware_step_is_what_the_rest_server_runs():
    app = FastAPI()
    before = len(app.routes)
    rest_server = RESTServer(app, dataplane(), None, 0)
    seam.replace_kserve_middlewares(rest_server, record_middlewares)
    seam.kserve_app_parts(rest_server, app)
    assert record_middlewares.calls == [(rest_server, app)]
    assert seam.middleware_kinds(app) == []  # KServe's own step did not run
    assert len(app.routes) > before  # its endpoints did


def record_middlewares(rest_server, app):
    record_middlewares.calls.append((rest_server, app))


record_middlewares.calls = []


def test_raw_tensor_data_is_the_bytes_of_grpc_raw_contents():
    request = pb.ModelInferRequest(model_name="m")
    request.inputs.add(name="amount", datatype="FP64", shape=[1])
    request.raw_input_contents.append(np.float64(42.0).tobytes())
    (raw,) = InferRequest.from_grpc(request).inputs
    assert seam.raw_tensor_data(raw) == np.float64(42.0).tobytes()
    assert seam.raw_tensor_data(BUILD[InferInput]()) is None


def test_kserve_log_config_keeps_its_layout_with_every_formatter_replaced():
    class Formatter(logging.Formatter):
        pass

    config = seam.kserve_log_config(Formatter)
    assert all(entry == {"()": Formatter} for entry in config["formatters"].values())
    for name, handler in config["handlers"].items():
        assert handler["formatter"] in config["formatters"], name
    assert {"kserve", "kserve.trace", "uvicorn", "uvicorn.access"} <= set(config["loggers"])
    assert config["root"]["handlers"] == ["kserve"]
    assert seam.kserve_trace_logger().name == "kserve.trace"


def test_a_bulk_observation_equals_one_observation_per_value():
    values = np.array([0.0, 0.004, 0.005, 0.3, 0.5, 1.0, 7.5, 1e9, 0.1, 0.1])
    bulk, single = CollectorRegistry(), CollectorRegistry()
    buckets = (0.005, 0.1, 0.5, 1.0, 10.0)
    seam.observe_histogram_many(Histogram("h", "h", buckets=buckets, registry=bulk), values)
    one_by_one = Histogram("h", "h", buckets=buckets, registry=single)
    for value in values:
        one_by_one.observe(float(value))
    assert samples(bulk) == samples(single)


def samples(registry: CollectorRegistry) -> list[tuple]:
    return [
        (sample.name, tuple(sorted(sample.labels.items())), sample.value)
        for metric in registry.collect()
        for sample in metric.samples
        if not sample.name.endswith("_created")
    ]


def test_app_hooks_act_on_the_app():
    app = FastAPI()
    seam.no_slash_redirects(app)
    assert app.router.redirect_slashes is False
    seam.on_shutdown(app, print)
    assert print in app.router.on_shutdown


class Transport(asyncio.Transport):
    """What the protocol writes, and whether it closed."""

    def __init__(self):
        super().__init__()
        self.written = b""
        self.closed = self.eof = False

    def write(self, data):
        self.written += bytes(data)

    def close(self):
        self.closed = True

    def is_closing(self):
        return self.closed

    def can_write_eof(self):
        return True

    def write_eof(self):
        self.eof = True

    def get_extra_info(self, name, default=None):
        return {"peername": ("127.0.0.1", 5000), "sockname": ("127.0.0.1", 8080)}.get(name)

    def pause_reading(self):
        pass

    def resume_reading(self):
        pass


def connection() -> tuple[seam.BoundedHttpToolsProtocol, Transport]:
    async def app(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"app"})

    config = uvicorn.Config(app, log_config=None)
    config.load()
    protocol = seam.BoundedHttpToolsProtocol(
        config=config, server_state=ServerState(), app_state={}
    )
    transport = Transport()
    protocol.connection_made(transport)
    return protocol, transport


def test_a_head_over_the_limit_gets_431_and_the_connection_is_closed():
    async def run():
        protocol, transport = connection()
        protocol.data_received(b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 70_000)
        return transport

    transport = asyncio.run(run())
    assert transport.written.startswith(b"HTTP/1.1 431 Request Header Fields Too Large\r\n")
    assert transport.eof


def test_a_head_within_the_limit_reaches_the_app():
    async def run():
        protocol, transport = connection()
        protocol.data_received(b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 1000 + b"\r\n\r\n")
        for _ in range(20):
            await asyncio.sleep(0)
        return transport

    transport = asyncio.run(run())
    assert transport.written.startswith(b"HTTP/1.1 200 OK\r\n")
    assert transport.written.endswith(b"\r\napp\r\n0\r\n\r\n")


def test_probes_are_answered_on_the_connection():
    seam.answer_probes({"/probe": lambda: (503, b'{"error":"not yet"}')})

    async def run():
        protocol, transport = connection()
        protocol.data_received(b"GET /probe HTTP/1.1\r\nHost: x\r\n\r\n")
        return transport

    try:
        transport = asyncio.run(run())
    finally:
        seam.answer_probes({})
    assert transport.written.startswith(b"HTTP/1.1 503 Service Unavailable\r\n")
    assert transport.written.endswith(b'{"error":"not yet"}')


def test_kserves_rest_server_keeps_its_uvicorn_config_where_the_seam_sets_it():
    rest_server = RESTServer(FastAPI(), dataplane(), None, 0)
    seam.configure_rest_server(rest_server, "127.0.0.1")
    assert isinstance(rest_server.config, uvicorn.Config)
    assert (rest_server.config.host, rest_server.config.http) == (
        "127.0.0.1",
        seam.BoundedHttpToolsProtocol,
    )


def test_a_head_not_complete_in_time_gets_408(monkeypatch):
    monkeypatch.setattr(seam, "HEAD_SECONDS", 0.05)

    async def run():
        protocol, transport = connection()
        protocol.data_received(b"GET / HTTP/1.1\r\nHost: x\r\nX-Slow: a")
        await asyncio.sleep(0.2)
        return transport

    transport = asyncio.run(run())
    assert transport.written.startswith(b"HTTP/1.1 408 Request Timeout\r\n")
