"""Processes the pipeline benchmark measures against: a bare REP echo, majortomo's broker and worker,
and the floor's minimal hand-written broker and worker.

    python -m bench.peers rep URL
    python -m bench.peers majortomo-broker URL
    python -m bench.peers majortomo-worker URL MODEL_PATH
    python -m bench.peers minimal-broker URL
    python -m bench.peers minimal-worker URL MODEL_PATH
"""
from __future__ import annotations

import signal
import sys

import zmq


def rep(url: str) -> None:
    sock = zmq.Context.instance().socket(zmq.REP)
    sock.bind(url)
    while True:
        sock.send(sock.recv())


def majortomo_broker(url: str) -> None:
    from majortomo.broker import Broker
    broker = Broker(bind=url)
    signal.signal(signal.SIGTERM, lambda *_: broker.stop())
    broker.run()


def minimal_broker(url: str) -> None:
    """The floor: a hand-written LRU broker in the majortomo dialect, nothing but forwarding.

    No heartbeats, no queue bound, no expiry, no validation: what any MDP broker must at least do.
    """
    from collections import deque
    sock = zmq.Context.instance().socket(zmq.ROUTER)
    sock.bind(url)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    idle: deque = deque()
    waiting: deque = deque()
    while True:
        frames = sock.recv_multipart()
        sender, header, command = frames[0], frames[2], frames[3]
        if header == b"MDPC02":
            waiting.append((sender, frames[5:]))
        elif command == b"\x04":  # FINAL: client, "", body
            sock.send_multipart([frames[4], b"", b"MDPC02", b"\x04", *frames[6:]])
            idle.append(sender)
        elif command == b"\x01":  # READY
            idle.append(sender)
        while idle and waiting:
            client, body = waiting.popleft()
            sock.send_multipart([idle.popleft(), b"", b"MDPW02", b"\x02", client, b"", *body])


def majortomo_worker(url: str, model_path: str) -> None:
    """majortomo's own Worker doing our worker's work: msgpack predict bodies on one ORT session."""
    import onnxruntime as ort
    from majortomo import Worker
    from majortomo.worker import WorkerRequestsIterator

    from broker import protocol as p
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(model_path, options, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    requests = WorkerRequestsIterator(Worker(url, b"modelhost"))
    for frames in requests:
        body = p.unpack_body(frames)
        values = session.run(names, body["inputs"])
        outputs = dict(zip(names, values, strict=True))
        requests.send_reply_final(p.ok_body(body["id"], "majortomo", {"outputs": outputs}))


def minimal_worker(url: str, model_path: str) -> None:
    """The floor's worker: one DEALER loop in the majortomo dialect doing our worker's work (unpack the
    msgpack predict body, one ORT run, pack the reply, send), with nothing else: no heartbeats, no
    validation, no metrics, no deadlines. Paired with minimal-broker and a raw DEALER client it is what
    any Python client -> broker -> worker path over ZeroMQ costs at least."""
    import onnxruntime as ort

    from broker import protocol as p
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(model_path, options, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.linger = 0
    sock.connect(url)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    sock.send_multipart([b"", b"MDPW02", b"\x01", b"modelhost"])  # READY
    while True:
        frames = sock.recv_multipart()  # "", MDPW02, REQUEST, client, "", body...
        if frames[2] != b"\x02":  # a HEARTBEAT (our broker sends them; the minimal broker does not)
            continue
        body = p.unpack_body(frames[5:])
        values = session.run(names, body["inputs"])
        reply = p.ok_body(body["id"], "minimal", {"outputs": dict(zip(names, values, strict=True))})
        sock.send_multipart([b"", b"MDPW02", b"\x04", frames[3], b"", *reply])  # FINAL


if __name__ == "__main__":
    role, *args = sys.argv[1:]
    {"rep": rep, "majortomo-broker": majortomo_broker, "majortomo-worker": majortomo_worker,
     "minimal-broker": minimal_broker, "minimal-worker": minimal_worker}[role](*args)
