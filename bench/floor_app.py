"""The HTTP floor: Falcon under gunicorn calling ONNX Runtime in-process, no broker, no workers.

    gunicorn "bench.floor_app:create_app()" ...   (bench/http.py starts it)

Same request and response as our /api/v1/models/iris.onnx/prediction, so the two compare directly.
"""
from __future__ import annotations

import json
from pathlib import Path

import falcon
import numpy as np
import onnxruntime as ort

IRIS = Path(__file__).resolve().parent.parent / "worker" / "models" / "iris.onnx"


class Prediction:
    def __init__(self) -> None:
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        self.session = ort.InferenceSession(str(IRIS), options, providers=["CPUExecutionProvider"])
        self.name = self.session.get_inputs()[0].name

    def on_post(self, req: falcon.Request, resp: falcon.Response, name: str) -> None:
        values = np.asarray(json.loads(req.bounded_stream.read())["values"], np.float32)
        label = self.session.run(None, {self.name: values.reshape(-1, 4)})[0]
        resp.content_type = falcon.MEDIA_JSON
        resp.data = json.dumps({"http_status": {"code": 200, "description": "Prediction successful",
                                                "name": "OK"}, "values": label.tolist()}).encode()


def create_app() -> falcon.App:
    app = falcon.App()
    app.add_route("/api/v1/models/{name}/prediction", Prediction())
    return app
