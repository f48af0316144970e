"""The ZeroMQ path on iris, measured in one run and printed with ratios (issues 3 and 13).

    python bench/pipeline.py [--quick]

Issue 13's targets compare whole paths: our Client -> broker -> worker against majortomo's (a raw
majortomo-dialect client, majortomo's broker and majortomo's Worker doing the same ORT work):
sync p50 at most 0.8x majortomo's, and with 64 requests in flight and one worker at least 3x its
req/s (ours: the AsyncClient with 64 concurrent calls, which packs them). A third whole path is the
floor: the same raw client, a minimal hand-written broker and a minimal hand-written worker (a DEALER
loop: receive, unpack, one ORT run, pack, send; bench/peers.py), nothing but forwarding and the
work, i.e. what any Python client -> broker -> worker over ZeroMQ costs at least. The three stacks
run side by side and are measured in alternating rounds, the medians compared, so the load of a
shared machine hits them alike; our ratio to the floor and the floor's to majortomo are printed.

Also printed: bare InferenceSession.run; a bare ZeroMQ REQ/REP hop; our sync Client pipelining 64
(no packs) and the AsyncClient with 2 workers; and issue 3's broker comparison: one raw client and
majortomo's worker against majortomo's broker, ours, and a minimal hand-written broker (the floor).
Everything runs on 127.0.0.1 and stops by itself.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import signal
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
from broker.client import AsyncClient, Client  # noqa: E402
from broker.errors import FractalError  # noqa: E402
from tests.harness import free_port  # noqa: E402

IRIS = REPO / "worker" / "models" / "iris.onnx"
ROW = np.array([[5.1, 3.5, 1.4, 0.2]], np.float32)
IN_FLIGHT = 64
ROUNDS = 3  # alternating measurement rounds of the whole-path comparison


def free_url() -> str:
    return f"tcp://127.0.0.1:{free_port()}"


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


def start_ours(procs: Procs, model_dir: Path) -> str:
    url = free_url()
    procs.start("-m", "broker", "--bind", url, "--log-level", "WARNING")
    procs.start("-m", "worker", "--connect", url, "--model-dir", str(model_dir), "--log-level", "WARNING")
    wait_ready(url, 1)
    return url


def sync_p50(client: Client, n: int) -> tuple[float, float]:
    """p50 and p99 in µs of n one-at-a-time predicts."""
    inputs = {"float_input": ROW}
    samples = []
    for _ in range(n):
        t = time.perf_counter()
        client.predict("iris.onnx", inputs)
        samples.append(time.perf_counter() - t)
    return pct(samples, 0.5) * 1e6, pct(samples, 0.99) * 1e6


def async_rate(url: str, n: int) -> float:
    """req/s of n predicts through one AsyncClient, IN_FLIGHT concurrent calls at all times."""
    inputs = {"float_input": ROW}

    async def run() -> float:
        async with AsyncClient(url, timeout_s=60) as client:
            async def slot(count: int) -> None:
                for _ in range(count):
                    await client.predict("iris.onnx", inputs)
            await asyncio.gather(*(slot(20) for _ in range(IN_FLIGHT)))  # warm-up
            started = time.perf_counter()
            await asyncio.gather(*(slot(n // IN_FLIGHT) for _ in range(IN_FLIGHT)))
            return n // IN_FLIGHT * IN_FLIGHT / (time.perf_counter() - started)
    return asyncio.run(run())


def _rate(run, n: int) -> float:
    t = time.perf_counter()
    run()
    return n / (time.perf_counter() - t)


MAJORTOMO_WORKER = ["-m", "bench.peers", "majortomo-worker", "URL", str(IRIS)]
MINIMAL_WORKER = ["-m", "bench.peers", "minimal-worker", "URL", str(IRIS)]
MAJORTOMO_BROKER = ["-m", "bench.peers", "majortomo-broker", "URL"]
MINIMAL_BROKER = ["-m", "bench.peers", "minimal-broker", "URL"]


class MajortomoDialect:
    """A raw majortomo-dialect client (one DEALER) and a worker (majortomo's Worker unless told) through
    the given broker."""

    def __init__(self, broker_argv: list[str], procs: Procs, worker_argv: list[str] = MAJORTOMO_WORKER):
        url = free_url()
        procs.start(*[a.replace("URL", url) for a in broker_argv])
        time.sleep(0.5)
        procs.start(*[a.replace("URL", url) for a in worker_argv])
        self.sock = zmq.Context.instance().socket(zmq.DEALER)
        self.sock.linger = 0
        self.sock.connect(url)
        body, = p.request_body(1, "predict", {"model": "iris.onnx", "inputs": {"float_input": ROW}})
        self.request = [b"", p.CLIENT_HEADER, p.MAJORTOMO_CLIENT_REQUEST, b"modelhost", body]
        deadline = time.monotonic() + 30
        while True:  # until the worker registered: our broker answers an error, majortomo's just queues
            try:
                self.sock.send_multipart(self.request)
                if self.sock.poll(500) and p.unpack(self.sock.recv_multipart()[3])["status"] == 200:
                    break
            except Exception:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("majortomo worker never answered")
            time.sleep(0.2)
        while self.sock.poll(100):
            self.sock.recv_multipart()
        for _ in range(300):
            self.roundtrip()

    def roundtrip(self) -> None:
        self.sock.send_multipart(self.request)
        frames = self.sock.recv_multipart()
        if p.unpack(frames[3])["status"] != 200:
            raise RuntimeError("majortomo-dialect request failed")

    def sync_p50(self, n: int) -> tuple[float, float]:
        samples = []
        for _ in range(n):
            t = time.perf_counter()
            self.roundtrip()
            samples.append(time.perf_counter() - t)
        return pct(samples, 0.5) * 1e6, pct(samples, 0.99) * 1e6

    def rate(self, n: int) -> float:
        def flight() -> None:
            sent = received = 0
            while received < n:
                while sent < n and sent - received < IN_FLIGHT:
                    self.sock.send_multipart(self.request)
                    sent += 1
                self.sock.recv_multipart()
                received += 1
        return _rate(flight, n)

    def close(self) -> None:
        self.sock.close(linger=0)


def majortomo_dialect(broker_argv: list[str], sync_n: int, flight_n: int, procs: Procs) -> dict:
    stack = MajortomoDialect(broker_argv, procs)
    out = dict(zip(("p50_us", "p99_us"), stack.sync_p50(sync_n), strict=True))
    out["rps_1w"] = stack.rate(flight_n)
    stack.close()
    procs.stop()
    return out


def whole_paths(sync_n: int, flight_n: int, procs: Procs, model_dir: Path) -> tuple[dict, dict, dict]:
    """Ours, majortomo's and the floor's whole path, side by side, in ROUNDS alternating rounds; medians."""
    url = start_ours(procs, model_dir)
    theirs = MajortomoDialect(MAJORTOMO_BROKER, procs)
    floor = MajortomoDialect(MINIMAL_BROKER, procs, MINIMAL_WORKER)
    rows: dict[str, list] = {k: [] for k in ("our_p50", "our_p99", "our_rps", "our_pipelined_rps",
                                             "mt_p50", "mt_p99", "mt_rps", "floor_p50", "floor_p99", "floor_rps")}
    with Client(url, timeout_s=30) as client:
        sync_p50(client, 300)  # warm-up
        calls = [("predict", {"model": "iris.onnx", "inputs": {"float_input": ROW}})] * flight_n
        for _ in range(ROUNDS):
            for key, value in zip(("our_p50", "our_p99"), sync_p50(client, sync_n), strict=True):
                rows[key].append(value)
            for key, value in zip(("mt_p50", "mt_p99"), theirs.sync_p50(sync_n), strict=True):
                rows[key].append(value)
            for key, value in zip(("floor_p50", "floor_p99"), floor.sync_p50(sync_n), strict=True):
                rows[key].append(value)
            rows["our_rps"].append(async_rate(url, flight_n))
            rows["mt_rps"].append(theirs.rate(flight_n))
            rows["floor_rps"].append(floor.rate(flight_n))
            rows["our_pipelined_rps"].append(_rate(lambda: client.call_many(calls, window=IN_FLIGHT), flight_n))
    theirs.close()
    floor.close()
    ours = {k[4:]: statistics.median(v) for k, v in rows.items() if k.startswith("our_")}
    procs.start("-m", "worker", "--connect", url, "--model-dir", str(model_dir), "--log-level", "WARNING")
    wait_ready(url, 2)
    ours["rps_2w"] = async_rate(url, flight_n)
    procs.stop()
    return (ours, {k[3:]: statistics.median(v) for k, v in rows.items() if k.startswith("mt_")},
            {k[6:]: statistics.median(v) for k, v in rows.items() if k.startswith("floor_")})


def verdict(ratio: float, target: float, at_least: bool) -> str:
    ok = ratio >= target if at_least else ratio <= target
    return f"{ratio:.2f}x (target {'>=' if at_least else '<='} {target}x) {'PASS' if ok else 'FAIL'}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer samples (a smoke run)")
    args = parser.parse_args()
    sync_n, flight_n = (500, 4096) if args.quick else (2000, 20032)
    model_dir = Path(os.environ.get("TMPDIR", "/tmp")) / f"fractal-bench-{os.getpid()}"
    model_dir.mkdir(exist_ok=True)
    (model_dir / "iris.onnx").write_bytes(IRIS.read_bytes())
    procs = Procs()
    try:
        ort_row = bare_ort(20000)
        hop = bare_zmq(sync_n, procs)
        our, mt, floor = whole_paths(sync_n, flight_n, procs, model_dir)
        mt_ours = majortomo_dialect(["-m", "broker", "--bind", "URL", "--log-level", "WARNING"],
                                    sync_n, flight_n, procs)
        mt_floor = majortomo_dialect(MINIMAL_BROKER, sync_n, flight_n, procs)
    finally:
        procs.stop()
    print(f"\nFRACTAL pipeline benchmark, iris one row, {os.cpu_count()} cores, {IN_FLIGHT} in flight, "
          f"medians of {ROUNDS} alternating rounds for the whole paths\n")
    print(f"{'setup':62} {'p50 µs':>8} {'p99 µs':>8} {'req/s':>9}")
    print(f"{'bare InferenceSession.run':62} {ort_row['p50_us']:8.1f}")
    print(f"{'bare ZeroMQ REQ/REP hop (same body)':62} {hop['p50_us']:8.1f} {hop['p99_us']:8.1f}")
    print(f"{'ours: Client -> broker -> worker, 1 worker (AsyncClient, packed)':62} {our['p50']:8.1f} "
          f"{our['p99']:8.1f} {our['rps']:9.0f}")
    print(f"{'ours: sync Client pipelining 64 (no packs), 1 worker':62} {'':8} {'':8} "
          f"{our['pipelined_rps']:9.0f}")
    print(f"{'ours: AsyncClient, 2 workers':62} {'':8} {'':8} {our['rps_2w']:9.0f}")
    print(f"{'majortomo whole path: raw client, its broker, its worker':62} {mt['p50']:8.1f} {mt['p99']:8.1f} "
          f"{mt['rps']:9.0f}")
    print(f"{'minimal client + minimal broker + minimal worker (floor)':62} {floor['p50']:8.1f} "
          f"{floor['p99']:8.1f} {floor['rps']:9.0f}")
    print(f"{'majortomo dialect via our broker, 1 worker':62} {mt_ours['p50_us']:8.1f} "
          f"{mt_ours['p99_us']:8.1f} {mt_ours['rps_1w']:9.0f}")
    print(f"{'majortomo dialect via a minimal hand-written broker (floor)':62} {mt_floor['p50_us']:8.1f} "
          f"{mt_floor['p99_us']:8.1f} {mt_floor['rps_1w']:9.0f}")
    print("\nissue 13 targets, our whole path / majortomo's whole path:")
    print(f"  sync p50:                      {verdict(our['p50'] / mt['p50'], 0.8, at_least=False)}")
    print(f"  req/s, 64 in flight, 1 worker: {verdict(our['rps'] / mt['rps'], 3.0, at_least=True)}")
    print("the floor (minimal client, broker and worker; what any Python path over ZeroMQ costs at least):")
    print(f"  sync p50, ours / floor:        {our['p50'] / floor['p50']:.2f}x")
    print(f"  sync p50, floor / majortomo's: {floor['p50'] / mt['p50']:.2f}x (the least our ratio to majortomo's "
          f"can be)")
    print("issue 3, the brokers alone (raw client and majortomo's worker through each):")
    print(f"  our broker / majortomo's, req/s: {mt_ours['rps_1w'] / mt['rps']:.2f}x, "
          f"p50: {mt_ours['p50_us'] / mt['p50']:.2f}x; / minimal floor, req/s: "
          f"{mt_ours['rps_1w'] / mt_floor['rps_1w']:.2f}x")


if __name__ == "__main__":
    main()
