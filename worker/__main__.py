"""`python -m worker` / `fractal worker`: run one modelhost worker."""
from __future__ import annotations

import sys
from typing import Sequence

from broker.runner import run_component

from .modelhost import ModelHost, WorkerSettings


def main(argv: Sequence[str] | None = None) -> int:
    return run_component("worker", "Modelhost worker: serves ONNX models from the shared pool over MDP/0.2.",
                         WorkerSettings, ModelHost, argv)


if __name__ == "__main__":
    sys.exit(main())
