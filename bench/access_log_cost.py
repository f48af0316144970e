"""CPU of one access line in process: Logger.info with extra fields against Observe's record template,
each through the real handler set-up (a StreamHandler to /dev/null, text or JSON) of a serving process.

    python bench/access_log_cost.py [--lines 50000] [--rounds 5]
"""
from __future__ import annotations

import argparse
import logging
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import falcon.testing  # noqa: E402

from broker.logs import formatter  # noqa: E402
from frontend.observe import ACCESS_FORMAT, Observe, log  # noqa: E402
from metrics import FrontendMetrics  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lines", type=int, default=50_000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    logging._srcfile = None  # NOTE: as frontend/gunicorn_conf.py's post_fork
    logging.logThreads = False
    logging.logMultiprocessing = False
    req = falcon.testing.create_asgi_req(method="POST", path="/api/v1/models/iris.onnx/prediction")
    context = req.context
    context.request_id, context.model = "0123456789abcdef0123456789abcdef", "iris.onnx"
    observe = Observe(server_timing=False, metrics=FrontendMetrics.disabled())

    def info() -> None:
        log.info(ACCESS_FORMAT, req.method, req.path, "200", 1.234, context.request_id, extra={
            "request_id": context.request_id, "method": req.method, "path": req.path, "status": 200,
            "latency_ms": 1.234, "model": context.model})

    def template() -> None:
        observe._log(req, context, "200", 1.234)

    with open("/dev/null", "w") as sink:
        for fmt in ("text", "json"):
            handler = logging.StreamHandler(sink)
            handler.setFormatter(formatter("frontend", fmt, "node-1"))
            root = logging.getLogger()
            root.handlers[:] = [handler]
            root.setLevel(logging.INFO)
            for name, fn in (("log.info", info), ("template", template)):
                runs = []
                for _ in range(args.rounds):
                    started = time.process_time()
                    for _ in range(args.lines):
                        fn()
                    runs.append((time.process_time() - started) / args.lines * 1e6)
                print(f"{fmt:5} {name:9} {statistics.median(runs):6.2f} us per line (median of {args.rounds})")


if __name__ == "__main__":
    main()
