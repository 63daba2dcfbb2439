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
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from itertools import islice
from typing import Any

import numpy as np
import orjson
from kserve.errors import InvalidInput
from kserve.protocol.infer_type import InferInput, InferOutput, InferRequest, InferResponse

from predictor import seam
from predictor.schema import (
    FIELD_ORDER,
    Columns,
    InvalidTransactions,
    instance_location,
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


def _check_rows(count: int, where: str, max_rows: int) -> None:
    if count == 0:
        raise InvalidInput(f"{where}: must hold at least one transaction")
    if count > max_rows:
        raise InvalidInput(f"{where}: {count} rows exceed the limit of {max_rows} (MAX_BATCH_ROWS)")


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
    _check_rows(len(instances), "instances", max_rows)
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
    unknown = sorted(set(names) - set(V2_ACCEPTED_INPUTS), key=str)
    if unknown:
        raise InvalidInput(
            f"inputs: unknown tensor(s) {shown_list(unknown)}; expected {list(V2_INPUTS)}"
            f" and optionally {list(V2_OPTIONAL_INPUTS)}"
        )
    if repeated := duplicates(names):
        raise InvalidInput(f"inputs: duplicate tensor(s) {repeated}")
    missing = [name for name in V2_INPUTS if name not in names]
    if missing:
        raise InvalidInput(f"inputs: missing tensor(s) {missing}")
    columns: dict[str, Sequence[Any]] = {}
    length: int | None = None
    for tensor in inputs:
        expected = V2_ACCEPTED_INPUTS[tensor.name]
        if tensor.datatype != expected:
            raise InvalidInput(
                f"input {tensor.name!r}: datatype must be {expected}, got {shown(tensor.datatype)}"
            )
        shape = list(tensor.shape or [])
        if len(shape) != 1 or not isinstance(shape[0], int) or shape[0] < 0:
            raise InvalidInput(f"input {tensor.name!r}: shape must be [n], got {shown(shape)}")
        if shape[0] > max_rows:  # refuse before decoding any data
            _check_rows(shape[0], f"input {tensor.name!r}", max_rows)
        values = _tensor_values(tensor, shape)
        if len(values) != shape[0]:
            raise InvalidInput(
                f"input {tensor.name!r}: shape {shape} but {len(values)} data elements"
            )
        if length is None:
            length = shape[0]
        elif shape[0] != length:
            raise InvalidInput(
                f"inputs: all tensors need the same length; {tensor.name!r} has {shape[0]}, "
                f"{inputs[0].name!r} has {length}"
            )
        columns[tensor.name] = values
    _check_rows(length or 0, "inputs", max_rows)
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
    rows = len(probabilities)
    return InferResponse(
        response_id=request.id or str(uuid.uuid4()),
        model_name=model_name,
        model_version=version,
        # gRPC requests with raw inputs get raw outputs, as Triton answers (tritonclient's
        # as_numpy reads only those); REST, when `binary_data_output` asks for them.
        use_binary_outputs=request.use_binary_outputs,
        infer_outputs=[
            InferOutput("fraud_probability", [rows], "FP64", probabilities.tolist()),
            InferOutput("is_fraud", [rows], "BOOL", decisions.tolist()),
            InferOutput(TRANSACTION_ID, [rows], "BYTES", ids),
        ],
    )
