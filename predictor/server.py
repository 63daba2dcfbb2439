"""KServe's ModelServer with the HTTP edges this server needs.

* a request-body size limit (413) before any JSON is parsed;
* FastAPI's 422 for malformed V2 bodies turned into KServe's ``{"error": ...}`` 400;
* error responses counted by status, and `/metrics` summed over all workers;
* server readiness that means "the model is loaded" (KServe's is always true);
* V2 model metadata that names the version being served.

With `--workers N`, KServe pickles its data plane into N spawned processes that import a
fresh FastAPI app; `FraudDataPlane.__setstate__` prepares each of them like the single
process is prepared in `python -m predictor`.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import struct
import time
import warnings
from typing import Any

import orjson
from cloudevents.exceptions import GenericException as CloudEventError
from fastapi import FastAPI, Request, Response
from fastapi.exceptions import FastAPIDeprecationWarning, RequestValidationError
from fastapi.responses import JSONResponse
from kserve import ModelServer
from kserve import model_server as kserve_model_server
from kserve.constants.constants import INFERENCE_CONTENT_LENGTH_HEADER, PredictorProtocol
from kserve.errors import InvalidInput, ModelNotFound, ModelNotReady
from kserve.model import BaseKServeModel
from kserve.model_repository import ModelRepository
from kserve.protocol.dataplane import DataPlane
from kserve.protocol.infer_type import InferRequest
from kserve.protocol.rest.server import RESTServer
from kserve.protocol.rest.v2_datamodels import InferenceRequest
from pydantic import ValidationError
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from timing_asgi import TimingMiddleware

from predictor import codec, metrics, runtime
from predictor.binary_extension import check_binary_request
from predictor.grpc_server import FraudGRPCServer
from predictor.logs import configure_logging, quiet_kserve_logging
from predictor.model import INLINE_MAX_BODY_BYTES, MODEL_VERSION_HEADER, FraudModel
from predictor.schema import describe_errors, one_line, shown, shown_list
from predictor.settings import Settings

logger = logging.getLogger("predictor.server")


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


INFERENCE_PATH_SUFFIXES = (":predict", "/infer", ":explain")


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
            # Unhandled: Starlette's outermost ServerErrorMiddleware answers 500 after this.
            if not started:
                metrics.REQUEST_ERRORS.labels(protocol="http", status="500").inc()
            raise
        finally:
            if scope["path"].endswith(INFERENCE_PATH_SUFFIXES):
                metrics.REQUEST_SECONDS.labels(protocol="http").observe(time.perf_counter() - began)


async def metrics_endpoint(_: Request) -> Response:
    body, content_type = metrics.exposition()
    return Response(content=body, media_type=content_type)


def body_location(loc: tuple[int | str, ...]) -> str:
    """``inputs.0.datatype`` for FastAPI's ``("body", "inputs", 0, "datatype")``."""
    return ".".join(str(key) for key in loc if key != "body") or "body"


async def request_validation_handler(_: Request, error: RequestValidationError) -> JSONResponse:
    """A malformed body is the client's error: 400 naming the field, like InvalidInput."""
    return JSONResponse(
        status_code=400, content={"error": describe_errors(error.errors(), body_location)}
    )


def v2_infer_endpoint(dataplane: FraudDataPlane):
    """KServe's V2 infer endpoint without FastAPI's round trip through pydantic and
    `jsonable_encoder` on the way out (~16 % of a 100-row request, profiled): the body is
    parsed with orjson, checked with KServe's own request model, and the response dict
    from `InferResponse.to_rest()` is written with orjson. Binary-extension requests
    (`inference-header-content-length`) are checked (predictor.binary_extension), then
    passed to KServe's decoder. Large bodies are decoded in the thread pool.
    """

    async def infer(raw_request: Request, model_name: str) -> Response:
        if not await dataplane.model_ready(model_name, True):
            raise ModelNotReady(model_name)
        body = await raw_request.body()
        headers = dict(raw_request.headers)
        if len(body) <= INLINE_MAX_BODY_BYTES:
            infer_request = dataplane.decode_v2(body, headers, model_name)
        else:
            loop = asyncio.get_running_loop()
            infer_request = await loop.run_in_executor(
                None, dataplane.decode_v2, body, headers, model_name
            )
        response, response_headers = await dataplane.infer(
            model_name=model_name, request=infer_request, headers=headers
        )
        response, encode_headers = dataplane.encode(
            model_name=model_name, response=response, headers=headers, req_attributes={}
        )
        response_headers.update(encode_headers)
        response_headers.pop("content-length", None)
        media_type = response_headers.pop("content-type", "application/json")
        content = response if isinstance(response, bytes) else orjson.dumps(response)
        return Response(content=content, headers=response_headers, media_type=media_type)

    return infer


def v2_versioned_infer_endpoint(dataplane: FraudDataPlane, infer):
    """`/v2/models/<name>/versions/<version>/infer`: the plain route's answer when <version>
    is the one served, else 404 (KServe's own answers 501 to every versioned request)."""

    async def versioned_infer(raw_request: Request, model_name: str, model_version: str):
        serving = getattr(dataplane.get_model_from_registry(model_name), "serving", None)
        if serving is not None and serving.version != model_version:
            raise ModelNotFound(f"{model_name} version {shown(model_version)}")
        response = await infer(raw_request, model_name)
        # A hot reload between the check and the scoring: not the version asked for.
        if response.headers.get(MODEL_VERSION_HEADER) != model_version:
            raise ModelNotFound(f"{model_name} version {shown(model_version)}")
        return response

    return versioned_infer


def parse_v2_json(body: bytes) -> InferenceRequest:
    """A V2 JSON body checked with KServe's request model. More tensors than the model
    takes are refused before pydantic sees them (20,000 tensors: 0.17 s holding the GIL)."""
    try:
        parsed = orjson.loads(body)
    except orjson.JSONDecodeError as error:
        raise InvalidInput(f"request body is not valid JSON ({error})") from None
    inputs = parsed.get("inputs") if isinstance(parsed, dict) else None
    if isinstance(inputs, list) and len(inputs) > len(codec.V2_INPUTS):
        names = [t.get("name") if isinstance(t, dict) else t for t in inputs]
        unknown = [name for name in names if name not in codec.V2_INPUTS]
        if unknown:
            raise InvalidInput(
                f"inputs: unknown tensor(s) {shown_list(unknown)}; expected {list(codec.V2_INPUTS)}"
            )
        raise InvalidInput(f"inputs: duplicate tensor(s) {codec.duplicates(names)}")
    try:
        return InferenceRequest.model_validate(parsed)
    except ValidationError as error:
        raise InvalidInput(
            describe_errors(error.errors(include_url=False), body_location)
        ) from None


#: What KServe's and cloudevents' decoders raise on malformed input (never on our own bugs:
#: the model is not called while decoding).
DECODING_ERRORS = (
    ValueError,
    TypeError,
    KeyError,
    IndexError,
    AttributeError,
    struct.error,
    CloudEventError,
)


class FraudDataPlane(DataPlane):
    """KServe's data plane with truthful readiness (the only door: nothing loads inline),
    decoding failures as 400s, V2 bodies checked before decoding, and the served version
    in metadata."""

    def __init__(self, model_registry: ModelRepository, settings: Settings, workers: int):
        super().__init__(model_registry=model_registry)
        self.settings = settings
        self.workers = workers

    def decode_v2(self, body: bytes, headers: dict[str, str], model_name: str) -> InferRequest:
        """A V2 REST body (JSON or binary extension) as KServe's InferRequest, or 400."""
        json_length = headers.get(INFERENCE_CONTENT_LENGTH_HEADER)
        if json_length is not None:
            check_binary_request(body, json_length, codec.V2_INPUTS, self.settings.max_batch_rows)
            request_body: bytes | InferenceRequest = body
        else:
            request_body = parse_v2_json(body)
        infer_request, _ = self.decode(
            request_body,
            headers,
            protocol_version=PredictorProtocol.REST_V2.value,
            model_name=model_name,
        )
        return infer_request

    def decode(self, body: Any, headers: Any, *args: Any, **kwargs: Any) -> tuple[Any, dict]:
        """KServe's decoding (V1 JSON, CloudEvents, V2) with its crashes on malformed input
        (empty CloudEvent bodies, bad binary parts) turned into 400s naming the problem."""
        try:
            return super().decode(body, headers, *args, **kwargs)
        except InvalidInput:
            raise
        except DECODING_ERRORS as error:
            raise InvalidInput(f"request could not be decoded: {one_line(error)}") from None

    def __setstate__(self, state: dict[str, Any]) -> None:
        """Unpickled in a spawned KServe worker process: make this process ready to serve."""
        self.__dict__.update(state)
        prepare_serving_process(self)

    async def get_model(self, name: str) -> BaseKServeModel:
        """The model, only if it is ready. KServe's own calls `model.load()` inline when it is
        not, on the request's event loop (gRPC inference reaches it): here only the
        background watcher loads, and requests get 503 / UNAVAILABLE until it has."""
        model = self._model_registry.get_model(name)
        if model is None:
            raise ModelNotFound(name)
        if not await self._model_registry.is_model_ready(name):
            raise ModelNotReady(name)
        return model

    async def ready(self) -> bool:
        """Server readiness per the V2 spec: every model is ready, in every worker."""
        models = self.model_registry.get_models().values()
        if not models or not all(model.ready for model in models):
            return False
        return self.workers == 1 or runtime.ready_workers() >= self.workers

    async def model_metadata(self, model_name: str) -> dict[str, Any]:
        metadata = await super().model_metadata(model_name)
        model = self.get_model_from_registry(model_name)
        serving = getattr(model, "serving", None)
        if serving is not None:
            metadata["versions"] = [serving.version]
            # The V2 metadata schema has no field for it: the engine rides in the platform.
            metadata["platform"] = f"mlflow_sklearn/{serving.scorer.engine}"
        return metadata


def install_http_edges(app: FastAPI, dataplane: FraudDataPlane) -> None:
    """Add this server's middleware, handlers and routes to KServe's app, before it starts.

    Routes added here take precedence over KServe's, which are registered at start-up.
    """
    app.add_middleware(BodySizeLimit, max_bytes=dataplane.settings.max_request_bytes)
    app.add_middleware(RequestMetrics)
    app.add_exception_handler(RequestValidationError, request_validation_handler)
    app.add_api_route("/metrics", metrics_endpoint, methods=["GET"], include_in_schema=False)
    install_v2_infer(app, dataplane)


def install_v2_infer(app: FastAPI, dataplane: FraudDataPlane) -> None:
    """This server's V2 infer routes, in place of KServe's (tests/test_v2_route.py pins
    that they answer as KServe's own handler does)."""
    infer = v2_infer_endpoint(dataplane)
    app.add_api_route(
        "/v2/models/{model_name}/infer", infer, methods=["POST"], response_model=None, tags=["V2"]
    )
    app.add_api_route(
        "/v2/models/{model_name}/versions/{model_version}/infer",
        v2_versioned_infer_endpoint(dataplane, infer),
        methods=["POST"],
        response_model=None,
        tags=["V2"],
    )


def prepare_serving_process(dataplane: FraudDataPlane) -> None:
    """Everything a process that answers HTTP needs: edges, and models loading themselves."""
    configure_logging(dataplane.settings.log_format)
    quiet_kserve_logging(dataplane.settings.access_log)
    # KServe's V1 endpoints use ORJSONResponse, which FastAPI warns about on every request.
    warnings.filterwarnings("ignore", category=FastAPIDeprecationWarning)
    install_http_edges(kserve_model_server.app, dataplane)
    for model in dataplane.model_registry.get_models().values():
        if isinstance(model, FraudModel):
            model.start_watching()


class FraudModelServer(ModelServer):
    """KServe's ModelServer with this server's gRPC server in place of KServe's own, and
    `--event-loop` honoured in a single process too."""

    def __init__(self, settings: Settings, **server_args: Any):
        super().__init__(**server_args)
        self.settings = settings
        self.serves_grpc = self.enable_grpc
        self.enable_grpc = False  # KServe's start() must not build its own gRPC server

    def start(self, models: list[Any]) -> None:
        if self.workers == 1:
            logger.info("event loop: %s", use_event_loop(self.event_loop))
        super().start(models)

    async def _serve(self) -> None:
        for rest_server in self._rest_servers():
            rest_server._add_middlewares = functools.partial(add_middlewares, rest_server)
        if self.serves_grpc:
            self._grpc_server = FraudGRPCServer(
                self.grpc_port,
                self.dataplane,
                self.model_repository_extension,
                self.settings,
                self.grace_period,
            )
            self.servers.append(self._grpc_server.start(self.max_threads))
        await super()._serve()

    def _rest_servers(self) -> list[RESTServer]:
        """The RESTServer `start()` made: KServe's own or, with `--workers`, its template."""
        if self._rest_multiprocess_server is not None:
            return [self._rest_multiprocess_server._rest_server]
        return [self._rest_server] if self._rest_server is not None else []


def add_middlewares(rest_server: RESTServer, app: FastAPI) -> None:
    """KServe's middlewares minus timing_asgi's TimingMiddleware: it matches every request
    against all routes to name a timing that KServe only writes to its trace log, which
    this server drops (predictor.logs.DropTimings)."""
    RESTServer._add_middlewares(rest_server, app)
    app.user_middleware = [m for m in app.user_middleware if m.cls is not TimingMiddleware]


def use_event_loop(choice: str) -> str:
    """The event loop of a single process: uvloop when `--event-loop uvloop` asks for it,
    else asyncio's (for `auto` too).

    KServe passes the flag to uvicorn, which applies it only where it runs the loop itself
    (the `--workers` processes: `auto` is uvloop there); a single process runs KServe's
    `asyncio.run` on asyncio's loop whatever the flag says. Measured here at 8 concurrent
    clients, uvloop gives 5-10 % more throughput but a p95 1.5-2x its p50 (asyncio's:
    1.1x), so `auto` stays asyncio and uvloop is a choice.
    """
    if choice != "uvloop":
        return "asyncio"
    import uvloop  # comes with KServe (uvicorn[standard])

    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    # KServe's start() asks for the current loop (to set its exception handler) before its
    # asyncio.run(), as asyncio's default policy would create one there; uvloop's does not.
    asyncio.set_event_loop(asyncio.new_event_loop())
    return "uvloop"


def build_server(model: FraudModel, settings: Settings, **server_args: Any) -> ModelServer:
    """A ModelServer (flags as parsed by KServe) serving `model`, loaded in the background.

    The model is registered before it is ready, so liveness answers at once and readiness
    and predict answer 503 until the first version is loaded.
    """
    server = FraudModelServer(settings, **server_args)
    server.dataplane = FraudDataPlane(server.registered_models, settings, server.workers)
    model.enable_latency_logging = server.enable_latency_logging
    server.register_model(model)
    if server.workers == 1:
        prepare_serving_process(server.dataplane)
        return server
    if server.serves_grpc:
        # gRPC is served by this parent process: it loads and follows the model too, but
        # its readiness is not a worker's (the workers' markers count for REST readiness).
        configure_logging(settings.log_format)
        quiet_kserve_logging(settings.access_log)
        model.start_watching(marks_ready=False)
    return server
