"""Issue 13's REST targets in one sitting: the in-process floors, MLServer 1.7.1 and fractal serve.

    python bench/compare.py [--duration-s 8] [--connections 1,16,64] [--cpu-requests 20000]
                            [--baseline REV] [--skip-mlserver] [--log-level INFO] [--http-workers 0,2]

Every server answers iris, one row, on 127.0.0.1 free ports, driven by wrk (apt-get install wrk):

- floor, WSGI: Falcon + gunicorn gthread 2 x 4, ONNX Runtime in the handler (bench/floor_app.py)
- floor, ASGI: the same Falcon app as ASGI, gunicorn with 2 uvicorn workers (uvloop, httptools)
- MLServer 1.7.1, default and parallel_workers=0, V2 JSON infer route; a custom MLModel runtime that
  runs the same ONNX file with ONNX Runtime, as MLServer users write one. MLServer lives in a
  virtualenv this command makes once under ~/.cache/fractal-bench (it pins its own dependencies).
- fractal serve (this checkout, defaults): the seed JSON route and the v2 JSON route; then, at 16
  connections, the seed JSON path against the v2 binary path on a 1x3x224x224 FP32 input.
- with --baseline REV: fractal serve as of git revision REV too (e.g. the WSGI gthread frontend).
- with --http-workers 0,2: fractal serve once per value of its http_workers (0: the default).

Each server is also given about --cpu-requests requests (16 connections; wrk counts them exactly)
while the CPU time (utime + stime, /proc) of its HTTP processes is read before and after: CPU per
request of the frontend, a figure that survives a busy machine better than req/s. Then the issue's targets, PASS or
FAIL. Every process is stopped at the end, on success or failure.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.rest import lua_for, pool_model, transport_cases, wrk  # noqa: E402
from tests.harness import (  # noqa: E402
    copy_bundled_models,
    descendants,
    free_port,
    free_ports,
    process_table,
    wait_post_200,
)

REPO = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "fractal-bench"
MLSERVER_VERSION = "1.7.1"
IRIS_ROW = [2, 5, 1, 4]
SEED_PATH, SEED_BODY = "/api/v1/models/iris.onnx/prediction", json.dumps({"values": IRIS_ROW}).encode()
V2_BODY = json.dumps({"inputs": [{"name": "float_input", "shape": [1, 4], "datatype": "FP32",
                                  "data": IRIS_ROW}]}).encode()
UVICORN = "uvicorn_worker.UvicornWorker"

RUNTIME = '''\
"""An MLServer custom runtime: the iris ONNX model in ONNX Runtime, as MLServer users write one."""
import numpy as np
import onnxruntime as ort
from mlserver import MLModel
from mlserver.codecs import NumpyCodec
from mlserver.types import InferenceRequest, InferenceResponse
from mlserver.utils import get_model_uri


class OnnxRuntime(MLModel):
    async def load(self) -> bool:
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        self.session = ort.InferenceSession(await get_model_uri(self._settings), options,
                                            providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name
        self.output_names = [o.name for o in self.session.get_outputs()]
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        x = NumpyCodec.decode_input(payload.inputs[0]).astype(np.float32)
        label = self.session.run(self.output_names[:1], {self.input_name: x})[0]
        return InferenceResponse(model_name=self.name, outputs=[NumpyCodec.encode_output("label", label)])
'''


@dataclass
class Route:
    label: str
    path: str
    script: Path
    cells: dict = field(default_factory=dict)   # connections -> {"rps", "p50", "p99", "errors"}
    cpu: dict = field(default_factory=dict)     # {"frontend_us", "tree_us", "requests"}


@dataclass
class Server:
    name: str
    argv: list[str]
    port: int
    routes: list[Route]
    cwd: Path = REPO
    env: dict = field(default_factory=dict)
    http_procs: str = "gunicorn"  # whose CPU counts as the frontend: gunicorn workers, or the whole tree
    transport: dict = field(default_factory=dict)


# -- processes -------------------------------------------------------------------------------------

def cpu_s(root: int, only_http: bool) -> tuple[float, float]:
    """(CPU seconds of the HTTP worker processes under root, CPU seconds of the whole tree).

    HTTP workers are gunicorn processes whose parent is a gunicorn process (its master)."""
    table = process_table()
    pids = [p for p in [root, *descendants(root, table)] if p in table]
    whole = sum(table[p].cpu_s for p in pids)
    if not only_http:
        return whole, whole
    http = sum(table[p].cpu_s for p in pids if "gunicorn" in table[p].cmdline
               and table[p].ppid in table and "gunicorn" in table[table[p].ppid].cmdline)
    return http, whole


def start(server: Server) -> subprocess.Popen:
    log = open(server.cwd / f"{server.name.replace(' ', '_').replace('/', '_')}.log", "wb") \
        if server.cwd != REPO else subprocess.DEVNULL
    return subprocess.Popen(server.argv, cwd=server.cwd, stdout=log, stderr=subprocess.STDOUT,
                            env=dict(os.environ, **server.env), start_new_session=True)


def stop(proc: subprocess.Popen) -> None:
    """SIGINT to the whole process group, then SIGKILL to what is left."""
    for sig, wait_s in ((signal.SIGINT, 20), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(wait_s)
        except subprocess.TimeoutExpired:
            continue
        try:  # the leader is gone; children of the group may not be
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.5)


def measure(server: Server, conns: list[int], duration_s: float, cpu_requests: int,
            cases: list[tuple[str, str, Path]] = ()) -> None:
    proc = start(server)
    base = f"http://127.0.0.1:{server.port}"
    try:
        first = server.routes[0]
        wait_post_200(base + first.path, SEED_BODY if first.path == SEED_PATH else V2_BODY, proc, timeout_s=120)
        for route in server.routes:
            url = base + route.path
            wrk(url, 16, 2, route.script)  # warm-up: sessions loaded, connections made
            for c in conns:
                route.cells[c] = wrk(url, c, duration_s, route.script)
            # NOTE: wrk cannot stop after N requests (a thread's stop() still waits out -d), so the
            # phase lasts about cpu_requests at the measured rate, and wrk's exact count divides.
            rate = route.cells.get(16, next(iter(route.cells.values())))["rps"]
            before = cpu_s(proc.pid, server.http_procs == "gunicorn")
            done = wrk(url, 16, max(2.0, cpu_requests / max(rate, 1.0)), route.script)
            after = cpu_s(proc.pid, server.http_procs == "gunicorn")
            route.cpu = {"requests": done["requests"], "errors": done["errors"],
                         "frontend_us": (after[0] - before[0]) / done["requests"] * 1e6,
                         "tree_us": (after[1] - before[1]) / done["requests"] * 1e6}
        for label, path, script in cases:
            wrk(base + path, 16, 1, script)
            server.transport[label] = wrk(base + path, 16, duration_s, script)
    finally:
        stop(proc)


# -- the servers -----------------------------------------------------------------------------------

def mlserver_env(rebuild: bool) -> Path:
    """The virtualenv with MLServer and ONNX Runtime, made once and kept in the cache."""
    venv = CACHE / f"mlserver-{MLSERVER_VERSION}"
    ready = venv / ".complete"
    if rebuild and venv.exists():
        shutil.rmtree(venv)
    if not ready.exists():
        print(f"making {venv} (once): MLServer {MLSERVER_VERSION} and ONNX Runtime", flush=True)
        shutil.rmtree(venv, ignore_errors=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        # NOTE: MLServer 1.7.1 calls asyncio.get_event_loop() outside a loop, which uvloop >= 0.22 refuses.
        pip = subprocess.run([str(venv / "bin" / "pip"), "install", "-q", f"mlserver=={MLSERVER_VERSION}",
                              "uvloop<0.22", "onnxruntime"], capture_output=True, text=True, timeout=1800)
        if pip.returncode != 0:
            sys.exit(f"pip could not install MLServer {MLSERVER_VERSION}:\n{pip.stdout[-3000:]}{pip.stderr[-3000:]}")
        ready.touch()
    return venv


def mlserver(work: Path, venv: Path, parallel_workers: int | None, script: Path) -> Server:
    name = "default" if parallel_workers is None else f"parallel_workers={parallel_workers}"
    root = work / f"mlserver-{name.replace('=', '')}"
    (root / "iris").mkdir(parents=True)
    shutil.copyfile(REPO / "worker" / "models" / "iris.onnx", root / "iris" / "iris.onnx")
    (root / "iris" / "runtime.py").write_text(RUNTIME)
    (root / "iris" / "model-settings.json").write_text(json.dumps(
        {"name": "iris", "implementation": "runtime.OnnxRuntime", "parameters": {"uri": "./iris.onnx"}}))
    port = free_port()
    settings = {"host": "127.0.0.1", "http_port": port, "grpc_port": free_port(), "metrics_port": free_port()}
    if parallel_workers is not None:
        settings["parallel_workers"] = parallel_workers
    (root / "settings.json").write_text(json.dumps(settings))
    return Server(f"MLServer {MLSERVER_VERSION}, {name}", [str(venv / "bin" / "mlserver"), "start", str(root)],
                  port, [Route("V2 JSON", "/v2/models/iris/infer", script)], cwd=root, http_procs="tree")


def fractal(label: str, code: Path, work: Path, models: Path, seed: Path, v2: Path, log_level: str,
            http_workers: int = 0) -> Server:
    port = free_port()
    run = work / f"run-{label.replace(' ', '_')}"
    run.mkdir()
    return Server(label, [sys.executable, "-m", "fractal", "serve", "--http-port", str(port), "--broker-port",
                          str(free_port()), "--model-dir", str(models), "--log-level", log_level, "--metrics-port",
                          str(free_ports(3)), "--http-workers", str(http_workers)], port,
                  [Route("seed JSON", SEED_PATH, seed), Route("v2 JSON", "/v2/models/iris.onnx/infer", v2)],
                  cwd=run, env={"PYTHONPATH": str(code)})


def baseline_tree(rev: str, work: Path) -> Path:
    """The repository as of git revision `rev`, exported (not checked out) into the work directory."""
    target = work / f"baseline-{re.sub(r'[^A-Za-z0-9._-]', '_', rev)}"
    target.mkdir()
    archive = subprocess.run(["git", "-C", str(REPO), "archive", rev], capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(target)], input=archive, check=True)
    return target


def floors(seed: Path) -> list[Server]:
    wsgi, asgi = free_port(), free_port()
    gunicorn = [sys.executable, "-m", "gunicorn", "--workers", "2", "--log-level", "warning"]
    return [Server("floor: Falcon WSGI, gunicorn gthread 2 x 4", [*gunicorn, "bench.floor_app:create_app()", "--bind",
                   f"127.0.0.1:{wsgi}", "--worker-class", "gthread", "--threads", "4"], wsgi,
                   [Route("seed JSON", SEED_PATH, seed)], env={"PYTHONPATH": str(REPO)}),
            Server("floor: Falcon ASGI, gunicorn 2 uvicorn", [*gunicorn, "bench.floor_app:create_asgi_app()", "--bind",
                   f"127.0.0.1:{asgi}", "--worker-class", UVICORN], asgi,
                   [Route("seed JSON", SEED_PATH, seed)], env={"PYTHONPATH": str(REPO)})]


# -- the report ------------------------------------------------------------------------------------

def table(servers: list[Server], conns: list[int]) -> None:
    print(f"\n{'server':46} {'route':10} " + " ".join(f"{f'{c} conn':>25}" for c in conns)
          + f" {'CPU us/req':>18}")
    print(f"{'':46} {'':10} " + " ".join(f"{'req/s · p50 · p99 ms':>25}" for _ in conns)
          + f" {'frontend · all':>18}")
    for s in servers:
        for r in s.routes:
            cells = [f"{t['rps']:>8,.0f} · {t['p50']:5.2f} · {t['p99']:6.2f}" + ("!" if t["errors"] else "")
                     for t in (r.cells[c] for c in conns)]
            cpu = f"{r.cpu['frontend_us']:7,.0f} · {r.cpu['tree_us']:7,.0f}" if r.cpu else ""
            print(f"{s.name:46} {r.label:10} " + " ".join(f"{c:>25}" for c in cells) + f" {cpu:>18}")
    if any(t["errors"] for s in servers for r in s.routes for t in r.cells.values()):
        print("  ! = some non-2xx answers or socket errors in that cell")


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def targets(ours: Server, wsgi: Server, asgi: Server, mlservers: list[Server], conns: list[int]) -> None:
    print(f"\nTargets of issue 13 (ours: {ours.name}, each route)")
    for route in ours.routes:
        for c in conns:
            cell = route.cells[c]
            best = max((m.routes[0].cells[c] for m in mlservers), key=lambda t: t["rps"], default=None)
            if c == 64:
                if best:
                    ratio = cell["rps"] / best["rps"]
                    print(f"  {route.label} @64: req/s {ratio:5.2f}x MLServer's best (>= 4x) "
                          f"{verdict(ratio >= 4)}; p99 {cell['p99']:.2f} ms vs {best['p99']:.2f} ms "
                          f"{verdict(cell['p99'] <= best['p99'])}")
                ratio = cell["rps"] / wsgi.routes[0].cells[c]["rps"]
                print(f"  {route.label} @64: req/s {ratio:5.2f}x the gthread floor (>= 1.5x) {verdict(ratio >= 1.5)}")
            elif c == 16 and best:
                ratio = cell["rps"] / best["rps"]
                print(f"  {route.label} @16: req/s {ratio:5.2f}x MLServer's best (>= 3x) {verdict(ratio >= 3)}")
            elif c == 1:
                ratio = cell["p50"] / asgi.routes[0].cells[c]["p50"]
                print(f"  {route.label} @1: p50 {ratio:5.2f}x the ASGI floor's (<= 3x) {verdict(ratio <= 3)}")
    if ours.transport:
        json_t, binary = ours.transport["1x3x224x224, seed JSON"], ours.transport["1x3x224x224, v2 binary"]
        if not json_t["rps"]:
            print("  v2 binary 1x3x224x224 @16: the seed JSON path answered nothing in the cell: use longer cells")
            return
        ratio = binary["rps"] / json_t["rps"]
        print(f"  v2 binary 1x3x224x224 @16: {binary['rps']:,.0f} req/s = {ratio:.1f}x the seed JSON path's "
              f"{json_t['rps']:,.0f} (>= 20x) {verdict(ratio >= 20)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration-s", type=float, default=8, help="length of each wrk cell")
    parser.add_argument("--connections", default="1,16,64")
    parser.add_argument("--cpu-requests", type=int, default=20000, help="requests of the CPU-per-request phase")
    parser.add_argument("--baseline", help="also run fractal serve as of this git revision (e.g. main)")
    parser.add_argument("--skip-mlserver", action="store_true")
    parser.add_argument("--rebuild-mlserver", action="store_true", help="make the MLServer virtualenv anew")
    parser.add_argument("--log-level", default="INFO", help="of fractal serve (INFO: a line per request)")
    parser.add_argument("--http-workers", default="0", help="fractal serve's http_workers, comma-separated: one "
                        "run of each (0: its default, one process per two cores)")
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        sys.exit("wrk is not installed: apt-get install wrk")
    conns = [int(c) for c in args.connections.split(",")]
    venv = None if args.skip_mlserver else mlserver_env(args.rebuild_mlserver)
    work = Path(tempfile.mkdtemp(prefix="fractal-compare-"))
    try:
        seed, v2 = work / "seed.lua", work / "v2.lua"
        (work / "seed.json").write_bytes(SEED_BODY)
        (work / "v2.json").write_bytes(V2_BODY)
        seed.write_text(lua_for(work / "seed.json", "application/json"))
        v2.write_text(lua_for(work / "v2.json", "application/json"))
        models = copy_bundled_models(work / "models")
        (models / "pool224.onnx").write_bytes(pool_model())
        cases = [c for c in transport_cases(work) if c[0].startswith("1x3x224x224")]
        wsgi, asgi = floors(seed)
        mlservers = [] if venv is None else [mlserver(work, venv, None, v2), mlserver(work, venv, 0, v2)]
        ours_all = [fractal("fractal serve" if n == 0 else f"fractal serve, {n} HTTP processes", REPO, work, models,
                            seed, v2, args.log_level, n) for n in (int(h) for h in args.http_workers.split(","))]
        ours = ours_all[0]
        servers = [wsgi, asgi, *mlservers, *ours_all]
        if args.baseline:
            servers.append(fractal(f"fractal serve @ {args.baseline}", baseline_tree(args.baseline, work), work,
                                   models, seed, v2, args.log_level))
        for server in servers:
            print(f"measuring {server.name} ...", flush=True)
            measure(server, conns, args.duration_s, args.cpu_requests, cases if server is ours else ())
        print(f"\nREST, iris one row, wrk {args.duration_s:g} s per cell, {os.cpu_count()} cores; CPU per request "
              f"over {args.cpu_requests:,} requests at 16 connections (frontend: gunicorn workers; MLServer: all)")
        table(servers, conns)
        for each in ours_all:
            targets(each, wsgi, asgi, mlservers, conns)
        if args.baseline:
            before = servers[-1]
            print(f"\nFrontend CPU per request (gunicorn workers, /proc), {before.name} -> this checkout:")
            for old_route, new_route in zip(before.routes, ours.routes, strict=False):
                old_us, new_us = old_route.cpu["frontend_us"], new_route.cpu["frontend_us"]
                print(f"  {new_route.label:10} {old_us:6,.0f} us -> {new_us:6,.0f} us ({new_us / old_us - 1:+.0%})")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
