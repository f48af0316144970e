"""Multi-host lab: Linux network namespaces as hosts on a private bridge, the real processes over TCP.

    sudo python deploy/lab/lab.py scenario   # cut a worker host's link under load, restore it, add a host
    sudo python deploy/lab/lab.py failover   # two brokers: cut the active one's host under load, restore it
    sudo python deploy/lab/lab.py bench      # throughput with 1, 2 and 3 worker hosts, CPU-pinned

Hosts (namespaces "frlab<pid>-<name>") sit on 10.77.0.0/24 behind a bridge that lives in a namespace of its
own ("frlab<pid>-net"), so the machine's own network is never touched. The lab tears everything down on
exit, on failure and on Ctrl-C; `python deploy/lab/lab.py clean` removes leftovers of a killed run.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[2]
FAMILY = "frlab"                      # every lab namespace starts with it (`clean` removes them all)
PREFIX = f"{FAMILY}{os.getpid()}"     # this run's own, so two runs on one machine never collide
NET = f"{PREFIX}-net"
SUBNET = "10.77.0"
ADDRESSES = {"broker": 1, "front": 2, "broker2": 3, "w1": 11, "w2": 12, "w3": 13}
HEARTBEAT_S, LIVENESS = 0.5, 3
STATUS_INTERVAL_S = 0.5  # the broker learns what a (re)registered worker holds one interval after READY
RECONNECT_MAX_S = 1.0
BROKER_URL = f"tcp://{SUBNET}.1:5555"
BROKER2_URL = f"tcp://{SUBNET}.3:5555"  # the second broker of the failover scenario, on host "broker2"
FRONT_URL = f"http://{SUBNET}.2:8002"


def sh(*argv: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(argv, check=check, capture_output=True, text=True)


def namespaces(prefix: str = PREFIX) -> list[str]:
    out = sh("ip", "netns", "list", check=False).stdout
    return [line.split()[0] for line in out.splitlines() if line.startswith(prefix)]


def clean(prefix: str = PREFIX) -> None:
    """Kill every process in the lab's namespaces, then delete them (the bridge and links go too)."""
    for ns in namespaces(prefix):
        for pid in sh("ip", "netns", "pids", ns, check=False).stdout.split():
            try:
                os.kill(int(pid), signal.SIGKILL)
            except ProcessLookupError:
                pass
    for ns in namespaces(prefix):
        sh("ip", "netns", "delete", ns, check=False)


class Lab:
    """The namespaces, links and processes of one lab run; a context manager that always cleans up."""

    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.procs: dict[str, subprocess.Popen] = {}
        self.model_dir = workdir / "models"
        self.slowest_poll_s = 0.0  # the longest status poll: the resolution of every timing measured

    def __enter__(self) -> "Lab":
        clean()
        sh("ip", "netns", "add", NET)
        sh("ip", "-n", NET, "link", "add", "br0", "type", "bridge")
        sh("ip", "-n", NET, "link", "set", "br0", "up")
        self.model_dir.mkdir(parents=True, exist_ok=True)
        for item in (REPO / "worker" / "models").iterdir():
            if item.name.endswith((".onnx", ".onnx.json")):
                shutil.copyfile(item, self.model_dir / item.name)
        return self

    def __exit__(self, *exc: object) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs.values():
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
        clean()

    def add_host(self, name: str) -> str:
        ns, address = f"{PREFIX}-{name}", f"{SUBNET}.{ADDRESSES[name]}"
        sh("ip", "netns", "add", ns)
        sh("ip", "link", "add", f"{name}-br", "netns", NET, "type", "veth", "peer", "name", "eth0", "netns", ns)
        sh("ip", "-n", NET, "link", "set", f"{name}-br", "master", "br0", "up")
        sh("ip", "-n", ns, "addr", "add", f"{address}/24", "dev", "eth0")
        sh("ip", "-n", ns, "link", "set", "eth0", "up")
        sh("ip", "-n", ns, "link", "set", "lo", "up")
        return address

    def cut(self, name: str) -> None:
        sh("ip", "-n", NET, "link", "set", f"{name}-br", "down")

    def restore(self, name: str) -> None:
        sh("ip", "-n", NET, "link", "set", f"{name}-br", "up")

    def run(self, host: str, name: str, argv: list[str], cpu: int | None = None,
            env: dict | None = None) -> subprocess.Popen:
        pin = ["taskset", "-c", str(cpu)] if cpu is not None else []
        log = open(self.workdir / f"{name}.log", "wb")
        proc = subprocess.Popen(["ip", "netns", "exec", f"{PREFIX}-{host}", *pin, *argv], stdout=log,
                                stderr=subprocess.STDOUT, cwd=REPO,
                                env=dict(os.environ, PYTHONPATH=str(REPO), **(env or {})))
        log.close()
        self.procs[name] = proc
        return proc

    def exec_in(self, host: str, argv: list[str], timeout_s: float = 30) -> str:
        return subprocess.run(["ip", "netns", "exec", f"{PREFIX}-{host}", *argv], capture_output=True,
                              text=True, timeout=timeout_s, cwd=REPO,
                              env=dict(os.environ, PYTHONPATH=str(REPO))).stdout

    # -- the parts ----------------------------------------------------------------------------------

    def start_broker(self, host: str = "broker") -> None:
        self.add_host(host)
        self.run(host, host, [sys.executable, "-m", "broker", "--bind", f"tcp://{SUBNET}.{ADDRESSES[host]}:5555",
                                      "--heartbeat-interval-s", str(HEARTBEAT_S), "--heartbeat-liveness",
                                      str(LIVENESS), "--status-interval-s", str(STATUS_INTERVAL_S),
                                      "--metrics-port", "0", "--placement"])

    def start_worker(self, host: str, cpu: int | None = None, brokers: str = BROKER_URL) -> None:
        if f"{PREFIX}-{host}" not in namespaces():
            self.add_host(host)
        self.run(host, f"worker-{host}", [
            sys.executable, "-m", "worker", "--connect", brokers, "--model-dir", str(self.model_dir),
            "--heartbeat-interval-s", str(HEARTBEAT_S), "--heartbeat-liveness", str(LIVENESS),
            "--reconnect-max-s", str(RECONNECT_MAX_S), "--metrics-port", "0", "--no-log-requests"], cpu=cpu)

    def start_frontend(self, brokers: str = BROKER_URL) -> None:
        self.add_host("front")
        self.run("front", "frontend", [sys.executable, "-m", "fractal", "frontend", "--bind", f"{SUBNET}.2:8002",
                                       "--workers", "1"],
                 env={"FRACTAL_FRONTEND_BROKER": brokers, "FRACTAL_FRONTEND_LOG_LEVEL": "WARNING",
                      "FRACTAL_FRONTEND_TIMEOUT_S": "10"})

    def status(self) -> dict:
        started = time.monotonic()
        out = self.exec_in("front", ["curl", "-s", "--max-time", "3", f"{FRONT_URL}/api/v1/status"], timeout_s=5)
        # NOTE: every timing below is seen through these polls; a loaded machine makes them slower
        self.slowest_poll_s = max(self.slowest_poll_s, time.monotonic() - started)
        try:
            return json.loads(out)
        except ValueError:
            return {"broker": {"up": False}, "workers": []}

    def served_by_host(self) -> dict[str, int]:
        """requests_served per worker host. `ip netns exec` and taskset exec in place, so the pid in a
        worker's node id (host-pid-suffix) is the pid of the process the lab started."""
        hosts = {proc.pid: name.removeprefix("worker-") for name, proc in self.procs.items()
                 if name.startswith("worker-")}
        served: dict[str, int] = {}
        for w in self.status().get("workers", []):
            host = hosts.get(int(w["node"].rsplit("-", 2)[1])) if w.get("node") else None
            if host:
                served[host] = served.get(host, 0) + w["requests_served"]
        return served


def wait_until(predicate, timeout_s: float, what: str, interval_s: float = 0.05) -> float:
    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        if predicate():
            return time.monotonic()
        time.sleep(interval_s)
    raise RuntimeError(f"timed out after {timeout_s} s waiting for {what}")


def live_workers(lab: Lab) -> int:
    return lab.status().get("broker", {}).get("services", {}).get("modelhost", {}).get("workers", 0)


def holders(lab: Lab, model: str) -> int:
    """Workers whose last status says they hold `model`."""
    return sum(model in (w.get("models_resident") or []) for w in lab.status().get("workers", []))


def identities(lab: Lab) -> dict[str, int]:
    """Broker-side worker identity -> requests served (a re-registered worker gets a new identity)."""
    return {w["identity"]: w["requests_served"] for w in lab.status().get("workers", [])}


def new_worker_takes_load(lab: Lab, before: set[str], timeout_s: float, what: str) -> tuple[float, float]:
    """Times (registered, first request served) of worker identities not in `before`."""
    def fresh() -> dict[str, int]:
        return {i: served for i, served in identities(lab).items() if i not in before}
    t_registered = wait_until(lambda: bool(fresh()), timeout_s, f"{what} to register", interval_s=0.02)
    t_first = wait_until(lambda: any(v > 0 for v in fresh().values()), timeout_s, f"{what} to take requests",
                         interval_s=0.02)
    return t_registered, t_first


HEAVY = """
import json, sys, threading, time
import numpy as np
from broker.client import Client
url, calls, rows = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
x = np.full((rows, 256), 1 / 256, np.float32)
clients = [Client(url, timeout_s=60) for _ in range(calls)]
errors, took = [], []
def call(client):
    started = time.monotonic()
    try:
        client.predict("compute.onnx", {"x": x})
    except Exception as exc:
        errors.append(repr(exc))
    took.append(time.monotonic() - started)
threads = [threading.Thread(target=call, args=(c,)) for c in clients]
started_at = time.monotonic()
for t in threads:
    t.start()
for t in threads:
    t.join()
print(json.dumps({"started_at": started_at, "ended_at": time.monotonic(), "longest_s": max(took),
                  "errors": errors[:3]}))
"""
HEAVY_ROWS = 4096  # with HEAVY_LAYERS, about 0.4 s per call on this 2-core machine: far past placement_wait_s
HEAVY_LAYERS = 128  # for twelve calls, one worker computes for seconds


def heavy(lab: Lab, calls: int, name: str) -> Callable[[], dict]:
    """`calls` concurrent compute.onnx calls from the front host, each on a client socket of its own (the
    AsyncClient would pack them into one message, which one worker takes). Starts them and returns a
    function that waits for the end: {"started_at", "ended_at" (time.monotonic(), machine-wide),
    "longest_s", "errors"}."""
    proc = lab.run("front", name, [sys.executable, "-c", HEAVY, BROKER_URL, str(calls), str(HEAVY_ROWS)])

    def done() -> dict:
        proc.wait(timeout=120)
        out = (lab.workdir / f"{name}.log").read_text()
        try:
            return json.loads(out.strip().splitlines()[-1])
        except (ValueError, IndexError):
            raise RuntimeError(f"{name} failed: {out[-2000:]}") from None
    return done


def scenario(workdir: Path, rate: float = 40, duration_s: float = 26) -> dict:
    """Steady load; cut w1's link, restore it, add w3, which takes load once a burst keeps the others busy
    (the broker's placement: docs/protocol.md); returns the timings and the failures."""
    with Lab(workdir) as lab:
        (lab.model_dir / "compute.onnx").write_bytes(compute_model(layers=HEAVY_LAYERS))
        lab.start_broker()
        lab.start_worker("w1")
        lab.start_worker("w2")
        lab.start_frontend()
        wait_until(lambda: live_workers(lab) == 2, 30, "two workers")
        # Twelve calls at once: one worker loads compute.onnx, the other loads it once the queued calls have
        # waited placement_wait_s for the first: both hold it, as a model under load would be.
        warm = heavy(lab, 12, "warm")()
        if warm["errors"]:
            raise RuntimeError(f"the compute.onnx warm-up failed: {warm}")
        wait_until(lambda: holders(lab, "compute.onnx") == 2, 10, "w1 and w2 to hold compute.onnx")
        out = workdir / "load.jsonl"
        load = lab.run("front", "load", [sys.executable, str(REPO / "deploy" / "lab" / "load.py"),
                                         f"{FRONT_URL}/api/v1/models/iris.onnx/prediction", "--rate", str(rate),
                                         "--duration-s", str(duration_s), "--out", str(out)])
        t0 = time.monotonic()
        time.sleep(4)
        lab.cut("w1")
        t_cut = time.monotonic()
        t_dead = wait_until(lambda: live_workers(lab) == 1, 10, "the broker to declare w1 dead", 0.02)
        time.sleep(3)
        before = set(identities(lab))
        lab.restore("w1")
        t_restore = time.monotonic()
        # w1 may hold no iris (one worker serves 40 calls a second; placement keeps them on one holder):
        # twelve heavy calls at once show it back in use, as the holder of compute.onnx (once its first status
        # poll says so) or as the idle worker past placement_wait_s.
        t_back = wait_until(lambda: bool(set(identities(lab)) - before), 15,
                            "w1 to register after the link came back", 0.02)
        rejoin_done = heavy(lab, 12, "rejoin")
        t_w1_load = wait_until(lambda: any(v > 0 for i, v in identities(lab).items() if i not in before),
                               15, "w1 to take requests after the link came back", 0.02)
        rejoin = rejoin_done()
        time.sleep(2)
        before = set(identities(lab))
        lab.start_worker("w3")
        wait_until(lambda: len(identities(lab)) > len(before), 20, "a third worker host to register", 0.02)
        # Light load (40 iris calls a second, well within one worker): w1 and w2 hold iris and are idle
        # most of the time, so placement gives w3 nothing to load; a busy moment past placement_wait_s
        # on both at once may hand it a call.
        time.sleep(2)
        light_w3 = sum(v for i, v in identities(lab).items() if i not in before)
        light_requests = 2 * rate
        # Above two workers' capacity: 12 heavy calls at once keep w1 and w2 busy for 6 of their calls
        # (1.5 s or more), the queued ones wait placement_wait_s (0.5 s), then w3 takes them (and iris
        # calls queued behind busy holders).
        burst_done = heavy(lab, 12, "burst")
        t_w3_load = wait_until(lambda: any(v > light_w3 for i, v in identities(lab).items() if i not in before),
                               20, "the third worker host to take load under the burst", 0.02)
        burst = burst_done()
        load.wait(timeout=duration_s + 30)
        rows = [json.loads(line) for line in out.read_text().splitlines()]
    failures = [r for r in rows if r["status"] != 200]
    return {
        "requests": len(rows), "failures": len(failures), "failed": failures[:10],
        "liveness_window_s": HEARTBEAT_S * LIVENESS,
        "cut_to_declared_dead_s": round(t_dead - t_cut, 3),
        "restore_to_reregistered_s": round(t_back - t_restore, 3),
        "rejoin_calls_to_first_request_s": round(t_w1_load - rejoin["started_at"], 3),
        "rejoin_first_request_after_calls_ended_s": round(t_w1_load - rejoin["ended_at"], 3),
        "rejoin_longest_call_s": round(rejoin["longest_s"], 3), "rejoin_errors": rejoin["errors"],
        "third_host_served_under_light_load": light_w3, "light_load_requests": light_requests,
        "burst_to_third_host_first_request_s": round(t_w3_load - burst["started_at"], 3),
        "burst_first_request_after_calls_ended_s": round(t_w3_load - burst["ended_at"], 3),
        "burst_longest_call_s": round(burst["longest_s"], 3), "burst_errors": burst["errors"],
        "heartbeat_s": HEARTBEAT_S, "reconnect_max_s": RECONNECT_MAX_S, "cut_at_s": round(t_cut - t0, 2),
        "slowest_poll_s": round(lab.slowest_poll_s, 3),
    }


THROUGHPUT = """
import asyncio, json, sys, time
import numpy as np
from broker.client import AsyncClient
url, seconds = sys.argv[1], float(sys.argv[2])
x = np.random.default_rng(0).random((64, 256), dtype=np.float32)
async def main():
    async with AsyncClient(url, timeout_s=60) as c:
        for _ in range(20):
            await c.predict("compute.onnx", {"x": x})
        done, deadline = 0, time.monotonic() + seconds
        async def loop():
            nonlocal done
            while time.monotonic() < deadline:
                await c.predict("compute.onnx", {"x": x})
                done += 1
        started = time.monotonic()
        await asyncio.gather(*(loop() for _ in range(64)))
        print(json.dumps({"rps": done / (time.monotonic() - started)}))
asyncio.run(main())
"""


def compute_model(layers: int = 16, width: int = 256) -> bytes:
    """A compute-bound MLP: [N, 256] through 16 MatMul+Relu layers (about 4 ms for 64 rows, 1 thread)."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper
    rng = np.random.default_rng(0)
    nodes, inits, last = [], [], "x"
    for i in range(layers):
        inits.append(numpy_helper.from_array((rng.random((width, width), dtype=np.float32) - 0.5) / 8, f"w{i}"))
        nodes += [helper.make_node("MatMul", [last, f"w{i}"], [f"m{i}"]),
                  helper.make_node("Relu", [f"m{i}"], [f"r{i}"])]
        last = f"r{i}"
    nodes.append(helper.make_node("Identity", [last], ["y"]))
    graph = helper.make_graph(nodes, "compute", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, width])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, width])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()


def bench(workdir: Path, seconds: float = 10) -> dict[int, float]:
    """Direct-client throughput (64 in flight) on a compute-bound model with 1, 2 and 3 worker hosts.

    Each worker host is pinned to one core (w1: 1, w2: 0, w3: 1): on a 2-core machine the third host
    shares a core, which is what the figure shows.
    """
    results = {}
    for hosts, cpus in ((1, [1]), (2, [1, 0]), (3, [1, 0, 1])):
        with Lab(workdir / f"hosts-{hosts}") as lab:
            (lab.model_dir / "compute.onnx").write_bytes(compute_model())
            lab.start_broker()
            for i, cpu in enumerate(cpus):
                lab.start_worker(f"w{i + 1}", cpu=cpu)
            lab.add_host("front")  # the client's host: the direct client runs there, no frontend
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                out = lab.exec_in("front", [sys.executable, "-c", "import sys; from broker.client import Client; "
                                            f"c = Client('{BROKER_URL}', timeout_s=2); "
                                            f"print(len({{c.echo(i)['node'] for i in range({2 * hosts})}}))"])
                if out.strip() == str(hosts):
                    break
                time.sleep(0.3)
            out = lab.exec_in("front", [sys.executable, "-c", THROUGHPUT, BROKER_URL, str(seconds)],
                              timeout_s=seconds + 60)
            results[hosts] = json.loads(out.strip().splitlines()[-1])["rps"]
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["scenario", "failover", "bench", "clean"])
    parser.add_argument("--workdir", default=None)
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("the lab creates network namespaces: run it as root", file=sys.stderr)
        return 2
    if args.command == "clean":
        clean(FAMILY)  # every lab's leftovers, not only this process's
        return 0
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="fractal-lab-"))
    if args.command == "scenario":
        print(json.dumps(scenario(workdir), indent=2))
    elif args.command == "failover":
        import failover  # NOTE: it imports this module: load it only when asked
        print(json.dumps(failover.scenario(workdir), indent=2))
    else:
        results = bench(workdir)
        for hosts, rps in results.items():
            print(f"{hosts} worker host(s): {rps:8.1f} req/s  ({rps / results[1]:.2f}x one host)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
