"""The worker: ONNX Runtime sessions over the shared model pool, served over MDP/0.2."""
from .modelhost import ModelHost
from .pool import ModelPool
from .settings import WorkerSettings

__all__ = ["ModelHost", "ModelPool", "WorkerSettings"]
