"""The lab's two-broker scenario: cut the active broker's host under steady load, restore it, time both.

    sudo python deploy/lab/lab.py failover      (or: sudo python bench/broker_failover.py)

Two broker hosts (broker, broker2), two worker hosts registered with both, a frontend host whose client
lists both (its current broker: the first). The active broker's link is cut: the frontend's client
finds it silent (ZMTP heartbeats, broker.client.LINK_TIMEOUT_S) and re-sends what it held to the other,
where the workers are already registered. Then the link comes back: the workers register with the
returning broker again, and the frontend keeps using the other one (it is now the spare).
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from lab import (
    BROKER2_URL,
    BROKER_URL,
    FRONT_URL,
    HEARTBEAT_S,
    LIVENESS,
    RECONNECT_MAX_S,
    REPO,
    Lab,
    live_workers,
    wait_until,
)

# Asks one broker (by URL) for its view, from the frontend's host: which workers it has.
STATUS = ("import json, sys; from broker.client import Client; c = Client(sys.argv[1], timeout_s=2); "
          "print(json.dumps(c.broker_status(timeout_s=1))); c.close()")


def broker_status(lab: Lab, url: str) -> dict:
    """The view of the broker at `url` (Client.broker_status); {} when it does not answer."""
    out = lab.exec_in("front", [sys.executable, "-c", STATUS, url], timeout_s=15).strip()
    try:
        return json.loads(out.splitlines()[-1]) or {} if out else {}
    except ValueError:
        return {}


def broker_workers(lab: Lab, url: str) -> int:
    """Workers registered with the broker at `url` for the models' service."""
    return broker_status(lab, url).get("broker", {}).get("services", {}).get("modelhost", {}).get("workers", 0)


def broker_served(lab: Lab, url: str) -> int:
    """Requests the broker at `url` has had answered by its workers (as it counts them)."""
    return sum(w.get("requests_served", 0) for w in broker_status(lab, url).get("workers", []))


def longest_gap_s(answered: list[float], start: float, end: float) -> float:
    """The longest time in [start, end] in which no request was answered."""
    inside = sorted(t for t in answered if start <= t <= end)
    return max((b - a for a, b in zip([start, *inside], [*inside, end], strict=True)), default=end - start)


def scenario(workdir: Path, rate: float = 40, duration_s: float = 24) -> dict:
    """Steady load through the frontend; cut the active broker's host, restore it; the figures."""
    both = f"{BROKER_URL},{BROKER2_URL}"
    with Lab(workdir) as lab:
        lab.start_broker("broker")
        lab.start_broker("broker2")
        lab.start_worker("w1", brokers=both)
        lab.start_worker("w2", brokers=both)
        lab.start_frontend(brokers=both)
        for url in (BROKER_URL, BROKER2_URL):
            wait_until(lambda url=url: broker_workers(lab, url) == 2, 60, f"two workers at {url}", 0.2)
        wait_until(lambda: live_workers(lab) == 2, 30, "the frontend to see two workers")
        out = workdir / "load.jsonl"
        load = lab.run("front", "load", [sys.executable, str(REPO / "deploy" / "lab" / "load.py"),
                                         f"{FRONT_URL}/api/v1/models/iris.onnx/prediction", "--rate", str(rate),
                                         "--duration-s", str(duration_s), "--out", str(out)])
        time.sleep(min(6.0, duration_s / 4))
        lab.cut("broker")
        t_cut = time.monotonic()
        time.sleep(min(6.0, duration_s / 4))
        lab.restore("broker")
        t_restore = time.monotonic()
        polls: list[float] = []  # how long each look takes: the resolution of restore_to_rejoined_s

        def rejoined() -> bool:
            started = time.monotonic()
            workers = broker_workers(lab, BROKER_URL)
            polls.append(time.monotonic() - started)
            return workers == 2
        t_rejoined = wait_until(rejoined, 30, "the workers to register with the restored broker", 0.05)
        load.wait(timeout=duration_s + 30)
        served = {"broker": broker_served(lab, BROKER_URL), "broker2": broker_served(lab, BROKER2_URL)}
        rows = [json.loads(line) for line in out.read_text().splitlines()]
    answered = [r["at"] + r["ms"] / 1000 for r in rows if r["status"] == 200]
    t_first, t_last = min(answered), max(answered)
    failures = [r for r in rows if r["status"] != 200]
    return {
        "requests": len(rows), "failures": len(failures), "failed": failures[:10],
        "heartbeat_window_s": HEARTBEAT_S * LIVENESS,
        "usual_longest_gap_s": round(longest_gap_s(answered, t_first, t_cut), 3),
        "cut_stall_s": round(longest_gap_s(answered, t_cut, t_restore), 3),
        "restore_longest_gap_s": round(longest_gap_s(answered, t_restore, t_last), 3),
        "restore_to_rejoined_s": round(t_rejoined - t_restore, 3),
        "served_after_restore": served,  # the frontend stays with broker2, the restored one is its spare
        "heartbeat_s": HEARTBEAT_S, "reconnect_max_s": RECONNECT_MAX_S,
        "slowest_poll_s": round(lab.slowest_poll_s, 3), "slowest_status_s": round(max(polls), 3),
    }
