"""The direct client: users and the frontend both call the broker through it.

`Client` is synchronous and thread-safe: each thread gets its own DEALER socket (made once, on its
first call), so gunicorn threads never share a socket and no call pays a thread hand-off.
`AsyncClient` keeps any number of requests in flight on one socket. Both match replies to calls by
the request id in the msgpack body, so a late reply to a call that timed out is dropped, never
mistaken for the answer to the next call.
"""
from __future__ import annotations

import asyncio
import itertools
import secrets
import threading
import time
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import zmq
import zmq.asyncio

from . import protocol as p
from .curve import PeerKeys
from .errors import FractalError, NoWorkerAvailable, ProtocolError, Timeout
from .sockets import NOBLOCK, POLLOUT, send_frames, wait

DEFAULT_SERVICE = "modelhost"
CONNECT_WAIT_S = 1.0  # how long a call waits for the TCP connection to the broker to come up

Inputs = Mapping[str, Any] | Sequence[Any]


def _outputs(result: dict) -> dict[str, np.ndarray]:
    return result["outputs"]


def _model_list(result: dict) -> list[str]:
    return result["models"]


class _Operations:
    """The operations of docs/protocol.md, written once for both clients over their `_do`."""

    def _do(self, op: str, fields: dict, post: Callable[[Any], Any] | None, timeout_s: float | None):
        raise NotImplementedError

    def predict(self, model: str, inputs: Inputs, outputs: Sequence[str] | None = None, *,
                timeout_s: float | None = None, request_id: str | None = None):
        """Run `model` on `inputs` (by input name, or positional); returns {output name: array}.

        Raises ModelNotFound, BadInput (wrong names, dtypes or shapes: the message says what the
        model expects), Timeout, Overloaded or NoWorkerAvailable.
        """
        fields: dict[str, Any] = {"model": p.model_file_name(model), "inputs": inputs}
        if outputs is not None:
            fields["outputs"] = list(outputs)
        return self._do("predict", _traced(fields, request_id), _outputs, timeout_s)

    def predict_image(self, model: str, image: bytes, outputs: Sequence[str] | None = None, *,
                      timeout_s: float | None = None, request_id: str | None = None):
        """Run a one-input image model on an encoded image (JPEG, PNG, ...); the worker decodes it,
        matches the model's channels, layout and size and scales pixels to [0, 1]."""
        fields: dict[str, Any] = {"model": p.model_file_name(model), "image": image}
        if outputs is not None:
            fields["outputs"] = list(outputs)
        return self._do("predict_image", _traced(fields, request_id), _outputs, timeout_s)

    def models(self, *, timeout_s: float | None = None, request_id: str | None = None):
        """Names of the models in the pool, sorted."""
        return self._do("models", _traced({}, request_id), _model_list, timeout_s)

    def information(self, *, timeout_s: float | None = None, request_id: str | None = None):
        """[{"model", "description"}] for every model, sorted by name."""
        return self._do("information", _traced({}, request_id), _model_list, timeout_s)

    def model_info(self, model: str, *, timeout_s: float | None = None, request_id: str | None = None):
        """Description, inputs, outputs, size and last change of one model."""
        return self._do("info", _traced({"model": p.model_file_name(model)}, request_id), None, timeout_s)

    def describe(self, model: str, description: str, *, timeout_s: float | None = None,
                 request_id: str | None = None):
        """Set a model's description; returns {"model", "description"}."""
        fields = {"model": p.model_file_name(model), "description": description}
        return self._do("describe", _traced(fields, request_id), None, timeout_s)

    def upload(self, model: str, data: bytes, description: str | None = None, *,
               timeout_s: float | None = None, request_id: str | None = None):
        """Add or atomically replace a model; it is validated in ONNX Runtime before it is visible."""
        fields: dict[str, Any] = {"model": p.model_file_name(model), "data": data}
        if description is not None:
            fields["description"] = description
        return self._do("upload", _traced(fields, request_id), None, timeout_s)

    def delete(self, model: str, *, timeout_s: float | None = None, request_id: str | None = None):
        """Remove a model and its description from the pool."""
        return self._do("delete", _traced({"model": p.model_file_name(model)}, request_id), None, timeout_s)

    def load(self, model: str, *, timeout_s: float | None = None, request_id: str | None = None):
        """Serve a model again after unload, and warm it on the worker that answers."""
        return self._do("load", _traced({"model": p.model_file_name(model)}, request_id), None, timeout_s)

    def unload(self, model: str, *, timeout_s: float | None = None, request_id: str | None = None):
        """Stop serving a model (its file stays); workers drop its session within a heartbeat."""
        return self._do("unload", _traced({"model": p.model_file_name(model)}, request_id), None, timeout_s)

    def repository(self, *, timeout_s: float | None = None, request_id: str | None = None):
        """[{"name", "version", "state": READY | UNAVAILABLE, "reason"}] for every model."""
        return self._do("repository", _traced({}, request_id), _model_list, timeout_s)

    def echo(self, data: Any, *, timeout_s: float | None = None, request_id: str | None = None):
        """Send `data` to a worker and back; returns {"data", "node"}: which worker answered."""
        return self._do("echo", _traced({"data": data}, request_id), None, timeout_s)


def _traced(fields: dict, request_id: str | None) -> dict:
    if request_id:
        fields["request_id"] = request_id
    return fields


_ids = itertools.count(1)
# Request ids for calls whose caller gave none: unique per process without a uuid per call.
_REQUEST_ID_PREFIX = f"client-{secrets.token_hex(4)}"
_request_ids = itertools.count(1)


def _with_request_id(fields: dict) -> dict:
    """`fields` with a request id, so every request can be followed through the worker's log."""
    if fields.get("request_id"):
        return fields
    return {**fields, "request_id": f"{_REQUEST_ID_PREFIX}-{next(_request_ids)}"}


class Client(_Operations):
    """Synchronous client; use as a context manager or call close()."""

    def __init__(self, endpoint: str, service: str = DEFAULT_SERVICE, timeout_s: float = 30.0,
                 context: zmq.Context | None = None, curve: PeerKeys | None = None):
        self.endpoint = endpoint
        self.service = service.encode()
        self.timeout_s = timeout_s
        self.curve = curve
        self._context = context or zmq.Context.instance()
        self._local = threading.local()
        self._sockets: list[zmq.Socket] = []
        self._lock = threading.Lock()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        with self._lock:
            for sock in self._sockets:
                sock.close(linger=0)
            self._sockets.clear()
            self._local = threading.local()

    def _socket(self) -> zmq.Socket:
        sock = getattr(self._local, "socket", None)
        if sock is None:
            sock = _connect(self._context.socket(zmq.DEALER), self.endpoint, self.curve)
            with self._lock:
                self._sockets.append(sock)
            self._local.socket = sock
        return sock

    def _do(self, op, fields, post, timeout_s):
        result = self.call(op, fields, timeout_s)
        return post(result) if post else result

    def call(self, op: str, fields: dict | None = None, timeout_s: float | None = None) -> Any:
        """Send one request and wait for its reply; returns the result or raises its FractalError."""
        return self.call_many([(op, fields or {})], timeout_s)[0]

    def call_many(self, calls: Iterable[tuple[str, dict]], timeout_s: float | None = None,
                  window: int = 64, return_exceptions: bool = False) -> list:
        """Pipeline many requests, at most `window` in flight; results come back in call order.

        With return_exceptions, a failed call's FractalError takes its place in the list instead of
        being raised. `timeout_s` bounds the whole batch.
        """
        sock = self._socket()
        deadline = time.monotonic() + (self.timeout_s if timeout_s is None else timeout_s)
        pending: dict[int, int] = {}
        results: list = []
        calls = iter(calls)
        exhausted = False
        while True:
            while not exhausted and len(pending) < window:
                call = next(calls, None)
                if call is None:
                    exhausted = True
                    break
                rid = next(_ids)
                pending[rid] = len(results)
                results.append(None)
                _send(sock, [p.CLIENT_HEADER, p.MDPC.REQUEST, self.service,
                             *p.request_body(rid, call[0], _with_request_id(call[1]))], deadline, self.endpoint)
            if not pending:
                return results
            rid, outcome = self._receive(sock, pending, deadline)
            index = pending.pop(rid)
            if isinstance(outcome, FractalError) and not return_exceptions:
                raise outcome
            results[index] = outcome

    def _receive(self, sock: zmq.Socket, pending: dict, deadline: float) -> tuple[int, Any]:
        while True:
            remaining_ms = int((deadline - time.monotonic()) * 1000)
            if remaining_ms <= 0 or not wait(sock, remaining_ms):
                raise Timeout(f"no reply from the broker at {self.endpoint} in time "
                              f"({len(pending)} requests outstanding)")
            frames = sock.recv_multipart()
            try:
                _command, _service, body = p.parse_client_reply(frames)
                reply = p.unpack_body(body)
            except ProtocolError:
                continue  # not ours (e.g. a late MMI answer); nothing to match it to
            if isinstance(reply, dict) and type(reply.get("id")) is int and reply["id"] in pending:
                try:
                    return reply["id"], p.result_of(reply)
                except FractalError as exc:
                    return reply["id"], exc

    def service_ready(self, service: str | None = None, timeout_s: float = 2.0) -> bool:
        """MMI (RFC 8): does the broker have at least one worker for the service?"""
        return self._mmi(p.MMI_SERVICE, service.encode() if service else self.service, timeout_s) == b"200"

    def broker_status(self, timeout_s: float = 2.0) -> dict | None:
        """The broker's view (our `mmi.workers` extension): services, and each worker's node, state,
        heartbeat age, requests served and models resident; None when the broker does not answer."""
        reply = self._mmi(p.MMI_WORKERS, b"", timeout_s)
        return p.unpack(reply) if reply else None

    def _mmi(self, service: bytes, body: bytes, timeout_s: float) -> bytes | None:
        sock = self._socket()
        deadline = time.monotonic() + timeout_s
        try:
            _send(sock, [p.CLIENT_HEADER, p.MDPC.REQUEST, service, body], deadline, self.endpoint)
        except NoWorkerAvailable:
            return None
        while (remaining_ms := int((deadline - time.monotonic()) * 1000)) > 0:
            if not wait(sock, remaining_ms):
                break
            frames = sock.recv_multipart()
            if len(frames) == 4 and frames[2] == service:
                return frames[3]
        return None


def _connect(sock: zmq.Socket, endpoint: str, curve: PeerKeys | None = None) -> zmq.Socket:
    sock.linger = 0
    if curve is not None:
        curve.apply(sock)
    # NOTE: IMMEDIATE makes a send fail fast while the broker is unreachable instead of queueing
    # requests that would only time out; the caller turns that into NoWorkerAvailable (503).
    sock.setsockopt(zmq.IMMEDIATE, 1)
    sock.connect(endpoint)
    return sock


def _send(sock: zmq.Socket, frames: list, deadline: float, endpoint: str) -> None:
    try:
        send_frames(sock, frames, NOBLOCK)
        return
    except zmq.Again:
        pass
    wait_ms = int(min(CONNECT_WAIT_S, deadline - time.monotonic()) * 1000)
    if wait_ms > 0 and wait(sock, wait_ms, POLLOUT):
        try:
            send_frames(sock, frames, NOBLOCK)
            return
        except zmq.Again:
            pass
    raise NoWorkerAvailable(f"cannot reach the broker at {endpoint}")


class AsyncClient(_Operations):
    """asyncio client: one socket, any number of concurrent calls; use `async with` or aclose()."""

    def __init__(self, endpoint: str, service: str = DEFAULT_SERVICE, timeout_s: float = 30.0,
                 context: zmq.asyncio.Context | None = None, curve: PeerKeys | None = None):
        self.endpoint = endpoint
        self.service = service.encode()
        self.timeout_s = timeout_s
        self.curve = curve
        self._context = context or zmq.asyncio.Context.instance()
        self._socket: zmq.asyncio.Socket | None = None
        self._pending: dict[int, asyncio.Future] = {}
        self._reader: asyncio.Task | None = None

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            try:
                await self._reader
            except asyncio.CancelledError:
                pass
            self._reader = None
        if self._socket is not None:
            self._socket.close(linger=0)
            self._socket = None
        for future in self._pending.values():
            if not future.done():
                future.set_exception(NoWorkerAvailable("client closed"))
        self._pending.clear()

    async def _do(self, op, fields, post, timeout_s):
        result = await self.call(op, fields, timeout_s)
        return post(result) if post else result

    async def call(self, op: str, fields: dict | None = None, timeout_s: float | None = None) -> Any:
        """Send one request and await its reply; returns the result or raises its FractalError."""
        if self._socket is None:
            self._socket = _connect(self._context.socket(zmq.DEALER), self.endpoint, self.curve)
            self._reader = asyncio.ensure_future(self._read())
        timeout_s = self.timeout_s if timeout_s is None else timeout_s
        rid = next(_ids)
        future = asyncio.get_running_loop().create_future()
        self._pending[rid] = future
        try:
            frames = [p.CLIENT_HEADER, p.MDPC.REQUEST, self.service,
                      *p.request_body(rid, op, _with_request_id(fields or {}))]
            await self._send(frames, time.monotonic() + timeout_s)
            return await asyncio.wait_for(future, timeout_s)
        except asyncio.TimeoutError:
            raise Timeout(f"no reply from the broker at {self.endpoint} within {timeout_s:g} s") from None
        finally:
            self._pending.pop(rid, None)

    async def _send(self, frames: list, deadline: float) -> None:
        try:
            await self._socket.send_multipart(frames, zmq.NOBLOCK)
            return
        except zmq.Again:
            pass
        wait_s = min(CONNECT_WAIT_S, deadline - time.monotonic())
        if wait_s > 0 and await self._socket.poll(int(wait_s * 1000), zmq.POLLOUT):
            await self._socket.send_multipart(frames)
            return
        raise NoWorkerAvailable(f"cannot reach the broker at {self.endpoint}")

    async def _read(self) -> None:
        while True:
            frames = await self._socket.recv_multipart()
            try:
                _command, _service, body = p.parse_client_reply(frames)
                reply = p.unpack_body(body)
            except ProtocolError:
                continue
            rid = reply.get("id") if isinstance(reply, dict) else None
            future = self._pending.get(rid) if type(rid) is int else None
            if future is None or future.done():
                continue
            try:
                future.set_result(p.result_of(reply))
            except FractalError as exc:
                future.set_exception(exc)
