"""Worker memory budgets and the broker's placement under mixed load (issue 15): 4 workers, 12 generated
models of about 20 MB, mixed REST load over all 12, with a 60 MiB budget per worker and with none.

    python bench/placement.py [--requests 1200] [--concurrency 8] [--placement-wait-s 0.5] [--no-placement]

Prints, for each run: answers checked against each model's table, the most resident bytes any
worker reported against its budget (sampled from every worker's /metrics during the load), total
worker RSS, and cold loads after warm-up. The broker routes by residency (docs/protocol.md,
"Placement"); `--no-placement` shows the least-recently-used routing it replaces, which thrashes
under a budget that holds 3 of 12 models per worker.
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from broker.client import Client  # noqa: E402
from tests.onnx_models import sized_model, sized_table  # noqa: E402

MODELS, WORKERS = 12, 4
MODEL_BYTES = 20_000_000            # about 20 MB each (one float32 table)
BUDGET_BYTES = 60 << 20             # 60 MiB: room for three of them


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def metric(text: str, name: str) -> float:
    return sum(float(v) for v in re.findall(rf"^{name}(?:{{[^}}]*}})? (\S+)$", text, re.M))


def rss(pid: int) -> int:
    with open(f"/proc/{pid}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def scrape(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as resp:
        return resp.read().decode()


class Cluster:
    """Broker, WORKERS workers (metrics on free ports) and a gunicorn frontend over `pool`."""

    def __init__(self, pool: Path, budget: int, logs: Path, placement: list[str]):
        self.url, self.http_port = f"tcp://127.0.0.1:{free_port()}", free_port()
        quiet = ["--log-level", "WARNING"]
        log = open(logs / f"budget-{budget}.log", "ab")
        self.procs = [subprocess.Popen([sys.executable, "-m", "broker", "--bind", self.url, "--metrics-port", "0",
                                        *placement, *quiet], cwd=REPO, stdout=log, stderr=log)]
        self.metrics, self.workers = [], []
        for _ in range(WORKERS):
            port = free_port()
            self.workers.append(subprocess.Popen(
                [sys.executable, "-m", "worker", "--connect", self.url, "--model-dir", str(pool), "--threads", "1",
                 "--no-log-requests", "--metrics-port", str(port), "--memory-budget-bytes", str(budget), *quiet],
                cwd=REPO, stdout=log, stderr=log))
            self.metrics.append(f"http://127.0.0.1:{port}/metrics")
        self.procs += self.workers
        self.procs.append(subprocess.Popen(
            [sys.executable, "-m", "fractal", "frontend", "--bind", f"127.0.0.1:{self.http_port}", "--workers", "2"],
            cwd=REPO, stdout=log, stderr=log, env=dict(os.environ, FRACTAL_FRONTEND_BROKER=self.url)))
        self._wait()

    def _wait(self) -> None:
        deadline = time.monotonic() + 60
        with Client(self.url, timeout_s=5) as client:
            while time.monotonic() < deadline:
                try:
                    nodes = {client.echo(i, timeout_s=2)["node"] for i in range(2 * WORKERS)}
                    urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}/", timeout=1).close()
                    if len(nodes) == WORKERS:
                        return
                except Exception:
                    pass
                time.sleep(0.2)
        raise SystemExit("the cluster did not come up in 60 s")

    def stop(self) -> None:
        for proc in self.procs:
            proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()


class Sampler(threading.Thread):
    """Every 0.1 s: each worker's fractal_worker_resident_bytes and RSS, keeping the maxima."""

    def __init__(self, cluster: Cluster):
        super().__init__(daemon=True)
        self.cluster, self.done = cluster, threading.Event()
        self.max_resident = [0.0] * WORKERS
        self.max_rss_total = 0

    def run(self) -> None:
        while not self.done.wait(0.1):
            for i, url in enumerate(self.cluster.metrics):
                self.max_resident[i] = max(self.max_resident[i], metric(scrape(url), "fractal_worker_resident_bytes"))
            self.max_rss_total = max(self.max_rss_total, sum(rss(w.pid) for w in self.cluster.workers))


def load(port: int, plan: list[tuple[int, int]], tables: list[np.ndarray], concurrency: int) -> tuple[int, int]:
    """Send `plan` ((model, row) pairs) over `concurrency` keep-alive connections; (correct, wrong)."""
    results, lock, it = [0, 0], threading.Lock(), iter(plan)

    def client() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        while True:
            with lock:
                item = next(it, None)
            if item is None:
                break
            model, row = item
            conn.request("POST", f"/api/v1/models/m{model}.onnx/prediction", json.dumps({"values": [row]}),
                         {"Content-Type": "application/json"})
            resp = conn.getresponse()
            body = json.loads(resp.read())
            ok = resp.status == 200 and np.array_equal(np.array(body["values"], np.float32), tables[model][[row]])
            with lock:
                results[0 if ok else 1] += 1
        conn.close()
    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results[0], results[1]


def run(pool: Path, budget: int, tables: list[np.ndarray], requests: int, concurrency: int, logs: Path,
        placement: list[str]) -> dict:
    cluster = Cluster(pool, budget, logs, placement)
    try:
        rng = random.Random(1)
        rows = len(tables[0])
        warmup = [(m, rng.randrange(rows)) for _ in range(2 * WORKERS) for m in range(MODELS)]
        plan = [(rng.randrange(MODELS), rng.randrange(rows)) for _ in range(requests)]
        ok_w, bad_w = load(cluster.http_port, warmup, tables, concurrency)
        before = [scrape(url) for url in cluster.metrics]
        sampler = Sampler(cluster)
        sampler.start()
        started = time.monotonic()
        ok, bad = load(cluster.http_port, plan, tables, concurrency)
        elapsed = time.monotonic() - started
        sampler.done.set()
        sampler.join()
        after = [scrape(url) for url in cluster.metrics]
        cold = sum(metric(a, "fractal_worker_cold_loads_total") - metric(b, "fractal_worker_cold_loads_total")
                   for a, b in zip(after, before, strict=True))
        with Client(cluster.url, timeout_s=10) as client:
            status = {}
            for _ in range(4 * WORKERS):  # the broker's LRU spreads these over every worker
                s = client.call("status")
                status[s["node"]] = s
        return {"correct": ok + ok_w, "wrong": bad + bad_w, "requests": requests, "rps": requests / elapsed,
                "max_resident": sampler.max_resident, "resident_now": [s["resident_bytes"]["total"]
                                                                       for s in status.values()],
                "models_per_worker": [len(s["models_resident"]) for s in status.values()],
                "rss_total": sum(rss(w.pid) for w in cluster.workers), "rss_peak": sampler.max_rss_total,
                "cold": cold, "evictions": sum(metric(a, "fractal_worker_session_cache_evictions_total")
                                                for a in after)}
    finally:
        cluster.stop()


def mb(n: float) -> str:
    return f"{n / 1e6:.1f} MB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=1200, help="requests after warm-up, per run")
    parser.add_argument("--concurrency", type=int, default=8, help="HTTP connections in flight")
    parser.add_argument("--budget-bytes", type=int, default=BUDGET_BYTES)
    parser.add_argument("--model-bytes", type=int, default=MODEL_BYTES)
    parser.add_argument("--placement-wait-s", type=float, default=0.5, help="the broker's placement_wait_s")
    parser.add_argument("--no-placement", action="store_true", help="least-recently-used routing instead")
    args = parser.parse_args()
    placement = (["--no-placement"] if args.no_placement
                 else ["--placement-wait-s", str(args.placement_wait_s)])  # placement: the default
    with tempfile.TemporaryDirectory() as tmp:
        pool, logs = Path(tmp) / "pool", Path(tmp)
        pool.mkdir()
        tables = [sized_table(args.model_bytes, seed) for seed in range(MODELS)]
        for seed in range(MODELS):
            (pool / f"m{seed}.onnx").write_bytes(sized_model(args.model_bytes, seed))
        size = (pool / "m0.onnx").stat().st_size
        print(f"{WORKERS} workers, {MODELS} models of {size:,} bytes, {args.requests} requests after "
              f"{2 * WORKERS * MODELS} of warm-up, {args.concurrency} in flight, mixed uniformly over the models; "
              f"broker {' '.join(placement)}")
        results = {}
        for label, budget in (("budget", args.budget_bytes), ("no budget", 0)):
            results[label] = r = run(pool, budget, tables, args.requests, args.concurrency, logs, placement)
            print(f"\n{label} ({'memory_budget_bytes ' + format(budget, ',') if budget else 'unlimited'}):")
            print(f"  answers correct: {r['correct']} of {r['correct'] + r['wrong']}"
                  f"{'  (ALL CORRECT)' if not r['wrong'] else '  (WRONG ANSWERS)'}; {r['rps']:.0f} req/s")
            print(f"  max resident bytes per worker during the load: "
                  f"{', '.join(mb(x) for x in r['max_resident'])}"
                  + (f" (budget {mb(budget)}: {'within' if max(r['max_resident']) <= budget else 'OVER'})"
                     if budget else ""))
            print(f"  models resident per worker at the end: {r['models_per_worker']}")
            print(f"  total worker RSS at the end: {mb(r['rss_total'])} (peak {mb(r['rss_peak'])})")
            print(f"  cold loads after warm-up: {r['cold']:.0f} ({r['cold'] / args.requests:.0%} of requests), "
                  f"evictions {r['evictions']:.0f}")
        b, n = results["budget"], results["no budget"]
        print(f"\ntotal worker RSS with the budget / without: {mb(b['rss_total'])} / {mb(n['rss_total'])} "
              f"= {b['rss_total'] / n['rss_total']:.2f}x")
        print(f"cold loads after warm-up with the budget: {b['cold']:.0f} of {args.requests} "
              f"({b['cold'] / args.requests:.1%}), {b['rps']:.0f} req/s against {n['rps']:.0f} without a budget")


if __name__ == "__main__":
    main()
