"""Dynamic batching on and off, 64 concurrent clients on the direct client, one run.

    python bench/batching.py [--duration-s 10]

Both setups use the same CPU: a broker and 2 worker processes with 1 ONNX Runtime thread each.
Off: one MDP connection per worker (fractal serve's default). On: 16 connections per worker,
batch_max_size 32, max_queue_delay_us 1000. Models from bench/models.py: the ResNet-style conv net
(1x3x224x224), an 8-layer MLP (one row per request) and iris. Everything on 127.0.0.1.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.models import write as write_models  # noqa: E402
from broker.client import AsyncClient, Client  # noqa: E402

CLIENTS = 64
SETUPS = {"off": [], "on": ["--connections", "16", "--batch-max-size", "32", "--batch-max-delay-us", "1000"]}
INPUTS = {
    "convnet.onnx": {"image": np.random.default_rng(0).random((1, 3, 224, 224), dtype=np.float32)},
    "mlp.onnx": {"x": np.random.default_rng(1).random((1, 256), dtype=np.float32)},
    "iris.onnx": {"float_input": np.array([[5.1, 3.5, 1.4, 0.2]], np.float32)},
}


def free_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{s.getsockname()[1]}"


async def load(url: str, model: str, seconds: float) -> dict:
    inputs, latencies = INPUTS[model], []
    async with AsyncClient(url, timeout_s=60) as client:
        for _ in range(8):
            await client.predict(model, inputs)
        deadline = time.monotonic() + seconds

        async def one_client() -> None:
            while time.monotonic() < deadline:
                started = time.perf_counter()
                await client.predict(model, inputs)
                latencies.append(time.perf_counter() - started)
        started = time.monotonic()
        await asyncio.gather(*(one_client() for _ in range(CLIENTS)))
        elapsed = time.monotonic() - started
    latencies.sort()
    return {"rps": len(latencies) / elapsed, "p50_ms": latencies[len(latencies) // 2] * 1e3,
            "p99_ms": latencies[int(len(latencies) * 0.99)] * 1e3}


def measure(setup: list[str], models_dir: Path, seconds: float) -> dict:
    url = free_url()
    quiet = ["--log-level", "WARNING", "--metrics-port", "0"]
    procs = [subprocess.Popen([sys.executable, "-m", "broker", "--bind", url, *quiet], cwd=REPO)]
    procs += [subprocess.Popen([sys.executable, "-m", "worker", "--connect", url, "--model-dir", str(models_dir),
                                "--threads", "1", "--no-log-requests", *quiet, *setup], cwd=REPO) for _ in range(2)]
    try:
        with Client(url, timeout_s=5) as client:
            deadline = time.monotonic() + 30
            while not client.service_ready() and time.monotonic() < deadline:
                time.sleep(0.1)
        time.sleep(0.5)
        return {model: asyncio.run(load(url, model, seconds)) for model in INPUTS}
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        for proc in procs:
            proc.wait(10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration-s", type=float, default=10)
    args = parser.parse_args()
    models_dir = Path(tempfile.mkdtemp(prefix="fractal-batching-"))
    write_models(models_dir)
    results = {name: measure(setup, models_dir, args.duration_s) for name, setup in SETUPS.items()}
    print(f"\nDynamic batching, {CLIENTS} concurrent clients, 2 workers x 1 thread, {os.cpu_count()} cores\n")
    off, on = "batching off: req/s · p50 · p99 ms", "batching on: req/s · p50 · p99 ms"
    print(f"{'model':14} {off:>38} {on:>38} {'on/off':>7}")
    for model in INPUTS:
        off, on = results["off"][model], results["on"][model]
        cells = [f"{r['rps']:8,.0f} · {r['p50_ms']:7.2f} · {r['p99_ms']:7.2f}" for r in (off, on)]
        print(f"{model:14} {cells[0]:>38} {cells[1]:>38} {on['rps'] / off['rps']:6.2f}x")
    conv_off, conv_on = results["off"]["convnet.onnx"], results["on"]["convnet.onnx"]
    queue_depth = -(-CLIENTS // (2 * 32))  # batches a request can wait behind: 64 clients / (2 workers x 32)
    bound = 2 * conv_off["p50_ms"] * queue_depth
    print(f"\ntargets: convnet on/off >= 2.5x -> {conv_on['rps'] / conv_off['rps']:.2f}x; "
          f"convnet p99 on {conv_on['p99_ms']:.1f} ms vs bound {bound:.1f} ms (2 x unbatched p50 x queue depth "
          f"{queue_depth})")


if __name__ == "__main__":
    main()
