"""Falcon resources of the seed's REST API; each turns HTTP into one call of the direct client."""
from __future__ import annotations

import json
from typing import Any

import falcon
import numpy as np

from broker.client import Client
from broker.errors import BadInput, PayloadTooLarge
from broker.protocol import check_model_name

from .errors import status_body

WELCOME = ("Greetings from Fractal - ML Server - Inferrer, the Machine Learning model server. "
           "For more information, visit /help")


def _json_body(req: falcon.Request, max_body_bytes: int) -> Any:
    length = req.content_length or 0
    if length > max_body_bytes:
        raise PayloadTooLarge(f"body is {length} bytes; the limit is {max_body_bytes}")
    raw = req.bounded_stream.read(max_body_bytes + 1)
    if len(raw) > max_body_bytes:
        raise PayloadTooLarge(f"body is over the limit of {max_body_bytes} bytes")
    if not raw:
        raise BadInput('empty body; send JSON such as {"values": [2, 5, 1, 4]}')
    try:
        return json.loads(raw)
    except ValueError as exc:
        raise BadInput(f"body is not valid JSON: {exc}") from None


def _ok(resp: falcon.Response, description: str = "OK", **extra: Any) -> None:
    resp.content_type = falcon.MEDIA_JSON
    resp.data = status_body(200, description, **extra)


class Welcome:
    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        _ok(resp, WELCOME)


class Prediction:
    """GET or POST /api/v1/models/{name}/prediction with {"values": row or rows}."""

    def __init__(self, client: Client, max_body_bytes: int):
        self._client = client
        self._max_body_bytes = max_body_bytes

    def on_get(self, req: falcon.Request, resp: falcon.Response, name: str) -> None:
        check_model_name(name)
        body = _json_body(req, self._max_body_bytes)
        if not isinstance(body, dict) or "values" not in body:
            raise BadInput('send {"values": [...]}: one row, or a list of rows')
        try:
            values = np.asarray(body["values"])
        except ValueError:
            raise BadInput("'values' must be a rectangular list of numbers") from None
        outputs = self._client.predict(name, [values], request_id=req.context.request_id)
        first = next(iter(outputs.values()))
        _ok(resp, "Prediction successful", values=first.tolist() if hasattr(first, "tolist") else first)

    on_post = on_get
