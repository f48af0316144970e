"""ModelInfer tensors: raw_input_contents or typed `contents` into arrays, outputs into raw_output_contents.

Raw inputs become arrays over the message's bytes (np.frombuffer), so they are not converted on the
way to the worker; BYTES elements use the protocol's 4-byte little-endian length prefix, as over REST.
Every problem is a BadInput naming the tensor and what is wrong with it.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np

from broker.errors import BadInput

from ..v2_tensors import DATATYPES, _bytes_elements, _decode_bytes_elements, datatype_of
from .proto import grpc_service_pb2 as pb

# The typed field of InferTensorContents each datatype travels in (FP16 has none: raw only).
CONTENTS = {"BOOL": "bool_contents", "UINT8": "uint_contents", "UINT16": "uint_contents",
            "UINT32": "uint_contents", "UINT64": "uint64_contents", "INT8": "int_contents",
            "INT16": "int_contents", "INT32": "int_contents", "INT64": "int64_contents",
            "FP32": "fp32_contents", "FP64": "fp64_contents", "BYTES": "bytes_contents"}
KNOWN = ", ".join([*DATATYPES, "BYTES"])


def _from_raw(name: str, datatype: str, shape: tuple, count: int, raw: bytes) -> np.ndarray:
    if datatype == "BYTES":
        return _decode_bytes_elements(memoryview(raw), count, name).reshape(shape)
    dtype = DATATYPES[datatype]
    if len(raw) != count * dtype.itemsize:
        raise BadInput(f"input {name!r}: shape {list(shape)} of {datatype} takes {count * dtype.itemsize} "
                       f"bytes, its raw_input_contents has {len(raw)}")
    return np.frombuffer(raw, dtype=dtype).reshape(shape)


def _from_contents(name: str, datatype: str, shape: tuple, count: int, contents: Any) -> np.ndarray:
    if datatype not in CONTENTS:
        raise BadInput(f"input {name!r}: {datatype} has no typed contents field; send it in raw_input_contents")
    values = getattr(contents, CONTENTS[datatype])
    if len(values) != count:
        raise BadInput(f"input {name!r}: shape {list(shape)} needs {count} values, "
                       f"contents.{CONTENTS[datatype]} has {len(values)}")
    try:
        if datatype == "BYTES":
            return np.array([v.decode("utf-8", errors="replace") for v in values], dtype=np.str_).reshape(shape)
        return np.array(values, dtype=DATATYPES[datatype]).reshape(shape)
    except (OverflowError, ValueError) as exc:
        raise BadInput(f"input {name!r}: contents do not fit {datatype}: {exc}") from None


def decode_inputs(request: pb.ModelInferRequest) -> dict[str, np.ndarray]:
    """{input name: array} from a ModelInferRequest; raises BadInput."""
    tensors, raw = request.inputs, request.raw_input_contents
    if not tensors:
        raise BadInput("an inference request needs at least one input")
    if raw and len(raw) != len(tensors):
        raise BadInput(f"{len(raw)} raw_input_contents for {len(tensors)} inputs: give one per input, in the "
                       f"order of 'inputs' (or use contents for all of them)")
    inputs: dict[str, np.ndarray] = {}
    for i, tensor in enumerate(tensors):
        name, datatype = tensor.name, tensor.datatype
        if not name or name in inputs:
            raise BadInput(f"input #{i}: {'a name is missing' if not name else f'{name!r} appears twice'}")
        if datatype not in CONTENTS and datatype != "FP16":
            raise BadInput(f"input {name!r}: unknown datatype {datatype!r}; use one of {KNOWN}")
        shape = tuple(tensor.shape)
        if any(d < 0 for d in shape):
            raise BadInput(f"input {name!r}: shape {list(shape)} has a negative dimension")
        count = math.prod(shape)
        inputs[name] = (_from_raw(name, datatype, shape, count, raw[i]) if raw
                        else _from_contents(name, datatype, shape, count, tensor.contents))
    return inputs


def requested_outputs(request: pb.ModelInferRequest) -> list[str] | None:
    return [o.name for o in request.outputs] or None


def encode_response(request: pb.ModelInferRequest, outputs: dict[str, Any],
                    version: str = "1") -> pb.ModelInferResponse:
    """Every output in raw_output_contents, as Triton answers."""
    response = pb.ModelInferResponse(model_name=request.model_name, model_version=version, id=request.id)
    for name, value in outputs.items():
        array = value if isinstance(value, np.ndarray) else np.asarray(value)
        if array.dtype.kind in "OV":
            raise BadInput(f"output {name!r} is not a tensor (a sequence or map); ask for tensor outputs only")
        datatype = datatype_of(array.dtype)
        response.outputs.add(name=name, datatype=datatype, shape=array.shape)
        response.raw_output_contents.append(_bytes_elements(array) if datatype == "BYTES"
                                            else np.ascontiguousarray(array).tobytes())
    return response
