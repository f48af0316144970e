"""The REST path's JSON work in-process: parse a prediction body and encode the seed's answer.

    python bench/json_bodies.py

Rows: the stdlib (json.loads + json.dumps, what the frontend did before issue 19), the strict
parser and orjson encoding the frontend uses now (broker.jsonbody.loads + frontend.errors.status_body),
and bare orjson (no strictness checks: the floor). Bodies: iris's one row, 1000 iris rows, and a
150,528-float tensor (a 1x3x224x224 v2 JSON request, 3 MB). Best of 7 runs each.
"""
from __future__ import annotations

import http
import json
import random
import sys
import timeit
from pathlib import Path

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from broker.jsonbody import loads  # noqa: E402
from frontend.errors import status_body  # noqa: E402

random.seed(1)
BODIES = {
    "iris, 1 row": (b'{"values": [2, 5, 1, 4]}', [1], 20000),
    "iris, 1000 rows": (json.dumps({"values": [[round(random.uniform(0, 8), 1) for _ in range(4)]
                                               for _ in range(1000)]}).encode(), [1] * 1000, 200),
    "150,528 floats": (json.dumps({"inputs": [{"name": "x", "shape": [1, 3, 224, 224], "datatype": "FP32",
                                               "data": [random.random() for _ in range(150528)]}]}).encode(),
                       [[0.1] * 10], 10),
}


def stdlib(body: bytes, answer: list) -> bytes:
    json.loads(body)
    status = {"code": 200, "description": "Prediction successful", "name": http.HTTPStatus(200).phrase}
    return json.dumps({"http_status": status, "values": answer}).encode()


def strict(body: bytes, answer: list) -> bytes:
    loads(body, "body")
    return status_body(200, "Prediction successful", values=answer)


def bare(body: bytes, answer: list) -> bytes:
    orjson.loads(body)
    status = {"code": 200, "description": "Prediction successful", "name": http.HTTPStatus(200).phrase}
    return orjson.dumps({"http_status": status, "values": answer})


def best_us(fn, body: bytes, answer: list, number: int) -> float:
    return min(timeit.repeat(lambda: fn(body, answer), number=number, repeat=7)) / number * 1e6


def main() -> None:
    print(f"{'body':18} {'stdlib us':>11} {'strict us':>11} {'orjson us':>11} {'stdlib/strict':>14}")
    for name, (body, answer, number) in BODIES.items():
        before, after, floor = (best_us(fn, body, answer, number) for fn in (stdlib, strict, bare))
        print(f"{name:18} {before:11.1f} {after:11.1f} {floor:11.1f} {before / after:13.1f}x")


if __name__ == "__main__":
    main()
