"""The private names predictor/seam.py hooks still exist and still behave as it assumes:
an upgrade of uvicorn, httptools or KServe that changes them fails here, by name."""

from __future__ import annotations

import asyncio

import pytest
import uvicorn
from fastapi import FastAPI
from kserve.model_repository import ModelRepository
from kserve.protocol.rest.server import RESTServer
from uvicorn.server import ServerState

from predictor import seam
from predictor.server import FraudDataPlane
from predictor.settings import Settings


@pytest.mark.parametrize(("owner", "name"), seam.HOOKED, ids=lambda v: getattr(v, "__name__", v))
def test_every_hooked_name_still_exists(owner, name):
    assert hasattr(owner, name), f"{owner.__module__}.{owner.__name__}.{name} is gone: see seam.py"


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
    dataplane = FraudDataPlane(ModelRepository(), Settings(), workers=1)
    rest_server = RESTServer(FastAPI(), dataplane, None, 0)
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
