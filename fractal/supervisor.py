"""Child processes of `fractal serve`: start, wait until ready, restart crashed workers, stop in order."""
from __future__ import annotations

import ctypes
import logging
import os
import signal
import subprocess
import time
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    # NOTE: if `fractal serve` itself is SIGKILLed, the kernel still takes its children down.
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass


@dataclass
class Child:
    name: str
    argv: list[str]
    env: dict[str, str]
    restart: bool = False
    proc: subprocess.Popen | None = None
    restarts: list[float] = field(default_factory=list)

    def start(self) -> None:
        self.proc = subprocess.Popen(self.argv, env=self.env, preexec_fn=_die_with_parent,
                                     start_new_session=True)
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

    def check(self) -> str | None:
        """Restart crashed restartable children; returns the name of a vital child that died."""
        for child in self.children:
            if child.alive():
                continue
            code = child.proc.returncode if child.proc else None
            now = time.monotonic()
            child.restarts = [t for t in child.restarts if now - t < 60]
            if not child.restart or len(child.restarts) >= 5:
                log.error("%s exited with code %s", child.name, code)
                return child.name
            log.warning("%s exited with code %s: restarting", child.name, code)
            child.restarts.append(now)
            child.start()
        return None

    def stop(self, grace_s: float = 10.0) -> None:
        for child in reversed(self.children):
            if child.alive():
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
