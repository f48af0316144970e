"""The HTTP floors: Falcon calling ONNX Runtime in-process, no broker, no workers; WSGI and ASGI.

    gunicorn "bench.floor_app:create_app()" --worker-class gthread ...                    (WSGI)
    gunicorn "bench.floor_app:create_asgi_app()" --worker-class uvicorn_worker.UvicornWorker ...  (ASGI)

Same request and response as our /api/v1/models/iris.onnx/prediction, so they compare directly
(bench/rest.py and bench/compare.py start them).
"""
from __future__ import annotations

import json
from pathlib import Path

import falcon
import falcon.asgi
import numpy as np
import onnxruntime as ort

IRIS = Path(__file__).resolve().parent.parent / "worker" / "models" / "iris.onnx"


class Prediction:
    def __init__(self) -> None:
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        self.session = ort.InferenceSession(str(IRIS), options, providers=["CPUExecutionProvider"])
        self.name = self.session.get_inputs()[0].name

    def answer(self, body: bytes) -> bytes:
        values = np.asarray(json.loads(body)["values"], np.float32)
        label = self.session.run(None, {self.name: values.reshape(-1, 4)})[0]
        return json.dumps({"http_status": {"code": 200, "description": "Prediction successful", "name": "OK"},
                           "values": label.tolist()}).encode()

    def on_post(self, req: falcon.Request, resp: falcon.Response, name: str) -> None:
        resp.content_type = falcon.MEDIA_JSON
        resp.data = self.answer(req.bounded_stream.read())


class AsyncPrediction(Prediction):
    async def on_post(self, req: falcon.asgi.Request, resp: falcon.asgi.Response, name: str) -> None:
        resp.content_type = falcon.MEDIA_JSON
        resp.data = self.answer(await req.stream.read())


def create_app() -> falcon.App:
    app = falcon.App()
    app.add_route("/api/v1/models/{name}/prediction", Prediction())
    return app


def create_asgi_app() -> falcon.asgi.App:
    app = falcon.asgi.App()
    app.add_route("/api/v1/models/{name}/prediction", AsyncPrediction())
    return app
