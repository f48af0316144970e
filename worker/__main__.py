"""`python -m worker` / `fractal worker`: run one worker."""
from __future__ import annotations

import logging
import sys
from typing import Sequence

from broker import heap
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
    heap.settle()  # NOTE: what is loaded by now (ONNX Runtime, numpy, ZeroMQ) lives as long as the process
    return run_component("worker", "Worker: serves the ONNX models of the shared pool to the broker over MDP/0.2.",
                         WorkerSettings, ModelHost, argv)


if __name__ == "__main__":
    sys.exit(main())
