"""gRPC ModelInfer vs REST v2 binary infer on iris, 16 concurrent, against one `fractal serve`, in one run.

Both clients are asyncio loops in this process, so client cost is alike: gRPC with grpc.aio on one
channel (Triton's generated stubs, as tritonclient.grpc.aio uses them), REST with raw HTTP/1.1
keep-alive connections sending the binary tensor data extension. The server and the client share
the machine's cores; the ratio is what to compare across machines, and the server's CPU time per
request (its whole process tree) is the figure that other load on the machine disturbs least.

    python bench/grpc_infer.py [--duration-s 5] [--concurrency 16] [--rounds 1]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc
import numpy as np
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from tests.harness import free_port, tree_cpu_s  # noqa: E402

ROW = np.array([[2, 5, 1, 4]], np.float32)


def start(work: Path) -> tuple[subprocess.Popen, int, int]:
    http_port, grpc_port = free_port(), free_port()
    log = open(work / "serve.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "fractal", "serve", "--http-port", str(http_port),
                             "--grpc-port", str(grpc_port), "--broker-port", str(free_port()),
                             "--model-dir", str(work / "models"), "--metrics-port", "0", "--log-level", "WARNING"],
                            cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 90
    while b"ready:" not in (work / "serve.log").read_bytes():
        if proc.poll() is not None or time.monotonic() > deadline:
            sys.exit(f"fractal serve did not start:\n{(work / 'serve.log').read_text(errors='replace')}")
        time.sleep(0.2)
    return proc, http_port, grpc_port


def grpc_request() -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="iris.onnx")
    request.inputs.add(name="float_input", datatype="FP32", shape=[1, 4])
    request.raw_input_contents.append(ROW.tobytes())
    return request


def rest_request(port: int) -> bytes:
    head = json.dumps({"inputs": [{"name": "float_input", "shape": [1, 4], "datatype": "FP32",
                                   "parameters": {"binary_data_size": 16}}],
                       "parameters": {"binary_data_output": True}}).encode()
    body = head + ROW.tobytes()
    return (f"POST /v2/models/iris.onnx/infer HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            f"Content-Type: application/octet-stream\r\nInference-Header-Content-Length: {len(head)}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode() + body


async def run_grpc(port: int, concurrency: int, duration_s: float) -> list[float]:
    latencies: list[float] = []
    request = grpc_request()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        await stub.ModelInfer(request, timeout=30)
        end = time.perf_counter() + duration_s

        async def loop() -> None:
            while (started := time.perf_counter()) < end:
                await stub.ModelInfer(request, timeout=30)
                latencies.append(time.perf_counter() - started)
        await asyncio.gather(*(loop() for _ in range(concurrency)))
    return latencies


async def _http_call(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes) -> None:
    writer.write(request)
    head = await reader.readuntil(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 200"):
        raise RuntimeError(f"REST answered {head.splitlines()[0]!r}")
    length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                  if line.lower().startswith(b"content-length"))
    await reader.readexactly(length)


async def run_rest(port: int, concurrency: int, duration_s: float) -> list[float]:
    latencies: list[float] = []
    request = rest_request(port)
    end = time.perf_counter() + duration_s

    async def loop() -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            await _http_call(reader, writer, request)
            while (started := time.perf_counter()) < end:
                await _http_call(reader, writer, request)
                latencies.append(time.perf_counter() - started)
        finally:
            writer.close()
    await asyncio.gather(*(loop() for _ in range(concurrency)))
    return latencies


def measured(run, pid: int, port: int, concurrency: int, duration_s: float) -> dict:
    """Run one client loop; req/s, p50, p99 and the server tree's CPU microseconds per request."""
    cpu_before = tree_cpu_s(pid)
    latencies = asyncio.run(run(port, concurrency, duration_s))
    ms = np.array(latencies) * 1e3
    return {"rps": len(latencies) / duration_s, "p50": float(np.percentile(ms, 50)),
            "p99": float(np.percentile(ms, 99)), "cpu_us": (tree_cpu_s(pid) - cpu_before) / len(latencies) * 1e6}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration-s", type=float, default=5.0)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=1, help="REST then gRPC, this many times (drift averages out)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="fractal-grpc-bench-"))
    (work / "models").mkdir()
    for item in (REPO / "worker" / "models").iterdir():
        if item.name.endswith((".onnx", ".onnx.json")):
            shutil.copyfile(item, work / "models" / item.name)
    proc, http_port, grpc_port = start(work)
    results: dict[str, list[dict]] = {"REST v2 binary": [], "gRPC ModelInfer": []}
    try:
        asyncio.run(run_rest(http_port, args.concurrency, 1.0))  # warm-up: sessions and connections
        asyncio.run(run_grpc(grpc_port, args.concurrency, 1.0))
        for _ in range(args.rounds):
            results["REST v2 binary"].append(measured(run_rest, proc.pid, http_port, args.concurrency,
                                                      args.duration_s))
            results["gRPC ModelInfer"].append(measured(run_grpc, proc.pid, grpc_port, args.concurrency,
                                                       args.duration_s))
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=30)
        shutil.rmtree(work, ignore_errors=True)
    print(f"\niris infer, {args.concurrency} concurrent, {args.duration_s:g} s x {args.rounds}, fractal serve "
          f"(2 workers), {os.cpu_count()} cores shared with the client\n")
    print(f"{'':18} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'server CPU us/req':>18}")
    mean = {}
    for label, runs in results.items():
        mean[label] = m = {k: sum(r[k] for r in runs) / len(runs) for k in ("rps", "p50", "p99", "cpu_us")}
        print(f"{label:18} {m['rps']:>9,.0f} {m['p50']:>8.2f} {m['p99']:>8.2f} {m['cpu_us']:>18,.0f}")
    g, r = mean["gRPC ModelInfer"], mean["REST v2 binary"]
    print(f"\ngRPC / REST: {g['rps'] / r['rps']:.2f}x the requests per second, p50 {g['p50'] / r['p50']:.2f}x, "
          f"server CPU per request {g['cpu_us'] / r['cpu_us']:.2f}x")


if __name__ == "__main__":
    main()
