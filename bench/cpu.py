"""CPU time per request of each process on the ZeroMQ path: client, broker and worker, from /proc.

    python bench/cpu.py [--requests N]

CPU per request (utime + stime over a fixed number of requests) is robust on a shared machine where
throughput and latency are not. Rows: the sync Client one request at a time, and the AsyncClient with
64 calls in flight (packed since issue 13). One broker and one worker, iris one row.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.pipeline import IRIS, ROW, Procs, free_url, wait_ready  # noqa: E402
from broker.client import AsyncClient, Client  # noqa: E402
from tests.harness import cpu_s  # noqa: E402

IN_FLIGHT = 64


def measure(pids: dict[str, int], run, n: int) -> dict[str, float]:
    """µs of CPU per request for each named process while `run()` sends n requests."""
    before = {name: cpu_s(pid) for name, pid in pids.items()}
    run()
    return {name: (cpu_s(pid) - before[name]) / n * 1e6 for name, pid in pids.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=20000)
    args = parser.parse_args()
    n = args.requests
    model_dir = Path(os.environ.get("TMPDIR", "/tmp")) / f"fractal-cpu-{os.getpid()}"
    model_dir.mkdir(exist_ok=True)
    (model_dir / "iris.onnx").write_bytes(IRIS.read_bytes())
    procs = Procs()
    url = free_url()
    try:
        broker = procs.start("-m", "broker", "--bind", url, "--log-level", "WARNING")
        worker = procs.start("-m", "worker", "--connect", url, "--model-dir", str(model_dir),
                             "--log-level", "WARNING")
        wait_ready(url, 1)
        pids = {"client": os.getpid(), "broker": broker.pid, "worker": worker.pid}
        inputs = {"float_input": ROW}
        with Client(url, timeout_s=30) as client:
            for _ in range(500):
                client.predict("iris.onnx", inputs)
            sync = measure(pids, lambda: [client.predict("iris.onnx", inputs) for _ in range(n)], n)

        async def flight() -> None:
            async with AsyncClient(url, timeout_s=60) as client:
                async def one_slot(count: int) -> None:
                    for _ in range(count):
                        await client.predict("iris.onnx", inputs)
                await asyncio.gather(*(one_slot(10) for _ in range(IN_FLIGHT)))  # warm-up
                before = {name: cpu_s(pid) for name, pid in pids.items()}
                await asyncio.gather(*(one_slot(n // IN_FLIGHT) for _ in range(IN_FLIGHT)))
                done = n // IN_FLIGHT * IN_FLIGHT
                packed.update({name: (cpu_s(pid) - before[name]) / done * 1e6 for name, pid in pids.items()})

        packed: dict[str, float] = {}
        asyncio.run(flight())
    finally:
        procs.stop()
    print(f"\nCPU µs per request, iris one row, {n} requests, 1 broker + 1 worker\n")
    print(f"{'path':40} {'client':>8} {'broker':>8} {'worker':>8} {'total':>8}")
    for label, row in (("sync Client, one at a time", sync), (f"AsyncClient, {IN_FLIGHT} in flight", packed)):
        print(f"{label:40} {row['client']:8.1f} {row['broker']:8.1f} {row['worker']:8.1f} "
              f"{sum(row.values()):8.1f}")


if __name__ == "__main__":
    main()
