"""A request header by its lower-case ASGI name, read without an exception when it is missing."""
from __future__ import annotations

import falcon.asgi


def header(req: falcon.asgi.Request, name: bytes) -> str | None:
    """The value of header `name` (lower-case bytes, as ASGI names it), or None; as `req.get_header` reads
    it (latin-1, a repeated header's values joined by Falcon's rules).

    NOTE: Falcon's get_header raises and catches a KeyError for a missing header, about 0.5 µs, and every
    prediction asks for two that requests rarely carry (X-Request-ID, X-Request-Timeout): a dict get on
    the request's own header map instead (issue 13: the frontend's CPU per request).
    """
    value = req._asgi_headers.get(name)
    return None if value is None else value.decode("latin1")
