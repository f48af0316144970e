"""Steady HTTP load for the lab, run inside a host namespace: bounded in rate, count and time.

    python deploy/lab/load.py URL --rate 50 --duration-s 20 --out results.jsonl

Each line of the output is one request: {"t": seconds since start, "status": code or 0, "ms": latency,
"at": time.monotonic() when it was sent, the machine-wide clock the lab's own timings use}.
"""
from __future__ import annotations

import argparse
import http.client
import json
import threading
import time
import urllib.parse

BODY = b'{"values": [2, 5, 1, 4]}'


def schedule(rate: float, duration_s: float, threads: int = 4) -> list[list[float]]:
    """Each thread's send times (seconds from the start). Every one is sent, late if need be, so the
    number of requests never depends on how fast the server or the machine is."""
    interval = threads / rate
    return [[i / rate + n * interval for n in range(int((duration_s - i / rate) / interval) + 1)]
            for i in range(threads)]


def run(url: str, rate: float, duration_s: float, threads: int, out_path: str) -> None:
    parsed = urllib.parse.urlsplit(url)
    started = time.monotonic()
    lock, results = threading.Lock(), []

    def client(times: list[float]) -> None:
        conn = http.client.HTTPConnection(parsed.hostname, parsed.port, timeout=10)
        for offset in times:
            time.sleep(max(0.0, started + offset - time.monotonic()))
            t0 = time.monotonic()
            try:
                conn.request("POST", parsed.path, BODY, {"Content-Type": "application/json"})
                resp = conn.getresponse()
                resp.read()
                status = resp.status
            except OSError:
                status = 0
                conn.close()
                conn = http.client.HTTPConnection(parsed.hostname, parsed.port, timeout=10)
            with lock:
                results.append({"t": round(t0 - started, 4), "at": round(t0, 4), "status": status,
                                "ms": round((time.monotonic() - t0) * 1e3, 2)})

    workers = [threading.Thread(target=client, args=(times,)) for times in schedule(rate, duration_s, threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    with open(out_path, "w") as f:
        for row in sorted(results, key=lambda r: r["t"]):
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("url")
    parser.add_argument("--rate", type=float, default=50.0)
    parser.add_argument("--duration-s", type=float, default=20.0)
    parser.add_argument("--threads", type=int, default=4)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    run(args.url, args.rate, args.duration_s, args.threads, args.out)
