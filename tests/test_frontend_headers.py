"""frontend.headers.header reads a request header exactly as Falcon's get_header does (issue 13)."""
from __future__ import annotations

import falcon.asgi
import falcon.testing
import pytest

from frontend.headers import header


async def _receive() -> dict:
    return {"type": "http.request", "body": b"", "more_body": False}


@pytest.mark.parametrize("headers", [
    [],
    [(b"x-request-id", b"abc-1")],
    [(b"x-request-id", b"a"), (b"x-request-id", b"b")],  # repeated: joined as Falcon joins them
    [(b"x-request-timeout", b" 2.5 "), (b"content-type", b"application/json")],
    [(b"x-request-id", "caf\u00e9".encode("latin1"))],  # a byte beyond ASCII reads as latin-1
    [(b"x-request-id", b"")],
])
def test_header_reads_what_get_header_reads(headers):
    scope = falcon.testing.create_scope(path="/api/v1/models", method="POST")
    scope["headers"] = [*scope["headers"], *headers]
    req = falcon.asgi.Request(scope, _receive)
    for name in ("X-Request-ID", "X-Request-Timeout", "Content-Type", "Authorization"):
        assert header(req, name.lower().encode()) == req.get_header(name), name
