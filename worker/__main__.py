"""`python -m worker` / `fractal worker`: run one worker."""
from __future__ import annotations

import gc
import logging
import sys
from typing import Sequence

from broker.runner import run_component

from .modelhost import ModelHost
from .settings import WorkerSettings


def main(argv: Sequence[str] | None = None) -> int:
    # NOTE: a worker logs a line per request (log_requests). No format of ours shows the caller's file and
    # line, the thread or the multiprocessing name, so their lookups (a stack walk per record) are turned
    # off, as the logging HOWTO's "Optimization" section describes: about 1.5 us a line less.
    logging._srcfile = None
    logging.logThreads = False
    logging.logMultiprocessing = False
    # NOTE: what is loaded by now (ONNX Runtime, numpy, ZeroMQ, prometheus_client: most of the heap) lives
    # as long as the process: frozen, no collection walks it again. A request leaves a few dozen short-
    # lived containers; a young collection per 10,000 of them instead of 700 costs less per request
    # (measured in process: a pack's request 13.5 -> 12.2 us).
    gc.freeze()
    gc.set_threshold(10_000, 10, 10)
    return run_component("worker", "Worker: serves the ONNX models of the shared pool to the broker over MDP/0.2.",
                         WorkerSettings, ModelHost, argv)


if __name__ == "__main__":
    sys.exit(main())
