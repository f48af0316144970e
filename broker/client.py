"""The direct client: users and the frontend both call the broker through it.

`Client` is synchronous and thread-safe: each thread gets its own DEALER socket (made once, on its
first call), so gunicorn threads never share a socket and no call pays a thread hand-off.
`AsyncClient` keeps any number of requests in flight on one socket. Both match replies to calls by
the request id in the msgpack body, so a late reply to a call that timed out is dropped, never
mistaken for the answer to the next call.

When the connection to the broker drops (it died and `fractal serve` restarts it), a monitor on the
socket says so: calls in flight whose operation is safe to repeat (protocol.REPEATABLE_OPS) are sent
again, under the same id, once the connection is back; the others fail at once with BrokerLost (503),
since they may have been carried out. Each call's own timeout still bounds it.

Given several broker endpoints (a list, or "tcp://a:5555,tcp://b:5555"), a client connects to all of
them and sends every request to one, its current broker. When that connection drops (or, for a host
cut off the network, falls silent for LINK_TIMEOUT_S), the client fails over to the next broker that
is up, with the same rule: repeatable calls go again under their ids (the first reply per id wins,
so no caller sees two), the others fail with BrokerLost; no call is ever sent to two brokers but
those. A broker that comes back is a spare until the current one is lost (docs/protocol.md, "Two brokers").
"""
from __future__ import annotations

import asyncio
import itertools
import secrets
import threading
import time
from collections import deque
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import zmq
from zmq.backend import zmq_poll
from zmq.utils.monitor import parse_monitor_message

from metrics import tracing

from . import protocol as p
from .curve import PeerKeys
from .errors import BadInput, BrokerLost, FractalError, NoWorkerAvailable, ProtocolError, Timeout
from .pacing import Pacing
from .settings import endpoint_list
from .sockets import NOBLOCK, POLLIN, POLLOUT, drain, readable, recv_frames, recv_within, send_frames, wait

DEFAULT_SERVICE = "modelhost"
CONNECT_WAIT_S = 1.0  # how long a call waits for the TCP connection to the broker to come up
SEND_RETRY_S = 0.005  # AsyncClient: how often a send the broker's connection refused is tried again
MAX_DRAIN = 256       # AsyncClient: replies handled per wake-up before other callbacks get a turn
PACK_LOOKAHEAD = 4 * 64  # AsyncClient: calls looked at for one pack's model (bounds the work per message)
RECONNECT_WAIT_S = 15.0  # after the broker connection drops, how long repeatable calls wait for it
SWEEP_GAP_S = 0.005  # AsyncClient: least time between two deadline sweeps (a timeout fires this late at most)
LINK_EVENTS = zmq.EVENT_DISCONNECTED | zmq.EVENT_HANDSHAKE_SUCCEEDED
# With several brokers: ZMTP heartbeats find a broker whose host is cut off (no FIN, no RST) within
# LINK_TIMEOUT_S + LINK_PING_S; libzmq's I/O thread answers them, so a busy broker is not mistaken for one.
LINK_PING_S = 0.25
LINK_TIMEOUT_S = 1.0
# A new client waits this long for the first broker of its list before it takes a later one that is up
# first: all clients on one broker keep each worker to one request at a time (docs/protocol.md).
FIRST_CHOICE_WAIT_S = 0.25
# Client.call first waits for its reply on the current broker's socket alone (one blocking receive inside
# libzmq, instead of a poll over every socket and monitor and then a receive), up to this long; then it
# watches the connection events too. So a connection that drops in a call's first QUICK_WAIT_S is seen
# that much later at most; a reply, which is what almost every call gets first, comes sooner.
QUICK_WAIT_S = 0.05

Inputs = Mapping[str, Any] | Sequence[Any]


def _outputs(result: dict) -> dict[str, np.ndarray]:
    return result["outputs"]


def _outputs_timed(timing: dict | None) -> Callable[[dict], dict[str, np.ndarray]]:
    """_outputs, also copying the reply's timing map (docs/protocol.md, "Timing") into `timing`, and the
    version that served the call, when the reply names one."""
    if timing is None:
        return _outputs

    def post(result: dict) -> dict[str, np.ndarray]:
        reported = result.get("timing")
        if isinstance(reported, dict):
            timing.update(reported)
        if "version" in result:  # the version that served it (a version directory's), for spans and logs
            timing["version"] = result["version"]
        return result["outputs"]
    return post


def _model_list(result: dict) -> list[str]:
    return result["models"]


class _Operations:
    """The operations of docs/protocol.md, written once for both clients over their `_do`."""

    def _do(self, op: str, fields: dict, post: Callable[[Any], Any] | None, timeout_s: float | None):
        raise NotImplementedError

    def predict(self, model: str, inputs: Inputs, outputs: Sequence[str] | None = None, *,
                version: int | str | None = None, timeout_s: float | None = None, request_id: str | None = None,
                timing: dict | None = None):
        """Run `model` on `inputs` (by input name, or positional); returns {output name: array}.
        A `timing` dict receives the worker's own times in ms (worker_ms, inference_ms).

        `version` picks one of the model's versions (default: the newest its version_policy serves).
        Raises ModelNotFound (also for a version it does not serve), BadInput (wrong names, dtypes or
        shapes: the message says what the model expects), Timeout, Overloaded or NoWorkerAvailable.
        """
        fields: dict[str, Any] = _versioned({"model": p.model_file_name(model), "inputs": inputs}, version)
        if outputs is not None:
            fields["outputs"] = list(outputs)
        return self._do("predict", _traced(fields, request_id), _outputs_timed(timing), timeout_s)

    def infer(self, model: str, inputs: Inputs, outputs: Sequence[str] | None = None, *,
              version: int | str | None = None, timeout_s: float | None = None, request_id: str | None = None,
              timing: dict | None = None):
        """As predict, but returns ({output name: array}, the version that answered: "1" for a flat file)."""
        fields: dict[str, Any] = _versioned({"model": p.model_file_name(model), "inputs": inputs}, version)
        if outputs is not None:
            fields["outputs"] = list(outputs)
        return self._do("predict", _traced(fields, request_id), _versioned_outputs(timing), timeout_s)

    def predict_image(self, model: str, image: bytes, outputs: Sequence[str] | None = None, *,
                      version: int | str | None = None, timeout_s: float | None = None, request_id: str | None = None,
                      timing: dict | None = None):
        """Run a one-input image model on an encoded image (JPEG, PNG, ...); the worker decodes it,
        matches the model's channels, layout and size and scales pixels to [0, 1]. `timing`: as predict's."""
        fields: dict[str, Any] = _versioned({"model": p.model_file_name(model), "image": image}, version)
        if outputs is not None:
            fields["outputs"] = list(outputs)
        return self._do("predict_image", _traced(fields, request_id), _outputs_timed(timing), timeout_s)

    def models(self, *, timeout_s: float | None = None, request_id: str | None = None):
        """Names of the models in the pool, sorted."""
        return self._do("models", _traced({}, request_id), _model_list, timeout_s)

    def information(self, *, timeout_s: float | None = None, request_id: str | None = None):
        """[{"model", "description"}] for every model, sorted by name."""
        return self._do("information", _traced({}, request_id), _model_list, timeout_s)

    def model_info(self, model: str, *, version: int | str | None = None, timeout_s: float | None = None,
                   request_id: str | None = None):
        """Description, inputs, outputs, size, last change, version and served versions of one model."""
        fields = _versioned({"model": p.model_file_name(model)}, version)
        return self._do("info", _traced(fields, request_id), None, timeout_s)

    def model_config(self, model: str, *, version: int | str | None = None, timeout_s: float | None = None,
                     request_id: str | None = None):
        """Inputs, outputs, max_batch_size and dynamic_batching of one model, as a worker serves it."""
        return self._do("config", _traced(_versioned({"model": model}, version), request_id), None, timeout_s)

    def describe(self, model: str, description: str, *, timeout_s: float | None = None,
                 request_id: str | None = None):
        """Set a model's description; returns {"model", "description"}."""
        fields = {"model": p.model_file_name(model), "description": description}
        return self._do("describe", _traced(fields, request_id), None, timeout_s)

    def upload(self, model: str, data: bytes, description: str | None = None, *,
               version: int | str | None = None, timeout_s: float | None = None, request_id: str | None = None):
        """Add or atomically replace a model (a version: NAME/VERSION/model.onnx; none: the flat file);
        it is validated in ONNX Runtime before it is visible."""
        fields: dict[str, Any] = _versioned({"model": p.model_file_name(model), "data": data}, version)
        if description is not None:
            fields["description"] = description
        return self._do("upload", _traced(fields, request_id), None, timeout_s)

    def delete(self, model: str, *, version: int | str | None = None, timeout_s: float | None = None,
               request_id: str | None = None):
        """Remove a model and its description from the pool."""
        fields = _versioned({"model": p.model_file_name(model)}, version)
        return self._do("delete", _traced(fields, request_id), None, timeout_s)

    def load(self, model: str, *, version: int | str | None = None, timeout_s: float | None = None,
             request_id: str | None = None):
        """Serve a model again after unload, and warm it on the worker that answers."""
        fields = _versioned({"model": p.model_file_name(model)}, version)
        return self._do("load", _traced(fields, request_id), None, timeout_s)

    def unload(self, model: str, *, version: int | str | None = None, timeout_s: float | None = None,
               request_id: str | None = None):
        """Stop serving a model (its file stays); workers drop its session within a heartbeat."""
        fields = _versioned({"model": p.model_file_name(model)}, version)
        return self._do("unload", _traced(fields, request_id), None, timeout_s)

    def repository(self, *, timeout_s: float | None = None, request_id: str | None = None):
        """[{"name", "version", "state": READY | UNAVAILABLE, "reason"}] for every model."""
        return self._do("repository", _traced({}, request_id), _model_list, timeout_s)

    def echo(self, data: Any, *, timeout_s: float | None = None, request_id: str | None = None):
        """Send `data` to a worker and back; returns {"data", "node"}: which worker answered."""
        return self._do("echo", _traced({"data": data}, request_id), None, timeout_s)


def _versioned_outputs(timing: dict | None) -> Callable[[dict], tuple[dict, str]]:
    """(outputs, the version that answered) of a predict's result, its timing copied as _outputs_timed's."""
    outputs = _outputs_timed(timing)

    def post(result: dict) -> tuple[dict, str]:
        return outputs(result), str(result.get("version", "1"))
    return post


def _versioned(fields: dict, version: int | str | None) -> dict:
    """`fields` with the model version asked for, if any (docs/protocol.md: a string, "3")."""
    if version is not None:
        fields["version"] = str(version)
    return fields


def _traced(fields: dict, request_id: str | None) -> dict:
    if request_id:
        fields["request_id"] = request_id
    return fields


_ids = itertools.count(1)
_link_ids = itertools.count(1)  # monitor endpoints, unique in the process
_LINK_PREFIX = secrets.token_hex(4)
# Request ids for calls whose caller gave none: unique per process without a uuid per call.
_REQUEST_ID_PREFIX = f"client-{secrets.token_hex(4)}"
_request_ids = itertools.count(1)


def _with_request_id(fields: dict) -> dict:
    """`fields` with a request id, so every request can be followed through the worker's log; with
    tracing on, also the current span's traceparent (metrics/tracing.py)."""
    if tracing.ENABLED:
        fields = tracing.with_traceparent(fields)
    if fields.get("request_id"):
        return fields
    return {**fields, "request_id": f"{_REQUEST_ID_PREFIX}-{next(_request_ids)}"}


class _Link:
    """One thread's DEALER to each broker, and the monitors that say when a connection drops and
    when it is back (EVENT_DISCONNECTED, EVENT_HANDSHAKE_SUCCEEDED); requests go to the current one."""

    def __init__(self, context: zmq.Context, endpoints: Sequence[str], curve: PeerKeys | None):
        pairs = [_connect(context.socket(zmq.DEALER), e, curve, len(endpoints) > 1) for e in endpoints]
        self.socks = [sock for sock, _ in pairs]
        self.monitors = [monitor for _, monitor in pairs]
        self.up = [False] * len(pairs)               # handshake done and not dropped since, per broker
        self.current = 0                             # the broker requests go to
        self.first_choice_until = time.monotonic() + FIRST_CHOICE_WAIT_S
        self.lost_at: float | None = None           # when the connection dropped; None while it is up
        self.failed: dict[int, FractalError] = {}   # calls in flight that end without a reply

    @property
    def sock(self) -> zmq.Socket:
        return self.socks[self.current]

    def close(self) -> None:
        for sock, monitor in zip(self.socks, self.monitors, strict=True):
            sock.disable_monitor()
            monitor.close(linger=0)
            sock.close(linger=0)


class Client(_Operations):
    """Synchronous client; use as a context manager or call close(). `endpoint`: one broker, or
    several (a list or comma-separated) to fail over between."""

    def __init__(self, endpoint: str | Sequence[str], service: str = DEFAULT_SERVICE, timeout_s: float = 30.0,
                 context: zmq.Context | None = None, curve: PeerKeys | None = None):
        self.endpoints = endpoint_list(endpoint)
        self.endpoint = ",".join(self.endpoints)
        self.service = service.encode()
        self.timeout_s = timeout_s
        self.curve = curve
        self._context = context or zmq.Context.instance()
        self._local = threading.local()
        self._links: list[_Link] = []
        self._lock = threading.Lock()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        with self._lock:
            for link in self._links:
                link.close()
            self._links.clear()
            self._local = threading.local()

    def _link(self) -> _Link:
        link = getattr(self._local, "link", None)
        if link is None:
            link = _Link(self._context, self.endpoints, self.curve)
            with self._lock:
                self._links.append(link)
            self._local.link = link
        return link

    def _do(self, op, fields, post, timeout_s):
        result = self.call(op, fields, timeout_s)
        return post(result) if post else result

    def call(self, op: str, fields: dict | None = None, timeout_s: float | None = None) -> Any:
        """Send one request and wait for its reply; returns the result or raises its FractalError."""
        link = self._link()
        link.failed.clear()
        timeout_s = self.timeout_s if timeout_s is None else timeout_s
        deadline = time.monotonic() + timeout_s
        rid = next(_ids)
        frames = _request(self.service, rid, op, fields or {}, timeout_s)
        pending: dict[int, tuple] = {}
        self._send_call(link, pending, op, frames, deadline)
        pending[rid] = (0, op, frames)
        reply = self._quick_reply(link, pending, deadline)
        outcome = (reply if reply is not None else self._receive(link, pending, deadline))[1]
        if isinstance(outcome, FractalError):
            raise outcome
        return outcome

    def call_many(self, calls: Iterable[tuple[str, dict]], timeout_s: float | None = None,
                  window: int = 64, return_exceptions: bool = False) -> list:
        """Pipeline many requests, at most `window` in flight; results come back in call order.

        With return_exceptions, a failed call's FractalError takes its place in the list instead of
        being raised. `timeout_s` bounds the whole batch.
        """
        link = self._link()
        link.failed.clear()
        deadline = time.monotonic() + (self.timeout_s if timeout_s is None else timeout_s)
        pending: dict[int, tuple[int, str, list]] = {}  # id -> (index in results, op, frames)
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
                frames = _request(self.service, rid, call[0], call[1], deadline - time.monotonic())
                self._send_call(link, pending, call[0], frames, deadline)
                pending[rid] = (len(results), call[0], frames)
                results.append(None)
            if not pending:
                return results
            rid, outcome = self._receive(link, pending, deadline)
            index = pending.pop(rid)[0]
            if isinstance(outcome, FractalError) and not return_exceptions:
                raise outcome
            results[index] = outcome

    def _send_call(self, link: _Link, pending: dict, op: str, frames: list, deadline: float) -> None:
        """Send one request; while the broker is known to be away, a repeatable one waits for it (up
        to RECONNECT_WAIT_S after the drop) and any other fails at once."""
        self._watch(link, pending, deadline)
        wait_s = CONNECT_WAIT_S
        if link.lost_at is not None:
            if op not in p.REPEATABLE_OPS:
                raise NoWorkerAvailable(f"the connection to the broker at {self.endpoint} is down; retry later")
            wait_s = link.lost_at + RECONNECT_WAIT_S - time.monotonic()
        if len(link.socks) == 1:
            _send(link.sock, frames, deadline, self.endpoint, wait_s)
            return
        end = min(deadline, time.monotonic() + wait_s)
        while True:  # NOTE: IMMEDIATE: a socket takes a send only while its broker's connection is up
            try:
                send_frames(link.sock, frames, NOBLOCK)
                return
            except zmq.Again:
                pass
            now = time.monotonic()
            remaining_ms = int((end - now) * 1000)
            if remaining_ms <= 0:
                raise NoWorkerAvailable(f"cannot reach any broker at {self.endpoint}")
            if now < link.first_choice_until:
                remaining_ms = min(remaining_ms, int((link.first_choice_until - now) * 1000) + 1)
            zmq_poll([(link.sock, POLLOUT), *((m, POLLIN) for m in link.monitors)], remaining_ms)
            self._watch(link, pending, deadline)

    def _watch(self, link: _Link, pending: Mapping[int, tuple[int, str, list]], deadline: float) -> None:
        """Handle the link's connection events: when the current broker's connection drops, the
        non-repeatable calls in flight fail with BrokerLost; once it (or, with several brokers, another
        one) is up, the others are sent to it again under their ids."""
        for index, monitor in enumerate(link.monitors):
            while readable(monitor):
                event = _event_of(recv_frames(monitor, NOBLOCK))
                link.up[index] = event != zmq.EVENT_DISCONNECTED
                if event == zmq.EVENT_DISCONNECTED and index == link.current:
                    link.lost_at = time.monotonic()
                    for rid, (_index, op, _frames) in pending.items():
                        if op not in p.REPEATABLE_OPS:
                            link.failed[rid] = _broker_lost(op, self.endpoints[index])
                    spare = next((i for i, up in enumerate(link.up) if up), None)
                    if spare is not None:
                        self._resend(link, spare, pending, deadline)
                elif event != zmq.EVENT_DISCONNECTED and (index == link.current or link.lost_at is not None):
                    self._resend(link, index, pending, deadline)  # the current broker is back, or a spare is up
        if (len(link.socks) > 1 and not link.up[link.current] and link.lost_at is None
                and time.monotonic() >= link.first_choice_until):
            spare = next((i for i, up in enumerate(link.up) if up), None)
            if spare is not None:  # the first broker has not come up: take a later one that has
                link.current = spare

    def _resend(self, link: _Link, index: int, pending: Mapping[int, tuple[int, str, list]], deadline: float) -> None:
        """Make broker `index` the current one; after a drop, send it the calls that did not fail."""
        link.current = index
        if link.lost_at is None:
            return
        link.lost_at = None
        for rid, (_index, _op, frames) in pending.items():
            if rid not in link.failed:
                try:
                    _send(link.sock, frames, deadline, self.endpoint)
                except NoWorkerAvailable as exc:
                    link.failed[rid] = exc

    def _quick_reply(self, link: _Link, pending: Mapping[int, tuple[int, str, list]],
                     deadline: float) -> tuple[int, Any] | None:
        """A pending call's (id, outcome) when its reply reaches the current broker's socket within
        QUICK_WAIT_S (and the deadline); None sends the caller to _receive, which also watches the
        connection. Until a connection event is handled, replies come on the current socket only."""
        if link.failed:
            return None
        wait_ms = int(min(QUICK_WAIT_S, deadline - time.monotonic()) * 1000)
        if wait_ms <= 0:
            return None
        try:
            frames = recv_within(link.sock, wait_ms)
        except zmq.Again:
            return None
        return _reply_to(frames, pending)

    def _receive(self, link: _Link, pending: Mapping[int, tuple[int, str, list]],
                 deadline: float) -> tuple[int, Any]:
        polled = [(sock, POLLIN) for sock in (*link.socks, *link.monitors)]
        while True:
            if link.failed:
                for rid in pending:
                    if rid in link.failed:
                        return rid, link.failed.pop(rid)
            now = time.monotonic()
            remaining_ms = int((deadline - now) * 1000)
            if remaining_ms <= 0:
                raise Timeout(f"no reply from the broker at {self.endpoint} in time "
                              f"({len(pending)} requests outstanding)")
            if link.lost_at is not None:
                if now >= link.lost_at + RECONNECT_WAIT_S:
                    link.lost_at = None
                    for rid in pending:
                        link.failed.setdefault(rid, NoWorkerAvailable(
                            f"the broker at {self.endpoint} has not come back within {RECONNECT_WAIT_S:g} s"))
                    continue
                remaining_ms = min(remaining_ms, int((link.lost_at + RECONNECT_WAIT_S - now) * 1000) + 1)
            if not zmq_poll(polled, remaining_ms):
                continue
            self._watch(link, pending, deadline)
            sock = next((s for s in link.socks if readable(s)), None)  # NOTE: a late reply of a lost broker counts
            if sock is None:
                continue
            reply = _reply_to(recv_frames(sock, NOBLOCK), pending)
            if reply is not None:
                return reply

    def service_ready(self, service: str | None = None, timeout_s: float = 2.0) -> bool:
        """MMI (RFC 8): does the broker have at least one worker for the service?"""
        return self._mmi(p.MMI_SERVICE, service.encode() if service else self.service, timeout_s) == b"200"

    def broker_status(self, timeout_s: float = 2.0) -> dict | None:
        """The broker's view (our `mmi.workers` extension): services, and each worker's node, state,
        heartbeat age, requests served and models resident; None when the broker does not answer."""
        reply = self._mmi(p.MMI_WORKERS, b"", timeout_s)
        return p.unpack(reply) if reply else None

    def _mmi(self, service: bytes, body: bytes, timeout_s: float) -> bytes | None:
        link = self._link()
        deadline = time.monotonic() + timeout_s
        self._watch(link, {}, deadline)  # NOTE: consume connection events, so a later call sees only new ones
        frames = p.client_request(service, [body])
        try:
            if len(link.socks) == 1:
                _send(link.sock, frames, deadline, self.endpoint)
            else:  # the current broker, or the first one up
                self._send_call(link, {}, "mmi", frames, deadline)
        except NoWorkerAvailable:
            return None
        sock = link.sock
        while (remaining_ms := int((deadline - time.monotonic()) * 1000)) > 0:
            if not wait(sock, remaining_ms):
                break
            answer = _mmi_answer(recv_frames(sock), service)
            if answer is not None:
                return answer
        return None


def _request(service: bytes, rid: int, op: str, fields: dict, timeout_s: float) -> list:
    """The frames of one request `rid` for `service`, with a request id and, in its routing header, the
    `timeout_s` left of the caller's deadline: the one way a call of Client is built."""
    return p.client_request(service, p.request_body(rid, op, _with_request_id(fields), int(timeout_s * 1000)))


def _reply_to(frames: list, pending: Mapping[int, Any]) -> tuple[int, Any] | None:
    """(id, its result or FractalError) when `frames` answer one of the `pending` calls; None for anything
    else: a late reply to a call that timed out, a late MMI answer, garbage."""
    try:
        _command, _service, body = p.parse_client_reply(frames)
        reply = p.unpack_body(body)
    except ProtocolError:
        return None
    if reply.__class__ is not dict or (rid := reply.get("id")).__class__ is not int or rid not in pending:
        return None
    try:
        return rid, p.result_of(reply)
    except FractalError as exc:
        return rid, exc


def _mmi_answer(frames: list, service: bytes) -> bytes | None:
    """The one-frame answer of MMI `service` (RFC 8) when `frames` are that, else None (a late reply to
    another call, garbage)."""
    try:
        reply = p.parse_client_reply(frames)
    except ProtocolError:
        return None
    return reply.body[0] if reply.service == service and len(reply.body) == 1 else None


def _event_of(frames: list) -> int:
    """The event number of a socket monitor message (pyzmq reads libzmq's layout)."""
    return parse_monitor_message(frames)["event"]


def _broker_lost(op: str, endpoint: str) -> BrokerLost:
    return BrokerLost(f"the connection to the broker at {endpoint} dropped with this {op} in flight; it may "
                      f"or may not have been done: check, then retry")


def _connect(sock: zmq.Socket, endpoint: str, curve: PeerKeys | None = None,
             spare: bool = False) -> tuple[zmq.Socket, zmq.Socket]:
    """`sock` connected to the broker, and a monitor socket that reports LINK_EVENTS of it. With
    `spare` (there are other brokers to fail over to), a silent connection counts as dropped."""
    sock.linger = 0
    if curve is not None:
        curve.apply(sock)
    if spare:
        sock.setsockopt(zmq.HEARTBEAT_IVL, int(LINK_PING_S * 1000))
        sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, int(LINK_TIMEOUT_S * 1000))
        # NOTE: a connect to a host that is cut off waits for the kernel's SYN retries; a bound
        # attempt lets a returning broker be seen within a second.
        sock.setsockopt(zmq.CONNECT_TIMEOUT, int(LINK_TIMEOUT_S * 1000))
    # NOTE: IMMEDIATE makes a send fail fast while the broker is unreachable instead of queueing
    # requests that would only time out; the caller turns that into NoWorkerAvailable (503).
    sock.setsockopt(zmq.IMMEDIATE, 1)
    # NOTE: not get_monitor_socket(): it names the inproc endpoint after the socket's file descriptor,
    # which a socket closed a moment ago may still hold, so the new monitor would hear the old one.
    address = f"inproc://fractal-link-{_LINK_PREFIX}-{next(_link_ids)}"
    sock.monitor(address, LINK_EVENTS)  # NOTE: before connect, so no event is missed
    monitor = sock.context.socket(zmq.PAIR)
    monitor.linger = 0
    monitor.connect(address)
    sock.connect(endpoint)
    return sock, monitor


def _send(sock: zmq.Socket, frames: list, deadline: float, endpoint: str, wait_s: float = CONNECT_WAIT_S) -> None:
    try:
        send_frames(sock, frames, NOBLOCK)
        return
    except zmq.Again:
        pass
    wait_ms = int(min(wait_s, deadline - time.monotonic()) * 1000)
    if wait_ms > 0 and wait(sock, wait_ms, POLLOUT):
        try:
            send_frames(sock, frames, NOBLOCK)
            return
        except zmq.Again:
            pass
    raise NoWorkerAvailable(f"cannot reach the broker at {endpoint}")


class AsyncClient(_Operations):
    """asyncio client: one socket, any number of concurrent calls; use `async with` or aclose().

    Calls made while a send is pending (in the same turn of the event loop, or while the broker's
    connection cannot take more) leave together as one pack (docs/protocol.md, "Packs"): one MDP
    REQUEST of up to PACK_MAX_REQUESTS independent requests and PACK_MAX_BYTES, answered by one FINAL.
    There is no timer: a lone call is sent at once, as an ordinary request. Each call still gets its
    own result or error and its own timeout; an error the broker gives a whole pack (Overloaded,
    Timeout, NoWorkerAvailable, WorkerLost) is raised by every call in it.

    When the connection to the broker drops, the repeatable calls in flight go back to the front of
    the outbox and leave again (re-packed, under their own ids) once it is back; the others fail with
    BrokerLost. Meanwhile repeatable calls wait (up to RECONNECT_WAIT_S), others fail at once.
    """

    def __init__(self, endpoint: str | Sequence[str], service: str = DEFAULT_SERVICE, timeout_s: float = 30.0,
                 context: zmq.Context | None = None, curve: PeerKeys | None = None):
        self.endpoints = endpoint_list(endpoint)
        self.endpoint = ",".join(self.endpoints)
        self.service = service.encode()
        self.timeout_s = timeout_s
        self.curve = curve
        # NOTE: a plain socket driven by loop.add_reader: zmq.asyncio's per-call futures and polls
        # cost more than the whole rest of a call. An asyncio context is shadowed, not required.
        self._context: zmq.Context = (zmq.Context.shadow(context.underlying) if context is not None
                                      else zmq.Context.instance())
        self._socket: zmq.Socket | None = None   # the current broker's socket, and its monitor
        self._monitor: zmq.Socket | None = None
        self._links: list[tuple[zmq.Socket, zmq.Socket]] = []  # (socket, monitor) per broker
        self._up: list[bool] = []  # per broker: handshake done and not dropped since
        self._current = 0
        self._first_choice_until = 0.0
        self._lost_at: float | None = None  # when the connection to the broker dropped; None while up
        self._not_back: asyncio.TimerHandle | None = None
        self._inflight: dict[int, tuple[int, str, dict, asyncio.Future, float]] = {}  # sent, not answered
        self._loop: asyncio.AbstractEventLoop  # NOTE: the running loop, set by _open() before any use
        self._pending: dict[int, asyncio.Future] = {}
        self._deadlines: dict[int, tuple[float, float]] = {}  # call id -> (its deadline, its timeout_s)
        self._sweep: asyncio.TimerHandle | None = None  # the one timer that expires calls past their deadline
        self._sweep_at = 0.0
        self._packs: dict[int, tuple[list[int], float]] = {}  # pack id -> (its calls' ids, latest deadline)
        self._pacing = Pacing()  # per model: one call per message, packs, or packs behind a window
        self._outbox: deque[tuple[int, str, dict, asyncio.Future, float]] = deque()
        self._flushing = False  # a flush is scheduled or a send is waiting for the broker
        self._sender: asyncio.Task | None = None
        self._mmi_waiters: dict[bytes, deque[asyncio.Future]] = {}

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        if self._sender is not None:
            self._sender.cancel()
            try:
                await self._sender
            except asyncio.CancelledError:
                pass
            self._sender = None
        if self._socket is not None:
            for sock, monitor in self._links:
                self._loop.remove_reader(sock.fileno())
                self._loop.remove_reader(monitor.fileno())
                sock.disable_monitor()
                monitor.close(linger=0)
                sock.close(linger=0)
            self._links, self._up, self._current = [], [], 0
            self._socket = self._monitor = None
        if self._not_back is not None:
            self._not_back.cancel()
            self._not_back = None
        self._lost_at = None
        self._inflight.clear()
        for future in [*self._pending.values(), *(f for q in self._mmi_waiters.values() for f in q)]:
            if not future.done():
                future.set_exception(NoWorkerAvailable("client closed"))
        self._pending.clear()
        self._deadlines.clear()
        if self._sweep is not None:
            self._sweep.cancel()
            self._sweep = None
        self._packs.clear()
        self._pacing.clear()
        self._outbox.clear()
        self._mmi_waiters.clear()
        self._flushing = False

    async def _do(self, op, fields, post, timeout_s):
        result = await self.call(op, fields, timeout_s)
        return post(result) if post else result

    async def call(self, op: str, fields: dict | None = None, timeout_s: float | None = None) -> Any:
        """Send one request and await its reply; returns the result or raises its FractalError."""
        if self._socket is None:
            self._open()
        if self._lost_at is not None and op not in p.REPEATABLE_OPS:
            raise NoWorkerAvailable(f"the connection to the broker at {self.endpoint} is down; retry later")
        loop = self._loop
        timeout_s = self.timeout_s if timeout_s is None else timeout_s
        rid = next(_ids)
        future = loop.create_future()
        deadline = loop.time() + timeout_s
        self._pending[rid] = future
        self._deadlines[rid] = (deadline, timeout_s)
        fields = _with_request_id(fields or {})
        self._outbox.append((rid, op, fields, future, deadline))
        # NOTE: a call whose model's window is full leaves when a place frees (_window_opened flushes)
        if not self._flushing and not self._pacing.held(fields.get("model", "")):
            self._flushing = True
            loop.call_soon(self._flush)
        if self._sweep is None or deadline < self._sweep_at:
            self._arm_sweep(deadline)
        try:
            result = await future
        finally:
            self._pending.pop(rid, None)
            self._deadlines.pop(rid, None)
            self._inflight.pop(rid, None)
        if op == "predict" or op == "predict_image":
            self._learn(fields, result)
        return result

    def _learn(self, fields: dict | None, result: Any) -> None:
        """How calls of this predict's model leave from now on (broker/pacing.py)."""
        timing = result.get("timing") if isinstance(result, dict) else None
        if not isinstance(timing, dict):
            return
        ran_ms, share = timing.get("inference_ms"), timing.get("share", 1.0)  # share: a batch member's part
        if isinstance(ran_ms, (int, float)) and isinstance(share, (int, float)):
            self._pacing.learn((fields or {}).get("model", ""), ran_ms * share)

    def _open(self) -> None:
        self._loop = asyncio.get_running_loop()
        spare = len(self.endpoints) > 1
        self._links = [_connect(self._context.socket(zmq.DEALER), e, self.curve, spare) for e in self.endpoints]
        self._up = [False] * len(self._links)
        self._current = 0
        self._socket, self._monitor = self._links[0]
        self._first_choice_until = self._loop.time() + FIRST_CHOICE_WAIT_S
        for index, (sock, monitor) in enumerate(self._links):
            self._loop.add_reader(sock.fileno(), self._on_readable, sock)
            self._loop.add_reader(monitor.fileno(), self._on_link_event, index)
            self._loop.call_soon(self._on_link_event, index)  # NOTE: edge-triggered FD: take what came before

    def _arm_sweep(self, at: float) -> None:
        if self._sweep is not None:
            self._sweep.cancel()
        self._sweep, self._sweep_at = self._loop.call_at(at, self._expire_due), at

    def _expire_due(self) -> None:
        """Fail the calls past their deadline with Timeout; then sleep until the next deadline.

        NOTE: one timer for every call instead of one per call (a timer made and cancelled per call cost
        more than the rest of a call's bookkeeping). It is armed at the earliest deadline of the calls
        in flight (a call with an earlier one re-arms it), so it rarely fires while replies come back in
        time; firing, it looks at the calls in flight only.
        """
        self._sweep = None
        now, expired = self._loop.time(), []
        earliest = None
        for rid, (deadline, timeout_s) in self._deadlines.items():
            if deadline <= now:
                expired.append((rid, timeout_s))
            elif earliest is None or deadline < earliest:
                earliest = deadline
        for rid, timeout_s in expired:
            del self._deadlines[rid]
            future = self._pending.get(rid)
            if future is not None and not future.done():
                future.set_exception(Timeout(f"no reply from the broker at {self.endpoint} within {timeout_s:g} s"))
        # Forget packs whose every call is past its deadline (their reply is lost or late): oldest
        # first, stopping at a live one, so this costs nothing while replies come back.
        packs = self._packs
        while packs:
            pack_id = next(iter(packs))
            if packs[pack_id][1] > now:
                break
            del packs[pack_id]
        if self._pacing.expire(now):
            self._window_opened()
        if earliest is not None:
            self._arm_sweep(max(earliest, now + SWEEP_GAP_S))

    # -- sending -----------------------------------------------------------------------------

    def _flush(self) -> None:
        """Send the outbox as packs; called once per loop turn in which calls were made."""
        if self._socket is None:  # closed meanwhile
            return
        if self._lost_at is not None:  # the broker is away: _on_link_event flushes once it is back
            self._flushing = False
            return
        outbox = self._outbox
        while outbox:
            before = len(outbox)
            message = self._next_message()
            if message is None:
                if len(outbox) == before:  # every call looked at waits for its model's window
                    break
                continue
            try:
                send_frames(self._socket, message[0], NOBLOCK)
            except zmq.Again:  # no connection to the broker (IMMEDIATE) or its queue is full
                self._sender = self._loop.create_task(self._send_when_possible(*message))
                return  # NOTE: _flushing stays set: calls made meanwhile wait and leave together
            self._sent(message[1], message[2])
        self._flushing = False
        # NOTE: the socket's file descriptor is edge-triggered; a send may have consumed the edge of a
        # reply that has arrived, so look once before going back to the loop.
        if readable(self._socket):
            self._on_readable()

    def _next_message(self) -> tuple[list, list, int | None] | None:
        """Frames of the next pack (or lone request) from the outbox, its calls, and the pack's id.

        A pack holds calls for one model (the broker queues it as that model's: docs/protocol.md,
        "Routing header"): calls for other models met on the way stay in the outbox, in their order,
        looking at most PACK_LOOKAHEAD calls ahead, and so do the calls of a model whose window is full
        (broker/pacing.py). Each carries what is left of its deadline now."""
        outbox, writer = self._outbox, p.PackWriter()
        calls: list = []
        skipped: list = []
        pacing = self._pacing
        now, model, looked, most = self._loop.time(), None, 0, p.PACK_MAX_REQUESTS
        while outbox and len(calls) < most and looked < PACK_LOOKAHEAD:
            looked += 1
            call = outbox.popleft()
            rid, op, fields, future, deadline = call
            if future.done():  # timed out or cancelled before it could leave
                continue
            if model is None:
                if pacing.held(fields.get("model", "")):
                    skipped.append(call)
                    continue
                model = fields.get("model", "")
                if model in pacing.solo:
                    most = 1
            elif fields.get("model", "") != model:
                skipped.append(call)
                continue
            try:
                if not writer.add({"id": rid, "op": op, **fields}, p.PACK_MAX_BYTES, int((deadline - now) * 1000)):
                    outbox.appendleft(call)
                    break
            except Exception as exc:  # this call alone cannot be sent; the others still go
                future.set_exception(exc if isinstance(exc, FractalError)
                                     else BadInput(f"cannot encode the request: {exc!r}"))
                continue
            calls.append(call)
        outbox.extendleft(reversed(skipped))
        if not calls:
            return None
        pack_id = next(_ids) if len(calls) > 1 else None
        return p.client_request(self.service, writer.request(pack_id)), calls, pack_id

    def _sent(self, calls: list, pack_id: int | None) -> None:
        inflight = self._inflight
        for call in calls:
            inflight[call[0]] = call
        latest = max(c[4] for c in calls)
        if pack_id is not None:
            self._packs[pack_id] = ([c[0] for c in calls], latest)
        self._pacing.sent(calls[0][2].get("model", ""), calls[0][0] if pack_id is None else pack_id, latest)

    def _window_opened(self) -> None:
        """A model's window has a free place again: the calls waiting for it may leave."""
        if self._outbox and not self._flushing and self._lost_at is None:
            self._flushing = True
            self._loop.call_soon(self._flush)

    async def _send_when_possible(self, frames: list, calls: list, pack_id: int | None) -> None:
        give_up = self._loop.time() + CONNECT_WAIT_S
        while True:
            await asyncio.sleep(SEND_RETRY_S)
            if self._socket is None:  # closed meanwhile (aclose() cancels this task first)
                return
            try:
                send_frames(self._socket, frames, NOBLOCK)
                self._sent(calls, pack_id)
                break
            except zmq.Again:
                if all(c[3].done() for c in calls):
                    break
                if self._lost_at is not None:  # the broker is away: these leave again once it is back
                    self._outbox.extendleft(reversed(calls))
                    self._sender = None
                    self._flushing = False
                    return
                if self._loop.time() >= give_up:
                    # NOTE: every call queued behind this one fails too: the broker is unreachable now,
                    # and waiting CONNECT_WAIT_S once per pack would add up.
                    unreachable = [*calls, *self._outbox]
                    self._outbox.clear()
                    for call in unreachable:
                        if not call[3].done():
                            call[3].set_exception(NoWorkerAvailable(f"cannot reach the broker at {self.endpoint}"))
                    break
        self._sender = None
        self._flush()

    # -- the connection to the broker ------------------------------------------------------------

    def _on_link_event(self, index: int = 0) -> None:
        links = self._links
        while index < len(links) and self._links is links and readable(links[index][1]):
            event = _event_of(recv_frames(links[index][1], NOBLOCK))
            self._up[index] = event != zmq.EVENT_DISCONNECTED
            if event == zmq.EVENT_DISCONNECTED:
                if index == self._current:
                    spare = next((i for i, up in enumerate(self._up) if up), None)
                    self._dropped(spare is not None)
                    if spare is not None:  # fail over: the held calls leave for the spare at once
                        self._switch(spare)
                        self._returned()
            elif index == self._current:
                if self._lost_at is not None:  # handshake succeeded: the broker is back
                    self._returned()
            elif self._lost_at is not None:  # the current broker is away: use this one
                self._switch(index)
                self._returned()
            elif not self._up[self._current]:  # the first broker has not come up (yet): wait a little for it
                self._loop.call_at(self._first_choice_until, self._take_spare, links)

    def _take_spare(self, links: list) -> None:
        """The first broker has not come up in FIRST_CHOICE_WAIT_S: send to the first spare that has."""
        if self._links is not links or self._up[self._current] or self._lost_at is not None:
            return
        spare = next((i for i, up in enumerate(self._up) if up), None)
        if spare is not None:
            self._switch(spare)

    def _switch(self, index: int) -> None:
        """Make broker `index` the one requests go to; a send waiting for the old one uses it too."""
        self._current = index
        self._socket, self._monitor = self._links[index]

    def _dropped(self, spare: bool = False) -> None:
        """The connection to the broker dropped: whatever it held is gone. Repeatable calls wait at the
        front of the outbox to be sent again; the others fail (BrokerLost if they had left). With a
        `spare` broker up, calls that had not left yet all stay: they go there, once."""
        loop = self._loop
        self._lost_at = loop.time()
        self._packs.clear()
        self._pacing.clear()
        lost = self.endpoints[self._current]
        held = []
        for call in self._inflight.values():
            future = call[3]
            if future.done():
                continue
            if call[1] in p.REPEATABLE_OPS:
                held.append(call)
            else:
                future.set_exception(_broker_lost(call[1], lost))
        self._inflight.clear()
        for call in self._outbox:
            if spare or call[1] in p.REPEATABLE_OPS:
                held.append(call)
            elif not call[3].done():
                call[3].set_exception(NoWorkerAvailable(f"the connection to the broker at {lost} "
                                                        f"is down; retry later"))
        self._outbox.clear()
        self._outbox.extend(held)
        if self._not_back is not None:
            self._not_back.cancel()
        self._not_back = loop.call_later(RECONNECT_WAIT_S, self._give_up)

    def _returned(self) -> None:
        self._lost_at = None
        if self._not_back is not None:
            self._not_back.cancel()
            self._not_back = None
        if self._outbox and not self._flushing:
            self._flushing = True
            self._loop.call_soon(self._flush)

    def _give_up(self) -> None:
        """The broker has not come back within RECONNECT_WAIT_S: what waits for it fails, and later
        calls try (and fail) as they do before the first connection."""
        self._not_back = None
        if self._lost_at is None:
            return
        self._lost_at = None
        waiting = list(self._outbox)
        self._outbox.clear()
        for call in waiting:
            if not call[3].done():
                call[3].set_exception(NoWorkerAvailable(
                    f"the broker at {self.endpoint} has not come back within {RECONNECT_WAIT_S:g} s"))

    # -- receiving -----------------------------------------------------------------------------

    def _on_readable(self, sock: zmq.Socket | None = None) -> None:
        """Handle the replies waiting on `sock` (default: the current broker's; a late reply from a
        lost broker counts too: the first reply per id wins)."""
        sock = sock or self._socket
        if sock is None or sock.closed:
            return
        if drain(sock, self._on_reply, MAX_DRAIN):
            self._loop.call_soon(self._on_readable, sock)  # more waiting: let the callers run first

    def _on_reply(self, frames: list) -> None:
        """Settle the call (or MMI question) a reply answers; never raises: what is not ours is dropped."""
        try:
            _command, service, body = p.parse_client_reply(frames)
        except ProtocolError:
            return  # garbage: nothing to match it to
        if service != self.service:
            waiters = self._mmi_waiters.get(service)
            while waiters:
                waiter = waiters.popleft()
                if not waiter.done():
                    waiter.set_result(body[0] if body else b"")
                    return
            return
        try:
            reply = p.unpack_body(body)
        except ProtocolError:
            return
        rid = reply.get("id") if isinstance(reply, dict) else None
        if type(rid) is not int:
            return
        if self._pacing.answered(rid):
            self._window_opened()
        pack = self._packs.pop(rid, None)
        if pack is None:
            future = self._pending.get(rid)
            if future is not None and not future.done():
                try:
                    future.set_result(p.result_of(reply))
                except FractalError as exc:
                    future.set_exception(exc)
            return
        rids = pack[0]
        try:
            outcomes = p.pack_results(reply, len(rids))
        except FractalError as exc:  # one error for the whole pack: each call raises its own copy
            outcomes = [exc.__class__(*exc.args) for _ in rids]
        pending = self._pending
        for sub_rid, outcome in zip(rids, outcomes, strict=True):
            future = pending.get(sub_rid)
            if future is None or future.done():
                continue
            if isinstance(outcome, FractalError):
                future.set_exception(outcome)
            else:
                future.set_result(outcome)

    async def _mmi(self, service: bytes, body: bytes, timeout_s: float) -> bytes | None:
        """Ask the broker's MMI `service` (RFC 8); its one-frame answer, or None when it gives none in
        time or cannot be reached. For async service_ready / broker_status."""
        if self._socket is None:
            self._open()
        now = self._loop.time()
        deadline, give_up = now + timeout_s, now + min(timeout_s, CONNECT_WAIT_S)
        frames = p.client_request(service, [body])
        while True:  # NOTE: a new socket refuses sends (IMMEDIATE) until its connection is up
            if self._socket is None:
                return None  # closed meanwhile
            try:
                send_frames(self._socket, frames, NOBLOCK)
                break
            except zmq.Again:
                if self._loop.time() >= give_up:
                    return None
                await asyncio.sleep(SEND_RETRY_S)
        # NOTE: answers to one MMI service come back in the order asked, so waiters queue in the order
        # their questions left: appended only once the send succeeded.
        waiter = self._loop.create_future()
        self._mmi_waiters.setdefault(service, deque()).append(waiter)
        try:
            if readable(self._socket):
                self._on_readable()
            return await asyncio.wait_for(waiter, max(0.0, deadline - self._loop.time()))
        except (asyncio.TimeoutError, NoWorkerAvailable):
            return None
        finally:
            waiters = self._mmi_waiters.get(service)
            if waiters is not None and waiter in waiters:
                waiters.remove(waiter)

    # -- MMI (RFC 8), for health and status pages.

    async def service_ready(self, service: str | None = None, timeout_s: float = 2.0) -> bool:
        """MMI (RFC 8): does the broker have at least one worker for the service?"""
        return await self._mmi(p.MMI_SERVICE, service.encode() if service else self.service, timeout_s) == b"200"

    async def broker_status(self, timeout_s: float = 2.0) -> dict | None:
        """The broker's view (our `mmi.workers` extension), as Client.broker_status; None when the
        broker does not answer."""
        reply = await self._mmi(p.MMI_WORKERS, b"", timeout_s)
        return p.unpack(reply) if reply else None
