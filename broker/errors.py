"""FractalError and its subclasses: raised on purpose, carried over the wire by name, mapped to HTTP."""
from __future__ import annotations


class FractalError(Exception):
    """Root of every error we raise on purpose; `http_status` is what the REST API answers with."""

    http_status = 500
    retry_after_s: float | None = None
    headers: dict[str, str] = {}  # extra HTTP headers the frontend sends with this error

    def __init__(self, message: str = "") -> None:
        super().__init__(message or self.__class__.__doc__ or self.__class__.__name__)

    @property
    def message(self) -> str:
        return str(self)


class BadInput(FractalError):
    """The request is malformed or does not fit the model."""
    http_status = 400


class ProtocolError(BadInput):
    """A frame or body that breaks MDP/0.2 or our body schema; logged and dropped by servers."""


class Unauthorized(FractalError):
    """No credentials: send Authorization: Bearer <token>."""
    http_status = 401
    headers = {"WWW-Authenticate": 'Bearer realm="fractal"'}


class Forbidden(FractalError):
    """The credentials do not allow this."""
    http_status = 403


class ModelNotFound(FractalError):
    """No model of that name in the pool."""
    http_status = 404


class ModelUnloaded(ModelNotFound):
    """The model is in the pool but was unloaded; load it again to serve it."""


class PayloadTooLarge(FractalError):
    """A body, model or image over the configured limit."""
    http_status = 413


class ModelTooLarge(PayloadTooLarge):
    """The model needs more memory than the worker's memory budget can ever give it (worker/sessions.py)."""
    http_status = 507  # Insufficient Storage: no retry helps until the budget or the pins change


class UnsupportedMediaType(FractalError):
    """A content or image type the server does not read."""
    http_status = 415


class RetryLater(FractalError):
    """The service cannot take the request now; the same request may succeed in a moment."""
    http_status = 503
    retry_after_s = 1.0


class Overloaded(RetryLater):
    """The broker's queue for the service is full; retry later."""


class QueueFull(Overloaded):
    """The broker's queue for this model (or for the whole service) is full; retry after a moment.
    429, not 503: the server is up and serving other models; this caller should slow down."""
    http_status = 429


class NoWorkerAvailable(RetryLater):
    """No live worker is registered for the service."""


class ModelNotReady(RetryLater):
    """Repository polling has not yet validated any version of the model's file on this worker."""


class WorkerLost(RetryLater):
    """The workers handling the request died twice in a row."""


class BrokerLost(RetryLater):
    """The connection to the broker dropped while the request was in flight, and the request is not
    safe to repeat (protocol.REPEATABLE_OPS): it may or may not have been carried out."""


class Timeout(FractalError):
    """The request's deadline passed before a reply came."""
    http_status = 504


class ConfigError(FractalError):
    """Bad flag or env value; main() exits with it."""


class InternalError(FractalError):
    """An unexpected failure; the message carries a request id that also appears in the logs."""


def _subclasses(cls: type) -> list[type]:
    found: list[type] = []
    sub: type
    for sub in cls.__subclasses__():
        found.append(sub)
        found.extend(_subclasses(sub))
    return found


_BY_NAME = {cls.__name__: cls for cls in [FractalError, *_subclasses(FractalError)]}


def error_from_wire(name: str, message: str) -> FractalError:
    """Rebuild the error a peer reported; an unknown name becomes a plain FractalError."""
    cls = _BY_NAME.get(name, FractalError)
    return cls(message)
