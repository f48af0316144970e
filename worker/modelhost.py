"""The modelhost: MDP/0.2 worker connections (DEALER) answering model operations from the shared pool.

Requests run inline on the thread that owns the sockets: no hand-off on the hot path. While one
runs, a small thread sends the HEARTBEATs the broker needs to keep believing in us; sockets pass
between the two threads under a lock (a full memory barrier, as ZeroMQ requires to move a socket
between threads), and only while the main thread is busy computing and not touching them.

With `connections` > 1 the process is that many workers to the broker, so it may hold several
requests at once; with batching on, the predicts among them for one model run as one batch
(worker/batching.py, docs/batching.md).

One lifecycle for every request: decoded once into a Job (worker/jobs.py), routed by `_take` (a pack,
a dynamic batch's queue, or a run alone), weighed against its deadline before it runs (`run_alone`,
`live`: worker/runtimes.py), and answered by `answer`, which sends the reply first; the bookkeeping
(metrics, logs, trace spans, the run-time estimate) follows in `_done`, off the caller's path.
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
from .batching import BatchPolicy, Pending, Queue, policy_for, prepare, run_batch, split_late
from .connection import Connection
from .inference import Run, served_version, worker_time
from .jobs import Job
from .memory import rss_bytes
from .ops import OPS
from .packs import reply_body, run_pack
from .pool import ModelPool
from .runtimes import RunTimes
from .sessions import LoadedModel, SessionCache, SessionFactory
from .settings import WorkerSettings

log = logging.getLogger(__name__)

PREDICT_OPS = frozenset({"predict", "predict_image"})  # counted per model (metrics.ModelSeries)
INF = float("inf")


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
        self.metrics = (WorkerMetrics(self.registry, self.node) if settings.metrics_port
                        else WorkerMetrics.disabled(self.node))
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
        # NOTE: a request's log fields (extra=) are read by the JSON format alone; the text one leaves them out
        self._log_fields = settings.log_format == "json"
        curve = PeerKeys.from_files(settings.curve_secret_key, settings.curve_broker_key)
        endpoints = endpoint_list(settings.connect)
        self._several_brokers = len(endpoints) > 1
        self._connections = [
            Connection(self._context, endpoint, settings.service.encode(), settings.heartbeat_interval_s,
                       settings.heartbeat_interval_s * settings.heartbeat_liveness, settings.reconnect_max_s,
                       self._stopping, i, curve)
            for i, endpoint in enumerate(e for e in endpoints for _ in range(settings.connections))]
        self._queues: dict[str, Queue] = {}
        self._outbox: list[tuple[Job, list]] = []  # replies of a dynamic batch's rows, sent after its run
        self.run_times = RunTimes()  # what each model's run takes here: a deadline nearer than that is not run
        self._learned: Run | None = None  # the run the estimate learned from last

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
        poll_s = self.settings.poll_s
        try:
            while not self._stopping.is_set():
                self._poll_once()
                if self._queues:
                    self._run_due_batches()
                now = time.monotonic()
                for conn in self._connections:
                    if now >= conn.last_sent + conn.interval_s:
                        conn.heartbeat()
                    if now >= conn.broker_expires and not wait(conn.socket, 0) and not conn.held:
                        log.warning("broker silent: reconnecting connection %d", conn.index)
                        conn.reconnect()
                if now >= next_evict:  # its own timer: a busy worker sends FINALs, not heartbeats
                    next_evict = now + self.settings.heartbeat_interval_s
                    self.pool.evict_unloaded()
                    self.metrics.memory_rss.set(rss_bytes())
                if poll_s and now >= next_scan:  # off the request path, like the tick above
                    self._scan()
                    next_scan = time.monotonic() + poll_s
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
        connections = self._connections
        deadline = connections[0].next_due() if len(connections) == 1 else min(c.next_due() for c in connections)
        if self._queues:
            deadline = min(deadline, min(q.deadline() for q in self._queues.values()))
        timeout_ms = max(0, min(int((deadline - time.monotonic()) * 1000), 100))
        ready = zmq_poll([(c.socket, POLLIN) for c in connections], timeout_ms)
        if not ready:
            return
        # NOTE: one connection (the default): no map from socket to connection per message
        by_socket: dict[Any, Connection] = {c.socket: c for c in connections} if len(connections) > 1 else {}
        for sock, _ in ready:
            conn = by_socket[sock] if by_socket else connections[0]
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
        received = time.monotonic()  # NOTE: a request's deadline_ms counts from here
        conn.heard(received)
        try:
            command, client, body = p.parse_broker_command(frames)
        except ProtocolError as exc:
            log.warning("dropped a message from the broker: %s", exc)
            return
        if command == MDPW.REQUEST:
            conn.held += 1
            arrived = time.perf_counter()  # NOTE: worker_ms counts from here, batched or not
            traced_at = time.perf_counter_ns() if tracing.ENABLED else 0
            request = self._decode(body)
            if isinstance(request, ProtocolError):
                self._final(conn, client, p.error_body(None, self.node, request))
                return
            if traced_at:
                tracing.received(request, traced_at)
            self._take(Job.of(request, client, received, arrived, p.deadline_of(request, received), conn))
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

    def _take(self, job: Job) -> None:
        """Route one job: a pack runs its members (packs.py), a predict for a model whose batching is on
        joins that model's queue, anything else runs alone now."""
        if job.op == "pack":
            self._pack(job)
            return
        # NOTE: under the heartbeat helper: loading a large model must not look like a dead worker.
        joined = self._run_busy(self._batching, job) if self.policy.enabled and job.op == "predict" else None
        if joined is None:
            self.answer(job, self._run_busy(self.run_alone, job))
            return
        model, policy = joined
        assert job.conn is not None  # NOTE: a job alone came on a connection
        job.conn.used = True
        queue = self._queues.get(model.name)
        if queue is None:
            queue = self._queues[model.name] = Queue(policy)
        queue.policy = policy  # NOTE: a changed sidecar applies from now on; queued requests stay
        self.join(job, model, queue)
        self._flush()  # a request that could not join is answered at once

    def _batching(self, job: Job) -> tuple[LoadedModel, BatchPolicy] | None:
        """The model and policy of the dynamic batch a predict joins; None: it runs alone (also when its
        model does not load: running alone answers it the same error)."""
        try:
            model = self.pool.load(model_file_name(job.model), job.version)
            options = self.pool.sidecar(model.name).get("dynamic_batching")
        except Exception:
            return None
        policy = policy_for(model, self.policy, options)
        return None if policy is None else (model, policy)

    def join(self, job: Job, model: LoadedModel, queue: Queue) -> None:
        """Queue a predict for its batch's run; one whose inputs do not fit the model is answered now."""
        job.batched = True
        try:
            pending = prepare(model, job.fields.get("inputs"), job.fields.get("outputs"),
                              functools.partial(self.answer, job), time.monotonic())
        except Exception as exc:
            model.stats.failed(0)  # NOTE: refused before it was timed; the count is what matters
            self.answer(job, exc if isinstance(exc, FractalError) else BadInput(f"cannot use this request: {exc}"))
            return
        pending.expires_at, pending.job = job.expires_at, job
        queue.items.append(pending)

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

    # -- running --------------------------------------------------------------------------------

    def _run_busy(self, fn, *args):
        with self._lock:
            self._busy = True
        try:
            return fn(*args)
        finally:
            with self._lock:
                self._busy = False

    def run_alone(self, job: Job) -> Any:
        """The outcome of running a job alone: its result, or the FractalError to answer; never raises.
        A predict whose deadline is nearer than its model's expected run time (worker/runtimes.py) is
        not run: it is answered Timeout (a deadline drop)."""
        if tracing.ENABLED:
            tracing.begin()
        try:
            op = self._ops.get(job.op) if job.op is not None else None
            if op is None:
                if job.op is None:
                    raise ProtocolError("a request must be a map with a string 'op'")
                raise BadInput(f"unknown op {job.op!r}; known: {', '.join(sorted(OPS))}")
            if job.expires_at != INF and (left_s := job.expires_at - time.monotonic()) <= 0:
                job.dropped = True
                return late(left_s, 0.0)
            if job.op in PREDICT_OPS:
                result, job.ran = op(self.pool, job.fields, self.node,
                                     None if job.expires_at == INF else functools.partial(self._in_time, job))
                return result
            return op(self.pool, job.fields, self.node)
        except FractalError as exc:
            return exc
        except Exception:
            log.exception("request %s: %s failed unexpectedly", job.trace, job.op)
            return InternalError(f"unexpected failure on {self.node} (request id {job.trace})")

    def _in_time(self, job: Job, model: LoadedModel) -> None:
        """Raise the Timeout of a job (a deadline drop) whose deadline is nearer than the expected run of
        `model`, the version its request resolved to (worker/runtimes.py)."""
        need_s = self.run_times.expected_s(model.name)
        left_s = job.expires_at - time.monotonic()
        if left_s <= need_s:
            job.dropped = True
            raise late(left_s, need_s)

    def live(self, batch: list[Pending]) -> list[Pending]:
        """The requests of a batch about to run that can still meet their deadline, weighed against the
        batch's expected run time (its rows, worker/runtimes.py); the others are answered Timeout
        without running (deadline drops)."""
        need_s = self.run_times.expected_s(batch[0].model.name, sum(p.rows for p in batch))
        now = time.monotonic()
        batch, dropped = split_late(batch, now, need_s)
        for pending in dropped:
            pending.model.stats.failed(time.perf_counter_ns() - pending.queued_ns + pending.input_ns)
            pending.job.dropped = True
            self.answer(pending.job, late(pending.expires_at - now, need_s))
        return batch

    def _pack(self, job: Job) -> None:
        try:
            members = self._run_busy(run_pack, self, job)
        except Exception as exc:  # a malformed pack: one error for all of it, counted once per request
            self.answer(job, exc if isinstance(exc, FractalError) else InternalError(f"pack failed on {self.node}"))
            count = job.fields.get("n")
            for _ in range((count if type(count) is int and 1 <= count <= 0xFFFF else 1) - 1):
                self.metrics.request_done("unknown", "error", 0.0)
            return
        assert job.conn is not None
        body = reply_body(job, members, self.node)
        if tracing.ENABLED:
            for member in members:
                tracing.encoded(member.fields)
        self._final(job.conn, job.client, body)
        if tracing.ENABLED:
            tracing.pack_done(job.fields, [m.fields for m in members], self.node)
        self._done_all(members)
        self._learn(members)

    # -- answering -----------------------------------------------------------------------------

    def answer(self, job: Job, outcome: Any) -> None:
        """Answer a job, however it ran: the one place a reply is made. Stamps its worker_ms, tells the
        trace its outcome and encodes its reply; a pack member's goes into its pack's reply, a dynamic
        batch's row waits in the outbox for the run to end (the heartbeat thread may own the sockets
        meanwhile), anything else is sent at once. The bookkeeping (`_done`) comes after the send, off
        the caller's critical path. Never raises."""
        job.elapsed_s = worker_time(outcome, job.arrived)
        if tracing.ENABLED:
            tracing.answered(job.fields, outcome)
        job.outcome = outcome
        if job.in_pack:  # encoded with the pack's other replies (packs.reply_body)
            return
        body = self._encode(job)
        job.elapsed_s = time.perf_counter() - job.arrived
        if tracing.ENABLED:
            tracing.encoded(job.fields)
        if job.batched:
            self._outbox.append((job, body))
            return
        assert job.conn is not None
        self._final(job.conn, job.client, body)
        self._done(job)

    def _encode(self, job: Job) -> list:
        if not isinstance(job.outcome, FractalError):
            try:
                return p.ok_body(job.rid, self.node, job.outcome)
            except Exception:
                log.exception("request %s: the reply could not be encoded", job.trace)
                job.outcome = InternalError(f"unexpected failure on {self.node} (request id {job.trace})")
        return p.error_body(job.rid, self.node, job.outcome)

    def _done_all(self, jobs: list[Job]) -> None:
        """_done of jobs answered together (a pack's members, a dynamic batch's rows), whose request and
        model counters and histograms are written once per series, not once per job."""
        seconds: dict[tuple[str, str], list[float]] = {}
        served: dict[str, int] = {}
        for job in jobs:
            self._done(job, seconds, served)
        for (op, outcome), values in seconds.items():
            self.metrics.requests_done(op, outcome, values)
        for entry, count in served.items():
            self.metrics.model_done(entry, None, count=count)

    def _done(self, job: Job, seconds: dict[tuple[str, str], list[float]] | None = None,
              served: dict[str, int] | None = None) -> None:
        """Count, log, trace and learn from an answered job, once its reply has left (a pack member's:
        tracing.pack_done records its spans). With `seconds` and `served` (from _done_all) its request
        time and its count on the model version that ran are added there instead."""
        outcome, op = job.outcome, job.op
        ok = not isinstance(outcome, FractalError)
        if seconds is None:
            self.metrics.request_done(op if op in OPS else "unknown", "ok" if ok else "error", job.elapsed_s)
        else:
            key = (op if op in OPS else "unknown", "ok" if ok else "error")
            values = seconds.get(key)
            if values is None:
                seconds[key] = [job.elapsed_s]
            else:
                values.append(job.elapsed_s)
        if op in PREDICT_OPS:
            ran = job.ran
            if ok and ran is not None:  # counted on the version that ran: its entry names its series
                if served is None:
                    self.metrics.model_done(ran.entry, None)
                else:
                    served[ran.entry] = served.get(ran.entry, 0) + 1
            else:
                self.metrics.model_done(job.model, None if ok else outcome.__class__.__name__,
                                        served_version(job.fields, outcome))
            if ran is not None and ran is not self._learned and not job.in_pack:  # a pack's: in _pack
                self._learned = ran  # NOTE: a dynamic batch's rows share one run, answered in a row: learned once
                self.run_times.observe(*ran)
        if job.dropped:
            self.metrics.dropped_deadline.inc()
        if tracing.ENABLED and not job.in_pack:
            tracing.finish(job.fields, self.node)
        if not ok:
            fields = {"request_id": job.trace, "op": op, "model": job.model or None,
                      "error": outcome.__class__.__name__}
            if isinstance(outcome, ProtocolError):
                log.warning("request %s: bad body: %s", job.trace, outcome, extra=fields)
            elif not isinstance(outcome, InternalError):
                log.info("request %s: %s failed: %s: %s", job.trace, op, outcome.__class__.__name__, outcome,
                         extra=fields)
        elif self._log_requests and op != "status" and log.isEnabledFor(logging.INFO):  # status: every few s
            batched = " (batched)" if job.batched else ""
            log.info("request %s: %s %s ok%s in %.2f ms", job.trace, op, job.model, batched, job.elapsed_s * 1e3,
                     extra={"request_id": job.trace, "op": op, "model": job.model or None,
                            "batched": job.batched, "latency_ms": round(job.elapsed_s * 1e3, 3)}
                     if self._log_fields else None)

    def _learn(self, members: list[Job]) -> None:
        """Teach the run-time estimate each run a pack's members took part in, once (a batch's rows share one)."""
        learned: set[int] = set()
        for member in members:
            ran = member.ran
            if ran is not None and id(ran) not in learned:
                learned.add(id(ran))
                self.run_times.observe(*ran)

    def _flush(self) -> None:
        """Send the replies of a batch that has run, then do their bookkeeping."""
        if not self._outbox:
            return
        outbox, self._outbox = self._outbox, []
        for job, body in outbox:
            assert job.conn is not None
            if job.generation == job.conn.generation:
                self._final(job.conn, job.client, body)
            else:  # the socket it came on is gone, and the broker has sent the request elsewhere
                log.info("dropped a reply for a connection that has since reconnected")
        self._done_all([job for job, _body in outbox])

    def _final(self, conn: Connection, client: bytes, body: list) -> None:
        now = conn.final(client, body)
        conn.held = max(0, conn.held - 1)
        # Heartbeats the broker sent while we computed are still queued, unread: it was not silent.
        conn.heard(now)


    def _beat_while_busy(self) -> None:
        while not self._beater_done.wait(self.settings.heartbeat_interval_s / 2):
            with self._lock:
                if self._busy:
                    now = time.monotonic()
                    for conn in self._connections:
                        if conn.socket is not None and now - conn.last_sent >= conn.interval_s:
                            conn.heartbeat()


def late(left_s: float, need_s: float) -> Timeout:
    """The Timeout of a request not run because its deadline cannot be met."""
    if left_s <= 0:
        return Timeout("the caller's deadline passed before the worker ran this request")
    return Timeout(f"the caller's deadline was {left_s * 1e3:.0f} ms away, and this model's run takes at least "
                   f"{need_s * 1e3:.0f} ms here: the worker did not run it")
