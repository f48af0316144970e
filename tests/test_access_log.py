"""The access line Observe writes from its record template is the record `log.info(..., extra=...)` made:
the same attributes and, through the text and JSON formatters, the same line (in-process: pure logic)."""
from __future__ import annotations

import logging

import falcon.testing
import pytest

from broker.logs import formatter
from frontend.observe import ACCESS_FORMAT, Observe, log
from metrics import FrontendMetrics

TIME_FIELDS = ("created", "msecs", "relativeCreated")


class Keep(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def kept(monkeypatch):
    # NOTE: as frontend/gunicorn_conf.py's post_fork sets up a serving process
    monkeypatch.setattr(logging, "_srcfile", None)
    monkeypatch.setattr(logging, "logThreads", False)
    monkeypatch.setattr(logging, "logMultiprocessing", False)
    handler, level, propagate = Keep(), log.level, log.propagate
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
    try:
        yield handler.records
    finally:
        log.removeHandler(handler)
        log.setLevel(level)
        log.propagate = propagate


def info_record(req: falcon.asgi.Request, status: str, latency_ms: float) -> None:
    """The line as Observe wrote it before the template: Logger.info with extra fields."""
    context = req.context
    log.info(ACCESS_FORMAT, req.method, req.path, status, latency_ms, context.request_id, extra={
        "request_id": context.request_id, "method": req.method, "path": req.path, "status": int(status),
        "latency_ms": round(latency_ms, 3), "model": getattr(context, "model", None)})


@pytest.mark.parametrize("model", ["iris.onnx", None])
def test_the_template_record_is_the_info_record(kept, model):
    req = falcon.testing.create_asgi_req(method="POST", path="/api/v1/models/iris.onnx/prediction")
    req.context.request_id = "access-1"
    if model is not None:
        req.context.model = model
    info_record(req, "200", 1.23456)
    Observe(server_timing=False, metrics=FrontendMetrics.disabled())._log(req, req.context, "200", 1.23456)
    old, new = kept
    for name in TIME_FIELDS:
        setattr(new, name, getattr(old, name))
    assert new.__dict__ == old.__dict__
    for fmt in ("text", "json"):
        made = formatter("frontend", fmt, node="node-1")
        assert made.format(new) == made.format(old)
        assert "access-1" in made.format(new)


def test_the_logger_filters_still_apply(kept):
    req = falcon.testing.create_asgi_req(method="GET", path="/api/v1/models")
    req.context.request_id = "access-2"
    log.addFilter(drop := lambda record: False)
    try:
        Observe(server_timing=False, metrics=FrontendMetrics.disabled())._log(req, req.context, "200", 0.5)
    finally:
        log.removeFilter(drop)
    assert kept == []
