"""The Open Inference Protocol over gRPC (Triton's GRPCInferenceService), an asyncio server of its own.

Run it with `fractal grpc` (or `fractal serve`, beside the REST frontend). It reaches the models
through the broker like the REST frontend and shares its errors, tokens, deadlines and request ids.
"""
from .server import GrpcServer
from .settings import GrpcSettings

__all__ = ["GrpcServer", "GrpcSettings"]
