"""Open Inference Protocol (KServe v2) tensors: JSON and the binary tensor data extension, both ways.

Binary inputs are read straight from the HTTP body into an array over those bytes (np.frombuffer), so
tensor bytes never pass through JSON; BYTES tensors use the protocol's 4-byte little-endian length
prefix per element.
"""
from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson

from broker import jsonbody
from broker.casting import cast
from broker.errors import BadInput

DATATYPES = {
    "BOOL": np.dtype(np.bool_), "UINT8": np.dtype(np.uint8), "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32), "UINT64": np.dtype(np.uint64), "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16), "INT32": np.dtype(np.int32), "INT64": np.dtype(np.int64),
    "FP16": np.dtype(np.float16), "FP32": np.dtype(np.float32), "FP64": np.dtype(np.float64),
}
_BY_KIND = {dt: name for name, dt in DATATYPES.items()}
HEADER_LENGTH = "Inference-Header-Content-Length"


def datatype_of(dtype: np.dtype | str) -> str:
    """v2 datatype name of a numpy dtype (or of the worker's dtype name, e.g. 'float32', 'str')."""
    known = _BY_KIND.get(dtype) if isinstance(dtype, np.dtype) else None
    if known is not None:
        return known
    dtype = np.dtype(dtype) if dtype != "str" else np.dtype(np.str_)
    if dtype.kind in "USO":
        return "BYTES"
    return _BY_KIND.get(dtype, dtype.name.upper())


@dataclass
class InferRequest:
    id: Any
    inputs: dict[str, np.ndarray]
    outputs: list[str] | None          # None: every output
    binary: dict[str, bool]            # output name -> send as binary data
    binary_default: bool
    timeout: Any = None                # parameters.timeout as sent (µs; frontend/deadlines.py checks it)


def _decode_bytes_elements(raw: memoryview, count: int, name: str) -> np.ndarray:
    items, offset = [], 0
    for _ in range(count):
        if offset + 4 > len(raw):
            raise BadInput(f"input {name!r}: BYTES data ends inside an element's length")
        (length,) = struct.unpack_from("<I", raw, offset)
        offset += 4
        if offset + length > len(raw):
            raise BadInput(f"input {name!r}: BYTES element longer than the data")
        items.append(bytes(raw[offset:offset + length]).decode("utf-8", errors="replace"))
        offset += length
    if offset != len(raw):
        raise BadInput(f"input {name!r}: {len(raw) - offset} bytes left after {count} BYTES elements")
    return np.array(items, dtype=np.str_)


def _parameters(holder: dict, what: str) -> dict:
    parameters = holder.get("parameters")
    if parameters is not None and not isinstance(parameters, dict):
        raise BadInput(f"{what}: 'parameters' must be an object")
    return parameters or {}


def _shape(tensor: dict, name: str) -> tuple[int, ...]:
    shape = tensor.get("shape")
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):  # NOTE: no bools
        raise BadInput(f"input {name!r}: 'shape' must be a list of non-negative integers")
    return tuple(shape)


def _input(tensor: Any, binary: memoryview, offset: int) -> tuple[str, np.ndarray, int]:
    if not isinstance(tensor, dict) or not isinstance(tensor.get("name"), str):
        raise BadInput("each input needs a 'name', 'shape', 'datatype' and 'data'")
    name, datatype = tensor["name"], tensor.get("datatype")
    shape = _shape(tensor, name)
    count = math.prod(shape)
    if not isinstance(datatype, str) or (datatype != "BYTES" and datatype not in DATATYPES):
        raise BadInput(f"input {name!r}: unknown datatype {datatype!r}; use one of "
                       f"{', '.join([*DATATYPES, 'BYTES'])}")
    size = _parameters(tensor, f"input {name!r}").get("binary_data_size")
    if size is not None:
        if not isinstance(size, int) or size < 0 or offset + size > len(binary):
            raise BadInput(f"input {name!r}: binary_data_size {size!r} does not fit the "
                           f"{len(binary) - offset} binary bytes left in the body")
        raw = binary[offset:offset + size]
        if datatype == "BYTES":
            return name, _decode_bytes_elements(raw, count, name).reshape(shape), offset + size
        dtype = DATATYPES[datatype]
        if size != count * dtype.itemsize:
            raise BadInput(f"input {name!r}: shape {list(shape)} of {datatype} takes "
                           f"{count * dtype.itemsize} bytes, binary_data_size says {size}")
        return name, np.frombuffer(raw, dtype=dtype).reshape(shape), offset + size
    if "data" not in tensor:
        raise BadInput(f"input {name!r} has neither 'data' nor a binary_data_size parameter")
    try:
        array = np.asarray(tensor["data"], dtype=np.str_ if datatype == "BYTES" else None)
    except (ValueError, TypeError, OverflowError):
        raise BadInput(f"input {name!r}: 'data' is not a list of {datatype} values") from None
    if datatype != "BYTES":
        if array.dtype.kind not in "biuf":
            raise BadInput(f"input {name!r}: 'data' is not a list of {datatype} values")
        array = cast(array, DATATYPES[datatype], name)  # refuses 1e39 for FP32, 2**40 for INT32
    if array.size != count:
        raise BadInput(f"input {name!r}: shape {list(shape)} needs {count} values, 'data' has {array.size}")
    return name, array.reshape(shape), offset


def decode_request(body: bytes, header_length: int | None) -> InferRequest:
    """Parse an infer request body (JSON, or JSON header + binary tensors); raises BadInput."""
    if header_length is not None and not 0 < header_length <= len(body):
        raise BadInput(f"{HEADER_LENGTH} is {header_length}, the body is {len(body)} bytes")
    view = memoryview(body)
    head = view[:header_length] if header_length is not None else view
    binary = view[header_length:] if header_length is not None else memoryview(b"")
    request = jsonbody.loads(bytes(head), "the inference request")
    if not isinstance(request, dict) or not isinstance(request.get("inputs"), list) or not request["inputs"]:
        raise BadInput("an inference request needs a non-empty 'inputs' list")
    inputs, offset = {}, 0
    for tensor in request["inputs"]:
        name, array, offset = _input(tensor, binary, offset)
        inputs[name] = array
    if offset != len(binary):
        raise BadInput(f"{len(binary) - offset} binary bytes in the body belong to no input")
    parameters = _parameters(request, "the request")
    binary_default = bool(parameters.get("binary_data_output", False))
    outputs, flags = None, {}
    if request.get("outputs") is not None:
        if not isinstance(request["outputs"], list):
            raise BadInput("'outputs' must be a list of {\"name\": ...}")
        outputs = []
        for out in request["outputs"]:
            if not isinstance(out, dict) or not isinstance(out.get("name"), str):
                raise BadInput("each requested output needs a 'name'")
            outputs.append(out["name"])
            parameters = _parameters(out, f"output {out['name']!r}")
            flags[out["name"]] = bool(parameters.get("binary_data", binary_default))
    return InferRequest(request.get("id"), inputs, outputs, flags, binary_default, parameters.get("timeout"))


def _bytes_elements(array: np.ndarray) -> bytes:
    parts = []
    for item in array.reshape(-1):
        data = item.encode("utf-8") if isinstance(item, str) else bytes(item)
        parts.append(struct.pack("<I", len(data)) + data)
    return b"".join(parts)


def encode_response(model: str, request: InferRequest, outputs: dict[str, Any],
                    version: str = "1") -> tuple[bytes, int | None]:
    """The response body and, when any output is binary, the JSON header's length."""
    entries, chunks = [], []
    for name, value in outputs.items():
        array = value if isinstance(value, np.ndarray) else np.asarray(value)
        entry: dict[str, Any] = {"name": name, "datatype": datatype_of(array.dtype), "shape": list(array.shape)}
        if request.binary.get(name, request.binary_default):
            data = _bytes_elements(array) if entry["datatype"] == "BYTES" else np.ascontiguousarray(array).tobytes()
            entry["parameters"] = {"binary_data_size": len(data)}
            chunks.append(data)
        else:
            entry["data"] = array.reshape(-1).tolist()
        entries.append(entry)
    response = {"model_name": model, "model_version": version, "outputs": entries}
    if request.id is not None:
        response["id"] = request.id
    head = orjson.dumps(response, option=orjson.OPT_NON_STR_KEYS)  # ZipMap outputs have int keys
    if not chunks:
        return head, None
    return head + b"".join(chunks), len(head)
