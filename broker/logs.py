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


class _SecondStamps(logging.Formatter):
    """A Formatter whose default time stamp (`asctime`) strftimes each second once, not once per record.

    NOTE: Formatter.formatTime's converter and strftime were 1.3 µs of a request's 4 µs access line
    (issue 13: the frontend's CPU per request); the text is the same as Formatter's, to the millisecond.
    An explicit datefmt goes to Formatter's own.
    """

    _cached: tuple[int, str] = (-1, "")  # (a second since the epoch, its strftime): one tuple, swapped whole

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:  # noqa: N802
        if datefmt:
            return super().formatTime(record, datefmt)
        second, stamp = self._cached
        if second != int(record.created):
            second, stamp = int(record.created), time.strftime(self.default_time_format,
                                                                self.converter(record.created))
            self._cached = (second, stamp)
        if self.default_msec_format:
            return self.default_msec_format % (stamp, record.msecs)
        return stamp


def formatter(component: str, fmt: str = "text", node: str = "") -> logging.Formatter:
    """The formatter of one component's records: text with component and pid, or JSON."""
    if fmt == "json":
        from pythonjsonlogger.json import JsonFormatter  # NOTE: imported only when asked for

        class _Json(_SecondStamps, JsonFormatter):
            """python-json-logger's formatter with the time stamp of one second made once."""

        made = _Json(_JSON_FIELDS, rename_fields=_RENAMED,
                     static_fields={"component": component, "node": node or socket.gethostname()})
        made.converter = time.gmtime  # NOTE: ISO 8601 in UTC, so hosts in other time zones sort together
        made.default_time_format, made.default_msec_format = "%Y-%m-%dT%H:%M:%S", "%s.%03dZ"
        _formatters.append(made)
        return made
    return _SecondStamps(f"%(asctime)s %(levelname)s {component}[%(process)d] %(name)s: %(message)s")


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
