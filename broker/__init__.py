"""The MDP/0.2 broker, the wire protocol shared by every component, and the direct client.

Names are imported on first use, so `import broker.settings` (the frontend's gunicorn config does
it before prometheus-client may be imported) pulls in nothing heavier than it needs.
"""
from importlib import import_module

_WHERE = {
    "Broker": ".broker", "BrokerSettings": ".broker", "AsyncClient": ".client", "Client": ".client",
    **dict.fromkeys(["BadInput", "ConfigError", "FractalError", "InternalError", "ModelNotFound",
                     "ModelNotReady", "ModelUnloaded", "NoWorkerAvailable", "Overloaded", "PayloadTooLarge",
                     "ProtocolError", "QueueFull", "RetryLater", "Timeout", "UnsupportedMediaType", "WorkerLost"],
                    ".errors"),
}
__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module 'broker' has no attribute {name!r}")
    return getattr(import_module(_WHERE[name], __name__), name)
