"""The frontend's uvicorn protocol: a connection's writes in one loop turn leave together, in order, and
HTTP keeps working as clients use it (pipelining, HEAD, Connection: close) under gunicorn."""
from __future__ import annotations

import asyncio
import json
import socket
import sys
import urllib.request

import pytest

from frontend.http_worker import _TurnWrites

from .harness import free_port, start_frontend, wait_for

PREDICT = b'{"values": [2, 5, 1, 4]}'


class _Recorder:
    """The transport side of the seam: what reached the socket, call by call."""

    def __init__(self) -> None:
        self.calls: list[list[bytes]] = []
        self.closed = False

    def writelines(self, lines: list[bytes]) -> None:
        self.calls.append(list(lines))

    def close(self) -> None:
        self.closed = True

    def get_extra_info(self, name: str) -> str:
        return f"info:{name}"


def test_writes_of_one_turn_leave_as_one_call_in_order_and_close_sends_what_is_held():
    async def scenario() -> _Recorder:
        real = _Recorder()
        writes = _TurnWrites(real, asyncio.get_running_loop())  # type: ignore[arg-type]
        writes.write(b"head")
        writes.write(b"body")
        assert real.calls == []  # nothing leaves before the turn ends
        await asyncio.sleep(0)
        assert real.calls == [[b"head", b"body"]]
        writes.writelines([b"a", b"b"])
        writes.close()  # a close in the same turn sends what is held first
        assert real.calls[1:] == [[b"a", b"b"]] and real.closed
        await asyncio.sleep(0)
        assert len(real.calls) == 2  # the turn's scheduled flush finds nothing left
        assert writes.get_extra_info("peername") == "info:peername"
        return real
    asyncio.run(scenario())


def _responses(sock: socket.socket, count: int) -> list[tuple[int, bytes]]:
    """`count` HTTP/1.1 responses read off `sock`, each (status, body), by Content-Length."""
    data, out = b"", []
    sock.settimeout(30)
    while len(out) < count:
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            assert chunk, f"connection closed after {len(out)} responses"
            data += chunk
        head, data = data.split(b"\r\n\r\n", 1)
        lines = head.split(b"\r\n")
        length = next(int(line.split(b":", 1)[1]) for line in lines if line.lower().startswith(b"content-length:"))
        status = int(lines[0].split()[1])
        while len(data) < length:
            chunk = sock.recv(65536)
            assert chunk
            data += chunk
        out.append((status, data[:length]))
        data = data[length:]
    return out


@pytest.mark.slow  # starts a broker, workers and gunicorn
def test_pipelined_head_and_close_requests_are_answered_in_order(procs, cluster):
    base = start_frontend(procs, cluster.url)
    port = int(base.rsplit(":", 1)[1])
    predict = (b"POST /api/v1/models/iris.onnx/prediction HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
               b"\r\nContent-Length: %d\r\n\r\n%s" % (len(PREDICT), PREDICT))
    models = b"GET /api/v1/models HTTP/1.1\r\nHost: x\r\n\r\n"
    bad = b"GET /api/v1/models/nope.onnx HTTP/1.1\r\nHost: x\r\n\r\n"
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(predict + models + bad + predict)  # four requests in one segment: pipelined
        answers = _responses(sock, 4)
    assert [status for status, _ in answers] == [200, 200, 404, 200]
    assert json.loads(answers[0][1])["values"] == [1] == json.loads(answers[3][1])["values"]
    assert "iris.onnx" in json.loads(answers[1][1])["model_list"]
    assert json.loads(answers[2][1])["http_status"]["code"] == 404

    with socket.create_connection(("127.0.0.1", port)) as sock:
        # HEAD: uvicorn writes the head and no body, so the held head leaves at the end of its turn; the
        # next answer on the connection parses cleanly, so no body bytes came with it.
        sock.sendall(b"HEAD /api/v1/models HTTP/1.1\r\nHost: x\r\n\r\n")
        sock.settimeout(30)
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = sock.recv(65536)
            assert chunk
            head += chunk
        head, rest = head.split(b"\r\n\r\n", 1)
        assert head.startswith(b"HTTP/1.1 405") and b"allow: get" in head.lower() and rest == b""
        sock.sendall(models)
        [(status, body)] = _responses(sock, 1)
        assert status == 200 and "iris.onnx" in json.loads(body)["model_list"]

    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(models.replace(b"Host: x\r\n", b"Host: x\r\nConnection: close\r\n"))
        sock.settimeout(30)
        data = b""
        while chunk := sock.recv(65536):  # the server closes after the answer: all of it arrives first
            data += chunk
    head, body = data.split(b"\r\n\r\n", 1)
    assert head.startswith(b"HTTP/1.1 200") and "iris.onnx" in json.loads(body)["model_list"]


def _predict(base: str, headers: dict[str, str]) -> dict:
    request = urllib.request.Request(base + "/api/v1/models/iris.onnx/prediction", data=PREDICT, method="POST",
                                     headers={"Content-Type": "application/json", **headers})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


@pytest.mark.slow  # starts a broker, workers and gunicorn
def test_gunicorns_access_log_names_the_forwarded_client_and_answers_stay_the_same_without_it(
        procs, cluster, tmp_path):
    # NOTE: uvicorn's proxy headers run only for gunicorn's access log (its one reader); with and without
    # it a forwarded request gets the same answer.
    forwarded = {"X-Forwarded-For": "203.0.113.7", "X-Forwarded-Proto": "https"}
    bare = start_frontend(procs, cluster.url)
    assert _predict(bare, forwarded)["values"] == [1]

    access = tmp_path / "access.log"
    port = free_port()
    procs.start("frontend-access", [sys.executable, "-m", "fractal", "frontend", "--bind", f"127.0.0.1:{port}",
                                    "--workers", "1", "--access-logfile", str(access)],
                env={"FRACTAL_FRONTEND_BROKER": cluster.url})
    logged = f"http://127.0.0.1:{port}"
    wait_for(lambda: access.exists() and _answers(logged), 60, "gunicorn with an access log")
    assert _predict(logged, forwarded)["values"] == [1]
    assert _predict(logged, {})["values"] == [1]
    wait_for(lambda: access.read_text().count("/api/v1/models/iris.onnx/prediction") >= 2, 10, "access lines")
    lines = [line for line in access.read_text().splitlines() if "/prediction" in line]
    assert lines[0].startswith("203.0.113.7:") and " 200" in lines[0], lines
    assert lines[1].startswith("127.0.0.1:") and " 200" in lines[1], lines


def _answers(base: str) -> bool:
    try:
        with urllib.request.urlopen(base + "/", timeout=1):
            return True
    except OSError:
        return False
