"""Chaos under load: workers SIGKILLed every few seconds while steady load goes through the frontend.

    python bench/chaos.py [--duration-s 60] [--rate 50] [--kill-every-s 3]

Starts fractal serve (2 workers; its supervisor restarts a killed worker), sends --rate requests/s
to POST /api/v1/models/iris.onnx/prediction for --duration-s, and kills a worker with SIGKILL every
--kill-every-s, alternating. Prints requests, failures and latency. Target: 0 failed requests.
Everything on 127.0.0.1; bounded in time.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from tests.harness import child_pids, free_port  # noqa: E402

FAST_HEARTBEATS = {"FRACTAL_BROKER_HEARTBEAT_INTERVAL_S": "0.3", "FRACTAL_WORKER_HEARTBEAT_INTERVAL_S": "0.3"}


def worker_pids(root: int) -> list[int]:
    """Live `python -m worker` processes under `root` (fractal serve)."""
    return child_pids(root, "worker")


def start_serve(workdir: Path, env: dict[str, str], log) -> tuple[subprocess.Popen, int]:
    """fractal serve on free ports (no metrics, no gRPC) logging to `log`; returns once it is ready."""
    port = free_port()
    serve = subprocess.Popen([sys.executable, "-m", "fractal", "serve", "--http-port", str(port), "--broker-port",
                              str(free_port()), "--model-dir", str(workdir / "models"), "--metrics-port", "0",
                              "--grpc-port", "0"],
                             cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ, **env))
    deadline = time.monotonic() + 60
    while b"ready:" not in (workdir / "serve.log").read_bytes():
        if serve.poll() is not None or time.monotonic() > deadline:
            serve.kill()
            raise RuntimeError("fractal serve did not come up")
        time.sleep(0.1)
    return serve, port


def start_load(port: int, rate: float, duration_s: float, out: Path) -> subprocess.Popen:
    """deploy/lab/load.py's steady schedule of seed predictions against the server on `port`."""
    return subprocess.Popen([sys.executable, str(REPO / "deploy" / "lab" / "load.py"),
                             f"http://127.0.0.1:{port}/api/v1/models/iris.onnx/prediction", "--rate", str(rate),
                             "--duration-s", str(duration_s), "--out", str(out)], cwd=REPO)


def run_chaos(workdir: Path, duration_s: float, rate: float, kill_every_s: float) -> dict:
    log = open(workdir / "serve.log", "wb")
    serve, port = start_serve(workdir, FAST_HEARTBEATS, log)
    try:
        out = workdir / "load.jsonl"
        load = start_load(port, rate, duration_s, out)
        kills, started = 0, time.monotonic()
        while load.poll() is None and time.monotonic() - started < duration_s - kill_every_s:
            time.sleep(kill_every_s)
            pids = worker_pids(serve.pid)
            if pids:
                os.kill(pids[kills % len(pids)], signal.SIGKILL)
                kills += 1
        load.wait(timeout=duration_s + 60)
        rows = [json.loads(line) for line in out.read_text().splitlines()]
    finally:
        serve.send_signal(signal.SIGINT)
        serve.wait(timeout=30)
        log.close()
    latencies = sorted(r["ms"] for r in rows)
    return {"requests": len(rows), "failed": sum(r["status"] != 200 for r in rows), "kills": kills,
            "p50_ms": latencies[len(latencies) // 2], "p99_ms": latencies[int(len(latencies) * 0.99)],
            "max_ms": latencies[-1]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration-s", type=float, default=60)
    parser.add_argument("--rate", type=float, default=50)
    parser.add_argument("--kill-every-s", type=float, default=3)
    args = parser.parse_args()
    result = run_chaos(Path(tempfile.mkdtemp(prefix="fractal-chaos-")), args.duration_s, args.rate, args.kill_every_s)
    print(json.dumps(result, indent=2))
    print(f"target: 0 failed requests -> {result['failed']} failed of {result['requests']} "
          f"with {result['kills']} workers killed")


if __name__ == "__main__":
    main()
