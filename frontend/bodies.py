"""Reading request bodies within limits: JSON, multipart form fields, raw bytes."""
from __future__ import annotations

import json
from typing import Any

import falcon

from broker.errors import BadInput, PayloadTooLarge, UnsupportedMediaType

# curl --data sends application/x-www-form-urlencoded unless told otherwise (the seed's own commands
# set application/json, users often forget): a JSON body under these types is still read as JSON.
JSON_TYPES = frozenset({"", "application/json", "application/x-www-form-urlencoded", "text/plain"})


def media_type(req: falcon.Request) -> str:
    return (req.content_type or "").split(";", 1)[0].strip().lower()


def raw(req: falcon.Request, max_bytes: int) -> bytes:
    length = req.content_length or 0
    if length > max_bytes:
        raise PayloadTooLarge(f"body is {length} bytes; the limit is {max_bytes}")
    data = req.bounded_stream.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise PayloadTooLarge(f"body is over the limit of {max_bytes} bytes")
    return data


def json_body(req: falcon.Request, max_bytes: int, example: str) -> Any:
    if media_type(req) not in JSON_TYPES:
        raise UnsupportedMediaType(f"send JSON (Content-Type: application/json), not {media_type(req)}")
    data = raw(req, max_bytes)
    if not data.strip():
        raise BadInput(f"empty body; send JSON such as {example}")
    try:
        return json.loads(data)
    except ValueError as exc:
        raise BadInput(f"body is not valid JSON ({exc}); send JSON such as {example}") from None


def form_file(req: falcon.Request, field: str, max_bytes: int) -> bytes:
    """The bytes of multipart form field `field` (curl -F "field=@file")."""
    return form_fields(req, field, max_bytes)[0]


def form_fields(req: falcon.Request, field: str, max_bytes: int,
                text_fields: frozenset[str] = frozenset()) -> tuple[bytes, dict[str, list[str]]]:
    """The bytes of multipart field `field`, and the values of the text fields named in `text_fields`
    (a field sent several times, as -F outputs=a -F outputs=b, gives several values)."""
    if (req.content_length or 0) > max_bytes:
        raise PayloadTooLarge(f"body is {req.content_length} bytes; the limit is {max_bytes}")
    data, texts = None, {}
    for part in req.get_media():
        if part.name == field and data is None:
            data = part.stream.read(max_bytes + 1)
            if len(data) > max_bytes:
                raise PayloadTooLarge(f"field {field!r} is over the limit of {max_bytes} bytes")
        elif part.name in text_fields:
            texts.setdefault(part.name, []).append(part.stream.read(max_bytes).decode("utf-8", "replace"))
    if data is None:
        raise BadInput(f"multipart form has no field {field!r}; send -F \"{field}=@FILE\"")
    return data, texts
