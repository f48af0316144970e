"""Strict, bounded JSON in: every JSON body the servers read, and every model sidecar, is parsed here.

orjson does the parsing (RFC 8259: no NaN, Infinity or -Infinity, no number that overflows a double,
valid UTF-8 only, no lone surrogate escapes, no recursion limit to trip). On top of it, a document
that parsed is checked for what orjson accepts but we do not: nesting deeper than MAX_DEPTH,
duplicate keys (orjson keeps the last one silently), and integers beyond 64 bits (orjson turns them
into inexact floats silently). These checks run at C speed (bytes.split drops the strings,
bytes.translate keeps the brackets, numpy sums them; keys are counted with map and set), never by
recursion, and in time linear in the body's size: a hostile body makes them neither deep nor slow.
"""
from __future__ import annotations

import json
import re
from itertools import chain
from typing import Any

import numpy as np
import orjson

from .errors import BadInput

MAX_DEPTH = 64  # arrays and objects inside each other; a tensor needs a handful, a hostile body thousands

# The structure of a document once its strings are gone: only brackets and the colons of its keys.
_NOT_STRUCTURE = bytes(c for c in range(256) if c not in b"[]{}:")
_DEPTH_STEP = np.zeros(256, np.int16)
_DEPTH_STEP[list(b"[{")] = 1
_DEPTH_STEP[list(b"]}")] = -1
# Numbers as seen by the big-integer check: digits become "0", and what a number may follow ("[",
# ":", ",", whitespace, a minus sign) becomes ",", so an integer token of 19 digits or more shows as
# _LONG_INTEGER. 2**64 - 1 has 20 digits, -2**63 19: a shorter token always fits.
_INTEGER_VIEW = bytes.maketrans(b"123456789[:- \t\r\n", b"000000000,,,,,,,")
_LONG_INTEGER = b"," + b"0" * 19
_INTEGER_TOKEN = re.compile(rb"(?<![0-9.eE+\-])-?[0-9]{19,}(?![0-9.eE])")
_NUMBER = re.compile(rb"-?[0-9]+(?:\.[0-9]*)?(?:[eE][+\-]?[0-9]+)?")
_INT_MIN, _INT_MAX = -(2 ** 63), 2 ** 64 - 1  # what orjson reads exactly: int64 and uint64


def loads(data: bytes, what: str) -> Any:
    """The JSON document in `data`; raises BadInput "{what}: {the problem}", e.g. "body: NaN is not JSON".

    Refused: anything orjson refuses (malformed JSON, NaN, Infinity, numbers beyond a double,
    invalid UTF-8, lone surrogates, a BOM), nesting deeper than MAX_DEPTH, duplicate keys in an
    object, and integers outside [-2**63, 2**64 - 1].
    """
    try:
        value = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise BadInput(f"{what}: {_describe(data, exc)}") from None
    if isinstance(value, (dict, list)):
        _check_structure(data, value, what)
    elif isinstance(value, float):
        _check_integers(data, what)
    return value


def _check_structure(data: bytes, value: Any, what: str) -> None:
    bare = _without_strings(data)
    structure = bare.translate(None, _NOT_STRUCTURE)
    if len(structure) > MAX_DEPTH:  # a shorter one cannot nest deeper
        depth = int(np.cumsum(_DEPTH_STEP[np.frombuffer(structure, np.uint8)], dtype=np.int16).max())
        if depth > MAX_DEPTH:
            raise BadInput(f"{what}: nesting deeper than {MAX_DEPTH}")
    keys = structure.count(b":")
    if keys > 1 and _distinct_keys(value, structure.count(b"{")) != keys:
        raise BadInput(f"{what}: duplicate key {_duplicate(data)!r}")
    _check_integers(bare, what)


def _without_strings(data: bytes) -> bytes:
    """`data` (valid JSON) with its strings removed, at C speed whatever they hold.

    Backslashes only occur in strings: dropping escaped backslashes, then escaped quotes, leaves
    every quote a string's start or end, so every other piece between quotes is a string.
    """
    if b"\\" in data:
        data = data.replace(b"\\\\", b"").replace(b'\\"', b"")
    return b"".join(data.split(b'"')[0::2])


def _distinct_keys(value: Any, objects: int) -> int:
    """How many keys the parsed objects hold, found without recursion; stops once all are seen."""
    keys, stack = 0, [value]
    while stack and objects:
        item = stack.pop()
        if type(item) is dict:
            objects -= 1
            keys += len(item)
            children: Any = item.values()
        else:
            children = item
        kinds = set(map(type, children))  # NOTE: a C-speed look, so a list of numbers costs little
        if kinds == {dict} and children is item:  # a list of objects (v2 "inputs"): counted at C speed
            objects -= len(item)
            keys += sum(map(len, item))
            children = list(chain.from_iterable(map(dict.values, item)))
            kinds = set(map(type, children))
        # Lists first, so the objects (usually few and shallow) are popped, and counted, first.
        if list in kinds:
            stack.extend(c for c in children if type(c) is list)
        if dict in kinds:
            stack.extend(c for c in children if type(c) is dict)
    return keys


def _duplicate(data: bytes) -> str:
    """The first duplicated key; only called on a document known to have one and to be shallow."""
    found: list[str] = []

    def pairs(items: list) -> dict:
        seen = set()
        for key, _ in items:
            if key in seen and not found:
                found.append(key)
            seen.add(key)
        return {}

    json.loads(data, object_pairs_hook=pairs)
    return found[0] if found else "?"


def _check_integers(bare: bytes, what: str) -> None:
    view = bare.translate(_INTEGER_VIEW)
    if _LONG_INTEGER not in view and not view.startswith(_LONG_INTEGER[1:]):
        return
    for match in _INTEGER_TOKEN.finditer(bare):  # NOTE: rare: a long integer, or a long exponent
        if not _INT_MIN <= int(match.group()) <= _INT_MAX:
            raise BadInput(f"{what}: {_too_long(match.group())}")


def _too_long(integer: bytes) -> str:
    return f"the integer {_short(integer)} is beyond 64 bits; send it as a float or a string"


def _short(token: bytes) -> str:
    text = token.decode()
    return text if len(text) <= 40 else f"{text[:20]}...({len(text.lstrip('-'))} digits)"


def _describe(data: bytes, exc: orjson.JSONDecodeError) -> str:
    """orjson's reason in words a user acts on: which literal, which number, which byte."""
    reason, pos = exc.msg, exc.pos
    if "depth" in reason:  # orjson stops at 1024 levels by itself
        return f"nesting deeper than {MAX_DEPTH}"
    if "BOM" in reason:
        return "a byte order mark (BOM) is not JSON; send UTF-8 without it"
    if "UTF-8" in reason:
        try:
            data.decode("utf-8")
        except UnicodeDecodeError as bad:
            return f"invalid UTF-8 at byte {bad.start}"
    if "surrogate" in reason:
        return f"a lone UTF-16 surrogate escape in a string ({reason}) at char {pos}"
    for literal in (b"-Infinity", b"Infinity", b"NaN"):
        for start in (pos, pos - 1):
            if 0 <= start and data[start:start + len(literal)] == literal:
                return f"{literal.decode()} is not JSON"
    if "infinity" in reason:  # a number beyond the double range, e.g. 1e400
        number = _NUMBER.match(data, pos)
        if number is None:
            return "a number is out of float64 range"
        if number.group().lstrip(b"-").isdigit():
            return _too_long(number.group())
        return f"{_short(number.group())} is out of float64 range"
    return f"not valid JSON ({reason} at char {pos})"
