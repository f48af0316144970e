"""The operations a worker answers (docs/protocol.md), each a function of the pool and the body."""
from __future__ import annotations

import os
from typing import Any, Callable

from broker.errors import BadInput
from broker.protocol import model_file_name

from . import images, inference
from .batching import BatchPolicy, batchable
from .memory import rss_bytes
from .pool import ModelPool
from .sessions import LoadedModel
from .versions import policy_of, split


def _model(body: dict) -> str:
    return model_file_name(body.get("model"))


def _text(body: dict, field: str) -> str:
    value = body.get(field)
    if not isinstance(value, str):
        raise BadInput(f"'{field}' must be a string")
    return value


def _wanted(body: dict) -> list[str] | None:
    wanted = body.get("outputs")
    if wanted is not None and not (isinstance(wanted, list) and all(isinstance(w, str) for w in wanted)):
        raise BadInput("'outputs' must be a list of output names")
    return wanted


Check = Callable[[LoadedModel], None]  # called with a predict's model before its run; raises to refuse it


def predict(pool: ModelPool, body: dict, node: str, check: Check | None = None) -> tuple[dict, inference.Run]:
    """A predict's result and the run it took (for the worker's run-time estimate, worker/runtimes.py)."""
    wanted = _wanted(body)
    if "inputs" not in body:
        raise BadInput("'inputs' is missing")
    model = pool.load(body.get("model"), body.get("version"))  # load() checks the name
    if check is not None:
        check(model)
    outputs, ran = inference.run(model, body["inputs"], wanted)
    return inference.result(model, outputs, ran.ns / 1e6), ran


def predict_image(pool: ModelPool, body: dict, node: str, check: Check | None = None) -> tuple[dict, inference.Run]:
    image, wanted = body.get("image"), _wanted(body)
    if not isinstance(image, (bytes, bytearray)):
        raise BadInput("'image' must be the image file's bytes")
    name = _model(body)
    model = pool.load(name, body.get("version"))
    if check is not None:
        check(model)
    if len(model.inputs) != 1:
        raise BadInput(f"{name} takes {len(model.inputs)} inputs; an image fills a model with one")
    images.check_image_model(name, model.inputs[0])
    options = pool.sidecar(name).get("image") or {}
    tensor = images.to_tensor(images.decode(bytes(image), pool.max_image_pixels), model.inputs[0],
                              options if isinstance(options, dict) else {})
    outputs, ran = inference.run(model, {model.inputs[0].name: tensor}, wanted)
    return inference.result(model, outputs, ran.ns / 1e6), ran


def models(pool: ModelPool, body: dict, node: str) -> dict:
    return {"models": pool.names()}


def information(pool: ModelPool, body: dict, node: str) -> dict:
    return {"models": [{"description": pool.description(n), "model": n} for n in pool.names()]}


def info(pool: ModelPool, body: dict, node: str) -> dict:
    return pool.info(_model(body), body.get("version"))


def config(pool: ModelPool, body: dict, node: str, policy: BatchPolicy = BatchPolicy()) -> dict:
    """What a model configuration needs: inputs, outputs and the batching this worker applies to it
    (`policy` is the worker's default, overridden by the model's sidecar)."""
    name = _model(body)
    model = pool.load(name, body.get("version"))
    policy = policy.override(pool.sidecar(name).get("dynamic_batching"))
    on = policy.enabled and batchable(model)
    return {"model": name, "version": str(split(model.name)[1] or 1),
            "version_policy": policy_of(pool.sidecar(name).get("version_policy")),
            "inputs": [i.describe() for i in model.inputs],
            "outputs": [o.describe() for o in model.outputs],
            "max_batch_size": policy.max_batch_size if on else 0,
            "dynamic_batching": {"max_queue_delay_us": policy.max_queue_delay_us,
                                 "preferred_batch_sizes": list(policy.preferred_batch_sizes)} if on else None}


def describe(pool: ModelPool, body: dict, node: str) -> dict:
    name, text = _model(body), _text(body, "description")
    pool.describe(name, text)
    return {"model": name, "description": text}


def upload(pool: ModelPool, body: dict, node: str) -> dict:
    name, data = _model(body), body.get("data")
    if not isinstance(data, (bytes, bytearray)):
        raise BadInput("'data' must be the model file's bytes")
    description = body.get("description")
    if description is not None and not isinstance(description, str):
        raise BadInput("'description' must be a string")
    pool.upload(name, bytes(data), description, body.get("version"))
    return pool.info(name, body.get("version"))


def delete(pool: ModelPool, body: dict, node: str) -> dict:
    name = _model(body)
    pool.delete(name, body.get("version"))
    return {"model": name}


def load(pool: ModelPool, body: dict, node: str) -> dict:
    name = _model(body)
    pool.load_model(name, body.get("version"))
    return {"model": name, "state": "READY"}


def unload(pool: ModelPool, body: dict, node: str) -> dict:
    name = _model(body)
    pool.unload(name, body.get("version"))
    return {"model": name, "state": "UNAVAILABLE"}


def repository(pool: ModelPool, body: dict, node: str) -> dict:
    return {"models": pool.states()}


def status(pool: ModelPool, body: dict, node: str) -> dict:
    return {"node": node, "pid": os.getpid(), "models_resident": pool.resident(), **pool.residency(),
            "memory_rss_bytes": rss_bytes(), "model_stats": pool.statistics()}


def echo(pool: ModelPool, body: dict, node: str) -> dict:
    return {"data": body.get("data"), "node": node}


Op = Callable[..., Any]  # (pool, request body, node id) -> result; a predict's: (result, run), see predict

OPS: dict[str, Op] = {
    "predict": predict, "predict_image": predict_image, "models": models, "information": information, "info": info,
    "describe": describe, "upload": upload, "delete": delete, "echo": echo,
    "load": load, "unload": unload, "repository": repository, "status": status, "config": config,
}
