"""The modelhost: an MDP/0.2 worker (DEALER) that answers model operations from the shared pool.

Requests run inline on the socket's thread: no hand-off on the hot path. While one runs, a small
thread sends the HEARTBEATs the broker needs to keep believing in us; the socket passes between the
two threads under a lock (a full memory barrier, as ZeroMQ requires to move a socket between threads),
and only while the main thread is busy computing and not touching it.
"""
from __future__ import annotations

import logging
import os
import secrets
import socket as socket_module
import threading
import time
from dataclasses import dataclass

import zmq
from prometheus_client import CollectorRegistry

from metrics import WorkerMetrics, new_registry, serve_metrics

from broker import protocol as p
from broker.errors import BadInput, FractalError, InternalError, ProtocolError
from broker.protocol import MDPW
from broker.settings import setting
from broker.sockets import NOBLOCK, send_frames, wait

from .ops import OPS, rss_bytes
from .pool import ModelPool
from .sessions import SessionCache, SessionFactory

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WorkerSettings:
    connect: str = setting("tcp://127.0.0.1:5555", "broker endpoint to connect to")
    service: str = setting("modelhost", "MDP service name to register for")
    model_dir: str = setting("./models", "the shared model pool directory")
    cache_size: int = setting(32, "ONNX Runtime sessions kept loaded (least recently used evicted)")
    threads: int = setting(1, "ONNX Runtime intra-op threads; 1 suits N workers on N cores")
    heartbeat_interval_s: float = setting(2.5, "seconds between heartbeats to the broker")
    heartbeat_liveness: int = setting(3, "missed broker heartbeats before reconnecting")
    reconnect_max_s: float = setting(5.0, "longest back-off between reconnect attempts")
    max_model_bytes: int = setting(512 << 20, "largest model file accepted for upload")
    max_image_pixels: int = setting(25_000_000, "largest image (width x height) decoded for prediction")
    log_requests: bool = setting(True, "one INFO line per request with its request id and time")
    metrics_host: str = setting("127.0.0.1", "address of the /metrics endpoint")
    metrics_port: int = setting(9151, "port of the /metrics endpoint; 0: no metrics at all")
    log_level: str = setting("INFO", "logging level")

    def __post_init__(self) -> None:
        if self.heartbeat_interval_s <= 0 or self.heartbeat_liveness < 1:
            raise ValueError("heartbeat_interval_s must be > 0 and heartbeat_liveness >= 1")
        if self.cache_size < 1 or self.threads < 1:
            raise ValueError("cache_size and threads must be >= 1")


def make_node_id() -> str:
    return f"{socket_module.gethostname()}-{os.getpid()}-{secrets.token_hex(2)}"


class ModelHost:
    """Serve model operations for one service until `stop()`."""

    def __init__(self, settings: WorkerSettings, context: zmq.Context | None = None,
                 registry: CollectorRegistry | None = None):
        self.settings = settings
        self.node = make_node_id()
        self.registry = registry if registry is not None else new_registry("fractal_worker")
        self.metrics = WorkerMetrics(self.registry, self.node, enabled=settings.metrics_port != 0)
        self.pool = ModelPool(settings.model_dir, SessionFactory(settings.threads, self.metrics),
                              SessionCache(settings.cache_size, self.metrics), settings.max_model_bytes,
                              settings.max_image_pixels)
        self._context = context or zmq.Context.instance()
        self._socket: zmq.Socket | None = None
        self._service = settings.service.encode()
        self._log_requests = settings.log_requests
        self._interval_s = settings.heartbeat_interval_s
        self._silence_s = settings.heartbeat_interval_s * settings.heartbeat_liveness
        self._stopping = threading.Event()
        self._beater_done = threading.Event()  # NOTE: not _stopping: a request finishing after SIGTERM
        self._lock = threading.Lock()
        self._busy = False
        self._last_sent = 0.0
        self._broker_expires = 0.0
        self._backoff_s = 0.0

    def stop(self) -> None:
        """Ask the loop to end after the current request; safe from a signal handler."""
        self._stopping.set()

    def run(self) -> None:
        log.info("worker %s serving %s from %s", self.node, self.settings.service, self.pool.directory)
        serve_metrics(self.settings.metrics_host, self.settings.metrics_port, self.registry, "worker")
        beater = threading.Thread(target=self._beat_while_busy, name="busy-heartbeat", daemon=True)
        beater.start()
        self._connect()
        next_evict = time.monotonic() + self._interval_s
        try:
            while not self._stopping.is_set():
                wait_s = min(self._last_sent + self._interval_s, self._broker_expires) - time.monotonic()
                if wait(self._socket, max(0, min(int(wait_s * 1000), 100))):
                    self._receive()
                now = time.monotonic()
                if now >= self._last_sent + self._interval_s:
                    self._send(MDPW.HEARTBEAT)
                if now >= next_evict:  # its own timer: a busy worker sends FINALs, not heartbeats
                    next_evict = now + self._interval_s
                    self.pool.evict_unloaded()
                    self.metrics.memory_rss.set(rss_bytes())
                if now >= self._broker_expires and not wait(self._socket, 0):
                    log.warning("broker silent for %.1f s: reconnecting", self._silence_s)
                    self._reconnect()
        finally:
            self._beater_done.set()
            if self._socket is not None:
                self._send(MDPW.DISCONNECT)
                self._socket.close(linger=200)  # NOTE: long enough for DISCONNECT to leave
                self._socket = None
            log.info("worker %s stopped", self.node)

    # -- connection ----------------------------------------------------------------------------

    def _connect(self) -> None:
        sock = self._context.socket(zmq.DEALER)
        sock.linger = 0
        sock.connect(self.settings.connect)
        self._socket = sock
        self._send(MDPW.READY, self._service)
        self._broker_expires = time.monotonic() + self._silence_s
        log.info("worker %s connected to %s", self.node, self.settings.connect)

    def _reconnect(self) -> None:
        # NOTE: a READY queued on this socket may still reach the broker if the link comes back just
        # now; a DISCONNECT behind it makes the broker forget that identity at once instead of
        # dispatching to it until it misses its heartbeats.
        try:
            send_frames(self._socket, [p.WORKER_HEADER, MDPW.DISCONNECT], NOBLOCK)
        except zmq.ZMQError:
            pass
        self._socket.close(linger=int(self._interval_s * 1000))
        self._socket = None
        if self._backoff_s:
            self._stopping.wait(self._backoff_s)
        self._backoff_s = min(max(self._backoff_s * 2, 0.1), self.settings.reconnect_max_s)
        self._connect()

    def _send(self, command: bytes, *frames: bytes) -> None:
        send_frames(self._socket, [p.WORKER_HEADER, command, *frames])
        self._last_sent = time.monotonic()

    def _beat_while_busy(self) -> None:
        while not self._beater_done.wait(self._interval_s / 2):
            with self._lock:
                if self._busy and time.monotonic() - self._last_sent >= self._interval_s:
                    self._send(MDPW.HEARTBEAT)

    # -- messages ------------------------------------------------------------------------------

    def _receive(self) -> None:
        frames = self._socket.recv_multipart()
        self._broker_expires = time.monotonic() + self._silence_s
        self._backoff_s = 0.0
        if len(frames) < 2 or frames[0] != p.WORKER_HEADER:
            log.warning("dropped a message that is not MDP/0.2 worker traffic (%d frames)", len(frames))
            return
        command = frames[1]
        if command == MDPW.REQUEST:
            if len(frames) < 3:
                log.warning("dropped a REQUEST without a client address")
                return
            if len(frames) < 5 or frames[3] != b"":
                reply = p.error_body(None, self.node, ProtocolError("REQUEST without envelope and body"))
            else:
                reply = self._run_request(frames[4])
            self._send(MDPW.FINAL, frames[2], b"", reply)
            # Heartbeats the broker sent while we computed are still queued, unread: it was not silent.
            self._broker_expires = time.monotonic() + self._silence_s
        elif command == MDPW.DISCONNECT:
            if not self._stopping.is_set():  # a stopping worker has no reason to come back
                log.info("broker sent DISCONNECT: reconnecting")
                self._reconnect()
        elif command != MDPW.HEARTBEAT:
            log.warning("dropped unknown command %r from broker", command[:4])

    def _run_request(self, data: bytes) -> bytes:
        with self._lock:
            self._busy = True
        try:
            return self.execute(data)
        finally:
            with self._lock:
                self._busy = False

    def execute(self, data: bytes) -> bytes:
        """Answer one request body with a reply body; never raises."""
        rid = trace = op_name = None
        started = time.perf_counter()
        outcome = "error"
        try:
            request = p.unpack_request(data)
            rid, trace, op_name = request.get("id"), request.get("request_id"), request["op"]
            op = OPS.get(op_name)
            if op is None:
                raise BadInput(f"unknown op {op_name!r}; known: {', '.join(sorted(OPS))}")
            reply = p.ok_body(rid, self.node, op(self.pool, request, self.node))
            outcome = "ok"
            if self._log_requests and op_name != "status":  # the broker asks for status every few s
                log.info("request %s: %s %s ok in %.2f ms", trace, op_name, request.get("model", ""),
                         (time.perf_counter() - started) * 1e3)
            return reply
        except ProtocolError as exc:
            log.warning("request %s: bad body: %s", trace, exc)
            return p.error_body(rid, self.node, exc)
        except FractalError as exc:
            log.info("request %s: %s failed: %s: %s", trace, op_name, exc.__class__.__name__, exc)
            return p.error_body(rid, self.node, exc)
        except Exception:
            log.exception("request %s: %s failed unexpectedly", trace, op_name)
            return p.error_body(rid, self.node, InternalError(
                f"unexpected failure on {self.node} (request id {trace})"))
        finally:
            self.metrics.request_done(op_name if op_name in OPS else "unknown", outcome,
                                      time.perf_counter() - started)
