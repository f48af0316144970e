"""What OpenTelemetry tracing costs per REST prediction: CPU per request of the frontend, broker and worker
with tracing off, on at 100 % sampling and on at 1 % (issue 18, items 1 and 5).

    python bench/tracing_cost.py [--requests N] [--rounds R]

Needs the otel extra (pip install '.[otel]'). One broker; per configuration one worker (its own MDP
service, so each frontend reaches only its own) and one frontend (gunicorn, one uvicorn worker). Tracing
rows export over OTLP/HTTP to a sink this script runs on a free local port, with the SDK's default batch
processor, so the export's serialisation counts in the frontend's and worker's CPU as it would in
production. Each round sends N iris predictions through each frontend in turn, one at a time on one
keep-alive connection, and reads utime + stime of the processes from /proc (robust on a shared machine,
where latency is not); rounds rotate the order, and the median round is shown. The broker's column is
the same work in every row: how much it moves is this machine's noise.

"Off" costs one check of a module global at each hook; it is also measured in process (the hooks a
request passes with tracing off, timed alone), since an end-to-end difference that small is below the
noise of any shared machine. So is the tracing work of a request with tracing on, kept or dropped by
the sampler, without the export.
"""
from __future__ import annotations

import argparse
import http.client
import http.server
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.observe_cost import PATH, free_port, one_round, print_table, start_gunicorn, wait_for  # noqa: E402
from bench.pipeline import IRIS, Procs, free_url  # noqa: E402
from broker.client import Client  # noqa: E402

CONFIGS = {"tracing off": {"FRACTAL_TRACING": "false"},
           "tracing on, 100 %": {"FRACTAL_TRACING": "true", "OTEL_TRACES_SAMPLER": "parentbased_always_on"},
           "tracing on, 1 %": {"FRACTAL_TRACING": "true", "OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
                               "OTEL_TRACES_SAMPLER_ARG": "0.01"}}
# Each hook a REST prediction passes with tracing off: the client's, timed()'s, and the worker's five.
HOOKS_PER_REQUEST = 7


class Sink:
    """An OTLP/HTTP endpoint that takes every export and drops it."""

    def __init__(self) -> None:
        self.requests = 0
        sink = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                self.rfile.read(int(self.headers.get("Content-Length", 0)))
                sink.requests += 1
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def start_frontend(broker: str, service: str, env: dict) -> tuple[subprocess.Popen, int, int]:
    """(gunicorn master, its one worker's pid, port)."""
    return start_gunicorn(broker, {"FRACTAL_FRONTEND_SERVICE": service, **env})


def start_worker(url: str, service: str, model_dir: Path, env: dict) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "worker", "--connect", url, "--service", service, "--model-dir",
                             str(model_dir), "--log-level", "WARNING", "--metrics-port", "0"], cwd=REPO,
                            env=dict(os.environ, PYTHONPATH=str(REPO), **env),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    with Client(url, service, timeout_s=2) as client:
        def up() -> bool:
            try:
                client.echo(1, timeout_s=2)
                return True
            except Exception:
                return False
        wait_for(up, 60, f"the worker of {service}")
    return proc


def off_hooks_us(n: int = 1_000_000) -> float:
    """µs per request of the hooks with tracing off: HOOKS_PER_REQUEST checks of tracing.ENABLED."""
    from metrics import tracing

    def hooks() -> None:
        for _ in range(HOOKS_PER_REQUEST):
            if tracing.ENABLED:
                raise AssertionError("tracing is on")

    def per_call(fn) -> float:
        started = time.process_time()
        for _ in range(n):
            fn()
        return (time.process_time() - started) / n * 1e6

    def loop_only() -> None:
        for _ in range(HOOKS_PER_REQUEST):
            pass
    return max(0.0, per_call(hooks) - per_call(loop_only))


def in_process_us(n: int = 20_000) -> dict[str, float]:
    """µs per request of the tracing work itself, in this process, spans dropped by a null exporter (so
    without the OTLP encoding the end-to-end rows include): the frontend's for a request the sampler
    keeps and for one it drops (1 %: 99 of 100), and the worker's for a kept one."""
    from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

    from metrics import tracing

    class Null(SpanExporter):
        def export(self, spans: object) -> SpanExportResult:
            return SpanExportResult.SUCCESS

    def frontend(traceparent: str) -> None:
        server = tracing.ServerSpan("POST", traceparent, None, {"http.request.method": "POST", "url.path": PATH})
        server.span.update_name("POST /api/v1/models/{name}/prediction")
        call = tracing.BrokerCall("predict", "iris.onnx")
        tracing.with_traceparent({"op": "predict"})
        call.end({"call_ms": 1.0, "worker_ms": 0.5})
        server.end("ok", {"http.response.status_code": 200})

    def worker() -> None:
        request = {"op": "predict", "model": "iris.onnx", "traceparent": KEPT, "request_id": "r"}
        now = time.perf_counter_ns()
        tracing.received(request, now)
        tracing.RUN = (0, now + 1000, now + 2000, 1, None)
        tracing.answered(request, {})
        tracing.finish(request, "node")

    def per_call(fn, *args: str) -> float:
        for _ in range(n // 10):
            fn(*args)
        started = time.process_time()  # NOTE: CPU, not wall time: other processes' load does not count
        for _ in range(n):
            fn(*args)
        return (time.process_time() - started) / n * 1e6

    tracing.configure("bench", True, exporter=Null(), env={})
    try:
        return {"frontend, kept": per_call(frontend, KEPT), "frontend, dropped": per_call(frontend, KEPT[:-2] + "00"),
                "worker, kept": per_call(worker)}
    finally:
        tracing.shutdown()


KEPT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000, help="predictions per frontend per round")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    off_us = off_hooks_us()
    model_dir = Path(os.environ.get("TMPDIR", "/tmp")) / f"fractal-tracing-cost-{os.getpid()}"
    model_dir.mkdir(exist_ok=True)
    (model_dir / "iris.onnx").write_bytes(IRIS.read_bytes())
    sink, procs, url = Sink(), Procs(), free_url()
    started_procs: list[subprocess.Popen] = []
    pids: dict[str, dict[str, int]] = {}
    ports: dict[str, int] = {}
    try:
        broker = procs.start("-m", "broker", "--bind", url, "--log-level", "WARNING", "--metrics-port", "0")
        for i, (label, config) in enumerate(CONFIGS.items()):
            env = {**config, "OTEL_EXPORTER_OTLP_ENDPOINT": sink.endpoint}
            service = f"bench{i}"
            worker = start_worker(url, service, model_dir, env)
            frontend, http_pid, ports[label] = start_frontend(url, service, env)
            started_procs += [worker, frontend]
            pids[label] = {"frontend": http_pid, "broker": broker.pid, "worker": worker.pid}
        rows: dict[str, list[dict]] = {label: [] for label in CONFIGS}
        started = time.monotonic()
        order = list(CONFIGS)
        for i in range(args.rounds):
            for label in order[i % len(order):] + order[:i % len(order)]:  # NOTE: rotated: no row always last
                rows[label].append(one_round(ports[label], pids[label], args.requests))
    finally:
        for proc in started_procs:
            proc.terminate()
        for proc in started_procs:
            proc.wait(timeout=20)
        procs.stop()
        sink.close()
    print(f"CPU µs per REST prediction (iris, one row, {PATH}), median of {args.rounds} rounds of "
          f"{args.requests}, {time.monotonic() - started:.0f} s; {sink.requests} OTLP exports received\n")
    off = print_table(rows, "tracing off")
    print(f"\nTracing off, the hooks alone (in process, {HOOKS_PER_REQUEST} checks of tracing.ENABLED): "
          f"{off_us * 1e3:.0f} ns per request, {off_us / off * 100:.3f} % of the path's {off:.0f} µs")
    for label, us in in_process_us().items():
        print(f"Tracing on, in process, {label}: {us:.1f} µs per request, {us / off * 100:.1f} % of the path")


if __name__ == "__main__":
    main()
