"""Soak: mixed load on fractal serve for a long while, watching every process's memory and descriptors.

    python bench/soak.py [--duration-s 600]

Three bounded loops through the REST API: predictions (~40/s), model listings (~5/s), and a scratch
model uploaded, used and deleted (~1/s). Every 30 s it samples RSS and open file descriptors of the
broker, each worker and each gunicorn process; at the end it prints start, end and growth per
process, and the failed requests. Everything on 127.0.0.1.
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.harness import descendants, free_port, process_table  # noqa: E402


def tree(root: int) -> dict[int, str]:
    """pid -> role for every process under `root`."""
    table = process_table()
    return {pid: _role(table[pid].cmdline) for pid in descendants(root, table)}


def _role(cmd: str) -> str:
    return ("gunicorn" if "gunicorn" in cmd else "broker" if "-m broker" in cmd
            else "worker" if "-m worker" in cmd else "other")


def sample(pid: int) -> tuple[int, int] | None:
    try:
        rss = int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        return rss, len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None


class Load:
    def __init__(self, port: int, deadline: float):
        self.port, self.deadline = port, deadline
        self.counts, self.failures, self.lock = {}, [], threading.Lock()

    def request(self, conn: http.client.HTTPConnection, method: str, path: str, body: bytes | None,
                ctype: str, ok: tuple[int, ...] = (200,)) -> http.client.HTTPConnection:
        try:
            conn.request(method, path, body, {"Content-Type": ctype})
            resp = conn.getresponse()
            resp.read()
            status = resp.status
        except OSError as exc:
            status, conn = f"{exc.__class__.__name__}", http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        with self.lock:
            key = path.rsplit("/", 1)[-1] + " " + method
            self.counts[key] = self.counts.get(key, 0) + 1
            if status not in ok:
                self.failures.append((time.time(), method, path, status))
        return conn

    def loop(self, rate: float, steps) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        n, started = 0, time.monotonic()
        while time.monotonic() < self.deadline:
            for step in steps:
                conn = self.request(conn, *step)
            n += 1
            time.sleep(max(0.0, started + n / rate - time.monotonic()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration-s", type=float, default=600)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="fractal-soak-"))
    port = free_port()
    log = open(work / "serve.log", "wb")
    serve = subprocess.Popen([sys.executable, "-m", "fractal", "serve", "--http-port", str(port), "--broker-port",
                              str(free_port()), "--model-dir", str(work / "models"), "--metrics-port", "0",
                              "--log-level", "WARNING", "--grpc-port", "0"],
                             cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    while b"ready:" not in (work / "serve.log").read_bytes():
        if serve.poll() is not None:
            sys.exit("fractal serve did not start")
        time.sleep(0.1)
    iris = (REPO / "worker" / "models" / "iris.onnx").read_bytes()
    predict = ("POST", "/api/v1/models/iris.onnx/prediction", b'{"values": [2, 5, 1, 4]}', "application/json")
    scratch = [("PUT", "/api/v1/models/scratch.onnx", iris, "application/octet-stream"),
               ("POST", "/api/v1/models/scratch.onnx/prediction", b'{"values": [2, 5, 1, 4]}', "application/json"),
               ("DELETE", "/api/v1/models/scratch.onnx", None, "application/json")]
    time.sleep(2)
    load = Load(port, time.monotonic() + args.duration_s)
    threads = [threading.Thread(target=load.loop, args=args_) for args_ in
               ((20, [predict]), (20, [predict]), (5, [("GET", "/api/v1/models", None, "application/json")]),
                (1, scratch))]
    samples: dict[int, list] = {}
    roles = tree(serve.pid)
    for t in threads:
        t.start()
    try:
        while any(t.is_alive() for t in threads):
            for pid in roles:
                s = sample(pid)
                if s:
                    samples.setdefault(pid, []).append((time.monotonic(), *s))
            time.sleep(min(30, args.duration_s / 10))
        for pid in roles:
            s = sample(pid)
            if s:
                samples.setdefault(pid, []).append((time.monotonic(), *s))
    finally:
        for t in threads:
            t.join()
        serve.send_signal(signal.SIGINT)
        serve.wait(60)
    print(f"\nSoak: {args.duration_s:.0f} s of mixed load; requests {sum(load.counts.values()):,} "
          f"({', '.join(f'{k}: {v:,}' for k, v in sorted(load.counts.items()))}); failed {len(load.failures)}\n")
    print(f"{'process':18} {'RSS start':>10} {'RSS end':>10} {'growth':>8} {'fds start':>10} {'fds end':>8}")
    for pid, rows in sorted(samples.items(), key=lambda kv: roles.get(kv[0], "")):
        (_, rss0, fd0), (_, rss1, fd1) = rows[1] if len(rows) > 1 else rows[0], rows[-1]  # after warm-up
        print(f"{roles[pid] + ' ' + str(pid):18} {rss0 / 2**20:9.1f}M {rss1 / 2**20:9.1f}M "
              f"{(rss1 - rss0) / 2**20:+7.1f}M {fd0:10} {fd1:8}")
    if load.failures:
        print("first failures:", json.dumps(load.failures[:5]))


if __name__ == "__main__":
    main()
