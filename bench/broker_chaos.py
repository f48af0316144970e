"""Broker chaos under load: the broker SIGKILLed every few seconds while steady load goes through the frontend.

    python bench/broker_chaos.py [--duration-s 60] [--rate 50] [--kill-every-s 10] [--heartbeat-s 0.3]

Starts fractal serve (2 workers; its supervisor restarts the killed broker, the workers re-register
and the frontend re-sends the predictions the dead broker held), sends --rate requests/s to
POST /api/v1/models/iris.onnx/prediction for --duration-s with deploy/lab/load.py's schedule, and
kills the broker with SIGKILL every --kill-every-s. Prints requests, failures, p50/p99 and the
longest stall: the longest time in which no request was answered. Target: 0 failed requests.
A restarted broker learns of each worker at that worker's next heartbeat (--heartbeat-s, as in
bench/chaos.py; the default of the components is 2.5 s), which bounds the stall.
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

if __package__ in (None, ""):  # run as a script: python bench/broker_chaos.py
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.chaos import FAST_HEARTBEATS, start_load, start_serve  # noqa: E402
from tests.harness import child_pids  # noqa: E402


def longest_stall_s(rows: list[dict]) -> float:
    """The longest gap between two consecutive answers (or the start and the first answer)."""
    answered = sorted(r["t"] + r["ms"] / 1000 for r in rows)
    gaps = [b - a for a, b in zip([0.0, *answered], answered, strict=False)]
    return max(gaps, default=0.0)


def run_broker_chaos(workdir: Path, duration_s: float, rate: float, kill_every_s: float,
                     heartbeat_s: float = float(FAST_HEARTBEATS["FRACTAL_WORKER_HEARTBEAT_INTERVAL_S"])) -> dict:
    log = open(workdir / "serve.log", "wb")
    serve, port = start_serve(workdir, {name: str(heartbeat_s) for name in FAST_HEARTBEATS}, log)
    try:
        out = workdir / "load.jsonl"
        load = start_load(port, rate, duration_s, out)
        kills, started, brokers = 0, time.monotonic(), set()
        while load.poll() is None and time.monotonic() - started < duration_s - kill_every_s / 2:
            try:
                load.wait(timeout=kill_every_s)
                break
            except subprocess.TimeoutExpired:
                pass
            pids = child_pids(serve.pid, "broker")
            if pids:
                brokers.add(pids[0])
                os.kill(pids[0], signal.SIGKILL)
                kills += 1
        load.wait(timeout=duration_s + 60)
        rows = [json.loads(line) for line in out.read_text().splitlines()]
        alive = serve.poll() is None
    finally:
        serve.send_signal(signal.SIGINT)
        serve.wait(timeout=30)
        log.close()
    latencies = sorted(r["ms"] for r in rows)
    return {"heartbeat_s": heartbeat_s, "requests": len(rows), "failed": sum(r["status"] != 200 for r in rows),
            "kills": kills,
            "brokers_killed": len(brokers), "server_alive": alive,
            "p50_ms": latencies[len(latencies) // 2], "p99_ms": latencies[int(len(latencies) * 0.99)],
            "max_ms": latencies[-1], "longest_stall_s": round(longest_stall_s(rows), 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration-s", type=float, default=60)
    parser.add_argument("--rate", type=float, default=50)
    parser.add_argument("--kill-every-s", type=float, default=10)
    parser.add_argument("--heartbeat-s", type=float, default=0.3,
                        help="broker and worker heartbeat interval")
    args = parser.parse_args()
    result = run_broker_chaos(Path(tempfile.mkdtemp(prefix="fractal-broker-chaos-")), args.duration_s, args.rate,
                              args.kill_every_s, args.heartbeat_s)
    print(json.dumps(result, indent=2))
    print(f"target: 0 failed requests -> {result['failed']} failed of {result['requests']} with "
          f"{result['kills']} broker kills; longest stall {result['longest_stall_s']:.2f} s")


if __name__ == "__main__":
    main()
