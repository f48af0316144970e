"""What Server-Timing and metrics cost per REST prediction: CPU per request of the frontend, broker and
worker processes with each of them on and off (issue 18, item 5).

    python bench/observe_cost.py [--requests N] [--rounds R]

One broker, one worker, and four frontends (gunicorn, one uvicorn worker each) over them: Server-Timing
and metrics both on (the default), each alone, both off. Each round sends N iris predictions through
each frontend in turn, one at a time on one keep-alive connection, and reads utime + stime of the
three processes from /proc: CPU per request is robust on a shared machine where latency is not.
Rounds interleave the four (in a rotating order), and the median round is shown; the broker's column,
the same work in every row, shows how much the machine's noise moves a figure. The frontend's and worker's timing map is
always in the reply (the worker writes it unasked), so "off" rows show what the switches save.
"""
from __future__ import annotations

import argparse
import http.client
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.pipeline import IRIS, Procs, free_url, wait_ready  # noqa: E402
from fractal.gunicorn_args import gunicorn_argv  # noqa: E402
from tests.harness import cpu_s, free_port, wait_for  # noqa: E402

CONFIGS = {"timing on, metrics on": ("true", "true"), "timing off, metrics on": ("false", "true"),
           "timing on, metrics off": ("true", "false"), "timing off, metrics off": ("false", "false")}
BODY = b'{"values": [2, 5, 1, 4]}'
PATH = "/api/v1/models/iris.onnx/prediction"


def start_frontend(broker: str, timing: str, metrics: str) -> tuple[subprocess.Popen, int, int]:
    return start_gunicorn(broker, {"FRACTAL_FRONTEND_SERVER_TIMING": timing, "FRACTAL_FRONTEND_METRICS": metrics})


def start_gunicorn(broker: str, env: dict[str, str]) -> tuple[subprocess.Popen, int, int]:
    """(gunicorn master, its one worker's pid, port): the frontend alone on `broker`, with `env` added."""
    port = free_port()
    proc = subprocess.Popen(gunicorn_argv(f"127.0.0.1:{port}", 1, "warning"), cwd=REPO,
                            env=dict(os.environ, PYTHONPATH=str(REPO), FRACTAL_FRONTEND_BROKER=broker, **env),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children")
    wait_for(lambda: bool(children.read_text().split()), 60, "the gunicorn worker")
    worker = int(children.read_text().split()[0])

    def answers() -> bool:
        try:
            return post(http.client.HTTPConnection("127.0.0.1", port, timeout=5)) == 200
        except OSError:
            return False
    wait_for(answers, 60, "the frontend")
    return proc, worker, port


def post(conn: http.client.HTTPConnection) -> int:
    conn.request("POST", PATH, BODY, {"Content-Type": "application/json"})
    response = conn.getresponse()
    response.read()
    return response.status


def one_round(port: int, pids: dict[str, int], n: int) -> dict[str, float]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    for _ in range(50):  # warm the connection and the path
        post(conn)
    before = {name: cpu_s(pid) for name, pid in pids.items()}
    for _ in range(n):
        post(conn)
    used = {name: (cpu_s(pid) - before[name]) / n * 1e6 for name, pid in pids.items()}
    conn.close()
    return used


def micro(n: int = 100_000) -> dict[str, float]:
    """µs per call of the Server-Timing code itself, in process: the worker's timing map, the
    frontend's timed() wait and the header."""
    import asyncio

    from frontend.timing import server_timing, timed
    from worker.inference import worker_time

    def worker_side() -> None:
        started = time.perf_counter()
        outcome = {"outputs": None, "timing": {"inference_ms": 0.05}}
        worker_time(outcome, started)

    async def frontend_side() -> None:
        async def call(timing: dict) -> None:
            timing.update(worker_ms=0.1, inference_ms=0.05)
        started = time.perf_counter()
        for _ in range(n):
            timing: dict = {}
            await timed(timing, "iris.onnx", call)
            server_timing((time.perf_counter() - started) * 1e3, timing)

    def per_call(fn) -> float:
        started = time.perf_counter()
        for _ in range(n):
            fn()
        return (time.perf_counter() - started) / n * 1e6
    baseline = per_call(lambda: None)
    worker_us = per_call(worker_side) - baseline
    started = time.perf_counter()
    asyncio.run(frontend_side())
    return {"worker": worker_us, "frontend": (time.perf_counter() - started) / n * 1e6}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000, help="predictions per frontend per round")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    costs = micro()
    print(f"Server-Timing code in process: worker {costs['worker']:.2f} µs, frontend {costs['frontend']:.2f} µs "
          f"per request")
    model_dir = Path(os.environ.get("TMPDIR", "/tmp")) / f"fractal-observe-cost-{os.getpid()}"
    model_dir.mkdir(exist_ok=True)
    (model_dir / "iris.onnx").write_bytes(IRIS.read_bytes())
    procs, url = Procs(), free_url()
    frontends: dict[str, tuple] = {}
    try:
        # NOTE: the broker's and worker's own metrics stay off in every row (their cost per call is
        # bench/metrics_cost.py's); the rows differ only in the frontend's switches.
        broker = procs.start("-m", "broker", "--bind", url, "--log-level", "WARNING", "--metrics-port", "0")
        worker = procs.start("-m", "worker", "--connect", url, "--model-dir", str(model_dir), "--log-level", "WARNING",
                             "--metrics-port", "0")
        wait_ready(url, 1)
        for label, (timing, metrics) in CONFIGS.items():
            frontends[label] = start_frontend(url, timing, metrics)
        rows: dict[str, list[dict]] = {label: [] for label in CONFIGS}
        started = time.monotonic()
        order = list(frontends)
        for i in range(args.rounds):
            for label in order[i % len(order):] + order[:i % len(order)]:  # NOTE: rotated: no row always last
                _proc, http_pid, port = frontends[label]
                pids = {"frontend": http_pid, "broker": broker.pid, "worker": worker.pid}
                rows[label].append(one_round(port, pids, args.requests))
    finally:
        for proc, _pid, _port in frontends.values():
            proc.terminate()
            proc.wait(timeout=20)
        procs.stop()
    print(f"\nCPU µs per REST prediction (iris, one row), median of {args.rounds} rounds of {args.requests}, "
          f"{time.monotonic() - started:.0f} s\n")
    print_table(rows, "timing off, metrics off")


def print_table(rows: dict[str, list[dict[str, float]]], baseline: str) -> float:
    """One line per configuration: the median CPU µs per part over its rounds, and the total against
    `baseline`'s; returns the baseline's total."""
    width = max(map(len, rows)) + 1
    print(f"{'configuration':{width}} {'frontend':>9} {'broker':>8} {'worker':>8} {'total':>8} {'vs off':>8}")
    medians = {label: {part: statistics.median(r[part] for r in runs) for part in runs[0]}
               for label, runs in rows.items()}
    off = sum(medians[baseline].values())
    for label, m in medians.items():
        total = sum(m.values())
        print(f"{label:{width}} {m['frontend']:9.1f} {m['broker']:8.1f} {m['worker']:8.1f} {total:8.1f} "
              f"{(total / off - 1) * 100:+7.1f}%")
    return off


if __name__ == "__main__":
    main()
