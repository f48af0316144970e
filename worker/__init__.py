"""The worker: ONNX Runtime sessions over the shared model pool, served over MDP/0.2."""
from .modelhost import ModelHost, WorkerSettings
from .pool import ModelPool

__all__ = ["ModelHost", "ModelPool", "WorkerSettings"]
