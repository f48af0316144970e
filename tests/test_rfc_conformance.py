"""RFC 18 (MDP/0.2) and RFC 8 (MMI) frame by frame, with raw DEALER sockets against a real broker."""
from __future__ import annotations

import threading

import numpy as np
import pytest
import zmq

from broker import protocol as p
from broker.client import Client

from .harness import wait_for

pytestmark = pytest.mark.slow  # starts real processes

SERVICE = b"rfc-test"


@pytest.fixture
def ctx():
    context = zmq.Context()
    yield context
    context.destroy(linger=0)


def dealer(ctx: zmq.Context, url: str) -> zmq.Socket:
    sock = ctx.socket(zmq.DEALER)
    sock.linger = 0
    sock.rcvtimeo = 3000
    sock.connect(url)
    return sock


def recv_skipping_heartbeats(sock: zmq.Socket) -> list[bytes]:
    while True:
        frames = sock.recv_multipart()
        if frames != [b"MDPW02", b"\x05"]:
            return frames


def wait_registered(client: zmq.Socket, service: bytes) -> None:
    def registered() -> bool:
        client.send_multipart([b"MDPC02", b"\x01", b"mmi.service", service])
        return client.recv_multipart()[3] == b"200"
    wait_for(registered, 5, "the worker's READY")


def test_request_partial_final_frames_exactly_as_the_rfc(ctx, broker_url):
    worker, client = dealer(ctx, broker_url), dealer(ctx, broker_url)
    worker.send_multipart([b"MDPW02", b"\x01", SERVICE])                 # READY
    wait_registered(client, SERVICE)
    client.send_multipart([b"MDPC02", b"\x01", SERVICE, b"body-1", b"body-2"])  # REQUEST
    request = recv_skipping_heartbeats(worker)
    assert request[:2] == [b"MDPW02", b"\x02"] and request[3:] == [b"", b"body-1", b"body-2"]
    address = request[2]
    worker.send_multipart([b"MDPW02", b"\x03", address, b"", b"part"])   # PARTIAL
    worker.send_multipart([b"MDPW02", b"\x04", address, b"", b"done"])   # FINAL
    assert client.recv_multipart() == [b"MDPC02", b"\x02", SERVICE, b"part"]
    assert client.recv_multipart() == [b"MDPC02", b"\x03", SERVICE, b"done"]


def test_broker_heartbeats_registered_workers(ctx, broker_url):
    worker = dealer(ctx, broker_url)
    worker.send_multipart([b"MDPW02", b"\x01", SERVICE])
    assert worker.recv_multipart() == [b"MDPW02", b"\x05"]               # HEARTBEAT


def test_unknown_worker_and_duplicate_ready_get_disconnect(ctx, broker_url):
    stranger = dealer(ctx, broker_url)
    stranger.send_multipart([b"MDPW02", b"\x05"])
    assert stranger.recv_multipart() == [b"MDPW02", b"\x06"]            # DISCONNECT
    twice = dealer(ctx, broker_url)
    twice.send_multipart([b"MDPW02", b"\x01", SERVICE])
    twice.send_multipart([b"MDPW02", b"\x01", SERVICE])
    assert recv_skipping_heartbeats(twice) == [b"MDPW02", b"\x06"]


def test_worker_disconnect_unregisters_it(ctx, broker_url):
    worker, client = dealer(ctx, broker_url), dealer(ctx, broker_url)
    worker.send_multipart([b"MDPW02", b"\x01", SERVICE])
    wait_registered(client, SERVICE)  # MMI answers 200 once the READY arrived
    worker.send_multipart([b"MDPW02", b"\x06"])

    def unregistered() -> bool:  # DISCONNECT and our next request travel on different connections
        client.send_multipart([b"MDPC02", b"\x01", b"mmi.service", SERVICE])
        return client.recv_multipart()[3] == b"404"
    wait_for(unregistered, 5, "the broker to drop the worker")
    client.send_multipart([b"MDPC02", b"\x01", SERVICE, *p.request_body(1, "echo", {})])
    command, service, body = p.parse_client_reply(client.recv_multipart())
    assert (command, service) == (b"\x03", SERVICE)
    assert p.unpack(body[0])["error"]["type"] == "NoWorkerAvailable"


def test_mmi_service_answers_404_for_unknown_and_501_for_unknown_mmi(ctx, broker_url):
    client = dealer(ctx, broker_url)
    client.send_multipart([b"MDPC02", b"\x01", b"mmi.service", b"nobody"])
    assert client.recv_multipart() == [b"MDPC02", b"\x03", b"mmi.service", b"404"]
    client.send_multipart([b"MDPC02", b"\x01", b"mmi.nothing", b"x"])
    assert client.recv_multipart() == [b"MDPC02", b"\x03", b"mmi.nothing", b"501"]


def test_a_client_written_from_the_rfc_alone_gets_a_prediction(ctx, cluster):
    client = dealer(ctx, cluster.url)
    body = p.pack({"id": 42, "op": "predict", "model": "iris.onnx",
                   "inputs": {"float_input": np.array([[2, 5, 1, 4]], np.float32)}})
    client.send_multipart([b"MDPC02", b"\x01", b"modelhost", body])
    command, service, reply = p.parse_client_reply(client.recv_multipart())
    assert (command, service) == (b"\x03", b"modelhost")
    decoded = p.unpack(reply[0])
    assert decoded["id"] == 42 and decoded["status"] == 200 and decoded["node"]
    assert decoded["result"]["outputs"]["label"].tolist() == [1]


def test_a_worker_written_from_the_rfc_alone_serves_our_client(ctx, broker_url):
    worker = dealer(ctx, broker_url)
    worker.send_multipart([b"MDPW02", b"\x01", b"modelhost"])
    with Client(broker_url, timeout_s=5) as client:
        wait_for(client.service_ready, 5, "the worker's READY")
        result = {}
        thread = threading.Thread(target=lambda: result.update(client.echo("hi")))
        thread.start()
        request = recv_skipping_heartbeats(worker)
        body = p.unpack(request[4])
        worker.send_multipart([b"MDPW02", b"\x04", request[2], b"",
                               *p.ok_body(body["id"], "raw-worker", {"data": body["data"], "node": "raw"})])
        thread.join(5)
    assert result == {"data": "hi", "node": "raw"}


def test_a_malformed_reply_fails_one_async_call_not_the_client(ctx, broker_url):
    import asyncio

    from broker.client import AsyncClient
    from broker.errors import FractalError
    worker = dealer(ctx, broker_url)
    worker.send_multipart([b"MDPW02", b"\x01", b"modelhost"])

    def answer(body_for) -> None:
        request = recv_skipping_heartbeats(worker)
        body = p.unpack(request[4])
        worker.send_multipart([b"MDPW02", b"\x04", request[2], b"", *body_for(body)])

    async def scenario():
        async with AsyncClient(broker_url, timeout_s=5) as aclient:
            first = asyncio.ensure_future(aclient.echo("one"))
            await asyncio.get_running_loop().run_in_executor(
                None, answer, lambda b: [p.pack({"id": b["id"], "status": 500, "error": "boom"})])
            with pytest.raises(FractalError):
                await first
            second = asyncio.ensure_future(aclient.echo("two"))
            await asyncio.get_running_loop().run_in_executor(
                None, answer, lambda b: p.ok_body(b["id"], "raw", {"data": b["data"], "node": "raw"}))
            return await second

    with Client(broker_url, timeout_s=5) as client:
        wait_for(client.service_ready, 5, "the worker's READY")
    assert asyncio.run(scenario()) == {"data": "two", "node": "raw"}
