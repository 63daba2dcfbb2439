"""The V2 binary tensor extension, checked before KServe decodes it.

A binary request is a JSON header of `inference-header-content-length` bytes followed by
the tensors' raw bytes, each input declaring its `binary_data_size`. KServe decodes it
element by element before anything looks at its size and fails with ValueError, KeyError
or struct.error on malformed parts; here every declared size, shape and datatype is
checked against the body and the row limit first, so a bad request is a 400 naming the
part, and only a well-formed one of bounded size reaches the decoder.
"""

from __future__ import annotations

import struct
from typing import Any

import orjson
from kserve.errors import InvalidInput

from predictor.schema import shown

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


def check_binary_request(
    body: bytes, json_length_header: str, expected: dict[str, str], max_rows: int
) -> None:
    """Raise InvalidInput unless `body` is a well-formed binary request for `expected`
    tensors (name -> datatype), each of shape [n] with n <= max_rows."""
    try:
        json_length = int(json_length_header)
    except ValueError:
        raise InvalidInput(
            f"inference-header-content-length: must be an integer, got {shown(json_length_header)}"
        ) from None
    if not 0 < json_length <= len(body):
        raise InvalidInput(
            f"inference-header-content-length: {json_length} is not within the body's "
            f"{len(body)} bytes"
        )
    try:
        header = orjson.loads(body[:json_length])
    except orjson.JSONDecodeError as error:
        raise InvalidInput(f"binary request: the JSON part is not valid JSON ({error})") from None
    if not isinstance(header, dict):
        raise InvalidInput("binary request: the JSON part must be an object with 'inputs'")
    inputs = header.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise InvalidInput("binary request: inputs: must be a non-empty list of tensors")
    if len(inputs) > len(expected):
        raise InvalidInput(
            f"binary request: inputs: {len(inputs)} tensors; expected the {len(expected)} "
            f"{list(expected)}"
        )
    offset = json_length
    for index, tensor in enumerate(inputs):
        offset += _check_tensor(body, offset, index, tensor, expected, max_rows)
    if offset != len(body):
        raise InvalidInput(
            f"binary request: the tensors declare {offset - json_length} bytes of binary data; "
            f"the body carries {len(body) - json_length} after the JSON part"
        )


def _check_tensor(
    body: bytes,
    offset: int,
    index: int,
    tensor: Any,
    expected: dict[str, str],
    max_rows: int,
) -> int:
    """Check one input and return how many binary bytes it declares (0 for JSON data)."""
    where = f"binary request: inputs[{index}]"
    if not isinstance(tensor, dict):
        raise InvalidInput(f"{where}: must be an object with name, datatype and shape")
    name = tensor.get("name")
    if name not in expected:
        raise InvalidInput(f"{where}: unknown tensor {shown(name)}; expected {list(expected)}")
    where = f"binary request: input {name!r}"
    datatype = tensor.get("datatype")
    if datatype != expected[name]:
        raise InvalidInput(f"{where}: datatype must be {expected[name]}, got {shown(datatype)}")
    shape = tensor.get("shape")
    if (
        not isinstance(shape, list)
        or len(shape) != 1
        or not isinstance(shape[0], int)
        or isinstance(shape[0], bool)
        or shape[0] < 0
    ):
        raise InvalidInput(f"{where}: shape must be [n], got {shown(shape)}")
    rows = shape[0]
    if rows > max_rows:
        raise InvalidInput(f"{where}: {rows} rows exceed the limit of {max_rows} (MAX_BATCH_ROWS)")
    parameters = tensor.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise InvalidInput(f"{where}: parameters must be an object")
    if "binary_data_size" not in parameters:
        if "data" not in tensor:
            raise InvalidInput(f"{where}: needs data or parameters.binary_data_size")
        return 0
    size = parameters["binary_data_size"]
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise InvalidInput(f"{where}: binary_data_size must be a byte count, got {shown(size)}")
    if offset + size > len(body):
        raise InvalidInput(
            f"{where}: binary_data_size {size} runs past the end of the body "
            f"({len(body) - offset} bytes left)"
        )
    if datatype == "BYTES":
        _check_length_prefixes(body, offset, size, rows, where)
    elif size != rows * ELEMENT_BYTES[datatype]:
        raise InvalidInput(
            f"{where}: shape {shape} of {datatype} needs {rows * ELEMENT_BYTES[datatype]} bytes, "
            f"binary_data_size is {size}"
        )
    return size


def _check_length_prefixes(body: bytes, offset: int, size: int, rows: int, where: str) -> None:
    """BYTES data is `rows` elements, each a 4-byte little-endian length and that many bytes
    of UTF-8 text (every BYTES field here is text)."""
    end = offset + size
    position = offset
    for element in range(rows):
        if position + 4 > end:
            raise InvalidInput(f"{where}: element {element} has no complete length prefix")
        (length,) = _LENGTH_PREFIX.unpack_from(body, position)
        position += 4 + length
        if position > end:
            raise InvalidInput(f"{where}: element {element} runs past binary_data_size")
        try:
            body[position - length : position].decode("utf-8")
        except UnicodeDecodeError:
            raise InvalidInput(f"{where}: element {element} is not UTF-8 text") from None
    if position != end:
        raise InvalidInput(f"{where}: {end - position} bytes left over after {rows} BYTES elements")
