"""Every reach into a library's private or undocumented API, in one place.

Checked against: kserve 0.21.0, uvicorn 0.54.0, starlette 1.10.0, httptools 0.9.0,
fastapi 0.165.0, prometheus-client 0.26.0. `tests/test_seam.py` fails with a clear message
naming the hook when a name hooked here changes, or when an upstream function this server
forks or relies on changes its signature or its code; upgrade those libraries by running
it, then re-reading the hooked code (and updating PINNED).

Hooks (HOOKED: class-level names; INSTANCE_HOOKED: attributes set in `__init__`):
* uvicorn's httptools protocol, subclassed to bound the request line and headers (uvicorn
  bounds them only with h11; httptools buffers any size) and to answer the health probes
  as soon as they are read;
* KServe's RESTServer: its uvicorn Config (bind address, protocol class), built inside
  `ModelServer.start()` with `host="0.0.0.0"` fixed; its `_add_middlewares`, replaced on
  the instance (a `functools.partial`, which survives pickling into `--workers`
  processes); its `_register_endpoints` / `_add_exception_handlers` (an app built as
  `create_application()` builds KServe's, for tests);
* KServe's ModelServer: `_serve()` (the one call between `start()` building its servers and
  serving them), `_rest_server`, `_rest_multiprocess_server._rest_server` (the RESTServer
  it built) and `_grpc_server` (what `stop()` stops); its module-global `app` and `args`
  (`start()` reads `args.log_config_file` for its workers);
* KServe's worker watchdog (`RESTServerProcess.is_alive`): a longer ping timeout, so a
  worker still starting on a loaded machine is not killed and replaced in a loop;
* KServe's InferInput: `_raw_data`, the bytes of a tensor sent as gRPC raw contents;
* KServe's logging: the `kserve.trace` logger and the handler layout of KSERVE_LOG_CONFIG;
* Starlette's `app.user_middleware` and `router.redirect_slashes`, FastAPI's
  `router.add_event_handler` (kept "for backward compatibility");
* argparse's `parser._actions` (KServe's flags, to say in `--help` what this server does
  with each);
* prometheus-client's Histogram internals (`_upper_bounds`, `_sum`, `_buckets`): a bulk
  observe, which it has not.

Forks (PINNED): this server's replacements of upstream functions, which must keep answering
as those do: `V2Endpoints.infer` (predictor.server.v2_infer_endpoint), `V1Endpoints.predict`
and `.explain` (server.v1_endpoint), `DataPlane.get_model` and `.explain`
(server.FraudDataPlane), `InferenceServicer.ModelInfer` (grpc_server.FraudInferenceServicer),
`GRPCServer.start` and `.stop` (grpc_server.FraudGRPCServer), `ModelServer._serve`; and
`ModelServer.start`, whose order of steps the hooks above rely on.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import functools
import hashlib
import inspect
import logging
from collections.abc import Callable
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any, ClassVar

import numpy as np
from fastapi import FastAPI
from fastapi.routing import APIRouter
from kserve import ModelServer
from kserve import logging as kserve_logging
from kserve import model_server as kserve_model_server
from kserve.protocol.dataplane import DataPlane
from kserve.protocol.grpc.server import GRPCServer
from kserve.protocol.grpc.servicer import InferenceServicer
from kserve.protocol.infer_type import InferInput
from kserve.protocol.rest.multiprocess.server import RESTServerMultiProcess, RESTServerProcess
from kserve.protocol.rest.server import RESTServer
from kserve.protocol.rest.v1_endpoints import V1Endpoints
from kserve.protocol.rest.v2_endpoints import V2Endpoints
from prometheus_client import Histogram
from starlette.applications import Starlette
from starlette.routing import Router
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from predictor.text import error_body

logger = logging.getLogger("predictor.server")

#: Class-level names hooked here; test_seam.py checks each still exists (and drives the
#: protocol through a request, for the instance attributes: url, headers, parser, transport).
HOOKED = (
    (HttpToolsProtocol, "data_received"),
    (HttpToolsProtocol, "on_message_begin"),
    (HttpToolsProtocol, "on_headers_complete"),
    (HttpToolsProtocol, "on_message_complete"),
    (HttpToolsProtocol, "on_url"),
    (HttpToolsProtocol, "on_header"),
    (HttpToolsProtocol, "on_body"),
    (HttpToolsProtocol, "send_400_response"),
    (HttpToolsProtocol, "connection_made"),
    (HttpToolsProtocol, "connection_lost"),
    (RESTServer, "_add_middlewares"),
    (RESTServer, "_register_endpoints"),
    (RESTServer, "_add_exception_handlers"),
    (RESTServer, "create_application"),
    (ModelServer, "_serve"),
    (kserve_model_server, "app"),
    (kserve_model_server, "args"),
    (kserve_logging, "trace_logger"),
    (kserve_logging, "KSERVE_LOG_CONFIG"),
    (APIRouter, "add_event_handler"),
    (RESTServerProcess, "is_alive"),
)

#: Attributes set in `__init__`, hooked here: test_seam.py builds each class and checks.
INSTANCE_HOOKED = (
    (ModelServer, ("_rest_server", "_rest_multiprocess_server", "_grpc_server", "servers")),
    (InferInput, ("_raw_data",)),
    (Starlette, ("user_middleware",)),
    (Router, ("redirect_slashes",)),
    (Histogram, ("_upper_bounds", "_sum", "_buckets")),
    (argparse.ArgumentParser, ("_actions",)),
)


def call_shape(function: Callable) -> str:
    """A function's parameters as `(self, a, b=None, *, c)`: names, kinds and defaults,
    without annotations (whose rendering changes with Python versions)."""
    parts = []
    for parameter in inspect.signature(function).parameters.values():
        text = {
            inspect.Parameter.VAR_POSITIONAL: f"*{parameter.name}",
            inspect.Parameter.VAR_KEYWORD: f"**{parameter.name}",
        }.get(parameter.kind, parameter.name)
        if parameter.default is not inspect.Parameter.empty:
            text += f"={parameter.default!r}"
        parts.append(text)
    return f"({', '.join(parts)})"


def source_digest(function: Callable) -> str:
    """The first 12 hex digits of the SHA-256 of a function's source."""
    return hashlib.sha256(inspect.getsource(function).encode()).hexdigest()[:12]


@dataclass(frozen=True)
class Pin:
    """An upstream function this server forks or relies on, as it was when last read."""

    owner: Any
    name: str
    #: call_shape() of the upstream function.
    shape: str
    #: source_digest() of the upstream function.
    digest: str
    #: Where this server depends on it (and what to re-read when it changes).
    where: str

    @property
    def qualified(self) -> str:
        return f"{self.owner.__module__}.{self.owner.__qualname__}.{self.name}"


#: Upstream functions forked (replaced by this server's own) or relied on, kserve 0.21.0.
PINNED = (
    Pin(
        V2Endpoints,
        "infer",
        "(self, raw_request, raw_response, model_name, request_body, model_version=None)",
        "57fdb35815a3",
        "forked by predictor.server.v2_infer_endpoint / answered",
    ),
    Pin(
        V1Endpoints,
        "predict",
        "(self, model_name, request)",
        "b1da6ffcb904",
        "forked by predictor.server.v1_endpoint / answered",
    ),
    Pin(
        V1Endpoints,
        "explain",
        "(self, model_name, request)",
        "193e89739c43",
        "forked by predictor.server.v1_endpoint / answered",
    ),
    Pin(
        DataPlane,
        "get_model",
        "(self, name)",
        "2d5cbc38f433",
        "forked by predictor.server.FraudDataPlane.get_model (no inline load)",
    ),
    Pin(
        DataPlane,
        "explain",
        "(self, model_name, request, headers=None)",
        "7995ba27efb3",
        "forked by predictor.server.FraudDataPlane.explain (no echoed headers)",
    ),
    Pin(
        InferenceServicer,
        "ModelInfer",
        "(self, request, context)",
        "49bf48c9159e",
        "forked by predictor.grpc_server.FraudInferenceServicer.ModelInfer",
    ),
    Pin(
        GRPCServer,
        "start",
        "(self, max_workers)",
        "f4ea7b4eb6f0",
        "forked by predictor.grpc_server.FraudGRPCServer.start",
    ),
    Pin(
        GRPCServer,
        "stop",
        "(self, sig=None)",
        "d6cf7ca03639",
        "forked by predictor.grpc_server.FraudGRPCServer.stop (ModelServer.stop calls it)",
    ),
    Pin(
        ModelServer,
        "_serve",
        "(self)",
        "ff3ff3ccb85e",
        "overridden by seam.HookedModelServer._serve",
    ),
    Pin(
        ModelServer,
        "start",
        "(self, models)",
        "efa96502018b",
        "relied on: builds its RESTServer(s), and a gRPC server only if enable_grpc, "
        "then runs _serve() (seam.HookedModelServer)",
    ),
    Pin(
        RESTServer,
        "create_application",
        "(self)",
        "f821f63b4024",
        "relied on: adds middlewares, endpoints, exception handlers (seam.kserve_app_parts)",
    ),
    Pin(
        RESTServerProcess,
        "is_alive",
        "(self, timeout=5)",
        "b5d7ea48fc1a",
        "default timeout raised by seam.tolerate_slow_worker_starts",
    ),
    Pin(
        RESTServerMultiProcess,
        "keep_subprocess_alive",
        "(self, sockets)",
        "22dd987ecf8b",
        "relied on: calls is_alive() with its default timeout every 0.5 s, kills and "
        "replaces a worker that does not answer (seam.tolerate_slow_worker_starts)",
    ),
    Pin(
        Histogram,
        "observe",
        "(self, amount, exemplar=None)",
        "38beca3be1d1",
        "mirrored by seam.observe_histogram_many",
    ),
)


#: How long a refused connection's further data is read and dropped before it is closed.
LINGER_SECONDS = 2.0
#: A request head must be complete this long after its first byte (slow heads hold memory).
HEAD_SECONDS = 10.0


class BoundedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with the request line and headers bounded: over
    `max_head_bytes` the client gets 431 and the connection is closed, with at most one
    read (64 KiB) buffered beyond the limit."""

    #: Set in each serving process from MAX_HEADER_BYTES (the class travels by name into
    #: `--workers` processes).
    max_head_bytes = 64 * 1024
    #: `GET <path>` answered as soon as its head is read, on the event loop, before the
    #: ASGI app: path -> () -> (status, JSON body). Set by `answer_probes`.
    probes: ClassVar[dict[bytes, Callable[[], tuple[int, bytes]]]] = {}

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._head_bytes = 0
        self._in_head = True
        self._refused = False
        self._head_timer: asyncio.TimerHandle | None = None

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_head_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return
        if self._in_head:
            if self._head_bytes == 0 and self._head_timer is None:
                self._head_timer = asyncio.get_running_loop().call_later(
                    HEAD_SECONDS, self._head_too_slow
                )
            self._head_bytes += len(data)
        super().data_received(data)
        if self._in_head and self._head_bytes > self.max_head_bytes and not self._refused:
            self._refuse()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._in_head = True

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._cancel_head_timer()
        size = len(self.url) + sum(len(name) + len(value) + 4 for name, value in self.headers)
        if size > self.max_head_bytes:
            self._refuse()
            return
        self._head_bytes = 0
        probe = self.probes.get(self.url)
        if probe is not None and self.parser.get_method() == b"GET":
            self._answer_probe(*probe())
            return
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        if self._refused:
            return
        super().on_message_complete()
        self._in_head = True
        self._head_bytes = 0

    def on_url(self, url: bytes) -> None:
        if not self._refused:
            super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self._refused:
            super().on_header(name, value)

    def on_body(self, body: bytes) -> None:
        if not self._refused:
            super().on_body(body)

    def send_400_response(self, msg: str) -> None:
        """uvicorn's answer to a request it cannot parse, as JSON and counted."""
        self._answer_and_close(400, error_body(msg))

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_too_slow(self) -> None:
        self._head_timer = None
        if self._in_head and not self._refused and not self.transport.is_closing():
            self._answer_and_close(
                408, error_body(f"request head not complete within {HEAD_SECONDS:.0f} s")
            )

    def _refuse(self) -> None:
        body = error_body(
            f"request line and headers exceed {self.max_head_bytes} bytes (MAX_HEADER_BYTES)"
        )
        self._answer_and_close(431, body)

    def _answer_probe(self, status: int, body: bytes) -> None:
        """A probe answered in the callback that read it: one pass of the event loop, where
        the app would take several (each a wait for the GIL while large requests are
        decoded in the thread pool). The connection is closed, as the kubelet does."""
        self._answer_and_close(status, body)

    def _answer_and_close(self, status: int, body: bytes) -> None:
        self._refused = True
        self._cancel_head_timer()
        self.headers = []
        self.url = b""
        self.transport.write(
            b"HTTP/1.1 %d %s\r\n"
            % (status, HTTPStatus(status).phrase.encode())
            + b"content-type: application/json\r\n"
            b"content-length: " + str(len(body)).encode() + b"\r\n"
            b"connection: close\r\n\r\n" + body
        )
        # Close gracefully: a client still sending its head would get a reset (and lose
        # the 431) if unread data were in the socket at close; read and drop it a moment.
        if self.transport.can_write_eof():
            self.transport.write_eof()
            asyncio.get_running_loop().call_later(LINGER_SECONDS, self.transport.close)
        else:
            self.transport.close()
        if status >= 400:
            from predictor import metrics  # here: predictor.metrics uses this module

            metrics.REQUEST_ERRORS.labels(protocol="http", status=str(status)).inc()


def bound_request_heads(max_head_bytes: int) -> None:
    """Set the head limit of this process's HTTP connections."""
    BoundedHttpToolsProtocol.max_head_bytes = max_head_bytes


def answer_probes(probes: dict[str, Callable[[], tuple[int, bytes]]]) -> None:
    """Answer these `GET` paths on the connection, before the app (see _answer_probe)."""
    BoundedHttpToolsProtocol.probes = {path.encode(): probe for path, probe in probes.items()}


def configure_rest_server(rest_server, host: str) -> None:
    """Bind KServe's RESTServer to `host` and bound its request heads (before it starts)."""
    config = rest_server.config
    config.host = host
    config.http = BoundedHttpToolsProtocol
    config.ws = "none"  # no WebSocket routes: an upgrade is an ordinary (refused) request


# ----------------------------------------------------------------- KServe's ModelServer


class HookedModelServer(ModelServer):
    """KServe's ModelServer with one step of its own between `start()` building the servers
    and serving them: `prepare_servers()` (kserve 0.21.0 `start()` builds its RESTServer,
    then awaits `_serve()` in `asyncio.run`)."""

    async def _serve(self) -> None:
        self.prepare_servers()
        if self._rest_multiprocess_server is not None:
            tolerate_slow_worker_starts()
        await super()._serve()

    def prepare_servers(self) -> None:
        """Configure `rest_servers()`, add servers with `serve_alongside()`: in subclasses."""

    def rest_servers(self) -> list[RESTServer]:
        """The RESTServer `start()` made: KServe's own or, with `--workers`, the template
        each worker process runs."""
        if self._rest_multiprocess_server is not None:
            return [self._rest_multiprocess_server._rest_server]
        return [self._rest_server] if self._rest_server is not None else []

    def serve_alongside(self, grpc_server: Any, max_threads: int) -> None:
        """Serve `grpc_server` (an object with `start(max_workers)` and `stop(sig)`, as
        KServe's GRPCServer) with the REST server, stopped by `stop()` as KServe's is."""
        self._grpc_server = grpc_server
        self.servers.append(grpc_server.start(max_threads))


#: How long a `--workers` process may leave KServe's liveness ping unanswered before KServe
#: kills and replaces it. KServe waits 5 s; a worker answers only once it has imported its
#: libraries, which takes longer than that on a loaded 2-core machine, and each replacement
#: then starts the same race again.
WORKER_PING_TIMEOUT_SECONDS = 30.0


def tolerate_slow_worker_starts() -> None:
    """KServe's worker watchdog with a ping timeout of WORKER_PING_TIMEOUT_SECONDS (its
    loop calls `is_alive()` with the default; kserve 0.21.0). Idempotent."""
    upstream = RESTServerProcess.is_alive
    if getattr(upstream, "tolerant", False):
        return

    def is_alive(self, timeout: float = WORKER_PING_TIMEOUT_SECONDS) -> bool:
        return upstream(self, timeout)

    is_alive.tolerant = True  # type: ignore[attr-defined]
    RESTServerProcess.is_alive = is_alive


def kserve_app() -> FastAPI:
    """The FastAPI app KServe serves: a module global of kserve.model_server, imported by
    name in every `--workers` process."""
    return kserve_model_server.app


def set_worker_log_config(config: dict) -> None:
    """The logging configuration KServe applies in the server and each `--workers` process
    (`start()` reads it from the module's parsed `args`, not from its constructor)."""
    kserve_model_server.args.log_config_file = config


# ----------------------------------------------------------------- KServe's RESTServer


def replace_kserve_middlewares(
    rest_server: RESTServer, add: Callable[[RESTServer, FastAPI], None]
) -> None:
    """Have `rest_server` add its middlewares with `add(rest_server, app)` in place of its
    own. `add` must be a module-level function: the RESTServer is pickled into each
    `--workers` process, the partial with it."""
    rest_server._add_middlewares = functools.partial(add, rest_server)


def add_kserve_middlewares(rest_server: RESTServer, app: FastAPI) -> None:
    """The middlewares KServe's RESTServer adds to its app (timing, access log format)."""
    RESTServer._add_middlewares(rest_server, app)


def kserve_app_parts(rest_server: RESTServer, app: FastAPI) -> None:
    """Build `app` as `RESTServer.create_application()` builds KServe's own (middlewares,
    routes, exception handlers), for an app other than the module global."""
    rest_server._add_middlewares(app)
    rest_server._register_endpoints(app)
    rest_server._add_exception_handlers(app)


# --------------------------------------------------------------- Starlette and FastAPI


def drop_middleware(app: Starlette, kind: type) -> None:
    """Remove every `kind` middleware added to `app` (before it starts)."""
    app.user_middleware = [m for m in app.user_middleware if m.cls is not kind]


def middleware_kinds(app: Starlette) -> list[type]:
    """The classes of the middlewares added to `app`, outermost first."""
    return [m.cls for m in app.user_middleware]


def no_slash_redirects(app: FastAPI) -> None:
    """Starlette answers `/path/` with a redirect to the Host header's `/path`: not here."""
    app.router.redirect_slashes = False


def on_shutdown(app: FastAPI, handler: Callable[[], Any]) -> None:
    """Run `handler` when `app`'s lifespan ends (after uvicorn has drained requests)."""
    app.router.add_event_handler("shutdown", handler)


# ------------------------------------------------------------------- KServe's tensors


def raw_tensor_data(tensor: InferInput) -> bytes | None:
    """The raw bytes of a tensor sent as gRPC `raw_input_contents` (None for tensors sent
    as values: JSON data, gRPC contents, and the REST binary extension, which KServe
    decodes to values)."""
    return tensor._raw_data


# -------------------------------------------------------------------- KServe's logging


def kserve_trace_logger() -> logging.Logger:
    """The logger KServe writes its per-request timings to."""
    return kserve_logging.trace_logger


def kserve_log_config(formatter: type[logging.Formatter]) -> dict:
    """KServe's logging configuration (its loggers, uvicorn's, levels, streams) with every
    formatter made by `formatter`, and the root logger writing through KServe's handler."""
    config = copy.deepcopy(kserve_logging.KSERVE_LOG_CONFIG)
    for name in config["formatters"]:
        config["formatters"][name] = {"()": formatter}
    config["root"] = {"handlers": ["kserve"], "level": "INFO"}
    return config


# ----------------------------------------------------------------- prometheus-client


def observe_histogram_many(histogram: Histogram, values: np.ndarray) -> None:
    """`histogram.observe(v)` for every value, in one pass per bucket instead of per value.

    prometheus-client has no bulk observe; this does what its `observe` does (sum, then
    the first bucket whose upper bound is >= the value) with numpy. test_seam.py pins the
    equivalence, so an upstream change of these internals fails loudly.
    """
    bounds = np.asarray(histogram._upper_bounds)
    counts = np.bincount(np.searchsorted(bounds, values, side="left"), minlength=len(bounds))
    histogram._sum.inc(float(values.sum()))
    for bucket, count in zip(histogram._buckets, counts.tolist(), strict=True):
        if count:
            bucket.inc(count)


# ------------------------------------------------------------------------------ argparse


def parser_actions(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    """Every argument `parser` takes, its inherited (`parents=`) ones included."""
    return list(parser._actions)
