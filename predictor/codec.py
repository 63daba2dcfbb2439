"""KServe V1 and V2 (Open Inference Protocol) payloads <-> validated transactions.

Everything a client can get wrong is checked here, before the model sees a row: body
shape, V2 tensor names, datatypes, shapes and lengths, and (through the shared pydantic
model) every field rule. KServe's own `as_dataframe()` is not used because it ignores
datatypes and NaN-pads tensors of unequal length.
"""

from __future__ import annotations

import os
import struct
import uuid
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import islice
from typing import Any

import numpy as np
import orjson
from cloudevents.exceptions import GenericException as CloudEventError
from kserve.errors import InvalidInput
from kserve.protocol.infer_type import (
    InferInput,
    InferOutput,
    InferRequest,
    InferResponse,
    RequestedOutput,
)

from predictor import seam
from predictor.schema import (
    FIELD_ORDER,
    Columns,
    InvalidTransactions,
    instance_location,
    one_line,
    shown,
    shown_list,
    validate_columns,
    validate_rows,
    validate_transaction_ids,
)

#: V2 input tensors: one per transaction field, shape [n].
V2_INPUTS: dict[str, str] = {
    "amount": "FP64",
    "timestamp": "BYTES",
    "merchant_category": "BYTES",
    "card_present": "BOOL",
    "distance_from_home_km": "FP64",
    "transactions_last_24h": "INT64",
    "customer_age": "INT64",
    "account_age_days": "INT64",
}
#: The client's transaction id, optional on every door (not a model feature).
TRANSACTION_ID = "transaction_id"
#: Optional V2 inputs: a request may leave them out.
V2_OPTIONAL_INPUTS: dict[str, str] = {TRANSACTION_ID: "BYTES"}
#: Every V2 input a request may carry: the one table the JSON, binary and gRPC checks use.
V2_ACCEPTED_INPUTS: dict[str, str] = {**V2_INPUTS, **V2_OPTIONAL_INPUTS}
V2_OUTPUTS: dict[str, str] = {
    "fraud_probability": "FP64",
    "is_fraud": "BOOL",
    TRANSACTION_ID: "BYTES",
}
assert tuple(V2_INPUTS) == FIELD_ORDER
_FIELDS = frozenset(FIELD_ORDER)


def v2_request_body(
    transactions: Sequence[Mapping[str, Any]], request_id: str | None = None
) -> dict[str, Any]:
    """The V2 JSON body a client sends for `transactions`: one tensor per field, shape [n]
    (what decode_v2 reads; the benchmark, the load test and the tests build it here)."""
    body: dict[str, Any] = {
        "inputs": [
            {
                "name": name,
                "datatype": datatype,
                "shape": [len(transactions)],
                "data": [transaction[name] for transaction in transactions],
            }
            for name, datatype in V2_INPUTS.items()
        ]
    }
    if request_id is not None:
        body["id"] = request_id
    return body


def tensor_metadata(tensors: dict[str, str]) -> list[dict[str, Any]]:
    """V2 metadata entries; -1 marks the batch dimension."""
    return [{"name": name, "datatype": dtype, "shape": [-1]} for name, dtype in tensors.items()]


# ------------------------------------------------------------------------------ rules
# One function per rule, used by every door: V1 and V2 JSON, the binary extension
# (predictor.binary_extension, before KServe decodes it) and gRPC (predictor.grpc_server).

#: Bytes per element of the fixed-size datatypes a client may send (BYTES is length-prefixed).
ELEMENT_BYTES = {
    "BOOL": 1,
    "INT8": 1,
    "UINT8": 1,
    "INT16": 2,
    "UINT16": 2,
    "FP16": 2,
    "INT32": 4,
    "UINT32": 4,
    "FP32": 4,
    "INT64": 8,
    "UINT64": 8,
    "FP64": 8,
}
_LENGTH_PREFIX = struct.Struct("<I")


def rows_exceed(
    rows: int, limit: int, setting: str = "MAX_BATCH_ROWS", name: str = "the limit"
) -> str:
    """The one wording of a batch over a row limit: `12 rows exceed the limit of 10
    (MAX_BATCH_ROWS)`."""
    return f"{rows} rows exceed {name} of {limit} ({setting})"


def check_row_limit(rows: int, where: str, max_rows: int) -> None:
    """At most `max_rows` rows (checked on a declared shape before any data is decoded)."""
    if rows > max_rows:
        raise InvalidInput(f"{where}: {rows_exceed(rows, max_rows)}")


def check_rows(count: int, where: str, max_rows: int) -> None:
    """A batch holds between one and `max_rows` transactions."""
    if count == 0:
        raise InvalidInput(f"{where}: must hold at least one transaction")
    check_row_limit(count, where, max_rows)


def check_tensor_count(count: int, where: str = "inputs") -> None:
    """No more tensors than the model takes (checked before anything looks at each one)."""
    if count > len(V2_ACCEPTED_INPUTS):
        raise InvalidInput(
            f"{where}: {count} tensors; expected the {len(V2_INPUTS)} {list(V2_INPUTS)} "
            f"and optionally {list(V2_OPTIONAL_INPUTS)}"
        )


def check_tensor_names(names: Sequence[Any], where: str = "inputs") -> None:
    """Every tensor is one the model takes, and none comes twice."""
    unknown = sorted(
        {name if isinstance(name, str) else repr(name) for name in names} - set(V2_ACCEPTED_INPUTS)
    )
    if unknown:
        raise InvalidInput(
            f"{where}: unknown tensor(s) {shown_list(unknown)}; expected {list(V2_INPUTS)}"
            f" and optionally {list(V2_OPTIONAL_INPUTS)}"
        )
    if repeated := duplicates(names):
        raise InvalidInput(f"{where}: duplicate tensor(s) {repeated}")


def check_tensor_datatype(name: str, datatype: Any, where: str) -> None:
    """A tensor's datatype is the one its metadata gives (for a name check_tensor_names
    accepted)."""
    expected = V2_ACCEPTED_INPUTS[name]
    if datatype != expected:
        raise InvalidInput(f"{where}: datatype must be {expected}, got {shown(datatype)}")


def check_tensor_shape(shape: Any, where: str) -> int:
    """A tensor's shape is [n] with n a count: n, the rows it declares."""
    if (
        not isinstance(shape, list)
        or len(shape) != 1
        or not isinstance(shape[0], int)
        or isinstance(shape[0], bool)
        or shape[0] < 0
    ):
        raise InvalidInput(f"{where}: shape must be [n], got {shown(shape)}")
    return shape[0]


def check_binary_size(rows: int, datatype: str, size: int, where: str) -> None:
    """Binary data of a fixed-size datatype holds exactly `rows` elements."""
    width = ELEMENT_BYTES.get(datatype)
    if width is not None and size != rows * width:
        raise InvalidInput(
            f"{where}: shape [{rows}] of {datatype} needs {rows * width} bytes of binary data, "
            f"got {size}"
        )


def check_length_prefixes(data: bytes, offset: int, size: int, rows: int, where: str) -> None:
    """BYTES binary data (`size` bytes of `data` from `offset`) is `rows` elements, each a
    4-byte little-endian length and that many bytes of UTF-8 text (every BYTES field here
    is text)."""
    end = offset + size
    position = offset
    for element in range(rows):
        if position + 4 > end:
            raise InvalidInput(f"{where}: element {element} has no complete length prefix")
        (length,) = _LENGTH_PREFIX.unpack_from(data, position)
        position += 4 + length
        if position > end:
            raise InvalidInput(f"{where}: element {element} runs past its binary data")
        try:
            data[position - length : position].decode("utf-8")
        except UnicodeDecodeError:
            raise InvalidInput(f"{where}: element {element} is not UTF-8 text") from None
    if position != end:
        raise InvalidInput(f"{where}: {end - position} bytes left over after {rows} BYTES elements")


def check_requested_outputs(outputs: Sequence[RequestedOutput] | None) -> None:
    """Requested outputs are outputs the model has, each once, and `binary_data` (where
    given) is true or false."""
    if not outputs:
        return
    names = [output.name for output in outputs]
    unknown = [name for name in names if name not in V2_OUTPUTS]
    if unknown:
        raise InvalidInput(
            f"outputs: unknown output(s) {shown_list(unknown)}; expected {list(V2_OUTPUTS)}"
        )
    if repeated := duplicates(names):
        raise InvalidInput(f"outputs: duplicate output(s) {repeated}")
    for output in outputs:
        binary = (output.parameters or {}).get("binary_data")
        if binary is not None and not isinstance(binary, bool):
            raise InvalidInput(
                f"outputs: {output.name!r}: parameters.binary_data must be true or false, "
                f"got {shown(binary)}"
            )


#: What KServe's and cloudevents' decoders raise on malformed input (never on this
#: server's bugs: no model is called while decoding).
DECODING_ERRORS = (
    ValueError,
    TypeError,
    KeyError,
    IndexError,
    AttributeError,
    struct.error,
    CloudEventError,
)


@contextmanager
def client_decoding() -> Iterator[None]:
    """Decoding a client's request: a decoder's failure on malformed input is a 400 /
    INVALID_ARGUMENT naming it."""
    try:
        yield
    except InvalidInput:
        raise
    except DECODING_ERRORS as error:
        raise InvalidInput(f"request could not be decoded: {one_line(error)}") from None


@dataclass(frozen=True)
class Decoded:
    """A validated batch, and its values as the client sent them (reason codes and the
    decision ledger quote them)."""

    columns: Columns
    #: V1: the instances, as mappings of the fields; V2: each field tensor's values.
    sent: Sequence[Mapping[str, Any]] | Mapping[str, Sequence[Any]]
    #: The client's transaction id of each row (None where it sent none); None when no row
    #: carried one.
    transaction_ids: list[str | None] | None = None

    def __len__(self) -> int:
        return len(self.columns[FIELD_ORDER[0]])

    def answered_ids(self) -> list[str]:
        """Each row's transaction id: the client's, or a new UUID where it sent none."""
        if self.transaction_ids is None:
            return new_ids(len(self))
        missing = self.transaction_ids.count(None)
        if not missing:
            return list(self.transaction_ids)
        made = iter(new_ids(missing))
        return [given if given is not None else next(made) for given in self.transaction_ids]

    def rows(self) -> list[Mapping[str, Any]]:
        """The transactions as sent, one mapping per row."""
        if not isinstance(self.sent, Mapping):
            return list(self.sent)
        values = zip(*(self.sent[name] for name in FIELD_ORDER), strict=True)
        return [dict(zip(FIELD_ORDER, row, strict=True)) for row in values]


def new_ids(count: int) -> list[str]:
    """`count` random (version 4) UUIDs as text: one read of the OS's randomness for all
    of them (uuid.uuid4() per row costs 10 ms for 10,000 rows)."""
    if count < 8:  # numpy's per-call overhead costs more than it saves here
        return [_uuid4_text(os.urandom(16).hex()) for _ in range(count)]
    raw = np.frombuffer(os.urandom(16 * count), dtype=np.uint8).reshape(count, 16).copy()
    raw[:, 6] = (raw[:, 6] & 0x0F) | 0x40  # version 4
    raw[:, 8] = (raw[:, 8] & 0x3F) | 0x80  # RFC 4122 variant
    ids = []
    for row in raw.tobytes().hex(" ", 16).split(" "):
        ids.append(f"{row[:8]}-{row[8:12]}-{row[12:16]}-{row[16:20]}-{row[20:]}")
    return ids


def _uuid4_text(hex32: str) -> str:
    """32 random hex digits as a version 4 UUID (uuid.uuid4() costs 3x as much)."""
    variant = "89ab"[int(hex32[16], 16) & 3]
    return f"{hex32[:8]}-{hex32[8:12]}-4{hex32[13:16]}-{variant}{hex32[17:20]}-{hex32[20:]}"


def decode_v1(body: Any, max_rows: int) -> Decoded:
    """``{"instances": [...]}`` with objects, or lists in FIELD_ORDER, -> transactions."""
    if isinstance(body, bytes | bytearray | str):
        # KServe leaves the body undecoded unless Content-Type is exactly a JSON type.
        try:
            body = orjson.loads(body)
        except orjson.JSONDecodeError as error:
            raise InvalidInput(f"request body is not valid JSON ({error})") from None
    if not isinstance(body, dict):
        raise InvalidInput('request body must be a JSON object like {"instances": [...]}')
    unknown = sorted(set(body) - {"instances"})
    if unknown:
        raise InvalidInput(
            f"unknown top-level key(s) {shown_list(unknown)}; expected only 'instances'"
        )
    if "instances" not in body:
        raise InvalidInput("instances: field required")
    instances = body["instances"]
    if not isinstance(instances, list):
        raise InvalidInput("instances: must be a list of transactions")
    check_rows(len(instances), "instances", max_rows)
    rows: list[Any] = []
    ids: list[Any] | None = None
    for index, instance in enumerate(instances):
        if isinstance(instance, dict) and TRANSACTION_ID in instance:
            if ids is None:
                ids = [None] * len(instances)
            instance = dict(instance)
            ids[index] = instance.pop(TRANSACTION_ID)
        if isinstance(instance, list):
            if len(instance) != len(FIELD_ORDER):
                raise InvalidInput(
                    f"instances[{index}]: a list row needs {len(FIELD_ORDER)} values in the "
                    f"order {', '.join(FIELD_ORDER)}; got {len(instance)}"
                )
            instance = dict(zip(FIELD_ORDER, instance, strict=True))
        elif not isinstance(instance, dict):
            raise InvalidInput(
                f"instances[{index}]: must be an object or a list of {len(FIELD_ORDER)} values"
            )
        elif len(instance) > len(FIELD_ORDER):
            _refuse_unknown_fields(instance, index)
        rows.append(instance)
    try:
        if ids is not None:
            ids = validate_transaction_ids(ids)
        columns = validate_rows(rows)
    except InvalidTransactions as error:
        raise InvalidInput(str(error)) from None
    return Decoded(columns, rows, ids)


def _refuse_unknown_fields(instance: dict[str, Any], index: int, limit: int = 5) -> None:
    """Name a few of a row's unknown fields without asking pydantic, which would build an
    error for each of them (a row with 200,000 unknown keys: 0.7 s holding the GIL)."""
    unknown = list(islice((key for key in instance if key not in _FIELDS), limit))
    count = len(instance) - sum(1 for name in FIELD_ORDER if name in instance)
    parts = [
        f"{instance_location((index, key))}: Extra inputs are not permitted" for key in unknown
    ]
    if count > len(unknown):
        parts.append(f"... and {count - len(unknown)} more")
    raise InvalidInput("; ".join(parts))


def duplicates(names: Sequence[str]) -> list[str]:
    """Names that occur more than once, sorted (one pass: 20,000 names take milliseconds)."""
    return sorted(name for name, count in Counter(names).items() if count > 1)


def _tensor_location(loc: tuple[int | str, ...]) -> str:
    """``input 'amount'[3]`` for pydantic's ``(3, "amount")``."""
    if len(loc) >= 2:
        return f"input {loc[1]!r}[{loc[0]}]"
    return f"row {loc[0]}" if loc else "inputs"


def decode_v2(request: InferRequest, max_rows: int) -> Decoded:
    """One tensor per field, datatype and shape [n] as in the metadata -> transactions."""
    inputs = request.inputs or []
    names = [tensor.name for tensor in inputs]
    check_tensor_names(names)
    missing = [name for name in V2_INPUTS if name not in names]
    if missing:
        raise InvalidInput(f"inputs: missing tensor(s) {missing}")
    check_requested_outputs(request.request_outputs)
    columns: dict[str, Sequence[Any]] = {}
    length: int | None = None
    for tensor in inputs:
        where = f"input {tensor.name!r}"
        check_tensor_datatype(tensor.name, tensor.datatype, where)
        shape = list(tensor.shape or [])
        rows = check_tensor_shape(shape, where)
        check_row_limit(rows, where, max_rows)  # before decoding any data
        values = _tensor_values(tensor, shape)
        if len(values) != rows:
            raise InvalidInput(f"{where}: shape {shape} but {len(values)} data elements")
        if length is None:
            length = rows
        elif rows != length:
            raise InvalidInput(
                f"inputs: all tensors need the same length; {tensor.name!r} has {rows}, "
                f"{inputs[0].name!r} has {length}"
            )
        columns[tensor.name] = values
    check_rows(length or 0, "inputs", max_rows)
    ids = columns.pop(TRANSACTION_ID, None)
    try:
        if ids is not None:
            ids = validate_transaction_ids(ids, locate=_tensor_location)
        return Decoded(validate_columns(columns, locate=_tensor_location), columns, ids)
    except InvalidTransactions as error:
        raise InvalidInput(str(error)) from None


def _tensor_values(tensor: InferInput, shape: list[int]) -> list[Any]:
    """A tensor's elements as plain Python values, whether they came as JSON data, gRPC
    contents or binary (gRPC raw contents, the REST binary extension)."""
    name = tensor.name
    if seam.raw_tensor_data(tensor) is not None:
        try:
            values = tensor.as_numpy().reshape(-1).tolist()
        except (ValueError, TypeError, struct.error, InvalidInput) as error:
            raise InvalidInput(
                f"input {name!r}: binary data does not hold {shape} {tensor.datatype} values "
                f"({error})"
            ) from None
    elif isinstance(tensor.data, list):
        values = tensor.data
        if _holds(values, list):
            raise InvalidInput(f"input {name!r}: data must be flat for shape [n]")
    else:
        raise InvalidInput(f"input {name!r}: data must be a list")
    if tensor.datatype == "BYTES" and _holds(values, bytes):
        try:
            values = [v.decode("utf-8") if isinstance(v, bytes) else v for v in values]
        except UnicodeDecodeError:
            raise InvalidInput(f"input {name!r}: BYTES elements must be UTF-8 text") from None
    return values


def _holds(values: list[Any], kind: type) -> bool:
    """Whether any element is a `kind`: one pass in C over the elements' types (a
    generator of isinstance calls costs 4x as much, per tensor of every request)."""
    return any(issubclass(element_type, kind) for element_type in set(map(type, values)))


def encode_v1(
    probabilities: np.ndarray, decisions: np.ndarray, version: str, ids: list[str]
) -> dict[str, Any]:
    return {
        "predictions": [
            {"fraud_probability": p, "is_fraud": d, TRANSACTION_ID: i}
            for p, d, i in zip(probabilities.tolist(), decisions.tolist(), ids, strict=True)
        ],
        "model_version": version,
    }


def encode_v2(
    request: InferRequest,
    model_name: str,
    probabilities: np.ndarray,
    decisions: np.ndarray,
    version: str,
    ids: list[str],
) -> InferResponse:
    """The V2 answer: every output, or those the request lists in `outputs`, in its order
    (check_requested_outputs has refused unknown names). Over REST, each requested
    output's `parameters.binary_data` says whether it comes as binary data; where it is not
    given, the request's `binary_data_output` does."""
    rows = len(probabilities)
    data = {
        "fraud_probability": probabilities.tolist,
        "is_fraud": decisions.tolist,
        TRANSACTION_ID: lambda: ids,
    }
    requested = request.request_outputs or []
    names = [output.name for output in requested] or list(V2_OUTPUTS)
    binary = request.use_binary_outputs
    return InferResponse(
        response_id=request.id or str(uuid.uuid4()),
        model_name=model_name,
        model_version=version,
        # gRPC requests with raw inputs get raw outputs, as Triton answers (tritonclient's
        # as_numpy reads only those); REST, when `binary_data_output` asks for them.
        use_binary_outputs=binary,
        infer_outputs=[InferOutput(name, [rows], V2_OUTPUTS[name], data[name]()) for name in names],
        # KServe's REST encoding reads binary_data from each requested output (absent:
        # not binary, whatever binary_data_output says): given here for every one.
        requested_outputs=[
            RequestedOutput(
                output.name,
                {**(output.parameters or {}), "binary_data": _binary_data(output, binary)},
            )
            for output in requested
        ]
        or None,
    )


def _binary_data(output: RequestedOutput, default: bool) -> bool:
    given = (output.parameters or {}).get("binary_data")
    return default if given is None else given
