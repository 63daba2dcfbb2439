"""KServe's V2 gRPC server with the edges the REST side has.

* requests over MAX_REQUEST_BYTES get RESOURCE_EXHAUSTED (KServe's limit is a fixed 8 MiB);
* ModelInfer checks tensor shapes against MAX_BATCH_ROWS and raw contents against their
  declared sizes before decoding, decodes large requests in the thread pool, and turns
  decoding failures (a truncated BYTES element, ...) into INVALID_ARGUMENT;
* every call that ends with an error is counted in `fraud_request_errors{protocol="grpc"}`
  by status code, and a client's mistake is one WARNING line, not a traceback.
"""

from __future__ import annotations

import logging
import time
from concurrent import futures

import grpc
from grpc import StatusCode, aio
from grpc_interceptor.exceptions import GrpcException, ResourceExhausted
from kserve.errors import (
    InferenceError,
    InvalidInput,
    ModelNotFound,
    ModelNotReady,
    ServerNotLive,
    ServerNotReady,
    UnsupportedProtocol,
)
from kserve.protocol.grpc import grpc_predict_v2_pb2 as pb
from kserve.protocol.grpc import grpc_predict_v2_pb2_grpc
from kserve.protocol.grpc.interceptors import ExceptionToStatusInterceptor
from kserve.protocol.grpc.servicer import InferenceServicer
from kserve.protocol.infer_type import InferRequest
from kserve.utils.utils import to_headers

from predictor import codec, metrics, offload
from predictor.auth import Access, Denied, TokenStore, grpc_access
from predictor.schema import shown
from predictor.text import error_text, escaped

logger = logging.getLogger("predictor.grpc")

#: KServe's exceptions -> gRPC status codes. A model that fails is the server's fault
#: (INTERNAL), where KServe's own interceptor answers INVALID_ARGUMENT.
STATUS_OF = (
    ((InvalidInput, UnsupportedProtocol), StatusCode.INVALID_ARGUMENT),
    ((ModelNotReady, ServerNotReady, ServerNotLive), StatusCode.UNAVAILABLE),
    ((ModelNotFound,), StatusCode.NOT_FOUND),
    ((NotImplementedError,), StatusCode.UNIMPLEMENTED),
    ((InferenceError,), StatusCode.INTERNAL),
)
CLIENT_SIDE = {
    StatusCode.INVALID_ARGUMENT,
    StatusCode.NOT_FOUND,
    StatusCode.UNAVAILABLE,
    StatusCode.UNAUTHENTICATED,
    StatusCode.PERMISSION_DENIED,
    StatusCode.UNIMPLEMENTED,
    StatusCode.RESOURCE_EXHAUSTED,
}
REPOSITORY_REFUSED = (
    "the model repository extension is not served: the served version follows MODEL_URI in "
    "the registry (move the alias to change it)"
)


def status_of(error: Exception) -> StatusCode:
    for kinds, code in STATUS_OF:
        if isinstance(error, kinds):
            return code
    return StatusCode.INTERNAL


class TokenInterceptor(aio.ServerInterceptor):
    """Check the caller's token (predictor.auth) before the request is even parsed: a
    refused call never has its message decoded (16 MiB messages from anonymous callers cost
    nothing but the bytes gRPC reads)."""

    def __init__(self, tokens: TokenStore):
        self.tokens = tokens

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        access = grpc_access(details.method)
        if handler is None or access is Access.OPEN:
            return handler
        values = [
            value for key, value in (details.invocation_metadata or ()) if key == "authorization"
        ]
        try:
            self.tokens.authorize(values, access)
        except Denied as denied:
            return refusing_handler(handler, details.method, denied)
        return handler


def refusing_handler(handler, method_name: str, denied: Denied):
    """A handler of `handler`'s kind that answers UNAUTHENTICATED / PERMISSION_DENIED
    without decoding the request, counted and logged like any refusal."""
    code = StatusCode.PERMISSION_DENIED if denied.status == 403 else StatusCode.UNAUTHENTICATED
    metrics.AUTH_DENIED.labels(reason=denied.reason).inc()
    metrics.REQUEST_ERRORS.labels(protocol="grpc", status=code.name).inc()
    logging.getLogger("predictor.auth").warning(
        "denied %s: %s%s",
        escaped(method_name, 200),
        denied,
        f" (token {escaped(denied.name, 100)})" if denied.name else "",
    )

    async def refuse(_request, context):
        await context.abort(code, str(denied))

    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(refuse, request_deserializer=_ignored)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(refuse, request_deserializer=_ignored)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(refuse, request_deserializer=_ignored)
    return grpc.unary_unary_rpc_method_handler(refuse, request_deserializer=_ignored)


def _ignored(_: bytes) -> None:
    return None


class CountingExceptionInterceptor(ExceptionToStatusInterceptor):
    """Map exceptions to status codes, count them, log a client's mistake in one line, and
    time ModelInfer calls (`fraud_request_duration_seconds{protocol="grpc"}`)."""

    async def intercept(self, method, request_or_iterator, context, method_name):
        if not method_name.endswith("/ModelInfer"):
            return await super().intercept(method, request_or_iterator, context, method_name)
        began = time.perf_counter()
        try:
            return await super().intercept(method, request_or_iterator, context, method_name)
        finally:
            metrics.REQUEST_SECONDS.labels(protocol="grpc").observe(time.perf_counter() - began)

    async def handle_exception(self, ex, request_or_iterator, context, method_name):
        if isinstance(ex, GrpcException):
            code, details = ex.status_code, ex.details
        else:
            code = status_of(ex)
            details = getattr(ex, "reason", None) or str(ex) or type(ex).__name__
            if code is StatusCode.INTERNAL and not isinstance(ex, InferenceError):
                details = "Internal server error"
        details = error_text(details)
        metrics.REQUEST_ERRORS.labels(protocol="grpc", status=code.name).inc()
        if code in CLIENT_SIDE:
            logger.warning("%s %s: %s", method_name, code.name, escaped(details, 300))
        else:
            logger.error("%s %s: %s", method_name, code.name, details, exc_info=ex)
        await context.abort(code, details)


class FraudInferenceServicer(InferenceServicer):
    """KServe's servicer; ModelInfer checks sizes before it decodes."""

    def __init__(self, data_plane, max_rows: int, max_bytes: int):
        super().__init__(data_plane, None)
        self.dataplane = data_plane  # our own reference: KServe's is private
        self.max_rows = max_rows
        self.max_bytes = max_bytes

    async def RepositoryIndex(self, request, context):
        raise GrpcException(status_code=StatusCode.UNIMPLEMENTED, details=REPOSITORY_REFUSED)

    async def RepositoryModelLoad(self, request, context):
        raise GrpcException(status_code=StatusCode.UNIMPLEMENTED, details=REPOSITORY_REFUSED)

    async def RepositoryModelUnload(self, request, context):
        raise GrpcException(status_code=StatusCode.UNIMPLEMENTED, details=REPOSITORY_REFUSED)

    async def ServerMetadata(self, request, context) -> pb.ServerMetadataResponse:
        metadata = self.dataplane.metadata()
        return pb.ServerMetadataResponse(
            name=metadata["name"], version=metadata["version"], extensions=metadata["extensions"]
        )

    async def ModelInfer(self, request: pb.ModelInferRequest, context) -> pb.ModelInferResponse:
        if (size := request.ByteSize()) > self.max_bytes:
            raise ResourceExhausted(
                f"request of {size} bytes exceeds {self.max_bytes} bytes (MAX_REQUEST_BYTES)"
            )
        headers = to_headers(context)
        self.validate_grpc_request(request)
        check_grpc_request(request, self.max_rows)
        self._check_version(request.model_name, request.model_version)
        rows = max((tensor.shape[0] for tensor in request.inputs if tensor.shape), default=0)
        small = offload.is_small(rows=rows, body_bytes=size)
        infer_request = await offload.run_sized(small, decode_grpc_request, request)
        response, _ = await self.dataplane.infer(
            request=infer_request, headers=headers, model_name=request.model_name
        )
        if request.model_version and response.model_version != request.model_version:
            # Reloaded between the check and the scoring: not the version asked for.
            raise ModelNotFound(f"{request.model_name} version {shown(request.model_version)}")
        return await offload.run_sized(small, response.to_grpc)

    def _check_version(self, model_name: str, version: str) -> None:
        """A version other than the one served is not found (as REST's versioned route)."""
        if not version:
            return
        model = self.dataplane.get_model_from_registry(model_name)
        serving = getattr(model, "serving", None)
        if serving is not None and serving.version != version:
            raise ModelNotFound(f"{model_name} version {shown(version)}")


def check_grpc_request(request: pb.ModelInferRequest, max_rows: int) -> None:
    """The tensors the model takes, shapes [n] with n <= max_rows, and raw contents of the
    size their shape implies: before anything is decoded."""
    codec.check_tensor_count(len(request.inputs))
    codec.check_tensor_names([tensor.name for tensor in request.inputs])
    for index, tensor in enumerate(request.inputs):
        where = f"input {tensor.name!r}"
        codec.check_tensor_datatype(tensor.name, tensor.datatype, where)
        rows = codec.check_tensor_shape(list(tensor.shape), where)
        codec.check_row_limit(rows, where, max_rows)
        if index < len(request.raw_input_contents):
            raw = request.raw_input_contents[index]
            if tensor.datatype == "BYTES":
                codec.check_length_prefixes(raw, 0, len(raw), rows, where)
            else:
                codec.check_binary_size(rows, tensor.datatype, len(raw), where)


def decode_grpc_request(request: pb.ModelInferRequest) -> InferRequest:
    """KServe's decoding, its failures on malformed contents turned into InvalidInput."""
    with codec.client_decoding():
        return InferRequest.from_grpc(request)


class FraudGRPCServer:
    """In place of KServe's GRPCServer (its `start` and `stop` forked, see seam.PINNED): this
    server's servicer, interceptors, limits and bind address."""

    def __init__(self, port: int, data_plane, settings, grace_period: int, tokens=None):
        self.port = port
        self.dataplane = data_plane
        self.settings = settings
        self.grace_period = grace_period
        self.tokens = tokens
        self.server: aio.Server | None = None

    async def start(self, max_workers: int) -> None:
        servicer = FraudInferenceServicer(
            self.dataplane,
            self.settings.max_batch_rows,
            self.settings.max_request_bytes,
        )
        self.server = aio.server(
            futures.ThreadPoolExecutor(max_workers=max_workers),
            interceptors=(
                *([TokenInterceptor(self.tokens)] if self.tokens is not None else []),
                CountingExceptionInterceptor(),
            ),
            options=[
                # Up to twice the limit reaches ModelInfer, which refuses (and counts) what
                # is over it; gRPC itself drops anything larger, uncounted.
                ("grpc.max_receive_message_length", 2 * self.settings.max_request_bytes),
                ("grpc.max_send_message_length", -1),
            ],
        )
        grpc_predict_v2_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, self.server)
        host = self.settings.bind_address
        address = f"[{host}]:{self.port}" if ":" in host else f"{host}:{self.port}"
        self.server.add_insecure_port(address)
        logger.info("gRPC server listening on %s", address)
        await self.server.start()
        await self.server.wait_for_termination()

    async def stop(self, sig: int | None = None) -> None:
        """Stop taking calls and let those in flight finish within the grace period."""
        if self.server is not None:
            await self.server.stop(grace=self.grace_period)
