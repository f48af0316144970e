"""Bearer tokens: the admin token guards every endpoint that changes models, the API token the rest.

Both are off when empty. The table's public paths (health checks, the welcome, help, OpenAPI and
/metrics) stay open so probes and scrapers work without secrets (keep /metrics on a network you trust).
Tokens are compared in constant time.
"""
from __future__ import annotations

import hmac

import falcon.asgi

from broker.errors import Forbidden, Unauthorized

from . import api


def _matches(presented: str, token: str) -> bool:
    return bool(token) and hmac.compare_digest(presented.encode(), token.encode())


class TokenAuth:
    def __init__(self, admin_token: str, api_token: str):
        self.admin_token, self.api_token = admin_token, api_token
        self.admin_routes = {(e.method, e.path) for e in api.ENDPOINTS if e.admin}
        self.public_routes = frozenset(r.path for r in api.ROUTES if r.public)

    async def process_resource(self, req: falcon.asgi.Request, resp: falcon.asgi.Response, resource: object,
                               params: dict) -> None:
        route = req.uri_template
        if (req.method, route) in self.admin_routes:
            # NOTE: with only an API token set, changing models needs it too: never less than reading.
            if self.admin_token or self.api_token:
                self._check(req, self.admin_token or self.api_token, "")
        elif self.api_token and route not in self.public_routes:
            self._check(req, self.api_token, self.admin_token)

    @staticmethod
    def _check(req: falcon.asgi.Request, token: str, also: str) -> None:
        header = req.get_header("Authorization") or ""
        scheme, _, presented = header.partition(" ")
        if scheme.lower() != "bearer" or not presented:
            raise Unauthorized("this endpoint needs 'Authorization: Bearer <token>'")
        if not (_matches(presented.strip(), token) or _matches(presented.strip(), also)):
            raise Forbidden("this token may not use this endpoint")
