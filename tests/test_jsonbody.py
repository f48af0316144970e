"""The strict JSON parser and the overflow-checked cast, in-process: each refusal and its message."""
from __future__ import annotations

import json
import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from broker.casting import cast
from broker.errors import BadInput
from broker.jsonbody import MAX_DEPTH, loads

DEEP = b"[" * 200_000 + b"]" * 200_000


@pytest.mark.parametrize("data, message", [
    (b'{"values": [NaN, 1]}', "body: NaN is not JSON"),
    (b'[1, Infinity]', "body: Infinity is not JSON"),
    (b'[-Infinity]', "body: -Infinity is not JSON"),
    (b'{"values": [1e400]}', "body: 1e400 is out of float64 range"),
    (b'[-1E400]', "body: -1E400 is out of float64 range"),
    (DEEP, f"body: nesting deeper than {MAX_DEPTH}"),
    (b"[" * (MAX_DEPTH + 1) + b"]" * (MAX_DEPTH + 1), f"nesting deeper than {MAX_DEPTH}"),
    (b'{"a":' * (MAX_DEPTH + 1) + b"1" + b"}" * (MAX_DEPTH + 1), f"nesting deeper than {MAX_DEPTH}"),
    (b'{"values": 1, "values": 2}', "body: duplicate key 'values'"),
    (b'{"x": [{"b": 1, "c": {"d": 1, "d": 2}}]}', "duplicate key 'd'"),
    (b'{"a\\"b": 1, "a\\"b": 2}', "duplicate key 'a\"b'"),
    (b'["\\ud800"]', "lone UTF-16 surrogate"),
    (b'["\\udc00x"]', "lone UTF-16 surrogate"),
    (b'["\xed\xa0\x80"]', "invalid UTF-8 at byte 2"),
    (b'{"values": "\xff"}', "invalid UTF-8 at byte 12"),
    (b'[18446744073709551616]', "the integer 18446744073709551616 is beyond 64 bits"),
    (b'{"a": -9223372036854775809}', "the integer -9223372036854775809 is beyond 64 bits"),
    (b'{"a":\n\t 18446744073709551616}', "the integer 18446744073709551616 is beyond 64 bits"),
    (b'[\r\n-9223372036854775809]', "the integer -9223372036854775809 is beyond 64 bits"),
    (b'1' * 400, "digits) is beyond 64 bits"),
    (b"\xef\xbb\xbf[1]", "byte order mark"),
    (b"", "not valid JSON"),
    (b'{"values": [2, 5, 1', "not valid JSON"),
    (b"[1] [2]", "not valid JSON"),
])
def test_refusals_name_the_problem(data, message):
    with pytest.raises(BadInput) as caught:
        loads(data, "body")
    assert message in str(caught.value)


@pytest.mark.parametrize("data, value", [
    (b'{"values": [2, 5, 1, 4]}', {"values": [2, 5, 1, 4]}),
    (b"[" * MAX_DEPTH + b"]" * MAX_DEPTH, json.loads(b"[" * MAX_DEPTH + b"]" * MAX_DEPTH)),
    (b'[18446744073709551615, -9223372036854775808, 1234567890123456789]',
     [2**64 - 1, -2**63, 1234567890123456789]),
    (b'[0.0012345678901234567890123, 1e-400, 1e00000000000000000000001, 12345678901234567890123.5]',
     [0.0012345678901234567, 0.0, 10.0, 1.2345678901234568e22]),
    (b'{"a": 1, "b": {"a": 2}, "c": [{"a": 3}, {"a": 4}]}', {"a": 1, "b": {"a": 2}, "c": [{"a": 3}, {"a": 4}]}),
    (b'{"s": "[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[:::,", "t": "\\"{{{{"}',
     {"s": "[" * 72 + ":::,", "t": '"{{{{'}),
    (b'{"k": "123456789012345678901234567890", "e": "\\ud83d\\ude00"}',
     {"k": "123456789012345678901234567890", "e": "\U0001F600"}),
    (b' 9223372036854775807 ', 2**63 - 1),
    (b'"text"', "text"),
])
def test_json_within_the_rules_is_read_as_the_stdlib_reads_it(data, value):
    assert loads(data, "body") == value


def test_the_deep_body_is_refused_fast():
    started = time.perf_counter()
    for _ in range(3):
        with pytest.raises(BadInput):
            loads(DEEP, "body")
    deep_s = time.perf_counter() - started
    flat = b"[" + b"0," * 200_000 + b"0]"  # the same size, nothing to refuse
    started = time.perf_counter()
    for _ in range(3):
        loads(flat, "body")
    assert deep_s < 5 * (time.perf_counter() - started) + 0.05


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-2**63, 2**64 - 1) | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=4), inner, max_size=4),
    max_leaves=20)


@given(JSON_VALUES)
@settings(max_examples=300, derandomize=True)
def test_any_valid_document_round_trips(value):
    assert loads(json.dumps(value).encode(), "body") == value


def _dump(node) -> str:
    """JSON text of a tree whose objects are lists of pairs, so a key may be said twice."""
    kind, items = node if isinstance(node, tuple) else ("scalar", node)
    if kind == "array":
        return "[" + ", ".join(map(_dump, items)) + "]"
    if kind == "object":
        return "{" + ", ".join(f"{json.dumps(k)}: {_dump(v)}" for k, v in items) + "}"
    return json.dumps(items)


def _has_duplicate(node) -> bool:
    kind, items = node if isinstance(node, tuple) else ("scalar", node)
    if kind == "array":
        return any(map(_has_duplicate, items))
    if kind == "object":
        keys = [k for k, _ in items]
        return len(set(keys)) < len(keys) or any(_has_duplicate(v) for _, v in items)
    return False


TREES = st.recursive(
    st.integers(-5, 5) | st.text(alphabet='a"\\:{[', max_size=3),
    lambda inner: st.lists(inner, max_size=4).map(lambda xs: ("array", xs))
    | st.lists(st.tuples(st.sampled_from(["a", "b", 'a"', "a\\"]), inner), max_size=3)
    .map(lambda kv: ("object", kv)),
    max_leaves=16)


@given(TREES)
@settings(max_examples=500, derandomize=True)
def test_a_duplicate_key_anywhere_is_found_and_only_then(tree):
    text = _dump(tree).encode()
    try:
        loads(text, "body")
    except BadInput as exc:
        assert "duplicate key" in str(exc) and _has_duplicate(tree)
    else:
        assert not _has_duplicate(tree)


@given(st.binary(max_size=64) | st.text(alphabet='[]{}":,\\ 0123456789.eE+-aNIfinty', max_size=64).map(str.encode))
@settings(max_examples=1000, derandomize=True)
def test_any_bytes_parse_or_give_bad_input(data):
    try:
        loads(data, "body")
    except BadInput as exc:
        assert str(exc).startswith("body: ")


@pytest.mark.parametrize("array, dtype, message", [
    (np.array([1e39, 1.0]), np.float32, "1e+39 is out of float32 range for input 'x'"),
    (np.array([-1e39]), np.float32, "-1e+39 is out of float32 range"),
    (np.array([70000.0]), np.float16, "70000.0 is out of float16 range"),
    (np.array([65535], np.uint16), np.float16, "65535 is out of float16 range"),
    (np.array([2**40]), np.int32, "1099511627776 is out of int32 range"),
    (np.array([-1]), np.uint8, "-1 is out of uint8 range"),
    (np.array([1e20]), np.int64, "1e+20 is out of int64 range"),
    (np.array([np.nan]), np.int64, "nan is out of int64 range"),
    (np.array([2.0**63]), np.int64, "9.223372036854776e+18 is out of int64 range"),
])
def test_casts_that_overflow_name_the_value_the_dtype_and_the_input(array, dtype, message):
    with pytest.raises(BadInput) as caught:
        cast(array, np.dtype(dtype), "x")
    assert message in str(caught.value)


@pytest.mark.parametrize("array, dtype", [
    (np.array([3.4e38, -1.5, 0.0]), np.float32),
    (np.array([np.inf, -np.inf, np.nan, 1.0]), np.float32),  # already non-finite: not an overflow
    (np.array([2**63 - 1, -2**63]), np.float32),
    (np.array([2**31 - 1, -2**31]), np.int32),
    (np.array([255, 0]), np.uint8),
    (np.array([2.5, -7.0]), np.int16),
    (np.array([0, 3]), np.bool_),
    (np.array([], np.float64), np.int8),
])
def test_casts_within_range_convert(array, dtype):
    out = cast(array, np.dtype(dtype), "x")
    assert out.dtype == dtype
    with np.errstate(invalid="ignore"):
        np.testing.assert_array_equal(out, array.astype(dtype))


def test_a_cast_to_the_same_dtype_is_the_same_array():
    array = np.arange(4, dtype=np.float32)
    assert cast(array, np.dtype(np.float32), "x") is array
