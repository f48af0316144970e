"""The modelhost: MDP/0.2 worker connections (DEALER) answering model operations from the shared pool.

Requests run inline on the thread that owns the sockets: no hand-off on the hot path. While one
runs, a small thread sends the HEARTBEATs the broker needs to keep believing in us; sockets pass
between the two threads under a lock (a full memory barrier, as ZeroMQ requires to move a socket
between threads), and only while the main thread is busy computing and not touching them.

With `connections` > 1 the process is that many workers to the broker, so it may hold several
requests at once; with batching on, the predicts among them for one model run as one batch
(worker/batching.py, docs/batching.md).
"""
from __future__ import annotations

import functools
import logging
import os
import secrets
import socket as socket_module
import threading
import time
from typing import Any

import zmq
from prometheus_client import CollectorRegistry
from zmq.backend import zmq_poll

from broker import protocol as p
from broker.curve import PeerKeys
from broker.errors import BadInput, FractalError, InternalError, ProtocolError, Timeout
from broker.logs import set_node
from broker.protocol import MDPW, model_file_name
from broker.settings import endpoint_list
from broker.sockets import NOBLOCK, POLLIN, readable, recv_frames, wait
from metrics import WorkerMetrics, new_registry, serve_metrics, tracing

from . import ops
from .batching import BatchPolicy, Pending, Queue, batchable, drop_expired, prepare, run_batch
from .connection import Connection
from .inference import served_version, worker_time
from .memory import rss_bytes
from .ops import OPS
from .packs import run_pack
from .pool import ModelPool
from .sessions import SessionCache, SessionFactory
from .settings import WorkerSettings

log = logging.getLogger(__name__)

PREDICT_OPS = frozenset({"predict", "predict_image"})  # counted per model (metrics.ModelSeries)


def make_node_id(name: str = "") -> str:
    """The worker's id (its "node id" in replies, logs, metrics and /status): NAME-PID-RANDOM."""
    return f"{name or socket_module.gethostname()}-{os.getpid()}-{secrets.token_hex(2)}"


class ModelHost:
    """Serve model operations for one service until `stop()`."""

    def __init__(self, settings: WorkerSettings, context: zmq.Context | None = None,
                 registry: CollectorRegistry | None = None):
        self.settings = settings
        self.node = make_node_id(settings.node_name)
        set_node(self.node)  # JSON log records name the node id, as replies and metrics do
        self.registry = registry if registry is not None else new_registry("fractal_worker")
        self.metrics = WorkerMetrics(self.registry, self.node, enabled=settings.metrics_port != 0)
        self.pool = ModelPool(settings.model_dir, SessionFactory(settings.threads, self.metrics, settings.model_dir),
                              SessionCache(settings.cache_size, self.metrics, settings.memory_budget_bytes),
                              settings.max_model_bytes,
                              settings.max_image_pixels, poll=settings.poll_s > 0)
        self.policy = BatchPolicy(settings.batch_max_size, settings.batch_max_delay_us,
                                  tuple(int(x) for x in settings.batch_preferred_sizes.split(",") if x.strip()))
        # NOTE: `config` answers with this worker's batching policy, which only the host knows.
        self._ops: dict[str, ops.Op] = {**OPS, "config": functools.partial(ops.config, policy=self.policy)}
        self._context = context or zmq.Context.instance()
        self._stopping = threading.Event()
        self._beater_done = threading.Event()  # NOTE: not _stopping: a request finishing after SIGTERM
        self._lock = threading.Lock()
        self._busy = False
        self._log_requests = settings.log_requests
        curve = PeerKeys.from_files(settings.curve_secret_key, settings.curve_broker_key)
        endpoints = endpoint_list(settings.connect)
        self._several_brokers = len(endpoints) > 1
        self._connections = [
            Connection(self._context, endpoint, settings.service.encode(), settings.heartbeat_interval_s,
                       settings.heartbeat_interval_s * settings.heartbeat_liveness, settings.reconnect_max_s,
                       self._stopping, i, curve)
            for i, endpoint in enumerate(e for e in endpoints for _ in range(settings.connections))]
        self._queues: dict[str, Queue] = {}
        self._outbox: list[tuple[Connection, int, bytes, list]] = []  # FINALs computed while busy

    def stop(self) -> None:
        """Ask the loop to end after the current request; safe from a signal handler."""
        self._stopping.set()

    def run(self) -> None:
        log.info("worker %s serving %s from %s with %d connection(s), batching %s", self.node,
                 self.settings.service, self.pool.directory, len(self._connections),
                 f"up to {self.policy.max_batch_size} rows" if self.policy.enabled else "off")
        if not self.pool.names():  # NOTE: a new user's `fractal worker --model-dir ./models` starts here
            log.warning("the model pool %s holds no models: copy .onnx files in, upload one (PUT "
                        "/api/v1/models/NAME), or start from the bundled ones (fractal serve creates its pool "
                        "with them)", self.pool.directory)
        serve_metrics(self.settings.metrics_host, self.settings.metrics_port, self.registry, "worker")
        tracing.configure("worker", self.settings.tracing, self.node)
        self.pool.pin()  # NOTE: before registering: the broker sends nothing until pinned models are warm
        beater = threading.Thread(target=self._beat_while_busy, name="busy-heartbeat", daemon=True)
        beater.start()
        for conn in self._connections:
            conn.connect()
        next_evict = time.monotonic() + self.settings.heartbeat_interval_s
        next_scan = time.monotonic()  # NOTE: poll mode scans at once: the first sight of every file
        try:
            while not self._stopping.is_set():
                self._poll_once()
                self._run_due_batches()
                now = time.monotonic()
                for conn in self._connections:
                    if now >= conn.last_sent + conn.interval_s:
                        conn.send(MDPW.HEARTBEAT)
                    if now >= conn.broker_expires and not wait(conn.socket, 0) and not conn.held:
                        log.warning("broker silent: reconnecting connection %d", conn.index)
                        conn.reconnect()
                if now >= next_evict:  # its own timer: a busy worker sends FINALs, not heartbeats
                    next_evict = now + self.settings.heartbeat_interval_s
                    self.pool.evict_unloaded()
                    self.metrics.memory_rss.set(rss_bytes())
                if self.settings.poll_s and now >= next_scan:  # off the request path, like the tick above
                    self._scan()
                    next_scan = time.monotonic() + self.settings.poll_s
        finally:
            self._beater_done.set()
            for conn in self._connections:
                conn.close()
            tracing.shutdown()
            log.info("worker %s stopped", self.node)

    def _scan(self) -> None:
        try:
            self._run_busy(lambda _: self.pool.scan(), None)  # NOTE: validating loads models: keep beating
        except Exception:
            log.exception("poll: the scan of %s failed; the next one will try again", self.pool.directory)

    # -- receiving -----------------------------------------------------------------------------

    def _poll_once(self) -> None:
        deadline = min(min(c.next_due() for c in self._connections),
                       min((q.deadline() for q in self._queues.values()), default=float("inf")))
        timeout_ms = max(0, min(int((deadline - time.monotonic()) * 1000), 100))
        ready = zmq_poll([(c.socket, POLLIN) for c in self._connections], timeout_ms)
        if not ready:
            return
        by_socket: dict[Any, Connection] = {c.socket: c for c in self._connections}
        for sock, _ in ready:
            conn = by_socket[sock]
            # drain: every request waiting now can join the same batch
            first = True  # the poll said it is there
            while conn.socket is sock and (first or readable(sock)):
                first = False
                try:
                    frames = recv_frames(sock, NOBLOCK)
                except zmq.Again:
                    break
                self._handle(conn, frames)

    def _handle(self, conn: Connection, frames: list) -> None:
        conn.heard()
        if len(frames) < 2 or frames[0] != p.WORKER_HEADER:
            log.warning("dropped a message that is not MDP/0.2 worker traffic (%d frames)", len(frames))
            return
        command = frames[1]
        if command == MDPW.REQUEST:
            if len(frames) < 3:
                log.warning("dropped a REQUEST without a client address")
                return
            conn.held += 1
            if len(frames) < 5 or frames[3] != b"":
                self._final(conn, frames[2], p.error_body(None, self.node, ProtocolError(
                    "REQUEST without envelope and body")))
                return
            received = time.monotonic()  # NOTE: the request's deadline_ms counts from here
            arrived = time.perf_counter()  # NOTE: worker_ms counts from here, batched or not
            traced_at = time.perf_counter_ns() if tracing.ENABLED else 0
            request = self._decode(frames[4:])
            if isinstance(request, ProtocolError):
                self._final(conn, frames[2], p.error_body(None, self.node, request))
                return
            if traced_at:
                tracing.received(request, traced_at)
            if not (self.policy.enabled and request["op"] == "predict"
                    and self._queued(conn, frames[2], request, received, arrived)):
                self._final(conn, frames[2], self._run_busy(self.reply_to, request, received, arrived))
        elif command == MDPW.DISCONNECT:
            if not self._stopping.is_set():  # a stopping worker has no reason to come back
                log.info("broker sent DISCONNECT: reconnecting connection %d", conn.index)
                conn.reconnect()
        elif command != MDPW.HEARTBEAT:
            log.warning("dropped unknown command %r from broker", command[:4])

    def _decode(self, data: list) -> dict | ProtocolError:
        """The request map of body frames, or (logged and counted) why they are not one."""
        try:
            return p.unpack_request(data)
        except ProtocolError as exc:
            log.warning("request %s: bad body: %s", None, exc)
            self.metrics.request_done("unknown", "error", 0.0)
            return exc

    def _queued(self, conn: Connection, client: bytes, request: dict, received: float, arrived: float) -> bool:
        """Queue a predict for a batchable model (True), or leave the request to reply_to() (False).
        `received` (monotonic) is where its deadline_ms counts from; `arrived` (perf_counter) is where
        its worker_ms starts, before any load."""
        try:
            # NOTE: under the heartbeat helper: loading a large model must not look like a dead worker.
            model = self._run_busy(lambda r: self.pool.load(model_file_name(r.get("model")), r.get("version")),
                                   request)
            policy = self.policy.override(self.pool.sidecar(model.name).get("dynamic_batching"))
        except Exception:
            return False  # reply_to() answers it, with the same error
        if not policy.enabled or not batchable(model):
            return False
        conn.used = True
        reply = self._replier(conn, client, request, model.name, arrived)
        try:
            pending = prepare(model, request.get("inputs"), request.get("outputs"), reply, time.monotonic())
        except Exception as exc:
            model.stats.failed(0)  # NOTE: refused before it was timed; the count is what matters
            reply(exc if isinstance(exc, FractalError) else BadInput(f"cannot use this request: {exc}"))
            self._flush()
            return True
        queue = self._queues.get(model.name)
        if queue is None:
            queue = self._queues[model.name] = Queue(policy)
        queue.policy = policy  # NOTE: a changed sidecar applies from now on; queued requests stay
        pending.expires_at = p.deadline_of(request, received)
        queue.items.append(pending)
        return True

    def _replier(self, conn: Connection, client: bytes, request: dict, model: str, arrived: float):
        """The callback that answers one batched request (queued in the outbox, sent after the run);
        `arrived` is the perf_counter when the worker took the request up."""
        rid, trace = request.get("id"), request.get("request_id")
        generation = conn.generation

        def reply(outcome: dict | FractalError) -> None:
            ok = not isinstance(outcome, FractalError)
            if tracing.ENABLED:
                tracing.answered(request, outcome)
            if ok:
                worker_time(outcome, arrived)
            try:
                body = (p.error_body(rid, self.node, outcome) if isinstance(outcome, FractalError)
                        else p.ok_body(rid, self.node, outcome))
            except Exception:
                log.exception("request %s: the reply could not be encoded", trace)
                ok, outcome = False, InternalError(f"unexpected failure on {self.node} (request id {trace})")
                body = p.error_body(rid, self.node, outcome)
            self._outbox.append((conn, generation, client, body))
            if tracing.ENABLED:
                tracing.finish(request, self.node)
            self.metrics.request_done("predict", "ok" if ok else "error", time.perf_counter() - arrived)
            self.metrics.model_done(model, None if ok else outcome.__class__.__name__)
            if not ok:
                log.info("request %s: predict failed: %s: %s", trace, outcome.__class__.__name__, outcome,
                         extra={"request_id": trace, "op": "predict", "model": model,
                                "error": outcome.__class__.__name__})
            elif self._log_requests:
                elapsed_ms = (time.perf_counter() - arrived) * 1e3
                log.info("request %s: predict %s ok (batched) in %.2f ms", trace, model, elapsed_ms,
                         extra={"request_id": trace, "op": "predict", "model": model, "batched": True,
                                "latency_ms": round(elapsed_ms, 3)})
        return reply

    def _run_due_batches(self) -> None:
        now = time.monotonic()
        # NOTE: when every connection holds a request, nothing more can arrive: waiting is pointless.
        # With several brokers, a connection no batchable predict has come on since it connected is to
        # a broker no client sends to now (its status polls and health checks do not count).
        full = all(c.held for c in self._connections if c.used or not self._several_brokers)
        for name in list(self._queues):
            queue = self._queues[name]
            while queue.items and (full or queue.due(now)):
                batch = self.live(queue.take())
                if batch:
                    self._run_busy(run_batch, batch)
                self._flush()
            if not queue.items:
                del self._queues[name]

    # -- answering -----------------------------------------------------------------------------

    def _run_busy(self, fn, *args):
        with self._lock:
            self._busy = True
        try:
            return fn(*args)
        finally:
            with self._lock:
                self._busy = False

    def _flush(self) -> None:
        outbox, self._outbox = self._outbox, []
        for conn, generation, client, body in outbox:
            if generation == conn.generation:
                self._final(conn, client, body)
            else:  # the socket it came on is gone, and the broker has sent the request elsewhere
                log.info("dropped a reply for a connection that has since reconnected")

    def _final(self, conn: Connection, client: bytes, body: list) -> None:
        conn.send(MDPW.FINAL, client, b"", *body)
        conn.held = max(0, conn.held - 1)
        # Heartbeats the broker sent while we computed are still queued, unread: it was not silent.
        conn.heard()

    def _beat_while_busy(self) -> None:
        while not self._beater_done.wait(self.settings.heartbeat_interval_s / 2):
            with self._lock:
                if self._busy:
                    now = time.monotonic()
                    for conn in self._connections:
                        if conn.socket is not None and now - conn.last_sent >= conn.interval_s:
                            conn.send(MDPW.HEARTBEAT)

    def execute(self, data: list) -> list:
        """Answer one request's body frames with reply body frames; never raises."""
        request = self._decode(data)
        if isinstance(request, ProtocolError):
            return p.error_body(None, self.node, request)
        return self.reply_to(request)

    def live(self, batch: list[Pending]) -> list[Pending]:
        """The requests of a batch about to run whose deadline has not passed; the others are answered
        Timeout and counted (fractal_worker_requests_dropped, reason "deadline")."""
        live = drop_expired(batch, time.monotonic())
        if len(live) < len(batch):
            self.metrics.dropped_deadline.inc(len(batch) - len(live))
        return live

    def reply_to(self, request: dict, received_at: float | None = None, arrived: float | None = None) -> list:
        """Reply body frames for a decoded request or pack (worker/packs.py); never raises. With
        `received_at` (monotonic), a request whose deadline_ms has passed by its turn is not run;
        `arrived` (perf_counter) is where its worker_ms starts (None: now)."""
        if request["op"] == "pack":
            try:
                return run_pack(self, request, received_at, arrived)
            except Exception as exc:  # a malformed pack: one error for all of it, counted once per request
                error = exc if isinstance(exc, FractalError) else InternalError(f"pack failed on {self.node}")
                log.warning("a pack failed as a whole: %s", error)
                count = request.get("n")
                for _ in range(count if type(count) is int and 1 <= count <= 0xFFFF else 1):
                    self.metrics.request_done("unknown", "error", 0.0)
                return p.error_body(request.get("id"), self.node, error)
        expires_at = float("inf") if received_at is None else p.deadline_of(request, received_at)
        rid, outcome = self.answer(request, expires_at, arrived)
        body = None
        if not isinstance(outcome, FractalError):
            try:
                body = p.ok_body(rid, self.node, outcome)
            except Exception:
                log.exception("request %s: the reply could not be encoded", request.get("request_id"))
                outcome = InternalError(f"unexpected failure on {self.node} (request id "
                                        f"{request.get('request_id')})")
        if body is None:
            body = p.error_body(rid, self.node, outcome)
        if tracing.ENABLED:
            tracing.finish(request, self.node)
        return body

    def answer(self, request: Any, expires_at: float = float("inf"), arrived: float | None = None) -> tuple[Any, Any]:
        """(id, result or FractalError) of one decoded request; never raises; counted and logged.
        Past `expires_at` (monotonic: the caller's deadline) it is answered Timeout without running. Its
        worker_ms counts from `arrived` (a perf_counter: the request's receipt), else from now."""
        started = time.perf_counter() if arrived is None else arrived
        rid = trace = op_name = None
        if tracing.ENABLED:
            tracing.begin()
        try:
            if not isinstance(request, dict) or not isinstance(request.get("op"), str):
                raise ProtocolError("a request must be a map with a string 'op'")
            rid, trace, op_name = request.get("id"), request.get("request_id"), request["op"]
            op = self._ops.get(op_name)
            if op is None:
                raise BadInput(f"unknown op {op_name!r}; known: {', '.join(sorted(OPS))}")
            if expires_at <= time.monotonic():
                self.metrics.dropped_deadline.inc()
                raise Timeout("the caller's deadline passed before the worker ran this request")
            outcome = op(self.pool, request, self.node)
        except FractalError as exc:
            outcome = exc
        except Exception:
            log.exception("request %s: %s failed unexpectedly", trace, op_name)
            outcome = InternalError(f"unexpected failure on {self.node} (request id {trace})")
        worker_time(outcome, started)
        if tracing.ENABLED:
            tracing.answered(request, outcome)
        self.request_done(op_name, trace, request.get("model", "") if isinstance(request, dict) else "",
                          outcome, started, version=served_version(request, outcome))
        return rid, outcome

    def request_done(self, op_name: Any, trace: Any, model: Any, outcome: Any, started: float,
                     batched: bool = False, version: object = None) -> None:
        """Count and log one answered request (a pack's sub-requests each count once); `version`: the
        one that served it, if known (else `model` is an entry or the newest version's)."""
        elapsed = time.perf_counter() - started
        ok = not isinstance(outcome, FractalError)
        self.metrics.request_done(op_name if op_name in OPS else "unknown", "ok" if ok else "error", elapsed)
        if op_name in PREDICT_OPS:
            self.metrics.model_done(model, None if ok else outcome.__class__.__name__, version)
        if not ok:
            fields = {"request_id": trace, "op": op_name, "model": model or None, "error": outcome.__class__.__name__}
            if isinstance(outcome, ProtocolError):
                log.warning("request %s: bad body: %s", trace, outcome, extra=fields)
            elif not isinstance(outcome, InternalError):
                log.info("request %s: %s failed: %s: %s", trace, op_name, outcome.__class__.__name__, outcome,
                         extra=fields)
        elif self._log_requests and op_name != "status":  # the broker asks for status every few s
            log.info("request %s: %s %s ok%s in %.2f ms", trace, op_name, model, " (batched)" if batched else "",
                     elapsed * 1e3, extra={"request_id": trace, "op": op_name, "model": model or None,
                                           "batched": batched, "latency_ms": round(elapsed * 1e3, 3)})
