"""The HTTP edges every request passes, outermost first (plain ASGI middleware):

* RequestMetrics: responses with status >= 400 counted by status, inference timed;
* Authentication: bearer tokens and scopes (predictor.auth), before any body is read;
* SafeErrors: every error body `{"error": ...}`, at most 4 KiB, client text escaped;
* BodySizeLimit: bodies over MAX_REQUEST_BYTES refused with 413 before they are parsed.
"""

from __future__ import annotations

import logging
import re
import time

import orjson
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from predictor import metrics
from predictor.auth import Access, Denied, TokenStore, http_access
from predictor.text import MAX_ERROR_BYTES, error_body, escaped

logger = logging.getLogger("predictor.server")

auth_logger = logging.getLogger("predictor.auth")
_CONTROL = re.compile("[\x00-\x1f\x7f]")

INFERENCE_PATH_SUFFIXES = (":predict", "/infer", ":explain")
#: nginx's status for "the client closed the request": not the server's error.
CLIENT_CLOSED_REQUEST = 499


async def send_error(send: Send, status: int, message: str, headers=()) -> None:
    """A complete JSON error response (the connection stays usable)."""
    body = error_body(message)
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                *headers,
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


class RequestMetrics:
    """Count responses with status >= 400 (KServe's handlers and ours alike, and the 500
    that Starlette's outermost middleware sends for an exception nobody handled), and time
    inference requests end to end (`fraud_request_duration_seconds`)."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        started = False
        began = time.perf_counter()

        async def counting_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                if message["status"] >= 400:
                    metrics.REQUEST_ERRORS.labels(
                        protocol="http", status=str(message["status"])
                    ).inc()
            await send(message)

        try:
            await self.app(scope, receive, counting_send)
        except Exception:
            # Unhandled (a bug): answered here, so no exception text reaches the client.
            if started:
                raise
            logger.exception("%s %s failed", scope["method"], escaped(scope["path"], 200))
            await send_error(counting_send, 500, "internal server error")
        finally:
            if scope["path"].endswith(INFERENCE_PATH_SUFFIXES):
                metrics.REQUEST_SECONDS.labels(protocol="http").observe(time.perf_counter() - began)


class Authentication:
    """Refuse a request whose token does not grant what its path needs: 401 with
    `WWW-Authenticate: Bearer` (no or unknown token) or 403 (token without the scope).
    Without a token store (no AUTH_TOKENS_FILE) every caller is trusted."""

    def __init__(self, app: ASGIApp, tokens: TokenStore | None):
        self.app = app
        self.tokens = tokens

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if _CONTROL.search(scope["path"]):
            # Routes match "$" before a final newline: `:predict%0A` reaches :predict.
            await send_error(send, 400, "the request path holds control characters")
            return
        if self.tokens is None:
            await self.app(scope, receive, send)
            return
        access = http_access(scope["method"], scope["path"])
        if access is not Access.OPEN:
            authorization = [
                value.decode("latin-1")
                for name, value in scope["headers"]
                if name == b"authorization"
            ]
            try:
                self.tokens.authorize(authorization, access)
            except Denied as denied:
                await self._refuse(scope, send, denied, access)
                return
        await self.app(scope, receive, send)

    async def _refuse(self, scope: Scope, send: Send, denied: Denied, access: Access) -> None:
        metrics.AUTH_DENIED.labels(reason=denied.reason).inc()
        client = scope.get("client") or ("-", 0)
        auth_logger.warning(
            "denied %s %s from %s: %s%s",
            scope["method"],
            escaped(scope["path"], 200),
            client[0],
            denied,
            f" (token {escaped(denied.name, 100)})" if denied.name else "",
        )
        if denied.status == 403:
            challenge = f'Bearer error="insufficient_scope", scope="{access.value}"'
        elif denied.reason == "missing":
            challenge = 'Bearer realm="fraud-predictor"'
        else:
            challenge = 'Bearer realm="fraud-predictor", error="invalid_token"'
        await send_error(
            send, denied.status, str(denied), [(b"www-authenticate", challenge.encode())]
        )


class SafeErrors:
    """Every response with status >= 400 carries `{"error": message}` (the OIP error shape;
    FastAPI's own 404/405 say `{"detail": ...}`) of at most 4 KiB, with control and
    bidirectional-override characters escaped, whatever handler wrote it (KServe's echo
    the model name from the URL)."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        held: Message | None = None
        chunks: list[bytes] = []

        async def guarded_send(message: Message) -> None:
            nonlocal held
            if message["type"] == "http.response.start" and message["status"] >= 400:
                held = message
                return
            if held is None or message["type"] != "http.response.body":
                await send(message)
                return
            if sum(map(len, chunks)) < 4 * MAX_ERROR_BYTES:  # the rest would be cut anyway
                chunks.append(message.get("body", b""))
            if message.get("more_body", False):
                return
            body = error_body(error_message(b"".join(chunks)))
            headers = [
                (name, value)
                for name, value in held["headers"]
                if name not in (b"content-length", b"content-type")
            ]
            headers += [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
            ]
            await send({**held, "headers": headers})
            await send({"type": "http.response.body", "body": body})

        await self.app(scope, receive, guarded_send)


def error_message(body: bytes) -> str:
    """The message of an error body: its `error` (KServe, OIP) or `detail` (FastAPI)."""
    try:
        parsed = orjson.loads(body)
    except orjson.JSONDecodeError:
        return body.decode("utf-8", "replace") or "error"
    if isinstance(parsed, dict):
        for key in ("error", "detail"):
            if isinstance(parsed.get(key), str):
                return parsed[key]
        if "detail" in parsed:
            return orjson.dumps(parsed["detail"]).decode()
    return body.decode("utf-8", "replace")


class BodySizeLimit:
    """Refuse bodies over `max_bytes` with 413, whether declared or chunked."""

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None:
            if not declared.isdigit():
                await send_error(send, 400, "Content-Length must be a number of bytes")
                return
            if int(declared) > self.max_bytes:
                await self._refuse(send)
                return
            await self.app(scope, receive, send)
            return
        # No length declared (chunked): read up to the limit, then replay what was read
        # (a disconnect too: the handler sees the client leave, as it would unbuffered).
        read: list[Message] = []
        size = 0
        while True:
            message = await receive()
            read.append(message)
            if message["type"] != "http.request":
                break
            size += len(message.get("body", b""))
            if size > self.max_bytes:
                await self._refuse(send)
                return
            if not message.get("more_body", False):
                break
        read.reverse()

        async def replay() -> Message:
            return read.pop() if read else await receive()

        await self.app(scope, replay, send)

    async def _refuse(self, send: Send) -> None:
        await send_error(
            send,
            413,
            f"request body exceeds {self.max_bytes} bytes (MAX_REQUEST_BYTES)",
            [(b"connection", b"close")],
        )
