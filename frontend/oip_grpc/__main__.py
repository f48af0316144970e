"""`python -m frontend.oip_grpc` / `fractal grpc`: the Open Inference Protocol over gRPC."""
from __future__ import annotations

import sys
from typing import Sequence

from broker.runner import run_component

from .server import GrpcServer
from .settings import GrpcSettings


def main(argv: Sequence[str] | None = None) -> int:
    return run_component("grpc", "Open Inference Protocol over gRPC (Triton's GRPCInferenceService), through "
                         "the broker.", GrpcSettings, GrpcServer, argv)


if __name__ == "__main__":
    sys.exit(main())
