"""Two brokers, one host cut: the active broker's host loses its link under steady load, then gets it back.

    sudo python bench/broker_failover.py [--rate 40] [--duration-s 24]

Runs deploy/lab/failover.py's scenario in the network-namespace lab (root: it creates namespaces on
a private bridge, never touching the machine's own network): two broker hosts, two worker hosts
registered with both, a frontend host whose client lists both, steady load through the frontend.
Prints requests, failures, the stall after the cut (the longest time without an answer), the usual
longest gap before it, the longest gap while the broker comes back, and how long the workers take to
register with it again. Target: 0 failed, and the stall within 2 heartbeat windows.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "deploy" / "lab"))

import failover  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=40, help="requests per second through the frontend")
    parser.add_argument("--duration-s", type=float, default=24)
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("the lab creates network namespaces: run it as root", file=sys.stderr)
        return 2
    result = failover.scenario(Path(tempfile.mkdtemp(prefix="fractal-broker-failover-")), args.rate,
                               args.duration_s)
    print(json.dumps(result, indent=2))
    print(f"target: 0 failed, stall <= 2 heartbeat windows ({2 * result['heartbeat_window_s']:g} s) -> "
          f"{result['failures']} failed of {result['requests']}; stall {result['cut_stall_s']:.2f} s "
          f"(usual longest gap {result['usual_longest_gap_s']:.2f} s); the restored broker had its workers "
          f"back in {result['restore_to_rejoined_s']:.2f} s, longest gap meanwhile "
          f"{result['restore_longest_gap_s']:.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
