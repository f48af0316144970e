"""Logging set-up shared by every main(): one line per record, as text (the default) or as JSON.

JSON (FRACTAL_LOG_FORMAT=json) is one object per line, written by python-json-logger: `time`,
`level`, `component`, `node`, `pid`, `logger`, `message`, and the fields a log call passes with
`extra=` where they apply (`request_id`, `model`, `op`, `latency_ms`, `method`, `path`, `status`, ...),
so a log pipeline filters on fields instead of parsing sentences.
"""
from __future__ import annotations

import logging
import socket
import time

LOG_FORMATS = ("text", "json")

_JSON_FIELDS = "%(asctime)s %(levelname)s %(process)d %(name)s %(message)s"
_RENAMED = {"asctime": "time", "levelname": "level", "process": "pid", "name": "logger"}
_formatters: list[logging.Formatter] = []  # the JSON formatters made here, for set_node()


def formatter(component: str, fmt: str = "text", node: str = "") -> logging.Formatter:
    """The formatter of one component's records: text with component and pid, or JSON."""
    if fmt == "json":
        from pythonjsonlogger.json import JsonFormatter  # NOTE: imported only when asked for
        made = JsonFormatter(_JSON_FIELDS, rename_fields=_RENAMED,
                             static_fields={"component": component, "node": node or socket.gethostname()})
        made.converter = time.gmtime  # NOTE: ISO 8601 in UTC, so hosts in other time zones sort together
        made.default_time_format, made.default_msec_format = "%Y-%m-%dT%H:%M:%S", "%s.%03dZ"
        _formatters.append(made)
        return made
    return logging.Formatter(f"%(asctime)s %(levelname)s {component}[%(process)d] %(name)s: %(message)s")


def setup_logging(component: str, level: str = "INFO", fmt: str = "text", node: str = "") -> None:
    """Configure the root logger once, for a process's main() (or gunicorn's config) only."""
    handler = logging.StreamHandler()
    handler.setFormatter(formatter(component, fmt, node))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())


def set_node(node: str) -> None:
    """Name this process's node in JSON records from now on (a worker knows its id once it is built)."""
    for made in _formatters:
        made.static_fields["node"] = node  # type: ignore[attr-defined]  # only JsonFormatters are kept
