"""The MDP/0.2 broker, the wire protocol shared by every component, and the direct client."""
from .broker import Broker, BrokerSettings
from .client import AsyncClient, Client
from .errors import (BadInput, ConfigError, FractalError, InternalError, ModelNotFound, NoWorkerAvailable,
                     Overloaded, PayloadTooLarge, ProtocolError, RetryLater, Timeout, UnsupportedMediaType,
                     WorkerLost)

__all__ = [
    "AsyncClient", "BadInput", "Broker", "BrokerSettings", "Client", "ConfigError", "FractalError",
    "InternalError", "ModelNotFound", "NoWorkerAvailable", "Overloaded", "PayloadTooLarge", "RetryLater",
    "ProtocolError", "Timeout", "UnsupportedMediaType", "WorkerLost",
]
