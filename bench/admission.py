"""Admission and deadlines (issue 15): abandoned requests cost no compute, a flood on one model spares another.

    python bench/admission.py [--workers 2] [--flood-s 8] [--requests 200]

Starts a broker, --workers workers (one ONNX Runtime thread each) and a REST frontend (gunicorn) on
free 127.0.0.1 ports, with the calibrated slow model of tests/onnx_models.py set to take 200 ms per
call (needs the test extra: `pip install -e '.[test]'`). Then, over HTTP:

1. Deadlines: --requests concurrent predictions of the 200 ms model with `X-Request-Timeout: 0.05`.
   Prints how many the workers ran (their fractal_worker_inference_seconds count), how many the
   broker and the workers dropped (their metrics, reason "deadline"), and each caller's status and
   time to its answer against the 50 ms deadline.
2. Fairness: model B (iris) at a steady 20 req/s, alone and then while model A (the 200 ms model)
   is flooded at 10x A's capacity for --flood-s, each A call with a 2 s deadline. Prints B's p99
   against its unloaded p99 (target <= 2x) and A's outcomes (200 / 429 / 504), once with the
   broker's defaults (reserve_workers 1 for slow models, bound_by_deadline: docs/protocol.md,
   "Admission") and once with both off, as the defaults were before them.
Everything on 127.0.0.1; bounded in time.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

if __package__ in (None, ""):  # run as a script: python bench/admission.py
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.chaos import free_port  # noqa: E402
from broker.client import Client  # noqa: E402
from tests.onnx_models import slow_input, slow_model  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
BUNDLED = REPO / "worker" / "models"
MODEL_S = 0.2
B_RATE = 20.0
A_DEADLINE_S = 2.0
IRIS = json.dumps({"values": [2, 5, 1, 4]}).encode()


class Stack:
    """Broker, workers and one gunicorn frontend on free ports; stop() ends them all."""

    def __init__(self, workdir: Path, workers: int, broker_flags: list[str]):
        self.url = f"tcp://127.0.0.1:{free_port()}"
        self.broker_metrics = free_port()
        self.worker_metrics = [free_port() for _ in range(workers)]
        self.http_port = free_port()
        quiet = ["--log-level", "WARNING"]
        log = open(workdir / "stack.log", "ab")
        self.procs = [subprocess.Popen([sys.executable, "-m", "broker", "--bind", self.url, *quiet,
                                        "--metrics-port", str(self.broker_metrics), *broker_flags],
                                       cwd=REPO, stdout=log, stderr=subprocess.STDOUT)]
        self.procs += [subprocess.Popen([sys.executable, "-m", "worker", "--connect", self.url, "--model-dir",
                                         str(workdir / "models"), "--threads", "1", "--no-log-requests", *quiet,
                                         "--metrics-port", str(port)], cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
                       for port in self.worker_metrics]
        self.procs.append(subprocess.Popen(
            [sys.executable, "-m", "fractal", "frontend", "--bind", f"127.0.0.1:{self.http_port}", "--workers", "1"],
            cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
            env=dict(os.environ, FRACTAL_FRONTEND_BROKER=self.url, FRACTAL_FRONTEND_LOG_LEVEL="WARNING")))
        log.close()
        deadline = time.monotonic() + 60
        while not self._up():
            if time.monotonic() > deadline or any(p.poll() is not None for p in self.procs):
                self.stop()
                raise RuntimeError(f"the stack did not come up; see {workdir / 'stack.log'}")
            time.sleep(0.2)

    def _up(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}/", timeout=1):
                pass
            with Client(self.url, timeout_s=2) as client:
                status = client.broker_status(timeout_s=2) or {"workers": []}
            return len(status["workers"]) >= len(self.worker_metrics)
        except OSError:
            return False

    def metric(self, name: str, ports: list[int], **labels: str) -> float:
        total = 0.0
        for port in ports:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
                text = resp.read().decode()
            for line in text.splitlines():
                match = re.match(rf"^{re.escape(name)}(?:{{(.*)}})? (\S+)$", line)
                if match:
                    found = dict(re.findall(r'(\w+)="([^"]*)"', match.group(1) or ""))
                    if all(found.get(k) == v for k, v in labels.items()):
                        total += float(match.group(2))
        return total

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()


async def post(port: int, path: str, body: bytes, timeout_s: float | None = None) -> tuple[int, float]:
    """(HTTP status, seconds to the answer) of one POST on a connection of its own."""
    started = time.monotonic()
    extra = f"X-Request-Timeout: {timeout_s}\r\n" if timeout_s is not None else ""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write((f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                  f"Content-Length: {len(body)}\r\nConnection: close\r\n{extra}\r\n").encode() + body)
    await writer.drain()
    line = await reader.readline()
    await reader.read()
    writer.close()
    return int(line.split()[1]), time.monotonic() - started


async def open_loop(port: int, path: str, body: bytes, rate: float, seconds: float,
                    timeout_s: float | None = None) -> list[tuple[int, float]]:
    """Requests sent at `rate` per second for `seconds`, each whatever the others do (open loop)."""
    started, tasks = time.monotonic(), []
    for i in range(int(rate * seconds)):
        delay = started + i / rate - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(post(port, path, body, timeout_s)))
    return await asyncio.gather(*tasks)


def pct_ms(rows: list[tuple[int, float]], q: float) -> float:
    times = sorted(t for _s, t in rows)
    return times[min(len(times) - 1, int(len(times) * q))] * 1e3 if times else float("nan")


def p99_ms(rows: list[tuple[int, float]]) -> float:
    return pct_ms(rows, 0.99)


def calibrated_k(url: str) -> int:
    """slow_model's k for one MODEL_S call on this machine, measured through a worker."""
    with Client(url, timeout_s=60) as client:
        client.upload("slow.onnx", slow_model())
        k = int(slow_input(MODEL_S)["k"][0])
        for _ in range(2):
            started = time.monotonic()
            client.predict("slow.onnx", {"k": [k]})
            k = max(1, int(k * MODEL_S / (time.monotonic() - started)))
    return k


def deadlines(stack: Stack, k: int, requests: int, rate: float) -> None:
    body = json.dumps({"values": [k]}).encode()
    ports = stack.worker_metrics
    runs_before = stack.metric("fractal_worker_inference_seconds_count", ports, model="slow.onnx")
    rows = asyncio.run(open_loop(stack.http_port, "/api/v1/models/slow.onnx/prediction", body, rate,
                                 requests / rate, 0.05))
    time.sleep(2 * MODEL_S * len(ports) + 0.5)  # let what was dispatched finish before counting
    ran = stack.metric("fractal_worker_inference_seconds_count", ports, model="slow.onnx") - runs_before
    worker_drops = stack.metric("fractal_worker_requests_dropped_total", ports, reason="deadline")
    broker_drops = stack.metric("fractal_broker_requests_rejected_total", [stack.broker_metrics], reason="deadline")
    statuses = {s: sum(1 for r in rows if r[0] == s) for s in sorted({r[0] for r in rows})}
    worst = max(t for _s, t in rows) * 1e3
    print(f"1. {requests} requests at {rate:g}/s, X-Request-Timeout 0.05 s, a {MODEL_S * 1e3:.0f} ms model, "
          f"{len(ports)} workers")
    print(f"   statuses {statuses}; time to answer p50 {pct_ms(rows, 0.5):.0f} ms, p99 {p99_ms(rows):.0f} ms, "
          f"max {worst:.0f} ms (deadline 50 ms)")
    print(f"   the workers ran {ran:.0f} of them (none could meet its deadline: a run takes {MODEL_S * 1e3:.0f} ms);"
          f" dropped unrun: {broker_drops:.0f} by the broker, {worker_drops:.0f} by the workers")


def fairness(stack: Stack, k: int, seconds: float, a_rate: float) -> dict:
    a_body = json.dumps({"values": [k]}).encode()

    async def run() -> tuple[list, list, list]:
        alone = await open_loop(stack.http_port, "/api/v1/models/iris.onnx/prediction", IRIS, B_RATE, seconds / 2)
        b, a = await asyncio.gather(
            open_loop(stack.http_port, "/api/v1/models/iris.onnx/prediction", IRIS, B_RATE, seconds),
            open_loop(stack.http_port, "/api/v1/models/slow.onnx/prediction", a_body, a_rate, seconds, A_DEADLINE_S))
        return alone, b, a
    drops = [stack.metric("fractal_broker_requests_rejected_total", [stack.broker_metrics], reason="deadline"),
             stack.metric("fractal_worker_requests_dropped_total", stack.worker_metrics, reason="deadline")]
    alone, b, a = asyncio.run(run())
    time.sleep(A_DEADLINE_S)  # let what was dispatched end before counting
    drops[0] = stack.metric("fractal_broker_requests_rejected_total", [stack.broker_metrics],
                            reason="deadline") - drops[0]
    drops[1] = stack.metric("fractal_worker_requests_dropped_total", stack.worker_metrics, reason="deadline") - drops[1]
    return {"drops": drops, "b_alone_p99": p99_ms(alone), "b_p99": p99_ms(b), "b_failed": sum(s != 200 for s, _t in b),
            "b_alone_p50": pct_ms(alone, 0.5), "b_p50": pct_ms(b, 0.5),
            "a": {s: sum(1 for r in a if r[0] == s) for s in sorted({r[0] for r in a})}, "a_sent": len(a)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--flood-s", type=float, default=8.0)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--rate", type=float, default=100.0, help="part 1: requests per second (open loop)")
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="fractal-admission-"))
    (workdir / "models").mkdir()
    for item in BUNDLED.iterdir():
        if item.name.endswith((".onnx", ".onnx.json")):
            (workdir / "models" / item.name).write_bytes(item.read_bytes())
    print(f"\nAdmission and deadlines: {args.workers} workers x 1 thread, {os.cpu_count()} cores\n")
    stack = Stack(workdir, args.workers, [])
    try:
        k = calibrated_k(stack.url)
        deadlines(stack, k, args.requests, args.rate)
        default = fairness(stack, k, args.flood_s, 10 * args.workers / MODEL_S)
    finally:
        stack.stop()
    old_flags = ["--reserve-workers", "0", "--no-bound-by-deadline"]
    stack = Stack(workdir, args.workers, old_flags)
    try:
        calibrated_k(stack.url)
        old = fairness(stack, k, args.flood_s, 10 * args.workers / MODEL_S)
    finally:
        stack.stop()
    print(f"\n2. B (iris) at {B_RATE:g} req/s; A ({MODEL_S * 1e3:.0f} ms) flooded at 10x its capacity for "
          f"{args.flood_s:g} s, {A_DEADLINE_S:g} s deadline")
    print(f"   {'broker':44} {'B p50/p99 alone':>16} {'B p50/p99 flood':>16} {'p99 ratio':>9} {'B failed':>9}"
          f"  A: sent, by status; 504s dropped unrun by broker / workers")
    for name, row in [("defaults", default), (" ".join(old_flags), old)]:
        ratio = row["b_p99"] / row["b_alone_p99"]
        alone = f"{row['b_alone_p50']:.1f}/{row['b_alone_p99']:.1f}ms"
        flood = f"{row['b_p50']:.1f}/{row['b_p99']:.1f}ms"
        print(f"   {name:44} {alone:>16} {flood:>16} {ratio:8.2f}x {row['b_failed']:9d}  {row['a_sent']}, {row['a']}; "
              f"{row['drops'][0]:.0f} / {row['drops'][1]:.0f}")
    print("   target: B's p99 under the flood <= 2x its p99 alone; A's overflow answered 429, not 504")


if __name__ == "__main__":
    main()
