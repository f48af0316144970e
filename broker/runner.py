"""What every long-running component's main() does: flags -> settings -> logging -> signals -> run."""
from __future__ import annotations

import argparse
import ctypes
import logging
import signal
import sys
from typing import Any, Callable, Protocol, Sequence

from .errors import ConfigError
from .logs import setup_logging
from .settings import add_arguments, load

_PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """Ask the kernel to send this process SIGTERM when its parent dies (Linux; elsewhere a no-op).

    For children whose parent may be SIGKILLed and so cannot stop them: `fractal serve`'s children,
    and gunicorn's uvicorn workers, which do not notice that their master is gone.
    """
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass


class Runnable(Protocol):
    def run(self) -> None: ...
    def stop(self) -> None: ...


def run_component(component: str, description: str, settings_cls: type,
                  build: Callable[[Any], Runnable], argv: Sequence[str] | None = None) -> int:
    """Run a component until SIGINT/SIGTERM; returns the process exit code (2 for bad settings)."""
    parser = argparse.ArgumentParser(prog=f"fractal {component}", description=description)
    add_arguments(parser, settings_cls, component)
    args = parser.parse_args(argv)
    try:
        settings: Any = load(settings_cls, component, args)
    except ConfigError as exc:
        print(f"fractal {component}: {exc}", file=sys.stderr)
        return 2
    # NOTE: a worker's log name is its node name when it has one (fractal serve's worker-1), so the
    # supervisor's "started worker-1", the log lines and the node id all say the same.
    setup_logging(getattr(settings, "node_name", "") or component, settings.log_level, settings.log_format)
    try:
        runnable = build(settings)
    except ConfigError as exc:  # e.g. an unreadable CURVE key: say so and exit, no traceback
        print(f"fractal {component}: {exc}", file=sys.stderr)
        return 2

    def _stop(signum: int, _frame: object) -> None:
        logging.getLogger(component).info("%s received, stopping", signal.Signals(signum).name)
        runnable.stop()

    signal.signal(signal.SIGINT, _stop)
    signal.signal(signal.SIGTERM, _stop)
    runnable.run()
    return 0
