"""KServe's ModelServer with the HTTP edges this server needs.

* a request-body size limit (413) before any JSON is parsed;
* FastAPI's 422 for malformed V2 bodies turned into KServe's ``{"error": ...}`` 400;
* V2 model metadata that names the version being served.
"""

from __future__ import annotations

import json
from typing import Any

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from kserve import ModelServer
from kserve import model_server as kserve_model_server
from kserve.protocol.dataplane import DataPlane
from starlette.types import ASGIApp, Message, Receive, Scope, Send


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
            if int(declared) > self.max_bytes:
                await self._refuse(send)
                return
            await self.app(scope, receive, send)
            return
        # No length declared (chunked): read up to the limit, then replay what was read.
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                break
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                await self._refuse(send)
                return
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)

    async def _refuse(self, send: Send) -> None:
        payload = json.dumps(
            {"error": f"request body exceeds {self.max_bytes} bytes (MAX_REQUEST_BYTES)"}
        ).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(payload)).encode()),
                    (b"connection", b"close"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": payload})


async def request_validation_handler(_: Request, error: RequestValidationError) -> JSONResponse:
    """A malformed body is the client's error: 400 naming the field, like InvalidInput."""
    parts = []
    for item in error.errors()[:5]:
        loc = [str(key) for key in item.get("loc", ()) if key != "body"]
        if item.get("type") == "json_invalid":
            parts.append(f"request body is not valid JSON ({item.get('msg')})")
        else:
            parts.append(f"{'.'.join(loc) or 'body'}: {item.get('msg')}")
    return JSONResponse(status_code=400, content={"error": "; ".join(parts)})


class VersionedDataPlane(DataPlane):
    """KServe's data plane, with the served model version in V2 model metadata."""

    async def model_metadata(self, model_name: str) -> dict[str, Any]:
        metadata = await super().model_metadata(model_name)
        model = self.get_model_from_registry(model_name)
        serving = getattr(model, "serving", None)
        if serving is not None:
            metadata["versions"] = [serving.version]
            metadata["platform"] = "mlflow_sklearn"
        return metadata


def build_server(max_request_bytes: int, **server_args: Any) -> ModelServer:
    """A ModelServer (flags as parsed by kserve) with this server's edges installed."""
    app = kserve_model_server.app
    app.add_middleware(BodySizeLimit, max_bytes=max_request_bytes)
    app.add_exception_handler(RequestValidationError, request_validation_handler)
    server = ModelServer(**server_args)
    server.dataplane = VersionedDataPlane(model_registry=server.registered_models)
    return server
