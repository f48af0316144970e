"""The ROUTER loop: services, least-recently-used idle workers, heartbeats, re-dispatch, expiry."""
from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass
from functools import partial
from typing import Callable

import zmq
from prometheus_client import CollectorRegistry

from metrics import BrokerMetrics, new_registry, observe_many, serve_metrics

from . import protocol as p
from .curve import BrokerCurve
from .errors import FractalError, NoWorkerAvailable, ProtocolError, QueueFull, Timeout, WorkerLost
from .protocol import MDPW, Dialect
from .queues import FairQueue
from .rejections import Rejection
from .settings import (
    check_heartbeat,
    curve_secret_key_setting,
    heartbeat_interval_setting,
    heartbeat_liveness_setting,
    log_format_setting,
    log_level_setting,
    metrics_host_setting,
    metrics_port_setting,
    setting,
)
from .sockets import drain, send_frames, wait
from .status import STATUS_BODY, STATUS_CLIENT, StatusBoard

log = logging.getLogger(__name__)

Answer = Callable[[bytes, list, float], None]  # where an internal request's FINAL body goes (Request.answer)

NODE = "broker"
MAX_DRAIN = 256  # messages handled per wake-up before timers get a look
RUN_WEIGHT = 0.25  # weight of the newest run in a model's moving average of run times (Service.ran)
# Replies timed as runs of their model: ours with status 200, and a body whose status we cannot read (another
# implementation's). An error is no run: a request the worker dropped unrun for its deadline answers in well
# under a millisecond, and timing such answers made a flooded slow model look fast (Service.ran).
RUN_STATUSES = (200, None)
MAX_TIMED_MODELS = 4096  # models whose run times a service keeps (clients may name any model)
DEADLINE_USE = 0.5  # bound_by_deadline: the share of its time left a request's expected end may fill: run
                    # times are averages, and a machine under load runs slower than it measured


@dataclass(frozen=True)
class BrokerSettings:
    bind: str = setting("tcp://127.0.0.1:5555", "endpoint clients and workers connect to")
    heartbeat_interval_s: float = heartbeat_interval_setting("workers")
    heartbeat_liveness: int = heartbeat_liveness_setting("a worker is declared dead")
    max_queue: int = setting(1024, "queued messages per service before 'QueueFull' (429) replies (a pack of "
                                   "requests takes one place)")
    max_queue_per_model: int = setting(4096, "queued requests per model before 'QueueFull' (429) replies (a pack "
                                            "counts its requests; one message is always taken into an empty "
                                            "queue)")
    reserve_workers: int = setting(1, "a slow model (runs of reserve_above_s and more) holds at most (workers - "
                                      "this, at least 1) workers while another model is active (has requests "
                                      "queued or had one in the last reserve_active_s), so a flood on it leaves "
                                      "that many free for the others' next requests; 0: every worker takes "
                                      "whatever waits")
    reserve_above_s: float = setting(0.1, "reserve_workers applies to models whose requests run this long or "
                                          "longer each (the broker's moving average, dispatch to reply, or a "
                                          "message running that long per request now), until they are back "
                                          "under half of it, and to a model not timed yet; a faster model may "
                                          "take every worker: the others wait for one of its runs at most")
    reserve_active_s: float = setting(2.0, "reserve_workers: how long after its latest request another model "
                                           "still counts as active")
    bound_by_deadline: bool = setting(True, "a model's queue is also full (429) when the requests before a new "
                                            "one, at the model's measured run time, would keep it waiting past "
                                            "its deadline: the caller hears 429 at once, not 504 later")
    placement: bool = setting(True, "send a request to an idle worker that holds its model; while only busy "
                                    "workers hold it, wait for one (up to placement_wait_s); else the least "
                                    "loaded idle worker (docs/protocol.md, Placement); off: the least recently "
                                    "used idle worker")
    placement_wait_s: float = setting(0.5, "with placement: how long a model's oldest queued request waits for a "
                                           "busy worker that holds the model before the least loaded idle "
                                           "worker takes it and loads the model (about a cold load's cost); "
                                           "0: never wait")
    queue_timeout_s: float = setting(30.0, "seconds a request may wait for a worker before 'Timeout'")
    max_message_bytes: int = setting(1 << 30, "largest message accepted from any peer")
    majortomo_busy_timeout_s: float = setting(
        900.0, "how long a majortomo-dialect worker may compute silently (it sends no heartbeats while busy)")
    status_interval_s: float = setting(5.0, "how often idle workers are asked for their status")
    startup_grace_s: float = setting(0.0, "for this long after start, a request for a service with no worker "
                                          "waits in the queue for workers to (re)register instead of "
                                          "'NoWorkerAvailable': a restarted broker's workers return within "
                                          "one of their heartbeats")
    curve_secret_key: str = curve_secret_key_setting("the broker's")
    curve_allow_dir: str = setting("", "CURVE: directory of the .key files of admitted workers and clients")
    metrics_host: str = metrics_host_setting()
    metrics_port: int = metrics_port_setting(9150)
    log_level: str = log_level_setting()
    log_format: str = log_format_setting()

    def __post_init__(self) -> None:
        check_heartbeat(self.heartbeat_interval_s, self.heartbeat_liveness)
        if self.max_queue < 0 or self.max_queue_per_model < 0 or self.reserve_workers < 0:
            raise ValueError("max_queue, max_queue_per_model and reserve_workers must be >= 0")
        if (self.queue_timeout_s <= 0 or self.status_interval_s <= 0 or self.reserve_above_s < 0
                or self.reserve_active_s < 0):
            raise ValueError("queue_timeout_s and status_interval_s must be > 0, reserve_above_s and "
                             "reserve_active_s >= 0")
        if self.startup_grace_s < 0 or self.placement_wait_s < 0:
            raise ValueError("startup_grace_s and placement_wait_s must be >= 0")


class Request:
    """One client message in the broker. `count` is the user requests it carries and `model` the model
    they are for (read at fixed offsets without decoding: protocol.route_of), and every counter moves
    by `count`. `deadline_at` is the caller's deadline on our clock (infinite without a routing
    header); `expires_at` the earlier of it and the end of the longest wait in the queue.

    `answer` is None for a client's request: its replies go back to `client` over the socket. A request
    the broker sends for itself (`Request.internal`) carries instead the function its FINAL body goes to;
    it is never queued, counted, retried or answered with an error."""
    __slots__ = ("client", "dialect", "service", "body", "received_at", "expires_at", "attempts", "count",
                 "model", "deadline_at", "answer")

    def __init__(self, client: bytes, dialect: Dialect, service: bytes, body: list, received_at: float,
                 expires_at: float, count: int = 1, model: bytes = b"", deadline_at: float = float("inf"),
                 answer: Answer | None = None):
        self.client = client
        self.dialect = dialect
        self.service = service
        self.body = body
        self.received_at = received_at
        self.expires_at = min(expires_at, deadline_at)
        self.attempts = 0
        self.count = count
        self.model = model
        self.deadline_at = deadline_at
        self.answer = answer

    @classmethod
    def internal(cls, client: bytes, service: bytes, body: list, now: float, answer: Answer) -> Request:
        """The broker's own request to an idle RFC worker: `client` is a return address no peer can have,
        the worker's FINAL body goes to `answer(worker identity, body, now)` and PARTIALs nowhere. It
        carries no user request (count 0) and, handed straight to a worker, never waits in a queue."""
        return cls(client, Dialect.RFC, service, body, now, float("inf"), count=0, answer=answer)


class Worker:
    __slots__ = ("identity", "service", "dialect", "expires_at", "request", "served", "since")

    def __init__(self, identity: bytes, service: "Service", dialect: Dialect, expires_at: float):
        self.identity = identity
        self.service = service
        self.dialect = dialect
        self.expires_at = expires_at
        self.request: Request | None = None
        self.served = 0
        self.since = 0.0  # when it was handed its request (_dispatch), for the model's run time


class Service:
    """A service's workers and queue, with its metric children bound once."""
    __slots__ = ("name", "idle", "requests", "workers", "busy", "m_dispatched", "m_completed", "m_duration",
                 "m_queue_wait", "models", "_metrics", "_label", "run_s", "slow", "_last_model", "_last_at",
                 "_other_at")

    def __init__(self, name: bytes, metrics: BrokerMetrics):
        self.name = name
        self.idle: deque[Worker] = deque()       # least recently used on the left
        self.requests: FairQueue[Request] = FairQueue()  # per model, served round-robin (broker/queues.py)
        self.workers = 0
        self.busy: dict[bytes, int] = {}  # model -> workers running its requests now
        label = name.decode(errors="replace")
        self.m_dispatched = metrics.dispatched.labels(label)
        self.m_completed = metrics.completed.labels(label)
        self.m_duration = metrics.duration.labels(label)
        self.m_queue_wait = metrics.queue_wait.labels(label)
        self.models: dict[bytes, tuple] = {}  # model -> (dispatched, queue wait) children, bound once
        self._metrics, self._label = metrics, label
        self.run_s: dict[bytes, float] = {}  # model -> seconds per request, moving average (ran)
        self.slow: set[bytes] = set()  # models whose run_s reached reserve_above_s, not yet back under half
        # the named model of the latest request, its time, and the time of the latest for any other model
        self._last_model, self._last_at, self._other_at = b"", float("-inf"), float("-inf")

    def model_series(self, model: bytes, resident: frozenset[bytes]) -> tuple | None:
        """`model`'s metric children, or None for a model no worker has reported resident: clients name
        any model, and only the ones workers hold become label values."""
        series = self.models.get(model)
        if series is None and model in resident:
            labels = (self._label, model.decode(errors="replace"))
            series = self.models[model] = (self._metrics.model_dispatched.labels(*labels),
                                           self._metrics.model_queue_wait.labels(*labels))
        return series

    def model_labels(self) -> list[str]:
        return [model.decode(errors="replace") for model in self.models]

    @property
    def queued(self) -> int:
        """User requests waiting (a pack counts its sub-requests)."""
        return self.requests.queued

    def enqueue(self, request: "Request", first: bool = False) -> None:
        self.requests.push(request, first)
        self.seen(request.model, request.received_at)

    def seen(self, model: bytes, now: float) -> None:
        """Note a request for `model` (named models only: `""` is management, not a model's traffic)."""
        if model:
            if model != self._last_model:
                self._other_at, self._last_model = self._last_at, model
            self._last_at = now

    def others_active(self, model: bytes, now: float, recent_s: float) -> bool:
        """Whether a named model other than `model` has requests queued or had one in the last `recent_s`."""
        if self.requests.others_waiting(model):
            return True
        return now - (self._last_at if model != self._last_model else self._other_at) < recent_s

    def ran(self, model: bytes, seconds: float, count: int, slow_s: float) -> None:
        """Fold a message's run (dispatch to FINAL, `count` requests) into `model`'s time per request;
        the model is slow from when that reaches `slow_s` until it falls under half of it (hysteresis:
        a run time near the line, which varies with the machine's load, must not flip it every call)."""
        if not count or not model:  # NOTE: `""` is every op that names no model: no one run time
            return
        each, runs = seconds / count, self.run_s
        old = runs.get(model)
        if old is None:
            if len(runs) >= MAX_TIMED_MODELS:
                gone = next(iter(runs))  # NOTE: the longest known; bounded whatever clients name
                del runs[gone]
                self.slow.discard(gone)
            runs[model] = new = each
        else:
            runs[model] = new = old + RUN_WEIGHT * (each - old)
        if new >= slow_s:
            self.slow.add(model)
        elif new < slow_s / 2:
            self.slow.discard(model)

    def started(self, model: bytes) -> None:
        self.busy[model] = self.busy.get(model, 0) + 1

    def finished(self, model: bytes) -> None:
        left = self.busy.get(model, 0) - 1
        if left > 0:
            self.busy[model] = left
        else:
            self.busy.pop(model, None)

    def dequeue(self) -> "Request":
        return self.requests.pop()


class Broker:
    """One ROUTER socket serving clients and workers; `run()` until `stop()`."""

    def __init__(self, settings: BrokerSettings, context: zmq.Context | None = None,
                 registry: CollectorRegistry | None = None):
        self.settings = settings
        self._context = context or zmq.Context.instance()
        # NOTE: typed as always there, since every message is handled inside run(), after bind(); None
        # marks it unbound or closed.
        self._socket: zmq.Socket = None  # type: ignore[assignment]
        self._services: dict[bytes, Service] = {}
        self._workers: dict[bytes, Worker] = {}
        self._stopping = False
        self._expiry_s = settings.heartbeat_interval_s * settings.heartbeat_liveness
        self._grace_until = time.monotonic() + settings.startup_grace_s  # see _end_grace
        self.registry = registry if registry is not None else new_registry("fractal_broker")
        self.metrics = BrokerMetrics(self.registry, enabled=settings.metrics_port != 0)
        self._board = StatusBoard(settings.status_interval_s)
        self._curve = (BrokerCurve(self._context, settings.curve_secret_key, settings.curve_allow_dir)
                       if settings.curve_secret_key or settings.curve_allow_dir else None)

    # -- lifecycle ---------------------------------------------------------------------------

    def bind(self) -> None:
        sock = self._context.socket(zmq.ROUTER)
        sock.linger = 0  # NOTE: a stopping broker must not wait on vanished peers
        sock.setsockopt(zmq.MAXMSGSIZE, self.settings.max_message_bytes)
        sock.setsockopt(zmq.RCVHWM, 0)
        if self._curve is not None:
            self._curve.apply(sock)
        sock.bind(self.settings.bind)
        self._socket = sock
        log.info("broker bound to %s", self.settings.bind)

    def stop(self) -> None:
        """Ask the loop to end; safe from a signal handler."""
        self._stopping = True

    def run(self) -> None:
        if self._socket is None:
            self.bind()
        serve_metrics(self.settings.metrics_host, self.settings.metrics_port, self.registry, "broker")
        sock = self._socket
        tick_s = min(self.settings.heartbeat_interval_s, 0.1)
        if self.settings.placement and self.settings.placement_wait_s > 0:  # a wait ends within half of it
            tick_s = min(tick_s, self.settings.placement_wait_s / 2)
        next_heartbeat = time.monotonic() + self.settings.heartbeat_interval_s
        next_tick = time.monotonic() + tick_s
        try:
            while not self._stopping:
                if wait(sock, max(0, int((next_tick - time.monotonic()) * 1000))):
                    self._drain(sock)
                now = time.monotonic()
                if now >= next_tick:
                    next_tick = now + tick_s
                    self._purge_workers(now)
                    self._expire_requests(now)
                    self._note_long_runs(now)
                    if self.settings.placement:
                        self._place_waiting(now)
                    if self._grace_until and now >= self._grace_until:
                        self._end_grace()
                    self._poll_status(now)
                    self._update_gauges()
                if now >= next_heartbeat:
                    next_heartbeat = now + self.settings.heartbeat_interval_s
                    self._send_heartbeats()
        finally:
            self._close()

    def _close(self) -> None:
        for service in self._services.values():
            while service.requests:
                self._reply_error(service.dequeue(), NoWorkerAvailable("the broker is stopping"),
                                  Rejection.STOPPING)
        for worker in list(self._workers.values()):
            self._send_worker(worker, MDPW.DISCONNECT)
        self._socket.close(linger=0)
        self._socket = None  # type: ignore[assignment]  # closed for good
        if self._curve is not None:
            self._curve.stop()
        log.info("broker stopped")

    # -- receiving -----------------------------------------------------------------------------

    def _drain(self, sock: zmq.Socket) -> None:
        """Handle the messages waiting, up to MAX_DRAIN; the caller's poll said the first one is there."""
        drain(sock, self._handle, MAX_DRAIN, ready=True)

    def _handle(self, frames: list) -> None:
        """Handle one message from a peer; never raises: what breaks MDP is logged, counted and dropped
        (a worker that sent it is told to DISCONNECT)."""
        try:
            message = p.parse_at_broker(frames)
            if isinstance(message, p.ClientRequest):
                self._client_message(message)
            else:
                self._worker_message(message)
        except ProtocolError as exc:
            peer = p.worker_sender(frames)
            if peer is not None:
                self._disconnect(peer[0], peer[1], self._workers.get(peer[0]), str(exc))
                return
            self.metrics.dropped.inc()
            log.warning("dropped message from %s: %s", frames[0].hex() if frames else "?", exc)
        except Exception:
            self.metrics.dropped.inc()
            log.exception("dropped message from %s after an unexpected error", frames[0].hex() if frames else "?")

    def _client_message(self, message: p.ClientRequest) -> None:
        client, dialect, service_name, body = message
        if service_name.startswith(p.MMI_PREFIX):
            self._mmi(client, dialect, service_name, body)
            return
        now = time.monotonic()
        model, deadline_ms, count = p.route_of(body[0]) if body else (b"", None, 1)
        if model and not model.endswith(p.MODEL_SUFFIX_BYTES):
            model += p.MODEL_SUFFIX_BYTES  # NOTE: `iris` and `iris.onnx` are one model (protocol.model_file_name)
        request = Request(client, dialect, service_name, body, now, now + self.settings.queue_timeout_s, count,
                          model, float("inf") if deadline_ms is None else now + deadline_ms / 1000)
        service = self._services.get(service_name)
        if service is None and body and now < self._grace_until:  # workers may be on their way back
            service = self._services[service_name] = Service(service_name, self.metrics)
        if not body:
            self._reply_error(request, ProtocolError("REQUEST without a body frame (RFC 18 requires one)"),
                              Rejection.BAD_REQUEST)
        elif service is None or (service.workers == 0 and now >= self._grace_until):
            self._reply_error(request, NoWorkerAvailable(
                f"no worker is registered for service {service_name.decode(errors='replace')!r}"), Rejection.NO_WORKER)
        elif deadline_ms == 0:
            self._reply_error(request, Timeout("the request's deadline had passed when it reached the broker"),
                              Rejection.DEADLINE)
        elif service.idle and self._may_run(service, model) and (worker := self._placed(service, model, now)):
            self._dispatch(worker, request, now)
        elif len(service.requests) >= self.settings.max_queue:  # NOTE: messages: a pack takes one place
            self._reply_error(request, QueueFull(
                f"{len(service.requests)} messages ({service.queued} requests) already queued for this service; "
                f"retry later"), Rejection.OVERLOADED)
        elif (waiting := service.requests.queued_for(model)) and waiting + count > self.settings.max_queue_per_model:
            self._reply_error(request, QueueFull(
                f"{waiting} requests already queued for model {model.decode(errors='replace')!r} "
                f"(max_queue_per_model {self.settings.max_queue_per_model}); retry later"), Rejection.QUEUE_FULL)
        elif (late := self._late(service, request, now)) is not None:
            self._reply_error(request, QueueFull(late), Rejection.QUEUE_FULL)
        else:
            service.enqueue(request)

    def _mmi(self, client: bytes, dialect: Dialect, service_name: bytes, body: list) -> None:
        if service_name == p.MMI_SERVICE:
            wanted = self._services.get(body[0] if body else b"")
            reply = b"200" if wanted is not None and wanted.workers > 0 else b"404"
        elif service_name == p.MMI_WORKERS:
            reply = p.pack(self._board.report(list(self._workers.values()), self._services,
                                              time.monotonic(), self._expiry_s))
        else:
            reply = b"501"
        self._send_client(client, dialect, service_name, [reply])

    def _worker_message(self, message: p.WorkerCommand) -> None:
        identity, dialect, command = message.sender, message.dialect, message.command
        worker = self._workers.get(identity)
        if command == MDPW.READY:
            if worker is not None:  # RFC 18: a READY out of sequence is answered with DISCONNECT.
                self._disconnect(identity, dialect, worker, "READY out of sequence")
                return
            self._register(identity, dialect, message.address)
            return
        if worker is None:
            # An unknown worker (the broker restarted, or we declared it dead): make it reconnect.
            send_frames(self._socket, p.broker_command(identity, dialect, MDPW.DISCONNECT))
            return
        if command == MDPW.FINAL or command == MDPW.PARTIAL:
            self._worker_reply(worker, command == MDPW.FINAL, message)
        elif command == MDPW.DISCONNECT:
            log.info("worker %s sent DISCONNECT", identity.hex())
            self._remove_worker(worker, redispatch=True)
        else:  # HEARTBEAT
            worker.expires_at = time.monotonic() + self._expiry_s

    def _worker_reply(self, worker: Worker, final: bool, message: p.WorkerCommand) -> None:
        """Forward a worker's PARTIAL or FINAL to its client, then do the bookkeeping (the client's wait
        ends at the send); a FINAL makes the worker idle."""
        request = worker.request
        if request is None or message.address != request.client:
            self._disconnect(worker.identity, worker.dialect, worker,
                             "reply without a matching request in flight")
            return
        if request.answer is None:  # NOTE: the send inline, before any bookkeeping: the client waits for it
            send_frames(self._socket, p.client_reply(request.client, request.dialect, request.service, message.body,
                                                     final))
        now = time.monotonic()
        worker.expires_at = now + self._expiry_s  # NOTE: before _worker_idle, which may dispatch (and extend it)
        if not final:
            return
        worker.request = None
        if request.answer is not None:  # the broker's own request (Request.internal): its answer stays here
            request.answer(worker.identity, message.body, now)
        else:
            service = worker.service
            service.m_completed.inc(request.count)
            observe_many(service.m_duration, now - request.received_at, request.count)
            worker.served += request.count
            service.finished(request.model)
            if p.reply_status(message.body[0] if message.body else b"") in RUN_STATUSES:
                service.ran(request.model, now - worker.since, request.count, self.settings.reserve_above_s)
        self._worker_idle(worker)

    # -- workers -------------------------------------------------------------------------------

    def _register(self, identity: bytes, dialect: Dialect, service_name: bytes) -> None:
        service = self._services.get(service_name)
        if service is None:
            service = self._services[service_name] = Service(service_name, self.metrics)
        worker = Worker(identity, service, dialect, time.monotonic() + self._expiry_s)
        self._workers[identity] = worker
        service.workers += 1
        self._board.asked(identity, time.monotonic())  # first status poll one interval from now
        log.info("worker %s READY for %s (%s dialect, %d workers)", identity.hex(),
                 service_name.decode(errors="replace"), dialect.value, service.workers)
        self._worker_idle(worker)

    def _worker_idle(self, worker: Worker) -> None:
        service = worker.service
        if service.requests:
            now = time.monotonic()
            while service.requests:  # NOTE: round-robin over models (broker/queues.py)
                if self.settings.placement:
                    request = service.requests.pop_eligible(partial(self._may_take, worker, now))
                    if request is None:
                        break  # what waits waits for its holders (placement_wait_s): see _place_waiting
                elif self.settings.reserve_workers:
                    request = service.requests.pop_eligible(lambda model: self._may_run(service, model, now))
                    if request is None:
                        break  # every waiting model holds its share: this worker stays free for others
                else:
                    request = service.dequeue()
                if request.expires_at > now:
                    self._dispatch(worker, request, now)
                    return
                self._expired(request, now)
        service.idle.append(worker)

    def _placed(self, service: Service, model: bytes, now: float) -> Worker | None:
        """Take the idle worker a new request for `model` goes to, or None when it must queue. Without
        `placement`, or without a model, the least recently used. With it (docs/protocol.md, "Placement"):
        an idle worker that holds the model; while only busy ones hold it, none (the request queues
        behind the model's others and waits for a holder, up to placement_wait_s: _place_waiting);
        when no worker holds it, the least loaded idle one at once."""
        idle = service.idle
        if not model or not self.settings.placement:
            return idle.popleft()
        if self.settings.placement_wait_s > 0 and service.requests.queued_for(model):
            return None  # NOTE: first in, first out within a model: the oldest go first
        index = self._board.pick(idle, model)
        worker = idle[index]
        if not self._board.holds(worker.identity, model) and self._waits_for_holder(service, model, now):
            return None
        del idle[index]
        return worker

    def _waits_for_holder(self, service: Service, model: bytes, now: float) -> bool:
        """Placement: whether a request for `model` that no idle worker holds waits for a busy holder:
        `max` replicas of it are held (model_replicas, status.StatusBoard.full), or some worker holds it
        and its oldest queued request has waited less than placement_wait_s."""
        wait_s = self.settings.placement_wait_s
        if not model:
            return False
        if self._board.full(model):
            return True  # NOTE: `max` replicas hold it: only they take it, however long it waits
        if wait_s <= 0 or not self._board.held(model) or self._holders_run_slow_others(service, model):
            return False
        oldest = service.requests.oldest(model)
        return oldest is None or now - oldest.received_at < wait_s

    def _holders_run_slow_others(self, service: Service, model: bytes) -> bool:
        """Every holder of `model` is running another model's request, and that model is slow (its runs
        take reserve_above_s or more): a holder frees up only after such a run, so waiting for one would
        cost `model`'s caller a slow run (a flood on a slow model would cost a fast model's callers
        placement_wait_s each time its holders are taken). Loading it elsewhere is cheaper."""
        if not service.slow:
            return False
        running = [w.request.model for w in map(self._workers.get, self._board.holders(model))
                   if w is not None and w.request is not None]
        return bool(running) and all(m != model and m in service.slow for m in running)

    def _note_long_runs(self, now: float) -> None:
        """A model whose message has been running reserve_above_s or more per request is slow from now on,
        whatever its moving average says (Service.slow; its FINAL is timed as usual, hysteresis and all).
        The average learns only when runs end: a model timed by fast answers that were no runs of it (an
        upload, a readiness check) would take every worker, and leave the others' calls waiting for its
        holders, until its first long run ended."""
        slow_s = self.settings.reserve_above_s
        for worker in self._workers.values():
            request = worker.request
            if (request is not None and request.answer is None and request.model
                    and now - worker.since >= slow_s * request.count):
                worker.service.slow.add(request.model)

    def _may_take(self, worker: Worker, now: float, model: bytes) -> bool:
        """Placement: whether `worker`, just idle, takes the next queued request for `model`."""
        service = worker.service
        return self._may_run(service, model, now) and (
            self._board.holds(worker.identity, model) or not self._waits_for_holder(service, model, now))

    def _may_spread(self, service: Service, now: float, model: bytes) -> bool:
        """Placement: whether any idle worker may take `model`'s oldest request (its wait is over)."""
        return self._may_run(service, model, now) and not self._waits_for_holder(service, model, now)

    def _place_waiting(self, now: float) -> None:
        """Placement: a request that waited placement_wait_s for a busy holder of its model, or whose
        holders left, goes to the least loaded idle worker, which loads the model."""
        for service in self._services.values():
            while service.idle and service.requests:
                request = service.requests.pop_eligible(partial(self._may_spread, service, now))
                if request is None:
                    break
                if request.expires_at <= now:
                    self._expired(request, now)
                    continue
                index = self._board.pick(service.idle, request.model)
                worker = service.idle[index]
                del service.idle[index]
                self._dispatch(worker, request, now)

    def _may_run(self, service: Service, model: bytes, now: float | None = None) -> bool:
        """Whether `model` may take one more worker (BrokerSettings.reserve_workers): yes below its share
        of max(1, workers - reserve); past it only when its runs are short (reserve_above_s) or no other
        model is active, so a flood of slow requests leaves `reserve` workers free for the others. A
        model not timed yet counts as slow: until its first reply nothing says its runs are short, and
        a flood's first calls would take every worker (a fast model pays one of its own runs)."""
        reserve = self.settings.reserve_workers
        if not reserve or service.busy.get(model, 0) < max(1, service.workers - reserve):
            return True
        if not model or (model not in service.slow and model in service.run_s):
            return True
        return not service.others_active(model, time.monotonic() if now is None else now,
                                         self.settings.reserve_active_s)

    def _share(self, service: Service, model: bytes, now: float) -> int:
        """The workers `model` may run on at once: all of them, less reserve_workers while the reserve
        applies to it (_may_run), at most its `max` replicas with placement; at least one."""
        share = service.workers
        if (self.settings.reserve_workers and model in service.slow
                and service.others_active(model, now, self.settings.reserve_active_s)):
            share -= self.settings.reserve_workers
        if self.settings.placement and (limit := self._board.limit(model)):
            share = min(share, limit)
        return max(1, share)

    def _late(self, service: Service, request: Request, now: float) -> str | None:
        """bound_by_deadline: why `request`, about to queue, would wait past its deadline, or None. Its
        model's running requests (up to one run each) end first, then what waits before it, then its own
        requests, on the workers the model may run on (_share), at the model's measured time per
        request; that may fill DEADLINE_USE of the time left (run times are averages). Not bounded: a
        lone request into an empty queue (as with max_queue_per_model), a model not timed yet, and a
        request whose deadline is shorter than one run: no queue is to blame, and it hears 504 as before."""
        model = request.model
        run_s = service.run_s.get(model)
        if run_s is None or not self.settings.bound_by_deadline or not model:
            return None
        oldest = service.requests.oldest(model)
        if oldest is not None and oldest.expires_at <= now:  # NOTE: what will not run is no wait: answer it first
            self._expire_requests(now)
        waiting = service.requests.queued_for(model)
        if not waiting and request.count == 1:
            return None
        usable_s = DEADLINE_USE * (request.expires_at - now)
        share = self._share(service, model, now)
        wait_s = (service.busy.get(model, 0) + waiting + request.count) * run_s / share
        if wait_s <= usable_s or run_s >= usable_s:
            return None
        return (f"{waiting} requests already queued for model {model.decode(errors='replace')!r}: at "
                f"{run_s * 1000:.0f} ms each on {share} worker(s), about {wait_s:.1f} s before this one's end, "
                f"more than {DEADLINE_USE:.0%} of the {request.expires_at - now:.1f} s left of its deadline; "
                f"retry later")

    def _dispatch(self, worker: Worker, request: Request, now: float) -> None:
        body = request.body
        if request.deadline_at != float("inf") and now - request.received_at >= 0.001:
            # NOTE: the worker counts from its own receipt: tell it what is left after the queue (a copy
            # of the first frame only; tensors of 64 KiB and more are frames of their own).
            body = [p.with_deadline(body[0], int((request.deadline_at - now) * 1000)), *body[1:]]
        self._send_worker(worker, MDPW.REQUEST, request.client, body)
        # NOTE: bookkeeping and metrics after the send: they are off the request's path
        request.attempts += 1
        worker.request = request
        worker.since = now
        if worker.dialect is Dialect.MAJORTOMO:
            worker.expires_at = now + self.settings.majortomo_busy_timeout_s
        service = worker.service
        service.started(request.model)
        service.seen(request.model, now)
        if self.settings.placement and request.model:
            self._board.loading(worker.identity, request.model)  # it holds the model from now on
        service.m_dispatched.inc(request.count)
        series = service.model_series(request.model, self._board.resident)
        if series is not None:
            series[0].inc(request.count)
        if request.attempts == 1:
            observe_many(service.m_queue_wait, now - request.received_at, request.count)
            if series is not None:
                observe_many(series[1], now - request.received_at, request.count)

    def _disconnect(self, identity: bytes, dialect: Dialect, worker: Worker | None, why: str) -> None:
        log.warning("disconnecting worker %s: %s", identity.hex(), why)
        self.metrics.dropped.inc()
        send_frames(self._socket, p.broker_command(identity, dialect, MDPW.DISCONNECT))
        if worker is not None:
            self._remove_worker(worker, redispatch=True)

    def _remove_worker(self, worker: Worker, redispatch: bool) -> None:
        del self._workers[worker.identity]
        self._board.forget(worker.identity)
        service = worker.service
        service.workers -= 1
        try:
            service.idle.remove(worker)
        except ValueError:
            pass
        request, worker.request = worker.request, None
        if request is not None and request.answer is None:  # the broker's own requests are not retried
            service.finished(request.model)
            if redispatch:
                self._redispatch(request)
        if service.workers == 0:
            while service.requests:
                self._reply_error(service.dequeue(), NoWorkerAvailable(
                    "the last worker for this service went away"), Rejection.NO_WORKER)
            # NOTE: any peer may register any service name; an empty service leaves no state behind.
            del self._services[service.name]
            self.metrics.forget_service(service.name.decode(errors="replace"), service.model_labels())

    def _redispatch(self, request: Request) -> None:
        service = self._services[request.service]
        if request.attempts >= 2:
            self._reply_error(request, WorkerLost(
                "two workers died while handling this request; it was not retried again"), Rejection.WORKER_LOST)
            return
        self.metrics.redispatched.labels(service.name.decode(errors="replace")).inc(request.count)
        log.warning("re-dispatching a request of client %s after its worker died", request.client.hex())
        now = time.monotonic()
        if request.expires_at <= now:
            self._expired(request, now)
        elif service.idle and (worker := self._placed(service, request.model, now)):
            self._dispatch(worker, request, now)
        else:
            service.enqueue(request, first=True)

    def _purge_workers(self, now: float) -> None:
        dead = [w for w in self._workers.values() if w.expires_at < now]
        for worker in dead:
            self.metrics.worker_deaths.inc()
            log.warning("worker %s missed %d heartbeats: declared dead", worker.identity.hex(),
                        self.settings.heartbeat_liveness)
            self._remove_worker(worker, redispatch=True)

    def _send_heartbeats(self) -> None:
        for worker in self._workers.values():
            self._send_worker(worker, MDPW.HEARTBEAT)

    def _poll_status(self, now: float) -> None:
        """Ask idle RFC workers whose status is stale what they hold (see broker/status.py)."""
        for service in self._services.values():
            if service.requests:
                continue  # real work first
            for worker in self._board.to_ask(service.idle, now):
                service.idle.remove(worker)
                self._ask(worker, Request.internal(STATUS_CLIENT, service.name, STATUS_BODY, now,
                                                   self._board.answered))

    def _ask(self, worker: Worker, request: Request) -> None:
        """Hand the broker's own `request` (Request.internal) to an idle `worker`, which is busy until it
        answers; no counter moves."""
        worker.request = request
        self._send_worker(worker, MDPW.REQUEST, request.client, request.body)

    def _end_grace(self) -> None:
        """The start-up grace is over: what waits for a service that still has no worker fails now,
        and such services leave no state behind (any client may name any service)."""
        self._grace_until = 0.0
        for service in [s for s in self._services.values() if s.workers == 0]:
            while service.requests:
                self._reply_error(service.dequeue(), NoWorkerAvailable(
                    f"no worker registered within the broker's {self.settings.startup_grace_s:g} s start-up grace"),
                    Rejection.NO_WORKER)
            del self._services[service.name]
            self.metrics.forget_service(service.name.decode(errors="replace"), service.model_labels())

    def _update_gauges(self) -> None:
        m = self.metrics
        for service in self._services.values():
            label = service.name.decode(errors="replace")
            m.workers.labels(label).set(service.workers)
            m.idle_workers.labels(label).set(len(service.idle))
            m.queue_depth.labels(label).set(service.queued)

    # -- requests --------------------------------------------------------------------------------

    def _expire_requests(self, now: float) -> None:
        for service in self._services.values():
            if service.requests:
                for request in service.requests.expire(now):
                    self._expired(request, now)

    def _expired(self, request: Request, now: float) -> None:
        """Answer Timeout to a request that may not be dispatched any more: its caller's deadline passed
        (rejected, reason "deadline": it costs no compute) or it waited `queue_timeout_s` (expired)."""
        if request.deadline_at <= now:
            self._reply_error(request, Timeout(
                f"the request's deadline passed after {(now - request.received_at) * 1000:.0f} ms in the broker's "
                f"queue; it was not run"), Rejection.DEADLINE)
            return
        self.metrics.expired.labels(request.service.decode(errors="replace")).inc(request.count)
        self._reply_error(request, Timeout(f"no worker became free within {self.settings.queue_timeout_s:g} s"), None)

    def _reply_error(self, request: Request, error: FractalError, reason: Rejection | None) -> None:
        # NOTE: counted before the reply leaves, so a caller that got its rejection finds it in the metrics
        if reason is not None:
            # NOTE: clients may name any service; only registered ones become label values.
            service = self._services.get(request.service)
            label = request.service.decode(errors="replace") if service is not None else "unknown"
            self.metrics.rejected.labels(label, reason).inc(request.count)
            if service is not None and service.model_series(request.model, self._board.resident) is not None:
                self.metrics.model_rejected.labels(label, request.model.decode(errors="replace"),
                                                   reason).inc(request.count)
        body = p.error_body(p.request_id_of(request.body[0]) if request.body else None, NODE, error)
        self._send_client(request.client, request.dialect, request.service, body)

    # -- sending -------------------------------------------------------------------------------

    def _send_client(self, client: bytes, dialect: Dialect, service: bytes, body: list,
                     final: bool = True) -> None:
        # NOTE: ROUTER drops messages to vanished peers instead of blocking (ROUTER_MANDATORY off).
        send_frames(self._socket, p.client_reply(client, dialect, service, body, final))

    def _send_worker(self, worker: Worker, command: bytes, client: bytes | None = None,
                     body: list | tuple = ()) -> None:
        send_frames(self._socket, p.broker_command(worker.identity, worker.dialect, command, client, body))
