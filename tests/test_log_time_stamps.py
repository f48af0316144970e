"""Log lines' time stamps are made once per second (issue 13) and read exactly as logging's own."""
from __future__ import annotations

import json
import logging
import time

import pytest

from broker.logs import formatter


def _record(created: float) -> logging.LogRecord:
    record = logging.LogRecord("frontend.access", logging.INFO, "(unknown file)", 0, "%s %s", ("GET", "/"), None)
    record.created = created
    record.msecs = int((created - int(created)) * 1000) + 0.0
    return record


# NOTE: out of order and across seconds, as records from several threads can reach one handler.
TIMES = [1_700_000_000.0, 1_700_000_000.999, 1_700_000_001.001, 1_700_000_000.5, 1_700_003_600.25,
         time.time(), 1_700_003_600.75]


def test_text_time_stamps_are_loggings_own_to_the_millisecond():
    ours = formatter("frontend", "text")
    plain = logging.Formatter(ours._fmt)
    for created in TIMES:
        assert ours.format(_record(created)) == plain.format(_record(created))
    assert ours.formatTime(_record(TIMES[0]), "%H:%M") == plain.formatTime(_record(TIMES[0]), "%H:%M")


@pytest.mark.parametrize("created", TIMES)
def test_json_time_stamps_are_utc_iso_8601_to_the_millisecond(created):
    line = json.loads(formatter("frontend", "json", "node-1").format(_record(created)))
    seconds = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created))
    assert line["time"] == f"{seconds}.{int((created - int(created)) * 1000):03d}Z"
    assert line["message"] == "GET /" and line["component"] == "frontend"
