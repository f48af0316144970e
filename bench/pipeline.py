"""The ZeroMQ path on iris, measured in one run and printed with ratios (issue 3's targets).

    python bench/pipeline.py [--quick]

Rows: bare InferenceSession.run; a bare ZeroMQ REQ/REP hop; our client -> broker -> worker round trip
(sync p50/p99) and throughput with 64 requests in flight, with 1 and 2 workers; and one raw client and
majortomo's own worker against majortomo's broker, against ours, and against a minimal hand-written
broker (the floor: forwarding only), the brokers swapped and all else equal.
Everything runs on 127.0.0.1 and stops by itself.
"""
from __future__ import annotations

import argparse
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import zmq

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from broker import protocol as p  # noqa: E402
from broker.client import Client  # noqa: E402
from broker.errors import FractalError  # noqa: E402

IRIS = REPO / "worker" / "models" / "iris.onnx"
ROW = np.array([[5.1, 3.5, 1.4, 0.2]], np.float32)
IN_FLIGHT = 64


def free_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{s.getsockname()[1]}"


class Procs:
    def __init__(self) -> None:
        self.procs: list[subprocess.Popen] = []

    def start(self, *argv: str) -> subprocess.Popen:
        proc = subprocess.Popen([sys.executable, *argv], cwd=REPO, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, env=dict(os.environ, PYTHONPATH=str(REPO)))
        self.procs.append(proc)
        return proc

    def stop(self) -> None:
        for proc in self.procs:
            proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
        self.procs.clear()


def pct(samples: list[float], q: float) -> float:
    return sorted(samples)[min(len(samples) - 1, int(q * len(samples)))]


def bare_ort(n: int) -> dict:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(IRIS), options, providers=["CPUExecutionProvider"])
    feeds = {"float_input": ROW}
    samples = []
    for _ in range(n):
        t = time.perf_counter()
        session.run(None, feeds)
        samples.append(time.perf_counter() - t)
    return {"p50_us": statistics.median(samples) * 1e6}


def bare_zmq(n: int, procs: Procs) -> dict:
    url = free_url()
    procs.start("-m", "bench.peers", "rep", url.replace("127.0.0.1", "*"))
    sock = zmq.Context.instance().socket(zmq.REQ)
    sock.connect(url)
    payload, = p.request_body(1, "predict", {"model": "iris.onnx", "inputs": {"float_input": ROW}})
    samples = []
    for i in range(n + 200):
        t = time.perf_counter()
        sock.send(payload)
        sock.recv()
        if i >= 200:
            samples.append(time.perf_counter() - t)
    sock.close(linger=0)
    procs.stop()
    return {"p50_us": pct(samples, 0.5) * 1e6, "p99_us": pct(samples, 0.99) * 1e6}


def wait_ready(url: str, workers: int) -> None:
    with Client(url, timeout_s=5) as client:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                replies = client.call_many([("echo", {"data": i}) for i in range(2 * workers)], timeout_s=5,
                                           return_exceptions=True)
            except FractalError:  # the broker is not listening yet
                replies = []
            if len({r["node"] for r in replies if isinstance(r, dict)}) >= workers:
                return
            time.sleep(0.1)
    raise RuntimeError("workers did not register")


def ours(sync_n: int, flight_n: int, procs: Procs, model_dir: Path) -> dict:
    url = free_url()
    procs.start("-m", "broker", "--bind", url, "--log-level", "WARNING")
    procs.start("-m", "worker", "--connect", url, "--model-dir", str(model_dir), "--log-level", "WARNING")
    wait_ready(url, 1)
    out = {}
    with Client(url, timeout_s=30) as client:
        inputs = {"float_input": ROW}
        for _ in range(300):
            client.predict("iris.onnx", inputs)
        samples = []
        for _ in range(sync_n):
            t = time.perf_counter()
            client.predict("iris.onnx", inputs)
            samples.append(time.perf_counter() - t)
        out["p50_us"], out["p99_us"] = pct(samples, 0.5) * 1e6, pct(samples, 0.99) * 1e6
        calls = [("predict", {"model": "iris.onnx", "inputs": inputs})] * flight_n
        out["rps_1w"] = _rate(lambda: client.call_many(calls, window=IN_FLIGHT), flight_n)
        procs.start("-m", "worker", "--connect", url, "--model-dir", str(model_dir), "--log-level", "WARNING")
        wait_ready(url, 2)
        out["rps_2w"] = _rate(lambda: client.call_many(calls, window=IN_FLIGHT), flight_n)
    procs.stop()
    return out


def _rate(run, n: int) -> float:
    t = time.perf_counter()
    run()
    return n / (time.perf_counter() - t)


def majortomo_dialect(broker_argv: list[str], sync_n: int, flight_n: int, procs: Procs) -> dict:
    """A raw majortomo-dialect client and majortomo's Worker through the given broker."""
    url = free_url()
    procs.start(*[a.replace("URL", url) for a in broker_argv])
    time.sleep(0.5)
    procs.start("-m", "bench.peers", "majortomo-worker", url, str(IRIS))
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.linger = 0
    sock.connect(url)
    body, = p.request_body(1, "predict", {"model": "iris.onnx", "inputs": {"float_input": ROW}})
    request = [b"", p.CLIENT_HEADER, p.MAJORTOMO_CLIENT_REQUEST, b"modelhost", body]

    def roundtrip() -> None:
        sock.send_multipart(request)
        frames = sock.recv_multipart()
        if p.unpack(frames[3])["status"] != 200:
            raise RuntimeError("majortomo-dialect request failed")

    deadline = time.monotonic() + 30
    while True:  # until the worker registered: our broker answers an error, majortomo's just queues
        try:
            sock.send_multipart(request)
            if sock.poll(500) and p.unpack(sock.recv_multipart()[3])["status"] == 200:
                break
        except Exception:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError("majortomo worker never answered")
        time.sleep(0.2)
    while sock.poll(100):
        sock.recv_multipart()
    for _ in range(300):
        roundtrip()
    samples = []
    for _ in range(sync_n):
        t = time.perf_counter()
        roundtrip()
        samples.append(time.perf_counter() - t)
    out = {"p50_us": pct(samples, 0.5) * 1e6, "p99_us": pct(samples, 0.99) * 1e6}

    def flight() -> None:
        sent = received = 0
        while received < flight_n:
            while sent < flight_n and sent - received < IN_FLIGHT:
                sock.send_multipart(request)
                sent += 1
            sock.recv_multipart()
            received += 1

    out["rps_1w"] = _rate(flight, flight_n)
    sock.close(linger=0)
    procs.stop()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer samples (a smoke run)")
    args = parser.parse_args()
    sync_n, flight_n = (500, 2000) if args.quick else (3000, 20000)
    model_dir = Path(os.environ.get("TMPDIR", "/tmp")) / f"fractal-bench-{os.getpid()}"
    model_dir.mkdir(exist_ok=True)
    (model_dir / "iris.onnx").write_bytes(IRIS.read_bytes())
    procs = Procs()
    try:
        ort_row = bare_ort(20000)
        hop = bare_zmq(sync_n, procs)
        our = ours(sync_n, flight_n, procs, model_dir)
        mt_mt = majortomo_dialect(["-m", "bench.peers", "majortomo-broker", "URL"], sync_n, flight_n, procs)
        mt_ours = majortomo_dialect(["-m", "broker", "--bind", "URL", "--log-level", "WARNING"],
                                    sync_n, flight_n, procs)
        mt_floor = majortomo_dialect(["-m", "bench.peers", "minimal-broker", "URL"], sync_n, flight_n, procs)
    finally:
        procs.stop()
    print(f"\nFRACTAL pipeline benchmark, iris one row, {os.cpu_count()} cores, {IN_FLIGHT} in flight\n")
    print(f"{'setup':58} {'p50 µs':>8} {'p99 µs':>8} {'req/s':>9}")
    print(f"{'bare InferenceSession.run':58} {ort_row['p50_us']:8.1f}")
    print(f"{'bare ZeroMQ REQ/REP hop (same body)':58} {hop['p50_us']:8.1f} {hop['p99_us']:8.1f}")
    print(f"{'ours: Client -> broker -> worker, 1 worker':58} {our['p50_us']:8.1f} {our['p99_us']:8.1f} "
          f"{our['rps_1w']:9.0f}")
    print(f"{'ours: same, 2 workers':58} {'':8} {'':8} {our['rps_2w']:9.0f}")
    print(f"{'majortomo dialect via majortomo broker, 1 worker':58} {mt_mt['p50_us']:8.1f} "
          f"{mt_mt['p99_us']:8.1f} {mt_mt['rps_1w']:9.0f}")
    print(f"{'majortomo dialect via our broker, 1 worker':58} {mt_ours['p50_us']:8.1f} "
          f"{mt_ours['p99_us']:8.1f} {mt_ours['rps_1w']:9.0f}")
    print(f"{'majortomo dialect via a minimal hand-written broker (floor)':58} {mt_floor['p50_us']:8.1f} "
          f"{mt_floor['p99_us']:8.1f} {mt_floor['rps_1w']:9.0f}")
    print("\nratios (targets: throughput >= 1.6x, p50 <= 0.6x majortomo's broker, same client and worker)")
    print(f"  our broker / majortomo broker, throughput: {mt_ours['rps_1w'] / mt_mt['rps_1w']:.2f}x")
    print(f"  our broker / majortomo broker, p50:        {mt_ours['p50_us'] / mt_mt['p50_us']:.2f}x")
    print(f"  our broker / minimal broker floor, throughput: {mt_ours['rps_1w'] / mt_floor['rps_1w']:.2f}x "
          f"(majortomo's: {mt_mt['rps_1w'] / mt_floor['rps_1w']:.2f}x)")
    print(f"  our full pipeline / majortomo's (p50):     {our['p50_us'] / mt_mt['p50_us']:.2f}x")
    print(f"  our full pipeline / majortomo's (req/s):   {our['rps_1w'] / mt_mt['rps_1w']:.2f}x")


if __name__ == "__main__":
    main()
