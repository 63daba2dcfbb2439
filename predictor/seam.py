"""Every reach into a library's private or undocumented API, in one place.

Checked against: kserve 0.21.0, uvicorn 0.54.0, starlette 1.10.0, httptools 0.9.0.
`tests/test_seam.py` fails with a clear message when a name hooked here changes; upgrade
those libraries by running it, then re-reading the hooked code.

Hooks:
* uvicorn's httptools protocol, subclassed to bound the request line and headers (uvicorn
  bounds them only with h11; httptools buffers any size) and to answer the health probes
  as soon as they are read;
* KServe's RESTServer: its uvicorn Config (bind address, protocol class), built inside
  `ModelServer.start()` with `host="0.0.0.0"` fixed.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from http import HTTPStatus
from typing import ClassVar

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from predictor import metrics
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
