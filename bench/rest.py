"""REST throughput and latency with wrk: fractal serve beside the in-process floor, one run.

    python bench/rest.py [--duration-s 10] [--connections 1,16,64] [--log-level INFO]
    python bench/rest.py --metrics-overhead    # fractal serve with metrics on vs off (no-op metrics)

Part 2 compares the seed's JSON path with the Open Inference Protocol's binary tensor path (v2) on
iris and on a 1x3x224x224 FP32 image (a global-average-pool model, so transport dominates), at 16
connections.

Drives POST /api/v1/models/iris.onnx/prediction with {"values": [2, 5, 1, 4]} (needs wrk: apt-get
install wrk). The floor is Falcon + gunicorn gthread (2 x 4) calling ONNX Runtime in-process; ours is
fractal serve with its defaults (2 workers, gunicorn with 2 uvicorn workers, INFO logs: one
line per request in the frontend and one in the worker). Everything on
127.0.0.1; each cell stops after --duration-s.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from tests.harness import copy_bundled_models, free_port, tree_cpu_s, wait_post_200  # noqa: E402

PATH = "/api/v1/models/iris.onnx/prediction"
BODY = '{"values": [2, 5, 1, 4]}'
LUA = f"""wrk.method = "POST"
wrk.body = '{BODY}'
wrk.headers["Content-Type"] = "application/json"
"""
TRANSPORT_CONNECTIONS = 16


def lua_for(body_path: Path, content_type: str, header_length: int | None = None) -> str:
    """A wrk script that POSTs the bytes of body_path (binary-safe) with the given headers."""
    extra = f'wrk.headers["Inference-Header-Content-Length"] = "{header_length}"\n' if header_length else ""
    return (f'wrk.method = "POST"\nlocal f = io.open("{body_path}", "rb")\nwrk.body = f:read("*all")\n'
            f'f:close()\nwrk.headers["Content-Type"] = "{content_type}"\n{extra}')


def pool_model() -> bytes:
    """[N, 3, 224, 224] -> GlobalAveragePool -> [N, 3]: almost no compute, a 602 kB input."""
    from onnx import TensorProto, helper
    graph = helper.make_graph(
        [helper.make_node("GlobalAveragePool", ["image"], ["pooled"]),
         helper.make_node("Flatten", ["pooled"], ["mean"])], "pool",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, [None, 3, 224, 224])],
        [helper.make_tensor_value_info("mean", TensorProto.FLOAT, [None, 3])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()


def transport_cases(work: Path) -> list[tuple[str, str, Path]]:
    """(label, path, wrk script) for the seed JSON and v2 binary paths on iris and a 224x224 image."""
    import json

    import numpy as np
    image = np.random.default_rng(0).random((1, 3, 224, 224), dtype=np.float32)
    cases = []

    def add(label: str, path: str, body: bytes, content_type: str, header_length: int | None = None) -> None:
        body_path = work / f"body-{len(cases)}.bin"
        body_path.write_bytes(body)
        script = work / f"case-{len(cases)}.lua"
        script.write_text(lua_for(body_path, content_type, header_length))
        cases.append((label, path, script))

    def v2_binary(name: str, array) -> tuple[bytes, int]:
        head = json.dumps({"inputs": [{"name": name, "shape": list(array.shape), "datatype": "FP32",
                                       "parameters": {"binary_data_size": array.nbytes}}],
                           "outputs": [{"name": "label" if name == "float_input" else "mean",
                                        "parameters": {"binary_data": True}}]}).encode()
        return head + array.tobytes(), len(head)

    iris = np.array([[2, 5, 1, 4]], np.float32)
    add("iris, seed JSON", PATH, BODY.encode(), "application/json")
    add("iris, v2 binary", "/v2/models/iris.onnx/infer", *_swap(v2_binary("float_input", iris)))
    add("1x3x224x224, seed JSON", "/api/v1/models/pool224.onnx/prediction",
        json.dumps({"values": image.tolist()}).encode(), "application/json")
    add("1x3x224x224, v2 binary", "/v2/models/pool224.onnx/infer", *_swap(v2_binary("image", image)))
    return cases


def _swap(pair: tuple[bytes, int]) -> tuple[bytes, str, int]:
    return pair[0], "application/octet-stream", pair[1]
MLSERVER_P99_MS = {16: 24.1, 64: 82.1}  # ../shared/peers.md, MLServer 1.7.1 default configuration


def wrk(url: str, connections: int, duration_s: float, script: Path) -> dict:
    """One wrk cell: req/s, p50 and p99 in ms, requests, and errors (non-2xx and socket errors)."""
    out = subprocess.run(["wrk", "-t", str(min(2, connections)), "-c", str(connections), "-d",
                          f"{max(1, round(duration_s))}s", "--timeout", "10s", "--latency", "-s", str(script), url],
                         capture_output=True, text=True, check=True, timeout=duration_s + 60).stdout
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    socket_errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)

    def ms(label: str) -> float:
        value, unit = re.search(rf"^\s+{label}%\s+([\d.]+)(us|ms|s)\s*$", out, re.M).groups()
        return float(value) * {"us": 1e-3, "ms": 1.0, "s": 1e3}[unit]
    return {"rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)), "p50": ms("50"), "p99": ms("99"),
            "requests": int(re.search(r"(\d+) requests in", out).group(1)),
            "errors": (int(errors.group(1)) if errors else 0)
            + (sum(int(g) for g in socket_errors.groups()) if socket_errors else 0)}


def start(argv: list[str], env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen(argv, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=dict(os.environ, PYTHONPATH=str(REPO), **(env or {})), start_new_session=True)


def stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def measure(argv: list[str], port: int, conns: list[int], duration_s: int, script: Path,
            cases: list[tuple[str, str, Path]] = ()) -> tuple[dict, dict]:
    """wrk at each connection count on the iris prediction, then each transport case at 16.

    Each cell also records the server's CPU microseconds per request (its whole process tree).
    """
    proc = start(argv)
    try:
        url = f"http://127.0.0.1:{port}{PATH}"
        wait_post_200(url, BODY.encode())
        wrk(url, 16, 2, script)  # warm-up: sessions loaded, connections made
        table = {}
        for c in conns:
            cpu_before = tree_cpu_s(proc.pid)
            table[c] = wrk(url, c, duration_s, script)
            table[c]["cpu_us"] = (tree_cpu_s(proc.pid) - cpu_before) / (table[c]["rps"] * duration_s) * 1e6
        transport = {}
        for label, path, case_script in cases:
            wrk(f"http://127.0.0.1:{port}{path}", TRANSPORT_CONNECTIONS, 1, case_script)
            transport[label] = wrk(f"http://127.0.0.1:{port}{path}", TRANSPORT_CONNECTIONS, duration_s,
                                   case_script)
        return table, transport
    finally:
        stop(proc)


def metrics_overhead(args: argparse.Namespace, conns: list[int], models: Path, script: Path) -> None:
    """Throughput with metrics on and off, alternating (on, off, on, off) to average out drift."""
    runs: dict[str, list[dict]] = {"on": [], "off": []}
    for label in ("on", "off", "on", "off"):
        port = free_port()
        metrics_port = "9150" if label == "on" else "0"
        table, _ = measure([sys.executable, "-m", "fractal", "serve", "--http-port", str(port), "--broker-port",
                            str(free_port()), "--model-dir", str(models), "--log-level", args.log_level,
                            "--metrics-port", metrics_port, "--grpc-port", "0"], port, conns, args.duration_s, script)
        runs[label].append(table)
    print(f"\nMetrics overhead: fractal serve, wrk {args.duration_s} s per cell, two runs each (req/s)\n")
    for c in conns:
        on = [r[c]["rps"] for r in runs["on"]]
        off = [r[c]["rps"] for r in runs["off"]]
        cpu_on = sum(r[c]["cpu_us"] for r in runs["on"]) / 2
        cpu_off = sum(r[c]["cpu_us"] for r in runs["off"]) / 2
        print(f"  {c:>3} conn: req/s on {' / '.join(f'{v:,.0f}' for v in on)}, off "
              f"{' / '.join(f'{v:,.0f}' for v in off)} -> {1 - sum(on) / sum(off):+.1%} of throughput; "
              f"server CPU {cpu_on:,.0f} vs {cpu_off:,.0f} us/request -> {cpu_on / cpu_off - 1:+.1%}")
    cost = subprocess.run([sys.executable, str(REPO / "bench" / "metrics_cost.py")], capture_output=True,
                          text=True, check=True).stdout
    total = float(re.search(r"total\s+([\d.]+) us", cost).group(1))
    cpu_off = sum(r[c]["cpu_us"] for r in runs["off"] for c in conns) / (2 * len(conns))
    print(f"\nMetric calls per request, timed alone (bench/metrics_cost.py):\n{cost}"
          f"  = {total / cpu_off:.1%} of the server's {cpu_off:,.0f} us CPU per request with metrics off "
          f"(target: <= 5 % of REST throughput)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration-s", type=int, default=10)
    parser.add_argument("--connections", default="1,16,64")
    parser.add_argument("--log-level", default="INFO", help="of fractal serve (INFO: a line per request)")
    parser.add_argument("--metrics-overhead", action="store_true",
                        help="only compare fractal serve with metrics on and off, alternating twice")
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        sys.exit("wrk is not installed: apt-get install wrk")
    conns = [int(c) for c in args.connections.split(",")]
    work = Path(tempfile.mkdtemp(prefix="fractal-http-bench-"))
    script = work / "post.lua"
    script.write_text(LUA)
    floor_port, our_port = free_port(), free_port()
    models = copy_bundled_models(work / "models")
    (models / "pool224.onnx").write_bytes(pool_model())
    if args.metrics_overhead:
        metrics_overhead(args, conns, models, script)
        return
    cases = transport_cases(work)
    floor, _ = measure([sys.executable, "-m", "gunicorn", "bench.floor_app:create_app()", "--bind",
                              f"127.0.0.1:{floor_port}", "--workers", "2", "--worker-class", "gthread",
                              "--threads", "4", "--log-level", "warning"], floor_port, conns, args.duration_s, script)
    ours, transport = measure([sys.executable, "-m", "fractal", "serve", "--http-port", str(our_port),
                               "--broker-port", str(free_port()), "--model-dir", str(models), "--grpc-port", "0",
                               "--log-level", args.log_level], our_port, conns, args.duration_s, script, cases)
    print(f"\nREST benchmark: POST {PATH} {BODY}, wrk {args.duration_s} s per cell, {os.cpu_count()} cores\n")
    print(f"{'server':44} " + " ".join(f"{f'{c} conn':>26}" for c in conns))
    print(f"{'':44} " + " ".join(f"{'req/s · p50 ms · p99 ms':>26}" for _ in conns))
    for label, table in (("floor: Falcon + gunicorn, ORT in-process", floor), ("FRACTAL (fractal serve)", ours)):
        cells = [f"{t['rps']:>9,.0f} · {t['p50']:5.2f} · {t['p99']:6.2f}" for t in (table[c] for c in conns)]
        print(f"{label:44} " + " ".join(f"{c:>26}" for c in cells))
    print("\nratios (target: >= 40 % of the floor's req/s at 16 and 64 connections, p99 below MLServer's)")
    for c in conns:
        line = f"  {c:>3} conn: {ours[c]['rps'] / floor[c]['rps']:6.1%} of the floor"
        if c in MLSERVER_P99_MS:
            line += f", p99 {ours[c]['p99']:.2f} ms vs MLServer {MLSERVER_P99_MS[c]} ms"
        errors = ours[c]["errors"] + floor[c]["errors"]
        print(line + (f", {errors} non-2xx!" if errors else ""))
    print(f"\nseed JSON vs Open Inference Protocol binary, {TRANSPORT_CONNECTIONS} connections "
          f"(req/s · p50 ms · p99 ms)")
    for label, t in transport.items():
        print(f"  {label:28} {t['rps']:>9,.0f} · {t['p50']:6.2f} · {t['p99']:7.2f}"
              + (f"  {t['errors']} non-2xx!" if t["errors"] else ""))
    for subject in ("iris", "1x3x224x224"):
        ratio = transport[f"{subject}, v2 binary"]["rps"] / transport[f"{subject}, seed JSON"]["rps"]
        print(f"  {subject}: v2 binary / seed JSON throughput = {ratio:.2f}x")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
