"""Child processes of `fractal serve`: start, wait until ready, restart crashed ones, stop in order."""
from __future__ import annotations

import logging
import os
import signal
import subprocess
import time
from dataclasses import dataclass

from broker.runner import die_with_parent

log = logging.getLogger(__name__)

STABLE_S = 3.0        # a child that lived this long had started and served: not a crash loop
MAX_BACKOFF_S = 10.0


def next_backoff_s(previous_s: float, lived_s: float) -> float:
    """The wait before restarting a child that died after `lived_s`: 0.2 s, doubling up to
    MAX_BACKOFF_S while it keeps dying within STABLE_S of starting; none once it ran longer."""
    return min(max(previous_s * 2, 0.2), MAX_BACKOFF_S) if lived_s < STABLE_S else 0.0


@dataclass
class Child:
    name: str
    argv: list[str]
    env: dict[str, str]
    restart: bool = False
    proc: subprocess.Popen | None = None
    started_at: float = 0.0
    backoff_s: float = 0.0       # wait before the next restart; grows while the child crash-loops
    restart_at: float | None = None

    def start(self) -> None:
        # NOTE: die_with_parent: if `fractal serve` itself is SIGKILLed, the kernel still ends its children.
        self.proc = subprocess.Popen(self.argv, env=self.env, preexec_fn=die_with_parent, start_new_session=True)
        self.started_at, self.restart_at = time.monotonic(), None
        log.info("started %s (pid %d)", self.name, self.proc.pid)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


class Supervisor:
    """Owns the children; `stop()` ends them in reverse start order and never leaves one behind."""

    def __init__(self) -> None:
        self.children: list[Child] = []

    def start(self, child: Child) -> Child:
        child.start()
        self.children.append(child)
        return child

    def check(self, restart_all: bool = False) -> str | None:
        """Restart crashed children; returns the name of a vital one that died and is not restarted.

        A worker (`restart`) is always restarted: the others serve meanwhile, and the broker re-sends
        what the dead one held. The vital children (broker, frontends) are restarted too once the
        server is up (`restart_all`): workers and frontends reconnect to a returning broker, and the
        clients re-send what was inside it (docs/protocol.md). Before that, a vital child that dies
        means the server cannot start, which its caller reports. Restarts wait a back-off that doubles
        (up to MAX_BACKOFF_S) while a child dies within STABLE_S of starting, so a crash loop cannot
        spin, and resets once it runs longer.
        """
        now = time.monotonic()
        for child in self.children:
            if child.alive():
                continue
            if not (child.restart or restart_all):
                log.error("%s exited with code %s", child.name, child.proc.returncode if child.proc else None)
                return child.name
            if child.restart_at is None:
                # NOTE: what the dead child started (gunicorn's workers) would hold its port: end it too.
                try:
                    if child.proc is not None:
                        os.killpg(child.proc.pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
                child.backoff_s = next_backoff_s(child.backoff_s, now - child.started_at)
                child.restart_at = now + child.backoff_s
                log.warning("%s exited with code %s: restarting in %.1f s", child.name,
                            child.proc.returncode if child.proc else None,
                            child.backoff_s)
            if now >= child.restart_at:
                child.start()
        return None

    def stop(self, grace_s: float = 10.0) -> None:
        for child in reversed(self.children):
            if child.proc is not None and child.alive():
                child.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for child in reversed(self.children):
            if child.proc is None:
                continue
            try:
                child.proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("%s did not stop in %.0f s: killing it", child.name, grace_s)
                os.killpg(child.proc.pid, signal.SIGKILL)
                child.proc.wait()
