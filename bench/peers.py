"""Processes the pipeline benchmark measures against: a bare REP echo, majortomo's broker and worker.

    python -m bench.peers rep URL
    python -m bench.peers majortomo-broker URL
    python -m bench.peers majortomo-worker URL MODEL_PATH
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
        body = p.unpack(frames[0])
        values = session.run(names, body["inputs"])
        requests.send_reply_final([p.ok_body(body["id"], "majortomo", {"outputs": dict(zip(names, values))})])


if __name__ == "__main__":
    role, *args = sys.argv[1:]
    {"rep": rep, "majortomo-broker": majortomo_broker, "majortomo-worker": majortomo_worker}[role](*args)
