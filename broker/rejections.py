"""Why the broker answers a request itself: the `reason` label of fractal_broker_requests_rejected_total.

One enum, so the broker's call sites, the metric's help text and its series cleanup (metrics/definitions.py)
name the same values. It imports nothing, so the metrics package may read it without pulling in the broker.
"""
from __future__ import annotations

from enum import StrEnum


class Rejection(StrEnum):
    """A reason label value; a StrEnum, so the member is the label string itself (`str(member)`)."""

    BAD_REQUEST = "bad_request"  # a REQUEST without a body frame
    NO_WORKER = "no_worker"      # no worker registered for the service (or the last one left)
    DEADLINE = "deadline"        # the caller's deadline passed before a worker took it: dropped unrun
    OVERLOADED = "overloaded"    # the service's queue holds max_queue messages
    QUEUE_FULL = "queue_full"    # the model's queue holds max_queue_per_model requests
    WORKER_LOST = "worker_lost"  # a second worker died while running it
    STOPPING = "stopping"        # the broker stopped while it waited
