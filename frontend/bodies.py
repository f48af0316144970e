"""Reading request bodies within limits: JSON, multipart form fields, raw bytes (async, Falcon ASGI).

JSON parsing and multipart parsing run inline on the event loop: cheap for the small bodies of
predictions, but a body of many megabytes (a large JSON tensor) holds the loop while it is parsed.
"""
from __future__ import annotations

from typing import Any

import falcon.asgi

from broker import jsonbody
from broker.errors import BadInput, PayloadTooLarge, UnsupportedMediaType

# curl --data sends application/x-www-form-urlencoded unless told otherwise (the seed's own commands
# set application/json, users often forget): a JSON body under these types is still read as JSON.
JSON_TYPES = frozenset({"", "application/json", "application/x-www-form-urlencoded", "text/plain"})


def media_type(req: falcon.asgi.Request) -> str:
    return (req.content_type or "").split(";", 1)[0].strip().lower()


async def raw(req: falcon.asgi.Request, max_bytes: int) -> bytes:
    length = req.content_length or 0
    if length > max_bytes:
        raise PayloadTooLarge(f"body is {length} bytes; the limit is {max_bytes}")
    data = await req.bounded_stream.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise PayloadTooLarge(f"body is over the limit of {max_bytes} bytes")
    return data


async def json_body(req: falcon.asgi.Request, max_bytes: int, example: str, kind: str | None = None) -> Any:
    """The JSON body, strictly read; `kind`: its media_type, when the caller has it already."""
    kind = media_type(req) if kind is None else kind
    if kind not in JSON_TYPES:
        raise UnsupportedMediaType(f"send JSON (Content-Type: application/json), not {kind}")
    data = await raw(req, max_bytes)
    if not data.strip():
        raise BadInput(f"empty body; send JSON such as {example}")
    try:
        return jsonbody.loads(data, "body")
    except BadInput as exc:
        raise BadInput(f"{exc}; send JSON such as {example}") from None


async def form_file(req: falcon.asgi.Request, field: str, max_bytes: int) -> bytes:
    """The bytes of multipart form field `field` (curl -F "field=@file")."""
    return (await form_fields(req, field, max_bytes))[0]


async def form_fields(req: falcon.asgi.Request, field: str, max_bytes: int,
                      text_fields: frozenset[str] = frozenset()) -> tuple[bytes, dict[str, list[str]]]:
    """The bytes of multipart field `field`, and the values of the text fields named in `text_fields`
    (a field sent several times, as -F outputs=a -F outputs=b, gives several values)."""
    if (req.content_length or 0) > max_bytes:
        raise PayloadTooLarge(f"body is {req.content_length} bytes; the limit is {max_bytes}")
    data: bytes | None = None
    texts: dict[str, list[str]] = {}
    async for part in await req.get_media():
        if part.name == field and data is None:
            data = await part.stream.read(max_bytes + 1)
            if len(data) > max_bytes:
                raise PayloadTooLarge(f"field {field!r} is over the limit of {max_bytes} bytes")
        elif part.name in text_fields:
            texts.setdefault(part.name, []).append((await part.stream.read(max_bytes)).decode("utf-8", "replace"))
    if data is None:
        raise BadInput(f"multipart form has no field {field!r}; send -F \"{field}=@FILE\"")
    return data, texts
