"""The third-party majortomo 0.2.0 package as client and as worker on our broker, mixed with ours."""
from __future__ import annotations

import threading

import numpy as np
import pytest
from majortomo import Client as MajortomoClient
from majortomo import Worker as MajortomoWorker
from majortomo.worker import WorkerRequestsIterator

from broker import protocol as p
from broker.client import Client

from .harness import nodes_answering, wait_for

pytestmark = pytest.mark.slow  # starts real processes


@pytest.fixture
def majortomo_worker(broker_url):
    """A majortomo worker answering our echo op in a thread, with its own node name."""
    worker = MajortomoWorker(broker_url, b"modelhost", heartbeat_interval=0.2, heartbeat_timeout=2.0)
    requests = WorkerRequestsIterator(worker)

    def serve():
        for frames in requests:
            body = p.unpack(frames[0])
            requests.send_reply_final(p.ok_body(body["id"], "majortomo", {"data": body.get("data"),
                                                                           "node": "majortomo"}))

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield worker
    requests.stop()
    thread.join(5)


def test_majortomo_client_gets_predictions_from_our_worker(cluster):
    body = p.pack({"id": 1, "op": "predict", "model": "iris.onnx",
                   "inputs": {"float_input": np.array([[2, 5, 1, 4]], np.float32)}})
    with MajortomoClient(cluster.url) as client:
        client.send(b"modelhost", body)
        reply = p.unpack(client.recv_all_as_list(timeout=5)[0])
    assert reply["status"] == 200
    assert reply["result"]["outputs"]["label"].tolist() == [1]


def test_our_client_is_served_by_a_majortomo_worker(broker_url, majortomo_worker):
    with Client(broker_url, timeout_s=5) as client:
        wait_for(client.service_ready, 5, "majortomo's READY")
        assert client.echo([1, "two"]) == {"data": [1, "two"], "node": "majortomo"}


def test_majortomo_and_our_workers_share_one_service(cluster, majortomo_worker):
    with Client(cluster.url, timeout_s=5) as client:
        wait_for(lambda: "majortomo" in nodes_answering(client, 6), 5, "majortomo to take work")
        nodes = nodes_answering(client, 9)
    assert "majortomo" in nodes and len(nodes) == 3  # two of ours, one of theirs
    with MajortomoClient(cluster.url) as theirs:
        for i in range(6):
            theirs.send(b"modelhost", *p.request_body(i, "echo", {"data": i}))
            assert p.unpack(theirs.recv_all_as_list(timeout=5)[0])["result"]["data"] == i
