"""CPU per REST prediction of the frontend, broker and worker against the bare ASGI floor, and the
1-connection p50 of both: the figures issue 13's frontend work is judged by.

    python bench/frontend_cpu.py [--duration-s 5] [--connections 16] [--rounds 3] [--http-workers 1]
                                 [--log-level INFO] [--transport tcp|ipc] [--profile-s 0]

One broker, one worker and one gunicorn frontend (--http-workers uvicorn workers) over them, beside
bench/floor_app.py's ASGI app under the same number of uvicorn workers. Each round drives both with
wrk (iris one row, seed JSON) at --connections and at 1 connection, and reads utime + stime of every
process from /proc: CPU per request survives a busy machine better than req/s. The median round is
shown. With --profile-s, py-spy (if installed) records the first frontend worker for that long under
load and prints its top functions.
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.cpu import cpu_s  # noqa: E402
from bench.pipeline import IRIS, Procs, free_url, wait_ready  # noqa: E402
from bench.rest import LUA, PATH, free_port, wrk  # noqa: E402
from fractal.gunicorn_args import gunicorn_argv  # noqa: E402

BODY = b'{"values": [2, 5, 1, 4]}'


def children(pid: int) -> list[int]:
    return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def start_http(argv: list[str], env: dict, workers: int) -> tuple[subprocess.Popen, list[int], int]:
    """(gunicorn master, its worker pids, port), once it answers a prediction."""
    port = free_port()
    bind = f"127.0.0.1:{port}"
    argv = [bind if i and argv[i - 1] == "--bind" else a for i, a in enumerate(argv)]
    if bind not in argv:
        argv.append("--bind")
        argv.append(bind)
    proc = subprocess.Popen(argv, env=dict(os.environ, PYTHONPATH=str(REPO), **env), cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{argv[:6]} exited with {proc.returncode}")
        try:
            req = urllib.request.Request(f"http://127.0.0.1:{port}{PATH}", data=BODY, method="POST",
                                         headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(req, timeout=2) as resp:
                if resp.status == 200 and len(children(proc.pid)) >= workers:
                    return proc, children(proc.pid), port
        except OSError:
            time.sleep(0.2)
    raise RuntimeError("the HTTP server did not answer within 60 s")


def one_round(port: int, pids: dict[str, list[int]], connections: int, duration_s: float,
              script: Path) -> dict[str, float]:
    url = f"http://127.0.0.1:{port}{PATH}"
    before = {name: sum(cpu_s(p) for p in group) for name, group in pids.items()}
    cell = wrk(url, connections, duration_s, script)
    after = {name: sum(cpu_s(p) for p in group) for name, group in pids.items()}
    row = {name: (after[name] - before[name]) / max(cell["requests"], 1) * 1e6 for name in pids}
    row["rps"], row["errors"] = cell["rps"], cell["errors"]
    row["p50_1"] = wrk(url, 1, duration_s / 2, script)["p50"]
    return row


def profile(pid: int, seconds: float, port: int, script: Path, connections: int) -> None:
    if shutil.which("py-spy") is None:
        print("py-spy is not installed: no profile")
        return
    out = Path(tempfile.mkdtemp()) / "profile.txt"
    spy = subprocess.Popen(["py-spy", "record", "--pid", str(pid), "--duration", str(int(seconds)), "--rate", "1000",
                            "--format", "raw", "--nonblocking", "--output", str(out)], stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
    wrk(f"http://127.0.0.1:{port}{PATH}", connections, seconds + 1, script)
    spy.wait(60)
    self_time: dict[str, int] = {}
    inclusive: dict[str, int] = {}
    total = 0
    for line in out.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        frames, n = stack.split(";"), int(count)
        total += n
        self_time[frames[-1]] = self_time.get(frames[-1], 0) + n
        for frame in set(frames):
            inclusive[frame] = inclusive.get(frame, 0) + n
    print(f"\npy-spy, frontend worker {pid}, {total} samples; top self time:")
    for frame, n in sorted(self_time.items(), key=lambda kv: -kv[1])[:30]:
        print(f"  {n / total:6.1%}  {frame}")
    print("top inclusive time:")
    for frame, n in sorted(inclusive.items(), key=lambda kv: -kv[1])[:110]:
        print(f"  {n / total:6.1%}  {frame}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration-s", type=float, default=5)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--http-workers", type=int, default=1)
    parser.add_argument("--log-level", default="INFO", help="of the frontend (INFO: a line per request)")
    parser.add_argument("--transport", choices=("tcp", "ipc"), default="tcp", help="frontend/worker to broker")
    parser.add_argument("--profile-s", type=float, default=0)
    parser.add_argument("--no-floor", action="store_true")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="fractal-frontend-cpu-"))
    (work / "iris.onnx").write_bytes(IRIS.read_bytes())
    script = work / "seed.lua"
    script.write_text(LUA)
    url = free_url() if args.transport == "tcp" else f"ipc://{work}/broker.sock"
    procs = Procs()
    servers: list[subprocess.Popen] = []
    try:
        broker = procs.start("-m", "broker", "--bind", url, "--log-level", "WARNING", "--metrics-port", "0")
        worker = procs.start("-m", "worker", "--connect", url, "--model-dir", str(work), "--log-level", "WARNING",
                             "--metrics-port", "0")
        wait_ready(url, 1)
        ours, ours_pids, ours_port = start_http(gunicorn_argv("127.0.0.1:0", args.http_workers, args.log_level),
                                                {"FRACTAL_FRONTEND_BROKER": url,
                                                 "FRACTAL_FRONTEND_LOG_LEVEL": args.log_level},
                                                args.http_workers)
        servers.append(ours)
        targets = {"fractal": (ours_port, {"frontend": ours_pids, "broker": [broker.pid], "worker": [worker.pid]})}
        if not args.no_floor:
            floor, floor_pids, floor_port = start_http(
                [sys.executable, "-m", "gunicorn", "bench.floor_app:create_asgi_app()", "--worker-class",
                 "uvicorn_worker.UvicornWorker", "--workers", str(args.http_workers), "--log-level", "warning"],
                {}, args.http_workers)
            servers.append(floor)
            targets["floor"] = (floor_port, {"frontend": floor_pids})
        for port, _ in targets.values():
            wrk(f"http://127.0.0.1:{port}{PATH}", args.connections, 2, script)  # warm-up
        if args.profile_s:
            profile(ours_pids[0], args.profile_s, ours_port, script, args.connections)
        rows: dict[str, list[dict]] = {name: [] for name in targets}
        for _ in range(args.rounds):
            for name, (port, pids) in targets.items():
                rows[name].append(one_round(port, pids, args.connections, args.duration_s, script))
    finally:
        for server in servers:
            server.terminate()
            server.wait(20)
        procs.stop()
        shutil.rmtree(work, ignore_errors=True)
    print(f"\nREST iris one row, {args.http_workers} uvicorn worker(s), {args.transport}, {args.connections} conns, "
          f"median of {args.rounds} rounds of {args.duration_s:g} s")
    print(f"{'server':10} {'frontend us':>12} {'broker us':>10} {'worker us':>10} {'req/s':>9} {'p50@1 ms':>9}")
    for name, runs in rows.items():
        med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        print(f"{name:10} {med['frontend']:12.1f} {med.get('broker', 0):10.1f} {med.get('worker', 0):10.1f} "
              f"{med['rps']:9,.0f} {med['p50_1']:9.3f}" + ("  (errors)" if med["errors"] else ""))


if __name__ == "__main__":
    main()
