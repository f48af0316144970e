"""Converting an input array to the dtype a model (or a v2 request) declares, without silent overflow.

numpy's astype turns 1e39 into float32 inf and wraps 2**40 into an int32 without a word; a model fed
those answers nonsense. `cast` refuses them with a BadInput naming the value, the dtype and the input.
The check costs one finiteness test (float targets) or one min and max (integer targets), and only
when the source dtype holds values the target cannot: float64 to float32 is checked, int64 to
float32 (at most 2**63, far inside float32) is not.
"""
from __future__ import annotations

import functools

import numpy as np

from .errors import BadInput


@functools.lru_cache(maxsize=256)
def _check_needed(source: np.dtype, target: np.dtype) -> str:
    """"float", "int" or "" (no value of `source` can overflow `target`)."""
    if source.kind not in "iuf" or target.kind not in "iuf":
        return ""  # bool targets take any number as truth; other kinds are refused by the callers
    if target.kind == "f":
        widest = np.finfo(source).max if source.kind == "f" else np.iinfo(source).max
        return "float" if float(widest) > float(np.finfo(target).max) else ""
    return "" if np.can_cast(source, target, "safe") else "int"


def cast(array: np.ndarray, dtype: np.dtype, name: str) -> np.ndarray:
    """`array` as `dtype`; raises BadInput when a finite number does not fit `dtype`.

    Non-finite values that were already there (inf in a float64 array from the direct client) stay
    as they are; NaN or inf bound for an integer dtype is refused.
    """
    if array.dtype == dtype:
        return array
    check = _check_needed(array.dtype, dtype)
    with np.errstate(over="ignore", invalid="ignore"):
        converted = array.astype(dtype)
    if check == "float" and not np.isfinite(converted).all():
        overflowed = ~np.isfinite(converted) & np.isfinite(array)
        if overflowed.any():
            _refuse(array[overflowed].flat[0], dtype, name)
    elif check == "int" and array.size:
        info = np.iinfo(dtype)
        low, high = array.min(), array.max()
        # NOTE: compared as Python numbers, exact for every int64/uint64/float64 value; NaN fails both
        if not info.min <= low.item() <= info.max:
            _refuse(low, dtype, name)
        if not info.min <= high.item() <= info.max:
            _refuse(high, dtype, name)
    return converted


def _refuse(value: np.generic, dtype: np.dtype, name: str) -> None:
    raise BadInput(f"{value.item()!r} is out of {dtype.name} range for input {name!r}")
