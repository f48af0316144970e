"""`python -m worker` / `fractal worker`: run one worker."""
from __future__ import annotations

import sys
from typing import Sequence

from broker.runner import run_component

from .modelhost import ModelHost
from .settings import WorkerSettings


def main(argv: Sequence[str] | None = None) -> int:
    return run_component("worker", "Worker: serves the ONNX models of the shared pool to the broker over MDP/0.2.",
                         WorkerSettings, ModelHost, argv)


if __name__ == "__main__":
    sys.exit(main())
