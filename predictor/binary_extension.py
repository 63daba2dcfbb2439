"""The V2 binary tensor extension, checked before KServe decodes it.

A binary request is a JSON header of `inference-header-content-length` bytes followed by
the tensors' raw bytes, each input declaring its `binary_data_size`. KServe decodes it
element by element before anything looks at its size and fails with ValueError, KeyError
or struct.error on malformed parts; here every declared size, shape and datatype is
checked against the body and the row limit first, so a bad request is a 400 naming the
part, and only a well-formed one of bounded size reaches the decoder.
"""

from __future__ import annotations

from typing import Any

import orjson
from kserve.errors import InvalidInput

from predictor import codec
from predictor.schema import shown


def check_binary_request(body: bytes, json_length_header: str, max_rows: int) -> None:
    """Raise InvalidInput unless `body` is a well-formed binary request for the model's
    tensors (codec.V2_ACCEPTED_INPUTS), each of shape [n] with n <= max_rows."""
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
    codec.check_tensor_count(len(inputs), "binary request: inputs")
    for index, tensor in enumerate(inputs):
        if not isinstance(tensor, dict):
            raise InvalidInput(
                f"binary request: inputs[{index}]: must be an object with name, datatype and shape"
            )
    codec.check_tensor_names([tensor.get("name") for tensor in inputs], "binary request: inputs")
    offset = json_length
    for tensor in inputs:
        offset += _check_tensor(body, offset, tensor, max_rows)
    if offset != len(body):
        raise InvalidInput(
            f"binary request: the tensors declare {offset - json_length} bytes of binary data; "
            f"the body carries {len(body) - json_length} after the JSON part"
        )


def _check_tensor(body: bytes, offset: int, tensor: dict[str, Any], max_rows: int) -> int:
    """Check one input (its name known) and return how many binary bytes it declares (0
    for JSON data)."""
    name = tensor["name"]
    where = f"binary request: input {name!r}"
    datatype = tensor.get("datatype")
    codec.check_tensor_datatype(name, datatype, where)
    rows = codec.check_tensor_shape(tensor.get("shape"), where)
    codec.check_row_limit(rows, where, max_rows)
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
        codec.check_length_prefixes(body, offset, size, rows, where)
    else:
        codec.check_binary_size(rows, datatype, size, where)
    return size
