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
import logging
import warnings
from typing import Any

import orjson
from fastapi import FastAPI, Request, Response
from fastapi.exceptions import FastAPIDeprecationWarning, RequestValidationError
from fastapi.responses import JSONResponse
from kserve.constants.constants import INFERENCE_CONTENT_LENGTH_HEADER, PredictorProtocol
from kserve.errors import InvalidInput, ModelNotFound, ModelNotReady, ServerNotReady
from kserve.model import BaseKServeModel, InferenceVerb
from kserve.model_repository import ModelRepository
from kserve.protocol.dataplane import DataPlane
from kserve.protocol.infer_type import InferRequest
from kserve.protocol.rest.server import RESTServer
from kserve.protocol.rest.v2_datamodels import InferenceRequest
from pydantic import ValidationError
from starlette.requests import ClientDisconnect
from timing_asgi import TimingMiddleware

from predictor import codec, metrics, offload, runtime, seam
from predictor.auth import TokenStore
from predictor.binary_extension import check_binary_request
from predictor.edges import (
    CLIENT_CLOSED_REQUEST,
    Authentication,
    BodySizeLimit,
    RequestMetrics,
    SafeErrors,
)
from predictor.grpc_server import FraudGRPCServer
from predictor.logs import configure_logging, quiet_kserve_logging
from predictor.model import MODEL_VERSION_HEADER, FraudModel
from predictor.schema import describe_errors, shown
from predictor.settings import Settings
from predictor.text import error_body

logger = logging.getLogger("predictor.server")


async def metrics_endpoint(_: Request) -> Response:
    body, content_type = metrics.exposition()
    return Response(content=body, media_type=content_type)


async def client_disconnect_handler(_: Request, __: ClientDisconnect) -> Response:
    """A client that leaves mid-upload is not the server's error (499, logged at INFO)."""
    logger.info("client disconnected before its request was read")
    return Response(status_code=CLIENT_CLOSED_REQUEST)


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
    passed to KServe's decoder. Large bodies are decoded and answered in the thread pool.
    """

    async def infer(raw_request: Request, model_name: str) -> Response:
        def decode(body: bytes, headers: dict[str, str]) -> tuple[InferRequest, dict]:
            return dataplane.decode_v2(body, headers, model_name), {}

        return await answered(dataplane, raw_request, model_name, decode, dataplane.infer)

    return infer


def v1_endpoint(dataplane: FraudDataPlane, verb: str):
    """KServe's V1 `:predict` / `:explain` endpoint, with large bodies decoded (and their
    answers encoded) in the thread pool, as V2's are (KServe parses V1 JSON on the event
    loop), and response headers that are the server's own (KServe's `:explain` echoes every
    request header). tests/test_v1_route.py pins it against KServe's handler."""
    call = dataplane.explain if verb == "explain" else dataplane.infer

    async def handler(raw_request: Request, model_name: str) -> Response:
        return await answered(dataplane, raw_request, model_name, dataplane.decode, call)

    handler.__name__ = verb
    return handler


async def answered(dataplane: FraudDataPlane, raw_request: Request, model_name: str, decode, call):
    """What every inference route does: refuse until the model is ready, read the body,
    decode it, have the model answer, encode the answer; decoding and encoding of large
    bodies in the thread pool (predictor.offload)."""
    if not await dataplane.model_ready(model_name, True):
        raise ModelNotReady(model_name)
    body = await raw_request.body()
    headers = dict(raw_request.headers)
    small = offload.is_small(body_bytes=len(body))
    infer_request, attributes = await offload.run_sized(small, decode, body, headers)
    response, response_headers = await call(
        model_name=model_name, request=infer_request, headers=headers
    )
    return await offload.run_sized(
        small,
        encoded_response,
        dataplane,
        model_name,
        response,
        response_headers,
        headers,
        attributes,
    )


def encoded_response(
    dataplane: FraudDataPlane,
    model_name: str,
    response: Any,
    response_headers: dict[str, str],
    headers: dict[str, str],
    attributes: dict[str, Any],
) -> Response:
    """The HTTP response for a model's answer: KServe's encoding (V2 dict, binary
    extension, CloudEvents), written with orjson."""
    response, encode_headers = dataplane.encode(
        model_name=model_name, response=response, headers=headers, req_attributes=attributes
    )
    response_headers.update(encode_headers)
    response_headers.pop("content-length", None)
    media_type = response_headers.pop("content-type", "application/json")
    if isinstance(response, str):
        response = response.encode()
    content = response if isinstance(response, bytes) else orjson.dumps(response)
    return Response(content=content, headers=response_headers, media_type=media_type)


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
    if isinstance(inputs, list) and len(inputs) > len(codec.V2_ACCEPTED_INPUTS):
        codec.check_tensor_names([t.get("name") if isinstance(t, dict) else t for t in inputs])
    try:
        return InferenceRequest.model_validate(parsed)
    except ValidationError as error:
        raise InvalidInput(
            describe_errors(error.errors(include_url=False), body_location)
        ) from None


class FraudDataPlane(DataPlane):
    """KServe's data plane with truthful readiness (the only door: nothing loads inline),
    decoding failures as 400s, V2 bodies checked before decoding, and the served version
    in metadata."""

    def __init__(
        self,
        model_registry: ModelRepository,
        settings: Settings,
        workers: int,
        tokens: TokenStore | None = None,
    ):
        super().__init__(model_registry=model_registry)
        self.settings = settings
        self.workers = workers
        #: AUTH_TOKENS_FILE's tokens (None: every caller is trusted).
        self.tokens = tokens

    def decode_v2(self, body: bytes, headers: dict[str, str], model_name: str) -> InferRequest:
        """A V2 REST body (JSON or binary extension) as KServe's InferRequest, or 400."""
        json_length = headers.get(INFERENCE_CONTENT_LENGTH_HEADER)
        if json_length is not None:
            check_binary_request(body, json_length, self.settings.max_batch_rows)
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
        with codec.client_decoding():
            return super().decode(body, headers, *args, **kwargs)

    def __setstate__(self, state: dict[str, Any]) -> None:
        """Unpickled in a spawned KServe worker process: make this process ready to serve."""
        self.__dict__.update(state)
        prepare_serving_process(self)

    async def get_model(self, name: str) -> BaseKServeModel:
        """The model, only if it is ready. KServe's own calls `model.load()` inline when it is
        not, on the request's event loop (gRPC inference reaches it): here only the
        background watcher loads, and requests get 503 / UNAVAILABLE until it has."""
        model = self.model_registry.get_model(name)
        if model is None:
            raise ModelNotFound(name)
        if not await self.model_registry.is_model_ready(name):
            raise ModelNotReady(name)
        return model

    async def ready(self) -> bool:
        return self.is_ready()

    def is_ready(self) -> bool:
        """Server readiness per the V2 spec: every model is ready, in every worker."""
        models = self.model_registry.get_models().values()
        if not models or not all(model.ready for model in models):
            return False
        return self.workers == 1 or runtime.ready_workers() >= self.workers

    def readiness_probe(self) -> tuple[int, bytes]:
        """`/v2/health/ready` as KServe's handler answers it (see seam.answer_probes)."""
        if self.is_ready():
            return 200, b'{"ready":true}'
        return 503, error_body(str(ServerNotReady()))

    def metadata(self) -> dict[str, Any]:
        """Server metadata: the binary tensor extension is served; the model repository
        extension is not (what is served follows the registry alias, never a client)."""
        return {**super().metadata(), "extensions": ["binary_tensor_data"]}

    async def explain(
        self, model_name: str, request: Any, headers: dict[str, str] | None = None
    ) -> tuple[Any, dict[str, str]]:
        """KServe's explain, without answering with the request's headers as its own."""
        model = await self.get_model(model_name)
        return await model(request, verb=InferenceVerb.EXPLAIN, headers=headers)

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
    Middleware, outermost first: RequestMetrics, Authentication, SafeErrors, BodySizeLimit
    (see predictor.edges).
    """
    app.add_middleware(BodySizeLimit, max_bytes=dataplane.settings.max_request_bytes)
    app.add_middleware(SafeErrors)
    app.add_middleware(Authentication, tokens=dataplane.tokens)
    app.add_middleware(RequestMetrics)
    app.add_exception_handler(RequestValidationError, request_validation_handler)
    app.add_exception_handler(ClientDisconnect, client_disconnect_handler)
    app.add_api_route("/metrics", metrics_endpoint, methods=["GET"], include_in_schema=False)
    seam.no_slash_redirects(app)
    install_v1_routes(app, dataplane)
    install_v2_infer(app, dataplane)
    install_v2_versioned(app, dataplane)
    for path in REPOSITORY_PATHS:
        app.add_api_route(
            path, repository_refused, methods=["GET", "POST"], include_in_schema=False
        )


#: KServe's model repository extension (load, unload), refused: see repository_refused.
REPOSITORY_PATHS = (
    "/v2/repository/index",
    "/v2/repository/models/{model_name}/load",
    "/v2/repository/models/{model_name}/unload",
)


async def repository_refused(_: Request) -> JSONResponse:
    """No client loads or unloads a model: the served version follows MODEL_URI."""
    return JSONResponse(
        status_code=404,
        content={
            "error": "the model repository extension is not served: the served version "
            "follows MODEL_URI in the registry (move the alias to change it)"
        },
    )


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


def install_v2_versioned(app: FastAPI, dataplane: FraudDataPlane) -> None:
    """Versioned model metadata and readiness: the plain routes' answers for the version
    served, 404 for any other (KServe's answer 501 to every version)."""

    def served(model_name: str, model_version: str) -> None:
        serving = getattr(dataplane.get_model_from_registry(model_name), "serving", None)
        if serving is None or serving.version != model_version:
            raise ModelNotFound(f"{model_name} version {shown(model_version)}")

    async def versioned_metadata(model_name: str, model_version: str) -> Response:
        served(model_name, model_version)
        return Response(
            orjson.dumps(await dataplane.model_metadata(model_name)),
            200,
            media_type="application/json",
        )

    async def versioned_ready(model_name: str, model_version: str) -> Response:
        served(model_name, model_version)
        if not await dataplane.model_ready(model_name):
            raise ModelNotReady(model_name)
        return Response(
            orjson.dumps({"name": model_name, "ready": True}), 200, media_type="application/json"
        )

    base = "/v2/models/{model_name}/versions/{model_version}"
    app.add_api_route(base, versioned_metadata, methods=["GET"], response_model=None, tags=["V2"])
    app.add_api_route(
        f"{base}/ready", versioned_ready, methods=["GET"], response_model=None, tags=["V2"]
    )


def install_v1_routes(app: FastAPI, dataplane: FraudDataPlane) -> None:
    """This server's V1 `:predict` and `:explain`, in place of KServe's; any other method
    on them is 405 (KServe's `GET /v1/models/{name}` would take `<name>:predict` for a
    model's name)."""
    for verb in ("predict", "explain"):
        path = f"/v1/models/{{model_name}}:{verb}"
        app.add_api_route(
            path, v1_endpoint(dataplane, verb), methods=["POST"], response_model=None, tags=["V1"]
        )
        app.add_api_route(path, verb_needs_post(verb), methods=NOT_POST, include_in_schema=False)


#: Methods a V1 verb refuses with 405.
NOT_POST = ["GET", "HEAD", "PUT", "PATCH", "DELETE", "OPTIONS"]


def verb_needs_post(verb: str):
    """405 naming the route, not a model: `:predict` and `:explain` take POST only."""

    async def refuse(request: Request) -> JSONResponse:
        return JSONResponse(
            status_code=405,
            content={"error": f"{request.method} is not allowed on :{verb}: use POST"},
            headers={"allow": "POST"},
        )

    refuse.__name__ = f"{verb}_needs_post"
    return refuse


def live_probe() -> tuple[int, bytes]:
    """`/v2/health/live` as KServe's handler answers it: the event loop took the call."""
    return 200, b'{"live":true}'


def prepare_serving_process(dataplane: FraudDataPlane) -> None:
    """Everything a process that answers HTTP needs: edges, and models loading themselves."""
    configure_logging(dataplane.settings.log_format)
    models = dataplane.model_registry.get_models().values()
    quiet_kserve_logging(
        dataplane.settings.access_log,
        any(getattr(model, "enable_latency_logging", False) for model in models),
    )
    runtime.tune_gc()  # a `--workers` process too
    # KServe's V1 endpoints use ORJSONResponse, which FastAPI warns about on every request.
    warnings.filterwarnings("ignore", category=FastAPIDeprecationWarning)
    seam.bound_request_heads(dataplane.settings.max_header_bytes)
    seam.answer_probes(
        {"/v2/health/live": live_probe, "/v2/health/ready": dataplane.readiness_probe}
    )
    app = seam.kserve_app()
    install_http_edges(app, dataplane)
    if dataplane.tokens is not None:
        dataplane.tokens.start()
    for model in dataplane.model_registry.get_models().values():
        if isinstance(model, FraudModel):
            model.start_watching()
            # After the server's last answer (uvicorn drains requests, then the app's
            # lifespan ends): every recorded decision is written before the process exits.
            seam.on_shutdown(app, model.close_ledger)


class FraudModelServer(seam.HookedModelServer):
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

    def prepare_servers(self) -> None:
        for rest_server in self.rest_servers():
            seam.replace_kserve_middlewares(rest_server, add_middlewares)
            seam.configure_rest_server(rest_server, self.settings.bind_address)
        if self.serves_grpc:
            grpc_server = FraudGRPCServer(
                self.grpc_port,
                self.dataplane,
                self.settings,
                self.grace_period,
                self.dataplane.tokens,
            )
            self.serve_alongside(grpc_server, self.max_threads)


def add_middlewares(rest_server: RESTServer, app: FastAPI) -> None:
    """KServe's middlewares minus timing_asgi's TimingMiddleware: it matches every request
    against all routes to name a timing that KServe only writes to its trace log, which
    this server drops (predictor.logs.DropTimings)."""
    seam.add_kserve_middlewares(rest_server, app)
    seam.drop_middleware(app, TimingMiddleware)


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


def build_server(
    model: FraudModel, settings: Settings, tokens: TokenStore | None = None, **server_args: Any
) -> FraudModelServer:
    """A ModelServer (flags as parsed by KServe) serving `model`, loaded in the background.

    The model is registered before it is ready, so liveness answers at once and readiness
    and predict answer 503 until the first version is loaded.
    """
    server = FraudModelServer(settings, **server_args)
    server.dataplane = FraudDataPlane(server.registered_models, settings, server.workers, tokens)
    model.enable_latency_logging = server.enable_latency_logging
    server.register_model(model)
    if server.workers == 1:
        prepare_serving_process(server.dataplane)
        return server
    if server.serves_grpc:
        # gRPC is served by this parent process: it loads and follows the model too, but
        # its readiness is not a worker's (the workers' markers count for REST readiness).
        configure_logging(settings.log_format)
        quiet_kserve_logging(settings.access_log, model.enable_latency_logging)
        if tokens is not None:
            tokens.start()
        model.start_watching(marks_ready=False)
    return server
