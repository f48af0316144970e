"""Process helpers shared by the tests and bench/: free ports, bounded waits, the /proc process table,
and FRACTAL's components started as subprocesses.

One module, so a port or process helper is written once (issue 14, item 6). Fixtures stay in
tests/conftest.py and use these; bench/ scripts import them as `tests.harness` (they put the
repository on sys.path). Nothing here imports pytest at module level: bench/ runs without it.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

REPO = Path(__file__).resolve().parent.parent
BUNDLED = REPO / "worker" / "models"
# Fast heartbeats, so failure detection takes about a second, with room for a loaded machine: a
# starved process must miss LIVENESS beats in a row before its peer gives up on it.
HEARTBEAT_S, LIVENESS = 0.25, 4
LIVENESS_WINDOW_S = HEARTBEAT_S * LIVENESS
HEARTBEAT = ["--heartbeat-interval-s", str(HEARTBEAT_S), "--heartbeat-liveness", str(LIVENESS)]
# No metrics ports (tests that want /metrics pass free ones); status polls only where a test waits for them.
QUIET_BROKER = ["--metrics-port", "0", "--status-interval-s", "3600"]
QUIET_WORKER = ["--metrics-port", "0"]


# -- ports and waits -------------------------------------------------------------------------------

def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_ports(count: int) -> int:
    """The first of `count` consecutive free ports (fractal serve gives workers base + 1, + 2, ...)."""
    for _ in range(50):
        base = free_port()
        if base + count < 65536 and all(_port_free(base + i) for i in range(1, count)):
            return base
    raise RuntimeError(f"no {count} consecutive free ports")


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def tcp_open(url: str) -> bool:
    """True when something accepts TCP connections at tcp://host:port."""
    host, _, port = url.removeprefix("tcp://").rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=1):
            return True
    except OSError:
        return False


def wait_for(predicate: Callable[[], bool], timeout_s: float, what: str, interval_s: float = 0.05) -> None:
    """Until `predicate()` holds; AssertionError naming `what` after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval_s)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


def wait_post_200(url: str, body: bytes, proc: subprocess.Popen | None = None, timeout_s: float = 60) -> None:
    """Until a JSON POST of `body` to `url` answers 200 (an HTTP server is up and serving); RuntimeError
    when `proc` exits first or `timeout_s` passes."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{url}: the server exited with {proc.returncode}")
        try:
            req = urllib.request.Request(url, data=body, method="POST", headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(req, timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"{url} did not answer 200 within {timeout_s:.0f} s")


# -- the process table (Linux /proc) ---------------------------------------------------------------

TICK_S = 1 / os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class ProcInfo:
    """One process as /proc/PID/stat and cmdline show it."""
    ppid: int
    state: str      # R, S, Z, ...
    cpu_s: float    # utime + stime so far
    argv: tuple[str, ...]

    @property
    def cmdline(self) -> str:
        return " ".join(self.argv)


def _stat_fields(pid: int) -> list[str]:
    """Fields 3 on of /proc/PID/stat (after the command name, which may hold spaces and parentheses)."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def cpu_s(pid: int) -> float:
    """utime + stime of one process, in seconds (fields 14 and 15 of /proc/PID/stat)."""
    fields = _stat_fields(pid)
    return (int(fields[11]) + int(fields[12])) * TICK_S


def sched_s(pid: int, tid: int | None = None) -> tuple[float, float]:
    """(seconds on a CPU, seconds runnable but waiting for one) of thread `tid` (default: the process's
    main thread) so far, from /proc/PID/task/TID/schedstat: the wait is what other load cost it."""
    on_cpu_ns, waiting_ns, _slices = Path(f"/proc/{pid}/task/{tid or pid}/schedstat").read_text().split()
    return int(on_cpu_ns) / 1e9, int(waiting_ns) / 1e9


def process_table() -> dict[int, ProcInfo]:
    """Every process visible now; one that exits during the walk is left out."""
    table = {}
    for entry in Path("/proc").glob("[0-9]*"):
        pid = int(entry.name)
        try:
            fields = _stat_fields(pid)
            argv = (entry / "cmdline").read_bytes().rstrip(b"\0").split(b"\0")
        except (OSError, IndexError):
            continue
        table[pid] = ProcInfo(int(fields[1]), fields[0], (int(fields[11]) + int(fields[12])) * TICK_S,
                              tuple(a.decode(errors="replace") for a in argv if a))
    return table


def descendants(root: int, table: dict[int, ProcInfo] | None = None) -> list[int]:
    """Every process under `root` (children, theirs, ...), not `root` itself."""
    table = process_table() if table is None else table
    children: dict[int, list[int]] = {}
    for pid, info in table.items():
        children.setdefault(info.ppid, []).append(pid)
    found, frontier = [], [root]
    while frontier:
        kids = children.get(frontier.pop(), [])
        found.extend(kids)
        frontier.extend(kids)
    return found


def tree_cpu_s(root: int) -> float:
    """CPU seconds (user + system) used so far by `root` and all its descendants."""
    table = process_table()
    return sum(table[pid].cpu_s for pid in [root, *descendants(root, table)] if pid in table)


def alive(pid: int) -> bool:
    """The process exists and is no zombie."""
    try:
        return _stat_fields(pid)[0] != "Z"
    except (OSError, IndexError):
        return False


def child_pids(root: int, module: str) -> list[int]:
    """Live `python -m <module>` processes whose parent is `root` (fractal serve's broker, workers)."""
    return sorted(pid for pid, info in process_table().items()
                  if info.ppid == root and module in info.argv[:3] and info.state != "Z")


# -- components as subprocesses --------------------------------------------------------------------

class Processes:
    """Starts components as subprocesses with logs in a directory; stop_all() ends every one of them."""

    def __init__(self, tmp_path: Path):
        self.tmp_path = tmp_path
        self.procs: list[subprocess.Popen] = []

    def start(self, name: str, argv: list[str], env: dict | None = None) -> subprocess.Popen:
        log = open(self.tmp_path / f"{name}-{len(self.procs)}.log", "wb")
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, cwd=self.tmp_path,
                                env=dict(os.environ, **(env or {})), start_new_session=True)
        log.close()
        proc.log_path = log.name  # type: ignore[attr-defined]  # where a failing test finds its output
        self.procs.append(proc)
        return proc

    def broker(self, url: str, *flags: str) -> subprocess.Popen:
        """A broker, returned once it listens: a loaded machine can take seconds to start Python."""
        proc = self.start("broker", [sys.executable, "-m", "broker", "--bind", url, *HEARTBEAT, *QUIET_BROKER,
                                     *flags])
        wait_for(lambda: proc.poll() is not None or tcp_open(url), 60, f"the broker on {url}")
        assert proc.poll() is None, Path(proc.log_path).read_text(errors="replace")  # type: ignore[attr-defined]
        return proc

    def worker(self, url: str, model_dir: Path, *flags: str) -> subprocess.Popen:
        return self.start("worker", [sys.executable, "-m", "worker", "--connect", url,
                                     "--model-dir", str(model_dir), *HEARTBEAT, *QUIET_WORKER, *flags])

    def stop_all(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


@dataclass(frozen=True)
class Cluster:
    """A broker and its workers over a model directory (the `cluster` fixture)."""
    url: str                        # the broker's tcp:// endpoint
    workers: list[subprocess.Popen]
    model_dir: Path


def copy_bundled_models(target: Path) -> Path:
    """`target` (made) holding a copy of the bundled models and their sidecars."""
    target.mkdir()
    for item in BUNDLED.iterdir():
        if item.name.endswith((".onnx", ".onnx.json")):
            shutil.copyfile(item, target / item.name)
    return target


def start_frontend(procs: Processes, broker_url: str, **env: str) -> str:
    """gunicorn running the frontend alone, pointed at `broker_url`; returns its base URL."""
    port = free_port()
    procs.start("frontend", [sys.executable, "-m", "fractal", "frontend", "--bind", f"127.0.0.1:{port}",
                             "--workers", "1"],
                env={"FRACTAL_FRONTEND_BROKER": broker_url, **env})
    base = f"http://127.0.0.1:{port}"

    def up() -> bool:
        try:
            with urllib.request.urlopen(base + "/", timeout=1):
                return True
        except OSError:
            return False
    wait_for(up, 60, "gunicorn")
    return base


class Served:
    """`fractal serve` on free ports, logging to a file (a pipe nobody drains would block it)."""

    def __init__(self, workdir: Path, env: dict | None = None, *flags: str):
        self.http_port, self.broker_port, self.grpc_port = free_port(), free_port(), free_port()
        self.grpc_target = f"127.0.0.1:{self.grpc_port}"
        self.pool = workdir / "pool"
        self.log_path = workdir / "serve.log"
        self.base = f"http://127.0.0.1:{self.http_port}"
        self.broker_url = f"tcp://127.0.0.1:{self.broker_port}"
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "fractal", "serve", "--http-port", str(self.http_port),
                 "--broker-port", str(self.broker_port), "--grpc-port", str(self.grpc_port),
                 # NOTE: a later --metrics-port (or --grpc-port) in flags wins
                 "--model-dir", str(self.pool), "--metrics-port", "0", *flags],
                cwd=workdir, stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ, **(env or {})))
        wait_for(lambda: "ready:" in self.log() or self.proc.poll() is not None, 60, "fractal serve")
        assert self.proc.poll() is None, self.log()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        try:
            return self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise


# -- talking to them -------------------------------------------------------------------------------

@contextlib.contextmanager
def dealer(url: str) -> Iterator[Any]:
    """A bare DEALER socket on `url`, for frames our client would never send."""
    import zmq
    ctx = zmq.Context()
    try:
        sock = ctx.socket(zmq.DEALER)
        sock.linger = 0
        sock.connect(url)
        yield sock
    finally:
        ctx.destroy(linger=0)


def nodes_answering(client: Any, count: int) -> set[str]:
    """Node ids of the workers that answer `count` echoes through `client` (a broker.client.Client)."""
    from broker.errors import NoWorkerAvailable, Timeout
    try:
        replies = client.call_many([("echo", {"data": i}) for i in range(count)], timeout_s=5,
                                   return_exceptions=True)
    except (NoWorkerAvailable, Timeout):  # not up yet: the caller waits and asks again
        return set()
    return {r["node"] for r in replies if isinstance(r, dict)}


def busy_workers(url: str) -> int:
    """Workers the broker has a request out to right now (its own view, from mmi.workers)."""
    from broker.client import Client
    with Client(url, timeout_s=5) as client:
        status = client.broker_status(timeout_s=5) or {"workers": []}
    return sum(w["state"] == "busy" for w in status["workers"])


def wait_busy(url: str, n: int = 1, timeout_s: float = 20) -> None:
    """Until the broker has handed requests to n workers: no sleep that guesses when dispatch happened."""
    wait_for(lambda: busy_workers(url) >= n, timeout_s, f"{n} busy workers")


def wait_workers(url: str, n: int, timeout_s: float = 60) -> None:
    """Until n distinct workers answer echoes (the broker's LRU spreads sequential calls)."""
    from broker.client import Client
    with Client(url, timeout_s=5) as client:
        wait_for(lambda: len(nodes_answering(client, 2 * n)) >= n, timeout_s, f"{n} workers to register")


def metered_workers(procs: "Processes", url: str, model_dir: Path, n: int) -> list[int]:
    """n workers on `url`, each exporting metrics on a port of its own; their ports, once all registered."""
    ports = [free_port() for _ in range(n)]
    for port in ports:
        procs.worker(url, model_dir, "--metrics-port", str(port))
    wait_workers(url, n)
    return ports


def debian_tool(command: str, package: str) -> str:
    """Path of `command`, installing Debian's `package` when it is missing (root only).

    The tests that need it fail, not skip, when it cannot be had: the checks are the point.
    """
    import pytest
    if shutil.which(command) is None:
        if os.geteuid() != 0:
            pytest.fail(f"{command} missing; install Debian's '{package}' package (needs root)")
        for argv in (["apt-get", "update", "-qq"],
                     ["apt-get", "install", "-y", "-qq", "--no-install-recommends", package]):
            subprocess.run(argv, check=True, capture_output=True, timeout=600,
                           env=dict(os.environ, DEBIAN_FRONTEND="noninteractive"))
    path = shutil.which(command)
    if path is None:
        pytest.fail(f"{command} still missing after installing Debian's '{package}'")
    return path


class Clock:
    """time.monotonic for the broker module: moves only when the test says so."""

    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now

    def advance(self, seconds: float) -> float:
        self.now += seconds
        return self.now
