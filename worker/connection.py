"""One MDP/0.2 worker connection to a broker: its DEALER socket, READY, heartbeat timers, reconnect.

A worker process holds one or more of these per broker; each is a worker to its broker, so with N
connections a broker's LRU may hand the process up to N requests at once (which is what lets it batch).
With several brokers (docs/protocol.md, "Two brokers") each broker gets its own connections, and a
request from one waits while the process answers another's: the loop takes them in turn.
"""
from __future__ import annotations

import logging
import threading
import time

import zmq

from broker import protocol as p
from broker.curve import PeerKeys
from broker.protocol import MDPW
from broker.sockets import NOBLOCK, send_frames

log = logging.getLogger(__name__)


class Connection:
    def __init__(self, context: zmq.Context, endpoint: str, service: bytes, interval_s: float,
                 silence_s: float, reconnect_max_s: float, stopping: threading.Event, index: int,
                 curve: PeerKeys | None = None):
        self._curve = curve
        self._context = context
        self._endpoint = endpoint
        self._service = service
        self.interval_s = interval_s
        self._silence_s = silence_s
        self._reconnect_max_s = reconnect_max_s
        self._stopping = stopping
        self.index = index
        # NOTE: typed as always there, since every send follows connect(); None marks it closed.
        self.socket: zmq.Socket = None  # type: ignore[assignment]
        self.last_sent = 0.0
        self.broker_expires = 0.0
        self.backoff_s = 0.0
        self.held = 0        # requests received and not yet answered
        self.used = False    # a batchable predict came on this socket: clients send to its broker
        self.generation = 0  # bumped per socket: a reply for an older one is stale (the broker re-sent it)

    def connect(self) -> None:
        sock = self._context.socket(zmq.DEALER)
        sock.linger = 0
        if self._curve is not None:
            self._curve.apply(sock)
        sock.connect(self._endpoint)
        self.socket = sock
        self.held = 0
        self.used = False
        self.generation += 1
        self._send(p.worker_command(MDPW.READY, self._service))
        self.broker_expires = time.monotonic() + self._silence_s
        log.info("connection %d to %s sent READY", self.index, self._endpoint)

    def reconnect(self) -> None:
        # NOTE: a READY queued on this socket may still reach the broker if the link comes back just
        # now; a DISCONNECT behind it makes the broker forget that identity at once instead of
        # dispatching to it until it misses its heartbeats.
        try:
            send_frames(self.socket, p.worker_command(MDPW.DISCONNECT), NOBLOCK)
        except zmq.ZMQError:
            pass
        self.socket.close(linger=int(self.interval_s * 1000))
        self.socket = None  # type: ignore[assignment]  # closed until connect() below
        backoff_s = self.backoff_s
        self.backoff_s = min(max(self.backoff_s * 2, 0.1), self._reconnect_max_s)
        self.connect()
        # NOTE: the back-off delays the next attempt instead of sleeping before this one: the loop
        # also serves the connections to the other brokers, which a sleep here would stall.
        self.broker_expires += backoff_s

    def close(self) -> None:
        if self.socket is not None:
            self._send(p.worker_command(MDPW.DISCONNECT))
            self.socket.close(linger=200)  # NOTE: long enough for DISCONNECT to leave
            self.socket = None  # type: ignore[assignment]  # closed for good

    def heartbeat(self) -> None:
        self._send(p.worker_command(MDPW.HEARTBEAT))

    def final(self, client: bytes, body: list) -> float:
        """Send the FINAL reply to `client`'s request (inline: every reply comes here); returns when."""
        send_frames(self.socket, p.worker_command(MDPW.FINAL, client, body))
        self.last_sent = now = time.monotonic()
        return now

    def _send(self, frames: list) -> None:
        send_frames(self.socket, frames)
        self.last_sent = time.monotonic()

    def heard(self, now: float | None = None) -> None:
        """The broker was heard from (at monotonic `now`; None: now)."""
        self.broker_expires = (time.monotonic() if now is None else now) + self._silence_s
        self.backoff_s = 0.0

    def next_due(self) -> float:
        return min(self.last_sent + self.interval_s, self.broker_expires)
